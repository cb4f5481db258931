// CPU kernels for products with the transposed output head, run as ggml
// custom ops so that they execute inside a ggml graph on ggml's thread pool.
#pragma once

#include "ggml.h"

namespace slot {

// Partial sums of W^T g for W = [n_embd, n_vocab] (any ggml type) and g of
// n_vocab floats: the result is [n_embd, n_parts], and W^T g is the sum of its
// columns. Each part covers a contiguous range of vocabulary rows.
ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts);

}  // namespace slot
