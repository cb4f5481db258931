// The batch loop: admission, the prompt cache's sequences, and the decode
// step (one llama_decode for every live sequence, each sample's logits
// through its request's stages and sampler). Starting a group (evaluating its
// context, SLOT's learning, forking its samples) is in batch_start.cpp.
#include "batcher.h"

#include <algorithm>
#include <string>

#include "errors.h"

namespace slot {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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

Batcher::Batcher(Engine& engine, Drafter* drafter, std::function<OutputHead&()> head, LoopCounters& stats,
                 std::function<void(const std::shared_ptr<BatchJob>&)> admitted)
    : e_(engine), drafter_(drafter), head_(std::move(head)), stats_(stats), admitted_(std::move(admitted)),
      live_(static_cast<size_t>(engine.n_parallel()), 0), pinned_(live_.size(), 0), last_use_(live_.size(), 0),
      scratch_(static_cast<size_t>(engine.n_vocab())), masked_(static_cast<size_t>(engine.n_vocab())) {}


void Batcher::add(const std::shared_ptr<BatchJob>& job) {
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

void Batcher::tick(BatchEvents& ev) {
    std::vector<BatchJob*> seen;
    for (const Group* g : waiting_) seen.push_back(g->job.get());
    for (const auto& lane : lanes_) seen.push_back(lane->group->job.get());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (BatchJob* job : seen) {
        if (job->stop_requested()) fail(*job, std::make_exception_ptr(Interrupted()), ev);
    }

    if (!waiting_.empty()) pin_sources();
    while (!waiting_.empty()) {
        bool ready = false;
        try {
            ready = lora_ready(*waiting_.front()) && can_admit(*waiting_.front());
        } catch (...) {  // the adapters' scales could not be set: that call fails, the others go on
            fail(*waiting_.front()->job, std::current_exception(), ev);
            continue;
        }
        if (!ready) break;
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

void Batcher::fail_all(const std::exception_ptr& error, BatchEvents& ev) {
    while (!waiting_.empty()) fail(*waiting_.front()->job, error, ev);
    while (!lanes_.empty()) fail(*lanes_.front()->group->job, error, ev);
}

// ---- scheduling ----

void Batcher::pin_sources() {
    std::fill(pinned_.begin(), pinned_.end(), 0);
    for (const Group* g : waiting_) {
        if (!g->job->requests[static_cast<size_t>(g->request)].cache_prompt) continue;
        const int source = best_source(g->job->states[static_cast<size_t>(g->request)].context).first;
        if (source >= 0) pinned_[static_cast<size_t>(source)] = 1;
    }
}

std::pair<int, size_t> Batcher::best_source(const std::vector<int32_t>& context) const {
    std::pair<int, size_t> best(-1, 0);
    for (int s = 0; s < e_.n_parallel(); ++s) {
        const size_t l = common_prefix(e_.seq_tokens(s), context);
        if (l > best.second) best = {s, l};
    }
    return best;
}

bool Batcher::lora_ready(const Group& g) {
    const auto& asked = request_of(g).lora_scales;
    const auto& want = asked.empty() ? e_.default_lora_scales() : asked;
    if (want == e_.lora_scales()) return true;
    if (!lanes_.empty()) return false;
    e_.set_lora_scales(want);
    return true;
}

bool Batcher::can_admit(const Group& g) const {
    int free = 0;
    for (char l : live_) free += l ? 0 : 1;
    // Deterministic mode: every sequence has cells of its own, checked per request.
    return free >= g.count && (e_.deterministic() || reserved_ + g.reserve <= e_.n_ctx());
}

int Batcher::victim(int keep) const {
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

int Batcher::spare(int keep) const {
    for (int s = 0; s < static_cast<int>(live_.size()); ++s) {
        if (s != keep && !live_[static_cast<size_t>(s)] && e_.seq_tokens(s).empty()) return s;
    }
    return victim(keep);
}

int Batcher::take_seq(int keep, std::vector<int>& taken) {
    int best = spare(keep);
    if (best < 0 && keep >= 0 && !live_[static_cast<size_t>(keep)]) best = keep;
    if (best < 0) throw Error("internal error: no free sequence");
    live_[static_cast<size_t>(best)] = 1;
    taken.push_back(best);
    return best;
}

bool Batcher::make_room() {
    if (e_.deterministic()) return false;  // another sequence's cells are another stream's
    const int v = victim(-1);
    if (v < 0) return false;
    e_.seq_clear(v);
    return true;
}

void Batcher::compact() {
    lanes_.erase(std::remove_if(lanes_.begin(), lanes_.end(), [](const auto& l) { return l->done; }),
                 lanes_.end());
    stats_.live_sequences.store(static_cast<int64_t>(lanes_.size()));
    groups_.remove_if([](const Group& g) { return g.job->finished; });
}

void Batcher::finish(Lane& lane, const char* reason, BatchEvents& ev) {
    Group& g = *lane.group;
    BatchJob& job = *g.job;
    GenerationResult& res = job.results[static_cast<size_t>(lane.result)];
    emit(lane, res.text.size());
    res.finish_reason = reason;
    res.generate_seconds = seconds_since(lane.started);
    release(lane, !request_of(g).cache_prompt);
    if (g.live == 0 && --job.groups_left == 0) complete(g.job, ev);
}

void Batcher::release(Lane& lane, bool clear) {
    Group& g = *lane.group;
    const auto seq = static_cast<size_t>(lane.seq);
    live_[seq] = 0;
    last_use_[seq] = ++clock_;
    if (clear) e_.seq_clear(lane.seq);
    if (--g.live == 0) reserved_ -= g.reserve;
    lane.done = true;
}

void Batcher::complete(const std::shared_ptr<BatchJob>& job, BatchEvents& ev) {
    if (job->finished) return;
    job->finished = true;
    if (job->error) ++stats_.failed_calls;
    else ++stats_.completed_calls;
    ev.finished.push_back(job);
}

void Batcher::fail(BatchJob& job, const std::exception_ptr& error, BatchEvents& ev) {
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

// ---- the decode step ----

void Batcher::step(BatchEvents& ev) {
    std::vector<BatchToken> batch;
    batch.reserve(lanes_.size());
    std::vector<std::vector<int32_t>> drafts(lanes_.size());
    size_t room = static_cast<size_t>(e_.n_batch()) - std::min(lanes_.size(), static_cast<size_t>(e_.n_batch()));
    // Each speculating lane's draft length, within the batch's room.
    std::vector<size_t> budget(lanes_.size(), 0);
    for (size_t i = 0; i < lanes_.size() && room > 0; ++i) {
        if (request_of(*lanes_[i]->group).draft_max <= 0) continue;
        budget[i] = draft_budget(*lanes_[i], room);
        room -= budget[i];
    }
    if (drafter_ != nullptr) {
        std::vector<Drafter::Ask> asks;
        std::vector<size_t> asked;
        float p_min = 1.0f;
        for (size_t i = 0; i < lanes_.size(); ++i) {
            if (budget[i] == 0) continue;
            asks.push_back({lanes_[i]->seq, &lanes_[i]->history, static_cast<int>(budget[i])});
            asked.push_back(i);
            // One draft model pass serves every lane: the lowest threshold asked for.
            p_min = std::min(p_min, request_of(*lanes_[i]->group).draft_p_min);
        }
        if (!asks.empty()) {
            auto proposed = drafter_->draft(asks, p_min);
            for (size_t a = 0; a < asked.size(); ++a) drafts[asked[a]] = std::move(proposed[a]);
        }
    } else {
        for (size_t i = 0; i < lanes_.size(); ++i) {
            if (budget[i] > 0) drafts[i] = lookup(*lanes_[i], budget[i]);
        }
    }
    for (size_t i = 0; i < lanes_.size(); ++i) trim_draft(*lanes_[i], drafts[i]);
    bool hidden = false;
    for (size_t i = 0; i < lanes_.size(); ++i) {
        const Lane& lane = *lanes_[i];
        batch.push_back({lane.seq, lane.pending, true});
        for (int32_t t : drafts[i]) batch.push_back({lane.seq, t, true});
        hidden = hidden || state_of(*lane.group).needs_hidden;
    }
    e_.decode(batch, [this] { return make_room(); }, {}, hidden);
    ++stats_.decode_steps;
    int row = 0;
    for (size_t i = 0; i < lanes_.size(); ++i) {
        Lane& lane = *lanes_[i];
        const auto& d = drafts[i];
        const int seq = lane.seq;
        // The cells the lane keeps: up to its pending token, then the drafts its samples matched.
        const int kept_before_drafts = static_cast<int>(e_.seq_tokens(seq).size() - d.size());
        GenerationResult& res = lane.group->job->results[static_cast<size_t>(lane.result)];
        advance(lane, e_.logits_row(row), hidden ? e_.hidden_row(row) : nullptr, ev);
        size_t matched = 0;
        while (matched < d.size() && lane.sampled == d[matched]) {
            // The sampled token is the drafted one, whose logits this decode computed
            // (unless it ended the answer).
            ++matched;
            if (lane.done) break;
            const int r = row + static_cast<int>(matched);
            advance(lane, e_.logits_row(r), hidden ? e_.hidden_row(r) : nullptr, ev);
        }
        res.drafted_tokens += static_cast<int>(d.size());
        res.accepted_tokens += static_cast<int>(matched);
        if (!d.empty()) {
            lane.draft_len = matched == d.size() ? std::min(lane.draft_len * 2, request_of(*lane.group).draft_max)
                                                 : std::max(2, lane.draft_len / 2);
        }
        if (matched < d.size() && !e_.seq_truncate(seq, kept_before_drafts + static_cast<int>(matched))) {
            throw Error("internal error: a rejected draft's cells could not be dropped");
        }
        row += 1 + static_cast<int>(d.size());
    }
    compact();
}

size_t Batcher::draft_budget(const Lane& lane, size_t room) const {
    const GenerationRequest& req = request_of(*lane.group);
    const GenerationResult& res = lane.group->job->results[static_cast<size_t>(lane.result)];
    // Tokens left to generate after the pending one, and cells left in the sequence.
    const int left = req.max_tokens - static_cast<int>(res.tokens.size()) - 1;
    const int cells = e_.seq_capacity() - static_cast<int>(e_.seq_tokens(lane.seq).size()) - 1;
    return static_cast<size_t>(
        std::max(0, std::min({req.draft_max, lane.draft_len, left, cells, static_cast<int>(room)})));
}

std::vector<int32_t> Batcher::lookup(const Lane& lane, size_t k) const {
    const GenerationRequest& req = request_of(*lane.group);
    // The text so far: the context and the answer, the pending token last.
    const auto& all = lane.history;
    const size_t n_all = all.size();
    if (n_all < 2) return {};
    const auto at = [&](size_t i) { return all[i]; };
    // First the n tokens ending at the last one; failing that, the n before
    // it, skipping the token after their match: the last token took its place
    // (a copy with one token changed, as in a correction).
    for (size_t skip = 0; skip <= 1; ++skip) {
        if (n_all < 2 + skip) break;
        const size_t end = n_all - skip;  // the matched n-gram ends before `end`
        for (size_t n = std::min(static_cast<size_t>(req.draft_ngram), end - 1); n >= 1; --n) {
            // The latest earlier occurrence of the n-gram with a token (two with a skip) after it.
            for (size_t start = end - n; start-- > 0;) {
                if (start + n + skip >= n_all) continue;
                bool same = true;
                for (size_t j = 0; j < n && same; ++j) same = at(start + j) == at(end - n + j);
                if (!same) continue;
                // A shorter match than draft_ngram predicts less: its draft is short too (2^(n-1) tokens).
                const size_t take = n >= static_cast<size_t>(req.draft_ngram)
                                        ? k
                                        : std::min(k, size_t(1) << std::min<size_t>(n - 1, 16));
                std::vector<int32_t> out;
                for (size_t j = start + n + skip; j < n_all && out.size() < take; ++j) out.push_back(at(j));
                return out;
            }
        }
    }
    return {};
}

void Batcher::trim_draft(const Lane& lane, std::vector<int32_t>& draft) const {
    if (draft.empty()) return;
    const GenerationRequest& req = request_of(*lane.group);
    const size_t max_stop = state_of(*lane.group).max_stop;
    const std::string& text = lane.group->job->results[static_cast<size_t>(lane.result)].text;
    // The answer's last bytes that a stop string could end with, then each drafted piece.
    std::string tail = text.substr(text.size() - std::min(text.size(), max_stop > 0 ? max_stop - 1 : 0));
    for (size_t j = 0; j < draft.size(); ++j) {
        bool ends = !req.ignore_eos && e_.is_eog(draft[j]);
        if (!ends && max_stop > 0) {
            const size_t before = tail.size();
            tail += e_.token_piece(draft[j]);
            const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
            for (const auto& s : req.stop) ends = ends || tail.find(s, from) != std::string::npos;
        }
        if (ends) {
            draft.resize(j + 1);  // kept, generation would end there: nothing after it is needed
            return;
        }
    }
}

const float* Batcher::staged(const RequestState& st, const float* logits, const float* hidden) {
    if (st.stages.empty()) return logits;
    StageInput in;
    in.n_vocab = e_.n_vocab();
    in.hidden = hidden;
    st.stages.front()->apply_from(in, logits, scratch_.data());
    for (size_t i = 1; i < st.stages.size(); ++i) st.stages[i]->apply(in, scratch_.data());
    return scratch_.data();
}

void Batcher::advance(Lane& lane, const float* logits, const float* hidden, BatchEvents& ev) {
    const Group& g = *lane.group;
    const GenerationRequest& req = request_of(g);
    const RequestState& st = state_of(g);
    GenerationResult& res = g.job->results[static_cast<size_t>(lane.result)];
    const int64_t V = e_.n_vocab();
    const bool want_logprobs = req.logprobs || req.top_logprobs > 0;
    // A SLOT delta's bias alone (no grammar, no logprobs): the sampler adds it
    // as it reads the logits, with no staged copy.
    const auto* bias = st.stages.size() == 1 && !lane.grammar && !want_logprobs
                           ? dynamic_cast<const BiasStage*>(st.stages.front().get())
                           : nullptr;
    const float* z = bias != nullptr ? logits : staged(st, logits, hidden);
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
        tok = lane.sampler->sample(z, bias != nullptr ? bias->values() : nullptr, lane.history, st.context.size());
    }
    lane.sampled = tok;
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

const PrefixForest& Batcher::forest() {
    if (!forest_) forest_ = build_prefix_forest(e_.vocab());
    return *forest_;
}


// A draw from the penalised logits with the tokens the grammar refuses
// masked: exactly the sampler's draw from fully masked logits, checking
// as few tokens as it can. Greedy and top-k need only the highest allowed
// tokens; without truncation a token drawn from the unmasked logits and
// allowed has probability p(a), or the redraw from the masked ones gives
// it (1 - Z) p(a) / Z, p(a) / Z in all (Z: the allowed mass).
int32_t Batcher::constrained_draw(Lane& lane, const float* z, size_t first_generated) {
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

void Batcher::emit(Lane& lane, size_t end) {
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

}  // namespace slot
