// The generation loop: prefill once, optionally learn delta (SLOT), then
// decode token by token with b = W*delta added to every step's logits.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "engine.h"
#include "output_head.h"
#include "sampling.h"
#include "slot_optimizer.h"

namespace slot {

// Receives each new piece of text; returning false stops generation.
using TextCallback = std::function<bool(const std::string& piece)>;

struct GenerationRequest {
    std::vector<int32_t> prompt;
    int max_tokens = 256;
    SamplingParams sampling;
    std::vector<std::string> stop;
    SlotConfig slot;
    std::vector<float> delta;  // when set: apply this delta, learn nothing
    bool ignore_eos = false;
};

struct GenerationResult {
    std::string text;
    std::vector<int32_t> tokens;
    std::string finish_reason;  // "eos", "length", "stop", "callback", "context_full"
    std::vector<float> delta;   // empty when no delta was used
    std::vector<double> losses;
    int steps_done = 0;
    std::string slot_status;    // why optimisation ended, or why it did not run
    std::string slot_path;      // "cached", "recompute" or ""
    int64_t slot_cache_bytes = 0;
    StepProfile slot_profile;
    int prompt_tokens = 0;
    double prefill_seconds = 0.0;
    double optimise_seconds = 0.0;
    double generate_seconds = 0.0;
};

// A model ready to generate: the engine plus the output head, loaded on first
// SLOT use. Calls are serialised by a mutex, so one Session may be shared by
// threads.
class Session {
public:
    explicit Session(const EngineParams& params);
    void close();
    bool closed() const;

    GenerationResult generate(const GenerationRequest& request, const TextCallback& on_text,
                              const InterruptCheck& interrupted);

    std::vector<int32_t> tokenize(const std::string& text, bool add_special, bool parse_special);
    std::string detokenize(const std::vector<int32_t>& tokens);
    std::string token_piece(int32_t token);
    std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_assistant,
                                    const std::string& template_name);
    const ModelFileInfo& file_info();
    int n_vocab();
    int n_embd();
    int n_ctx();
    int n_threads();
    bool has_chat_template();
    bool is_eog(int32_t token);
    // Where SLOT's head products run, e.g. "CPU (CPU head kernels)"; loads the head.
    std::string slot_backend();

    // For tests and inspection.
    std::vector<float> output_matrix();  // n_vocab x n_embd
    void prompt_states(const std::vector<int32_t>& tokens, std::vector<float>& hidden, std::vector<float>& logits,
                       const InterruptCheck& interrupted);
    double slot_loss_and_gradient(const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                                  bool recompute, std::vector<float>& grad, const InterruptCheck& interrupted);
    std::vector<float> logit_bias(const std::vector<float>& delta);
    // log p(tokens[i] | tokens[<i]) for i >= first (teacher forcing), with
    // delta's logit bias when delta is non-empty.
    std::vector<double> token_logprobs(const std::vector<int32_t>& tokens, int first,
                                       const std::vector<float>& delta, const InterruptCheck& interrupted);
    std::vector<int32_t> reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                          const InterruptCheck& interrupted, double* decode_seconds);

private:
    Engine& engine();
    OutputHead& head();

    mutable std::mutex mutex_;
    std::unique_ptr<Engine> engine_;
    std::unique_ptr<ComputeBackend> backend_;
    std::unique_ptr<OutputHead> head_;
    bool portable_head_ops_ = false;  // SLOT_CPP_PORTABLE_HEAD_OPS=1: the GPU code path on any backend
};

}  // namespace slot
