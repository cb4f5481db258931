// Portable x86-64 build: cpp/head_kernels.cpp is compiled three times, for
// x86-64 (SSE2), for AVX2+FMA+F16C+BMI2 and for AVX-512 (F, CD, VL, DQ, BW),
// into the namespaces slot::k_baseline, slot::k_avx2 and slot::k_avx512.
// The functions of head_kernels.h call the one that suits both this CPU and
// the ggml CPU variant loaded (a variant forced down to x64 brings the
// kernels down with it). SLOT_CPP_KERNELS=generic|avx2|avx512 lowers the
// choice (never above what the CPU has).
#include <cstdlib>
#include <string>

#include "cpu_variant.h"
#include "head_kernels.h"

namespace slot {

#define SLOT_KERNEL_DECLARATIONS                                                                               \
    ggml_tensor* head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int n_tasks);                 \
    ggml_tensor* head_rows_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* h, int n_tasks,             \
                                   ggml_tensor* into);                                                         \
    ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts);      \
    ggml_tensor* softmax_rows_from_host(ggml_context* ctx, ggml_tensor* dst, SoftmaxRowsJob* job);             \
    ggml_tensor* top_probabilities_from_host(ggml_context* ctx, int64_t rows, TopRowsJob* job);                \
    void top_probabilities_rows(const TopRowsJob& job, int64_t first, int64_t end);                            \
    ggml_tensor* bf16_rows_times_columns(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* cols);               \
    ggml_tensor* bf16_rows_transposed_times(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* r);               \
    double log_sum_exp(const float* x, int64_t n);                                                             \
    double softmax(const float* x, int64_t n, float* y);                                                       \
    void centroid_distances(const float* q, const float* centroids, int64_t nlist, int64_t dim, float* out);  \
    const char* kernel_isa();

namespace k_baseline {
SLOT_KERNEL_DECLARATIONS
}
namespace k_avx2 {
SLOT_KERNEL_DECLARATIONS
}
namespace k_avx512 {
SLOT_KERNEL_DECLARATIONS
}

namespace {

enum Level { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

bool has(const std::vector<std::string>& set, const char* name) {
    for (const std::string& s : set) {
        if (s == name) return true;
    }
    return false;
}

Level choose_level() {
    const std::vector<std::string> cpu = cpu_features();
    const bool cpu_avx2 = has(cpu, "avx") && has(cpu, "avx2") && has(cpu, "fma") && has(cpu, "f16c") && has(cpu, "bmi2");
    const bool cpu_avx512 = cpu_avx2 && has(cpu, "avx512f") && has(cpu, "avx512cd") && has(cpu, "avx512vl") &&
                            has(cpu, "avx512dq") && has(cpu, "avx512bw");
    // What the loaded ggml variant was compiled for.
    bool v_avx2 = false, v_fma = false, v_f16c = false, v_avx512 = false;
    try {
        for (const auto& [name, value] : cpu_backend_features()) {
            if (name == "AVX2") v_avx2 = true;
            if (name == "FMA") v_fma = true;
            if (name == "F16C") v_f16c = true;
            if (name == "AVX512") v_avx512 = true;
        }
    } catch (const std::exception&) {
        // No CPU backend: nothing will run the kernels; stay at the baseline.
    }
    Level level = kBaseline;
    if (cpu_avx2 && v_avx2 && v_fma && v_f16c) level = kAvx2;
    if (level == kAvx2 && cpu_avx512 && v_avx512) level = kAvx512;
    if (const char* env = std::getenv("SLOT_CPP_KERNELS"); env != nullptr) {
        const std::string want = env;
        if (want == "generic") level = kBaseline;
        else if (want == "avx2" && level > kAvx2) level = kAvx2;
    }
    return level;
}

Level level() {
    static const Level chosen = choose_level();
    return chosen;
}

}  // namespace

#define SLOT_DISPATCH(call)                  \
    switch (level()) {                       \
        case kAvx512: return k_avx512::call; \
        case kAvx2: return k_avx2::call;     \
        default: return k_baseline::call;    \
    }

ggml_tensor* head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int n_tasks) {
    SLOT_DISPATCH(head_product(ctx, w, x, n_tasks))
}
ggml_tensor* head_rows_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* h, int n_tasks, ggml_tensor* into) {
    SLOT_DISPATCH(head_rows_product(ctx, w, h, n_tasks, into))
}
ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts) {
    SLOT_DISPATCH(transposed_head_product(ctx, w, g, n_parts))
}
ggml_tensor* softmax_rows_from_host(ggml_context* ctx, ggml_tensor* dst, SoftmaxRowsJob* job) {
    SLOT_DISPATCH(softmax_rows_from_host(ctx, dst, job))
}
ggml_tensor* top_probabilities_from_host(ggml_context* ctx, int64_t rows, TopRowsJob* job) {
    SLOT_DISPATCH(top_probabilities_from_host(ctx, rows, job))
}
void top_probabilities_rows(const TopRowsJob& job, int64_t first, int64_t end) {
    SLOT_DISPATCH(top_probabilities_rows(job, first, end))
}
ggml_tensor* bf16_rows_times_columns(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* cols) {
    SLOT_DISPATCH(bf16_rows_times_columns(ctx, p0, cols))
}
ggml_tensor* bf16_rows_transposed_times(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* r) {
    SLOT_DISPATCH(bf16_rows_transposed_times(ctx, p0, r))
}
double log_sum_exp(const float* x, int64_t n) { SLOT_DISPATCH(log_sum_exp(x, n)) }
double softmax(const float* x, int64_t n, float* y) { SLOT_DISPATCH(softmax(x, n, y)) }
void centroid_distances(const float* q, const float* centroids, int64_t nlist, int64_t dim, float* out) {
    SLOT_DISPATCH(centroid_distances(q, centroids, nlist, dim, out))
}
const char* kernel_isa() { SLOT_DISPATCH(kernel_isa()) }

}  // namespace slot
