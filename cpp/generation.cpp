#include "generation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "errors.h"

namespace slot {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
    return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Start of the last UTF-8 sequence if it is incomplete, else s.size().
size_t complete_utf8_end(const std::string& s) {
    size_t i = s.size();
    int continuation = 0;
    while (i > 0 && continuation < 4) {
        const unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {
            size_t need = 1;
            if ((c & 0xE0) == 0xC0) need = 2;
            else if ((c & 0xF0) == 0xE0) need = 3;
            else if ((c & 0xF8) == 0xF0) need = 4;
            return (static_cast<size_t>(continuation) + 1 >= need) ? s.size() : i - 1;
        }
        ++continuation;
        --i;
    }
    return s.size();
}

// The longest prefix of `s`, at most `limit` bytes, that ends on a complete character.
size_t safe_emit_end(const std::string& s, size_t limit) {
    size_t end = std::min(limit, complete_utf8_end(s));
    while (end > 0 && end < s.size() && (static_cast<unsigned char>(s[end]) & 0xC0) == 0x80) --end;
    return end;
}

}  // namespace

Session::Session(const EngineParams& params) : engine_(std::make_unique<Engine>(params)) {
    const char* portable = std::getenv("SLOT_CPP_PORTABLE_HEAD_OPS");
    portable_head_ops_ = portable != nullptr && std::string(portable) == "1";
}

namespace {

// The device that holds the offloaded layers (the first GPU), or null for the
// CPU: SLOT's head products run where the model's output runs.
ggml_backend_dev_t head_device(const EngineParams& params) {
    if (params.n_gpu_layers == 0) return nullptr;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) return dev;
    }
    return nullptr;
}

}  // namespace

void Session::close() {
    std::lock_guard<std::mutex> lock(mutex_);
    head_.reset();
    backend_.reset();
    engine_.reset();
}

bool Session::closed() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return !engine_;
}

Engine& Session::engine() {
    if (!engine_) throw Error("the model is closed");
    return *engine_;
}

OutputHead& Session::head() {
    Engine& e = engine();
    if (!head_) {
        const ModelFileInfo& info = e.file_info();
        const std::string reason = info.slot_unsupported_reason();
        if (!reason.empty()) throw UnsupportedModelError("SLOT cannot be applied exactly: " + reason);
        if (info.head.ne0 != e.n_embd() || info.head.ne1 != e.n_vocab()) {
            throw UnsupportedModelError("the output head's shape (" + std::to_string(info.head.ne1) + " x " +
                                        std::to_string(info.head.ne0) + ") does not match the model (" +
                                        std::to_string(e.n_vocab()) + " x " + std::to_string(e.n_embd()) + ")");
        }
        auto backend = std::make_unique<ComputeBackend>(e.n_threads(), head_device(e.params()));
        head_ = std::make_unique<OutputHead>(info, *backend, portable_head_ops_);
        backend_ = std::move(backend);
    }
    return *head_;
}

std::string Session::slot_backend() {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputHead& h = head();
    std::string out = h.backend().name();
    if (h.portable_ops()) {
        out += " (portable ggml ops; transposed head copy " +
               std::to_string((h.transposed_copy_bytes() + (1u << 19)) >> 20) + " MiB)";
    } else {
        out += " (CPU head kernels)";
    }
    return out;
}

GenerationResult Session::generate(const GenerationRequest& req, const TextCallback& on_text,
                                   const InterruptCheck& interrupted) {
    std::lock_guard<std::mutex> lock(mutex_);
    Engine& e = engine();
    validate(req.sampling);
    validate(req.slot);
    if (req.max_tokens < 0) throw std::invalid_argument("max_tokens must be >= 0");
    if (req.prompt.empty()) throw std::invalid_argument("the prompt is empty");
    for (const auto& s : req.stop) {
        if (s.empty()) throw std::invalid_argument("stop strings must not be empty");
    }
    e.check_tokens(req.prompt);
    const int n_prompt = static_cast<int>(req.prompt.size());
    if (n_prompt > e.n_ctx() || (n_prompt == e.n_ctx() && req.max_tokens > 0)) {
        throw ContextLengthError("the prompt has " + std::to_string(n_prompt) + " tokens but the context holds " +
                                 std::to_string(e.n_ctx()) + "; use a larger n_ctx or a shorter prompt");
    }
    const bool given_delta = !req.delta.empty();
    if (given_delta) {
        if (static_cast<int>(req.delta.size()) != e.n_embd()) {
            throw std::invalid_argument("delta has " + std::to_string(req.delta.size()) + " values but the model's "
                                        "hidden size is " + std::to_string(e.n_embd()));
        }
        for (float x : req.delta) {
            if (!std::isfinite(x)) throw std::invalid_argument("delta contains a non-finite value");
        }
    }
    const bool learn = !given_delta && req.slot.steps > 0;

    GenerationResult res;
    res.prompt_tokens = n_prompt;
    std::vector<float> bias;

    if (learn || given_delta) head();  // load the head (or refuse the model) outside the timings
    auto t0 = Clock::now();
    if (learn && n_prompt >= 2) {
        OutputHead& h = head();
        PromptCache cache(h, req.prompt, req.slot);
        fill_prompt_cache(e, cache, req.prompt, interrupted);
        res.prefill_seconds = seconds_since(t0);
        t0 = Clock::now();
        SlotOutcome outcome = cache.optimise(req.slot, interrupted);
        res.delta = std::move(outcome.delta);
        res.losses = std::move(outcome.losses);
        res.steps_done = outcome.steps_done;
        res.slot_status = outcome.stop_reason;
        res.slot_path = outcome.path;
        res.slot_cache_bytes = outcome.cache_bytes;
        res.slot_profile = outcome.profile;
    } else {
        e.prefill(req.prompt, false, 0, {}, interrupted);
        res.prefill_seconds = seconds_since(t0);
        t0 = Clock::now();
        if (learn) {
            res.delta.assign(static_cast<size_t>(e.n_embd()), 0.0f);
            res.slot_status = "no loss positions (the prompt has one token)";
        } else if (given_delta) {
            res.delta = req.delta;
            res.slot_status = "given delta";
        } else {
            res.slot_status = "no steps requested";
        }
    }
    const bool any_delta = std::any_of(res.delta.begin(), res.delta.end(), [](float x) { return x != 0.0f; });
    if (any_delta) {
        bias.resize(static_cast<size_t>(e.n_vocab()));
        head().project(res.delta.data(), bias.data());
    }
    res.optimise_seconds = learn || given_delta ? seconds_since(t0) : 0.0;

    t0 = Clock::now();
    Sampler sampler(req.sampling, e.n_vocab());
    std::vector<int32_t> history(req.prompt);
    size_t max_stop = 0;
    for (const auto& s : req.stop) max_stop = std::max(max_stop, s.size());
    std::string& text = res.text;
    size_t emitted = 0;
    bool stopped_by_callback = false;
    auto emit = [&](size_t end) {
        if (!on_text || stopped_by_callback || end <= emitted) return;
        if (!on_text(text.substr(emitted, end - emitted))) stopped_by_callback = true;
        emitted = end;
    };

    res.finish_reason = "length";
    int pos = n_prompt;
    for (int i = 0; i < req.max_tokens; ++i) {
        const int32_t tok = sampler.sample(e.last_logits(), bias.empty() ? nullptr : bias.data(), history);
        if (!req.ignore_eos && e.is_eog(tok)) {
            res.finish_reason = "eos";
            break;
        }
        res.tokens.push_back(tok);
        history.push_back(tok);
        const size_t before = text.size();
        text += e.token_piece(tok);
        size_t found = std::string::npos;
        if (max_stop > 0) {
            const size_t from = before >= max_stop ? before - max_stop + 1 : 0;
            for (const auto& s : req.stop) found = std::min(found, text.find(s, from));
        }
        if (found != std::string::npos) {
            text.resize(found);
            res.finish_reason = "stop";
            break;
        }
        emit(safe_emit_end(text, text.size() - std::min(text.size(), max_stop > 0 ? max_stop - 1 : size_t(0))));
        if (stopped_by_callback) {
            res.finish_reason = "callback";
            break;
        }
        if (i + 1 == req.max_tokens) break;
        if (pos >= e.n_ctx()) {
            res.finish_reason = "context_full";
            break;
        }
        e.decode_next(tok, pos++, interrupted);
        if (interrupted && interrupted()) throw Interrupted();
    }
    emit(text.size());
    res.generate_seconds = seconds_since(t0);
    return res;
}

std::vector<int32_t> Session::tokenize(const std::string& text, bool add_special, bool parse_special) {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine().tokenize(text, add_special, parse_special);
}

std::string Session::detokenize(const std::vector<int32_t>& tokens) {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine().detokenize(tokens);
}

std::string Session::token_piece(int32_t token) {
    std::lock_guard<std::mutex> lock(mutex_);
    Engine& e = engine();
    e.check_tokens({token});
    return e.token_piece(token, true);
}

std::string Session::apply_chat_template(const std::vector<ChatMessage>& messages, bool add_assistant,
                                         const std::string& template_name) {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine().apply_chat_template(messages, add_assistant, template_name);
}

const ModelFileInfo& Session::file_info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine().file_info();
}

int Session::n_vocab() { std::lock_guard<std::mutex> lock(mutex_); return engine().n_vocab(); }
int Session::n_embd() { std::lock_guard<std::mutex> lock(mutex_); return engine().n_embd(); }
int Session::n_ctx() { std::lock_guard<std::mutex> lock(mutex_); return engine().n_ctx(); }
int Session::n_threads() { std::lock_guard<std::mutex> lock(mutex_); return engine().n_threads(); }
bool Session::has_chat_template() { std::lock_guard<std::mutex> lock(mutex_); return engine().has_chat_template(); }
bool Session::is_eog(int32_t token) { std::lock_guard<std::mutex> lock(mutex_); return engine().is_eog(token); }

std::vector<float> Session::output_matrix() {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputHead& h = head();
    std::vector<float> w(static_cast<size_t>(h.n_vocab() * h.n_embd()));
    h.dequantize(w.data());
    return w;
}

void Session::prompt_states(const std::vector<int32_t>& tokens, std::vector<float>& hidden,
                            std::vector<float>& logits, const InterruptCheck& interrupted) {
    std::lock_guard<std::mutex> lock(mutex_);
    Engine& e = engine();
    const size_t V = static_cast<size_t>(e.n_vocab()), d = static_cast<size_t>(e.n_embd());
    hidden.assign(tokens.size() * d, 0.0f);
    logits.assign(tokens.size() * V, 0.0f);
    e.prefill(tokens, true, 0,
              [&](int first, int count, const float* z, const float* h) {
                  std::copy(z, z + static_cast<size_t>(count) * V, logits.begin() + static_cast<ptrdiff_t>(first * V));
                  std::copy(h, h + static_cast<size_t>(count) * d, hidden.begin() + static_cast<ptrdiff_t>(first * d));
              },
              interrupted);
}

double Session::slot_loss_and_gradient(const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                                       bool recompute, std::vector<float>& grad, const InterruptCheck& interrupted) {
    std::lock_guard<std::mutex> lock(mutex_);
    Engine& e = engine();
    if (tokens.size() < 2) throw std::invalid_argument("the prompt needs at least two tokens for a SLOT loss");
    OutputHead& h = head();
    SlotConfig config;
    config.recompute = recompute;
    PromptCache cache(h, tokens, config);
    fill_prompt_cache(e, cache, tokens, interrupted);
    return cache.loss_and_gradient(delta, grad, interrupted);
}

std::vector<float> Session::logit_bias(const std::vector<float>& delta) {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputHead& h = head();
    if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
    std::vector<float> b(static_cast<size_t>(h.n_vocab()));
    h.project(delta.data(), b.data());
    return b;
}

std::vector<double> Session::token_logprobs(const std::vector<int32_t>& tokens, int first,
                                            const std::vector<float>& delta, const InterruptCheck& interrupted) {
    std::lock_guard<std::mutex> lock(mutex_);
    Engine& e = engine();
    if (first < 1 || first >= static_cast<int>(tokens.size())) {
        throw std::invalid_argument("first must index a token after the first one");
    }
    const int64_t V = e.n_vocab();
    std::vector<float> bias;
    if (!delta.empty()) {
        OutputHead& h = head();
        if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
        bias.resize(static_cast<size_t>(V));
        h.project(delta.data(), bias.data());
    }
    std::vector<double> out;
    out.reserve(tokens.size() - static_cast<size_t>(first));
    std::vector<float> row(static_cast<size_t>(V));
    // Row r's logits predict tokens[r + 1]; only rows first-1 .. N-2 are scored.
    e.prefill(tokens, true, 256,
              [&](int start, int count, const float* logits, const float*) {
                  for (int i = 0; i < count; ++i) {
                      const int r = start + i;
                      if (r < first - 1 || r + 1 >= static_cast<int>(tokens.size())) continue;
                      const float* z = logits + static_cast<size_t>(i) * static_cast<size_t>(V);
                      if (!bias.empty()) {
                          for (int64_t v = 0; v < V; ++v) row[static_cast<size_t>(v)] = z[v] + bias[static_cast<size_t>(v)];
                          z = row.data();
                      }
                      const int32_t y = tokens[static_cast<size_t>(r + 1)];
                      out.push_back(static_cast<double>(z[y]) - log_sum_exp(z, V));
                  }
              },
              interrupted);
    return out;
}

std::vector<int32_t> Session::reference_greedy(const std::vector<int32_t>& prompt, int n_new,
                                               const InterruptCheck& interrupted, double* decode_seconds) {
    std::lock_guard<std::mutex> lock(mutex_);
    return engine().reference_greedy(prompt, n_new, interrupted, decode_seconds);
}

}  // namespace slot
