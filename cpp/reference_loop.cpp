// llama.cpp's stock greedy loop (a fresh context, its greedy sampler, the
// batched example's one llama_decode per step), kept apart from the engine as
// an independent reference for tests and benchmarks (bound as
// Session.reference_greedy and reference_greedy_batch, through
// Session::with_model). Nothing on the serving path uses it.
#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>

#include "engine.h"
#include "engine_internal.h"
#include "errors.h"

namespace slot {
namespace {

using detail::BatchHolder;
using detail::kMaxSequences;
using detail::with_log_detail;

struct SamplerDeleter { void operator()(llama_sampler* s) const { llama_sampler_free(s); } };

}  // namespace

std::vector<int32_t> Engine::reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                              const InterruptCheck& interrupted, double* decode_seconds) {
    return reference_greedy_batch({prompt}, n_new, interrupted, decode_seconds).front();
}

std::vector<std::vector<int32_t>> Engine::reference_greedy_batch(const std::vector<std::vector<int32_t>>& prompts,
                                                                 int n_new, const InterruptCheck& interrupted,
                                                                 double* decode_seconds) {
    if (prompts.empty()) throw std::invalid_argument("no prompts");
    if (n_new < 0) throw std::invalid_argument("n_new must be >= 0");
    size_t total = 0;
    for (const auto& p : prompts) {
        if (p.empty()) throw std::invalid_argument("the prompt has no tokens");
        check_tokens(p);
        total += p.size() + static_cast<size_t>(n_new);
    }
    const int n_seq = static_cast<int>(prompts.size());
    if (n_seq > kMaxSequences) throw std::invalid_argument("too many prompts for one context");
    const llama_context_params cp = side_context_params(
        static_cast<uint32_t>(total + 8),
        static_cast<uint32_t>(std::max<size_t>(params_.n_batch, static_cast<size_t>(n_seq))),
        static_cast<uint32_t>(n_seq));
    ContextPtr ctx = new_context(cp, "a reference context");
    std::vector<std::unique_ptr<llama_sampler, SamplerDeleter>> samplers;
    for (int s = 0; s < n_seq; ++s) {
        samplers.emplace_back(llama_sampler_chain_init(llama_sampler_chain_default_params()));
        llama_sampler_chain_add(samplers.back().get(), llama_sampler_init_greedy());
    }
    struct ActiveGuard {
        Engine* e;
        ~ActiveGuard() { e->active_check_ = nullptr; }
    } guard{this};
    active_check_ = &interrupted;
    auto run = [&](llama_batch& b) {
        const int32_t rc = llama_decode(ctx.get(), b);
        if (rc == 2) throw Interrupted();
        if (rc != 0) throw Error(with_log_detail("reference decode failed with code " + std::to_string(rc)));
    };
    std::vector<std::vector<int32_t>> out(prompts.size());
    std::vector<int> row(prompts.size(), -1), pos(prompts.size(), 0);
    // Prompts one sequence at a time, as the example does (each its own prefill).
    for (int s = 0; s < n_seq; ++s) {
        const auto& p = prompts[static_cast<size_t>(s)];
        // All but the last token in batches, then the last alone, as slot_cpp does.
        std::vector<std::pair<size_t, size_t>> chunks;
        for (size_t start = 0; start + 1 < p.size(); start += cp.n_batch) {
            chunks.emplace_back(start, std::min<size_t>(cp.n_batch, p.size() - 1 - start));
        }
        chunks.emplace_back(p.size() - 1, 1);
        for (const auto& [start, count] : chunks) {
            BatchHolder holder(static_cast<int>(count));
            llama_batch& b = holder.batch;
            b.n_tokens = static_cast<int32_t>(count);
            for (size_t i = 0; i < count; ++i) {
                b.token[i] = p[start + i];
                b.pos[i] = static_cast<llama_pos>(start + i);
                b.n_seq_id[i] = 1;
                b.seq_id[i][0] = s;
                b.logits[i] = start + i + 1 == p.size();
            }
            run(b);
        }
        pos[static_cast<size_t>(s)] = static_cast<int>(p.size());
        const int32_t next = llama_sampler_sample(samplers[static_cast<size_t>(s)].get(), ctx.get(), -1);
        if (n_new > 0 && !llama_vocab_is_eog(vocab_, next)) out[static_cast<size_t>(s)].push_back(next);
        else row[static_cast<size_t>(s)] = -2;  // finished
    }
    double seconds = 0.0;
    BatchHolder holder(n_seq);
    llama_batch& b = holder.batch;
    while (true) {
        const auto t0 = std::chrono::steady_clock::now();
        b.n_tokens = 0;
        for (int s = 0; s < n_seq; ++s) {
            auto& o = out[static_cast<size_t>(s)];
            if (row[static_cast<size_t>(s)] == -2 || static_cast<int>(o.size()) >= n_new) continue;
            const int i = b.n_tokens++;
            b.token[i] = o.back();
            b.pos[i] = pos[static_cast<size_t>(s)]++;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = s;
            b.logits[i] = 1;
            row[static_cast<size_t>(s)] = i;
        }
        if (b.n_tokens == 0) break;
        run(b);
        for (int s = 0; s < n_seq; ++s) {
            auto& o = out[static_cast<size_t>(s)];
            if (row[static_cast<size_t>(s)] < 0 || static_cast<int>(o.size()) >= n_new) continue;
            const int32_t next = llama_sampler_sample(samplers[static_cast<size_t>(s)].get(), ctx.get(),
                                                      row[static_cast<size_t>(s)]);
            if (llama_vocab_is_eog(vocab_, next)) row[static_cast<size_t>(s)] = -2;
            else o.push_back(next);
        }
        seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    if (decode_seconds) *decode_seconds = seconds;
    return out;
}

}  // namespace slot
