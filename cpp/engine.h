// The llama.cpp engine: one model, one context, its tokenizer and chat
// template, and the prompt prefill that SLOT builds on. Owns every llama.cpp
// handle through RAII; all llama.cpp return codes are checked here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "gguf_meta.h"
#include "llama.h"

namespace slot {

struct EngineParams {
    std::string model_path;
    int n_ctx = 4096;        // 0: the model's training context
    int n_batch = 512;       // tokens per llama_decode call during prefill
    int n_threads = 0;       // 0: all hardware threads
    int n_gpu_layers = 0;    // -1: all layers
    bool use_mmap = true;
};

struct ChatMessage {
    std::string role;
    std::string content;
};

// Returns true when the current call should stop (a pending Ctrl-C).
using InterruptCheck = std::function<bool()>;

// Called for each prefill batch: positions [first, first+count), their logits
// (count x n_vocab, row-major) and final normed hidden states (count x n_embd);
// hidden is null when it was not requested.
using PrefillSink = std::function<void(int first, int count, const float* logits, const float* hidden)>;

struct ModelDeleter { void operator()(llama_model* m) const { llama_model_free(m); } };
struct ContextDeleter { void operator()(llama_context* c) const { llama_free(c); } };
using ModelPtr = std::unique_ptr<llama_model, ModelDeleter>;
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;

class Engine {
public:
    explicit Engine(const EngineParams& params);
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    const ModelFileInfo& file_info() const { return info_; }
    const EngineParams& params() const { return params_; }
    int n_vocab() const { return n_vocab_; }
    int n_embd() const { return n_embd_; }
    int n_ctx() const;
    int n_threads() const { return n_threads_; }
    llama_model* model() const { return model_.get(); }

    std::vector<int32_t> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    // Bytes of one token; may be a partial UTF-8 sequence.
    std::string token_piece(int32_t token, bool render_special = false) const;
    std::string detokenize(const std::vector<int32_t>& tokens) const;
    bool is_eog(int32_t token) const;
    void check_tokens(const std::vector<int32_t>& tokens) const;

    // Formats messages with the model's chat template, or with `template_name`
    // (a built-in name such as "chatml" or a template string) when given.
    std::string apply_chat_template(const std::vector<ChatMessage>& messages, bool add_assistant,
                                    const std::string& template_name) const;
    bool has_chat_template() const;

    // Evaluates the prompt from an empty KV cache. With all_positions, every
    // position's logits and hidden state reach `sink` batch by batch (at most
    // max_rows_per_batch rows each); otherwise only the last position's logits,
    // which last_logits() then returns. The KV cache is left holding the prompt.
    void prefill(const std::vector<int32_t>& tokens, bool all_positions, int max_rows_per_batch,
                 const PrefillSink& sink, const InterruptCheck& interrupted);
    const float* last_logits() const { return last_logits_; }

    // Appends one token at position `pos`; last_logits() then holds its logits.
    void decode_next(int32_t token, int pos, const InterruptCheck& interrupted);

    // Plain llama.cpp greedy decoding on a fresh context with its stock greedy
    // sampler: an independent reference for tests and benchmarks.
    std::vector<int32_t> reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                          const InterruptCheck& interrupted, double* decode_seconds);

private:
    void decode_checked(llama_batch& batch, const InterruptCheck& interrupted, const char* what);
    static bool abort_trampoline(void* data);

    EngineParams params_;
    ModelFileInfo info_;
    ModelPtr model_;
    ContextPtr ctx_;
    const llama_vocab* vocab_ = nullptr;
    int n_vocab_ = 0;
    int n_embd_ = 0;
    int n_threads_ = 1;
    bool embeddings_on_ = false;
    const float* last_logits_ = nullptr;
    const InterruptCheck* active_check_ = nullptr;
};

}  // namespace slot
