// Session: one loaded model and its batcher. Every call that may wait for
// the session mutex, or runs long, goes through without_gil (bind_common.h)
// or kNoGil; long ones take its interrupt check.
#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "probes.h"
#include "session.h"

namespace slot::bind {
namespace {

// For methods bound directly: they take the session mutex (or the engine's
// lifetime lock), which must not be waited for while holding the GIL.
const auto kNoGil = py::call_guard<py::gil_scoped_release>();

py::dict stats_dict(const BatchStats& st) {
    py::dict d;
    d["waiting_requests"] = st.waiting_requests;
    d["live_sequences"] = st.live_sequences;
    d["completed_calls"] = st.completed_calls;
    d["failed_calls"] = st.failed_calls;
    d["generated_tokens"] = st.generated_tokens;
    d["decode_steps"] = st.decode_steps;
    d["prompt_tokens"] = st.prompt_tokens;
    d["cached_tokens"] = st.cached_tokens;
    d["slot_requests"] = st.slot_requests;
    d["rtd_requests"] = st.rtd_requests;
    return d;
}

py::dict file_info_dict(const ModelFileInfo& i) {
    py::dict d;
    d["path"] = i.path;
    d["architecture"] = i.architecture;
    d["name"] = i.name;
    d["n_embd"] = i.n_embd;
    d["n_vocab"] = i.n_vocab;
    d["n_tensors"] = i.n_tensors;
    d["head_tensor"] = i.head.name;
    d["head_type"] = std::string(ggml_type_name(i.head.type));
    d["tied_embeddings"] = i.tied_embeddings;
    d["head_bias"] = i.has_head_bias;
    d["final_logit_softcapping"] = i.final_logit_softcapping;
    d["logit_scale"] = i.logit_scale;
    d["chat_template"] = i.chat_template;
    d["file_size"] = i.file_size;
    d["slot_unsupported_reason"] = i.slot_unsupported_reason();
    return d;
}

// Generation: the batch loop's calls and counters.
void def_generation(py::class_<Session>& cls) {
    cls
        .def("generate_batch",
             [](Session& s, const std::vector<GenerationRequest>& requests, py::object on_text, py::object cancel) {
                 BatchTextCallback callback;
                 if (!on_text.is_none()) {
                     py::object* fn = &on_text;  // owned by this frame, which outlives the call's callbacks
                     callback = [fn](int index, const std::string& piece) {
                         py::gil_scoped_acquire gil;
                         py::object r = (*fn)(index, py::bytes(piece));
                         return r.is_none() || r.cast<bool>();
                     };
                 }
                 return without_gil(
                     [&](const InterruptCheck& check) { return s.generate_batch(requests, callback, check); }, cancel);
             },
             py::arg("requests"), py::arg("on_text"), py::arg("cancel") = py::none())
        .def("set_max_waiting", &Session::set_max_waiting, py::arg("n"), kNoGil)
        .def("stats", [](Session& s) { return stats_dict(without_gil([&] { return s.stats(); })); })
        .def("clear_cache", &Session::clear_cache, kNoGil)
        .def("drop_cached", &Session::drop_cached, py::arg("prefix"), kNoGil)
        .def_property_readonly("n_parallel", py::cpp_function(&Session::n_parallel, kNoGil))
        .def_property_readonly("decoded_tokens", py::cpp_function(&Session::decoded_tokens, kNoGil))
        .def_property_readonly("logit_rows", py::cpp_function(&Session::logit_rows, kNoGil));
}

// Tokens, chat templates, adapters and file information.
void def_model_info(py::class_<Session>& cls) {
    cls
        .def("adapter_meta", &Session::adapter_meta, py::arg("index"), py::arg("key"), kNoGil)
        .def_property_readonly("n_adapters", py::cpp_function(&Session::n_adapters, kNoGil))
        .def_property_readonly("eos_token", py::cpp_function(&Session::eos_token, kNoGil))
        .def("tokenize", &Session::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"),
             kNoGil)
        // Text comes back as bytes: a token's piece may be part of a UTF-8 sequence.
        .def("detokenize",
             [](Session& s, const std::vector<int32_t>& t) {
                 return py::bytes(without_gil([&] { return s.detokenize(t); }));
             },
             py::arg("tokens"))
        .def("token_piece",
             [](Session& s, int32_t t) { return py::bytes(without_gil([&] { return s.token_piece(t); })); },
             py::arg("token"))
        .def(
            "chat_templates",
            [](Session& s, const std::string& source, bool jinja) {
                return std::const_pointer_cast<ChatTemplates>(
                    without_gil([&] { return s.chat_templates(source, jinja); }));
            },
            py::arg("source"), py::arg("jinja"))
        .def(
            "apply_chat",
            [](Session& s, const ChatTemplates& t, const std::string& messages_json, const std::string& tools_json,
               const std::string& tool_choice, bool parallel_tool_calls, bool add_generation_prompt,
               const std::string& reasoning_format, bool enable_thinking, const std::string& template_kwargs_json) {
                ChatRequest r{messages_json,         tools_json,       tool_choice,
                              parallel_tool_calls,   add_generation_prompt, reasoning_format,
                              enable_thinking,       template_kwargs_json};
                return without_gil([&] { return s.apply_chat(t, r); });
            },
            py::arg("templates"), py::arg("messages_json"), py::arg("tools_json"), py::arg("tool_choice"),
            py::arg("parallel_tool_calls"), py::arg("add_generation_prompt"), py::arg("reasoning_format"),
            py::arg("enable_thinking"), py::arg("template_kwargs_json"))
        // Saved states: a sequence's KV cells as bytes (llama_state_seq_*).
        .def("slots",
             [](Session& s) {
                 py::list out;
                 for (auto& slot : without_gil([&] { return s.slots(); })) {
                     py::dict d;
                     d["id"] = slot.id;
                     d["live"] = slot.live;
                     d["tokens"] = slot.tokens;
                     out.append(d);
                 }
                 return out;
             })
        .def(
            "cached_state",
            [](Session& s, const std::vector<int32_t>& tokens) {
                return py::bytes(without_gil([&] { return s.cached_state(tokens); }));
            },
            py::arg("tokens"))
        .def(
            "seq_state",
            [](Session& s, int seq) {
                auto st = without_gil([&] { return s.seq_state(seq); });
                return py::make_tuple(st.tokens, py::bytes(st.data), st.lora_scales);
            },
            py::arg("seq"))
        .def(
            "restore_state",
            [](Session& s, const std::vector<int32_t>& tokens, const py::bytes& data, int seq,
               const std::vector<float>& lora_scales) {
                std::string bytes = data;
                return without_gil([&] { return s.restore_state(tokens, bytes, seq, lora_scales); });
            },
            py::arg("tokens"), py::arg("data"), py::arg("seq"), py::arg("lora_scales"))
        .def("erase_seq", &Session::erase_seq, py::arg("seq"), kNoGil)
        .def("lora_defaults", &Session::lora_defaults, kNoGil)
        .def("set_lora_defaults", &Session::set_lora_defaults, py::arg("scales"), kNoGil)
        // A copy of the file information, taken under the mutex, converted after.
        .def("file_info",
             [](Session& s) { return file_info_dict(without_gil([&] { return ModelFileInfo(s.file_info()); })); })
        .def_property_readonly("n_vocab", py::cpp_function(&Session::n_vocab, kNoGil))
        .def_property_readonly("n_embd", py::cpp_function(&Session::n_embd, kNoGil))
        .def_property_readonly("n_ctx", py::cpp_function(&Session::n_ctx, kNoGil))
        .def_property_readonly("seq_capacity", py::cpp_function(&Session::seq_capacity, kNoGil))
        .def_property_readonly("deterministic", py::cpp_function(&Session::deterministic, kNoGil))
        .def_property_readonly("n_threads", py::cpp_function(&Session::n_threads, kNoGil))
        .def_property_readonly("has_chat_template", py::cpp_function(&Session::has_chat_template, kNoGil))
        .def("is_eog", &Session::is_eog, py::arg("token"), kNoGil);
}

// The probes (probes.h) and the reference loops (Engine's, through with_model).
void def_probes(py::class_<Session>& cls) {
    cls
        .def("slot_backend", [](Session& s) { return probes::slot_backend(s); }, kNoGil)
        .def("output_matrix",
             [](Session& s) {
                 std::vector<float> w;
                 int n_embd = 0;
                 without_gil([&] {
                     w = probes::output_matrix(s);
                     n_embd = s.n_embd();
                 });
                 const auto d = static_cast<py::ssize_t>(n_embd);
                 return to_numpy(w, {static_cast<py::ssize_t>(w.size()) / d, d});
             })
        .def("prompt_states",
             [](Session& s, const std::vector<int32_t>& tokens) {
                 std::vector<float> hidden, logits;
                 int n_embd = 0, n_vocab = 0;
                 without_gil([&](const InterruptCheck& check) {
                     probes::prompt_states(s, tokens, hidden, logits, check);
                     n_embd = s.n_embd();
                     n_vocab = s.n_vocab();
                 });
                 const auto n = static_cast<py::ssize_t>(tokens.size());
                 return py::make_tuple(to_numpy(hidden, {n, static_cast<py::ssize_t>(n_embd)}),
                                       to_numpy(logits, {n, static_cast<py::ssize_t>(n_vocab)}));
             },
             py::arg("tokens"))
        .def("slot_loss_and_gradient",
             [](Session& s, const std::vector<int32_t>& tokens, const FloatArray& delta, bool recompute,
                const std::string& cache_precision, double cache_tail_mass) {
                 std::vector<float> d = from_numpy(delta), grad;
                 double bound = 0.0;
                 const double loss = without_gil([&](const InterruptCheck& check) {
                     return probes::slot_loss_and_gradient(s, tokens, d, recompute, cache_precision, cache_tail_mass, grad,
                                                            bound, check);
                 });
                 return py::make_tuple(loss, to_numpy(grad), bound);
             },
             py::arg("tokens"), py::arg("delta"), py::arg("recompute"), py::arg("cache_precision"),
             py::arg("cache_tail_mass"))
        .def("logit_bias",
             [](Session& s, const FloatArray& delta) {
                 const std::vector<float> d = from_numpy(delta);
                 return to_numpy(without_gil([&] { return probes::logit_bias(s, d); }));
             },
             py::arg("delta"))
        .def("head_logits",
             [](Session& s, const FloatArray& hidden) {
                 const std::vector<float> h = from_numpy(hidden);
                 return to_numpy(without_gil([&] { return probes::head_logits(s, h); }));
             },
             py::arg("hidden"))
        .def("token_logprobs",
             [](Session& s, const std::vector<int32_t>& tokens, int first, py::object delta) {
                 std::vector<float> d;
                 if (!delta.is_none()) d = from_numpy(delta.cast<FloatArray>());
                 return without_gil(
                     [&](const InterruptCheck& check) { return probes::token_logprobs(s, tokens, first, d, check); });
             },
             py::arg("tokens"), py::arg("first"), py::arg("delta"))
        // The test-only reference loops (Engine's, reference_loop.cpp), only while no
        // generate call runs: tokens and decode seconds.
        .def("reference_greedy",
             [](Session& s, const std::vector<int32_t>& prompt, int n_new) {
                 double seconds = 0.0;
                 auto out = without_gil([&](const InterruptCheck& check) {
                     return s.with_model("reference_greedy", [&](Session::ModelAccess& m) {
                         return m.engine().reference_greedy(prompt, n_new, check, &seconds);
                     });
                 });
                 return py::make_tuple(out, seconds);
             },
             py::arg("prompt"), py::arg("n_new"))
        .def("reference_greedy_batch",
             [](Session& s, const std::vector<std::vector<int32_t>>& prompts, int n_new) {
                 double seconds = 0.0;
                 auto out = without_gil([&](const InterruptCheck& check) {
                     return s.with_model("reference_greedy_batch", [&](Session::ModelAccess& m) {
                         return m.engine().reference_greedy_batch(prompts, n_new, check, &seconds);
                     });
                 });
                 return py::make_tuple(out, seconds);
             },
             py::arg("prompts"), py::arg("n_new"));
}

// Datastores: hidden states for keys, and RTD indexes on the model's device.
void def_datastores(py::class_<Session>& cls) {
    cls
        .def("hidden_states",
             [](Session& s, const std::vector<std::vector<int32_t>>& rows,
                const std::vector<std::pair<int, int>>& spans) {
                 if (spans.size() != rows.size()) throw std::invalid_argument("one span per row is needed");
                 size_t total = 0;
                 for (size_t r = 0; r < rows.size(); ++r) {
                     const auto [a, b] = spans[r];
                     if (a < 0 || b < a || static_cast<size_t>(b) > rows[r].size()) {
                         throw std::invalid_argument("span " + std::to_string(r) + " is outside its row");
                     }
                     total += static_cast<size_t>(b - a);
                 }
                 const int n_embd = without_gil([&] { return s.n_embd(); });
                 const auto d = static_cast<size_t>(n_embd);
                 std::vector<size_t> at(rows.size(), 0);
                 for (size_t r = 1; r < rows.size(); ++r) {
                     at[r] = at[r - 1] + static_cast<size_t>(spans[r - 1].second - spans[r - 1].first);
                 }
                 // Only each row's span is kept, written straight into the result.
                 std::vector<float> out(total * d);
                 without_gil([&](const InterruptCheck& check) {
                     probes::hidden_states(s, rows, [&](size_t row, const float* h, int) {
                         const auto [a, b] = spans[row];
                         std::copy(h + static_cast<size_t>(a) * d, h + static_cast<size_t>(b) * d,
                                   out.begin() + static_cast<ptrdiff_t>(at[row] * d));
                     }, check);
                 });
                 return to_numpy(out, {static_cast<py::ssize_t>(total), static_cast<py::ssize_t>(n_embd)});
             },
             py::arg("rows"), py::arg("spans"))
        .def("make_rtd_index",
             [](Session& s, py::array keys, py::array values, int heads) {
                 if (keys.ndim() != 2 || keys.itemsize() != 2 || !(keys.flags() & py::array::c_style) ||
                     keys.dtype().kind() != 'f') {
                     throw std::invalid_argument("keys must be a C-contiguous float16 array of shape (n, dim)");
                 }
                 if (values.ndim() != 1 || values.itemsize() != 4 || values.dtype().kind() != 'i' ||
                     !(values.flags() & py::array::c_style)) {
                     throw std::invalid_argument("values must be a contiguous int32 array");
                 }
                 if (values.shape(0) != keys.shape(0)) throw std::invalid_argument("keys and values differ in length");
                 // The arrays (often memory-mapped) stay alive as long as the index;
                 // the index may be freed on a thread without the GIL.
                 auto* owner = new py::object(py::make_tuple(keys, values));
                 std::shared_ptr<void> keepalive(owner, [](void* p) {
                     py::gil_scoped_acquire gil;
                     delete static_cast<py::object*>(p);
                 });
                 const auto* k = static_cast<const uint16_t*>(keys.data());
                 const auto* v = static_cast<const int32_t*>(values.data());
                 const int64_t n = keys.shape(0), dim = keys.shape(1);
                 return without_gil([&] { return probes::make_rtd_index(s, k, v, n, dim, heads, std::move(keepalive)); });
             },
             py::arg("keys"), py::arg("values"), py::arg("heads"));
}

}  // namespace

void bind_session(py::module_& m) {
    py::class_<Session> cls(m, "Session");
    cls
        .def(py::init([](const std::string& path, int n_ctx, int n_batch, int n_threads, int n_gpu_layers,
                         int n_parallel, bool use_mmap, const std::vector<std::string>& rpc_servers,
                         const std::vector<std::pair<std::string, float>>& loras, bool deterministic,
                         const std::string& cache_type_k, const std::string& cache_type_v,
                         const std::string& flash_attn, float rope_freq_base, float rope_freq_scale,
                         bool use_mlock, const std::string& rope_scaling, int yarn_orig_ctx, float yarn_ext_factor,
                         float yarn_attn_factor, float yarn_beta_fast, float yarn_beta_slow,
                         const std::vector<std::tuple<std::string, std::string, std::string>>& kv_overrides,
                         const std::string& draft_model) {
                 EngineParams p;
                 p.rope_scaling = rope_scaling;
                 p.yarn_orig_ctx = yarn_orig_ctx;
                 p.yarn_ext_factor = yarn_ext_factor;
                 p.yarn_attn_factor = yarn_attn_factor;
                 p.yarn_beta_fast = yarn_beta_fast;
                 p.yarn_beta_slow = yarn_beta_slow;
                 for (const auto& [key, type, value] : kv_overrides) p.kv_overrides.push_back({key, type, value});
                 p.deterministic = deterministic;
                 p.cache_type_k = cache_type_k;
                 p.cache_type_v = cache_type_v;
                 p.flash_attn = flash_attn;
                 p.rope_freq_base = rope_freq_base;
                 p.rope_freq_scale = rope_freq_scale;
                 p.use_mlock = use_mlock;
                 p.rpc_servers = rpc_servers;
                 p.loras = loras;
                 p.model_path = path;
                 p.n_ctx = n_ctx;
                 p.n_batch = n_batch;
                 p.n_threads = n_threads;
                 p.n_gpu_layers = n_gpu_layers;
                 p.n_parallel = n_parallel;
                 p.use_mmap = use_mmap;
                 return std::make_unique<Session>(p, draft_model);
             }),
             py::arg("path"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("n_gpu_layers"),
             py::arg("n_parallel"), py::arg("use_mmap"), py::arg("rpc_servers") = std::vector<std::string>{},
             py::arg("loras") = std::vector<std::pair<std::string, float>>{}, py::arg("deterministic") = false,
             py::arg("cache_type_k") = "f16", py::arg("cache_type_v") = "f16", py::arg("flash_attn") = "auto",
             py::arg("rope_freq_base") = 0.0f, py::arg("rope_freq_scale") = 0.0f, py::arg("use_mlock") = false,
             py::arg("rope_scaling") = "", py::arg("yarn_orig_ctx") = 0, py::arg("yarn_ext_factor") = -1.0f,
             py::arg("yarn_attn_factor") = -1.0f, py::arg("yarn_beta_fast") = -1.0f, py::arg("yarn_beta_slow") = -1.0f,
             py::arg("kv_overrides") = std::vector<std::tuple<std::string, std::string, std::string>>{},
             py::arg("draft_model") = "", kNoGil)
        .def("close", &Session::close, kNoGil)
        .def_property_readonly("closed", py::cpp_function(&Session::closed, kNoGil));
    def_generation(cls);
    def_model_info(cls);
    def_probes(cls);
    def_datastores(cls);
}

}  // namespace slot::bind
