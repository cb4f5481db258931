// The llama.cpp engine: one model, one context holding up to n_parallel
// sequences in a unified KV cache, its tokenizer and chat template. It knows
// which tokens each sequence holds (so that prefixes can be shared and reused)
// but not why: scheduling lives in generation. Owns every llama.cpp handle
// through RAII; all llama.cpp return codes are checked here.
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
    int n_parallel = 4;      // sequences in the context; they share its n_ctx cells
    bool use_mmap = true;
    // "host:port" of ggml rpc-server processes: the offloaded layers are
    // split across them (llama.cpp's RPC backend), and n_gpu_layers 0 means all.
    std::vector<std::string> rpc_servers;
    // LoRA adapters (GGUF files made for this base model) and their scales,
    // applied to every context of the engine.
    std::vector<std::pair<std::string, float>> loras;
    // Batch-invariant evaluation: a sequence's logits do not depend on what
    // else is in the batch or the cache. Each sequence gets its own KV stream
    // (n_ctx / n_parallel cells, filled in position order), flash attention,
    // and the CPU backend's reference kernels; weights are not repacked.
    bool deterministic = false;
    // The KV cache's types (ggml type names: "f16", "q8_0", ...) and flash
    // attention ("auto", "on", "off"); a quantised V cache needs flash attention.
    std::string cache_type_k = "f16";
    std::string cache_type_v = "f16";
    std::string flash_attn = "auto";
    float rope_freq_base = 0.0f;   // 0: the model's
    float rope_freq_scale = 0.0f;  // 0: the model's
    // RoPE scaling: "" (the model's), "none", "linear" or "yarn"; YaRN's
    // settings, negative (or 0 for the original context): the model's.
    std::string rope_scaling;
    int yarn_orig_ctx = 0;
    float yarn_ext_factor = -1.0f;
    float yarn_attn_factor = -1.0f;
    float yarn_beta_fast = -1.0f;
    float yarn_beta_slow = -1.0f;
    bool use_mlock = false;
    // GGUF metadata overridden at load (llama.cpp's --override-kv): key, type
    // ("int", "float", "bool" or "str") and the value as text.
    struct KvOverride {
        std::string key;
        std::string type;
        std::string value;
    };
    std::vector<KvOverride> kv_overrides;
};

// How many leading tokens two token sequences share.
inline size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
    const size_t n = a.size() < b.size() ? a.size() : b.size();
    size_t i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return i;
}

// Returns true when the current call should stop (a pending Ctrl-C).
using InterruptCheck = std::function<bool()>;

// Called for each prefill batch: positions [first, first+count), their logits
// (count x n_vocab, row-major) and final normed hidden states (count x n_embd);
// hidden is null when it was not requested.
using PrefillSink = std::function<void(int first, int count, const float* logits, const float* hidden)>;

// Frees KV cells (by dropping a cached sequence) when a decode finds no room;
// returns false when nothing is left to free.
using MakeRoom = std::function<bool()>;

// One token of a multi-sequence batch; it goes at the next position of `seq`.
struct BatchToken {
    int seq = 0;
    int32_t token = 0;
    bool logits = false;
};

struct ModelDeleter { void operator()(llama_model* m) const { llama_model_free(m); } };
struct AdapterDeleter { void operator()(llama_adapter_lora* a) const { llama_adapter_lora_free(a); } };
using AdapterPtr = std::unique_ptr<llama_adapter_lora, AdapterDeleter>;
struct ContextDeleter { void operator()(llama_context* c) const { llama_free(c); } };
using ModelPtr = std::unique_ptr<llama_model, ModelDeleter>;
using ContextPtr = std::unique_ptr<llama_context, ContextDeleter>;

class Engine {
public:
    explicit Engine(const EngineParams& params);
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    const ModelFileInfo& file_info() const { return info_; }
    // A string value of LoRA adapter `index`'s GGUF metadata; empty when the key is absent.
    std::string adapter_meta(int index, const std::string& key) const;
    int n_adapters() const { return static_cast<int>(adapters_.size()); }
    // The adapters' scales a request without its own takes, and those the
    // context applies now. Setting other scales on the context drops the
    // prompt cache (cells computed under other weights); no sequence may be live.
    const std::vector<float>& default_lora_scales() const { return adapter_scales_; }
    void set_default_lora_scales(const std::vector<float>& scales);
    const std::vector<float>& lora_scales() const { return active_scales_; }
    void set_lora_scales(const std::vector<float>& scales);
    int32_t eos_token() const { return llama_vocab_eos(vocab_); }  // -1 when the vocabulary has none
    const EngineParams& params() const { return params_; }
    int n_vocab() const { return n_vocab_; }
    const llama_vocab* vocab() const { return vocab_; }
    int n_embd() const { return n_embd_; }
    int n_ctx() const;
    // The cells one sequence may hold: n_ctx, or its own stream's share in deterministic mode.
    int seq_capacity() const;
    bool deterministic() const { return params_.deterministic; }
    int n_threads() const { return n_threads_; }
    llama_model* model() const { return model_.get(); }

    std::vector<int32_t> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    // Bytes of one token; may be a partial UTF-8 sequence.
    std::string token_piece(int32_t token, bool render_special = false) const;
    std::string detokenize(const std::vector<int32_t>& tokens) const;
    bool is_eog(int32_t token) const;
    void check_tokens(const std::vector<int32_t>& tokens) const;

    bool has_chat_template() const;

    // ---- sequences (ids 0 .. n_parallel-1) ----
    int n_parallel() const { return static_cast<int>(seq_tokens_.size()); }
    int n_batch() const { return params_.n_batch; }
    bool recurrent() const { return llama_model_is_recurrent(model_.get()) || llama_model_is_hybrid(model_.get()); }
    // The tokens whose KV cells sequence `seq` holds, at positions 0, 1, ...
    const std::vector<int32_t>& seq_tokens(int seq) const;
    void seq_clear(int seq);
    // A sequence's KV cells as llama.cpp serialises them (llama_state_seq_*),
    // and the same written back into `seq` (cleared first) as holding
    // `tokens`; std::invalid_argument when the data does not fit this context.
    std::string seq_state(int seq) const;
    void set_seq_state(int seq, const std::string& data, const std::vector<int32_t>& tokens);
    // Keeps the first n cells of `seq`; false (and the sequence cleared) when
    // the memory cannot drop a suffix.
    bool seq_truncate(int seq, int n);
    // `dst` becomes the first n cells of `src`: shared cells, or in
    // deterministic mode a copy of src's stream cut back to n (no compute).
    void seq_fork(int src, int dst, int n);
    void clear_all();

    // Which logits an evaluation produces.
    // Hidden: every position's final normed hidden state and no logits (the
    // graph stops after the final norm), for a caller with a head of its own.
    enum class Outputs { None, Last, All, Hidden };
    // Whether append() takes Outputs::Hidden (a CPU-only engine).
    bool hidden_only_ok() const { return hidden_only_ok_; }
    // Evaluates `tokens` after what `seq` holds. With Outputs::All, every
    // position's logits and hidden state reach `sink` batch by batch (at most
    // max_rows_per_batch rows each; `first` counts from the sequence's start);
    // with Last, only the last position's logits, which last_logits() then
    // returns. make_room (may be empty) is asked to free cells when the KV
    // cache is full; ContextLengthError when it cannot. Without
    // prefill_hidden, Outputs::All hands the sink logits alone (hidden null).
    void append(int seq, const std::vector<int32_t>& tokens, Outputs outputs, int max_rows_per_batch,
                const PrefillSink& sink, const MakeRoom& make_room, const InterruptCheck& interrupted,
                bool last_hidden = false, bool prefill_hidden = true);
    // Evaluates a context so that its last token's logits are computed the
    // same way whether or not a prefix came from the cache: the tokens before
    // the last in batches, then the last one alone.
    // With hidden, last_hidden() then holds the last token's final normed hidden state.
    void append_context(int seq, const std::vector<int32_t>& tokens, const MakeRoom& make_room,
                        const InterruptCheck& interrupted, bool hidden = false);
    const float* last_hidden() const { return last_hidden_; }
    // Clears every sequence, then evaluates `tokens` into sequence 0 as append does.
    void prefill(const std::vector<int32_t>& tokens, bool all_positions, int max_rows_per_batch,
                 const PrefillSink& sink, const InterruptCheck& interrupted);
    const float* last_logits() const { return last_logits_; }

    // One llama_decode over tokens of several sequences (at most n_batch);
    // logits_row(i) then holds the logits of the i-th token that asked for
    // them, and with `hidden`, hidden_row(i) its final normed hidden state.
    void decode(const std::vector<BatchToken>& tokens, const MakeRoom& make_room,
                const InterruptCheck& interrupted, bool hidden = false);
    const float* logits_row(int i) const;
    const float* hidden_row(int i) const;

    // Final normed hidden states of many token sequences, for building
    // datastores: evaluated in a context of their own (the prompt cache is
    // untouched), several sequences per llama_decode, the graph stopped after
    // the final norm so that no logits are computed. `sink` receives each
    // row's states (len x n_embd) in order.
    using StatesSink = std::function<void(size_t row, const float* hidden, int len)>;
    void hidden_states(const std::vector<std::vector<int32_t>>& rows, const StatesSink& sink,
                       const InterruptCheck& interrupted);
    // Tokens evaluated since the engine was created.
    int64_t decoded_tokens() const { return decoded_tokens_; }
    // Rows of logits llama.cpp has computed: the output head's evaluations.
    int64_t logit_rows() const { return logit_rows_; }

    // Plain llama.cpp greedy decoding on a fresh context with its stock greedy
    // sampler: an independent reference for tests and benchmarks
    // (reference_loop.cpp).
    std::vector<int32_t> reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                          const InterruptCheck& interrupted, double* decode_seconds);
    // The same for several prompts at once, the way llama.cpp's batched
    // example does it: one context, one sequence and one stock greedy sampler
    // per prompt, one llama_decode per step for every live sequence.
    std::vector<std::vector<int32_t>> reference_greedy_batch(const std::vector<std::vector<int32_t>>& prompts,
                                                             int n_new, const InterruptCheck& interrupted,
                                                             double* decode_seconds);

private:
    // 0 on success, 1 when the KV cache has no room (nothing changed); throws otherwise.
    int decode_checked(llama_batch& batch, const InterruptCheck& interrupted, const char* what);
    // decode_checked, asking make_room for cells until the batch fits;
    // ContextLengthError when nothing is left to free.
    void decode_with_room(llama_batch& batch, const MakeRoom& make_room, const InterruptCheck& interrupted,
                          const char* what);
    void set_embeddings(bool on);
    static bool abort_trampoline(void* data);
    static bool stop_after_norm(ggml_tensor* t, bool ask, void* data);
    // The main context's graph callback: stop_after_norm while stop_at_norm_ is set, else nothing.
    static bool main_graph_callback(ggml_tensor* t, bool ask, void* data);
    bool stop_at_norm_ = false;
    bool hidden_only_ok_ = false;
    llama_context_params side_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq) const;
    // The RoPE and YaRN settings, on every context of the engine.
    void set_rope(llama_context_params& cp) const;
    // A new context with the LoRA adapters set on it (their default scales).
    ContextPtr new_context(const llama_context_params& cp, const std::string& what);
    // Sets the adapters on `ctx` at `scales` (one per adapter); false when llama.cpp refuses.
    bool set_adapters(llama_context* ctx, const std::vector<float>& scales) const;

    EngineParams params_;
    std::vector<ggml_backend_dev_t> rpc_devices_;  // null-terminated, for the model's params
    std::vector<llama_model_kv_override> kv_overrides_;  // key "" ends the list
    ModelFileInfo info_;
    ModelPtr model_;
    std::vector<AdapterPtr> adapters_;  // after model_, before the contexts: freed in between
    std::vector<float> adapter_scales_;
    std::vector<float> active_scales_;
    ContextPtr ctx_;
    ContextPtr states_ctx_;  // hidden_states(): created on first use
    int states_batch_ = 0;
    const llama_vocab* vocab_ = nullptr;
    int n_vocab_ = 0;
    int n_embd_ = 0;
    int n_threads_ = 1;
    bool embeddings_on_ = false;
    const float* last_logits_ = nullptr;
    const float* last_hidden_ = nullptr;
    const InterruptCheck* active_check_ = nullptr;
    std::vector<std::vector<int32_t>> seq_tokens_;
    std::vector<int> output_rows_;  // batch index of each output row of the last decode()
    int64_t decoded_tokens_ = 0;
    int64_t logit_rows_ = 0;
    void count_logit_rows(const llama_batch& batch);
};

}  // namespace slot
