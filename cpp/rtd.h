// RTD, Reference Trustable Decoding: a datastore of final normed hidden
// states (keys) and the token or label that followed each (values). At a
// decode step the current hidden state h queries it: the K nearest keys by
// squared L2 distance d_i, weights w = softmax(-d / T), the reference
// distribution r(v) = sum of w_i over neighbours with value v, blended into
// the model's as p = lam * r + (1 - lam) * p_LM.
//
// Multi-head: h and the keys are split into H equal slices, each slice
// searched on its own with weights softmax(-H * d / T), and the H reference
// distributions averaged.
//
// Exact search is a matrix product on a ggml backend (keys . q for every key,
// then ||q||^2 - 2 q.k + ||k||^2) followed by a top-K selection. An inverted
// file (keys grouped by their nearest centroid) restricts the product to the
// lists of the nprobe nearest centroids.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "backend.h"
#include "sampling.h"

namespace slot {

// A query-dependent weight: lambda(q) = lam * sigmoid(bias + distance *
// nearest(q) / scale + top_mass * max_v r(v)), nearest(q) the distance to the
// nearest key (heads times the heads' mean) and scale the datastore's typical
// distance from a key to its nearest other key. Off: lambda(q) = lam.
struct RtdGate {
    bool on = false;
    double bias = 0.0;
    double distance = 0.0;
    double top_mass = 0.0;
    double scale = 1.0;
};

struct RtdParams {
    int k = 32;
    double temperature = 1.0;
    double lam = 0.5;
    int nprobe = 0;  // inverted-file lists to search; 0: exact search over every key
    RtdGate gate;
};

struct RtdNeighbours {
    std::vector<float> distances;  // [heads][k], ascending within a head
    std::vector<int64_t> ids;      // key index, or -1 where a head found fewer than k
};

class RtdIndex {
public:
    // keys: n x dim float16 (row-major); values: n int32. The memory is
    // borrowed and must outlive the index (`keepalive` holds its owner, e.g.
    // a memory-mapped file). The keys are searched where they are on the CPU
    // and copied to the device otherwise.
    RtdIndex(const uint16_t* keys, const int32_t* values, int64_t n, int64_t dim, int heads, int n_threads,
             ggml_backend_dev_t device, std::shared_ptr<void> keepalive);
    ~RtdIndex();
    RtdIndex(const RtdIndex&) = delete;
    RtdIndex& operator=(const RtdIndex&) = delete;

    int64_t size() const { return n_; }
    int64_t dim() const { return dim_; }
    int heads() const { return heads_; }
    const int32_t* values() const { return values_; }
    int32_t max_value() const { return max_value_; }
    bool has_ivf() const { return !offsets_.empty(); }
    int64_t nlist() const { return offsets_.empty() ? 0 : static_cast<int64_t>(offsets_.size()) - 1; }
    const char* backend_name() const { return backend_->name(); }

    // An inverted file over keys already grouped by list: centroids
    // (nlist x dim float32), list l holding keys [offsets[l], offsets[l+1]).
    void set_ivf(std::vector<float> centroids, std::vector<int64_t> offsets);

    // The k nearest keys of each of n_queries queries (n_queries x dim).
    std::vector<RtdNeighbours> search(const float* queries, int64_t n_queries, int k, int nprobe) const;

private:
    void key_dots(const float* queries, int64_t n_queries, const std::vector<std::pair<int64_t, int64_t>>& ranges,
                  std::vector<float>& out) const;

    const uint16_t* keys_ = nullptr;
    const int32_t* values_ = nullptr;
    int64_t n_ = 0;
    int64_t dim_ = 0;
    int heads_ = 1;
    int32_t max_value_ = 0;
    std::shared_ptr<void> keepalive_;
    std::vector<float> key_norms_;  // [n][heads]: ||k_h||^2
    std::unique_ptr<ComputeBackend> backend_;
    ggml_backend_buffer_t host_buffer_ = nullptr;  // wraps the borrowed keys (CPU)
    std::unique_ptr<StaticTensors> device_keys_;   // a copy on the device (GPU)
    ggml_context* keys_ctx_ = nullptr;
    ggml_tensor* keys_tensor_ = nullptr;           // [dim, n] float16
    std::vector<float> centroids_;
    std::vector<int64_t> offsets_;
    mutable std::mutex mutex_;  // the backend's graph allocator is not reentrant
};

// r over the values of one query's neighbours: (value, probability) pairs,
// each value once. Distances are shifted by their minimum before the
// exponential, so large distances cannot underflow every weight to zero.
std::vector<std::pair<int32_t, double>> rtd_reference(const RtdNeighbours& nb, const int32_t* values, int heads,
                                                      double temperature);

// The gate's weight for one query: lam * sigmoid(z) (see RtdGate); lam
// itself when the gate is off.
double rtd_gate_lambda(const RtdGate& gate, double lam, const RtdNeighbours& nb, int heads,
                       const std::vector<std::pair<int32_t, double>>& reference);

// logits <- log(lam * r + (1 - lam) * softmax(logits)) over n_vocab entries.
// lam = 1 leaves -inf where r is zero.
void rtd_blend(float* logits, int64_t n_vocab, const std::vector<std::pair<int32_t, double>>& reference,
               double lam);

// The blend as a logit stage of a request: needs the final hidden state.
class RtdStage : public LogitStage {
public:
    RtdStage(std::shared_ptr<const RtdIndex> index, const RtdParams& params);
    void apply(const StageInput& in, float* logits) const override;
    bool needs_hidden() const override { return true; }

private:
    std::shared_ptr<const RtdIndex> index_;
    RtdParams params_;
};

void validate(const RtdParams& params, const RtdIndex& index, int64_t n_embd, int64_t n_vocab);

}  // namespace slot
