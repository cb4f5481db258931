#include "engine.h"

#include <cstdio>
#include <cstring>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "cpu_variant.h"
#include "engine_internal.h"
#include "errors.h"
#include "log.h"

namespace slot {
namespace {

using detail::BatchHolder;
using detail::kMaxSequences;
using detail::with_log_detail;

void ensure_backend() {
    static std::once_flag once;
    ensure_cpu_backend();  // a portable build loads its CPU backend (and the others) here
    std::call_once(once, [] {
        install_log_callback();
        llama_backend_init();
    });
}

// A KV cache type by its ggml name; std::invalid_argument naming the choices.
ggml_type kv_cache_type(const std::string& name, const char* what) {
    static const ggml_type allowed[] = {GGML_TYPE_F32,  GGML_TYPE_F16,  GGML_TYPE_BF16, GGML_TYPE_Q8_0,  GGML_TYPE_Q4_0,
                                        GGML_TYPE_Q4_1, GGML_TYPE_IQ4_NL, GGML_TYPE_Q5_0, GGML_TYPE_Q5_1};
    std::string names;
    for (ggml_type t : allowed) {
        if (name == ggml_type_name(t)) return t;
        names += std::string(names.empty() ? "" : ", ") + ggml_type_name(t);
    }
    throw std::invalid_argument(std::string(what) + " must be one of " + names + ", got '" + name + "'");
}

llama_flash_attn_type flash_attn_type(const std::string& name) {
    if (name == "auto") return LLAMA_FLASH_ATTN_TYPE_AUTO;
    if (name == "on") return LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (name == "off") return LLAMA_FLASH_ATTN_TYPE_DISABLED;
    throw std::invalid_argument("flash_attn must be 'auto', 'on' or 'off', got '" + name + "'");
}

// The devices of ggml rpc-server processes, in the order given.
std::vector<ggml_backend_dev_t> rpc_devices(const std::vector<std::string>& endpoints) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (reg == nullptr) {
        throw ModelLoadError("this build of slot_cpp has no RPC backend (build with -DSLOT_CPP_RPC=ON)");
    }
    using AddServer = ggml_backend_reg_t (*)(const char*);
    auto add_server =
        reinterpret_cast<AddServer>(ggml_backend_reg_get_proc_address(reg, "ggml_backend_rpc_add_server"));
    if (add_server == nullptr) throw ModelLoadError("the RPC backend lacks ggml_backend_rpc_add_server");
    std::vector<ggml_backend_dev_t> out;
    for (const auto& endpoint : endpoints) {
        const auto colon = endpoint.rfind(':');
        if (colon == std::string::npos || colon == 0 || colon + 1 == endpoint.size() ||
            endpoint.find_first_not_of("0123456789", colon + 1) != std::string::npos) {
            throw std::invalid_argument("an RPC server must be given as host:port, got '" + endpoint + "'");
        }
        ggml_backend_reg_t server = add_server(endpoint.c_str());
        if (server == nullptr || ggml_backend_reg_dev_count(server) == 0) {
            throw ModelLoadError("no ggml rpc-server answered at " + endpoint);
        }
        for (size_t i = 0; i < ggml_backend_reg_dev_count(server); ++i) {
            out.push_back(ggml_backend_reg_dev_get(server, i));
        }
    }
    return out;
}

}  // namespace

Engine::Engine(const EngineParams& params) : params_(params) {
    if (params.n_ctx < 0) throw std::invalid_argument("n_ctx must be >= 0");
    if (params.n_batch < 1) throw std::invalid_argument("n_batch must be >= 1");
    if (params.n_threads < 0) throw std::invalid_argument("n_threads must be >= 0");
    if (params.n_gpu_layers < -1) throw std::invalid_argument("n_gpu_layers must be >= -1");
    if (params.n_parallel < 1) throw std::invalid_argument("n_parallel must be >= 1");
    if (params.n_parallel > params.n_batch) {
        throw std::invalid_argument("n_parallel (" + std::to_string(params.n_parallel) +
                                    ") must not exceed n_batch (" + std::to_string(params.n_batch) + ")");
    }
    if (params.n_parallel > kMaxSequences) {
        throw std::invalid_argument("n_parallel must be <= " + std::to_string(kMaxSequences));
    }
    if (params.deterministic && (params.n_gpu_layers != 0 || !params.rpc_servers.empty())) {
        throw std::invalid_argument("deterministic mode covers the CPU backend only: use n_gpu_layers=0 and no rpc");
    }
    const ggml_type type_k = kv_cache_type(params.cache_type_k, "cache_type_k");
    const ggml_type type_v = kv_cache_type(params.cache_type_v, "cache_type_v");
    const llama_flash_attn_type flash = flash_attn_type(params.flash_attn);
    const bool v_quantised = type_v != GGML_TYPE_F32 && type_v != GGML_TYPE_F16 && type_v != GGML_TYPE_BF16;
    if (v_quantised && flash == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        throw std::invalid_argument("a quantised V cache (cache_type_v='" + params.cache_type_v +
                                    "') needs flash attention: flash_attn 'on' or 'auto'");
    }
    const auto valid_rope = [](float x) { return std::isfinite(x) && x >= 0.0f; };
    if (!valid_rope(params.rope_freq_base) || !valid_rope(params.rope_freq_scale)) {
        throw std::invalid_argument("rope_freq_base and rope_freq_scale must be finite and >= 0 (0: the model's)");
    }
    if (!params.rope_scaling.empty() && params.rope_scaling != "none" && params.rope_scaling != "linear" &&
        params.rope_scaling != "yarn") {
        throw std::invalid_argument("rope_scaling must be 'none', 'linear' or 'yarn', got '" + params.rope_scaling + "'");
    }
    for (float x : {params.yarn_ext_factor, params.yarn_attn_factor, params.yarn_beta_fast, params.yarn_beta_slow}) {
        if (!std::isfinite(x)) throw std::invalid_argument("YaRN settings must be finite");
    }
    if (params.yarn_orig_ctx < 0) throw std::invalid_argument("yarn_orig_ctx must be >= 0");
    for (const auto& o : params.kv_overrides) {
        llama_model_kv_override kv{};
        if (o.key.empty() || o.key.size() >= sizeof(kv.key)) {
            throw std::invalid_argument("a kv_overrides key must have 1 to 127 characters");
        }
        std::snprintf(kv.key, sizeof(kv.key), "%s", o.key.c_str());
        try {
            if (o.type == "int") {
                size_t used = 0;
                kv.tag = LLAMA_KV_OVERRIDE_TYPE_INT;
                kv.val_i64 = std::stoll(o.value, &used);
                if (used != o.value.size()) throw std::invalid_argument(o.value);
            } else if (o.type == "float") {
                size_t used = 0;
                kv.tag = LLAMA_KV_OVERRIDE_TYPE_FLOAT;
                kv.val_f64 = std::stod(o.value, &used);
                if (used != o.value.size()) throw std::invalid_argument(o.value);
            } else if (o.type == "bool") {
                kv.tag = LLAMA_KV_OVERRIDE_TYPE_BOOL;
                if (o.value != "true" && o.value != "false") throw std::invalid_argument(o.value);
                kv.val_bool = o.value == "true";
            } else if (o.type == "str") {
                kv.tag = LLAMA_KV_OVERRIDE_TYPE_STR;
                if (o.value.size() >= sizeof(kv.val_str)) throw std::invalid_argument(o.value);
                std::snprintf(kv.val_str, sizeof(kv.val_str), "%s", o.value.c_str());
            } else {
                throw std::invalid_argument("type");
            }
        } catch (const std::logic_error&) {
            throw std::invalid_argument("kv_overrides['" + o.key + "']: '" + o.value + "' is not a valid " + o.type +
                                        " (types: int, float, bool, str of at most 127 bytes)");
        }
        kv_overrides_.push_back(kv);
    }
    if (!kv_overrides_.empty()) {
        kv_overrides_.push_back(llama_model_kv_override{});  // key "" ends the list
    }
    if (params.deterministic && flash == LLAMA_FLASH_ATTN_TYPE_DISABLED) {
        throw std::invalid_argument("deterministic mode needs flash attention: flash_attn 'on' or 'auto'");
    }
    ensure_backend();

    info_ = read_model_file_info(params.model_path);
    if (info_.n_tensors == 0) {
        throw ModelLoadError("GGUF file has no tensors (vocabulary-only file?): " + params.model_path);
    }
    if (!info_.has_head) {
        throw ModelLoadError("GGUF file has no output head (neither output.weight nor "
                             "token_embd.weight): " + params.model_path);
    }

    n_threads_ = params.n_threads > 0
                     ? params.n_threads
                     : std::max(1u, std::thread::hardware_concurrency());

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers < 0 ? -1 : params.n_gpu_layers;
    if (!params.rpc_servers.empty()) {
        rpc_devices_ = rpc_devices(params.rpc_servers);
        rpc_devices_.push_back(nullptr);
        mp.devices = rpc_devices_.data();
        if (params.n_gpu_layers == 0) mp.n_gpu_layers = -1;
    }
    if (!kv_overrides_.empty()) mp.kv_overrides = kv_overrides_.data();
    if (params.use_mlock) mp.load_mode = params.use_mmap ? LLAMA_LOAD_MODE_MMAP_MLOCK : LLAMA_LOAD_MODE_MLOCK;
    else if (!params.use_mmap) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    // Repacked weights have their own kernels for one row and for several.
    if (params.deterministic) mp.use_extra_bufts = false;
    clear_last_error_line();
    model_.reset(llama_model_load_from_file(params.model_path.c_str(), mp));
    if (!model_) {
        throw ModelLoadError(with_log_detail("llama.cpp could not load the model from " +
                                             params.model_path));
    }
    if (llama_model_has_encoder(model_.get())) {
        throw UnsupportedModelError("encoder-decoder models are not supported: " + params.model_path);
    }
    vocab_ = llama_model_get_vocab(model_.get());
    n_vocab_ = llama_vocab_n_tokens(vocab_);
    n_embd_ = llama_model_n_embd_out(model_.get());
    if (n_embd_ <= 0) n_embd_ = llama_model_n_embd(model_.get());

    for (const auto& [path, scale] : params.loras) {
        if (!std::isfinite(scale)) throw std::invalid_argument("LoRA scale must be finite: " + path);
        clear_last_error_line();
        AdapterPtr adapter(llama_adapter_lora_init(model_.get(), path.c_str()));
        if (!adapter) {
            throw ModelLoadError(with_log_detail("llama.cpp could not apply the LoRA adapter " + path +
                                                 " to " + params.model_path));
        }
        adapters_.push_back(std::move(adapter));
        adapter_scales_.push_back(scale);
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = static_cast<uint32_t>(params.n_ctx);
    cp.n_batch = static_cast<uint32_t>(params.n_batch);
    cp.n_ubatch = static_cast<uint32_t>(params.n_batch);
    cp.n_threads = n_threads_;
    cp.n_threads_batch = n_threads_;
    cp.pooling_type = LLAMA_POOLING_TYPE_NONE;
    cp.embeddings = false;
    cp.no_perf = true;
    // All sequences share the n_ctx cells, so that they can share a prompt's
    // cells; a full-size sliding-window cache lets any sequence be cut back
    // to any position (forks, the prompt cache).
    cp.n_seq_max = static_cast<uint32_t>(params.n_parallel);
    set_rope(cp);
    cp.type_k = type_k;
    cp.type_v = type_v;
    cp.flash_attn_type = v_quantised ? LLAMA_FLASH_ATTN_TYPE_ENABLED : flash;
    cp.kv_unified = true;
    cp.swa_full = true;
    if (params.deterministic) {
        // Attention sums over a sequence's cells in cell order: a stream of
        // its own keeps that order the order of positions, whatever the
        // other sequences do. Flash attention skips the masked cells.
        cp.kv_unified = false;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
    }
    cp.abort_callback = &Engine::abort_trampoline;
    cp.abort_callback_data = this;
    if (params.n_gpu_layers == 0 && params.rpc_servers.empty()) {
        // CPU only: the callback that lets a prefill stop after the final norm
        // (Outputs::Hidden). GPU backends keep their graphs whole.
        cp.cb_eval = &Engine::main_graph_callback;
        cp.cb_eval_user_data = this;
        hidden_only_ok_ = true;
    }
    ctx_ = new_context(cp, "a context for " + params.model_path);
    seq_tokens_.assign(static_cast<size_t>(params.n_parallel), {});
    active_scales_ = adapter_scales_;
}

ContextPtr Engine::new_context(const llama_context_params& cp, const std::string& what) {
    clear_last_error_line();
    ContextPtr ctx(llama_init_from_model(model_.get(), cp));
    if (!ctx) throw ModelLoadError(with_log_detail("llama.cpp could not create " + what));
    if (params_.deterministic) llama_set_cpu_use_ref(ctx.get(), true);
    if (!adapters_.empty() && !set_adapters(ctx.get(), adapter_scales_)) {
        throw ModelLoadError(with_log_detail("llama.cpp could not set the LoRA adapters on " + what));
    }
    return ctx;
}

bool Engine::set_adapters(llama_context* ctx, const std::vector<float>& scales) const {
    std::vector<llama_adapter_lora*> raw;
    std::vector<float> kept;
    for (size_t i = 0; i < adapters_.size(); ++i) {
        if (scales[i] == 0.0f) continue;  // an adapter at scale 0 is left out of the graph
        raw.push_back(adapters_[i].get());
        kept.push_back(scales[i]);
    }
    return llama_set_adapters_lora(ctx, raw.data(), raw.size(), kept.data()) == 0;
}

void Engine::set_default_lora_scales(const std::vector<float>& scales) {
    if (scales.size() != adapters_.size()) throw std::invalid_argument("one scale per LoRA adapter is needed");
    adapter_scales_ = scales;
    states_ctx_.reset();  // made again, with these scales, when next used
}

void Engine::set_lora_scales(const std::vector<float>& scales) {
    if (scales == active_scales_) return;
    if (scales.size() != adapters_.size()) throw std::invalid_argument("one scale per LoRA adapter is needed");
    if (!set_adapters(ctx_.get(), scales)) throw Error(with_log_detail("llama.cpp could not set the LoRA adapters' scales"));
    active_scales_ = scales;
    clear_all();
}

std::string Engine::adapter_meta(int index, const std::string& key) const {
    if (index < 0 || index >= n_adapters()) throw std::out_of_range("no LoRA adapter " + std::to_string(index));
    std::vector<char> buf(256);
    int32_t n = llama_adapter_meta_val_str(adapters_[static_cast<size_t>(index)].get(), key.c_str(), buf.data(),
                                           buf.size());
    if (n < 0) return {};
    if (static_cast<size_t>(n) >= buf.size()) {
        buf.resize(static_cast<size_t>(n) + 1);
        n = llama_adapter_meta_val_str(adapters_[static_cast<size_t>(index)].get(), key.c_str(), buf.data(),
                                       buf.size());
        if (n < 0) return {};
    }
    return std::string(buf.data(), static_cast<size_t>(n));
}

int Engine::n_ctx() const { return static_cast<int>(llama_n_ctx(ctx_.get())); }

int Engine::seq_capacity() const { return static_cast<int>(llama_n_ctx_seq(ctx_.get())); }

bool Engine::abort_trampoline(void* data) {
    auto* self = static_cast<Engine*>(data);
    return self->active_check_ != nullptr && *self->active_check_ && (*self->active_check_)();
}

void Engine::check_tokens(const std::vector<int32_t>& tokens) const {
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab_) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                        std::to_string(n_vocab_) + ")");
        }
    }
}

std::vector<int32_t> Engine::tokenize(const std::string& text, bool add_special, bool parse_special) const {
    if (text.size() > static_cast<size_t>(INT32_MAX / 2)) throw std::invalid_argument("text is too long");
    std::vector<int32_t> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                               static_cast<int32_t>(out.size()), add_special, parse_special);
    if (n == INT32_MIN) throw std::invalid_argument("text produces too many tokens");
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_tokenize(vocab_, text.data(), static_cast<int32_t>(text.size()), out.data(),
                           static_cast<int32_t>(out.size()), add_special, parse_special);
        if (n < 0) throw Error("tokenization failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

std::string Engine::token_piece(int32_t token, bool render_special) const {
    char buf[256];
    int32_t n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, render_special);
    if (n >= 0) return std::string(buf, static_cast<size_t>(n));
    std::string big(static_cast<size_t>(-n), '\0');
    n = llama_token_to_piece(vocab_, token, big.data(), static_cast<int32_t>(big.size()), 0, render_special);
    if (n < 0) throw Error("detokenization failed for token " + std::to_string(token));
    big.resize(static_cast<size_t>(n));
    return big;
}

std::string Engine::detokenize(const std::vector<int32_t>& tokens) const {
    check_tokens(tokens);
    std::string out(tokens.size() * 8 + 16, '\0');
    int32_t n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                                 static_cast<int32_t>(out.size()), false, false);
    if (n < 0) {
        out.resize(static_cast<size_t>(-n));
        n = llama_detokenize(vocab_, tokens.data(), static_cast<int32_t>(tokens.size()), out.data(),
                             static_cast<int32_t>(out.size()), false, false);
        if (n < 0) throw Error("detokenization failed");
    }
    out.resize(static_cast<size_t>(n));
    return out;
}

bool Engine::is_eog(int32_t token) const { return llama_vocab_is_eog(vocab_, token); }

bool Engine::has_chat_template() const { return llama_model_chat_template(model_.get(), nullptr) != nullptr; }

int Engine::decode_checked(llama_batch& batch, const InterruptCheck& interrupted, const char* what) {
    active_check_ = &interrupted;
    clear_last_error_line();
    const int32_t rc = llama_decode(ctx_.get(), batch);
    active_check_ = nullptr;
    if (rc == 0) {
        decoded_tokens_ += batch.n_tokens;
        count_logit_rows(batch);
        return 0;
    }
    if (rc == 1) return 1;
    if (rc == 2) {
        // An abort may leave part of the batch in the cache: the batch's
        // sequences no longer hold what is recorded, the others are intact.
        std::vector<char> touched(seq_tokens_.size(), 0);
        for (int32_t i = 0; i < batch.n_tokens; ++i) {
            for (int32_t j = 0; j < batch.n_seq_id[i]; ++j) {
                const llama_seq_id s = batch.seq_id[i][j];
                if (s >= 0 && static_cast<size_t>(s) < touched.size()) touched[static_cast<size_t>(s)] = 1;
            }
        }
        for (size_t s = 0; s < touched.size(); ++s) {
            if (touched[s]) seq_clear(static_cast<int>(s));
        }
        last_logits_ = nullptr;
        last_hidden_ = nullptr;
        output_rows_.clear();
        throw Interrupted();
    }
    // A failure may leave anything in the cache: drop it all.
    clear_all();
    throw Error(with_log_detail(std::string(what) + ": llama_decode failed with code " + std::to_string(rc)));
}

void Engine::decode_with_room(llama_batch& batch, const MakeRoom& make_room, const InterruptCheck& interrupted,
                              const char* what) {
    while (decode_checked(batch, interrupted, what) == 1) {
        if (!make_room || !make_room()) {
            throw ContextLengthError(with_log_detail("no room in the KV cache (n_ctx=" + std::to_string(n_ctx()) +
                                                     ") for " + what));
        }
    }
}

void Engine::count_logit_rows(const llama_batch& batch) {
    // With embeddings on, llama.cpp outputs every position of the batch.
    for (int i = 0; i < batch.n_tokens; ++i) logit_rows_ += (embeddings_on_ || batch.logits[i] != 0) ? 1 : 0;
}

void Engine::set_embeddings(bool on) {
    if (embeddings_on_ != on) {
        llama_set_embeddings(ctx_.get(), on);
        embeddings_on_ = on;
    }
}

const std::vector<int32_t>& Engine::seq_tokens(int seq) const {
    if (seq < 0 || seq >= n_parallel()) throw std::out_of_range("sequence id out of range");
    return seq_tokens_[static_cast<size_t>(seq)];
}

void Engine::seq_clear(int seq) {
    seq_tokens(seq);
    llama_memory_seq_rm(llama_get_memory(ctx_.get()), seq, -1, -1);
    seq_tokens_[static_cast<size_t>(seq)].clear();
}

std::string Engine::seq_state(int seq) const {
    seq_tokens(seq);
    const size_t size = llama_state_seq_get_size(ctx_.get(), seq);
    std::string out(size, '\0');
    const size_t written = llama_state_seq_get_data(ctx_.get(), reinterpret_cast<uint8_t*>(out.data()), size, seq);
    if (written == 0 || written > size) throw Error("llama_state_seq_get_data failed");
    out.resize(written);
    return out;
}

void Engine::set_seq_state(int seq, const std::string& data, const std::vector<int32_t>& tokens) {
    seq_clear(seq);
    const size_t read =
        llama_state_seq_set_data(ctx_.get(), reinterpret_cast<const uint8_t*>(data.data()), data.size(), seq);
    if (read == 0) {
        seq_clear(seq);
        throw std::invalid_argument("llama.cpp could not restore the state into this context (another model, "
                                    "cache type or context size, or no room for its cells)");
    }
    const llama_pos max_pos = llama_memory_seq_pos_max(llama_get_memory(ctx_.get()), seq);
    if (max_pos + 1 != static_cast<llama_pos>(tokens.size())) {
        seq_clear(seq);
        throw std::invalid_argument("the state's cells do not match its tokens");
    }
    seq_tokens_[static_cast<size_t>(seq)] = tokens;
}

bool Engine::seq_truncate(int seq, int n) {
    auto& held = seq_tokens_.at(static_cast<size_t>(seq));
    if (n >= static_cast<int>(held.size())) return true;
    if (n <= 0 || !llama_memory_seq_rm(llama_get_memory(ctx_.get()), seq, n, -1)) {
        seq_clear(seq);
        return n <= 0;
    }
    held.resize(static_cast<size_t>(n));
    return true;
}

void Engine::seq_fork(int src, int dst, int n) {
    const auto& from = seq_tokens(src);
    seq_tokens(dst);
    if (src == dst) throw std::invalid_argument("cannot fork a sequence into itself");
    n = std::min<int>(n, static_cast<int>(from.size()));
    seq_clear(dst);
    if (n <= 0) return;
    if (params_.deterministic) {
        // Separate streams: llama.cpp copies a whole stream, in cell order.
        llama_memory_t mem = llama_get_memory(ctx_.get());
        llama_memory_seq_cp(mem, src, dst, -1, -1);
        seq_tokens_[static_cast<size_t>(dst)] = from;
        if (!seq_truncate(dst, n)) throw Error("internal error: a copied sequence could not be cut back");
        return;
    }
    llama_memory_seq_cp(llama_get_memory(ctx_.get()), src, dst, 0, n);
    seq_tokens_[static_cast<size_t>(dst)].assign(from.begin(), from.begin() + n);
}

void Engine::clear_all() {
    llama_memory_clear(llama_get_memory(ctx_.get()), true);
    for (auto& t : seq_tokens_) t.clear();
    last_logits_ = nullptr;
    last_hidden_ = nullptr;
    output_rows_.clear();
}

void Engine::append(int seq, const std::vector<int32_t>& tokens, Outputs outputs, int max_rows_per_batch,
                    const PrefillSink& sink, const MakeRoom& make_room, const InterruptCheck& interrupted,
                    bool last_hidden, bool prefill_hidden) {
    const bool hidden_only = outputs == Outputs::Hidden;
    if (hidden_only && !hidden_only_ok_) throw Error("internal error: Outputs::Hidden needs a CPU-only engine");
    const bool all_positions = outputs == Outputs::All || hidden_only;
    if (hidden_only) prefill_hidden = true;
    if (tokens.empty()) throw std::invalid_argument("the prompt has no tokens");
    check_tokens(tokens);
    auto& held = seq_tokens_.at(static_cast<size_t>(seq));
    const int start_pos = static_cast<int>(held.size());
    const int n = static_cast<int>(tokens.size());
    if (start_pos + n > seq_capacity()) {
        throw ContextLengthError("the prompt has " + std::to_string(start_pos + n) +
                                 " tokens but a sequence holds " + std::to_string(seq_capacity()));
    }
    last_logits_ = nullptr;
    last_hidden_ = nullptr;
    output_rows_.clear();
    set_embeddings((all_positions && prefill_hidden) || (last_hidden && outputs == Outputs::Last));
    int rows = params_.n_batch;
    if (all_positions && max_rows_per_batch > 0) rows = std::min(rows, max_rows_per_batch);
    rows = std::max(1, rows);
    BatchHolder holder(rows);
    llama_batch& batch = holder.batch;
    for (int start = 0; start < n; start += rows) {
        const int count = std::min(rows, n - start);
        batch.n_tokens = count;
        for (int i = 0; i < count; ++i) {
            batch.token[i] = tokens[static_cast<size_t>(start + i)];
            batch.pos[i] = start_pos + start + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = seq;
            batch.logits[i] = (all_positions || (outputs == Outputs::Last && start + i == n - 1)) ? 1 : 0;
        }
        {
            // Stopped at the final norm, the graph computes no logits: none are
            // kept either. Both undone on leaving, by an exception too.
            struct HiddenOnlyGuard {
                Engine* e;
                ~HiddenOnlyGuard() {
                    e->stop_at_norm_ = false;
                    llama_set_logits_copy(e->ctx_.get(), true);
                }
            } guard{this};
            stop_at_norm_ = hidden_only;
            llama_set_logits_copy(ctx_.get(), !hidden_only);
            decode_with_room(batch, make_room, interrupted, "the prompt");
        }
        held.insert(held.end(), tokens.begin() + start, tokens.begin() + start + count);
        if (all_positions && sink) {
            const float* logits = hidden_only ? nullptr : llama_get_logits(ctx_.get());
            const float* hidden = prefill_hidden ? llama_get_embeddings(ctx_.get()) : nullptr;
            if ((!hidden_only && logits == nullptr) || (prefill_hidden && hidden == nullptr)) {
                throw Error("llama.cpp returned no prefill outputs");
            }
            sink(start_pos + start, count, logits, hidden);
        }
        if (interrupted && start + count < n && interrupted()) throw Interrupted();
    }
    if (outputs == Outputs::None || hidden_only) return;
    last_logits_ = llama_get_logits_ith(ctx_.get(), -1);
    if (last_logits_ == nullptr) throw Error("llama.cpp returned no logits for the last prompt position");
    if (last_hidden) {
        last_hidden_ = llama_get_embeddings_ith(ctx_.get(), -1);
        if (last_hidden_ == nullptr) throw Error("llama.cpp returned no hidden state for the last position");
    }
}

void Engine::append_context(int seq, const std::vector<int32_t>& tokens, const MakeRoom& make_room,
                            const InterruptCheck& interrupted, bool hidden) {
    if (tokens.empty()) throw std::invalid_argument("the prompt has no tokens");
    if (tokens.size() > 1) {
        append(seq, std::vector<int32_t>(tokens.begin(), tokens.end() - 1), Outputs::None, 0, {}, make_room,
               interrupted);
    }
    append(seq, {tokens.back()}, Outputs::Last, 0, {}, make_room, interrupted, hidden);
}

void Engine::prefill(const std::vector<int32_t>& tokens, bool all_positions, int max_rows_per_batch,
                     const PrefillSink& sink, const InterruptCheck& interrupted) {
    if (tokens.empty()) throw std::invalid_argument("the prompt has no tokens");
    clear_all();
    append(0, tokens, all_positions ? Outputs::All : Outputs::Last, max_rows_per_batch, sink, {}, interrupted);
}

void Engine::decode(const std::vector<BatchToken>& tokens, const MakeRoom& make_room,
                    const InterruptCheck& interrupted, bool hidden) {
    if (tokens.empty()) return;
    if (static_cast<int>(tokens.size()) > params_.n_batch) throw std::invalid_argument("batch larger than n_batch");
    last_logits_ = nullptr;
    output_rows_.clear();
    set_embeddings(hidden);
    BatchHolder holder(static_cast<int>(tokens.size()));
    llama_batch& batch = holder.batch;
    batch.n_tokens = static_cast<int32_t>(tokens.size());
    std::vector<int> next_pos(seq_tokens_.size());
    for (size_t s = 0; s < seq_tokens_.size(); ++s) next_pos[s] = static_cast<int>(seq_tokens_[s].size());
    for (size_t i = 0; i < tokens.size(); ++i) {
        const BatchToken& t = tokens[i];
        seq_tokens(t.seq);
        if (t.token < 0 || t.token >= n_vocab_) throw std::invalid_argument("token id out of range");
        const int pos = next_pos[static_cast<size_t>(t.seq)]++;
        if (pos >= seq_capacity()) throw ContextLengthError("the context window is full");
        batch.token[i] = t.token;
        batch.pos[i] = pos;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = t.seq;
        batch.logits[i] = t.logits ? 1 : 0;
    }
    decode_with_room(batch, make_room, interrupted, "the next tokens");
    for (size_t i = 0; i < tokens.size(); ++i) {
        seq_tokens_[static_cast<size_t>(tokens[i].seq)].push_back(tokens[i].token);
        if (tokens[i].logits) output_rows_.push_back(static_cast<int>(i));
    }
}

const float* Engine::logits_row(int i) const {
    if (i < 0 || i >= static_cast<int>(output_rows_.size())) throw std::out_of_range("no such output row");
    const float* row = llama_get_logits_ith(ctx_.get(), output_rows_[static_cast<size_t>(i)]);
    if (row == nullptr) throw Error("llama.cpp returned no logits");
    return row;
}

const float* Engine::hidden_row(int i) const {
    if (!embeddings_on_) throw Error("internal error: the last decode computed no hidden states");
    if (i < 0 || i >= static_cast<int>(output_rows_.size())) throw std::out_of_range("no such output row");
    const float* row = llama_get_embeddings_ith(ctx_.get(), output_rows_[static_cast<size_t>(i)]);
    if (row == nullptr) throw Error("llama.cpp returned no hidden state");
    return row;
}

// A context beside the main one (reference decoding, hidden states): the
// engine's threads and Ctrl-C check, one unified cache of n_seq sequences.
void Engine::set_rope(llama_context_params& cp) const {
    cp.rope_freq_base = params_.rope_freq_base;
    cp.rope_freq_scale = params_.rope_freq_scale;
    if (!params_.rope_scaling.empty()) {
        cp.rope_scaling_type = params_.rope_scaling == "none"     ? LLAMA_ROPE_SCALING_TYPE_NONE
                               : params_.rope_scaling == "linear" ? LLAMA_ROPE_SCALING_TYPE_LINEAR
                                                                  : LLAMA_ROPE_SCALING_TYPE_YARN;
    }
    cp.yarn_orig_ctx = static_cast<uint32_t>(params_.yarn_orig_ctx);
    cp.yarn_ext_factor = params_.yarn_ext_factor;
    cp.yarn_attn_factor = params_.yarn_attn_factor;
    cp.yarn_beta_fast = params_.yarn_beta_fast;
    cp.yarn_beta_slow = params_.yarn_beta_slow;
}

llama_context_params Engine::side_context_params(uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq) const {
    llama_context_params cp = llama_context_default_params();
    set_rope(cp);
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = n_seq;
    cp.kv_unified = true;
    cp.n_threads = n_threads_;
    cp.n_threads_batch = n_threads_;
    cp.no_perf = true;
    cp.abort_callback = &Engine::abort_trampoline;
    cp.abort_callback_data = const_cast<Engine*>(this);
    return cp;
}

// The scheduler's eval callback of the states context: observe the final
// norm's output, then stop the graph there (what follows is the head). With
// embeddings on and no pooling, llama.cpp renames that same tensor
// "result_embd_pooled" when it builds the pooling step.
bool Engine::stop_after_norm(ggml_tensor* t, bool ask, void*) {
    const bool is_norm = std::strcmp(t->name, "result_norm") == 0 || std::strcmp(t->name, "result_embd_pooled") == 0;
    if (ask) return is_norm;
    return !is_norm;
}

bool Engine::main_graph_callback(ggml_tensor* t, bool ask, void* data) {
    if (!static_cast<const Engine*>(data)->stop_at_norm_) return !ask;  // nothing asked, nothing stopped
    return stop_after_norm(t, ask, nullptr);
}

void Engine::hidden_states(const std::vector<std::vector<int32_t>>& rows, const StatesSink& sink,
                           const InterruptCheck& interrupted) {
    constexpr int kRowsPerBatch = 16;
    for (const auto& row : rows) {
        if (row.empty()) throw std::invalid_argument("a row has no tokens");
        check_tokens(row);
        if (static_cast<int>(row.size()) > n_ctx()) {
            throw ContextLengthError("a row has " + std::to_string(row.size()) + " tokens but the context holds " +
                                     std::to_string(n_ctx()));
        }
    }
    if (!states_ctx_) {
        // Every position is an output here, and llama.cpp sizes its output
        // buffer (logits included) by the batch: keep batches small.
        states_batch_ = std::max(1, std::min(params_.n_batch, 64));
        llama_context_params cp = side_context_params(static_cast<uint32_t>(n_ctx()),
                                                      static_cast<uint32_t>(states_batch_), kRowsPerBatch);
        cp.pooling_type = LLAMA_POOLING_TYPE_NONE;
        cp.embeddings = true;
        cp.cb_eval = &Engine::stop_after_norm;
        cp.cb_eval_user_data = nullptr;
        states_ctx_ = new_context(cp, "a context for hidden states");
    }
    llama_context* ctx = states_ctx_.get();
    llama_memory_t mem = llama_get_memory(ctx);
    const int B = states_batch_;
    const size_t d = static_cast<size_t>(n_embd_);
    BatchHolder holder(B);
    llama_batch& batch = holder.batch;
    auto run = [&](const char* what) {
        active_check_ = &interrupted;
        clear_last_error_line();
        const int32_t rc = llama_decode(ctx, batch);
        active_check_ = nullptr;
        if (rc == 2) {
            llama_memory_clear(mem, true);
            throw Interrupted();
        }
        if (rc != 0) {
            llama_memory_clear(mem, true);
            throw Error(with_log_detail(std::string(what) + ": llama_decode failed with code " + std::to_string(rc)));
        }
        decoded_tokens_ += batch.n_tokens;
        count_logit_rows(batch);
        const float* h = llama_get_embeddings(ctx);
        if (h == nullptr) throw Error("llama.cpp returned no hidden states");
        return h;
    };
    auto put = [&](int i, int32_t token, int pos, int seq) {
        batch.token[i] = token;
        batch.pos[i] = pos;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = seq;
        batch.logits[i] = 1;
    };
    std::vector<float> long_row;
    size_t r = 0;
    while (r < rows.size()) {
        llama_memory_clear(mem, true);
        const auto& first = rows[r];
        if (static_cast<int>(first.size()) > B) {
            // A long row alone, batch after batch.
            const int len = static_cast<int>(first.size());
            long_row.resize(static_cast<size_t>(len) * d);
            for (int start = 0; start < len; start += B) {
                const int count = std::min(B, len - start);
                batch.n_tokens = count;
                for (int i = 0; i < count; ++i) put(i, first[static_cast<size_t>(start + i)], start + i, 0);
                const float* h = run("hidden states");
                std::copy(h, h + static_cast<size_t>(count) * d, long_row.begin() + static_cast<ptrdiff_t>(start * d));
            }
            sink(r, long_row.data(), len);
            ++r;
        } else {
            // Whole rows packed into one batch, one sequence each.
            int used = 0;
            std::vector<std::pair<size_t, int>> packed;  // (row, first batch index)
            while (r < rows.size() && static_cast<int>(packed.size()) < kRowsPerBatch &&
                   used + static_cast<int>(rows[r].size()) <= B) {
                const auto& row = rows[r];
                const int seq = static_cast<int>(packed.size());
                for (size_t j = 0; j < row.size(); ++j) put(used + static_cast<int>(j), row[j], static_cast<int>(j), seq);
                packed.emplace_back(r, used);
                used += static_cast<int>(row.size());
                ++r;
            }
            batch.n_tokens = used;
            const float* h = run("hidden states");
            for (const auto& [row, at] : packed) {
                sink(row, h + static_cast<size_t>(at) * d, static_cast<int>(rows[row].size()));
            }
        }
        if (interrupted && r < rows.size() && interrupted()) {
            llama_memory_clear(mem, true);
            throw Interrupted();
        }
    }
    llama_memory_clear(mem, true);
}

}  // namespace slot
