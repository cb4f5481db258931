#include "output_head.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#include "errors.h"
#include "head_kernels.h"

namespace slot {
namespace {

struct FileCloser { void operator()(std::FILE* f) const { if (f) std::fclose(f); } };

std::vector<uint8_t> read_bytes(const std::string& path, uint64_t offset, uint64_t nbytes) {
    std::unique_ptr<std::FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
    if (!f) throw ModelLoadError("cannot open model file: " + path);
    if (std::fseek(f.get(), static_cast<long>(offset), SEEK_SET) != 0) {
        throw ModelLoadError("cannot seek to the output head in " + path);
    }
    std::vector<uint8_t> bytes(nbytes);
    if (nbytes > 0 && std::fread(bytes.data(), 1, nbytes, f.get()) != nbytes) {
        throw ModelLoadError("GGUF file is truncated: could not read the output head from " + path);
    }
    return bytes;
}

// Dequantised rows [v0, v1) of a row-major head of `row_bytes` per row.
void rows_to_float(ggml_type type, const uint8_t* raw, size_t row_bytes, int64_t d, int64_t v0, int64_t v1,
                   float* out) {
    const auto* traits = ggml_get_type_traits(type);
    for (int64_t v = v0; v < v1; ++v) {
        const uint8_t* src = raw + static_cast<size_t>(v) * row_bytes;
        float* dst = out + (v - v0) * d;
        if (type == GGML_TYPE_F32) {
            std::memcpy(dst, src, static_cast<size_t>(d) * sizeof(float));
        } else {
            traits->to_float(src, dst, d);
        }
    }
}

}  // namespace

ColumnSplitProduct build_column_split_product(GraphBuilder& g, ggml_tensor* a, int slabs) {
    const int64_t ne0 = a->ne[0], rows = a->ne[1];
    const int64_t k = std::clamp<int64_t>(slabs, 1, ne0);
    const int64_t slab = ne0 / k;
    const int64_t done = slab * k;
    ColumnSplitProduct p;
    p.rows = rows;
    p.k = k;
    p.x = g.input(GGML_TYPE_F32, rows * (k + 1));
    if (k == 1) {
        p.main = ggml_out_prod(g.ctx, a, ggml_view_2d(g.ctx, p.x, 1, rows, sizeof(float), 0));
        g.output(p.main);
        return p;
    }
    // Slab s covers columns [s*slab, (s+1)*slab) and reads copy s of x.
    ggml_tensor* av = ggml_view_3d(g.ctx, a, slab, rows, k, a->nb[1], sizeof(float) * slab, 0);
    ggml_tensor* xv = ggml_view_3d(g.ctx, p.x, 1, rows, k, sizeof(float), sizeof(float) * rows, 0);
    p.main = ggml_out_prod(g.ctx, av, xv);
    g.output(p.main);
    if (done < ne0) {
        ggml_tensor* at = ggml_view_2d(g.ctx, a, ne0 - done, rows, a->nb[1], sizeof(float) * done);
        ggml_tensor* xt = ggml_view_2d(g.ctx, p.x, 1, rows, sizeof(float), sizeof(float) * rows * k);
        p.tail = ggml_out_prod(g.ctx, at, xt);
        g.output(p.tail);
    }
    return p;
}

std::vector<GraphInput> column_split_inputs(const ColumnSplitProduct& p, const float* x) {
    const size_t bytes = static_cast<size_t>(p.rows) * sizeof(float);
    std::vector<GraphInput> in;
    for (int64_t s = 0; s <= p.k; ++s) in.push_back({p.x, x, static_cast<size_t>(s) * bytes, bytes});
    return in;
}

std::vector<GraphOutput> column_split_outputs(const ColumnSplitProduct& p, float* out) {
    std::vector<GraphOutput> outs{{p.main, out}};
    if (p.tail != nullptr) outs.push_back({p.tail, out + ggml_nbytes(p.main) / sizeof(float)});
    return outs;
}

OutputHead::OutputHead(const ModelFileInfo& info, ComputeBackend& backend, bool portable_ops) : backend_(backend) {
    if (!info.has_head) throw ModelLoadError("the model file has no output head");
    n_vocab_ = info.head.ne1;
    n_embd_ = info.head.ne0;
    stored_type_ = info.head.type;
    if (n_vocab_ <= 0 || n_embd_ <= 0) throw ModelLoadError("output head has an empty shape");
    const int64_t blck = ggml_blck_size(stored_type_);
    if (blck <= 0 || n_embd_ % blck != 0 ||
        ggml_row_size(stored_type_, n_embd_) * static_cast<size_t>(n_vocab_) != info.head.nbytes) {
        throw ModelLoadError("output head '" + info.head.name + "' has a size that does not match its shape and type");
    }
    const auto* traits = ggml_get_type_traits(stored_type_);
    if (stored_type_ != GGML_TYPE_F32 && (traits == nullptr || traits->to_float == nullptr)) {
        throw UnsupportedModelError(std::string("output head type ") + ggml_type_name(stored_type_) +
                                    " cannot be dequantised");
    }

    std::vector<uint8_t> raw = read_bytes(info.path, info.head.file_offset, info.head.nbytes);
    if (info.has_head_bias) {
        std::vector<uint8_t> b = read_bytes(info.path, info.head_bias.file_offset, info.head_bias.nbytes);
        bias_.resize(static_cast<size_t>(n_vocab_));
        std::memcpy(bias_.data(), b.data(), bias_.size() * sizeof(float));
    }

    weight_ = ggml_new_tensor_2d(tensors_.ctx, stored_type_, n_embd_, n_vocab_);
    ggml_set_name(weight_, "slot_head_w");
    backend_.allocate(tensors_, "the output head");
    ggml_backend_tensor_set(weight_, raw.data(), 0, raw.size());
    if (portable_ops || !backend_.is_cpu()) make_transposed_copy(raw.data());
}

void OutputHead::make_transposed_copy(const uint8_t* raw) {
    const ggml_type type = stored_type_ == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
    weight_t_ = ggml_new_tensor_2d(transposed_.ctx, type, n_vocab_, n_embd_);
    ggml_set_name(weight_t_, "slot_head_w_t");
    backend_.allocate(transposed_, "the transposed copy of the output head");
    // Blocks of vocabulary rows, transposed on the host: bounded staging memory.
    const size_t row_bytes = ggml_row_size(stored_type_, n_embd_);
    const int64_t block = std::clamp<int64_t>((int64_t(32) << 20) / (n_embd_ * 4), 1, n_vocab_);
    const size_t elem = ggml_type_size(type);
    std::vector<float> rows(static_cast<size_t>(block * n_embd_));
    std::vector<float> columns(rows.size());
    std::vector<ggml_fp16_t> column_f16(static_cast<size_t>(block));
    constexpr int64_t kTile = 32;  // cache-friendly transpose
    for (int64_t v0 = 0; v0 < n_vocab_; v0 += block) {
        const int64_t n = std::min(block, n_vocab_ - v0);
        rows_to_float(stored_type_, raw, row_bytes, n_embd_, v0, v0 + n, rows.data());
        for (int64_t vt = 0; vt < n; vt += kTile) {
            for (int64_t it = 0; it < n_embd_; it += kTile) {
                for (int64_t v = vt; v < std::min(vt + kTile, n); ++v) {
                    for (int64_t i = it; i < std::min(it + kTile, n_embd_); ++i) {
                        columns[static_cast<size_t>(i * n + v)] = rows[static_cast<size_t>(v * n_embd_ + i)];
                    }
                }
            }
        }
        for (int64_t i = 0; i < n_embd_; ++i) {
            const float* column = columns.data() + i * n;
            const void* src = column;
            if (type == GGML_TYPE_F16) {
                ggml_fp32_to_fp16_row(column, column_f16.data(), n);
                src = column_f16.data();
            }
            ggml_backend_tensor_set(weight_t_, src, weight_t_->nb[1] * static_cast<size_t>(i) + elem * static_cast<size_t>(v0),
                                    elem * static_cast<size_t>(n));
        }
    }
}

ggml_tensor* OutputHead::rows_product(ggml_context* ctx, ggml_tensor* h, ggml_tensor* into) const {
    // slot_cpp's own product on the CPU (H kept in float32), ggml's elsewhere.
    if (backend_.is_cpu() && !portable_ops()) return head_rows_product(ctx, weight_, h, backend_.n_threads(), into);
    ggml_tensor* z = ggml_mul_mat(ctx, weight_, h);
    return into != nullptr ? ggml_cpy(ctx, z, into) : z;
}

ggml_tensor* OutputHead::product(ggml_context* ctx, ggml_tensor* x) const {
    if (portable_ops()) return ggml_mul_mat(ctx, weight_, x);
    return head_product(ctx, weight_, x, backend_.n_threads());
}

ggml_tensor* OutputHead::transposed_product(ggml_context* ctx, ggml_tensor* g) const {
    if (portable_ops()) return ggml_mul_mat(ctx, weight_t_, g);  // [n_embd, 1]
    return transposed_head_product(ctx, weight_, g, backend_.n_threads());
}

void OutputHead::read_transposed_product(ggml_tensor* partial, float* out) const {
    const int64_t parts = partial->ne[1];
    std::vector<float> sums(static_cast<size_t>(n_embd_ * parts));
    ggml_backend_tensor_get(partial, sums.data(), 0, sums.size() * sizeof(float));
    for (int64_t i = 0; i < n_embd_; ++i) {
        double acc = 0.0;
        for (int64_t p = 0; p < parts; ++p) acc += sums[static_cast<size_t>(p * n_embd_ + i)];
        out[i] = static_cast<float>(acc);
    }
}

int OutputHead::column_slabs() const { return portable_ops() ? 1 : 4 * backend_.n_threads(); }

void OutputHead::project(const float* delta, float* out) {
    GraphBuilder g(4);
    ggml_tensor* d = g.input(GGML_TYPE_F32, n_embd_);
    ggml_tensor* b = product(g.ctx, d);
    g.output(b);
    backend_.run(g, "W*delta", {{d, delta}}, {{b, out}});
}

void OutputHead::project_transposed(const float* gvec, float* out) {
    GraphBuilder g(4);
    ggml_tensor* x = g.input(GGML_TYPE_F32, n_vocab_);
    ggml_tensor* partial = transposed_product(g.ctx, x);
    g.output(partial);
    backend_.run(g, "W^T*g", {{x, gvec}});
    read_transposed_product(partial, out);
}

void OutputHead::logits(const float* hidden, int64_t n_rows, float* out) {
    if (n_rows <= 0) return;
    GraphBuilder g(6);
    ggml_tensor* h = g.input(GGML_TYPE_F32, n_embd_, n_rows);
    ggml_tensor* z = rows_product(g.ctx, h);  // [n_vocab, n_rows]
    ggml_tensor* bias = nullptr;
    if (!bias_.empty()) {
        bias = g.input(GGML_TYPE_F32, n_vocab_);
        z = ggml_add(g.ctx, z, bias);
    }
    g.output(z);
    backend_.run(g, "W*H", {{h, hidden}, {bias, bias_.data()}}, {{z, out}});
}

void OutputHead::dequantize(float* out) const {
    const size_t row_bytes = weight_->nb[1];
    std::vector<uint8_t> row(row_bytes);
    const auto* traits = ggml_get_type_traits(weight_->type);
    for (int64_t v = 0; v < n_vocab_; ++v) {
        ggml_backend_tensor_get(weight_, row.data(), static_cast<size_t>(v) * row_bytes, row_bytes);
        if (weight_->type == GGML_TYPE_F32) {
            std::memcpy(out + v * n_embd_, row.data(), row_bytes);
        } else {
            traits->to_float(row.data(), out + v * n_embd_, n_embd_);
        }
    }
}

}  // namespace slot
