// The output head W (n_vocab x n_embd), read from the GGUF file in its stored
// ggml type, and the products SLOT needs, computed as ggml graphs on a ggml
// backend: b = W*delta, W^T*g, and full logits W*H (+ bias).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend.h"
#include "gguf_meta.h"

namespace slot {

class OutputHead {
public:
    OutputHead(const ModelFileInfo& info, ComputeBackend& backend);

    int64_t n_vocab() const { return n_vocab_; }
    int64_t n_embd() const { return n_embd_; }
    ggml_type weight_type() const { return weight_->type; }
    size_t weight_bytes() const { return ggml_nbytes(weight_); }
    bool has_bias() const { return !bias_.empty(); }
    const std::vector<float>& bias() const { return bias_; }
    ComputeBackend& backend() const { return backend_; }
    ggml_tensor* weight() const { return weight_; }

    // out[v] = sum_i W[v,i] * delta[i]      (no bias: it cancels in b)
    void project(const float* delta, float* out);
    // out[i] = sum_v W[v,i] * g[v]
    void project_transposed(const float* g, float* out);
    // Z[r, v] = sum_i W[v,i] * H[r,i] + bias[v] for r < n_rows (row-major Z)
    void logits(const float* hidden, int64_t n_rows, float* out);
    // W as float32, row-major n_vocab x n_embd.
    void dequantize(float* out) const;

private:
    ComputeBackend& backend_;
    int64_t n_vocab_ = 0;
    int64_t n_embd_ = 0;
    ggml_type stored_type_ = GGML_TYPE_F32;
    StaticTensors tensors_{2};
    ggml_tensor* weight_ = nullptr;
    std::vector<float> bias_;
};

// y = A^T x for A = [ne0, rows] (rows of ne0 elements) and x of `rows`
// elements, as a ggml out_prod graph. ggml's out_prod parallelises over output
// rows only, so the work is cut into slabs.

// For many outputs and few rows (P^T r): slabs of output columns written in
// place. A must be float32. The input holds one copy of x per slab, since a
// ggml view cannot repeat data.
struct ColumnSplitProduct {
    ggml_tensor* x = nullptr;     // input: [rows * (k + 1)]
    ggml_tensor* main = nullptr;  // [slab, 1, k], contiguous = outputs [0, k*slab)
    ggml_tensor* tail = nullptr;  // [ne0 - k*slab, 1] or null
    int64_t rows = 0;
    int64_t k = 0;
};
ColumnSplitProduct build_column_split_product(GraphBuilder& g, ggml_tensor* a, int n_threads);
void set_column_split_input(const ColumnSplitProduct& p, const float* x);
void read_column_split_product(const ColumnSplitProduct& p, float* out);

}  // namespace slot
