#include "rtd.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>

#include "errors.h"
#include "head_kernels.h"

namespace slot {

namespace {

// The k smallest (distance, id) pairs, ascending.
class TopK {
public:
    explicit TopK(int k) : k_(static_cast<size_t>(k)) {}
    void push(float d, int64_t id) {
        if (heap_.size() < k_) {
            heap_.emplace(d, id);
        } else if (d < heap_.top().first || (d == heap_.top().first && id < heap_.top().second)) {
            heap_.pop();
            heap_.emplace(d, id);
        }
    }
    void write(float* dist, int64_t* ids) {
        const size_t n = heap_.size();
        for (size_t i = k_; i > n; --i) {
            dist[i - 1] = std::numeric_limits<float>::infinity();
            ids[i - 1] = -1;
        }
        for (size_t i = n; i > 0; --i) {
            dist[i - 1] = heap_.top().first;
            ids[i - 1] = heap_.top().second;
            heap_.pop();
        }
    }

private:
    size_t k_;
    std::priority_queue<std::pair<float, int64_t>> heap_;  // max-heap: the worst kept on top
};

}  // namespace

RtdIndex::RtdIndex(const uint16_t* keys, const int32_t* values, int64_t n, int64_t dim, int heads, int n_threads,
                   ggml_backend_dev_t device, std::shared_ptr<void> keepalive)
    : keys_(keys), values_(values), n_(n), dim_(dim), heads_(heads), keepalive_(std::move(keepalive)) {
    if (n <= 0) throw std::invalid_argument("the datastore is empty");
    if (dim <= 0) throw std::invalid_argument("the key dimension must be positive");
    if (heads < 1 || dim % heads != 0) {
        throw std::invalid_argument("heads must divide the key dimension (" + std::to_string(dim) + ")");
    }
    if (keys == nullptr || values == nullptr) throw std::invalid_argument("no keys or values");
    for (int64_t i = 0; i < n; ++i) {
        if (values[i] < 0) throw std::invalid_argument("the datastore holds a negative value (token id)");
        max_value_ = std::max(max_value_, values[i]);
    }
    const int64_t dh = dim / heads;
    key_norms_.assign(static_cast<size_t>(n * heads), 0.0f);
    std::vector<float> row(static_cast<size_t>(dim));
    for (int64_t i = 0; i < n; ++i) {
        ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t*>(keys + i * dim), row.data(), dim);
        for (int h = 0; h < heads; ++h) {
            double s = 0.0;
            for (int64_t j = h * dh; j < (h + 1) * dh; ++j) s += static_cast<double>(row[j]) * row[j];
            key_norms_[static_cast<size_t>(i * heads + h)] = static_cast<float>(s);
        }
    }

    backend_ = std::make_unique<ComputeBackend>(n_threads, device);
    const size_t bytes = static_cast<size_t>(n) * static_cast<size_t>(dim) * sizeof(uint16_t);
    const bool aligned = reinterpret_cast<uintptr_t>(keys) % 64 == 0;
    if (backend_->is_cpu() && aligned) {
        ggml_init_params p{};
        p.mem_size = ggml_tensor_overhead() * 2;
        p.no_alloc = true;
        keys_ctx_ = ggml_init(p);
        if (keys_ctx_ == nullptr) throw Error("ggml_init failed");
        keys_tensor_ = ggml_new_tensor_2d(keys_ctx_, GGML_TYPE_F16, dim, n);
        host_buffer_ = ggml_backend_dev_buffer_from_host_ptr(backend_->device(), const_cast<uint16_t*>(keys), bytes, bytes);
        if (host_buffer_ == nullptr) throw Error("could not wrap the datastore's keys in a ggml buffer");
        if (ggml_backend_tensor_alloc(host_buffer_, keys_tensor_, const_cast<uint16_t*>(keys)) != GGML_STATUS_SUCCESS) {
            throw Error("could not place the datastore's keys in a ggml tensor");
        }
    } else {
        // A device copy, or an aligned host copy of keys that are not.
        device_keys_ = std::make_unique<StaticTensors>(1);
        keys_tensor_ = ggml_new_tensor_2d(device_keys_->ctx, GGML_TYPE_F16, dim, n);
        backend_->allocate(*device_keys_, "the datastore's keys");
        ggml_backend_tensor_set(keys_tensor_, keys, 0, bytes);
    }
}

RtdIndex::~RtdIndex() {
    device_keys_.reset();
    if (keys_ctx_) ggml_free(keys_ctx_);
    if (host_buffer_) ggml_backend_buffer_free(host_buffer_);
}

void RtdIndex::set_ivf(std::vector<float> centroids, std::vector<int64_t> offsets) {
    if (heads_ != 1) throw std::invalid_argument("an inverted-file index needs heads=1 (multi-head search is exact)");
    if (offsets.size() < 2) throw std::invalid_argument("an inverted file needs at least one list");
    const size_t nlist = offsets.size() - 1;
    if (centroids.size() != nlist * static_cast<size_t>(dim_)) {
        throw std::invalid_argument("the centroids do not match the lists and the key dimension");
    }
    if (offsets.front() != 0 || offsets.back() != n_) {
        throw std::invalid_argument("the inverted file's lists must cover every key");
    }
    for (size_t l = 0; l < nlist; ++l) {
        if (offsets[l + 1] < offsets[l]) throw std::invalid_argument("the inverted file's list offsets decrease");
    }
    for (float c : centroids) {
        if (!std::isfinite(c)) throw std::invalid_argument("the inverted file's centroids are not finite");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    centroids_ = std::move(centroids);
    offsets_ = std::move(offsets);
}

// out[h][r][q][i] = <key (ranges[r].first + i) slice h, query q slice h>:
// every head and key range from one graph (a graph per range costs more than
// its product).
void RtdIndex::key_dots(const float* queries, int64_t n_queries, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                        std::vector<float>& out) const {
    const int64_t dh = dim_ / heads_;
    GraphBuilder g(static_cast<size_t>(heads_) * (2 * ranges.size() + 1) + 4);
    ggml_tensor* q = g.input(GGML_TYPE_F32, dim_, n_queries);
    std::vector<ggml_tensor*> prods;
    size_t total = 0;
    for (int h = 0; h < heads_; ++h) {
        ggml_tensor* qv = heads_ == 1 ? q : ggml_view_2d(g.ctx, q, dh, n_queries, q->nb[1], static_cast<size_t>(h * dh) * sizeof(float));
        for (const auto& [first, end] : ranges) {
            const size_t offset = static_cast<size_t>(first) * keys_tensor_->nb[1] + static_cast<size_t>(h * dh) * sizeof(uint16_t);
            ggml_tensor* kv = ggml_view_2d(g.ctx, keys_tensor_, dh, end - first, keys_tensor_->nb[1], offset);
            ggml_tensor* prod = ggml_mul_mat(g.ctx, kv, qv);  // [end - first, n_queries]
            g.output(prod);
            prods.push_back(prod);
            total += static_cast<size_t>(ggml_nelements(prod));
        }
    }
    out.resize(total);
    std::vector<GraphOutput> outs;
    size_t at = 0;
    for (ggml_tensor* prod : prods) {
        outs.push_back({prod, out.data() + at});
        at += static_cast<size_t>(ggml_nelements(prod));
    }
    backend_->run(g, "the datastore search", {{q, queries, 0, static_cast<size_t>(n_queries * dim_) * sizeof(float)}},
                  outs);
}

std::vector<RtdNeighbours> RtdIndex::search(const float* queries, int64_t n_queries, int k, int nprobe) const {
    if (n_queries <= 0) return {};
    if (k < 1) throw std::invalid_argument("k must be >= 1");
    if (k > n_) {
        throw std::invalid_argument("k (" + std::to_string(k) + ") is larger than the datastore (" +
                                    std::to_string(n_) + " keys)");
    }
    for (int64_t i = 0; i < n_queries * dim_; ++i) {
        if (!std::isfinite(queries[i])) throw std::invalid_argument("the query holds non-finite values");
    }
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t dh = dim_ / heads_;
    std::vector<RtdNeighbours> result(static_cast<size_t>(n_queries));
    std::vector<float> qnorm(static_cast<size_t>(n_queries * heads_));
    for (int64_t b = 0; b < n_queries; ++b) {
        for (int h = 0; h < heads_; ++h) {
            double s = 0.0;
            for (int64_t j = h * dh; j < (h + 1) * dh; ++j) s += static_cast<double>(queries[b * dim_ + j]) * queries[b * dim_ + j];
            qnorm[static_cast<size_t>(b * heads_ + h)] = static_cast<float>(s);
        }
        result[static_cast<size_t>(b)].distances.resize(static_cast<size_t>(heads_ * k));
        result[static_cast<size_t>(b)].ids.resize(static_cast<size_t>(heads_ * k));
    }
    std::vector<float> dots;
    const bool approximate = nprobe > 0 && !offsets_.empty();
    if (!approximate) {
        key_dots(queries, n_queries, {{0, n_}}, dots);
        for (int64_t b = 0; b < n_queries; ++b) {
            for (int h = 0; h < heads_; ++h) {
                const float* d = dots.data() + (static_cast<size_t>(h) * static_cast<size_t>(n_queries) + static_cast<size_t>(b)) * static_cast<size_t>(n_);
                const float qn = qnorm[static_cast<size_t>(b * heads_ + h)];
                TopK top(k);
                for (int64_t i = 0; i < n_; ++i) {
                    const float dist = std::max(0.0f, qn - 2.0f * d[i] + key_norms_[static_cast<size_t>(i * heads_ + h)]);
                    top.push(dist, i);
                }
                RtdNeighbours& nb = result[static_cast<size_t>(b)];
                top.write(nb.distances.data() + h * k, nb.ids.data() + h * k);
            }
        }
        return result;
    }

    // Inverted file: the nprobe nearest centroids' lists, one query at a time.
    const int64_t nlist = static_cast<int64_t>(offsets_.size()) - 1;
    const int64_t probes = std::min<int64_t>(nprobe, nlist);
    for (int64_t b = 0; b < n_queries; ++b) {
        const float* q = queries + b * dim_;
        std::vector<float> distances(static_cast<size_t>(nlist));
        centroid_distances(q, centroids_.data(), nlist, dim_, distances.data());
        std::vector<std::pair<float, int64_t>> cd(static_cast<size_t>(nlist));
        for (int64_t l = 0; l < nlist; ++l) cd[static_cast<size_t>(l)] = {distances[static_cast<size_t>(l)], l};
        std::partial_sort(cd.begin(), cd.begin() + probes, cd.end());
        // Probed lists in key order, so that neighbouring lists form one range.
        std::vector<std::pair<int64_t, int64_t>> ranges;
        std::vector<int64_t> lists;
        for (int64_t p = 0; p < probes; ++p) lists.push_back(cd[static_cast<size_t>(p)].second);
        std::sort(lists.begin(), lists.end());
        for (int64_t l : lists) {
            const int64_t s = offsets_[static_cast<size_t>(l)], e = offsets_[static_cast<size_t>(l) + 1];
            if (e == s) continue;
            if (!ranges.empty() && ranges.back().second == s) ranges.back().second = e;
            else ranges.emplace_back(s, e);
        }
        TopK top(k);
        const float qn = qnorm[static_cast<size_t>(b)];
        key_dots(q, 1, ranges, dots);
        const float* d = dots.data();
        for (const auto& [s, e] : ranges) {
            for (int64_t i = s; i < e; ++i, ++d) {
                const float dist = std::max(0.0f, qn - 2.0f * *d + key_norms_[static_cast<size_t>(i)]);
                top.push(dist, i);
            }
        }
        RtdNeighbours& nb = result[static_cast<size_t>(b)];
        top.write(nb.distances.data(), nb.ids.data());
    }
    return result;
}

std::vector<std::pair<int32_t, double>> rtd_reference(const RtdNeighbours& nb, const int32_t* values, int heads,
                                                      double temperature) {
    const size_t k = nb.ids.size() / static_cast<size_t>(heads);
    std::unordered_map<int32_t, double> mass;
    for (int h = 0; h < heads; ++h) {
        const float* d = nb.distances.data() + static_cast<size_t>(h) * k;
        const int64_t* ids = nb.ids.data() + static_cast<size_t>(h) * k;
        double dmin = std::numeric_limits<double>::infinity();
        for (size_t i = 0; i < k; ++i) {
            if (ids[i] >= 0) dmin = std::min(dmin, static_cast<double>(d[i]));
        }
        if (!std::isfinite(dmin)) continue;
        const double scale = static_cast<double>(heads) / temperature;
        std::vector<double> w(k, 0.0);
        double total = 0.0;
        for (size_t i = 0; i < k; ++i) {
            if (ids[i] < 0) continue;
            w[i] = std::exp(-(static_cast<double>(d[i]) - dmin) * scale);
            total += w[i];
        }
        for (size_t i = 0; i < k; ++i) {
            if (ids[i] >= 0) mass[values[ids[i]]] += w[i] / total / heads;
        }
    }
    std::vector<std::pair<int32_t, double>> out(mass.begin(), mass.end());
    std::sort(out.begin(), out.end());
    return out;
}

double rtd_gate_lambda(const RtdGate& gate, double lam, const RtdNeighbours& nb, int heads,
                       const std::vector<std::pair<int32_t, double>>& reference) {
    if (!gate.on) return lam;
    const size_t k = nb.ids.size() / static_cast<size_t>(heads);
    double nearest = 0.0;
    for (int h = 0; h < heads; ++h) {
        // Ascending within a head: the first entry is the nearest key (k <= n, so it exists).
        nearest += static_cast<double>(nb.distances[static_cast<size_t>(h) * k]);
    }
    double top = 0.0;
    for (const auto& [v, p] : reference) top = std::max(top, p);
    const double z = gate.bias + gate.distance * nearest / gate.scale + gate.top_mass * top;
    return lam / (1.0 + std::exp(-std::clamp(z, -700.0, 700.0)));
}

void rtd_blend(float* logits, int64_t n_vocab, const std::vector<std::pair<int32_t, double>>& reference,
               double lam) {
    if (lam <= 0.0) return;
    const double log_z = log_sum_exp(logits, n_vocab);
    // Every token: log((1 - lam) p_LM); then the neighbours' values add lam * r.
    std::vector<float> before;
    before.reserve(reference.size());
    for (const auto& [v, r] : reference) before.push_back(logits[v]);
    if (lam >= 1.0) {
        for (int64_t v = 0; v < n_vocab; ++v) logits[v] = -std::numeric_limits<float>::infinity();
    } else {
        const float shift = static_cast<float>(std::log1p(-lam) - log_z);
        for (int64_t v = 0; v < n_vocab; ++v) logits[v] += shift;
    }
    for (size_t i = 0; i < reference.size(); ++i) {
        const auto [v, r] = reference[i];
        const double p_lm = std::exp(static_cast<double>(before[i]) - log_z);
        logits[v] = static_cast<float>(std::log(lam * r + (1.0 - lam) * p_lm));
    }
}

RtdStage::RtdStage(std::shared_ptr<const RtdIndex> index, const RtdParams& params)
    : index_(std::move(index)), params_(params) {}

void RtdStage::apply(const StageInput& in, float* logits) const {
    if (params_.lam <= 0.0) return;
    if (in.hidden == nullptr) throw Error("internal error: the retrieval stage got no hidden state");
    const auto nb = index_->search(in.hidden, 1, params_.k, params_.nprobe);
    const auto ref = rtd_reference(nb.front(), index_->values(), index_->heads(), params_.temperature);
    rtd_blend(logits, in.n_vocab, ref, rtd_gate_lambda(params_.gate, params_.lam, nb.front(), index_->heads(), ref));
}

void validate(const RtdParams& params, const RtdIndex& index, int64_t n_embd, int64_t n_vocab) {
    if (index.dim() != n_embd) {
        throw std::invalid_argument("the datastore's keys have " + std::to_string(index.dim()) +
                                    " dimensions but the model's hidden size is " + std::to_string(n_embd));
    }
    if (params.k < 1 || params.k > index.size()) {
        throw std::invalid_argument("rtd k must be in [1, " + std::to_string(index.size()) + "] (the datastore's size)");
    }
    if (!(params.temperature > 0.0) || !std::isfinite(params.temperature)) {
        throw std::invalid_argument("rtd temperature must be > 0");
    }
    if (!(params.lam >= 0.0 && params.lam <= 1.0)) throw std::invalid_argument("rtd lambda must be in [0, 1]");
    if (params.nprobe < 0) throw std::invalid_argument("rtd nprobe must be >= 0");
    if (params.gate.on) {
        const RtdGate& g = params.gate;
        if (!std::isfinite(g.bias) || !std::isfinite(g.distance) || !std::isfinite(g.top_mass)) {
            throw std::invalid_argument("rtd gate weights must be finite");
        }
        if (!(g.scale > 0.0) || !std::isfinite(g.scale)) throw std::invalid_argument("rtd gate scale must be > 0");
    }
    if (index.max_value() >= n_vocab) {
        throw std::invalid_argument("the datastore holds token id " + std::to_string(index.max_value()) +
                                    ", outside the model's vocabulary of " + std::to_string(n_vocab));
    }
}

}  // namespace slot
