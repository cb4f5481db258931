// Generation's data: a request and its result, the batch loop's counters,
// and the checks every request passes before any work starts. The loop itself
// is the Batcher (batcher.h), the model's facade the Session (session.h).
// Each request's context is evaluated once (or taken from the prompt cache),
// SLOT optionally learns the request's delta, its n samples fork the
// context's KV cells, and every live sequence advances by one llama_decode
// per step, its logits passed through its request's stages (SLOT's bias
// b = W*delta) before its own sampler.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"
#include "grammar.h"
#include "rtd.h"
#include "sampling.h"
#include "slot_optimizer.h"

namespace slot {

// Receives each new piece of text; returning false stops generation.
using TextCallback = std::function<bool(const std::string& piece)>;
// The same for a batch: `index` is the result's index.
using BatchTextCallback = std::function<bool(int index, const std::string& piece)>;

struct GenerationRequest {
    std::vector<int32_t> prompt;
    // Tokens of a response already begun: generation continues after them
    // (only with a given delta or none; SLOT learns on a prompt alone).
    std::vector<int32_t> response_prefix;
    int n = 1;  // samples of this prompt; sample j draws with seed + j
    int max_tokens = 256;
    SamplingParams sampling;
    std::vector<std::string> stop;
    SlotConfig slot;
    std::vector<float> delta;  // when set: apply this delta, learn nothing
    bool ignore_eos = false;
    bool logprobs = false;
    int top_logprobs = 0;
    bool cache_prompt = true;  // reuse (and leave behind) KV cells of earlier calls
    // The LoRA adapters' scales for this request, one per adapter the model
    // loaded; empty: the model's current defaults. Requests with other
    // scales than the running ones wait for them to finish.
    std::vector<float> lora_scales;
    // Speculation: up to draft_max tokens drafted per step, by the session's
    // draft model or else by prompt lookup (matching the last draft_ngram,
    // down to 1, tokens earlier in the context and the answer), checked in
    // the same llama_decode. A sampled token equal to the draft keeps the
    // draft's next logits; the samples' distribution is the same as without
    // it (0: off).
    int draft_max = 0;
    int draft_ngram = 3;
    // With a draft model: a draft ends at a token the draft model gives less
    // than this probability.
    float draft_p_min = 0.75f;
    // At the context's last position: the log-probabilities of these tokens
    // (under the request's stages), and its final normed hidden state.
    std::vector<int32_t> score_tokens;
    bool return_hidden = false;
    // The log-probability of each prompt token after the first under the
    // request's stages (OpenAI's echo with logprobs); the prompt is then
    // evaluated whole, not taken from the prompt cache. Not with SLOT's
    // optimisation or a stage that reads hidden states.
    bool prompt_logprobs = false;
    // Retrieval (RTD): blended into every distribution this request samples
    // from or scores, after SLOT's bias. The query is the model's own hidden
    // state h (not h + delta): the keys were taken from the plain model.
    std::shared_ptr<const RtdIndex> rtd;
    RtdParams rtd_params;
    // Added to these tokens' logits after every other stage (OpenAI's logit_bias).
    std::vector<std::pair<int32_t, float>> logit_bias;
    // A GBNF grammar (start rule "root") that every sample, response prefix
    // included, must follow: the tokens it refuses are masked before the
    // draw, after every other stage and the penalties.
    std::string grammar;
    // A JSON schema (JSON text) every sample follows instead: converted to
    // the grammar above by llama.cpp's json-schema-to-grammar when the
    // request is checked (not with a grammar).
    std::string json_schema;
    // Make the grammar lazy: it applies from the first match of one of these
    // regular expressions over the answer, or the first of these tokens.
    std::vector<std::string> grammar_triggers;
    std::vector<int32_t> grammar_trigger_tokens;
    // Tokens the grammar reads before the answer (text the prompt ends with).
    std::vector<int32_t> grammar_prefill;
    // Tokens whose text the answer shows although they are control tokens.
    std::vector<int32_t> render_tokens;
};

struct GenerationResult {
    std::string text;
    std::vector<int32_t> tokens;
    std::string finish_reason;  // "eos", "length", "stop", "callback"
    std::vector<float> delta;   // empty when no delta was used
    std::vector<double> losses;
    int steps_done = 0;
    double slot_lr = 0.0;                     // the step size used (chosen per prompt with auto_lr)
    std::vector<double> calibration_lrs;      // auto_lr: step sizes measured, ascending
    std::vector<double> calibration_kls;      // and the mean KL of their deltas
    double calibration_seconds = 0.0;
    std::string slot_status;    // why optimisation ended, or why it did not run
    std::string slot_path;      // "cached", "cached_bf16", "bounded", "recompute" or ""
    int64_t slot_cache_bytes = 0;
    double slot_loss_bound = 0.0;  // bounded path: the bound on the losses' error
    double slot_cache_mean_k = 0.0;
    StepProfile slot_profile;
    int prompt_tokens = 0;
    int cached_tokens = 0;      // prompt tokens whose KV cells were reused, not evaluated
    int drafted_tokens = 0;     // speculation: tokens drafted, and those the samples matched
    int accepted_tokens = 0;
    uint64_t seed = 0;
    std::vector<float> token_logprobs;                             // with logprobs
    std::vector<std::vector<std::pair<int32_t, float>>> top_logprobs;  // with top_logprobs > 0
    std::vector<float> score_logprobs;  // one per score_tokens entry
    std::vector<float> prompt_logprobs; // with prompt_logprobs: one per context token after the first
    std::vector<float> hidden;          // n_embd, with return_hidden
    double prefill_seconds = 0.0;
    double optimise_seconds = 0.0;
    double generate_seconds = 0.0;
};

// Counters of the shared token loop, for monitoring.
struct BatchStats {
    int64_t waiting_requests = 0;   // generate calls not yet fully admitted to sequences
    int64_t live_sequences = 0;
    int64_t completed_calls = 0;
    int64_t failed_calls = 0;       // errors and cancellations
    int64_t generated_tokens = 0;
    int64_t decode_steps = 0;       // token steps (one llama_decode for every live sequence)
    int64_t prompt_tokens = 0;      // context tokens of admitted samples' groups
    int64_t cached_tokens = 0;      // of those, reused from the prompt cache
    int64_t slot_requests = 0;
    int64_t rtd_requests = 0;
};

// A loaded model's fixed sizes.
struct ModelShape {
    const llama_vocab* vocab = nullptr;
    int n_vocab = 0;
    int n_embd = 0;
    int n_ctx = 0;
    int n_parallel = 0;
    int seq_capacity = 0;        // cells one sequence may hold (n_ctx unless deterministic)
    bool deterministic = false;  // each sequence in a KV stream of its own
    int n_adapters = 0;          // LoRA adapters loaded with the model
    bool recurrent = false;      // recurrent or hybrid: a sequence's state cannot be cut back
};

// BatchStats' counters, updated by the token loop and read without its lock.
struct LoopCounters {
    std::atomic<int64_t> live_sequences{0};
    std::atomic<int64_t> completed_calls{0};
    std::atomic<int64_t> failed_calls{0};
    std::atomic<int64_t> generated_tokens{0};
    std::atomic<int64_t> decode_steps{0};
    std::atomic<int64_t> prompt_tokens{0};
    std::atomic<int64_t> cached_tokens{0};
    std::atomic<int64_t> slot_requests{0};
    std::atomic<int64_t> rtd_requests{0};
};

// Checks a request completely before any work starts, so that one bad
// request fails the call instead of another request's output; `index` >= 0
// names the request in the message (request.cpp).
void validate_request(const ModelShape& e, const GenerationRequest& req, int index);
// Whether the request is constrained: a grammar or a JSON schema.
bool has_grammar(const GenerationRequest& req);
// The request's grammar (its JSON schema converted), parsed, with its
// response prefix checked against it.
std::shared_ptr<const Grammar> parse_grammar(const ModelShape& e, const GenerationRequest& req, int index);
// Whether a request's stages read the final hidden state (the retrieval blend).
bool uses_hidden(const GenerationRequest& req);
// KV cells that one group of `samples` samples of `req` may occupy: the
// context once (the samples share it) and each sample's generated tokens but
// the last, which is never evaluated.
int64_t cells_needed(const GenerationRequest& req, int samples);

}  // namespace slot
