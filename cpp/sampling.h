// Per-sequence logit processing and token sampling over the full vocabulary.
// A sequence's logits pass through its ordered list of stages (SLOT's bias
// b = W*delta, a retrieval blend, ...), then the sampler: repetition penalty,
// then greedy or temperature with top-k, top-p and min-p.
#pragma once

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <utility>
#include <vector>

namespace slot {

struct SamplingParams {
    double temperature = 0.0;   // 0: greedy
    int top_k = 40;             // 0: off
    double top_p = 0.95;        // 1: off
    double min_p = 0.05;        // 0: off
    double repeat_penalty = 1.0;  // 1: off
    int repeat_last_n = 64;
    // OpenAI's penalties over the generated tokens: logit -= frequency * count + presence * (count > 0).
    double presence_penalty = 0.0;
    double frequency_penalty = 0.0;
    uint64_t seed = 0;
};

void validate(const SamplingParams& params);

// What a stage may read besides the logits.
struct StageInput {
    int64_t n_vocab = 0;
    const float* hidden = nullptr;  // final normed hidden state; set when a stage needs_hidden()
};

// One step of a sequence's logit processing; rewrites the logits in place.
// Stages are shared by the samples of a request, so apply() must not keep
// per-sequence state.
class LogitStage {
public:
    virtual ~LogitStage() = default;
    virtual void apply(const StageInput& in, float* logits) const = 0;
    // The same from src into dst (the first stage of a list): a copy, then apply.
    virtual void apply_from(const StageInput& in, const float* src, float* dst) const {
        std::copy(src, src + in.n_vocab, dst);
        apply(in, dst);
    }
    virtual bool needs_hidden() const { return false; }
};

using StageList = std::vector<std::shared_ptr<const LogitStage>>;

// logits += bias (SLOT: the bias is W*delta).
class BiasStage : public LogitStage {
public:
    explicit BiasStage(std::vector<float> bias) : bias_(std::move(bias)) {}
    void apply(const StageInput& in, float* logits) const override;
    // dst = src + bias in one pass over the vocabulary, not a copy and then a sum.
    void apply_from(const StageInput& in, const float* src, float* dst) const override;
    const float* values() const { return bias_.data(); }

private:
    std::vector<float> bias_;
};

// logits[token] += bias for a few tokens (OpenAI's logit_bias).
class SparseBiasStage : public LogitStage {
public:
    explicit SparseBiasStage(std::vector<std::pair<int32_t, float>> bias) : bias_(std::move(bias)) {}
    void apply(const StageInput& in, float* logits) const override;

private:
    std::vector<std::pair<int32_t, float>> bias_;
};

// log softmax(logits)[token], and the top_n most likely tokens with theirs
// (most likely first; ties by token id).
struct TokenLogprob {
    float logprob = 0.0f;
    std::vector<std::pair<int32_t, float>> top;
};
TokenLogprob token_logprob(const float* logits, int64_t n_vocab, int32_t token, int top_n);

// (logit, token) of the k highest finite logits, in heap order (not sorted),
// in one pass over the vocabulary: most tokens cost one comparison. Ties
// go to the lower token id.
void highest_logits(const float* z, int64_t n_vocab, size_t k, std::vector<std::pair<float, int32_t>>& out);
// The order of highest_logits: higher logit first, then lower token id.
inline bool higher_logit(const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
}

class Sampler {
public:
    Sampler(const SamplingParams& params, int64_t n_vocab);
    // `bias` may be null. `history` holds the tokens seen so far (prompt and
    // generated), for the repetition penalty; those from `first_generated` on
    // were generated, for the presence and frequency penalties.
    int32_t sample(const float* logits, const float* bias, const std::vector<int32_t>& history,
                   size_t first_generated = 0);
    // sample() in two parts, for a constraint between them: the logits after
    // the penalties (the sampler's own buffer, valid until the next call),
    // then a draw from logits with temperature and truncation (-inf entries
    // are never drawn; z is not modified).
    float* penalised(const float* logits, const float* bias, const std::vector<int32_t>& history,
                     size_t first_generated);
    int32_t draw(const float* z);
    const SamplingParams& params() const { return params_; }

private:
    // Whether the repetition penalty, and the presence and frequency penalties, apply now.
    bool repeats(const std::vector<int32_t>& history) const;
    bool counts(const std::vector<int32_t>& history, size_t first_generated) const;
    SamplingParams params_;
    int64_t n_vocab_;
    std::mt19937_64 rng_;
    std::vector<float> work_;
    std::vector<std::pair<float, int32_t>> candidates_;
};

}  // namespace slot
