// The output head W (n_vocab x n_embd), read from the GGUF file in its stored
// ggml type, and the products SLOT needs, computed as ggml graphs on a ggml
// backend: b = W*delta, W^T*g, and full logits W*H (+ bias).
//
// On the CPU, W*delta and W^T*g run as custom ops (head_kernels.h). Elsewhere
// (CUDA, Metal), or when asked for, they use ggml's portable ops only: W*delta
// is ggml_mul_mat, and W^T*g is ggml_mul_mat on a transposed copy of W held
// on the same backend (float16, or float32 for a float32 head), since ggml has
// no transposed product for quantised types. That copy is sized by
// transposed_copy_bytes() and freed with the head.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "backend.h"
#include "gguf_meta.h"

namespace slot {

class OutputHead {
public:
    OutputHead(const ModelFileInfo& info, ComputeBackend& backend, bool portable_ops = false);

    int64_t n_vocab() const { return n_vocab_; }
    int64_t n_embd() const { return n_embd_; }
    ggml_type weight_type() const { return weight_->type; }
    size_t weight_bytes() const { return ggml_nbytes(weight_); }
    bool has_bias() const { return !bias_.empty(); }
    const std::vector<float>& bias() const { return bias_; }
    ComputeBackend& backend() const { return backend_; }
    ggml_tensor* weight() const { return weight_; }
    bool portable_ops() const { return weight_t_ != nullptr; }
    size_t transposed_copy_bytes() const { return weight_t_ ? ggml_nbytes(weight_t_) : 0; }

    // Graph nodes: W*x as [n_vocab] for x of n_embd floats, and W^T*g as
    // partial sums [n_embd, parts] for g of n_vocab floats, which
    // read_transposed_product() adds up.
    ggml_tensor* product(ggml_context* ctx, ggml_tensor* x) const;
    // W*H as [n_vocab, n] for n rows of H (float32 [n_embd, n]), without the
    // bias; written into `into` (float32 [n_vocab, n]) when given.
    ggml_tensor* rows_product(ggml_context* ctx, ggml_tensor* h, ggml_tensor* into = nullptr) const;
    ggml_tensor* transposed_product(ggml_context* ctx, ggml_tensor* g) const;
    void read_transposed_product(ggml_tensor* partial, float* out) const;
    // Slabs for build_column_split_product: one per task on the CPU, one in all
    // for portable ops.
    int column_slabs() const;

    // out[v] = sum_i W[v,i] * delta[i]      (no bias: it cancels in b)
    void project(const float* delta, float* out);
    // out[i] = sum_v W[v,i] * g[v]
    void project_transposed(const float* g, float* out);
    // Z[r, v] = sum_i W[v,i] * H[r,i] + bias[v] for r < n_rows (row-major Z)
    void logits(const float* hidden, int64_t n_rows, float* out);
    // W as float32, row-major n_vocab x n_embd.
    void dequantize(float* out) const;

private:
    void make_transposed_copy(const uint8_t* raw);

    ComputeBackend& backend_;
    int64_t n_vocab_ = 0;
    int64_t n_embd_ = 0;
    ggml_type stored_type_ = GGML_TYPE_F32;
    StaticTensors tensors_{2};
    StaticTensors transposed_{1};
    ggml_tensor* weight_ = nullptr;
    ggml_tensor* weight_t_ = nullptr;  // [n_vocab, n_embd]: portable ops only
    std::vector<float> bias_;
};

// y = A^T x for A = [ne0, rows] (rows of ne0 elements) and x of `rows`
// elements, as a ggml out_prod graph. ggml's out_prod parallelises over output
// rows only, so the work is cut into slabs.

// For many outputs and few rows (P^T r): `slabs` slabs of output columns
// written in place (at most 4 per thread are useful on the CPU; 1 gives a
// single plain out_prod). A must be float32. The input holds one copy of x per
// slab, since a ggml view cannot repeat data.
struct ColumnSplitProduct {
    ggml_tensor* x = nullptr;     // input: [rows * (k + 1)]
    ggml_tensor* main = nullptr;  // [slab, 1, k], contiguous = outputs [0, k*slab)
    ggml_tensor* tail = nullptr;  // [ne0 - k*slab, 1] or null
    int64_t rows = 0;
    int64_t k = 0;
};
ColumnSplitProduct build_column_split_product(GraphBuilder& g, ggml_tensor* a, int slabs);
// For ComputeBackend::run: the input's copies of x, and y read into `out`.
std::vector<GraphInput> column_split_inputs(const ColumnSplitProduct& p, const float* x);
std::vector<GraphOutput> column_split_outputs(const ColumnSplitProduct& p, float* out);

}  // namespace slot
