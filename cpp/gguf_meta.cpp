#include "gguf_meta.h"

#include <cstdio>
#include <filesystem>
#include <memory>
#include <string_view>
#include <unordered_map>

#include "errors.h"
#include "gguf.h"

namespace slot {
namespace {

struct GgufDeleter {
    void operator()(gguf_context* ctx) const { gguf_free(ctx); }
};
using GgufPtr = std::unique_ptr<gguf_context, GgufDeleter>;

std::string get_str(const gguf_context* ctx, const std::string& key) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0 || gguf_get_kv_type(ctx, id) != GGUF_TYPE_STRING) return {};
    return gguf_get_val_str(ctx, id);
}

// llama.cpp aborts (GGML_ASSERT) on a vocabulary with a token twice: a
// damaged file gets a ModelLoadError naming the token instead.
void check_unique_tokens(const gguf_context* ctx, const std::string& path) {
    const int64_t id = gguf_find_key(ctx, "tokenizer.ggml.tokens");
    if (id < 0 || gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY ||
        gguf_get_arr_type(ctx, id) != GGUF_TYPE_STRING) {
        return;  // llama.cpp reports a missing or mistyped vocabulary itself
    }
    const size_t n = gguf_get_arr_n(ctx, id);
    std::unordered_map<std::string_view, size_t> seen;
    seen.reserve(n);
    for (size_t i = 0; i < n; ++i) {
        const std::string_view token = gguf_get_arr_str(ctx, id, i);
        const auto [it, inserted] = seen.emplace(token, i);
        if (!inserted) {
            throw ModelLoadError("GGUF file is corrupted: its vocabulary holds the token '" +
                                 std::string(token.substr(0, 40)) + "' twice (ids " +
                                 std::to_string(it->second) + " and " + std::to_string(i) + "): " + path);
        }
    }
}

// Numeric keys are stored with whatever width the converter chose.
bool get_number(const gguf_context* ctx, const std::string& key, double* out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(ctx, id)) {
        case GGUF_TYPE_UINT8: *out = gguf_get_val_u8(ctx, id); return true;
        case GGUF_TYPE_INT8: *out = gguf_get_val_i8(ctx, id); return true;
        case GGUF_TYPE_UINT16: *out = gguf_get_val_u16(ctx, id); return true;
        case GGUF_TYPE_INT16: *out = gguf_get_val_i16(ctx, id); return true;
        case GGUF_TYPE_UINT32: *out = gguf_get_val_u32(ctx, id); return true;
        case GGUF_TYPE_INT32: *out = gguf_get_val_i32(ctx, id); return true;
        case GGUF_TYPE_UINT64: *out = static_cast<double>(gguf_get_val_u64(ctx, id)); return true;
        case GGUF_TYPE_INT64: *out = static_cast<double>(gguf_get_val_i64(ctx, id)); return true;
        case GGUF_TYPE_FLOAT32: *out = gguf_get_val_f32(ctx, id); return true;
        case GGUF_TYPE_FLOAT64: *out = gguf_get_val_f64(ctx, id); return true;
        default: return false;
    }
}

bool locate(const gguf_context* ctx, ggml_context* meta, const char* name, uint64_t file_size,
            TensorLocation* out) {
    const int64_t tid = gguf_find_tensor(ctx, name);
    if (tid < 0) return false;
    const ggml_tensor* t = ggml_get_tensor(meta, name);
    if (t == nullptr) return false;
    out->name = name;
    out->type = gguf_get_tensor_type(ctx, tid);
    out->ne0 = t->ne[0];
    out->ne1 = t->ne[1];
    out->nbytes = gguf_get_tensor_size(ctx, tid);
    out->file_offset = gguf_get_data_offset(ctx) + gguf_get_tensor_offset(ctx, tid);
    if (out->file_offset + out->nbytes > file_size) {
        throw ModelLoadError("GGUF file is truncated: tensor '" + std::string(name) +
                             "' extends past the end of the file");
    }
    return true;
}

// Reads the GGUF header with bounds checks and checks every stored enum value
// (KV value types, tensor types) before ggml's reader loads them as enums.
class HeaderScanner {
public:
    HeaderScanner(std::FILE* f, uint64_t size) : f_(f), size_(size) {}

    void scan(const std::string& path) {
        uint32_t version = 0;
        uint64_t n_tensors = 0, n_kv = 0;
        skip(4);  // magic, checked by the caller
        read(&version);
        read(&n_tensors);
        read(&n_kv);
        if (version < 2 || version > 3) fail(path, "unsupported GGUF version " + std::to_string(version));
        for (uint64_t i = 0; i < n_kv; ++i) {
            const std::string key = string(path);
            uint32_t type = 0;
            read(&type);
            uint64_t count = 1;
            if (type == GGUF_TYPE_ARRAY) {
                read(&type);
                read(&count);
                if (type == GGUF_TYPE_ARRAY) fail(path, "key '" + key + "' holds nested arrays");
            }
            if (type >= GGUF_TYPE_COUNT) {
                fail(path, "key '" + key + "' has invalid value type " + std::to_string(type));
            }
            if (type == GGUF_TYPE_STRING) {
                for (uint64_t j = 0; j < count; ++j) string(path);
            } else {
                static const uint64_t widths[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
                const uint64_t width = widths[type];
                if (count > (size_ - pos_) / std::max<uint64_t>(width, 1)) fail(path, "key '" + key + "' runs past the end");
                skip(count * width);
            }
        }
        for (uint64_t i = 0; i < n_tensors; ++i) {
            const std::string name = string(path);
            uint32_t n_dims = 0, type = 0;
            read(&n_dims);
            if (n_dims > GGML_MAX_DIMS) fail(path, "tensor '" + name + "' has " + std::to_string(n_dims) + " dimensions");
            skip(static_cast<uint64_t>(n_dims) * sizeof(int64_t));
            read(&type);
            if (type >= GGML_TYPE_COUNT || ggml_type_size(static_cast<ggml_type>(type)) == 0) {
                fail(path, "tensor '" + name + "' has invalid type " + std::to_string(type));
            }
            skip(sizeof(uint64_t));
        }
    }

private:
    [[noreturn]] static void fail(const std::string& path, const std::string& what) {
        throw ModelLoadError("GGUF file is corrupted (" + what + "): " + path);
    }
    template <typename T>
    void read(T* out) {
        if (size_ - pos_ < sizeof(T) || std::fread(out, sizeof(T), 1, f_) != 1) {
            throw ModelLoadError("GGUF file is truncated inside its header");
        }
        pos_ += sizeof(T);
    }
    void skip(uint64_t n) {
        if (n > size_ - pos_) throw ModelLoadError("GGUF file is truncated inside its header");
        if (std::fseek(f_, static_cast<long>(n), SEEK_CUR) != 0) throw ModelLoadError("cannot read the GGUF header");
        pos_ += n;
    }
    std::string string(const std::string& path) {
        uint64_t len = 0;
        read(&len);
        if (len > size_ - pos_ || len > (uint64_t(1) << 24)) fail(path, "a string length is out of range");
        std::string s(static_cast<size_t>(len), '\0');
        if (len > 0 && std::fread(s.data(), 1, static_cast<size_t>(len), f_) != len) {
            throw ModelLoadError("GGUF file is truncated inside its header");
        }
        pos_ += len;
        return s;
    }

    std::FILE* f_;
    uint64_t size_;
    uint64_t pos_ = 0;
};

}  // namespace

std::string ModelFileInfo::slot_unsupported_reason() const {
    if (!has_head) return "the file has no output head (output.weight or token_embd.weight)";
    if (final_logit_softcapping != 0.0f) {
        return "the model applies final logit softcapping, so its head is not linear in the "
               "hidden state";
    }
    if (logit_scale != 0.0f && logit_scale != 1.0f) {
        return "the model scales its logits (" + architecture + ".logit_scale), which slot_cpp "
               "does not model";
    }
    if (has_head_scale) return "the model has an output.scale tensor, which slot_cpp does not model";
    static const char* const scaled[] = {"grok", "command-r", "cohere2", "cohere2moe", "granite",
                                         "granitemoe", "granitehybrid", "minicpm", "minicpm3",
                                         "talkie"};
    for (const char* arch : scaled) {
        if (architecture == arch) {
            return "architecture '" + architecture + "' transforms its head's input or output, so "
                   "SLOT's logit-bias form would not be exact";
        }
    }
    return {};
}

ModelFileInfo read_model_file_info(const std::string& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::exists(path, ec)) throw ModelLoadError("model file not found: " + path);
    if (fs::is_directory(path, ec)) {
        throw ModelLoadError("model path is a directory, not a GGUF file: " + path);
    }
    ModelFileInfo info;
    info.path = path;
    info.file_size = fs::file_size(path, ec);
    if (ec) throw ModelLoadError("cannot read model file: " + path);

    {
        std::FILE* f = std::fopen(path.c_str(), "rb");
        if (f == nullptr) throw ModelLoadError("cannot open model file: " + path);
        std::unique_ptr<std::FILE, int (*)(std::FILE*)> closer(f, &std::fclose);
        char magic[4] = {0, 0, 0, 0};
        const size_t got = std::fread(magic, 1, 4, f);
        if (got != 4 || magic[0] != 'G' || magic[1] != 'G' || magic[2] != 'U' || magic[3] != 'F') {
            throw ModelLoadError("not a GGUF file (bad magic): " + path);
        }
        std::rewind(f);
        HeaderScanner(f, info.file_size).scan(path);
    }

    ggml_context* meta_raw = nullptr;
    gguf_init_params params{};
    params.no_alloc = true;
    params.ctx = &meta_raw;
    GgufPtr ctx(gguf_init_from_file(path.c_str(), params));
    std::unique_ptr<ggml_context, decltype(&ggml_free)> meta(meta_raw, &ggml_free);
    if (!ctx || !meta) {
        throw ModelLoadError("GGUF file is corrupted or truncated (header or tensor table "
                             "unreadable): " + path);
    }

    info.architecture = get_str(ctx.get(), "general.architecture");
    if (info.architecture.empty()) {
        throw ModelLoadError("GGUF file has no general.architecture key: " + path);
    }
    check_unique_tokens(ctx.get(), path);
    info.name = get_str(ctx.get(), "general.name");
    info.chat_template = get_str(ctx.get(), "tokenizer.chat_template");
    info.n_tensors = gguf_get_n_tensors(ctx.get());

    const std::string arch = info.architecture;
    double value = 0.0;
    if (get_number(ctx.get(), arch + ".embedding_length", &value)) {
        info.n_embd = static_cast<int64_t>(value);
    }
    if (get_number(ctx.get(), arch + ".final_logit_softcapping", &value)) {
        info.final_logit_softcapping = static_cast<float>(value);
    }
    if (get_number(ctx.get(), arch + ".logit_scale", &value)) {
        info.logit_scale = static_cast<float>(value);
    }

    if (locate(ctx.get(), meta.get(), "output.weight", info.file_size, &info.head)) {
        info.has_head = true;
    } else if (locate(ctx.get(), meta.get(), "token_embd.weight", info.file_size, &info.head)) {
        info.has_head = true;
        info.tied_embeddings = true;
    }
    info.has_head_bias = locate(ctx.get(), meta.get(), "output.bias", info.file_size, &info.head_bias);
    TensorLocation scale;
    info.has_head_scale = locate(ctx.get(), meta.get(), "output.scale", info.file_size, &scale);

    if (info.has_head) {
        info.n_vocab = info.head.ne1;
        if (info.n_embd == 0) info.n_embd = info.head.ne0;
        if (info.head.ne0 != info.n_embd) {
            throw ModelLoadError("output head has " + std::to_string(info.head.ne0) +
                                 " columns but the model's embedding length is " +
                                 std::to_string(info.n_embd));
        }
        if (info.has_head_bias && (info.head_bias.ne0 != info.n_vocab ||
                                   info.head_bias.type != GGML_TYPE_F32)) {
            throw ModelLoadError("output.bias has an unexpected shape or type");
        }
    }
    return info;
}

}  // namespace slot
