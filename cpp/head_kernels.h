// CPU kernels for the two products of a SLOT step with the output head, run as
// ggml custom ops so that they execute inside a ggml graph on ggml's thread pool.
#pragma once

#include "ggml.h"

namespace slot {

// W*x for W = [n_embd, n_vocab] and one vector x of n_embd floats: [n_vocab].
// For a Q8_0 head on x86 (AVX2 or AVX-512) a custom op dequantises W on the fly
// and keeps x in float32; ggml's mul_mat would round x to 8 bits per value and
// is slower for a single vector. Other types and CPUs use ggml_mul_mat.
ggml_tensor* head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int n_tasks);

// Partial sums of W^T g for W = [n_embd, n_vocab] (any ggml type) and g of
// n_vocab floats: the result is [n_embd, n_parts], and W^T g is the sum of its
// columns. Each part covers a contiguous range of vocabulary rows.
ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts);

}  // namespace slot
