// Token sampling over the full vocabulary with an optional additive logit bias
// (SLOT's b = W*delta): repetition penalty, then greedy or temperature with
// top-k, top-p and min-p.
#pragma once

#include <cstdint>
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
    uint64_t seed = 0;
};

void validate(const SamplingParams& params);

class Sampler {
public:
    Sampler(const SamplingParams& params, int64_t n_vocab);
    // `bias` may be null. `history` holds the tokens seen so far (prompt and
    // generated), for the repetition penalty.
    int32_t sample(const float* logits, const float* bias, const std::vector<int32_t>& history);

private:
    SamplingParams params_;
    int64_t n_vocab_;
    std::mt19937_64 rng_;
    std::vector<float> work_;
    std::vector<std::pair<float, int32_t>> candidates_;
};

}  // namespace slot
