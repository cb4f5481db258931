#include "head_kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>


#if defined(__AVX512F__) || defined(__F16C__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// In a portable x86-64 build this file is compiled once per instruction
// level, each time in its own namespace (SLOT_KERNEL_NS, e.g. k_avx2), and
// cpp/kernel_dispatch.cpp defines slot::head_product etc. to call one of them.
namespace slot {
#if defined(SLOT_KERNEL_NS)
namespace SLOT_KERNEL_NS {
#endif
namespace {

// ggml's Q8_0 block: one fp16 scale and 32 signed bytes.
constexpr int64_t kQ8Block = 32;
constexpr size_t kQ8Bytes = 2 + kQ8Block;
// Vocabulary rows per tile in W^T g: the tile's Q8_0 rows (34 bytes per 32
// columns) stay in L1 while every column block is swept over them.
constexpr int kTileRows = 32;

float half_to_float(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, sizeof(h));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
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
#endif
}

// n fp16 values as float32 (exact, like ggml's own conversions): F16C eight
// at a time where the compile has it. The head kernels do this for every row
// of a float16 head at each SLOT step, so not through ggml-base's scalar loop.
void half_row_to_float(const uint8_t* src, float* dst, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__) && (defined(__AVX2__) || defined(__AVX512F__))
    for (; i + 8 <= n; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; ++i) dst[i] = half_to_float(src + 2 * i);
}

// ---- SIMD pieces: 32 int8 of one Q8_0 block as floats, times a scale ----
#if defined(__AVX512F__)
constexpr bool kSimdProduct = true;
inline __m512 int8x16(const uint8_t* q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
// acc[0..32) += c * q[0..32)
struct Block32 {
    __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();
    void fma(float c, const uint8_t* q) {
        const __m512 s = _mm512_set1_ps(c);
        lo = _mm512_fmadd_ps(s, int8x16(q), lo);
        hi = _mm512_fmadd_ps(s, int8x16(q + 16), hi);
    }
    void add_to(const Block32& o, float* out) const {
        _mm512_storeu_ps(out, _mm512_add_ps(_mm512_loadu_ps(out), _mm512_add_ps(lo, o.lo)));
        _mm512_storeu_ps(out + 16, _mm512_add_ps(_mm512_loadu_ps(out + 16), _mm512_add_ps(hi, o.hi)));
    }
};
// One vocabulary row of W (Q8_0) dotted with x, in float32.
inline float row_dot(const uint8_t* row, const float* x, int64_t blocks) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        const uint8_t* k0 = row + static_cast<size_t>(b) * kQ8Bytes;
        const uint8_t* k1 = k0 + kQ8Bytes;
        const float* x0 = x + b * kQ8Block;
        __m512 t0 = _mm512_mul_ps(int8x16(k0 + 2), _mm512_loadu_ps(x0));
        t0 = _mm512_fmadd_ps(int8x16(k0 + 18), _mm512_loadu_ps(x0 + 16), t0);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(k0)), t0, acc0);
        __m512 t1 = _mm512_mul_ps(int8x16(k1 + 2), _mm512_loadu_ps(x0 + 32));
        t1 = _mm512_fmadd_ps(int8x16(k1 + 18), _mm512_loadu_ps(x0 + 48), t1);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(k1)), t1, acc1);
    }
    if (b < blocks) {
        const uint8_t* k0 = row + static_cast<size_t>(b) * kQ8Bytes;
        const float* x0 = x + b * kQ8Block;
        __m512 t0 = _mm512_mul_ps(int8x16(k0 + 2), _mm512_loadu_ps(x0));
        t0 = _mm512_fmadd_ps(int8x16(k0 + 18), _mm512_loadu_ps(x0 + 16), t0);
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(half_to_float(k0)), t0, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
constexpr bool kSimdProduct = true;
inline __m256 int8x8(const uint8_t* q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
struct Block32 {
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    void fma(float c, const uint8_t* q) {
        const __m256 s = _mm256_set1_ps(c);
        for (int k = 0; k < 4; ++k) a[k] = _mm256_fmadd_ps(s, int8x8(q + 8 * k), a[k]);
    }
    void add_to(const Block32& o, float* out) const {
        for (int k = 0; k < 4; ++k) {
            _mm256_storeu_ps(out + 8 * k, _mm256_add_ps(_mm256_loadu_ps(out + 8 * k), _mm256_add_ps(a[k], o.a[k])));
        }
    }
};
inline float row_dot(const uint8_t* row, const float* x, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* k = row + static_cast<size_t>(b) * kQ8Bytes;
        const float* xb = x + b * kQ8Block;
        __m256 t = _mm256_mul_ps(int8x8(k + 2), _mm256_loadu_ps(xb));
        t = _mm256_fmadd_ps(int8x8(k + 10), _mm256_loadu_ps(xb + 8), t);
        t = _mm256_fmadd_ps(int8x8(k + 18), _mm256_loadu_ps(xb + 16), t);
        t = _mm256_fmadd_ps(int8x8(k + 26), _mm256_loadu_ps(xb + 24), t);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(k)), t, acc);
    }
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}
#else
// Portable: plain loops the compiler vectorises (no reductions across lanes).
constexpr bool kSimdProduct = false;
struct Block32 {
    float a[kQ8Block] = {};
    void fma(float c, const uint8_t* q) {
        const auto* s = reinterpret_cast<const int8_t*>(q);
        for (int64_t j = 0; j < kQ8Block; ++j) a[j] += c * static_cast<float>(s[j]);
    }
    void add_to(const Block32& o, float* out) const {
        for (int64_t j = 0; j < kQ8Block; ++j) out[j] += a[j] + o.a[j];
    }
};
inline float row_dot(const uint8_t*, const float*, int64_t) { return 0.0f; }  // not used: ggml_mul_mat instead
#endif

// acc += sum over rows v in [v0, v1) of g[v] * W[v, :], for Q8_0 W. Rows are
// taken a tile at a time; within a tile each 32-column block is swept over the
// tile's rows with its accumulators in registers.
void transposed_rows_q8_0(const uint8_t* w, size_t row_bytes, int64_t d, const float* g, int64_t v0, int64_t v1,
                          float* acc) {
    const int64_t blocks = d / kQ8Block;
    std::vector<float> scale(static_cast<size_t>(blocks) * kTileRows);  // [block][row in tile]
    for (int64_t vt = v0; vt < v1; vt += kTileRows) {
        const int n = static_cast<int>(std::min<int64_t>(kTileRows, v1 - vt));
        const uint8_t* tile = w + static_cast<size_t>(vt) * row_bytes;
        for (int i = 0; i < n; ++i) {
            const uint8_t* row = tile + static_cast<size_t>(i) * row_bytes;
            const float gi = g[vt + i];
            for (int64_t b = 0; b < blocks; ++b) {
                scale[static_cast<size_t>(b * kTileRows + i)] = gi * half_to_float(row + static_cast<size_t>(b) * kQ8Bytes);
            }
        }
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t* q = tile + static_cast<size_t>(b) * kQ8Bytes + 2;
            const float* c = scale.data() + b * kTileRows;
            Block32 even, odd;  // two independent chains hide the FMA latency
            int i = 0;
            for (; i + 2 <= n; i += 2) {
                even.fma(c[i], q + static_cast<size_t>(i) * row_bytes);
                odd.fma(c[i + 1], q + static_cast<size_t>(i + 1) * row_bytes);
            }
            if (i < n) even.fma(c[i], q + static_cast<size_t>(i) * row_bytes);
            even.add_to(odd, acc + b * kQ8Block);
        }
    }
}

void transposed_rows_f32(const uint8_t* w, size_t row_bytes, int64_t d, const float* g, int64_t v0, int64_t v1,
                         float* acc) {
    for (int64_t v = v0; v < v1; ++v) {
        const float s = g[v];
        if (s == 0.0f) continue;
        const float* row = reinterpret_cast<const float*>(w + static_cast<size_t>(v) * row_bytes);
        for (int64_t i = 0; i < d; ++i) acc[i] += s * row[i];
    }
}

void transposed_rows_generic(const ggml_tensor* wt, const float* g, int64_t v0, int64_t v1, float* acc) {
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
            half_row_to_float(static_cast<const uint8_t*>(src), row.data(), d);
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
            case GGML_TYPE_Q8_0: transposed_rows_q8_0(wdata, w->nb[1], d, gdata, v0, v1, acc); break;
            case GGML_TYPE_F32: transposed_rows_f32(wdata, w->nb[1], d, gdata, v0, v1, acc); break;
            default: transposed_rows_generic(w, gdata, v0, v1, acc); break;
        }
    }
}

void product_op(ggml_tensor* dst, int ith, int nth, void*) {
    const ggml_tensor* w = dst->src[0];
    const auto* x = static_cast<const float*>(dst->src[1]->data);
    const int64_t V = w->ne[1], blocks = w->ne[0] / kQ8Block;
    const size_t row_bytes = w->nb[1];
    const auto* wdata = static_cast<const uint8_t*>(w->data);
    auto* out = static_cast<float*>(dst->data);
    const int64_t v0 = V * ith / nth, v1 = V * (ith + 1) / nth;
    for (int64_t v = v0; v < v1; ++v) out[v] = row_dot(wdata + static_cast<size_t>(v) * row_bytes, x, blocks);
}

// ---- W*H for many rows of H: the logits of a prompt's positions ----
// Lanes run over vocabulary rows: a group of 2 * Lanes::n rows of W is
// dequantised and transposed (column k of the group is two vectors), and each
// row h of H adds h[k] * column k into its two accumulators for k = 0, 1, ...
// Every output element is thus one chain of multiply-adds in the order of the
// hidden dimension, whatever the number of rows of H or the tile it falls in,
// and no sum across lanes is needed.
#if defined(__AVX512F__)
#define SLOT_SIMD_ROWS 1
struct F32Lanes {
    static constexpr int n = 16;
    using V = __m512;
    static V zero() { return _mm512_setzero_ps(); }
    static V load(const float* p) { return _mm512_loadu_ps(p); }
    static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
    static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static V int8s(const uint8_t* q) { return int8x16(q); }
    static V halves(const uint16_t* h) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h)));
    }
    // r[i] (row i of a 16 x 16 block) becomes column i.
    static void transpose(V r[16]) {
        __m512 t[16];
        for (int i = 0; i < 16; i += 2) {
            t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 16; i += 4) {
            const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
            const __m512d c = _mm512_castps_pd(t[i + 2]), e = _mm512_castps_pd(t[i + 3]);
            r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
            r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
            r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
            r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
        }
        for (int h = 0; h < 16; h += 8) {
            for (int i = 0; i < 4; ++i) {
                t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
                t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
            }
        }
        for (int i = 0; i < 8; ++i) {
            r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
            r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
        }
    }
};
constexpr int kHTile = 12;  // 24 accumulators of the 32 registers
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SLOT_SIMD_ROWS 1
struct F32Lanes {
    static constexpr int n = 8;
    using V = __m256;
    static V zero() { return _mm256_setzero_ps(); }
    static V load(const float* p) { return _mm256_loadu_ps(p); }
    static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
    static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static V int8s(const uint8_t* q) { return int8x8(q); }
    static V halves(const uint16_t* h) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))); }
    static void transpose(V r[8]) {
        __m256 t[8], u[8];
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
            u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
            u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
            u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
        }
        for (int i = 0; i < 4; ++i) {
            r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
            r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
        }
    }
};
constexpr int kHTile = 6;  // 12 accumulators of the 16 registers
#endif

#if defined(SLOT_SIMD_ROWS)
using Lanes = F32Lanes;
constexpr int kGroup = 2 * Lanes::n;  // vocabulary rows per group: two vectors
// Columns of the group transposed at a time: 32 KiB of float32, which stays
// in L1 while every tile of H is swept over it.
constexpr int64_t kChunkBlocks = 32 * 1024 / (kGroup * kQ8Block * static_cast<int64_t>(sizeof(float)));

// Blocks [b0, b1) of the group's rows (Q8_0, `rows[i]` for row i) as columns:
// wt[(k - 32 * b0) * kGroup + i] = scale * q of row i at column k, the same
// float32 product as a row-wise dequantisation. [ahead, ahead_end) is
// prefetched along the way (nothing when ahead is null).
void transpose_group_q8_0(const uint8_t* const rows[kGroup], int64_t b0, int64_t b1, float* wt,
                          const uint8_t* ahead, const uint8_t* ahead_end) {
    constexpr int n = Lanes::n;
    // Whole cache lines, from the one that holds `ahead`, a share per block.
    const uintptr_t first_line = reinterpret_cast<uintptr_t>(ahead) & ~uintptr_t(63);
    const size_t bytes = ahead == nullptr ? 0 : static_cast<size_t>(reinterpret_cast<uintptr_t>(ahead_end) - first_line);
    const size_t share = bytes / static_cast<size_t>(2 * (b1 - b0)) + 64;
    size_t done = 0;
    for (int half = 0; half < kGroup; half += n) {
        for (int64_t b = b0; b < b1; ++b) {
            for (const size_t end = std::min(done + share, bytes); done < end; done += 64) {
                _mm_prefetch(reinterpret_cast<const char*>(first_line + done), _MM_HINT_T0);
            }
            const size_t at = static_cast<size_t>(b) * kQ8Bytes;
            uint16_t scale_bits[n];
            for (int i = 0; i < n; ++i) std::memcpy(&scale_bits[i], rows[half + i] + at, sizeof(uint16_t));
            const Lanes::V scale = Lanes::halves(scale_bits);
            for (int c = 0; c < kQ8Block; c += n) {
                Lanes::V r[n];
                for (int i = 0; i < n; ++i) r[i] = Lanes::int8s(rows[half + i] + at + 2 + c);
                Lanes::transpose(r);
                float* col = wt + ((b - b0) * kQ8Block + c) * kGroup + half;
                for (int k = 0; k < n; ++k) Lanes::store(col + k * kGroup, Lanes::mul(r[k], scale));
            }
        }
    }
}

// For NH rows of H: out[j * out_stride + i] (+)= sum over the chunk's columns k,
// in order, of column k times h[j][k]. With `more`, the sums go on from what
// out holds (the chunks before): one chain of multiply-adds per element.
template <int NH>
void group_dots(const float* wt, int64_t kc, const float* h, int64_t h_stride, float* out, int64_t out_stride,
                bool more) {
    Lanes::V lo[NH], hi[NH];
    for (int j = 0; j < NH; ++j) {
        lo[j] = more ? Lanes::load(out + j * out_stride) : Lanes::zero();
        hi[j] = more ? Lanes::load(out + j * out_stride + Lanes::n) : Lanes::zero();
    }
    for (int64_t k = 0; k < kc; ++k) {
        const Lanes::V w0 = Lanes::load(wt + k * kGroup), w1 = Lanes::load(wt + k * kGroup + Lanes::n);
        for (int j = 0; j < NH; ++j) {
            const Lanes::V hk = Lanes::broadcast(h + j * h_stride + k);
            lo[j] = Lanes::fma(w0, hk, lo[j]);
            hi[j] = Lanes::fma(w1, hk, hi[j]);
        }
    }
    for (int j = 0; j < NH; ++j) {
        Lanes::store(out + j * out_stride, lo[j]);
        Lanes::store(out + j * out_stride + Lanes::n, hi[j]);
    }
}

template <int NH>
void group_dots_upto(int nh, const float* wt, int64_t kc, const float* h, int64_t h_stride, float* out,
                     int64_t out_stride, bool more) {
    if constexpr (NH > 1) {
        if (nh < NH) return group_dots_upto<NH - 1>(nh, wt, kc, h, h_stride, out, out_stride, more);
    }
    group_dots<NH>(wt, kc, h, h_stride, out, out_stride, more);
}

void rows_product_op(ggml_tensor* dst, int ith, int nth, void*) {
    // W and H are the last two sources: after the destination itself when written in place.
    const int first = dst->src[2] != nullptr ? 1 : 0;
    const ggml_tensor* w = dst->src[first];
    const ggml_tensor* hs = dst->src[first + 1];
    const int64_t d = w->ne[0], V = w->ne[1], n = hs->ne[1];
    const int64_t blocks = d / kQ8Block;
    const size_t row_bytes = w->nb[1];
    const auto* wdata = static_cast<const uint8_t*>(w->data);
    const auto* h = static_cast<const float*>(hs->data);
    const int64_t h_stride = static_cast<int64_t>(hs->nb[1] / sizeof(float));
    auto* out = static_cast<float*>(dst->data);
    const int64_t out_stride = static_cast<int64_t>(dst->nb[1] / sizeof(float));
    std::vector<float> wt(static_cast<size_t>(kGroup * kQ8Block * kChunkBlocks));
    const std::vector<uint8_t> zero_row(row_bytes, 0);  // stands in past the last row: scale 0
    std::vector<float> part;  // a last group of fewer rows: its sums, kGroup per row of H
    const int64_t groups = (V + kGroup - 1) / kGroup;
    for (int64_t gi = groups * ith / nth; gi < groups * (ith + 1) / nth; ++gi) {
        const int64_t v0 = gi * kGroup;
        const int rows = static_cast<int>(std::min<int64_t>(kGroup, V - v0));
        const uint8_t* row[kGroup];
        for (int i = 0; i < kGroup; ++i) row[i] = i < rows ? wdata + static_cast<size_t>(v0 + i) * row_bytes : zero_row.data();
        float* o = out + v0;
        int64_t os = out_stride;
        if (rows < kGroup) {
            part.assign(static_cast<size_t>(n * kGroup), 0.0f);
            o = part.data();
            os = kGroup;
        }
        // The next group's rows (none after the last group) are prefetched a slice per chunk.
        const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(kGroup, V - v0 - kGroup));
        const uint8_t* next = next_rows > 0 ? wdata + static_cast<size_t>(v0 + kGroup) * row_bytes : nullptr;
        const size_t next_bytes = static_cast<size_t>(next_rows) * row_bytes;
        for (int64_t b0 = 0; b0 < blocks; b0 += kChunkBlocks) {
            const int64_t b1 = std::min(blocks, b0 + kChunkBlocks);
            const uint8_t* from = next == nullptr ? nullptr : next + next_bytes * static_cast<size_t>(b0) / static_cast<size_t>(blocks);
            const uint8_t* to = next == nullptr ? nullptr : next + next_bytes * static_cast<size_t>(b1) / static_cast<size_t>(blocks);
            transpose_group_q8_0(row, b0, b1, wt.data(), from, to);
            const int64_t k0 = b0 * kQ8Block, kc = (b1 - b0) * kQ8Block;
            for (int64_t r = 0; r < n; r += kHTile) {
                const int nh = static_cast<int>(std::min<int64_t>(kHTile, n - r));
                group_dots_upto<kHTile>(nh, wt.data(), kc, h + r * h_stride + k0, h_stride, o + r * os, os, b0 > 0);
            }
        }
        if (rows < kGroup) {
            for (int64_t j = 0; j < n; ++j) std::copy(o + j * kGroup, o + j * kGroup + rows, out + j * out_stride + v0);
        }
    }
}
#endif

// exp(x) for x <= 0 without a libm call, so that loops over it vectorise:
// 2^n * e^r with n = round(x / ln 2) and |r| <= ln(2)/2, e^r by its Taylor
// polynomial to degree 7 (truncation error < 3e-8 relative). Below -87.3 the
// result is clamped near the smallest normal float (~1e-38), which no sum of
// a vocabulary's terms can notice.
inline float exp_nonpositive(float x) {
    x = x < -87.3f ? -87.3f : x;
    const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const float n = (x * 1.44269504088896341f + round) - round;
    const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // NaN fails the comparison: the conversion below stays defined, and p is NaN.
    const float exponent = n >= -126.0f ? n : -126.0f;
    const int32_t bits = (static_cast<int32_t>(exponent) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

void check_q8_0_layout() {
    GGML_ASSERT(ggml_blck_size(GGML_TYPE_Q8_0) == kQ8Block && ggml_type_size(GGML_TYPE_Q8_0) == kQ8Bytes);
}

float row_max(const float* x, int64_t n) {
    constexpr int kLanes = 16;
    float lane_max[kLanes];
    std::fill(lane_max, lane_max + kLanes, -std::numeric_limits<float>::infinity());
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) lane_max[j] = x[i + j] > lane_max[j] ? x[i + j] : lane_max[j];
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < kLanes; ++j) m = std::max(m, lane_max[j]);
    for (; i < n; ++i) m = std::max(m, x[i]);
    return m;
}

// y = exp(x - m), returning the sum in double (float lanes over blocks of 256).
double exp_shifted(const float* x, float m, int64_t n, float* y) {
    constexpr int kLanes = 16;
    constexpr int64_t kBlock = 256;
    double total = 0.0;
    int64_t i = 0;
    for (; i + kBlock <= n; i += kBlock) {
        float acc[kLanes] = {};
        for (int64_t b = 0; b < kBlock; b += kLanes) {
            for (int j = 0; j < kLanes; ++j) {
                const float e = exp_nonpositive(x[i + b + j] - m);
                if (y != nullptr) y[i + b + j] = e;
                acc[j] += e;
            }
        }
        float s = 0.0f;
        for (int j = 0; j < kLanes; ++j) s += acc[j];
        total += s;
    }
    for (; i < n; ++i) {
        const double e = std::exp(static_cast<double>(x[i]) - m);
        if (y != nullptr) y[i] = static_cast<float>(e);
        total += e;
    }
    return total;
}

void softmax_rows_op(ggml_tensor* dst, int ith, int nth, void* userdata) {
    const auto* job = static_cast<const SoftmaxRowsJob*>(userdata);
    const int64_t V = dst->ne[0], rows = dst->ne[1];
    const bool bf16 = dst->type == GGML_TYPE_BF16;
    std::vector<float> staging(bf16 ? static_cast<size_t>(V) : 0);
    for (int64_t r = ith; r < rows; r += nth) {
        const float* x = job->src + r * V;
        char* row = static_cast<char*>(dst->data) + r * dst->nb[1];
        float* y = bf16 ? staging.data() : reinterpret_cast<float*>(row);
        const float m = row_max(x, V);
        const float target = x[job->targets[r]];  // read first: y may be x (in place)
        const double total = exp_shifted(x, m, V, y);
        const float scale = static_cast<float>(1.0 / total);
        for (int64_t i = 0; i < V; ++i) y[i] *= scale;
        if (bf16) ggml_fp32_to_bf16_row(y, reinterpret_cast<ggml_bf16_t*>(row), V);
        job->target_logprob[r] = static_cast<double>(target) - m - std::log(total);
    }
}

// One row of the bounded cache. Probabilities are grouped by their binary
// exponent in one pass, which gives the threshold that covers 1 - tail_mass
// of the row; a second pass collects the tokens above it, and only those are
// sorted.
void top_probabilities_row(const TopRowsJob& job, int64_t r, std::vector<float>& y, std::vector<int32_t>& picked) {
    const int64_t V = job.n_vocab;
    const float* x = job.src + r * V;
    TopProbabilities& out = job.rows[r];
    const float m = row_max(x, V);
    const double total = exp_shifted(x, m, V, y.data());  // y = exp(x - m) in (0, 1]
    job.target_logprob[r] = static_cast<double>(x[job.targets[r]]) - m - std::log(total);
    // Bucket e holds the entries whose float exponent is e (e = 127 for 1.0).
    constexpr int kBuckets = 128;
    double mass[kBuckets] = {};
    int64_t count[kBuckets] = {};
    for (int64_t i = 0; i < V; ++i) {
        uint32_t bits;
        std::memcpy(&bits, &y[static_cast<size_t>(i)], sizeof(bits));
        const int e = static_cast<int>(std::min<uint32_t>((bits >> 23) & 0xffu, kBuckets - 1));
        mass[e] += y[static_cast<size_t>(i)];
        ++count[e];
    }
    const double need = (1.0 - job.tail_mass) * total;
    double covered = 0.0;
    int64_t kept = 0;
    int lowest = kBuckets - 1;
    for (; lowest > 0; --lowest) {
        covered += mass[lowest];
        kept += count[lowest];
        if (covered >= need || kept >= job.max_k) break;
    }
    // Every entry at or above bucket `lowest`: at least 2^(lowest - 127).
    uint32_t threshold_bits = static_cast<uint32_t>(lowest) << 23;
    float threshold;
    std::memcpy(&threshold, &threshold_bits, sizeof(threshold));
    picked.clear();
    for (int64_t i = 0; i < V; ++i) {
        if (y[static_cast<size_t>(i)] >= threshold) picked.push_back(static_cast<int32_t>(i));
    }
    const auto more_probable = [&y](int32_t a, int32_t b) {
        return y[static_cast<size_t>(a)] > y[static_cast<size_t>(b)] || (y[static_cast<size_t>(a)] == y[static_cast<size_t>(b)] && a < b);
    };
    const size_t limit = std::min(picked.size(), static_cast<size_t>(job.max_k));
    std::partial_sort(picked.begin(), picked.begin() + static_cast<ptrdiff_t>(limit), picked.end(), more_probable);
    out.ids.clear();
    out.probs.clear();
    double sum = 0.0;
    for (size_t j = 0; j < limit && sum < need; ++j) {
        const float v = y[static_cast<size_t>(picked[j])];
        out.ids.push_back(picked[j]);
        out.probs.push_back(static_cast<float>(v / total));
        sum += v;
    }
    out.tail = std::max(0.0, (total - sum) / total);
}

void top_probabilities_op(ggml_tensor* dst, int ith, int nth, void* userdata) {
    const auto* job = static_cast<const TopRowsJob*>(userdata);
    std::vector<float> y(static_cast<size_t>(job->n_vocab));
    std::vector<int32_t> picked;
    for (int64_t r = ith; r < dst->ne[0]; r += nth) top_probabilities_row(*job, r, y, picked);
}

inline float bf16_bits_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// Vocabulary entries per block: a block of every column (k <= 16 of them)
// stays in L2 while each row of the thread's share is swept over it.
constexpr int64_t kBf16Block = 2048;
constexpr int kLanes = 16;

void bf16_rows_times_columns_op(ggml_tensor* dst, int ith, int nth, void*) {
    const ggml_tensor* p0 = dst->src[0];
    const ggml_tensor* cols = dst->src[1];
    const int64_t V = p0->ne[0], rows = p0->ne[1], k = cols->ne[1];
    const int64_t r0 = rows * ith / nth, r1 = rows * (ith + 1) / nth;
    if (r0 >= r1) return;
    std::vector<double> acc(static_cast<size_t>((r1 - r0) * k), 0.0);
    std::vector<float> row(static_cast<size_t>(kBf16Block));
    for (int64_t v0 = 0; v0 < V; v0 += kBf16Block) {
        const int64_t len = std::min(kBf16Block, V - v0);
        for (int64_t t = r0; t < r1; ++t) {
            const auto* p = reinterpret_cast<const uint16_t*>(static_cast<const char*>(p0->data) + t * p0->nb[1]) + v0;
            for (int64_t i = 0; i < len; ++i) row[static_cast<size_t>(i)] = bf16_bits_to_float(p[i]);
            for (int64_t j = 0; j < k; ++j) {
                const auto* c = reinterpret_cast<const float*>(static_cast<const char*>(cols->data) + j * cols->nb[1]) + v0;
                float lane[kLanes] = {};
                int64_t i = 0;
                for (; i + kLanes <= len; i += kLanes) {
                    for (int l = 0; l < kLanes; ++l) lane[l] += row[static_cast<size_t>(i + l)] * c[i + l];
                }
                double sum = 0.0;
                for (; i < len; ++i) sum += static_cast<double>(row[static_cast<size_t>(i)]) * c[i];
                for (float x : lane) sum += x;
                acc[static_cast<size_t>((t - r0) * k + j)] += sum;
            }
        }
    }
    for (int64_t t = r0; t < r1; ++t) {
        for (int64_t j = 0; j < k; ++j) {
            *reinterpret_cast<float*>(static_cast<char*>(dst->data) + t * dst->nb[0] + j * dst->nb[1]) =
                static_cast<float>(acc[static_cast<size_t>((t - r0) * k + j)]);
        }
    }
}

void bf16_rows_transposed_op(ggml_tensor* dst, int ith, int nth, void*) {
    const ggml_tensor* p0 = dst->src[0];
    const auto* r = static_cast<const float*>(dst->src[1]->data);
    const int64_t V = p0->ne[0], rows = p0->ne[1];
    // Each thread owns a range of the vocabulary (a multiple of the lanes).
    const int64_t chunks = (V + kLanes - 1) / kLanes;
    const int64_t v0 = std::min(V, chunks * ith / nth * kLanes), v1 = std::min(V, chunks * (ith + 1) / nth * kLanes);
    float* out = static_cast<float*>(dst->data);
    std::fill(out + v0, out + v1, 0.0f);
    for (int64_t t = 0; t < rows; ++t) {
        const float rt = r[t];
        if (rt == 0.0f) continue;
        const auto* p = reinterpret_cast<const uint16_t*>(static_cast<const char*>(p0->data) + t * p0->nb[1]);
        for (int64_t v = v0; v < v1; ++v) out[v] += rt * bf16_bits_to_float(p[v]);
    }
}

}  // namespace

ggml_tensor* softmax_rows_from_host(ggml_context* ctx, ggml_tensor* dst, SoftmaxRowsJob* job) {
    GGML_ASSERT((dst->type == GGML_TYPE_F32 || dst->type == GGML_TYPE_BF16) && dst->nb[0] == ggml_type_size(dst->type));
    return ggml_custom_inplace(ctx, dst, nullptr, 0, softmax_rows_op, GGML_N_TASKS_MAX, job);
}

ggml_tensor* top_probabilities_from_host(ggml_context* ctx, int64_t rows, TopRowsJob* job) {
    return ggml_custom_4d(ctx, GGML_TYPE_F32, rows, 1, 1, 1, nullptr, 0, top_probabilities_op, GGML_N_TASKS_MAX, job);
}

void top_probabilities_rows(const TopRowsJob& job, int64_t first, int64_t end) {
    std::vector<float> y(static_cast<size_t>(job.n_vocab));
    std::vector<int32_t> picked;
    for (int64_t r = first; r < end; ++r) top_probabilities_row(job, r, y, picked);
}

ggml_tensor* bf16_rows_times_columns(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* cols) {
    GGML_ASSERT(p0->type == GGML_TYPE_BF16 && p0->nb[0] == sizeof(uint16_t));
    GGML_ASSERT(cols->type == GGML_TYPE_F32 && cols->ne[0] == p0->ne[0] && cols->nb[0] == sizeof(float));
    ggml_tensor* args[] = {p0, cols};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, p0->ne[1], cols->ne[1], 1, 1, args, 2, bf16_rows_times_columns_op,
                          GGML_N_TASKS_MAX, nullptr);
}

ggml_tensor* bf16_rows_transposed_times(ggml_context* ctx, ggml_tensor* p0, ggml_tensor* r) {
    GGML_ASSERT(p0->type == GGML_TYPE_BF16 && p0->nb[0] == sizeof(uint16_t));
    GGML_ASSERT(r->type == GGML_TYPE_F32 && ggml_is_contiguous(r) && ggml_nelements(r) == p0->ne[1]);
    ggml_tensor* args[] = {p0, r};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, p0->ne[0], 1, 1, 1, args, 2, bf16_rows_transposed_op,
                          GGML_N_TASKS_MAX, nullptr);
}

double log_sum_exp(const float* x, int64_t n) {
    const float m = row_max(x, n);  // NaN entries are skipped here and poison the sum below
    if (!std::isfinite(m)) return m;  // every entry -inf, or an entry +inf
    return static_cast<double>(m) + std::log(exp_shifted(x, m, n, nullptr));
}

double softmax(const float* x, int64_t n, float* y) {
    const float m = row_max(x, n);
    if (!std::isfinite(m)) {
        std::fill(y, y + n, std::numeric_limits<float>::quiet_NaN());
        return m;
    }
    const double total = exp_shifted(x, m, n, y);
    const float scale = static_cast<float>(1.0 / total);
    for (int64_t i = 0; i < n; ++i) y[i] *= scale;
    return static_cast<double>(m) + std::log(total);
}

ggml_tensor* head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* x, int n_tasks) {
    GGML_ASSERT(x->type == GGML_TYPE_F32 && ggml_is_contiguous(x) && ggml_nelements(x) == w->ne[0]);
    if (!kSimdProduct || w->type != GGML_TYPE_Q8_0) return ggml_mul_mat(ctx, w, x);
    check_q8_0_layout();
    ggml_tensor* args[] = {w, x};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], 1, 1, 1, args, 2, product_op, n_tasks, nullptr);
}

ggml_tensor* head_rows_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* h, int n_tasks, ggml_tensor* into) {
    GGML_ASSERT(h->type == GGML_TYPE_F32 && h->ne[0] == w->ne[0] && h->nb[0] == sizeof(float));
    GGML_ASSERT(into == nullptr || (into->type == GGML_TYPE_F32 && into->ne[0] == w->ne[1] && into->ne[1] == h->ne[1] &&
                                    into->nb[0] == sizeof(float)));
#if defined(SLOT_SIMD_ROWS)
    if (w->type == GGML_TYPE_Q8_0 && ggml_is_contiguous(w)) {  // rows of whole blocks: a multiple of the lanes
        check_q8_0_layout();
        ggml_tensor* args[] = {w, h};
        if (into != nullptr) return ggml_custom_inplace(ctx, into, args, 2, rows_product_op, n_tasks, nullptr);
        return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], h->ne[1], 1, 1, args, 2, rows_product_op, n_tasks,
                              nullptr);
    }
#endif
    (void)n_tasks;
    ggml_tensor* z = ggml_mul_mat(ctx, w, h);
    return into != nullptr ? ggml_cpy(ctx, z, into) : z;
}

ggml_tensor* transposed_head_product(ggml_context* ctx, ggml_tensor* w, ggml_tensor* g, int n_parts) {
    GGML_ASSERT(g->type == GGML_TYPE_F32 && ggml_is_contiguous(g) && ggml_nelements(g) == w->ne[1]);
    if (w->type == GGML_TYPE_Q8_0) check_q8_0_layout();
    ggml_tensor* args[] = {w, g};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[0], n_parts, 1, 1, args, 2, transposed_product_op,
                          n_parts, nullptr);
}

void centroid_distances(const float* q, const float* centroids, int64_t nlist, int64_t dim, float* out) {
    for (int64_t l = 0; l < nlist; ++l) {
        const float* c = centroids + l * dim;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t j = 0;
        for (; j + 8 <= dim; j += 8) {
            for (int u = 0; u < 8; ++u) {
                const float t = q[j + u] - c[j + u];
                acc[u] += t * t;
            }
        }
        float s = acc[0] + acc[1] + acc[2] + acc[3] + acc[4] + acc[5] + acc[6] + acc[7];
        for (; j < dim; ++j) s += (q[j] - c[j]) * (q[j] - c[j]);
        out[l] = s;
    }
}

const char* kernel_isa() {
#if defined(__AVX512F__)
    return "avx512";
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    return "avx2";
#else
    return "generic";
#endif
}

#if defined(SLOT_KERNEL_NS)
}  // namespace SLOT_KERNEL_NS
#endif
}  // namespace slot
