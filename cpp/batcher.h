// The batch loop (llama-server's context and queue roles): generate calls'
// requests split into groups of samples, admitted to sequences as they free
// up, and one llama_decode per step for every live sequence. The session
// (session.h) owns one Batcher and calls it under its engine lock.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <list>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "drafter.h"
#include "engine.h"
#include "generation.h"
#include "grammar.h"
#include "output_head.h"
#include "sampling.h"
#include "slot_optimizer.h"

namespace slot {

// What one generate_batch call needs per request while it runs.
struct RequestState {
    std::vector<int32_t> context;  // prompt + response prefix
    int result_base = 0;
    size_t max_stop = 0;           // the longest stop string
    bool prepared = false;         // delta known, stages built
    StageList stages;
    bool needs_hidden = false;     // a stage reads the final hidden state
    GenerationResult slot;         // what SLOT did (delta, losses, timings), copied to each result
    std::shared_ptr<const Grammar> grammar;  // parsed once per request
};

// One generate_batch call in the shared token loop.
struct BatchJob {
    std::vector<GenerationRequest> requests;
    BatchTextCallback on_text;
    InterruptCheck interrupted;  // polled on the owner's thread only
    std::thread::id owner;
    std::atomic<bool> cancel{false};
    std::vector<GenerationResult> results;
    std::vector<std::shared_ptr<const Grammar>> grammars;  // per request; null without one
    std::exception_ptr error;
    // The batcher's bookkeeping (under the session's engine lock).
    std::vector<RequestState> states;
    int groups_left = 0;     // groups not yet finished
    int groups_waiting = 0;  // groups not yet admitted
    bool finished = false;
    // Under the session's jobs lock.
    bool done = false;
    bool counted_waiting = true;

    // Whether the call should stop now.
    bool stop_requested() {
        if (cancel.load()) return true;
        if (interrupted && std::this_thread::get_id() == owner && interrupted()) {
            cancel.store(true);
            return true;
        }
        return false;
    }
};

// What a tick changed, for the session to publish under its jobs lock.
struct BatchEvents {
    std::vector<std::shared_ptr<BatchJob>> finished;
};

// The shared token loop: calls' requests split into groups of at most
// n_parallel samples, admitted in arrival order while sequences and KV cells
// allow, then one llama_decode per step for every live sequence of every
// call (continuous batching: a finished sequence's place goes to the next
// group at once). Lives as long as the session; every method runs under the
// session's engine lock.
class Batcher {
public:
    // `admitted` runs (under the engine lock) when a call's last group gets
    // its sequences, before any of its work, so that the queue's length is
    // right even while a long prefill or a callback holds the loop.
    // `drafter` (may be null) drafts for speculating requests instead of prompt lookup.
    Batcher(Engine& engine, Drafter* drafter, std::function<OutputHead&()> head, LoopCounters& stats,
            std::function<void(const std::shared_ptr<BatchJob>&)> admitted);

    bool busy() const { return !waiting_.empty() || !lanes_.empty(); }
    bool live(int seq) const { return live_[static_cast<size_t>(seq)] != 0; }
    // A sequence that is not live and not `keep`: an empty one, else the
    // cached one to drop first; -1 when there is none.
    int spare(int keep) const;
    // The cached sequence to drop first other than `keep` (-1: none), and
    // marking a sequence just used (the last to be dropped).
    int evictable(int keep) const { return victim(keep); }
    void touch(int seq) { last_use_[static_cast<size_t>(seq)] = ++clock_; }

    void add(const std::shared_ptr<BatchJob>& job);
    // Stops cancelled calls, admits what fits, then decodes one token for
    // every live sequence.
    void tick(BatchEvents& ev);
    // Fails every call (the model is closing).
    void fail_all(const std::exception_ptr& error, BatchEvents& ev);

private:
    using Clock = std::chrono::steady_clock;

    struct Group {
        std::shared_ptr<BatchJob> job;
        int request;
        int first;     // first sample index
        int count;
        int64_t reserve;
        int live;
    };
    struct Lane {
        int result;
        Group* group;
        int seq;
        std::unique_ptr<Sampler> sampler;
        GrammarState grammar;  // this sample's place in the request's grammar
        std::vector<int32_t> history;
        int32_t pending = -1;
        int32_t sampled = -1;  // the token the last advance() drew (also one that ended the answer)
        size_t emitted = 0;
        bool callback_stopped = false;
        int draft_len = 4;  // speculation: the next draft's length, doubled when one is kept whole, halved if not
        bool done = false;
        Clock::time_point started;
    };
    // A group's context, evaluated: the sequence holding it, how many of its
    // tokens came from the prompt cache, and the seconds that took.
    struct Evaluated {
        int root = -1;
        int cached = 0;
        double prefill = 0.0;
    };

    const GenerationRequest& request_of(const Group& g) const {
        return g.job->requests[static_cast<size_t>(g.request)];
    }
    RequestState& state_of(const Group& g) const { return g.job->states[static_cast<size_t>(g.request)]; }

    // ---- scheduling (batcher.cpp) ----
    // The sequences waiting calls will fork from are dropped last.
    void pin_sources();
    // The sequence holding the longest prefix of `context`, and its length
    // ((-1, 0) when none shares a token).
    std::pair<int, size_t> best_source(const std::vector<int32_t>& context) const;
    bool can_admit(const Group& g) const;
    // Whether the group's LoRA scales are the context's: switched when no
    // sequence is live (the waiting group then goes first), else it waits.
    bool lora_ready(const Group& g);
    // The cached sequence to drop first: not live, not `keep`, unpinned
    // before pinned, least recently used first; -1 when there is none.
    int victim(int keep) const;
    // A sequence that is not live: an empty one, else the cached one to drop
    // first other than `keep` (a fork source), else `keep` itself.
    int take_seq(int keep, std::vector<int>& taken);
    // Drops a cached sequence to free its cells.
    bool make_room();
    void compact();
    void finish(Lane& lane, const char* reason, BatchEvents& ev);
    // Frees a lane's sequence (keeping its cells as a cache unless `clear`).
    void release(Lane& lane, bool clear);
    void complete(const std::shared_ptr<BatchJob>& job, BatchEvents& ev);
    // Stops a call: its waiting groups are dropped, its sequences cleared
    // (cut short, they are of no use as a cache).
    void fail(BatchJob& job, const std::exception_ptr& error, BatchEvents& ev);

    // ---- starting a group (batch_start.cpp) ----
    // Records the request's delta and builds its logit stages: SLOT's bias,
    // then the retrieval blend, then the request's logit_bias.
    void prepare(RequestState& st, const GenerationRequest& req, std::vector<float> delta, const char* status);
    void start_group(Group& g, BatchEvents& ev);
    // The steps of start_group: evaluate the context (learning delta on it,
    // or from the prompt cache), fork the samples' sequences, start the lanes.
    void start_group_on(Group& g, std::vector<int>& taken, BatchEvents& ev);
    Evaluated learn_on_context(Group& g, std::vector<int>& taken);
    void record_outcome(RequestState& st, SlotOutcome& outcome);
    Evaluated evaluate_context(Group& g, std::vector<int>& taken, bool learn);
    // Delta without learning (none, a given one, or zeros for a one-token prompt).
    void prepare_unlearned(RequestState& st, const GenerationRequest& req, bool learn);
    // A sequence for the context, holding as much of it from the cache as it can.
    Evaluated claim_cached(const RequestState& st, const GenerationRequest& req, std::vector<int>& taken);
    // Evaluates the context with every position's logits, for prompt_logprobs
    // (then the last token alone, as append_context does).
    void append_with_prompt_logprobs(RequestState& st, const GenerationRequest& req, int root,
                                     const MakeRoom& room, const InterruptCheck& stop);
    std::vector<int> fork_samples(const Group& g, int root, std::vector<int>& taken);
    void start_lanes(Group& g, const std::vector<int>& seqs, const Evaluated& ctx, std::vector<int>& taken,
                     BatchEvents& ev);

    // ---- the decode step (batcher.cpp) ----
    void step(BatchEvents& ev);
    // How many tokens a speculating lane may draft this step: at most
    // draft_max, its adaptive length, the tokens and cells it has left, `room`.
    size_t draft_budget(const Lane& lane, size_t room) const;
    // Prompt lookup: the tokens that followed the latest earlier occurrence
    // of the lane's last n tokens (n from draft_ngram down to 1), at most k;
    // failing that, of the n tokens before the last, one token skipped.
    std::vector<int32_t> lookup(const Lane& lane, size_t k) const;
    // Cuts a draft after its first token that would end generation (an
    // end-of-generation token, or one completing a stop string): the tokens
    // after it could not be kept.
    void trim_draft(const Lane& lane, std::vector<int32_t>& draft) const;
    // The logits after the request's stages: `logits` itself when it has
    // none, else the scratch buffer (valid until the next call).
    const float* staged(const RequestState& st, const float* logits, const float* hidden);
    void advance(Lane& lane, const float* logits, const float* hidden, BatchEvents& ev);
    // The vocabulary's prefix forest, built the first time a grammar needs it.
    const PrefixForest& forest();
    int32_t constrained_draw(Lane& lane, const float* z, size_t first_generated);
    // Passes new text to the call's callback. A callback that throws stops
    // its call, which then raises the callback's exception.
    void emit(Lane& lane, size_t end);

    Engine& e_;
    Drafter* drafter_;
    std::function<OutputHead&()> head_;
    LoopCounters& stats_;
    std::function<void(const std::shared_ptr<BatchJob>&)> admitted_;
    std::vector<char> live_;
    std::vector<char> pinned_;
    std::vector<uint64_t> last_use_;  // per sequence, for dropping the least recently used cache
    uint64_t clock_ = 0;
    std::vector<float> scratch_;
    std::vector<float> masked_;  // a grammar's masked logits, for logprobs
    std::unique_ptr<PrefixForest> forest_;
    std::list<Group> groups_;   // stable addresses: lanes and the queue point into it
    std::deque<Group*> waiting_;
    std::vector<std::unique_ptr<Lane>> lanes_;
    int64_t reserved_ = 0;
};

}  // namespace slot
