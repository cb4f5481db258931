// SLOT: one vector delta added to the final normed hidden state, learned with
// AdamW on the prompt's own next-token cross-entropy.
//
// The head is linear, so W(h_t + delta) = z0_t + b with b = W*delta. The
// default ("cached") path keeps P0 = softmax(z0) for every loss position, so a
// step costs two matrix-vector products over P0 plus b = W*delta and W^T*g:
//   lse(z0_t + b) = lse(z0_t) + lse(b) + log S_t,  S_t = sum_v P0_tv q_v,
//   q = softmax(b),  g = (1/n) sum_t p_t - onehot(y_t),  p_tv = P0_tv q_v / S_t.
// The "bounded" path keeps, per loss position, only the most probable tokens
// of P0 and the tail's total mass m_t, and runs the cached path's formulas on
// P0 with the tail spread evenly over the tail's tokens. Since the true tail
// term sum_{v in tail} P0_tv q_v lies in [m_t min q, m_t max q], each step
// reports a bound on |true loss - its loss| (SlotOutcome::loss_bound).
// The "recompute" path (the published algorithm) evaluates W(H + delta) every
// step; it is used on request and when no cache fits the memory budget.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend.h"
#include "engine.h"
#include "head_kernels.h"
#include "output_head.h"

namespace slot {

struct SlotConfig {
    int steps = 5;
    double lr = 0.1;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-5;
    double weight_decay = 1e-8;
    // Bytes a SLOT problem may hold (llama.cpp's prefill logits and its P0 or
    // states); 0: a quarter of the device's available memory, between
    // kMinAutoBudget and kMaxAutoBudget.
    int64_t memory_budget = 0;
    bool recompute = false;  // force the published per-step recomputation
    // P0's precision: "float32", "bfloat16" (half the memory; the CPU only, a
    // GPU keeps float32), or "auto": float32 while it fits the buffer the CPU
    // backend keeps between prompts (any size that fits the budget on a GPU),
    // else bfloat16 when that fits the budget, else recompute.
    // "bounded": the top of each position's P0 (see above) until the tail holds
    // at most cache_tail_mass; "auto" takes it when neither full cache fits.
    std::string cache_precision = "auto";
    double cache_tail_mass = 1e-3;
    // Which prompt positions are in the loss: entry t for the prediction of
    // token t+1 (prompt length - 1 entries); empty: all of them.
    std::vector<uint8_t> loss_mask;
    // Step size chosen per prompt (lr="auto"), a trust region: the step size
    // whose delta moves the prompt's next-token distributions by a mean
    // KL(p0 || p_delta) of `kl_budget` nats per loss position. `lr` is the
    // step size of the reference run whose delta is scaled to find it.
    bool auto_lr = false;
    double kl_budget = 2e-3;
};

void validate(const SlotConfig& config);

constexpr int64_t kMinAutoBudget = int64_t(1) << 30;
constexpr int64_t kMaxAutoBudget = int64_t(8) << 30;

// Where optimisation time went, summed over steps (seconds).
struct StepProfile {
    double forward = 0.0;   // b = W*delta and the normalisers (recompute: W*(H+delta) and softmax)
    double cache = 0.0;     // P0^T * r (cached path only)
    double backward = 0.0;  // W^T * g
    double host = 0.0;      // loss, AdamW and transfers
};

struct SlotOutcome {
    std::vector<float> delta;     // n_embd
    std::vector<double> losses;   // losses[i]: loss at the start of completed step i+1
    int steps_done = 0;
    std::string stop_reason;      // "completed", "no loss positions", "non-finite ..."
    std::string path;             // "cached" (float32 P0), "cached_bf16", "bounded" or "recompute"
    // Bounded path: the largest, over the steps, of the bound on |true loss -
    // the loss reported|; and the mean number of tokens kept per position.
    double loss_bound = 0.0;
    double cache_mean_k = 0.0;
    int64_t cache_bytes = 0;
    StepProfile profile;
    double lr = 0.0;                          // the step size used (chosen, with auto_lr)
    std::vector<double> calibration_lrs;      // auto_lr: the step sizes measured, ascending
    std::vector<double> calibration_kls;      // and the mean KL of their (scaled) deltas
    double calibration_seconds = 0.0;
};

// SLOT's optimisation problem for one prompt: what the optimiser needs of it
// (P0 or the hidden states of its loss positions, filled batch by batch from
// prefill), the loss and gradient, AdamW and the lr="auto" calibration. Not to
// be confused with the prompt cache (KV cells reused between calls).
class SlotProblem {
public:
    SlotProblem(OutputHead& head, const std::vector<int32_t>& tokens, const SlotConfig& config);
    ~SlotProblem();

    int n_positions() const { return n_; }  // loss positions: prompt length - 1, or the masked ones
    bool cached() const { return cached_; }
    int prefill_rows() const { return prefill_rows_; }
    // Whether the prefill need only hand over hidden states: the problem then
    // computes the logits with its own head (on the CPU, where its product
    // beats llama.cpp's int8 tiles and keeps H in float32).
    bool own_head() const;
    // Which prompt positions the prefill must produce outputs for: the loss
    // positions (one entry per position before the last).
    std::vector<uint8_t> output_mask() const;
    int64_t bytes() const;
    // The prefill sink: rows [first, first+count) of logits (n_vocab each;
    // null with own_head(): computed here from the hidden states) and hidden
    // states (n_embd each).
    void add(int first, int count, const float* logits, const float* hidden);

    SlotOutcome optimise(const SlotConfig& config, const InterruptCheck& interrupted);
    // The loss at `delta` and its gradient dL/d delta (n_embd) on this problem's path.
    double loss_and_gradient(const std::vector<float>& delta, std::vector<float>& grad,
                             const InterruptCheck& interrupted);
    // Bounded path: the bound on |true loss - loss| of the last evaluation (0 on the exact paths).
    double last_loss_bound() const { return last_bound_; }
    bool bounded() const { return bounded_; }
    // For each scale a: the mean over loss positions of KL(p0_t || p_t(a * delta)).
    std::vector<double> scaled_kl(const std::vector<float>& delta, const std::vector<double>& scales,
                                  const InterruptCheck& interrupted);

private:
    // The loss at delta and, when grad is not null, its gradient.
    double evaluate(const std::vector<float>& delta, std::vector<float>* grad, const InterruptCheck& interrupted);
    double loss_and_gradient_cached(const std::vector<float>& delta, std::vector<float>* grad);
    double loss_and_gradient_bounded(const std::vector<float>& delta, std::vector<float>* grad);
    std::vector<double> scaled_kl_bounded(const std::vector<float>& b, const std::vector<double>& scales);
    // The bounded cache: tokens kept over all positions; the probability P0hat
    // gives each token outside a row's kept ones; and S_t = sum_v P0hat_tv q_v,
    // with `kept` its part over the kept tokens.
    int64_t kept_entries() const;
    double tail_share(const TopProbabilities& row) const;
    double bounded_normaliser(const TopProbabilities& row, const float* q, double& kept) const;
    double loss_and_gradient_recompute(const std::vector<float>& delta, std::vector<float>* grad,
                                       const InterruptCheck& interrupted);
    void adam(const SlotConfig& config, double lr, int steps, const InterruptCheck& interrupted, SlotOutcome& out);
    double calibrate(const SlotConfig& config, SlotOutcome& out, const InterruptCheck& interrupted);
    double target_logprob_from_logits(const float* row, int32_t target) const;
    // softmax(W h + bias) for c states of the recompute path, as a node of g;
    // recompute_inputs: h (and the bias) for ComputeBackend::run.
    struct RecomputeChunk {
        ggml_tensor* states = nullptr;  // [d, c]
        ggml_tensor* bias = nullptr;    // [V], heads with a bias only
        ggml_tensor* probabilities = nullptr;
    };
    RecomputeChunk build_recompute_chunk(GraphBuilder& g, int c) const;
    std::vector<GraphInput> recompute_inputs(const RecomputeChunk& chunk, const float* states) const;
    // Cache rows [first, first + c) from consecutive prompt positions.
    void add_run(int first, int c, const float* logits, const float* hidden);
    void add_logits_run(int first, int c, const float* logits);
    std::vector<float> own_logits_;  // own_head(): a few rows of logits at a time

    OutputHead& head_;
    int rows_ = 0;                 // prompt positions that could be in the loss
    std::vector<int> slot_of_;     // prompt position -> cache row, or -1 when masked out
    int n_ = 0;
    int64_t V_ = 0;
    int64_t d_ = 0;
    int64_t budget_ = 0;
    bool cached_ = true;
    ggml_type cache_type_ = GGML_TYPE_F32;
    bool bounded_ = false;
    double tail_mass_ = 0.0;
    int max_k_ = 0;
    std::vector<TopProbabilities> top_;   // bounded path: one per loss position
    double last_bound_ = 0.0;
    // P0 times columns [V, k] -> [n, k], and P0^T times a vector [n] -> [V], for P0's type.
    ggml_tensor* p0_times(ggml_context* ctx, ggml_tensor* cols) const;
    int prefill_rows_ = 1;
    int recompute_rows_ = 1;
    std::vector<int32_t> targets_;        // y_t = x_{t+1}, loss positions only
    std::vector<double> target_logp0_;    // log P0_t(y_t), cached path
    std::vector<float> hidden_;           // n x d, recompute path
    std::unique_ptr<StaticTensors> p0_;   // [V, n] softmax(z0), cached path
    ggml_tensor* p0_tensor_ = nullptr;
    StepProfile profile_;
};

// Evaluates `tokens` into sequence `seq` from its start, feeding every
// position to `problem`.
void fill_slot_problem(Engine& engine, SlotProblem& problem, int seq, const std::vector<int32_t>& tokens,
                       const MakeRoom& make_room, const InterruptCheck& interrupted);

}  // namespace slot
