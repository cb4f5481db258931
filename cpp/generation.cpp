#include "generation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <list>
#include <shared_mutex>
#include <stdexcept>
#include <thread>

#include "errors.h"
#include "grammar.h"
#include "head_kernels.h"

namespace slot {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Start of the last UTF-8 sequence if it is incomplete, else s.size().
size_t complete_utf8_end(const std::string& s) {
    size_t i = s.size();
    int continuation = 0;
    while (i > 0 && continuation < 4) {
        const unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {
            size_t need = 1;
            if ((c & 0xE0) == 0xC0) need = 2;
            else if ((c & 0xF0) == 0xE0) need = 3;
            else if ((c & 0xF8) == 0xF0) need = 4;
            return (static_cast<size_t>(continuation) + 1 >= need) ? s.size() : i - 1;
        }
        ++continuation;
        --i;
    }
    return s.size();
}

// The longest prefix of `s`, at most `limit` bytes, that ends on a complete character.
size_t safe_emit_end(const std::string& s, size_t limit) {
    size_t end = std::min(limit, complete_utf8_end(s));
    while (end > 0 && end < s.size() && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;
    return end;
}

}  // namespace

Session::Session(const EngineParams& params) : engine_(std::make_unique<Engine>(params)) {
    shape_ = {engine_->vocab(), engine_->n_vocab(), engine_->n_embd(), engine_->n_ctx(), engine_->n_parallel()};
    const char* portable = std::getenv("SLOT_CPP_PORTABLE_HEAD_OPS");
    portable_head_ops_ = portable != nullptr && std::string(portable) == "1";
}

namespace {

// The device that holds the offloaded layers (the first GPU), or null for the
// CPU: SLOT's head products run where the model's output runs.
ggml_backend_dev_t head_device(const EngineParams& params) {
    // With RPC servers the layers are remote; the head products stay local
    // (the head is read from the local file), on the CPU.
    if (params.n_gpu_layers == 0 || !params.rpc_servers.empty()) return nullptr;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) return dev;
    }
    return nullptr;
}

}  // namespace

bool Session::closed() const {
    std::lock_guard<FairMutex> lock(mutex_);
    return !engine_;
}

Engine& Session::engine() {
    if (!engine_) throw Error("the model is closed");
    return *engine_;
}

OutputHead& Session::head() {
    Engine& e = engine();
    if (!head_) {
        const ModelFileInfo& info = e.file_info();
        const std::string reason = info.slot_unsupported_reason();
        if (!reason.empty()) throw UnsupportedModelError("SLOT cannot be applied exactly: " + reason);
        if (info.head.ne0 != e.n_embd() || info.head.ne1 != e.n_vocab()) {
            throw UnsupportedModelError("the output head's shape (" + std::to_string(info.head.ne1) + " x " +
                                        std::to_string(info.head.ne0) + ") does not match the model (" +
                                        std::to_string(e.n_vocab()) + " x " + std::to_string(e.n_embd()) + ")");
        }
        auto backend = std::make_unique<ComputeBackend>(e.n_threads(), head_device(e.params()));
        head_ = std::make_unique<OutputHead>(info, *backend, portable_head_ops_);
        backend_ = std::move(backend);
    }
    return *head_;
}

std::string Session::slot_backend() {
    std::lock_guard<FairMutex> lock(mutex_);
    OutputHead& h = head();
    std::string out = h.backend().name();
    if (h.portable_ops()) {
        out += " (portable ggml ops; transposed head copy " +
               std::to_string((h.transposed_copy_bytes() + (1u << 19)) >> 20) + " MiB)";
    } else {
        out += " (CPU head kernels)";
    }
    return out;
}

namespace {

// Checks a request completely before any work starts, so that one bad
// request fails the call instead of another request's output.
void check_token_ids(const std::vector<int32_t>& tokens, int n_vocab) {
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                        std::to_string(n_vocab) + ")");
        }
    }
}

void validate_request(const ModelShape& e, const GenerationRequest& req, int index) {
    const std::string where = index >= 0 ? "request " + std::to_string(index) + ": " : "";
    try {
        validate(req.sampling);
        validate(req.slot);
    } catch (const std::invalid_argument& exc) {
        throw std::invalid_argument(where + exc.what());
    }
    if (req.n < 1) throw std::invalid_argument(where + "n must be >= 1");
    if (req.max_tokens < 0) throw std::invalid_argument(where + "max_tokens must be >= 0");
    if (req.top_logprobs < 0) throw std::invalid_argument(where + "top_logprobs must be >= 0");
    for (const auto& [token, value] : req.logit_bias) {
        if (token < 0 || token >= e.n_vocab || !std::isfinite(value)) {
            throw std::invalid_argument(where + "logit_bias needs token ids inside the vocabulary and finite values");
        }
    }
    if (req.prompt.empty()) throw std::invalid_argument(where + "the prompt is empty");
    for (const auto& s : req.stop) {
        if (s.empty()) throw std::invalid_argument(where + "stop strings must not be empty");
    }
    check_token_ids(req.prompt, e.n_vocab);
    check_token_ids(req.response_prefix, e.n_vocab);
    check_token_ids(req.score_tokens, e.n_vocab);
    if (!req.delta.empty()) {
        if (static_cast<int>(req.delta.size()) != e.n_embd) {
            throw std::invalid_argument(where + "delta has " + std::to_string(req.delta.size()) +
                                        " values but the model's hidden size is " + std::to_string(e.n_embd));
        }
        for (float x : req.delta) {
            if (!std::isfinite(x)) throw std::invalid_argument(where + "delta contains a non-finite value");
        }
    }
    if (req.rtd) {
        try {
            validate(req.rtd_params, *req.rtd, e.n_embd, e.n_vocab);
        } catch (const std::invalid_argument& exc) {
            throw std::invalid_argument(where + exc.what());
        }
    }
    if (!req.slot.loss_mask.empty() && req.slot.loss_mask.size() + 1 != req.prompt.size()) {
        throw std::invalid_argument(where + "the loss mask has " + std::to_string(req.slot.loss_mask.size()) +
                                    " entries but the prompt has " + std::to_string(req.prompt.size()) +
                                    " tokens (one entry per token after the first)");
    }
    if (req.prompt_logprobs && req.delta.empty() && req.slot.steps > 0) {
        throw std::invalid_argument(where + "prompt logprobs need steps=0 (they are taken before SLOT learns delta)");
    }
    if (req.prompt_logprobs && req.rtd && req.rtd_params.lam > 0.0) {
        throw std::invalid_argument(where + "prompt logprobs are not available with RTD's blend");
    }
    if (!req.response_prefix.empty() && req.delta.empty() && req.slot.steps > 0) {
        throw std::invalid_argument(where + "a response prefix needs steps=0: learn delta on the prompt first, "
                                    "then pass it as delta");
    }
}

// The request's grammar, parsed, with its response prefix checked against it.
std::shared_ptr<const Grammar> parse_grammar(const ModelShape& e, const GenerationRequest& req, int index) {
    const std::string where = index >= 0 ? "request " + std::to_string(index) + ": " : "";
    std::shared_ptr<const Grammar> grammar;
    try {
        grammar = std::make_shared<const Grammar>(e.vocab, req.grammar, req.grammar_triggers, req.grammar_trigger_tokens,
                                                  req.grammar_prefill);
    } catch (const std::invalid_argument& exc) {
        throw std::invalid_argument(where + exc.what());
    }
    if (!req.response_prefix.empty()) {
        GrammarState state = grammar->fork();
        for (size_t i = 0; i < req.response_prefix.size(); ++i) {
            if (!grammar_allows(state.get(), req.response_prefix[i])) {
                throw std::invalid_argument(where + "the response prefix leaves the grammar at its token " +
                                            std::to_string(i));
            }
            grammar_accept(state.get(), req.response_prefix[i]);
        }
    }
    return grammar;
}

// Whether a request's stages read the final hidden state (the retrieval blend).
bool uses_hidden(const GenerationRequest& req) { return req.rtd && req.rtd_params.lam > 0.0; }

// KV cells that one group of `samples` samples of `req` may occupy: the
// context once (the samples share it) and each sample's generated tokens but
// the last, which is never evaluated.
int64_t cells_needed(const GenerationRequest& req, int samples) {
    const int64_t context = static_cast<int64_t>(req.prompt.size() + req.response_prefix.size());
    return context + static_cast<int64_t>(samples) * std::max(0, req.max_tokens - 1);
}

size_t common_prefix(const std::vector<int32_t>& a, const std::vector<int32_t>& b) {
    const size_t n = std::min(a.size(), b.size());
    size_t i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return i;
}

}  // namespace

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
    Batcher(Engine& engine, std::function<OutputHead&()> head, LoopCounters& stats,
            std::function<void(const std::shared_ptr<BatchJob>&)> admitted)
        : e_(engine), head_(std::move(head)), stats_(stats), admitted_(std::move(admitted)),
          live_(static_cast<size_t>(engine.n_parallel()), 0), pinned_(live_.size(), 0), last_use_(live_.size(), 0),
          scratch_(static_cast<size_t>(engine.n_vocab())), masked_(static_cast<size_t>(engine.n_vocab())) {}

    bool busy() const { return !waiting_.empty() || !lanes_.empty(); }
    bool live(int seq) const { return live_[static_cast<size_t>(seq)] != 0; }

    void add(const std::shared_ptr<BatchJob>& job) {
        const int n_par = e_.n_parallel();
        int total = 0;
        job->states.clear();
        for (size_t r = 0; r < job->requests.size(); ++r) {
            const GenerationRequest& req = job->requests[r];
            RequestState st;
            st.context = req.prompt;
            st.context.insert(st.context.end(), req.response_prefix.begin(), req.response_prefix.end());
            st.result_base = total;
            st.grammar = job->grammars.empty() ? nullptr : job->grammars[r];
            for (const auto& stop : req.stop) st.max_stop = std::max(st.max_stop, stop.size());
            for (int first = 0; first < req.n; first += n_par) {
                groups_.push_back(Group{job, static_cast<int>(r), first, std::min(n_par, req.n - first), 0, 0});
                groups_.back().reserve = cells_needed(req, groups_.back().count);
                waiting_.push_back(&groups_.back());
                ++job->groups_left;
                ++job->groups_waiting;
            }
            total += req.n;
            job->states.push_back(std::move(st));
            if (req.slot.steps > 0 || !req.delta.empty()) ++stats_.slot_requests;
            if (req.rtd) ++stats_.rtd_requests;
        }
        job->results.resize(static_cast<size_t>(total));
    }

    // Stops cancelled calls, admits what fits, then decodes one token for
    // every live sequence.
    void tick(BatchEvents& ev) {
        std::vector<BatchJob*> seen;
        for (const Group* g : waiting_) seen.push_back(g->job.get());
        for (const auto& lane : lanes_) seen.push_back(lane->group->job.get());
        std::sort(seen.begin(), seen.end());
        seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
        for (BatchJob* job : seen) {
            if (job->stop_requested()) fail(*job, std::make_exception_ptr(Interrupted()), ev);
        }

        if (!waiting_.empty()) {
            // The sequences waiting calls will fork from are dropped last.
            std::fill(pinned_.begin(), pinned_.end(), 0);
            for (const Group* g : waiting_) {
                if (!g->job->requests[static_cast<size_t>(g->request)].cache_prompt) continue;
                const int source = best_source(g->job->states[static_cast<size_t>(g->request)].context).first;
                if (source >= 0) pinned_[static_cast<size_t>(source)] = 1;
            }
        }
        while (!waiting_.empty() && can_admit(*waiting_.front())) {
            Group* g = waiting_.front();
            waiting_.pop_front();
            std::shared_ptr<BatchJob> job = g->job;
            if (--job->groups_waiting == 0) admitted_(job);
            try {
                start_group(*g, ev);
            } catch (...) {
                fail(*job, std::current_exception(), ev);
            }
        }
        if (lanes_.empty()) {
            if (!waiting_.empty()) {
                fail(*waiting_.front()->job, std::make_exception_ptr(Error("internal error: a group could not be "
                                                                           "admitted")), ev);
            }
            return;
        }
        try {
            step(ev);
        } catch (...) {
            const std::exception_ptr error = std::current_exception();
            std::vector<BatchJob*> jobs;
            for (const auto& lane : lanes_) jobs.push_back(lane->group->job.get());
            for (BatchJob* job : jobs) fail(*job, error, ev);
        }
    }

    // Fails every call (the model is closing).
    void fail_all(const std::exception_ptr& error, BatchEvents& ev) {
        while (!waiting_.empty()) fail(*waiting_.front()->job, error, ev);
        while (!lanes_.empty()) fail(*lanes_.front()->group->job, error, ev);
    }

private:
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
        size_t emitted = 0;
        bool callback_stopped = false;
        bool done = false;
        Clock::time_point started;
    };

    const GenerationRequest& request_of(const Group& g) const {
        return g.job->requests[static_cast<size_t>(g.request)];
    }
    RequestState& state_of(const Group& g) { return g.job->states[static_cast<size_t>(g.request)]; }

    // The sequence holding the longest prefix of `context`, and its length
    // ((-1, 0) when none shares a token).
    std::pair<int, size_t> best_source(const std::vector<int32_t>& context) const {
        std::pair<int, size_t> best(-1, 0);
        for (int s = 0; s < e_.n_parallel(); ++s) {
            const size_t l = common_prefix(e_.seq_tokens(s), context);
            if (l > best.second) best = {s, l};
        }
        return best;
    }

    bool can_admit(const Group& g) const {
        int free = 0;
        for (char l : live_) free += l ? 0 : 1;
        return free >= g.count && reserved_ + g.reserve <= e_.n_ctx();
    }

    // The cached sequence to drop first: not live, not `keep`, unpinned
    // before pinned, least recently used first; -1 when there is none.
    int victim(int keep) const {
        int best = -1;
        for (int s = 0; s < static_cast<int>(live_.size()); ++s) {
            const auto i = static_cast<size_t>(s);
            if (live_[i] || s == keep || e_.seq_tokens(s).empty()) continue;
            if (best < 0) { best = s; continue; }
            const auto b = static_cast<size_t>(best);
            if (pinned_[i] != pinned_[b] ? pinned_[i] < pinned_[b] : last_use_[i] < last_use_[b]) best = s;
        }
        return best;
    }

    // A sequence that is not live: an empty one, else the cached one to drop
    // first other than `keep` (a fork source), else `keep` itself.
    int take_seq(int keep, std::vector<int>& taken) {
        int best = -1;
        for (int s = 0; s < static_cast<int>(live_.size()); ++s) {
            if (!live_[static_cast<size_t>(s)] && e_.seq_tokens(s).empty()) { best = s; break; }
        }
        if (best < 0) best = victim(keep);
        if (best < 0 && keep >= 0 && !live_[static_cast<size_t>(keep)]) best = keep;
        if (best < 0) throw Error("internal error: no free sequence");
        live_[static_cast<size_t>(best)] = 1;
        taken.push_back(best);
        return best;
    }

    // Drops a cached sequence to free its cells.
    bool make_room() {
        const int v = victim(-1);
        if (v < 0) return false;
        e_.seq_clear(v);
        return true;
    }

    // Records the request's delta and builds its logit stages: SLOT's bias,
    // then the retrieval blend, then the request's logit_bias.
    void prepare(RequestState& st, const GenerationRequest& req, std::vector<float> delta, const char* status) {
        GenerationResult& info = st.slot;
        if (!delta.empty()) info.delta = std::move(delta);
        if (info.slot_status.empty()) info.slot_status = status;
        const bool any = std::any_of(info.delta.begin(), info.delta.end(), [](float x) { return x != 0.0f; });
        if (any) {
            std::vector<float> bias(static_cast<size_t>(e_.n_vocab()));
            head_().project(info.delta.data(), bias.data());
            st.stages.push_back(std::make_shared<BiasStage>(std::move(bias)));
        }
        if (uses_hidden(req)) {
            st.stages.push_back(std::make_shared<RtdStage>(req.rtd, req.rtd_params));
            st.needs_hidden = true;
        }
        if (!req.logit_bias.empty()) st.stages.push_back(std::make_shared<SparseBiasStage>(req.logit_bias));
        st.prepared = true;
    }

    void start_group(Group& g, BatchEvents& ev) {
        std::vector<int> taken;  // sequences marked live here, released if this throws
        try {
            start_group_on(g, taken, ev);
        } catch (...) {
            for (int s : taken) {
                if (!live_[static_cast<size_t>(s)]) continue;
                live_[static_cast<size_t>(s)] = 0;
                e_.seq_clear(s);
            }
            throw;
        }
    }

    void start_group_on(Group& g, std::vector<int>& taken, BatchEvents& ev) {
        BatchJob& job = *g.job;
        RequestState& st = state_of(g);
        const GenerationRequest& req = request_of(g);
        const InterruptCheck stop = [&job] { return job.stop_requested(); };
        const bool learn = !st.prepared && req.delta.empty() && req.slot.steps > 0;
        const bool slot_possible = learn && req.prompt.size() >= 2;
        if (learn || !req.delta.empty()) head_();  // load the head (or refuse the model) outside the timings
        const MakeRoom room = [this] { return make_room(); };
        const int context = static_cast<int>(st.context.size());
        int root = -1, cached = 0;
        auto t0 = Clock::now();
        double prefill = 0.0;
        if (slot_possible) {
            root = take_seq(-1, taken);
            e_.seq_clear(root);
            SlotProblem problem(head_(), req.prompt, req.slot);
            // Every loss position is a token before the last; the last one is
            // then evaluated alone, as on every other path.
            fill_slot_problem(e_, problem, root, std::vector<int32_t>(req.prompt.begin(), req.prompt.end() - 1), room,
                              stop);
            e_.append(root, {req.prompt.back()}, Engine::Outputs::Last, 0, {}, room, stop,
                      req.return_hidden || uses_hidden(req));
            prefill = seconds_since(t0);
            t0 = Clock::now();
            SlotOutcome outcome = problem.optimise(req.slot, stop);
            st.slot.losses = std::move(outcome.losses);
            st.slot.steps_done = outcome.steps_done;
            st.slot.slot_status = outcome.stop_reason;
            st.slot.slot_path = outcome.path;
            st.slot.slot_cache_bytes = outcome.cache_bytes;
            st.slot.slot_loss_bound = outcome.loss_bound;
            st.slot.slot_cache_mean_k = outcome.cache_mean_k;
            st.slot.slot_profile = outcome.profile;
            st.slot.slot_lr = outcome.lr;
            st.slot.calibration_lrs = std::move(outcome.calibration_lrs);
            st.slot.calibration_kls = std::move(outcome.calibration_kls);
            st.slot.calibration_seconds = outcome.calibration_seconds;
            prepare(st, req, std::move(outcome.delta), "");
            st.slot.optimise_seconds = seconds_since(t0);
        } else {
            if (!st.prepared) {
                const auto t1 = Clock::now();
                if (learn) {
                    prepare(st, req, std::vector<float>(static_cast<size_t>(e_.n_embd()), 0.0f),
                            "no loss positions (the prompt has one token)");
                } else if (!req.delta.empty()) {
                    prepare(st, req, req.delta, "given delta");
                } else {
                    prepare(st, req, {}, "no steps requested");
                }
                if (learn || !req.delta.empty()) st.slot.optimise_seconds = seconds_since(t1);
                t0 = Clock::now();
            }
            const bool reuse = req.cache_prompt && !req.prompt_logprobs;
            const auto [source, best] = reuse ? best_source(st.context) : std::pair<int, size_t>(-1, 0);
            // At least the last context token is evaluated: its logits start generation.
            cached = static_cast<int>(std::min(best, st.context.size() - 1));
            if (cached > 0) {
                root = take_seq(source, taken);
                if (root == source) {
                    if (!e_.seq_truncate(root, cached)) cached = 0;
                } else {
                    e_.seq_fork(source, root, cached);
                    last_use_[static_cast<size_t>(source)] = ++clock_;  // a cache hit is a use
                }
            } else {
                root = take_seq(-1, taken);
                e_.seq_clear(root);
            }
            if (req.prompt_logprobs) {
                // Every position but the last with outputs: row i predicts context[i + 1].
                std::vector<float>& out = st.slot.prompt_logprobs;
                out.clear();
                const std::vector<int32_t> head(st.context.begin(), st.context.end() - 1);
                e_.append(root, head, Engine::Outputs::All, 64,
                          [&](int first, int count, const float* logits, const float*) {
                              for (int i = 0; i < count; ++i) {
                                  const float* z = staged(st, logits + static_cast<size_t>(i) * e_.n_vocab(), nullptr);
                                  const int32_t next = st.context[static_cast<size_t>(first + i + 1)];
                                  out.push_back(token_logprob(z, e_.n_vocab(), next, 0).logprob);
                              }
                          },
                          room, stop);
                e_.append(root, {st.context.back()}, Engine::Outputs::Last, 0, {}, room, stop,
                          req.return_hidden || st.needs_hidden);
            } else {
                e_.append_context(root, std::vector<int32_t>(st.context.begin() + cached, st.context.end()), room,
                                  stop, req.return_hidden || st.needs_hidden);
            }
            prefill = seconds_since(t0);
        }
        last_use_[static_cast<size_t>(root)] = ++clock_;
        stats_.prompt_tokens += context;
        stats_.cached_tokens += cached;

        // Every sample's sequence first (they share the context's cells), then
        // the first token of each from the context's last logits.
        std::vector<int> seqs{root};
        for (int j = 1; j < g.count; ++j) {
            const int s = take_seq(-1, taken);
            e_.seq_fork(root, s, context);
            seqs.push_back(s);
        }
        const float* first_logits = e_.last_logits();
        const float* first_hidden = e_.last_hidden();
        std::vector<float> hidden, scores;
        if (req.return_hidden) hidden.assign(first_hidden, first_hidden + e_.n_embd());
        if (!req.score_tokens.empty()) {
            const float* z = staged(st, first_logits, first_hidden);
            for (int32_t t : req.score_tokens) scores.push_back(token_logprob(z, e_.n_vocab(), t, 0).logprob);
        }
        std::vector<Lane*> started;
        for (int j = 0; j < g.count; ++j) {
            const int index = st.result_base + g.first + j;
            GenerationResult& res = job.results[static_cast<size_t>(index)];
            res = st.slot;
            res.prompt_tokens = context;
            res.cached_tokens = cached;
            res.prefill_seconds = prefill;
            res.finish_reason = "length";
            res.hidden = hidden;
            res.score_logprobs = scores;
            SamplingParams sp = req.sampling;
            sp.seed = req.sampling.seed + static_cast<uint64_t>(g.first + j);
            res.seed = sp.seed;
            auto lane = std::make_unique<Lane>();
            lane->result = index;
            lane->group = &g;
            lane->seq = seqs[static_cast<size_t>(j)];
            lane->sampler = std::make_unique<Sampler>(sp, e_.n_vocab());
            if (st.grammar) {
                lane->grammar = st.grammar->fork();
                // Checked against the grammar with the request.
                for (int32_t t : req.response_prefix) grammar_accept(lane->grammar.get(), t);
            }
            lane->history = st.context;
            lane->started = Clock::now();
            ++g.live;
            started.push_back(lane.get());
            lanes_.push_back(std::move(lane));
        }
        taken.clear();  // owned by lanes from here on
        stats_.live_sequences.store(static_cast<int64_t>(lanes_.size()));
        reserved_ += g.reserve;
        for (Lane* lane : started) {
            if (req.max_tokens == 0) finish(*lane, "length", ev);
            else advance(*lane, first_logits, first_hidden, ev);
        }
        compact();
    }

    void step(BatchEvents& ev) {
        std::vector<BatchToken> batch;
        batch.reserve(lanes_.size());
        bool hidden = false;
        for (const auto& lane : lanes_) {
            batch.push_back({lane->seq, lane->pending, true});
            hidden = hidden || state_of(*lane->group).needs_hidden;
        }
        e_.decode(batch, [this] { return make_room(); }, {}, hidden);
        ++stats_.decode_steps;
        for (size_t i = 0; i < lanes_.size(); ++i) {
            const int row = static_cast<int>(i);
            advance(*lanes_[i], e_.logits_row(row), hidden ? e_.hidden_row(row) : nullptr, ev);
        }
        compact();
    }

    void compact() {
        lanes_.erase(std::remove_if(lanes_.begin(), lanes_.end(), [](const auto& l) { return l->done; }),
                     lanes_.end());
        stats_.live_sequences.store(static_cast<int64_t>(lanes_.size()));
        groups_.remove_if([](const Group& g) { return g.job->finished; });
    }

    // The logits after the request's stages: `logits` itself when it has
    // none, else the scratch buffer (valid until the next call).
    const float* staged(const RequestState& st, const float* logits, const float* hidden) {
        if (st.stages.empty()) return logits;
        const int64_t V = e_.n_vocab();
        std::copy(logits, logits + V, scratch_.begin());
        StageInput in;
        in.n_vocab = V;
        in.hidden = hidden;
        for (const auto& stage : st.stages) stage->apply(in, scratch_.data());
        return scratch_.data();
    }

    void advance(Lane& lane, const float* logits, const float* hidden, BatchEvents& ev) {
        const Group& g = *lane.group;
        const GenerationRequest& req = request_of(g);
        const RequestState& st = state_of(g);
        GenerationResult& res = g.job->results[static_cast<size_t>(lane.result)];
        const int64_t V = e_.n_vocab();
        const float* z = staged(st, logits, hidden);
        const bool want_logprobs = req.logprobs || req.top_logprobs > 0;
        int32_t tok;
        if (lane.grammar) {
            tok = constrained_draw(lane, z, st.context.size());
            if (want_logprobs) {
                // The distribution drawn from, before penalties and temperature: the grammar's tokens renormalised.
                std::copy(z, z + V, masked_.begin());
                grammar_mask_all(lane.grammar.get(), forest(), masked_.data(), V);
                z = masked_.data();
            }
        } else {
            tok = lane.sampler->sample(z, nullptr, lane.history, st.context.size());
        }
        if (!req.ignore_eos && e_.is_eog(tok)) return finish(lane, "eos", ev);
        // The grammar allowed it; end of generation only where the grammar is complete, which it leaves so.
        if (lane.grammar) grammar_accept(lane.grammar.get(), tok);
        if (want_logprobs) {
            TokenLogprob lp = token_logprob(z, V, tok, req.top_logprobs);
            res.token_logprobs.push_back(lp.logprob);
            if (req.top_logprobs > 0) res.top_logprobs.push_back(std::move(lp.top));
        }
        res.tokens.push_back(tok);
        ++stats_.generated_tokens;
        lane.history.push_back(tok);
        std::string& text = res.text;
        const size_t before = text.size();
        text += e_.token_piece(tok, !req.render_tokens.empty() && std::find(req.render_tokens.begin(),
                                                                            req.render_tokens.end(),
                                                                            tok) != req.render_tokens.end());
        const size_t max_stop = st.max_stop;
        size_t found = std::string::npos;
        if (max_stop > 0) {
            const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
            for (const auto& s : req.stop) found = std::min(found, text.find(s, from));
        }
        if (found != std::string::npos) {
            text.resize(found);
            return finish(lane, "stop", ev);
        }
        emit(lane, safe_emit_end(text, text.size() - std::min(text.size(), max_stop > 0 ? max_stop - 1 : size_t(0))));
        if (lane.callback_stopped) return finish(lane, "callback", ev);
        if (static_cast<int>(res.tokens.size()) >= req.max_tokens) return finish(lane, "length", ev);
        lane.pending = tok;
    }

    // The vocabulary's prefix forest, built the first time a grammar needs it.
    const PrefixForest& forest() {
        if (!forest_) forest_ = build_prefix_forest(e_.vocab());
        return *forest_;
    }

    // A draw from the penalised logits with the tokens the grammar refuses
    // masked: exactly the sampler's draw from fully masked logits, checking
    // as few tokens as it can. Greedy and top-k need only the highest allowed
    // tokens; without truncation a token drawn from the unmasked logits and
    // allowed has probability p(a), or the redraw from the masked ones gives
    // it (1 - Z) p(a) / Z, p(a) / Z in all (Z: the allowed mass).
    int32_t constrained_draw(Lane& lane, const float* z, size_t first_generated) {
        const SamplingParams& p = lane.sampler->params();
        const int64_t V = e_.n_vocab();
        float* w = lane.sampler->penalised(z, nullptr, lane.history, first_generated);
        llama_sampler* g = lane.grammar.get();
        if (p.temperature == 0.0) {
            grammar_mask_top(g, forest(), w, V, 1);
        } else if (p.top_k > 0 && p.top_k < V) {
            grammar_mask_top(g, forest(), w, V, p.top_k);
        } else if (p.top_p >= 1.0 && p.min_p <= 0.0) {
            const int32_t t = lane.sampler->draw(w);
            if (grammar_allows(g, t)) return t;
            grammar_mask_all(g, forest(), w, V);
        } else {
            grammar_mask_all(g, forest(), w, V);
        }
        return lane.sampler->draw(w);
    }

    // Passes new text to the call's callback. A callback that throws stops
    // its call, which then raises the callback's exception.
    void emit(Lane& lane, size_t end) {
        BatchJob& job = *lane.group->job;
        const std::string& text = job.results[static_cast<size_t>(lane.result)].text;
        if (!job.on_text || lane.callback_stopped || end <= lane.emitted) return;
        try {
            if (!job.on_text(lane.result, text.substr(lane.emitted, end - lane.emitted))) lane.callback_stopped = true;
        } catch (...) {
            if (!job.error) job.error = std::current_exception();
            job.cancel.store(true);
            lane.callback_stopped = true;
        }
        lane.emitted = end;
    }

    void finish(Lane& lane, const char* reason, BatchEvents& ev) {
        Group& g = *lane.group;
        BatchJob& job = *g.job;
        GenerationResult& res = job.results[static_cast<size_t>(lane.result)];
        emit(lane, res.text.size());
        res.finish_reason = reason;
        res.generate_seconds = seconds_since(lane.started);
        release(lane, !request_of(g).cache_prompt);
        if (g.live == 0 && --job.groups_left == 0) complete(g.job, ev);
    }

    // Frees a lane's sequence (keeping its cells as a cache unless `clear`).
    void release(Lane& lane, bool clear) {
        Group& g = *lane.group;
        const auto seq = static_cast<size_t>(lane.seq);
        live_[seq] = 0;
        last_use_[seq] = ++clock_;
        if (clear) e_.seq_clear(lane.seq);
        if (--g.live == 0) reserved_ -= g.reserve;
        lane.done = true;
    }

    void complete(const std::shared_ptr<BatchJob>& job, BatchEvents& ev) {
        if (job->finished) return;
        job->finished = true;
        if (job->error) ++stats_.failed_calls;
        else ++stats_.completed_calls;
        ev.finished.push_back(job);
    }

    // Stops a call: its waiting groups are dropped, its sequences cleared
    // (cut short, they are of no use as a cache).
    void fail(BatchJob& job, const std::exception_ptr& error, BatchEvents& ev) {
        if (job.finished) return;
        if (!job.error) job.error = error;
        std::shared_ptr<BatchJob> keep;
        for (auto it = waiting_.begin(); it != waiting_.end();) {
            if ((*it)->job.get() == &job) {
                keep = (*it)->job;
                if (--job.groups_waiting == 0) admitted_(keep);
                it = waiting_.erase(it);
            } else {
                ++it;
            }
        }
        for (auto& lane : lanes_) {
            if (lane->done || lane->group->job.get() != &job) continue;
            keep = lane->group->job;
            release(*lane, true);
        }
        for (Group& g : groups_) {
            if (g.job.get() == &job) keep = g.job;
        }
        if (keep) complete(keep, ev);
        compact();
    }

    Engine& e_;
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

Session::~Session() = default;

void Session::close() {
    closed_.store(true);
    BatchEvents ev;
    {
        std::lock_guard<FairMutex> lock(mutex_);
        if (batcher_) batcher_->fail_all(std::make_exception_ptr(Error("the model was closed")), ev);
        std::unique_lock<std::shared_mutex> life(life_);  // waits for tokenising calls
        batcher_.reset();
        head_.reset();
        backend_.reset();
        engine_.reset();
    }
    publish(ev);
}

void Session::publish(BatchEvents& ev) {
    if (ev.finished.empty()) return;
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        for (const auto& j : ev.finished) {
            if (j->counted_waiting) { j->counted_waiting = false; --waiting_; }
            j->done = true;
        }
    }
    jobs_cv_.notify_all();
    ev = BatchEvents();
}

Batcher& Session::batcher() {
    Engine& e = engine();
    if (!batcher_) {
        batcher_ = std::make_unique<Batcher>(
            e, [this]() -> OutputHead& { return head(); }, counters_, [this](const std::shared_ptr<BatchJob>& job) {
                std::lock_guard<std::mutex> lock(jobs_mutex_);
                if (job->counted_waiting) { job->counted_waiting = false; --waiting_; }
            });
    }
    return *batcher_;
}

void Session::require_idle(const char* what) {
    if (batcher_ && batcher_->busy()) {
        throw Error(std::string(what) + " cannot run while generate calls are running on this model");
    }
}

void Session::set_max_waiting(int n) {
    if (n < 0) throw std::invalid_argument("max_waiting must be >= 0");
    std::lock_guard<std::mutex> lock(jobs_mutex_);
    max_waiting_ = n;
}

BatchStats Session::stats() {
    BatchStats out;
    const LoopCounters& c = counters_;
    out.live_sequences = c.live_sequences.load();
    out.completed_calls = c.completed_calls.load();
    out.failed_calls = c.failed_calls.load();
    out.generated_tokens = c.generated_tokens.load();
    out.decode_steps = c.decode_steps.load();
    out.prompt_tokens = c.prompt_tokens.load();
    out.cached_tokens = c.cached_tokens.load();
    out.slot_requests = c.slot_requests.load();
    out.rtd_requests = c.rtd_requests.load();
    std::lock_guard<std::mutex> lock(jobs_mutex_);
    out.waiting_requests = waiting_;
    out.failed_calls += cancelled_waiting_;
    return out;
}

std::vector<GenerationResult> Session::generate_batch(const std::vector<GenerationRequest>& requests,
                                                      const BatchTextCallback& on_text,
                                                      const InterruptCheck& interrupted) {
    // Checked without the engine's lock, which a running step holds: the
    // model's shape never changes, and a closed model is caught by the driver.
    if (closed_.load()) throw Error("the model is closed");
    auto job = std::make_shared<BatchJob>();
    const ModelShape& e = shape_;
    if (requests.empty()) throw std::invalid_argument("no requests");
    for (size_t i = 0; i < requests.size(); ++i) {
        const GenerationRequest& req = requests[i];
        validate_request(e, req, requests.size() > 1 ? static_cast<int>(i) : -1);
        if (!req.grammar.empty()) {
            if (job->grammars.empty()) job->grammars.resize(requests.size());
            job->grammars[i] = parse_grammar(e, req, requests.size() > 1 ? static_cast<int>(i) : -1);
        }
        const int64_t context = static_cast<int64_t>(req.prompt.size() + req.response_prefix.size());
        const int64_t need = cells_needed(req, std::min(req.n, e.n_parallel));
        if (context > e.n_ctx || need > e.n_ctx) {
            const std::string where = requests.size() > 1 ? "request " + std::to_string(i) + ": " : "";
            throw ContextLengthError(where + "the prompt has " + std::to_string(context) + " tokens and " +
                                     std::to_string(std::min(req.n, e.n_parallel)) + " sample(s) of up to " +
                                     std::to_string(req.max_tokens) + " new tokens need " + std::to_string(need) +
                                     " KV cells, but the context (shared by all sequences) holds " +
                                     std::to_string(e.n_ctx) + "; use a larger n_ctx, a shorter prompt, or "
                                     "fewer tokens or samples");
        }
    }
    job->requests = requests;
    job->on_text = on_text;
    job->interrupted = interrupted;
    job->owner = std::this_thread::get_id();
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        if (max_waiting_ > 0 && waiting_ >= max_waiting_) {
            throw QueueFullError("the model already has " + std::to_string(waiting_) +
                                 " generate calls waiting for a free sequence (the limit)");
        }
        ++waiting_;
        incoming_.push_back(job);
    }

    // Wait while another caller drives the loop; take over when it stops,
    // unless this call ended meanwhile.
    bool drive = false;
    {
        std::unique_lock<std::mutex> lock(jobs_mutex_);
        while (!job->done && driving_) {
            jobs_cv_.wait_for(lock, std::chrono::milliseconds(20));
            if (!job->done && interrupted) {
                lock.unlock();
                if (interrupted()) job->cancel.store(true);
                lock.lock();
            }
            // Not yet handed to the batcher: leave at once, whatever the driver is doing.
            const auto queued = std::find(incoming_.begin(), incoming_.end(), job);
            if (!job->done && job->cancel.load() && queued != incoming_.end()) {
                incoming_.erase(queued);
                if (job->counted_waiting) { job->counted_waiting = false; --waiting_; }
                if (!job->error) job->error = std::make_exception_ptr(Interrupted());
                job->done = true;
                ++cancelled_waiting_;
            }
        }
        if (!job->done) driving_ = drive = true;
    }
    if (drive) {
        // Drive until this call ends; the others' calls advance with it.
        BatchEvents ev;
        try {
            for (;;) {
                std::lock_guard<FairMutex> lock(mutex_);
                if (job->finished) break;
                if (!engine_) {
                    const auto closed = std::make_exception_ptr(Error("the model is closed"));
                    std::lock_guard<std::mutex> jl(jobs_mutex_);
                    for (const auto& j : incoming_) {
                        j->error = closed;
                        j->finished = true;
                        ev.finished.push_back(j);
                    }
                    incoming_.clear();
                    break;
                }
                Batcher& b = batcher();
                {
                    std::lock_guard<std::mutex> jl(jobs_mutex_);
                    for (const auto& j : incoming_) b.add(j);
                    incoming_.clear();
                }
                b.tick(ev);
                publish(ev);
            }
        } catch (...) {
            // Not expected (the batcher fails calls, not itself); never leave callers waiting.
            std::lock_guard<FairMutex> lock(mutex_);
            if (!job->finished) {
                job->error = std::current_exception();
                job->finished = true;
                ev.finished.push_back(job);
            }
        }
        publish(ev);
        {
            std::lock_guard<std::mutex> lock(jobs_mutex_);
            driving_ = false;
        }
        jobs_cv_.notify_all();
    }
    if (job->error) std::rethrow_exception(job->error);
    return std::move(job->results);
}

GenerationResult Session::generate(const GenerationRequest& req, const TextCallback& on_text,
                                   const InterruptCheck& interrupted) {
    if (req.n != 1) throw std::invalid_argument("generate() makes one sample; use generate_batch for n > 1");
    BatchTextCallback callback;
    if (on_text) callback = [&on_text](int, const std::string& piece) { return on_text(piece); };
    std::vector<GenerationResult> out = generate_batch({req}, callback, interrupted);
    return std::move(out.front());
}

void Session::clear_cache() {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (!batcher_ || !batcher_->busy()) {
        e.clear_all();
        return;
    }
    for (int s = 0; s < e.n_parallel(); ++s) {
        if (!batcher_->live(s)) e.seq_clear(s);
    }
}

int Session::drop_cached(const std::vector<int32_t>& prefix) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (prefix.empty()) throw std::invalid_argument("the prefix is empty");
    int dropped = 0;
    for (int s = 0; s < e.n_parallel(); ++s) {
        if (batcher_ && batcher_->live(s)) continue;
        const auto& held = e.seq_tokens(s);
        if (held.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), held.begin())) {
            e.seq_clear(s);
            ++dropped;
        }
    }
    return dropped;
}

std::vector<int32_t> Session::tokenize(const std::string& text, bool add_special, bool parse_special) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().tokenize(text, add_special, parse_special);
}

std::string Session::detokenize(const std::vector<int32_t>& tokens) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().detokenize(tokens);
}

std::string Session::token_piece(int32_t token) {
    std::shared_lock<std::shared_mutex> life(life_);
    Engine& e = engine();
    e.check_tokens({token});
    return e.token_piece(token, true);
}

std::string Session::apply_chat_template(const std::vector<ChatMessage>& messages, bool add_assistant,
                                         const std::string& template_name) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().apply_chat_template(messages, add_assistant, template_name);
}

const ModelFileInfo& Session::file_info() {
    std::lock_guard<FairMutex> lock(mutex_);
    return engine().file_info();
}

std::string Session::adapter_meta(int index, const std::string& key) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().adapter_meta(index, key);
}

int32_t Session::eos_token() { std::shared_lock<std::shared_mutex> life(life_); return engine().eos_token(); }

int Session::n_adapters() { std::shared_lock<std::shared_mutex> life(life_); return engine().n_adapters(); }

int Session::n_vocab() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_vocab; }
int Session::n_embd() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_embd; }
int Session::n_ctx() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_ctx; }
int Session::n_threads() { std::lock_guard<FairMutex> lock(mutex_); return engine().n_threads(); }
int Session::n_parallel() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_parallel; }
int64_t Session::decoded_tokens() { std::lock_guard<FairMutex> lock(mutex_); return engine().decoded_tokens(); }
int64_t Session::logit_rows() { std::lock_guard<FairMutex> lock(mutex_); return engine().logit_rows(); }
bool Session::has_chat_template() {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().has_chat_template();
}
std::shared_ptr<const ChatTemplates> Session::chat_templates(const std::string& override_source) {
    std::shared_lock<std::shared_mutex> life(life_);
    return std::make_shared<const ChatTemplates>(engine().model(), override_source);
}

ChatPrompt Session::apply_chat(const ChatTemplates& templates, const ChatRequest& request) {
    std::shared_lock<std::shared_mutex> life(life_);
    return templates.apply(engine().vocab(), request);
}

bool Session::is_eog(int32_t token) { std::shared_lock<std::shared_mutex> life(life_); return engine().is_eog(token); }

std::vector<float> Session::output_matrix() {
    std::lock_guard<FairMutex> lock(mutex_);
    OutputHead& h = head();
    std::vector<float> w(static_cast<size_t>(h.n_vocab() * h.n_embd()));
    h.dequantize(w.data());
    return w;
}

void Session::hidden_states(const std::vector<std::vector<int32_t>>& rows, const Engine::StatesSink& sink,
                            const InterruptCheck& interrupted) {
    std::lock_guard<FairMutex> lock(mutex_);
    engine().hidden_states(rows, sink, interrupted);
}

std::shared_ptr<RtdIndex> Session::make_rtd_index(const uint16_t* keys, const int32_t* values, int64_t n,
                                                  int64_t dim, int heads, std::shared_ptr<void> keepalive) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (dim != e.n_embd()) {
        throw std::invalid_argument("the datastore's keys have " + std::to_string(dim) +
                                    " dimensions but the model's hidden size is " + std::to_string(e.n_embd()));
    }
    return std::make_shared<RtdIndex>(keys, values, n, dim, heads, e.n_threads(), head_device(e.params()),
                                      std::move(keepalive));
}

void Session::prompt_states(const std::vector<int32_t>& tokens, std::vector<float>& hidden,
                            std::vector<float>& logits, const InterruptCheck& interrupted) {
    std::lock_guard<FairMutex> lock(mutex_);
    require_idle("prompt_states");
    Engine& e = engine();
    const size_t V = static_cast<size_t>(e.n_vocab()), d = static_cast<size_t>(e.n_embd());
    hidden.assign(tokens.size() * d, 0.0f);
    logits.assign(tokens.size() * V, 0.0f);
    e.prefill(tokens, true, 0,
              [&](int first, int count, const float* z, const float* h) {
                  std::copy(z, z + static_cast<size_t>(count) * V, logits.begin() + static_cast<ptrdiff_t>(first * V));
                  std::copy(h, h + static_cast<size_t>(count) * d, hidden.begin() + static_cast<ptrdiff_t>(first * d));
              },
              interrupted);
}

double Session::slot_loss_and_gradient(const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                                       bool recompute, const std::string& cache_precision, double cache_tail_mass,
                                       std::vector<float>& grad, double& loss_bound,
                                       const InterruptCheck& interrupted) {
    std::lock_guard<FairMutex> lock(mutex_);
    require_idle("slot_loss_and_gradient");
    Engine& e = engine();
    if (tokens.size() < 2) throw std::invalid_argument("the prompt needs at least two tokens for a SLOT loss");
    OutputHead& h = head();
    SlotConfig config;
    config.recompute = recompute;
    config.cache_precision = cache_precision;
    config.cache_tail_mass = cache_tail_mass;
    validate(config);
    SlotProblem problem(h, tokens, config);
    e.clear_all();
    fill_slot_problem(e, problem, 0, tokens, {}, interrupted);
    const double loss = problem.loss_and_gradient(delta, grad, interrupted);
    loss_bound = problem.last_loss_bound();
    return loss;
}

std::vector<float> Session::logit_bias(const std::vector<float>& delta) {
    std::lock_guard<FairMutex> lock(mutex_);
    OutputHead& h = head();
    if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
    std::vector<float> b(static_cast<size_t>(h.n_vocab()));
    h.project(delta.data(), b.data());
    return b;
}

std::vector<double> Session::token_logprobs(const std::vector<int32_t>& tokens, int first,
                                            const std::vector<float>& delta, const InterruptCheck& interrupted) {
    std::lock_guard<FairMutex> lock(mutex_);
    require_idle("token_logprobs");
    Engine& e = engine();
    if (first < 1 || first >= static_cast<int>(tokens.size())) {
        throw std::invalid_argument("first must index a token after the first one");
    }
    const int64_t V = e.n_vocab();
    std::vector<float> bias;
    if (!delta.empty()) {
        OutputHead& h = head();
        if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
        bias.resize(static_cast<size_t>(V));
        h.project(delta.data(), bias.data());
    }
    std::vector<double> out;
    out.reserve(tokens.size() - static_cast<size_t>(first));
    std::vector<float> row(static_cast<size_t>(V));
    // Row r's logits predict tokens[r + 1]; only rows first-1 .. N-2 are scored.
    e.prefill(tokens, true, 256,
              [&](int start, int count, const float* logits, const float*) {
                  for (int i = 0; i < count; ++i) {
                      const int r = start + i;
                      if (r < first - 1 || r + 1 >= static_cast<int>(tokens.size())) continue;
                      const float* z = logits + static_cast<size_t>(i) * static_cast<size_t>(V);
                      if (!bias.empty()) {
                          for (int64_t v = 0; v < V; ++v) row[static_cast<size_t>(v)] = z[v] + bias[static_cast<size_t>(v)];
                          z = row.data();
                      }
                      const int32_t y = tokens[static_cast<size_t>(r + 1)];
                      out.push_back(static_cast<double>(z[y]) - log_sum_exp(z, V));
                  }
              },
              interrupted);
    return out;
}

}  // namespace slot
