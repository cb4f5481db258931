// Generation: the batched token loop. Each request's context is evaluated
// once (or taken from the prompt cache), SLOT optionally learns the request's
// delta, its n samples fork the context's KV cells, and every live sequence
// advances by one llama_decode per step, its logits passed through its
// request's stages (SLOT's bias b = W*delta) before its own sampler.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "chat_format.h"
#include "engine.h"
#include "output_head.h"
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

// A mutex that hands itself over in arrival order: a thread that generates
// re-locks it for every token step, and a plain mutex would let it starve
// other threads' calls.
class FairMutex {
public:
    void lock() {
        std::unique_lock<std::mutex> guard(m_);
        const uint64_t ticket = next_++;
        cv_.wait(guard, [&] { return serving_ == ticket; });
    }
    void unlock() {
        {
            std::lock_guard<std::mutex> guard(m_);
            ++serving_;
        }
        cv_.notify_all();
    }

private:
    std::mutex m_;
    std::condition_variable cv_;
    uint64_t next_ = 0;
    uint64_t serving_ = 0;
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

class Batcher;
struct BatchJob;
struct BatchEvents;

// A model ready to generate: the engine plus the output head, loaded on first
// SLOT use. One Session may be shared by threads. Generate calls made at the
// same time from several threads decode together (continuous batching): each
// call queues its requests, and one waiting caller at a time drives the
// shared token loop for all of them, taking the engine's lock once per step,
// so other calls (tokenising, other models' work) interleave between steps.
// Between calls, the context's sequences keep their KV cells as a prompt
// cache, dropped least recently used first when cells are needed.
class Session {
public:
    explicit Session(const EngineParams& params);
    ~Session();
    void close();
    bool closed() const;

    GenerationResult generate(const GenerationRequest& request, const TextCallback& on_text,
                              const InterruptCheck& interrupted);
    // Every request's n samples, request by request, decoded together up to
    // n_parallel sequences at a time (with other threads' calls); further
    // samples wait for a free one. `interrupted` is polled on the calling
    // thread only; when it turns true the call's samples stop and it throws
    // Interrupted. Callbacks may run on another caller's thread.
    std::vector<GenerationResult> generate_batch(const std::vector<GenerationRequest>& requests,
                                                 const BatchTextCallback& on_text,
                                                 const InterruptCheck& interrupted);
    // At most this many calls may wait for admission; a further call throws
    // QueueFullError at once. 0: no limit.
    void set_max_waiting(int n);
    BatchStats stats();
    // Drops the prompt cache (sequences in use by running calls are kept).
    void clear_cache();
    // Drops the cached sequences whose tokens start with `prefix`; returns how many.
    int drop_cached(const std::vector<int32_t>& prefix);

    std::vector<int32_t> tokenize(const std::string& text, bool add_special, bool parse_special);
    std::string detokenize(const std::vector<int32_t>& tokens);
    std::string token_piece(int32_t token);
    std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_assistant,
                                    const std::string& template_name);
    const ModelFileInfo& file_info();
    // A string value of LoRA adapter `index`'s GGUF metadata ("" when absent).
    std::string adapter_meta(int index, const std::string& key);
    int n_adapters();
    int32_t eos_token();
    int n_vocab();
    int n_embd();
    int n_ctx();
    int n_threads();
    int n_parallel();
    int64_t decoded_tokens();  // tokens evaluated by llama.cpp so far
    int64_t logit_rows();      // rows of logits computed so far (output-head evaluations)
    bool has_chat_template();
    // The model's chat templates for llama.cpp's common/chat (tools, tool-call
    // parsing), or `override_source`'s; and a chat rendered with them.
    std::shared_ptr<const ChatTemplates> chat_templates(const std::string& override_source);
    ChatPrompt apply_chat(const ChatTemplates& templates, const ChatRequest& request);
    bool is_eog(int32_t token);
    // Where SLOT's head products run, e.g. "CPU (CPU head kernels)"; loads the head.
    std::string slot_backend();

    // Final normed hidden states of rows of tokens, without logits (for
    // datastores); the prompt cache is untouched.
    void hidden_states(const std::vector<std::vector<int32_t>>& rows, const Engine::StatesSink& sink,
                       const InterruptCheck& interrupted);
    // A datastore index searched on this model's compute device.
    std::shared_ptr<RtdIndex> make_rtd_index(const uint16_t* keys, const int32_t* values, int64_t n, int64_t dim,
                                             int heads, std::shared_ptr<void> keepalive);

    // For tests and inspection.
    std::vector<float> output_matrix();  // n_vocab x n_embd
    void prompt_states(const std::vector<int32_t>& tokens, std::vector<float>& hidden, std::vector<float>& logits,
                       const InterruptCheck& interrupted);
    double slot_loss_and_gradient(const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                                  bool recompute, const std::string& cache_precision, double cache_tail_mass,
                                  std::vector<float>& grad, double& loss_bound,
                                  const InterruptCheck& interrupted);
    std::vector<float> logit_bias(const std::vector<float>& delta);
    // log p(tokens[i] | tokens[<i]) for i >= first (teacher forcing), with
    // delta's logit bias when delta is non-empty.
    std::vector<double> token_logprobs(const std::vector<int32_t>& tokens, int first,
                                       const std::vector<float>& delta, const InterruptCheck& interrupted);
    std::vector<int32_t> reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                          const InterruptCheck& interrupted, double* decode_seconds);
    std::vector<std::vector<int32_t>> reference_greedy_batch(const std::vector<std::vector<int32_t>>& prompts,
                                                             int n_new, const InterruptCheck& interrupted,
                                                             double* decode_seconds);

private:
    Engine& engine();
    OutputHead& head();
    Batcher& batcher();
    // Marks calls admitted or done and wakes their callers.
    void publish(BatchEvents& ev);
    // Calls that use the context directly need it free of running generation.
    void require_idle(const char* what);

    mutable FairMutex mutex_;  // the engine, the head and the batcher's sequences
    // The engine's lifetime, for calls that only read the vocabulary and
    // template (thread-safe in llama.cpp) and so need not wait for a step.
    mutable std::shared_mutex life_;
    std::unique_ptr<Engine> engine_;
    std::unique_ptr<ComputeBackend> backend_;
    std::unique_ptr<OutputHead> head_;
    std::unique_ptr<Batcher> batcher_;
    ModelShape shape_;
    std::atomic<bool> closed_{false};
    LoopCounters counters_;
    bool portable_head_ops_ = false;  // SLOT_CPP_PORTABLE_HEAD_OPS=1: the GPU code path on any backend

    // The queue of calls and the driver role; guarded by jobs_mutex_, never
    // held while waiting for mutex_.
    std::mutex jobs_mutex_;
    std::condition_variable jobs_cv_;
    std::deque<std::shared_ptr<BatchJob>> incoming_;
    bool driving_ = false;
    int max_waiting_ = 0;
    int64_t waiting_ = 0;
    int64_t cancelled_waiting_ = 0;  // calls cancelled before the batcher saw them (not in counters_)
};

}  // namespace slot
