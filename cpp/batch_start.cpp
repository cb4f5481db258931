// Starting a group of samples: its context evaluated (SLOT learning delta on
// it, or taken as far as it can be from the prompt cache), its delta's stages
// built, its samples' sequences forked from the context's, and their first
// tokens drawn from the context's last logits.
#include <algorithm>
#include <chrono>
#include <utility>

#include "batcher.h"

namespace slot {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

void Batcher::prepare(RequestState& st, const GenerationRequest& req, std::vector<float> delta, const char* status) {
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

void Batcher::start_group(Group& g, BatchEvents& ev) {
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

void Batcher::start_group_on(Group& g, std::vector<int>& taken, BatchEvents& ev) {
    RequestState& st = state_of(g);
    const GenerationRequest& req = request_of(g);
    const bool learn = !st.prepared && req.delta.empty() && req.slot.steps > 0;
    if (learn || !req.delta.empty()) head_();  // load the head (or refuse the model) outside the timings
    const Evaluated ctx = learn && req.prompt.size() >= 2 ? learn_on_context(g, taken)
                                                          : evaluate_context(g, taken, learn);
    last_use_[static_cast<size_t>(ctx.root)] = ++clock_;
    stats_.prompt_tokens += static_cast<int>(st.context.size());
    stats_.cached_tokens += ctx.cached;
    const std::vector<int> seqs = fork_samples(g, ctx.root, taken);
    start_lanes(g, seqs, ctx, taken, ev);
}

// SLOT learns delta on the prompt, evaluated into a fresh sequence.
Batcher::Evaluated Batcher::learn_on_context(Group& g, std::vector<int>& taken) {
    BatchJob& job = *g.job;
    RequestState& st = state_of(g);
    const GenerationRequest& req = request_of(g);
    const InterruptCheck stop = [&job] { return job.stop_requested(); };
    const MakeRoom room = [this] { return make_room(); };
    Evaluated out;
    auto t0 = Clock::now();
    out.root = take_seq(-1, taken);
    e_.seq_clear(out.root);
    SlotProblem problem(head_(), req.prompt, req.slot);
    // Every loss position is a token before the last; the last one is
    // then evaluated alone, as on every other path.
    fill_slot_problem(e_, problem, out.root, std::vector<int32_t>(req.prompt.begin(), req.prompt.end() - 1), room,
                      stop);
    e_.append(out.root, {req.prompt.back()}, Engine::Outputs::Last, 0, {}, room, stop,
              req.return_hidden || uses_hidden(req));
    out.prefill = seconds_since(t0);
    t0 = Clock::now();
    SlotOutcome outcome = problem.optimise(req.slot, stop);
    record_outcome(st, outcome);
    prepare(st, req, std::move(outcome.delta), "");
    st.slot.optimise_seconds = seconds_since(t0);
    return out;
}

void Batcher::record_outcome(RequestState& st, SlotOutcome& outcome) {
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
}

// Without learning: the context from the prompt cache where it can, the rest evaluated.
Batcher::Evaluated Batcher::evaluate_context(Group& g, std::vector<int>& taken, bool learn) {
    BatchJob& job = *g.job;
    RequestState& st = state_of(g);
    const GenerationRequest& req = request_of(g);
    const InterruptCheck stop = [&job] { return job.stop_requested(); };
    const MakeRoom room = [this] { return make_room(); };
    auto t0 = Clock::now();
    if (!st.prepared) {
        prepare_unlearned(st, req, learn);
        t0 = Clock::now();
    }
    Evaluated out = claim_cached(st, req, taken);
    if (req.prompt_logprobs) {
        append_with_prompt_logprobs(st, req, out.root, room, stop);
    } else {
        e_.append_context(out.root, std::vector<int32_t>(st.context.begin() + out.cached, st.context.end()), room,
                          stop, req.return_hidden || st.needs_hidden);
    }
    out.prefill = seconds_since(t0);
    return out;
}

void Batcher::prepare_unlearned(RequestState& st, const GenerationRequest& req, bool learn) {
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
}

Batcher::Evaluated Batcher::claim_cached(const RequestState& st, const GenerationRequest& req,
                                         std::vector<int>& taken) {
    Evaluated out;
    const bool reuse = req.cache_prompt && !req.prompt_logprobs;
    const auto [source, best] = reuse ? best_source(st.context) : std::pair<int, size_t>(-1, 0);
    // At least the last context token is evaluated: its logits start generation.
    out.cached = static_cast<int>(std::min(best, st.context.size() - 1));
    if (out.cached > 0) {
        out.root = take_seq(source, taken);
        if (out.root == source) {
            if (!e_.seq_truncate(out.root, out.cached)) out.cached = 0;
        } else {
            e_.seq_fork(source, out.root, out.cached);
            last_use_[static_cast<size_t>(source)] = ++clock_;  // a cache hit is a use
        }
    } else {
        out.root = take_seq(-1, taken);
        e_.seq_clear(out.root);
    }
    return out;
}

void Batcher::append_with_prompt_logprobs(RequestState& st, const GenerationRequest& req, int root,
                                          const MakeRoom& room, const InterruptCheck& stop) {
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
}

// Every sample's sequence first (they share the context's cells).
std::vector<int> Batcher::fork_samples(const Group& g, int root, std::vector<int>& taken) {
    const int context = static_cast<int>(state_of(g).context.size());
    std::vector<int> seqs{root};
    for (int j = 1; j < g.count; ++j) {
        const int s = take_seq(-1, taken);
        e_.seq_fork(root, s, context);
        seqs.push_back(s);
    }
    return seqs;
}

// A lane per sample, each starting with its first token from the context's last logits.
void Batcher::start_lanes(Group& g, const std::vector<int>& seqs, const Evaluated& ctx, std::vector<int>& taken,
                          BatchEvents& ev) {
    BatchJob& job = *g.job;
    RequestState& st = state_of(g);
    const GenerationRequest& req = request_of(g);
    const int context = static_cast<int>(st.context.size());
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
        res.cached_tokens = ctx.cached;
        res.prefill_seconds = ctx.prefill;
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
    // Lanes stay in sequence order (compact keeps it), so the decode batch is
    // too: with a KV stream per sequence (deterministic mode) llama.cpp puts
    // only consecutive sequence ids in one compute pass.
    std::sort(lanes_.begin(), lanes_.end(), [](const auto& a, const auto& b) { return a->seq < b->seq; });
    taken.clear();  // owned by lanes from here on
    stats_.live_sequences.store(static_cast<int64_t>(lanes_.size()));
    reserved_ += g.reserve;
    for (Lane* lane : started) {
        if (req.max_tokens == 0) finish(*lane, "length", ev);
        else advance(*lane, first_logits, first_hidden, ev);
    }
    compact();
}

}  // namespace slot
