// The session facade: one loaded model shared by threads. It owns the
// engine, the output head (loaded on first SLOT use) and the batch loop
// (batcher.h), queues generate calls and hands the driver role to one waiting
// caller at a time; every other call forwards to the engine under the right
// lock. Probes and reference loops reach the model through with_model.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <vector>

#include "backend.h"
#include "chat_format.h"
#include "engine.h"
#include "generation.h"
#include "output_head.h"

namespace slot {

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

// The device that holds the offloaded layers (the first GPU), or null for the
// CPU: SLOT's head products and datastore searches run where the model's output runs.
ggml_backend_dev_t head_device(const EngineParams& params);

class Batcher;
class Drafter;
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
    // draft_model: a GGUF with the model's vocabulary that drafts for
    // speculation (requests with draft_max); empty: prompt lookup drafts.
    explicit Session(const EngineParams& params, const std::string& draft_model = "");
    ~Session();
    void close();
    bool closed() const;

    // ---- generation (session.cpp) ----
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
    // The LoRA scales of requests that give none (one per adapter).
    std::vector<float> lora_defaults();
    void set_lora_defaults(const std::vector<float>& scales);

    // ---- saved states (session.cpp) ----
    // One sequence of the prompt cache as the server's /slots shows it.
    struct SlotInfo {
        int id;
        bool live;
        std::vector<int32_t> tokens;
    };
    std::vector<SlotInfo> slots();
    // The KV cells of `tokens` from the prompt cache (a sequence holding them
    // first, cut to them), computed under the default LoRA scales; empty when
    // no cached sequence holds them.
    std::string cached_state(const std::vector<int32_t>& tokens);
    // Sequence `seq`'s tokens, cells and the LoRA scales they were computed
    // under (std::invalid_argument when it is being generated into or holds nothing).
    struct SeqState {
        std::vector<int32_t> tokens;
        std::string data;
        std::vector<float> lora_scales;
    };
    SeqState seq_state(int seq);
    // Writes a saved state into the prompt cache: into `seq`, or (-1) the
    // sequence the cache would drop first, under the LoRA scales it was
    // saved with (switched to when nothing runs); returns the sequence.
    int restore_state(const std::vector<int32_t>& tokens, const std::string& data, int seq,
                      const std::vector<float>& lora_scales);
    // Clears sequence `seq` (std::invalid_argument when it is being generated into).
    void erase_seq(int seq);

    // ---- tokens, chat templates, file information (session.cpp) ----
    std::vector<int32_t> tokenize(const std::string& text, bool add_special, bool parse_special);
    std::string detokenize(const std::vector<int32_t>& tokens);
    std::string token_piece(int32_t token);
    const ModelFileInfo& file_info();
    // A string value of LoRA adapter `index`'s GGUF metadata ("" when absent).
    std::string adapter_meta(int index, const std::string& key);
    int n_adapters();
    int32_t eos_token();
    int n_vocab();
    int n_embd();
    int n_ctx();
    int seq_capacity();  // cells one sequence may hold
    bool deterministic();
    int n_threads();
    int n_parallel();
    int64_t decoded_tokens();  // tokens evaluated by llama.cpp so far
    int64_t logit_rows();      // rows of logits computed so far (output-head evaluations)
    bool has_chat_template();
    // The model's chat templates for llama.cpp's common/chat (tools, tool-call
    // parsing), or `override_source`'s; and a chat rendered with them.
    std::shared_ptr<const ChatTemplates> chat_templates(const std::string& source, bool jinja);
    ChatPrompt apply_chat(const ChatTemplates& templates, const ChatRequest& request);
    bool is_eog(int32_t token);

    // ---- direct use of the model outside the token loop ----
    // The probes (probes.h), the reference loops (Engine's) and datastore
    // work: `fn(ModelAccess&)` runs under the session mutex, after the token
    // loop's current step; with `idle_for` (the call's name, for the error)
    // only while no generate call is running, since it uses the context's
    // sequences directly.
    class ModelAccess {
    public:
        Engine& engine() { return s_.engine(); }  // throws when the model is closed
        OutputHead& head() { return s_.head(); }  // loaded on first use; refuses models SLOT cannot run on
    private:
        friend class Session;
        explicit ModelAccess(Session& s) : s_(s) {}
        Session& s_;
    };
    template <typename Fn>
    auto with_model(const char* idle_for, Fn&& fn) {
        std::lock_guard<FairMutex> lock(mutex_);
        if (idle_for != nullptr) require_idle(idle_for);
        use_default_lora(idle_for);
        ModelAccess access(*this);
        return fn(access);
    }

private:
    // Direct model calls run under the adapters' default scales: the context
    // is switched back when no request with scales of its own is running.
    void use_default_lora(const char* what);
    Engine& engine();
    OutputHead& head();
    Batcher& batcher();
    // generate_batch's steps: a checked job, queued; the wait for the driver
    // role (false: the call ended meanwhile); driving the loop until it ends.
    std::shared_ptr<BatchJob> make_job(const std::vector<GenerationRequest>& requests);
    void enqueue(const std::shared_ptr<BatchJob>& job);
    bool wait_turn(const std::shared_ptr<BatchJob>& job, const InterruptCheck& interrupted);
    void drive(const std::shared_ptr<BatchJob>& job);
    // Marks calls admitted or done and wakes their callers.
    void publish(BatchEvents& ev);
    // Calls that use the context directly need it free of running generation.
    void require_idle(const char* what);

    mutable FairMutex mutex_;  // the engine, the head and the batcher's sequences
    // The engine's lifetime, for calls that only read the vocabulary and
    // template (thread-safe in llama.cpp) and so need not wait for a step.
    mutable std::shared_mutex life_;
    std::unique_ptr<Engine> engine_;
    std::unique_ptr<Drafter> drafter_;
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
