#include "head_kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ggml-cpu.h"

namespace slot {
namespace {

float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        const float f = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24
        return sign ? -f : f;
    }
    const uint32_t bits = exponent == 31 ? (sign | 0x7f800000u | (mantissa << 13))
                                         : (sign | ((exponent + 112) << 23) | (mantissa << 13));
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// ggml's Q8_0 block: one fp16 scale and 32 signed bytes.
constexpr int64_t kQ8Block = 32;
constexpr size_t kQ8Bytes = 2 + kQ8Block;

void rows_q8_0(const uint8_t* w, size_t row_bytes, int64_t d, const float* g, int64_t v0, int64_t v1, float* acc) {
    const int64_t blocks = d / kQ8Block;
    auto scale_of = [](const uint8_t* blk) {
        uint16_t half;
        std::memcpy(&half, blk, sizeof(half));
        return half_to_float(half);
    };
    int64_t v = v0;
    // Four rows at a time: each accumulator is loaded and stored once per four rows.
    for (; v + 4 <= v1; v += 4) {
        const uint8_t* r0 = w + static_cast<size_t>(v) * row_bytes;
        const uint8_t* r1 = r0 + row_bytes;
        const uint8_t* r2 = r1 + row_bytes;
        const uint8_t* r3 = r2 + row_bytes;
        const float s0 = g[v], s1 = g[v + 1], s2 = g[v + 2], s3 = g[v + 3];
        for (int64_t b = 0; b < blocks; ++b) {
            const size_t off = static_cast<size_t>(b) * kQ8Bytes;
            const float c0 = s0 * scale_of(r0 + off), c1 = s1 * scale_of(r1 + off);
            const float c2 = s2 * scale_of(r2 + off), c3 = s3 * scale_of(r3 + off);
            const auto* q0 = reinterpret_cast<const int8_t*>(r0 + off + 2);
            const auto* q1 = reinterpret_cast<const int8_t*>(r1 + off + 2);
            const auto* q2 = reinterpret_cast<const int8_t*>(r2 + off + 2);
            const auto* q3 = reinterpret_cast<const int8_t*>(r3 + off + 2);
            float* a = acc + b * kQ8Block;
            for (int64_t j = 0; j < kQ8Block; ++j) {
                a[j] += c0 * static_cast<float>(q0[j]) + c1 * static_cast<float>(q1[j]) +
                        c2 * static_cast<float>(q2[j]) + c3 * static_cast<float>(q3[j]);
            }
        }
    }
    for (; v < v1; ++v) {
        const float s = g[v];
        const uint8_t* row = w + static_cast<size_t>(v) * row_bytes;
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t* blk = row + static_cast<size_t>(b) * kQ8Bytes;
            const float scale = s * scale_of(blk);
            const auto* q = reinterpret_cast<const int8_t*>(blk + 2);
            float* a = acc + b * kQ8Block;
            for (int64_t j = 0; j < kQ8Block; ++j) a[j] += scale * static_cast<float>(q[j]);
        }
    }
}

void rows_f32(const uint8_t* w, size_t row_bytes, int64_t d, const float* g, int64_t v0, int64_t v1, float* acc) {
    for (int64_t v = v0; v < v1; ++v) {
        const float s = g[v];
        if (s == 0.0f) continue;
        const float* row = reinterpret_cast<const float*>(w + static_cast<size_t>(v) * row_bytes);
        for (int64_t i = 0; i < d; ++i) acc[i] += s * row[i];
    }
}

void rows_generic(const ggml_tensor* wt, const float* g, int64_t v0, int64_t v1, float* acc) {
    const int64_t d = wt->ne[0];
    const size_t row_bytes = wt->nb[1];
    const auto* w = static_cast<const uint8_t*>(wt->data);
    std::vector<float> row(static_cast<size_t>(d));
    const auto* traits = ggml_get_type_traits(wt->type);
    for (int64_t v = v0; v < v1; ++v) {
        const float s = g[v];
        if (s == 0.0f) continue;
        const void* src = w + static_cast<size_t>(v) * row_bytes;
        if (wt->type == GGML_TYPE_F16) {
            ggml_cpu_fp16_to_fp32(static_cast<const ggml_fp16_t*>(src), row.data(), d);
        } else {
            traits->to_float(src, row.data(), d);
        }
        for (int64_t i = 0; i < d; ++i) acc[i] += s * row[static_cast<size_t>(i)];
    }
}

void transposed_product_op(ggml_tensor* dst, int ith, int nth, void*) {
    const ggml_tensor* w = dst->src[0];
    const ggml_tensor* g = dst->src[1];
    const int64_t d = w->ne[0], V = w->ne[1], parts = dst->ne[1];
    const auto* wdata = static_cast<const uint8_t*>(w->data);
    const auto* gdata = static_cast<const float*>(g->data);
    // Every part is done by exactly one task, whatever the number of tasks.
    for (int64_t part = ith; part < parts; part += nth) {
        float* acc = reinterpret_cast<float*>(static_cast<char*>(dst->data) + part * dst->nb[1]);
        std::fill(acc, acc + d, 0.0f);
        const int64_t v0 = V * part / parts, v1 = V * (part + 1) / parts;
        switch (w->type) {
            case GGML_TYPE_Q8_0: rows_q8_0(wdata, w->nb[1], d, gdata, v0, v1, acc); break;
            case GGML_TYPE_F32: rows_f32(wdata, w->nb[1], d, gdata, v0, v1, acc); break;
            default: rows_generic(w, gdata, v0, v1, acc); break;
        }
    }
}

}  // namespace

ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts) {
    GGML_ASSERT(g->type == GGML_TYPE_F32 && ggml_is_contiguous(g) && ggml_nelements(g) == w->ne[1]);
    GGML_ASSERT(w->type != GGML_TYPE_Q8_0 ||
                (ggml_blck_size(GGML_TYPE_Q8_0) == kQ8Block && ggml_type_size(GGML_TYPE_Q8_0) == kQ8Bytes));
    ggml_tensor* args[] = {w, g};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[0], n_parts, 1, 1, args, 2, transposed_product_op,
                          n_parts, nullptr);
}

}  // namespace slot
