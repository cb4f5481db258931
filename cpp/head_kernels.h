// CPU kernels over the output head: the two products of a SLOT step, run as
// ggml custom ops so that they execute inside a ggml graph on ggml's thread
// pool, and the log-sum-exp of a row of logits.
#pragma once

#include <cstdint>
#include <vector>

#include "ggml.h"

namespace slot {

// W*x for W = [n_embd, n_vocab] and one vector x of n_embd floats: [n_vocab].
// For a Q8_0 head on x86 (AVX2 or AVX-512) a custom op dequantises W on the fly
// and keeps x in float32; ggml's mul_mat would round x to 8 bits per value and
// is slower for a single vector. Other types and CPUs use ggml_mul_mat.
ggml_tensor* head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int n_tasks);

// W*H for W = [n_embd, n_vocab] and n rows of H (float32 [n_embd, n]): the
// logits [n_vocab, n]. For a Q8_0 head on x86 (AVX2 or AVX-512) a custom op
// dequantises and transposes groups of rows of W and keeps H in float32, its
// lanes running over vocabulary rows: several times the speed of ggml's int8
// tiles for a prompt's rows, without rounding H to 8 bits, and each element
// one chain of multiply-adds in column order whatever n is. Other types and
// CPUs use ggml_mul_mat. With `into` (a float32 [n_vocab, n] view,
// e.g. rows of a cache) the product is written there and the node returned
// is a view of it.
ggml_tensor* head_rows_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* h, int n_tasks,
                               ggml_tensor* into = nullptr);

// Partial sums of W^T g for W = [n_embd, n_vocab] (any ggml type) and g of
// n_vocab floats: the result is [n_embd, n_parts], and W^T g is the sum of its
// columns. Each part covers a contiguous range of vocabulary rows.
ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts);

// The prompt rows of a SlotProblem's P0: `count` rows of logits in host memory
// (src, row-major, n_vocab floats each; may be dst's own float32 rows, turned
// into probabilities in place) become probabilities in `dst` (rows of a CPU
// tensor), and each row's log-probability of its target token is
// written to target_logprob (computed from the logits, so it does not
// underflow). One pass fewer over the rows than a copy and ggml_soft_max.
struct SoftmaxRowsJob {
    const float* src = nullptr;
    const int32_t* targets = nullptr;
    double* target_logprob = nullptr;
};
// dst may be float32 or bfloat16 (rounded to nearest even from float32).
ggml_tensor* softmax_rows_from_host(ggml_context* ctx, ggml_tensor* dst, SoftmaxRowsJob* job);

// The bounded cache's entry for one prompt position: its most probable tokens,
// most probable first, until the others (the tail) hold at most the job's
// tail_mass of probability or max_k tokens are kept.
struct TopProbabilities {
    std::vector<int32_t> ids;
    std::vector<float> probs;
    double tail = 0.0;  // the probability of every token not in ids
};
struct TopRowsJob {
    const float* src = nullptr;  // rows of logits, n_vocab floats each
    int64_t n_vocab = 0;
    const int32_t* targets = nullptr;
    double* target_logprob = nullptr;  // log P0 of each row's target, from the logits
    TopProbabilities* rows = nullptr;
    double tail_mass = 0.0;
    int max_k = 0;
};
// Fills job->rows[0, rows) on ggml's CPU thread pool (a node of the graph).
ggml_tensor* top_probabilities_from_host(ggml_context* ctx, int64_t rows, TopRowsJob* job);
// The same on the calling thread, for rows [first, end) (backends other than the CPU).
void top_probabilities_rows(const TopRowsJob& job, int64_t first, int64_t end);

// A SlotProblem's P0 held in bfloat16 (when float32 would not fit its memory
// budget): the products of a SLOT step read each entry back as float32 and
// keep the other operand in float32 (ggml's mul_mat would round it to bf16).
// out [rows, k] = P0 [V, rows] times cols [V, k], as ggml_mul_mat lays it out;
// sums in float32 lanes over blocks of the vocabulary, added in double.
ggml_tensor* bf16_rows_times_columns(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* cols);
// out [V] = P0^T r for r [rows] (float32): every row's entries scaled and
// added in float32.
ggml_tensor* bf16_rows_transposed_times(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* r);

// log(sum_i exp(x_i)) over n floats. The exponential is a polynomial in
// float32 lanes that the compiler vectorises (libm's exp is scalar and costs
// about 3 ns a call: 0.8 ms for a 262k vocabulary); each term is within a few
// ulp of float32, and sums of 256 terms are added in double. -inf entries
// count as zero; returns -inf if every entry is -inf and NaN if any is NaN.
double log_sum_exp(const float* x, int64_t n);
// y = softmax(x) over n floats with the same exponential; returns log(sum_i exp(x_i)).
double softmax(const float* x, int64_t n, float* y);

// out[l] = squared L2 distance from q to centroid l, for nlist centroids of
// dim floats each (rows of `centroids`): the inverted file's probe of RtdIndex.
void centroid_distances(const float* q, const float* centroids, int64_t nlist, int64_t dim, float* out);

// Which compile of these kernels runs: "avx512", "avx2" or "generic" (a
// portable x86-64 build holds all three and picks one at run time; see
// cpp/kernel_dispatch.cpp).
const char* kernel_isa();

}  // namespace slot
