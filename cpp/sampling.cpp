#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

#include "head_kernels.h"

namespace slot {

void validate(const SamplingParams& p) {
    if (!(p.temperature >= 0.0) || !std::isfinite(p.temperature)) {
        throw std::invalid_argument("temperature must be a finite number >= 0");
    }
    if (p.top_k < 0) throw std::invalid_argument("top_k must be >= 0");
    if (!(p.top_p > 0.0 && p.top_p <= 1.0)) throw std::invalid_argument("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0 && p.min_p <= 1.0)) throw std::invalid_argument("min_p must be in [0, 1]");
    if (!(p.repeat_penalty > 0.0) || !std::isfinite(p.repeat_penalty)) {
        throw std::invalid_argument("repeat_penalty must be a finite number > 0");
    }
    if (p.repeat_last_n < 0) throw std::invalid_argument("repeat_last_n must be >= 0");
    if (!std::isfinite(p.presence_penalty) || !std::isfinite(p.frequency_penalty)) {
        throw std::invalid_argument("presence_penalty and frequency_penalty must be finite");
    }
}

void BiasStage::apply(const StageInput& in, float* logits) const {
    const float* b = bias_.data();
    for (int64_t v = 0; v < in.n_vocab; ++v) logits[v] += b[v];
}

void BiasStage::apply_from(const StageInput& in, const float* src, float* dst) const {
    const float* b = bias_.data();
    for (int64_t v = 0; v < in.n_vocab; ++v) dst[v] = src[v] + b[v];
}

void SparseBiasStage::apply(const StageInput& in, float* logits) const {
    for (const auto& [token, value] : bias_) {
        if (token >= 0 && token < in.n_vocab) logits[token] += value;
    }
}

void highest_logits(const float* z, int64_t n_vocab, size_t k, std::vector<std::pair<float, int32_t>>& out) {
    // A heap of the k best so far, its front the worst kept.
    out.clear();
    out.reserve(k);
    for (int64_t v = 0; v < n_vocab; ++v) {
        if (!std::isfinite(z[v])) continue;
        const std::pair<float, int32_t> c(z[v], static_cast<int32_t>(v));
        if (out.size() < k) {
            out.push_back(c);
            std::push_heap(out.begin(), out.end(), higher_logit);
        } else if (higher_logit(c, out.front())) {
            std::pop_heap(out.begin(), out.end(), higher_logit);
            out.back() = c;
            std::push_heap(out.begin(), out.end(), higher_logit);
        }
    }
}

TokenLogprob token_logprob(const float* logits, int64_t n_vocab, int32_t token, int top_n) {
    const double lse = log_sum_exp(logits, n_vocab);
    TokenLogprob out;
    out.logprob = static_cast<float>(static_cast<double>(logits[token]) - lse);
    if (top_n > 0) {
        std::vector<std::pair<float, int32_t>> cand;
        cand.reserve(static_cast<size_t>(n_vocab));
        for (int64_t v = 0; v < n_vocab; ++v) cand.emplace_back(logits[v], static_cast<int32_t>(v));
        const size_t k = std::min<size_t>(static_cast<size_t>(top_n), cand.size());
        std::partial_sort(cand.begin(), cand.begin() + static_cast<ptrdiff_t>(k), cand.end(), higher_logit);
        for (size_t i = 0; i < k; ++i) {
            out.top.emplace_back(cand[i].second, static_cast<float>(static_cast<double>(cand[i].first) - lse));
        }
    }
    return out;
}

Sampler::Sampler(const SamplingParams& params, int64_t n_vocab)
    : params_(params), n_vocab_(n_vocab), rng_(params.seed), work_(static_cast<size_t>(n_vocab)) {
    validate(params);
}

int32_t Sampler::sample(const float* logits, const float* bias, const std::vector<int32_t>& history,
                        size_t first_generated) {
    if (params_.temperature == 0.0 && !repeats(history) && !counts(history, first_generated)) {
        // Greedy without penalties: the first maximum of logits (+ bias) in one
        // pass, each sum the same float as in penalised(), nothing copied.
        int32_t best = 0;
        float best_z = bias != nullptr ? logits[0] + bias[0] : logits[0];
        for (int64_t v = 1; v < n_vocab_; ++v) {
            const float z = bias != nullptr ? logits[v] + bias[v] : logits[v];
            if (best_z < z) {
                best_z = z;
                best = static_cast<int32_t>(v);
            }
        }
        return best;
    }
    return draw(penalised(logits, bias, history, first_generated));
}

bool Sampler::repeats(const std::vector<int32_t>& history) const {
    return params_.repeat_penalty != 1.0 && params_.repeat_last_n > 0 && !history.empty();
}

bool Sampler::counts(const std::vector<int32_t>& history, size_t first_generated) const {
    return (params_.presence_penalty != 0.0 || params_.frequency_penalty != 0.0) && first_generated < history.size();
}

float* Sampler::penalised(const float* logits, const float* bias, const std::vector<int32_t>& history,
                          size_t first_generated) {
    float* z = work_.data();
    if (bias != nullptr) {
        for (int64_t v = 0; v < n_vocab_; ++v) z[v] = logits[v] + bias[v];
    } else {
        std::copy(logits, logits + n_vocab_, z);
    }
    if (repeats(history)) {
        const size_t from = history.size() > static_cast<size_t>(params_.repeat_last_n)
                                ? history.size() - static_cast<size_t>(params_.repeat_last_n) : 0;
        std::unordered_set<int32_t> seen(history.begin() + static_cast<ptrdiff_t>(from), history.end());
        const float pen = static_cast<float>(params_.repeat_penalty);
        for (int32_t t : seen) {
            if (t < 0 || t >= n_vocab_) continue;
            z[t] = z[t] > 0.0f ? z[t] / pen : z[t] * pen;
        }
    }
    if (counts(history, first_generated)) {
        std::unordered_map<int32_t, int> counts;
        for (size_t i = first_generated; i < history.size(); ++i) ++counts[history[i]];
        for (const auto& [t, count] : counts) {
            if (t < 0 || t >= n_vocab_) continue;
            z[t] -= static_cast<float>(params_.frequency_penalty * count + (count > 0 ? params_.presence_penalty : 0.0));
        }
    }
    return z;
}

int32_t Sampler::draw(const float* z) {
    if (params_.temperature == 0.0) {
        return static_cast<int32_t>(std::max_element(z, z + n_vocab_) - z);
    }

    auto& cand = candidates_;
    cand.clear();
    const bool truncate_k = params_.top_k > 0 && params_.top_k < n_vocab_;
    if (truncate_k) {
        highest_logits(z, n_vocab_, static_cast<size_t>(params_.top_k), cand);
    } else {
        cand.reserve(static_cast<size_t>(n_vocab_));
        for (int64_t v = 0; v < n_vocab_; ++v) {
            if (std::isfinite(z[v])) cand.emplace_back(z[v], static_cast<int32_t>(v));
        }
    }
    if (cand.empty()) throw std::runtime_error("every logit is non-finite; cannot sample");
    if (!truncate_k && params_.top_p >= 1.0) {
        // No top-k and no top-p: min-p needs only the largest logit, and the
        // draw may walk the vocabulary in index order, so nothing is sorted.
        const double inv_t = 1.0 / params_.temperature;
        float top = cand.front().first;
        for (const auto& c : cand) top = std::max(top, c.first);
        const double floor = params_.min_p > 0.0 ? params_.min_p : 0.0;  // relative to the largest probability
        double total = 0.0;
        for (auto& c : cand) {
            double p = std::exp((c.first - top) * inv_t);
            if (p < floor) p = 0.0;
            c.first = static_cast<float>(p);
            total += p;
        }
        const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
        double acc = 0.0;
        int32_t last = cand.front().second;
        for (const auto& c : cand) {
            if (c.first <= 0.0f) continue;
            acc += c.first;
            last = c.second;
            if (u < acc) return c.second;
        }
        return last;
    }
    std::sort(cand.begin(), cand.end(), higher_logit);

    // Probabilities at the sampling temperature.
    const double inv_t = 1.0 / params_.temperature;
    const double top = cand.front().first;
    std::vector<double> probs(cand.size());
    double sum = 0.0;
    for (size_t i = 0; i < cand.size(); ++i) {
        probs[i] = std::exp((cand[i].first - top) * inv_t);
        sum += probs[i];
    }
    size_t keep = cand.size();
    if (params_.min_p > 0.0) {
        const double floor = params_.min_p * probs[0];
        while (keep > 1 && probs[keep - 1] < floor) --keep;
    }
    if (params_.top_p < 1.0) {
        double acc = 0.0;
        for (size_t i = 0; i < keep; ++i) {
            acc += probs[i] / sum;
            if (acc >= params_.top_p) {
                keep = i + 1;
                break;
            }
        }
    }
    // Inverse-CDF draw from a 53-bit uniform: identical on every platform for a seed.
    double total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += probs[i];
    const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
    double acc = 0.0;
    for (size_t i = 0; i < keep; ++i) {
        acc += probs[i];
        if (u < acc) return cand[i].second;
    }
    return cand[keep - 1].second;
}

}  // namespace slot
