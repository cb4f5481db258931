#include "slot_optimizer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "errors.h"
#include "head_kernels.h"

namespace slot {
namespace {

// A target probability below this is recomputed in double from the logits, so
// that float underflow in P0 never turns into an infinite loss.
constexpr double kTinyProbability = 1e-30;
// lr="auto" measures the reference delta scaled by 2^e for e in this range.
constexpr int kAutoLowestScale = -4;
constexpr int kAutoHighestScale = 4;
// The bounded cache keeps at most this many tokens per position, and fits the
// budget with at least the smaller number or not at all.
constexpr int kMaxTopTokens = 4096;
constexpr int kMinTopTokens = 16;
constexpr int64_t kTopEntryBytes = sizeof(int32_t) + sizeof(float);

// Adds the seconds since construction to a counter when it goes out of scope.
class ScopedTimer {
public:
    explicit ScopedTimer(double& sink) : sink_(sink), start_(std::chrono::steady_clock::now()) {}
    ~ScopedTimer() { sink_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }
    ScopedTimer(const ScopedTimer&) = delete;
    ScopedTimer& operator=(const ScopedTimer&) = delete;

private:
    double& sink_;
    std::chrono::steady_clock::time_point start_;
};

bool all_finite(const std::vector<float>& v) {
    for (float x : v) {
        if (!std::isfinite(x)) return false;
    }
    return true;
}

}  // namespace

void fill_slot_problem(Engine& engine, SlotProblem& problem, int seq, const std::vector<int32_t>& tokens,
                       const MakeRoom& make_room, const InterruptCheck& interrupted) {
    engine.seq_clear(seq);
    // The output head runs at the loss positions alone: each run of them is
    // evaluated with outputs, the positions between them without (a loss
    // window or a user-content mask then costs the prefill only what it uses).
    const std::vector<uint8_t> mask = problem.output_mask();
    const auto in_loss = [&mask](size_t t) { return t < mask.size() && mask[t] != 0; };
    // The head read from the file is the model's only without adapters (one may change it).
    const bool own_head = problem.own_head() && engine.n_adapters() == 0 && engine.hidden_only_ok();
    const PrefillSink sink = [&problem](int first, int count, const float* logits, const float* hidden) {
        problem.add(first, count, logits, hidden);
    };
    for (size_t i = 0; i < tokens.size();) {
        const bool outputs = in_loss(i);
        size_t j = i + 1;
        while (j < tokens.size() && in_loss(j) == outputs) ++j;
        const std::vector<int32_t> run(tokens.begin() + static_cast<ptrdiff_t>(i),
                                       tokens.begin() + static_cast<ptrdiff_t>(j));
        if (outputs && own_head) {
            // Hidden states alone: the problem's head computes the logits.
            engine.append(seq, run, Engine::Outputs::Hidden, problem.prefill_rows(), sink, make_room, interrupted);
        } else if (outputs) {
            // Hidden states are kept only on the recompute path; asking
            // llama.cpp for them makes it compute every position's logits too.
            engine.append(seq, run, Engine::Outputs::All, problem.prefill_rows(), sink, make_room, interrupted,
                          false, /*prefill_hidden=*/!problem.cached());
        } else {
            engine.append(seq, run, Engine::Outputs::None, 0, {}, make_room, interrupted);
        }
        i = j;
    }
}

void validate(const SlotConfig& c) {
    if (c.steps < 0) throw std::invalid_argument("steps must be >= 0");
    if (!(c.lr > 0.0) || !std::isfinite(c.lr)) throw std::invalid_argument("lr must be a finite number > 0");
    if (!(c.beta1 >= 0.0 && c.beta1 < 1.0)) throw std::invalid_argument("beta1 must be in [0, 1)");
    if (!(c.beta2 >= 0.0 && c.beta2 < 1.0)) throw std::invalid_argument("beta2 must be in [0, 1)");
    if (!(c.eps > 0.0) || !std::isfinite(c.eps)) throw std::invalid_argument("eps must be a finite number > 0");
    if (!(c.weight_decay >= 0.0) || !std::isfinite(c.weight_decay)) {
        throw std::invalid_argument("weight_decay must be a finite number >= 0");
    }
    if (c.memory_budget != 0 && c.memory_budget < (int64_t(1) << 20)) {
        throw std::invalid_argument("memory_budget must be at least 1 MiB (or 0: automatic)");
    }
    if (c.cache_precision != "auto" && c.cache_precision != "float32" && c.cache_precision != "bfloat16" &&
        c.cache_precision != "bounded") {
        throw std::invalid_argument("cache_precision must be 'auto', 'float32', 'bfloat16' or 'bounded'");
    }
    if (!(c.cache_tail_mass > 0.0 && c.cache_tail_mass < 1.0)) {
        throw std::invalid_argument("cache_tail_mass must be in (0, 1)");
    }
    if (!(c.kl_budget > 0.0) || !std::isfinite(c.kl_budget)) {
        throw std::invalid_argument("kl_budget must be a finite number > 0");
    }
}

SlotProblem::SlotProblem(OutputHead& head, const std::vector<int32_t>& tokens, const SlotConfig& config)
    : head_(head), V_(head.n_vocab()), d_(head.n_embd()) {
    rows_ = tokens.empty() ? 0 : static_cast<int>(tokens.size()) - 1;
    if (!config.loss_mask.empty() && static_cast<int>(config.loss_mask.size()) != rows_) {
        throw std::invalid_argument("the loss mask has " + std::to_string(config.loss_mask.size()) +
                                    " entries but the prompt has " + std::to_string(rows_) + " loss positions");
    }
    // Loss positions are stored compactly, in prompt order.
    slot_of_.assign(static_cast<size_t>(rows_), -1);
    for (int t = 0; t < rows_; ++t) {
        if (!config.loss_mask.empty() && !config.loss_mask[static_cast<size_t>(t)]) continue;
        slot_of_[static_cast<size_t>(t)] = n_++;
        targets_.push_back(tokens[static_cast<size_t>(t) + 1]);
    }
    const int64_t row_bytes = V_ * static_cast<int64_t>(sizeof(float));
    budget_ = config.memory_budget > 0
                  ? config.memory_budget
                  : std::clamp<int64_t>(head.backend().available_memory() / 4, kMinAutoBudget, kMaxAutoBudget);
    // A quarter of the budget, at most 256 MiB, goes to llama.cpp's prefill
    // logits: the graph's output tensor and the copy in its output buffer,
    // prefill_rows rows each, which llama.cpp keeps once allocated.
    prefill_rows_ = static_cast<int>(
        std::clamp<int64_t>(std::min<int64_t>(budget_, kMinAutoBudget) / 8 / row_bytes, 1, 512));
    const int64_t rest = budget_ - 2 * prefill_rows_ * row_bytes;
    const int64_t n = static_cast<int64_t>(n_);
    const bool any = config.cache_precision == "auto";
    cached_ = false;
    const bool cpu = head.backend().is_cpu();
    const int64_t f32_bytes = n * row_bytes, bf16_bytes = n * V_ * static_cast<int64_t>(sizeof(uint16_t));
    const bool f32_fits = f32_bytes <= rest, bf16_fits = cpu && bf16_bytes <= rest;
    max_k_ = static_cast<int>(std::min<int64_t>(kMaxTopTokens, n > 0 ? rest / (n * kTopEntryBytes) : kMaxTopTokens));
    const bool top_fits = max_k_ >= kMinTopTokens;
    tail_mass_ = config.cache_tail_mass;
    if (!config.recompute) {
        if (config.cache_precision == "float32") {
            cached_ = f32_fits;
        } else if (config.cache_precision == "bounded") {
            cached_ = bounded_ = top_fits;
        } else if (config.cache_precision == "bfloat16") {
            // The bfloat16 kernels are the CPU's; a GPU keeps float32.
            cached_ = cpu ? bf16_fits : f32_fits;
            if (cpu) cache_type_ = GGML_TYPE_BF16;
        } else if (f32_fits && (!cpu || !bf16_fits ||
                                f32_bytes <= static_cast<int64_t>(ComputeBackend::kMaxReusableBytes))) {
            // float32 while it fits the buffer the CPU backend keeps between
            // prompts; past that, fresh pages (a fault each on first write)
            // and twice the memory traffic make bfloat16 the faster cache.
            cached_ = true;
        } else if (bf16_fits) {
            // Entries rounded to 8 significant bits; the step's sums stay in
            // float32 (see bf16_rows_times_columns).
            cached_ = true;
            cache_type_ = GGML_TYPE_BF16;
        } else if (top_fits) {
            cached_ = bounded_ = true;
        }
    }
    recompute_rows_ = static_cast<int>(std::clamp<int64_t>(rest / (2 * row_bytes), 1, 256));
    if (n_ == 0) return;
    if (bounded_) {
        target_logp0_.assign(static_cast<size_t>(n_), 0.0);
        top_.resize(static_cast<size_t>(n_));
    } else if (cached_) {
        target_logp0_.assign(static_cast<size_t>(n_), 0.0);
        p0_ = std::make_unique<StaticTensors>(1);
        p0_tensor_ = ggml_new_tensor_2d(p0_->ctx, cache_type_, V_, n_);
        head_.backend().allocate_reusable(*p0_, "the SLOT problem's P0");
    } else {
        hidden_.assign(static_cast<size_t>(n_) * static_cast<size_t>(d_), 0.0f);
    }
}

SlotProblem::~SlotProblem() = default;

ggml_tensor* SlotProblem::p0_times(ggml_context* ctx, ggml_tensor* cols) const {
    return cache_type_ == GGML_TYPE_BF16 ? bf16_rows_times_columns(ctx, p0_tensor_, cols)
                                         : ggml_mul_mat(ctx, p0_tensor_, cols);
}

std::vector<uint8_t> SlotProblem::output_mask() const {
    std::vector<uint8_t> mask(slot_of_.size(), 0);
    for (size_t t = 0; t < slot_of_.size(); ++t) mask[t] = slot_of_[t] >= 0 ? 1 : 0;
    return mask;
}

int64_t SlotProblem::bytes() const {
    if (n_ == 0) return 0;
    if (bounded_) {
        return kept_entries() * kTopEntryBytes + n_ * static_cast<int64_t>(sizeof(TopProbabilities));
    }
    return cached_ ? static_cast<int64_t>(ggml_nbytes(p0_tensor_))
                   : static_cast<int64_t>(hidden_.size() * sizeof(float));
}

double SlotProblem::target_logprob_from_logits(const float* row, int32_t target) const {
    return static_cast<double>(row[target]) - log_sum_exp(row, V_);
}

void SlotProblem::add(int first, int count, const float* logits, const float* hidden) {
    const int end = std::min(first + count, rows_);
    // Runs of consecutive loss positions fill consecutive cache rows.
    int i = first;
    while (i < end) {
        if (slot_of_[static_cast<size_t>(i)] < 0) { ++i; continue; }
        int j = i + 1;
        while (j < end && slot_of_[static_cast<size_t>(j)] >= 0) ++j;
        // hidden is null when the prefill handed logits alone; logits are null with the problem's own head.
        add_run(slot_of_[static_cast<size_t>(i)], j - i,
                logits == nullptr ? nullptr : logits + static_cast<size_t>(i - first) * V_,
                hidden == nullptr ? nullptr : hidden + static_cast<size_t>(i - first) * d_);
        i = j;
    }
}

bool SlotProblem::own_head() const { return head_.backend().is_cpu() && !head_.portable_ops(); }

void SlotProblem::add_run(int first, int c, const float* logits, const float* hidden) {
    if (!cached_) {
        std::copy(hidden, hidden + static_cast<size_t>(c) * static_cast<size_t>(d_),
                  hidden_.begin() + static_cast<ptrdiff_t>(first) * d_);
        return;
    }
    if (logits != nullptr) {
        add_logits_run(first, c, logits);
        return;
    }
    if (!bounded_ && cache_type_ == GGML_TYPE_F32 && !head_.has_bias()) {
        // The logits written straight into the cache rows, then turned into
        // probabilities in place: one graph, no buffer of logits.
        const size_t offset = p0_tensor_->nb[1] * static_cast<size_t>(first);
        SoftmaxRowsJob job{reinterpret_cast<const float*>(static_cast<const char*>(p0_tensor_->data) + offset),
                           targets_.data() + first, target_logp0_.data() + first};
        GraphBuilder g(6);
        ggml_tensor* h = g.input(GGML_TYPE_F32, d_, c);
        ggml_tensor* rows = ggml_view_2d(g.ctx, p0_tensor_, V_, c, p0_tensor_->nb[1], offset);
        g.output(softmax_rows_from_host(g.ctx, head_.rows_product(g.ctx, h, rows), &job));
        head_.backend().run(g, "prompt logits and softmax", {{h, hidden}});
        return;
    }
    // The logits from the hidden states, kOwnRows rows at a time.
    constexpr int kOwnRows = 32;
    own_logits_.resize(static_cast<size_t>(std::min(c, kOwnRows)) * static_cast<size_t>(V_));
    for (int i = 0; i < c; i += kOwnRows) {
        const int m = std::min(kOwnRows, c - i);
        head_.logits(hidden + static_cast<size_t>(i) * static_cast<size_t>(d_), m, own_logits_.data());
        add_logits_run(first + i, m, own_logits_.data());
    }
}

void SlotProblem::add_logits_run(int first, int c, const float* logits) {
    if (bounded_) {
        TopRowsJob job;
        job.src = logits;
        job.n_vocab = V_;
        job.targets = targets_.data() + first;
        job.target_logprob = target_logp0_.data() + first;
        job.rows = top_.data() + first;
        job.tail_mass = tail_mass_;
        job.max_k = max_k_;
        if (head_.backend().is_cpu()) {
            GraphBuilder g(4);
            g.output(top_probabilities_from_host(g.ctx, c, &job));
            head_.backend().run(g, "prompt top probabilities");
        } else {
            top_probabilities_rows(job, 0, c);
        }
        return;
    }
    const size_t offset = p0_tensor_->nb[1] * static_cast<size_t>(first);
    if (head_.backend().is_cpu()) {
        // Read the logits once and write the probabilities into the cache rows.
        SoftmaxRowsJob job{logits, targets_.data() + first, target_logp0_.data() + first};
        GraphBuilder g(4);
        ggml_tensor* rows = ggml_view_2d(g.ctx, p0_tensor_, V_, c, p0_tensor_->nb[1], offset);
        g.output(softmax_rows_from_host(g.ctx, rows, &job));
        head_.backend().run(g, "prompt softmax");
        return;
    }
    // The logits go straight into the cache rows and are normalised in place:
    // no intermediate N x vocab buffer.
    ggml_backend_tensor_set(p0_tensor_, logits, offset, p0_tensor_->nb[1] * static_cast<size_t>(c));
    GraphBuilder g(4);
    ggml_tensor* rows = ggml_view_2d(g.ctx, p0_tensor_, V_, c, p0_tensor_->nb[1], offset);
    g.output(ggml_soft_max_inplace(g.ctx, rows));
    head_.backend().run(g, "prompt softmax");
    for (int i = 0; i < c; ++i) {
        const int t = first + i;
        float prob = 0.0f;
        const size_t offset = p0_tensor_->nb[1] * static_cast<size_t>(t) + sizeof(float) * static_cast<size_t>(targets_[t]);
        ggml_backend_tensor_get(p0_tensor_, &prob, offset, sizeof(float));
        target_logp0_[static_cast<size_t>(t)] =
            prob > kTinyProbability ? std::log(static_cast<double>(prob))
                                    : target_logprob_from_logits(logits + static_cast<size_t>(i) * V_, targets_[t]);
    }
}

double SlotProblem::loss_and_gradient_cached(const std::vector<float>& delta, std::vector<float>* grad) {
    std::vector<float> b(static_cast<size_t>(V_)), q(static_cast<size_t>(V_)), S(static_cast<size_t>(n_));
    if (std::all_of(delta.begin(), delta.end(), [](float x) { return x == 0.0f; })) {
        // delta = 0 (every first step, and calibration's baseline): b = 0, q is
        // uniform and each S_t = sum_v p0_t(v) / V = 1/V, with no pass over
        // the head or the cache.
        std::fill(q.begin(), q.end(), static_cast<float>(1.0 / static_cast<double>(V_)));
        std::fill(S.begin(), S.end(), static_cast<float>(1.0 / static_cast<double>(V_)));
    } else {
        GraphBuilder g(8);
        ggml_tensor* din = g.input(GGML_TYPE_F32, d_);
        ggml_tensor* bt = head_.product(g.ctx, din);
        ggml_tensor* qt = ggml_soft_max(g.ctx, bt);
        ggml_tensor* st = p0_times(g.ctx, qt);
        g.output(bt);
        g.output(qt);
        g.output(st);
        ScopedTimer timer(profile_.forward);
        head_.backend().run(g, "SLOT step (W*delta, P0*q)", {{din, delta.data()}},
                            {{bt, b.data()}, {qt, q.data()}, {st, S.data()}});
    }
    // lse(b) from the softmax already computed: q at argmax(b) is 1/sum exp(b - max b),
    // at least 1/n_vocab, so its logarithm is well conditioned.
    const int64_t top = std::max_element(b.begin(), b.end()) - b.begin();
    const double lse_b = b[static_cast<size_t>(top)] - std::log(static_cast<double>(q[static_cast<size_t>(top)]));
    const double w = 1.0 / static_cast<double>(n_);  // each loss position's weight
    double loss = 0.0;
    std::vector<float> r(static_cast<size_t>(n_));
    for (int t = 0; t < n_; ++t) {
        const double s = S[static_cast<size_t>(t)];
        loss += w * (-target_logp0_[static_cast<size_t>(t)] + lse_b + std::log(s) - b[static_cast<size_t>(targets_[t])]);
        r[static_cast<size_t>(t)] = static_cast<float>(w / s);
    }
    if (!std::isfinite(loss) || grad == nullptr) return loss;

    std::vector<float> u(static_cast<size_t>(V_));
    if (cache_type_ == GGML_TYPE_BF16) {
        GraphBuilder g(4);
        ggml_tensor* rt = g.input(GGML_TYPE_F32, n_);
        ggml_tensor* ut = bf16_rows_transposed_times(g.ctx, p0_tensor_, rt);
        g.output(ut);
        ScopedTimer timer(profile_.cache);
        head_.backend().run(g, "SLOT step (P0^T*r, bfloat16)", {{rt, r.data()}}, {{ut, u.data()}});
    } else {
        GraphBuilder g(10);
        ColumnSplitProduct prod = build_column_split_product(g, p0_tensor_, head_.column_slabs());
        ScopedTimer timer(profile_.cache);
        head_.backend().run(g, "SLOT step (P0^T*r)", column_split_inputs(prod, r.data()),
                            column_split_outputs(prod, u.data()));
    }
    std::vector<float> gvec(static_cast<size_t>(V_));
    for (int64_t v = 0; v < V_; ++v) gvec[static_cast<size_t>(v)] = q[static_cast<size_t>(v)] * u[static_cast<size_t>(v)];
    for (int t = 0; t < n_; ++t) gvec[static_cast<size_t>(targets_[t])] -= static_cast<float>(w);
    ScopedTimer timer(profile_.backward);
    head_.project_transposed(gvec.data(), grad->data());
    return loss;
}

int64_t SlotProblem::kept_entries() const {
    int64_t entries = 0;
    for (const TopProbabilities& row : top_) entries += static_cast<int64_t>(row.ids.size());
    return entries;
}

double SlotProblem::tail_share(const TopProbabilities& row) const {
    const int64_t others = V_ - static_cast<int64_t>(row.ids.size());
    return others > 0 ? row.tail / static_cast<double>(others) : 0.0;
}

double SlotProblem::bounded_normaliser(const TopProbabilities& row, const float* q, double& kept) const {
    double kept_q = 0.0;
    kept = 0.0;
    for (size_t j = 0; j < row.ids.size(); ++j) {
        const double qv = q[static_cast<size_t>(row.ids[j])];
        kept += row.probs[j] * qv;
        kept_q += qv;
    }
    return kept + tail_share(row) * std::max(0.0, 1.0 - kept_q);
}

double SlotProblem::loss_and_gradient_bounded(const std::vector<float>& delta, std::vector<float>* grad) {
    // P0 with each tail spread evenly: P0hat_tv = P0_tv on the kept tokens,
    // c_t = m_t / (V - K_t) on the others; the cached path's formulas on it.
    std::vector<float> b(static_cast<size_t>(V_), 0.0f), q(static_cast<size_t>(V_));
    if (std::any_of(delta.begin(), delta.end(), [](float x) { return x != 0.0f; })) {
        ScopedTimer timer(profile_.forward);
        head_.project(delta.data(), b.data());
    }
    const double lse_b = softmax(b.data(), V_, q.data());
    const auto [lo, hi] = std::minmax_element(q.begin(), q.end());
    const double q_lo = *lo, q_hi = *hi;
    const double w = 1.0 / static_cast<double>(n_);
    double loss = 0.0, bound = 0.0;
    std::vector<double> r(static_cast<size_t>(n_)), spread(static_cast<size_t>(n_));
    {
        ScopedTimer timer(profile_.cache);
        for (int t = 0; t < n_; ++t) {
            const TopProbabilities& row = top_[static_cast<size_t>(t)];
            double kept = 0.0;
            const double s = bounded_normaliser(row, q.data(), kept);
            // The true S_t = kept + sum_{tail} P0_tv q_v lies in [kept + m_t q_lo, kept + m_t q_hi].
            const double s_lo = kept + row.tail * q_lo, s_hi = kept + row.tail * q_hi;
            bound += w * std::max(std::log(s_hi / s), std::log(s / s_lo));
            loss += w * (-target_logp0_[static_cast<size_t>(t)] + lse_b + std::log(s) - b[static_cast<size_t>(targets_[t])]);
            r[static_cast<size_t>(t)] = w / s;
            spread[static_cast<size_t>(t)] = tail_share(row);
        }
    }
    last_bound_ = bound;
    if (!std::isfinite(loss) || grad == nullptr) return loss;
    // u = P0hat^T r: every tail's even share, then the kept tokens' differences.
    double base = 0.0;
    for (int t = 0; t < n_; ++t) base += r[static_cast<size_t>(t)] * spread[static_cast<size_t>(t)];
    std::vector<double> u(static_cast<size_t>(V_), base);
    for (int t = 0; t < n_; ++t) {
        const TopProbabilities& row = top_[static_cast<size_t>(t)];
        const double rt = r[static_cast<size_t>(t)], c = spread[static_cast<size_t>(t)];
        for (size_t j = 0; j < row.ids.size(); ++j) u[static_cast<size_t>(row.ids[j])] += rt * (row.probs[j] - c);
    }
    std::vector<float> gvec(static_cast<size_t>(V_));
    for (int64_t v = 0; v < V_; ++v) gvec[static_cast<size_t>(v)] = static_cast<float>(q[static_cast<size_t>(v)] * u[static_cast<size_t>(v)]);
    for (int t = 0; t < n_; ++t) gvec[static_cast<size_t>(targets_[t])] -= static_cast<float>(w);
    ScopedTimer timer(profile_.backward);
    head_.project_transposed(gvec.data(), grad->data());
    return loss;
}

std::vector<double> SlotProblem::scaled_kl_bounded(const std::vector<float>& b, const std::vector<double>& scales) {
    // As scaled_kl, on P0hat: S_t(a) = sum_kept P0 q_a + c_t (1 - sum_kept q_a),
    // E_t = sum_kept P0 b + c_t (sum b - sum_kept b).
    double b_total = 0.0;
    for (float x : b) b_total += x;
    std::vector<double> e(static_cast<size_t>(n_));  // E_t does not depend on the scale
    for (int t = 0; t < n_; ++t) {
        const TopProbabilities& row = top_[static_cast<size_t>(t)];
        double kept_e = 0.0, kept_b = 0.0;
        for (size_t i = 0; i < row.ids.size(); ++i) {
            const float bv = b[static_cast<size_t>(row.ids[i])];
            kept_e += row.probs[i] * bv;
            kept_b += bv;
        }
        e[static_cast<size_t>(t)] = kept_e + tail_share(row) * (b_total - kept_b);
    }
    std::vector<double> kl(scales.size(), 0.0);
    std::vector<float> scaled(static_cast<size_t>(V_)), q(static_cast<size_t>(V_));
    for (size_t j = 0; j < scales.size(); ++j) {
        const double a = scales[j];
        for (int64_t v = 0; v < V_; ++v) scaled[static_cast<size_t>(v)] = static_cast<float>(a) * b[static_cast<size_t>(v)];
        const double lse = softmax(scaled.data(), V_, q.data());
        double sum = 0.0;
        for (int t = 0; t < n_; ++t) {
            double kept = 0.0;
            const double s = bounded_normaliser(top_[static_cast<size_t>(t)], q.data(), kept);
            sum += std::log(s) + lse - a * e[static_cast<size_t>(t)];
        }
        sum /= static_cast<double>(n_);
        kl[j] = std::isnan(sum) ? std::numeric_limits<double>::infinity() : std::max(0.0, sum);
    }
    return kl;
}

SlotProblem::RecomputeChunk SlotProblem::build_recompute_chunk(GraphBuilder& g, int c) const {
    RecomputeChunk chunk;
    chunk.states = g.input(GGML_TYPE_F32, d_, c);
    ggml_tensor* z = head_.rows_product(g.ctx, chunk.states);
    if (head_.has_bias()) {
        chunk.bias = g.input(GGML_TYPE_F32, V_);
        z = ggml_add(g.ctx, z, chunk.bias);
    }
    chunk.probabilities = ggml_soft_max(g.ctx, z);
    return chunk;
}

std::vector<GraphInput> SlotProblem::recompute_inputs(const RecomputeChunk& chunk, const float* states) const {
    return {{chunk.states, states}, {chunk.bias, head_.bias().data()}};
}

double SlotProblem::loss_and_gradient_recompute(const std::vector<float>& delta, std::vector<float>* grad,
                                                const InterruptCheck& interrupted) {
    const double w = 1.0 / static_cast<double>(n_);  // each loss position's weight
    std::vector<double> u(static_cast<size_t>(V_), 0.0);
    std::vector<float> part(static_cast<size_t>(V_));
    std::vector<float> rows;
    std::vector<float> weights;
    double loss = 0.0;
    for (int r0 = 0; r0 < n_; r0 += recompute_rows_) {
        const int c = std::min(recompute_rows_, n_ - r0);
        rows.assign(hidden_.begin() + static_cast<ptrdiff_t>(r0) * d_,
                    hidden_.begin() + static_cast<ptrdiff_t>(r0 + c) * d_);
        for (int i = 0; i < c; ++i) {
            for (int64_t j = 0; j < d_; ++j) rows[static_cast<size_t>(i * d_ + j)] += delta[static_cast<size_t>(j)];
        }
        GraphBuilder g(16);
        const RecomputeChunk chunk = build_recompute_chunk(g, c);
        ggml_tensor* p = chunk.probabilities;
        g.output(p);
        ColumnSplitProduct prod = build_column_split_product(g, p, head_.column_slabs());
        weights.assign(static_cast<size_t>(c), static_cast<float>(w));
        std::vector<GraphInput> inputs = recompute_inputs(chunk, rows.data());
        const std::vector<GraphInput> x = column_split_inputs(prod, weights.data());
        inputs.insert(inputs.end(), x.begin(), x.end());
        {
            ScopedTimer timer(profile_.forward);
            head_.backend().run(g, "SLOT recompute step", inputs, column_split_outputs(prod, part.data()));
        }
        for (int64_t v = 0; v < V_; ++v) u[static_cast<size_t>(v)] += part[static_cast<size_t>(v)];
        for (int i = 0; i < c; ++i) {
            const int t = r0 + i;
            float prob = 0.0f;
            ggml_backend_tensor_get(p, &prob, p->nb[1] * static_cast<size_t>(i) + sizeof(float) * static_cast<size_t>(targets_[t]),
                                    sizeof(float));
            double logp;
            if (prob > kTinyProbability) {
                logp = std::log(static_cast<double>(prob));
            } else {
                std::vector<float> zrow(static_cast<size_t>(V_));
                head_.logits(rows.data() + static_cast<size_t>(i) * d_, 1, zrow.data());
                logp = target_logprob_from_logits(zrow.data(), targets_[t]);
            }
            loss -= w * logp;
        }
        if (interrupted && r0 + c < n_ && interrupted()) throw Interrupted();
    }
    if (grad == nullptr) return loss;
    std::vector<float> gvec(static_cast<size_t>(V_));
    for (int64_t v = 0; v < V_; ++v) gvec[static_cast<size_t>(v)] = static_cast<float>(u[static_cast<size_t>(v)]);
    for (int t = 0; t < n_; ++t) gvec[static_cast<size_t>(targets_[t])] -= static_cast<float>(w);
    ScopedTimer timer(profile_.backward);
    head_.project_transposed(gvec.data(), grad->data());
    return loss;
}

double SlotProblem::loss_and_gradient(const std::vector<float>& delta, std::vector<float>& grad,
                                     const InterruptCheck& interrupted) {
    if (static_cast<int64_t>(delta.size()) != d_) throw std::invalid_argument("delta has the wrong length");
    if (n_ == 0) throw std::invalid_argument("the prompt needs at least two tokens for a SLOT loss");
    grad.assign(static_cast<size_t>(d_), 0.0f);
    return evaluate(delta, &grad, interrupted);
}

double SlotProblem::evaluate(const std::vector<float>& delta, std::vector<float>* grad,
                             const InterruptCheck& interrupted) {
    if (bounded_) return loss_and_gradient_bounded(delta, grad);
    return cached_ ? loss_and_gradient_cached(delta, grad) : loss_and_gradient_recompute(delta, grad, interrupted);
}

SlotOutcome SlotProblem::optimise(const SlotConfig& config, const InterruptCheck& interrupted) {
    // The config was checked with its request (validate_request).
    SlotOutcome out;
    out.delta.assign(static_cast<size_t>(d_), 0.0f);
    out.path = !cached_ ? "recompute" : bounded_ ? "bounded" : cache_type_ == GGML_TYPE_BF16 ? "cached_bf16" : "cached";
    if (bounded_ && n_ > 0) {
        out.cache_mean_k = static_cast<double>(kept_entries()) / static_cast<double>(n_);
    }
    out.cache_bytes = bytes();
    out.lr = config.lr;
    if (config.steps == 0) {
        out.stop_reason = "no steps requested";
        return out;
    }
    if (n_ == 0) {
        out.stop_reason = rows_ == 0 ? "no loss positions (the prompt has one token)"
                                     : "no loss positions (the loss mask selects none)";
        return out;
    }
    profile_ = StepProfile{};
    const auto started = std::chrono::steady_clock::now();
    double lr = config.lr;
    if (config.auto_lr) {
        lr = calibrate(config, out, interrupted);
        out.lr = lr;
    }
    if (lr > 0.0) {
        out.stop_reason = "completed";
        adam(config, lr, config.steps, interrupted, out);
    } else {
        out.stop_reason = out.calibration_lrs.empty()
                              ? "auto: the reference run left delta at 0 (a non-finite loss or gradient); delta = 0"
                              : "auto: the KL of the smallest step measured is not finite; delta = 0";
    }
    out.cache_bytes = bytes();
    profile_.host = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count() -
                    profile_.forward - profile_.cache - profile_.backward;
    out.profile = profile_;
    return out;
}

void SlotProblem::adam(const SlotConfig& config, double lr, int steps, const InterruptCheck& interrupted,
                       SlotOutcome& out) {
    std::vector<float> delta(static_cast<size_t>(d_), 0.0f), grad(static_cast<size_t>(d_));
    std::vector<double> m(static_cast<size_t>(d_), 0.0), v(static_cast<size_t>(d_), 0.0);
    out.losses.clear();
    out.steps_done = 0;
    for (int step = 1; step <= steps; ++step) {
        if (interrupted && interrupted()) throw Interrupted();
        const double loss = loss_and_gradient(delta, grad, interrupted);
        if (!std::isfinite(loss) || !all_finite(grad)) {
            out.stop_reason = "non-finite loss or gradient at step " + std::to_string(step) +
                              "; kept the last finite delta";
            break;
        }
        out.losses.push_back(loss);
        out.loss_bound = std::max(out.loss_bound, last_bound_);
        // AdamW with decoupled weight decay, as torch.optim.AdamW.
        const double bc1 = 1.0 - std::pow(config.beta1, step);
        const double bc2 = 1.0 - std::pow(config.beta2, step);
        std::vector<float> next(delta);
        for (int64_t i = 0; i < d_; ++i) {
            const size_t k = static_cast<size_t>(i);
            const double gi = grad[k];
            double p = next[k] * (1.0 - lr * config.weight_decay);
            m[k] = config.beta1 * m[k] + (1.0 - config.beta1) * gi;
            v[k] = config.beta2 * v[k] + (1.0 - config.beta2) * gi * gi;
            const double denom = std::sqrt(v[k]) / std::sqrt(bc2) + config.eps;
            p -= (lr / bc1) * m[k] / denom;
            next[k] = static_cast<float>(p);
        }
        if (!all_finite(next)) {
            out.losses.pop_back();  // losses[i] belongs to completed step i+1 only
            out.stop_reason = "non-finite delta after step " + std::to_string(step) + "; kept the last finite delta";
            break;
        }
        delta.swap(next);
        out.steps_done = step;
    }
    out.delta = delta;
}

std::vector<double> SlotProblem::scaled_kl(const std::vector<float>& delta, const std::vector<double>& scales,
                                           const InterruptCheck& interrupted) {
    if (static_cast<int64_t>(delta.size()) != d_) throw std::invalid_argument("delta has the wrong length");
    // p_t(a*delta) = p0_t * exp(a*b) / Z_t with b = W*delta, so
    //   KL(p0_t || p_t(a*delta)) = log Z_t - a * E_p0t[b],  log Z_t = lse(a*b) + log S_t(a),
    // S_t(a) = sum_v p0_t(v) q_a(v), q_a = softmax(a*b): one product of the
    // prompt's P0 with the columns q_a (one per scale) and b.
    const int64_t k = static_cast<int64_t>(scales.size());
    std::vector<float> b(static_cast<size_t>(V_)), scaled(static_cast<size_t>(V_));
    head_.project(delta.data(), b.data());
    if (bounded_) return scaled_kl_bounded(b, scales);
    std::vector<float> columns(static_cast<size_t>((k + 1) * V_));
    std::vector<double> lse(static_cast<size_t>(k));
    for (int64_t j = 0; j < k; ++j) {
        const float a = static_cast<float>(scales[static_cast<size_t>(j)]);
        for (int64_t v = 0; v < V_; ++v) scaled[static_cast<size_t>(v)] = a * b[static_cast<size_t>(v)];
        lse[static_cast<size_t>(j)] = softmax(scaled.data(), V_, columns.data() + j * V_);
    }
    std::copy(b.begin(), b.end(), columns.begin() + k * V_);

    std::vector<float> se(static_cast<size_t>(n_ * (k + 1)));  // [n, k+1]: S_t(a_j) and E_t
    auto product = [&](GraphBuilder& g, ggml_tensor* rows, ggml_tensor* cols) {
        ggml_tensor* out = rows == p0_tensor_ ? p0_times(g.ctx, cols) : ggml_mul_mat(g.ctx, rows, cols);  // [count, k+1]
        g.output(out);
        return out;
    };
    if (cached_) {
        GraphBuilder g(8);
        ggml_tensor* cols = g.input(GGML_TYPE_F32, V_, k + 1);
        ggml_tensor* out = product(g, p0_tensor_, cols);
        std::vector<float> part(static_cast<size_t>(n_ * (k + 1)));
        head_.backend().run(g, "SLOT trust region (P0 * q)", {{cols, columns.data()}}, {{out, part.data()}});
        se.swap(part);
    } else {
        for (int r0 = 0; r0 < n_; r0 += recompute_rows_) {
            const int c = std::min(recompute_rows_, n_ - r0);
            GraphBuilder g(16);
            const RecomputeChunk chunk = build_recompute_chunk(g, c);
            ggml_tensor* cols = g.input(GGML_TYPE_F32, V_, k + 1);
            ggml_tensor* out = product(g, chunk.probabilities, cols);
            std::vector<GraphInput> inputs =
                recompute_inputs(chunk, hidden_.data() + static_cast<size_t>(r0) * static_cast<size_t>(d_));
            inputs.push_back({cols, columns.data()});
            // out is [c, k+1]: column j holds S_t(a_j) for the chunk's rows.
            std::vector<float> part(static_cast<size_t>(c * (k + 1)));
            head_.backend().run(g, "SLOT trust region (recompute)", inputs, {{out, part.data()}});
            for (int64_t j = 0; j <= k; ++j) {
                std::copy(part.begin() + j * c, part.begin() + (j + 1) * c, se.begin() + j * n_ + r0);
            }
            if (interrupted && r0 + c < n_ && interrupted()) throw Interrupted();
        }
    }
    std::vector<double> kl(static_cast<size_t>(k), 0.0);
    for (int64_t j = 0; j < k; ++j) {
        const double a = scales[static_cast<size_t>(j)];
        double sum = 0.0;
        for (int t = 0; t < n_; ++t) {
            const double s = se[static_cast<size_t>(j * n_ + t)];
            const double e = se[static_cast<size_t>(k * n_ + t)];
            sum += std::log(s) + lse[static_cast<size_t>(j)] - a * e;
        }
        sum /= static_cast<double>(n_);
        // Exactly >= 0; rounding can leave a tiny negative value at small scales.
        kl[static_cast<size_t>(j)] = std::isnan(sum) ? std::numeric_limits<double>::infinity() : std::max(0.0, sum);
    }
    return kl;
}

double SlotProblem::calibrate(const SlotConfig& config, SlotOutcome& out, const InterruptCheck& interrupted) {
    // A trust region on the change of the next-token distributions: the step
    // size is the one whose delta moves them by a mean KL(p0 || p_delta) of
    // kl_budget over the loss positions. A run at the reference step size
    // gives delta's direction; over a few Adam steps delta grows about in
    // proportion to the step size, so the reference delta times a stands for
    // the step size a * lr. KL is measured on a ladder of scales (it grows
    // about as a^2) and the budget's crossing is interpolated in log-log.
    const auto t0 = std::chrono::steady_clock::now();
    SlotOutcome reference;
    adam(config, config.lr, config.steps, interrupted, reference);
    double lr = 0.0;
    const bool moved = std::any_of(reference.delta.begin(), reference.delta.end(), [](float x) { return x != 0.0f; });
    if (reference.steps_done > 0 && moved) {
        std::vector<double> scales;
        for (int e = kAutoLowestScale; e <= kAutoHighestScale; ++e) scales.push_back(std::ldexp(1.0, e));
        const std::vector<double> kl = scaled_kl(reference.delta, scales, interrupted);
        const double budget = config.kl_budget;
        double a = scales.back();  // the budget is not reached on the ladder: its top
        for (size_t j = 0; j < scales.size(); ++j) {
            if (kl[j] <= budget) continue;
            if (j == 0) {
                a = std::isfinite(kl[0]) ? scales[0] * std::sqrt(budget / kl[0]) : 0.0;
            } else {
                const double x0 = std::log(scales[j - 1]), x1 = std::log(scales[j]);
                const double y0 = std::log(std::max(kl[j - 1], 1e-30));
                const double y1 = std::isfinite(kl[j]) ? std::log(kl[j]) : y0 + 2.0 * (x1 - x0);
                a = std::exp(x0 + (std::log(budget) - y0) * (x1 - x0) / (y1 - y0));
            }
            break;
        }
        lr = a * config.lr;
        for (size_t j = 0; j < scales.size(); ++j) {
            out.calibration_lrs.push_back(scales[j] * config.lr);
            out.calibration_kls.push_back(kl[j]);
        }
    }
    out.calibration_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return lr;
}

}  // namespace slot
