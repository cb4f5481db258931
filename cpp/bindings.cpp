// Python bindings. Binding code only: argument conversion, GIL handling,
// interrupt checks and exception translation; the work lives in the other files.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <memory>

#include "errors.h"
#include "generation.h"
#include "log.h"

namespace py = pybind11;

namespace {

using slot::InterruptCheck;

// Checks for Ctrl-C (and, when given, the caller's cancel callable) at most
// every 20 ms, re-acquiring the GIL only then. Once true, the check stays
// true for the rest of the call; `cancelled` says whether `cancel` made it so.
struct InterruptState {
    std::atomic<bool> hit{false};
    std::atomic<bool> cancelled{false};
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    py::handle cancel;  // borrowed from the binding's frame, which outlives every check
};

InterruptCheck make_interrupt_check(const std::shared_ptr<InterruptState>& state) {
    return [state]() -> bool {
        if (state->hit.load()) return true;
        const auto now = std::chrono::steady_clock::now();
        if (now - state->last < std::chrono::milliseconds(20)) return false;
        state->last = now;
        py::gil_scoped_acquire gil;
        if (PyErr_CheckSignals() != 0) {
            PyErr_Clear();
            state->hit.store(true);
            return true;
        }
        if (state->cancel && !state->cancel.is_none()) {  // NOLINT: handle, no reference taken
            bool stop = false;
            try {
                stop = state->cancel().cast<bool>();
            } catch (py::error_already_set& e) {
                e.discard_as_unraisable("slot_cpp cancel check");
                stop = true;
            }
            if (stop) {
                state->cancelled.store(true);
                state->hit.store(true);
                return true;
            }
        }
        return false;
    };
}

InterruptCheck make_interrupt_check() { return make_interrupt_check(std::make_shared<InterruptState>()); }

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

std::vector<float> from_numpy(const py::array_t<float, py::array::c_style | py::array::forcecast>& a) {
    return std::vector<float>(a.data(), a.data() + a.size());
}

py::object g_log_sink;  // the Python callable; cleared at interpreter exit

// Every Session call takes the session's mutex, which a generating thread
// holds while it briefly needs the GIL (Ctrl-C checks, callbacks): so no
// Session call may wait for the mutex while holding the GIL.
const auto kNoGil = py::call_guard<py::gil_scoped_release>();

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "slot_cpp native core (llama.cpp engine, output head, SLOT optimiser, sampler)";
#ifdef SLOT_CPP_VERSION
    m.attr("__version__") = SLOT_CPP_VERSION;
#endif
#ifdef SLOT_CPP_LLAMA_SOURCE
    m.attr("llama_cpp_source") = SLOT_CPP_LLAMA_SOURCE;
#else
    m.attr("llama_cpp_source") = "unknown";
#endif

    auto base = py::register_exception<slot::Error>(m, "SlotError", PyExc_RuntimeError);
    py::register_exception<slot::ModelLoadError>(m, "ModelLoadError", base.ptr());
    py::register_exception<slot::UnsupportedModelError>(m, "UnsupportedModelError", base.ptr());
    py::register_exception<slot::ContextLengthError>(m, "ContextLengthError", base.ptr());
    py::register_exception<slot::QueueFullError>(m, "QueueFullError", base.ptr());
    py::register_exception<slot::Cancelled>(m, "GenerationCancelled", base.ptr());
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const slot::Interrupted&) {
            PyErr_SetNone(PyExc_KeyboardInterrupt);
        }
    });

    m.def("set_log_sink", [](py::object sink, int min_level) {
        g_log_sink = sink;
        if (sink.is_none()) {
            slot::set_log_sink(nullptr, min_level);
            return;
        }
        slot::set_log_sink([](int level, const std::string& line) {
            if (!Py_IsInitialized()) return;
            py::gil_scoped_acquire gil;
            if (!g_log_sink || g_log_sink.is_none()) return;
            try {
                g_log_sink(level, py::bytes(line));
            } catch (py::error_already_set& e) {
                e.discard_as_unraisable("slot_cpp log sink");
            }
        }, min_level);
        slot::install_log_callback();
    }, py::arg("sink"), py::arg("min_level"));
    m.def("set_log_level", &slot::set_log_level, py::arg("min_level"));
    m.def("system_info", [] { return std::string(llama_print_system_info()); });
    m.def("supports_gpu_offload", [] { return llama_supports_gpu_offload(); });
    m.def("chat_templates", [] {
        std::vector<const char*> names(64);
        int32_t n = llama_chat_builtin_templates(names.data(), names.size());
        if (n > static_cast<int32_t>(names.size())) {
            names.resize(static_cast<size_t>(n));
            n = llama_chat_builtin_templates(names.data(), names.size());
        }
        return std::vector<std::string>(names.begin(), names.begin() + std::max(0, n));
    });
    m.def("backend_devices", [] {
        std::vector<std::string> out;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            out.push_back(std::string(ggml_backend_dev_name(dev)) + ": " + ggml_backend_dev_description(dev));
        }
        return out;
    });

    py::class_<slot::GenerationResult>(m, "RawResult")
        .def_property_readonly("text_bytes", [](const slot::GenerationResult& r) { return py::bytes(r.text); })
        .def_readonly("tokens", &slot::GenerationResult::tokens)
        .def_readonly("finish_reason", &slot::GenerationResult::finish_reason)
        .def_property_readonly("delta", [](const slot::GenerationResult& r) -> py::object {
            if (r.delta.empty()) return py::none();
            return to_numpy(r.delta, {static_cast<py::ssize_t>(r.delta.size())});
        })
        .def_readonly("losses", &slot::GenerationResult::losses)
        .def_readonly("steps_done", &slot::GenerationResult::steps_done)
        .def_readonly("slot_lr", &slot::GenerationResult::slot_lr)
        .def_readonly("calibration_lrs", &slot::GenerationResult::calibration_lrs)
        .def_readonly("calibration_kls", &slot::GenerationResult::calibration_kls)
        .def_readonly("calibration_seconds", &slot::GenerationResult::calibration_seconds)
        .def_readonly("slot_status", &slot::GenerationResult::slot_status)
        .def_readonly("slot_path", &slot::GenerationResult::slot_path)
        .def_readonly("slot_cache_bytes", &slot::GenerationResult::slot_cache_bytes)
        .def_property_readonly("slot_profile", [](const slot::GenerationResult& r) {
            py::dict d;
            d["forward"] = r.slot_profile.forward;
            d["cache"] = r.slot_profile.cache;
            d["backward"] = r.slot_profile.backward;
            d["host"] = r.slot_profile.host;
            return d;
        })
        .def_readonly("prompt_tokens", &slot::GenerationResult::prompt_tokens)
        .def_readonly("cached_tokens", &slot::GenerationResult::cached_tokens)
        .def_readonly("seed", &slot::GenerationResult::seed)
        .def_readonly("token_logprobs", &slot::GenerationResult::token_logprobs)
        .def_readonly("top_logprobs", &slot::GenerationResult::top_logprobs)
        .def_readonly("score_logprobs", &slot::GenerationResult::score_logprobs)
        .def_property_readonly("hidden", [](const slot::GenerationResult& r) -> py::object {
            if (r.hidden.empty()) return py::none();
            return to_numpy(r.hidden, {static_cast<py::ssize_t>(r.hidden.size())});
        })
        .def_readonly("prefill_seconds", &slot::GenerationResult::prefill_seconds)
        .def_readonly("optimise_seconds", &slot::GenerationResult::optimise_seconds)
        .def_readonly("generate_seconds", &slot::GenerationResult::generate_seconds);

#define SLOT_FIELD(name, member) \
    def_property(name, [](const slot::GenerationRequest& r) { return r.member; }, \
                 [](slot::GenerationRequest& r, decltype(slot::GenerationRequest{}.member) v) { r.member = std::move(v); })
    py::class_<slot::GenerationRequest>(m, "Request")
        .def(py::init<>())
        .SLOT_FIELD("prompt", prompt)
        .SLOT_FIELD("response_prefix", response_prefix)
        .SLOT_FIELD("n", n)
        .SLOT_FIELD("max_tokens", max_tokens)
        .SLOT_FIELD("temperature", sampling.temperature)
        .SLOT_FIELD("top_k", sampling.top_k)
        .SLOT_FIELD("top_p", sampling.top_p)
        .SLOT_FIELD("min_p", sampling.min_p)
        .SLOT_FIELD("repeat_penalty", sampling.repeat_penalty)
        .SLOT_FIELD("repeat_last_n", sampling.repeat_last_n)
        .SLOT_FIELD("seed", sampling.seed)
        .SLOT_FIELD("stop", stop)
        .SLOT_FIELD("steps", slot.steps)
        .SLOT_FIELD("lr", slot.lr)
        .SLOT_FIELD("auto_lr", slot.auto_lr)
        .SLOT_FIELD("kl_budget", slot.kl_budget)
        .SLOT_FIELD("beta1", slot.beta1)
        .SLOT_FIELD("beta2", slot.beta2)
        .SLOT_FIELD("eps", slot.eps)
        .SLOT_FIELD("weight_decay", slot.weight_decay)
        .SLOT_FIELD("memory_budget", slot.memory_budget)
        .SLOT_FIELD("recompute", slot.recompute)
        .def_property(
            "loss_mask",
            [](const slot::GenerationRequest& r) {
                return std::vector<bool>(r.slot.loss_mask.begin(), r.slot.loss_mask.end());
            },
            [](slot::GenerationRequest& r, const std::vector<bool>& mask) {
                r.slot.loss_mask.assign(mask.begin(), mask.end());
            })
        .SLOT_FIELD("ignore_eos", ignore_eos)
        .SLOT_FIELD("logprobs", logprobs)
        .SLOT_FIELD("top_logprobs", top_logprobs)
        .SLOT_FIELD("cache_prompt", cache_prompt)
        .SLOT_FIELD("score_tokens", score_tokens)
        .SLOT_FIELD("return_hidden", return_hidden)
        .SLOT_FIELD("rtd", rtd)
        .SLOT_FIELD("rtd_k", rtd_params.k)
        .SLOT_FIELD("rtd_temperature", rtd_params.temperature)
        .SLOT_FIELD("rtd_lambda", rtd_params.lam)
        .SLOT_FIELD("rtd_nprobe", rtd_params.nprobe)
        .def_property("delta",
                      [](const slot::GenerationRequest& r) -> py::object {
                          if (r.delta.empty()) return py::none();
                          return to_numpy(r.delta, {static_cast<py::ssize_t>(r.delta.size())});
                      },
                      [](slot::GenerationRequest& r, py::object d) {
                          if (d.is_none()) r.delta.clear();
                          else r.delta = from_numpy(d.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>());
                      });
#undef SLOT_FIELD

    py::class_<slot::RtdIndex, std::shared_ptr<slot::RtdIndex>>(m, "RtdIndex")
        .def_property_readonly("size", &slot::RtdIndex::size)
        .def_property_readonly("dim", &slot::RtdIndex::dim)
        .def_property_readonly("heads", &slot::RtdIndex::heads)
        .def_property_readonly("nlist", &slot::RtdIndex::nlist)
        .def_property_readonly("backend", [](const slot::RtdIndex& i) { return std::string(i.backend_name()); })
        .def("set_ivf",
             [](slot::RtdIndex& index, const py::array_t<float, py::array::c_style | py::array::forcecast>& centroids,
                const std::vector<int64_t>& offsets) {
                 std::vector<float> c = from_numpy(centroids);
                 py::gil_scoped_release release;
                 index.set_ivf(std::move(c), offsets);
             },
             py::arg("centroids"), py::arg("offsets"))
        .def("search",
             [](const slot::RtdIndex& index, const py::array_t<float, py::array::c_style | py::array::forcecast>& q,
                int k, int nprobe) {
                 if (q.ndim() != 2 || q.shape(1) != index.dim()) {
                     throw std::invalid_argument("queries must have shape (n, " + std::to_string(index.dim()) + ")");
                 }
                 const auto nq = static_cast<py::ssize_t>(q.shape(0));
                 std::vector<slot::RtdNeighbours> found;
                 {
                     py::gil_scoped_release release;
                     found = index.search(q.data(), nq, k, nprobe);
                 }
                 const auto H = static_cast<py::ssize_t>(index.heads());
                 py::array_t<float> dist({nq, H, static_cast<py::ssize_t>(k)});
                 py::array_t<int64_t> ids({nq, H, static_cast<py::ssize_t>(k)});
                 for (py::ssize_t b = 0; b < nq; ++b) {
                     const auto& nb = found[static_cast<size_t>(b)];
                     std::copy(nb.distances.begin(), nb.distances.end(), dist.mutable_data() + b * H * k);
                     std::copy(nb.ids.begin(), nb.ids.end(), ids.mutable_data() + b * H * k);
                 }
                 return py::make_tuple(dist, ids);
             },
             py::arg("queries"), py::arg("k"), py::arg("nprobe") = 0)
        .def("reference",
             [](const slot::RtdIndex& index, const py::array_t<float, py::array::c_style | py::array::forcecast>& q,
                int k, double temperature, int nprobe) {
                 if (q.ndim() != 1 || q.shape(0) != index.dim()) {
                     throw std::invalid_argument("the query must have " + std::to_string(index.dim()) + " values");
                 }
                 if (!(temperature > 0.0)) throw std::invalid_argument("temperature must be > 0");
                 py::gil_scoped_release release;
                 const auto found = index.search(q.data(), 1, k, nprobe);
                 return slot::rtd_reference(found.front(), index.values(), index.heads(), temperature);
             },
             py::arg("query"), py::arg("k"), py::arg("temperature"), py::arg("nprobe") = 0);

    m.def("rtd_blend",
          [](const py::array_t<float, py::array::c_style | py::array::forcecast>& logits,
             const std::vector<std::pair<int32_t, double>>& reference, double lam) {
              std::vector<float> z = from_numpy(logits);
              for (const auto& [v, r] : reference) {
                  if (v < 0 || static_cast<size_t>(v) >= z.size()) throw std::invalid_argument("reference token out of range");
              }
              if (!(lam >= 0.0 && lam <= 1.0)) throw std::invalid_argument("lambda must be in [0, 1]");
              slot::rtd_blend(z.data(), static_cast<int64_t>(z.size()), reference, lam);
              return to_numpy(z, {static_cast<py::ssize_t>(z.size())});
          },
          py::arg("logits"), py::arg("reference"), py::arg("lam"));

    py::class_<slot::Session>(m, "Session")
        .def(py::init([](const std::string& path, int n_ctx, int n_batch, int n_threads, int n_gpu_layers,
                         int n_parallel, bool use_mmap, const std::vector<std::string>& rpc_servers,
                         const std::vector<std::pair<std::string, float>>& loras) {
                 slot::EngineParams p;
                 p.rpc_servers = rpc_servers;
                 p.loras = loras;
                 p.model_path = path;
                 p.n_ctx = n_ctx;
                 p.n_batch = n_batch;
                 p.n_threads = n_threads;
                 p.n_gpu_layers = n_gpu_layers;
                 p.n_parallel = n_parallel;
                 p.use_mmap = use_mmap;
                 return std::make_unique<slot::Session>(p);
             }),
             py::arg("path"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("n_gpu_layers"),
             py::arg("n_parallel"), py::arg("use_mmap"), py::arg("rpc_servers") = std::vector<std::string>{},
             py::arg("loras") = std::vector<std::pair<std::string, float>>{},
             py::call_guard<py::gil_scoped_release>())
        .def("adapter_meta", &slot::Session::adapter_meta, py::arg("index"), py::arg("key"), kNoGil)
        .def_property_readonly("n_adapters", py::cpp_function(&slot::Session::n_adapters, kNoGil))
        .def_property_readonly("eos_token", py::cpp_function(&slot::Session::eos_token, kNoGil))
        .def("close", &slot::Session::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", py::cpp_function(&slot::Session::closed, kNoGil))
        .def("generate_batch",
             [](slot::Session& s, const std::vector<slot::GenerationRequest>& requests, py::object on_text,
                py::object cancel) {
                 slot::BatchTextCallback callback;
                 if (!on_text.is_none()) {
                     py::object* fn = &on_text;  // owned by this frame, which outlives the call's callbacks
                     callback = [fn](int index, const std::string& piece) {
                         py::gil_scoped_acquire gil;
                         py::object r = (*fn)(index, py::bytes(piece));
                         return r.is_none() || r.cast<bool>();
                     };
                 }
                 auto state = std::make_shared<InterruptState>();
                 state->cancel = cancel;
                 InterruptCheck check = make_interrupt_check(state);
                 try {
                     py::gil_scoped_release release;
                     return s.generate_batch(requests, callback, check);
                 } catch (const slot::Interrupted&) {
                     if (state->cancelled.load()) throw slot::Cancelled();
                     throw;
                 }
             },
             py::arg("requests"), py::arg("on_text"), py::arg("cancel") = py::none())
        .def("set_max_waiting", &slot::Session::set_max_waiting, py::arg("n"), kNoGil)
        .def("stats",
             [](slot::Session& s) {
                 slot::BatchStats st;
                 {
                     py::gil_scoped_release release;
                     st = s.stats();
                 }
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
             })
        .def("clear_cache", &slot::Session::clear_cache, py::call_guard<py::gil_scoped_release>())
        .def("drop_cached", &slot::Session::drop_cached, py::arg("prefix"), kNoGil)
        .def_property_readonly("n_parallel", py::cpp_function(&slot::Session::n_parallel, kNoGil))
        .def_property_readonly("decoded_tokens", py::cpp_function(&slot::Session::decoded_tokens, kNoGil))
        .def("tokenize", &slot::Session::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"),
             py::call_guard<py::gil_scoped_release>())
        .def("detokenize", [](slot::Session& s, const std::vector<int32_t>& t) {
                 std::string out;
                 {
                     py::gil_scoped_release release;
                     out = s.detokenize(t);
                 }
                 return py::bytes(out);
             }, py::arg("tokens"))
        .def("token_piece", [](slot::Session& s, int32_t t) {
                 std::string piece;
                 {
                     py::gil_scoped_release release;
                     piece = s.token_piece(t);
                 }
                 return py::bytes(piece);
             }, py::arg("token"))
        .def("apply_chat_template",
             [](slot::Session& s, const std::vector<std::pair<std::string, std::string>>& messages, bool add_assistant,
                const std::string& template_name) {
                 std::vector<slot::ChatMessage> msgs;
                 for (const auto& [role, content] : messages) msgs.push_back({role, content});
                 std::string out;
                 {
                     py::gil_scoped_release release;
                     out = s.apply_chat_template(msgs, add_assistant, template_name);
                 }
                 return py::bytes(out);
             },
             py::arg("messages"), py::arg("add_assistant"), py::arg("template_name"))
        .def("file_info", [](slot::Session& s) {
            slot::ModelFileInfo i;
            {
                py::gil_scoped_release release;
                i = s.file_info();
            }
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
        })
        .def_property_readonly("n_vocab", py::cpp_function(&slot::Session::n_vocab, kNoGil))
        .def_property_readonly("n_embd", py::cpp_function(&slot::Session::n_embd, kNoGil))
        .def_property_readonly("n_ctx", py::cpp_function(&slot::Session::n_ctx, kNoGil))
        .def_property_readonly("n_threads", py::cpp_function(&slot::Session::n_threads, kNoGil))
        .def_property_readonly("has_chat_template", py::cpp_function(&slot::Session::has_chat_template, kNoGil))
        .def("is_eog", &slot::Session::is_eog, py::arg("token"), kNoGil)
        .def("slot_backend", &slot::Session::slot_backend, py::call_guard<py::gil_scoped_release>())
        .def("hidden_states",
             [](slot::Session& s, const std::vector<std::vector<int32_t>>& rows,
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
                 const int n_embd = s.n_embd();
                 const auto d = static_cast<size_t>(n_embd);
                 std::vector<size_t> at(rows.size(), 0);
                 for (size_t r = 1; r < rows.size(); ++r) at[r] = at[r - 1] + static_cast<size_t>(spans[r - 1].second - spans[r - 1].first);
                 std::vector<float> out(total * d);
                 InterruptCheck check = make_interrupt_check();
                 {
                     py::gil_scoped_release release;
                     s.hidden_states(rows, [&](size_t row, const float* h, int) {
                         const auto [a, b] = spans[row];
                         std::copy(h + static_cast<size_t>(a) * d, h + static_cast<size_t>(b) * d,
                                   out.begin() + static_cast<ptrdiff_t>(at[row] * d));
                     }, check);
                 }
                 return to_numpy(out, {static_cast<py::ssize_t>(total), static_cast<py::ssize_t>(n_embd)});
             },
             py::arg("rows"), py::arg("spans"))
        .def("make_rtd_index",
             [](slot::Session& s, py::array keys, py::array values, int heads) {
                 if (keys.ndim() != 2 || keys.itemsize() != 2 || !(keys.flags() & py::array::c_style) ||
                     keys.dtype().kind() != 'f') {
                     throw std::invalid_argument("keys must be a C-contiguous float16 array of shape (n, dim)");
                 }
                 if (values.ndim() != 1 || values.itemsize() != 4 || values.dtype().kind() != 'i' ||
                     !(values.flags() & py::array::c_style)) {
                     throw std::invalid_argument("values must be a contiguous int32 array");
                 }
                 if (values.shape(0) != keys.shape(0)) throw std::invalid_argument("keys and values differ in length");
                 // The arrays (often memory-mapped) stay alive as long as the index.
                 auto* owner = new py::object(py::make_tuple(keys, values));
                 std::shared_ptr<void> keepalive(owner, [](void* p) {
                     py::gil_scoped_acquire gil;
                     delete static_cast<py::object*>(p);
                 });
                 const auto* k = static_cast<const uint16_t*>(keys.data());
                 const auto* v = static_cast<const int32_t*>(values.data());
                 const int64_t n = keys.shape(0), dim = keys.shape(1);
                 py::gil_scoped_release release;
                 return s.make_rtd_index(k, v, n, dim, heads, std::move(keepalive));
             },
             py::arg("keys"), py::arg("values"), py::arg("heads"))
        .def("output_matrix", [](slot::Session& s) {
            std::vector<float> w;
            int n_embd = 0;
            {
                py::gil_scoped_release release;
                w = s.output_matrix();
                n_embd = s.n_embd();
            }
            const auto d = static_cast<py::ssize_t>(n_embd);
            return to_numpy(w, {static_cast<py::ssize_t>(w.size()) / d, d});
        })
        .def("prompt_states", [](slot::Session& s, const std::vector<int32_t>& tokens) {
            std::vector<float> hidden, logits;
            InterruptCheck check = make_interrupt_check();
            int n_embd = 0, n_vocab = 0;
            {
                py::gil_scoped_release release;
                s.prompt_states(tokens, hidden, logits, check);
                n_embd = s.n_embd();
                n_vocab = s.n_vocab();
            }
            const auto n = static_cast<py::ssize_t>(tokens.size());
            return py::make_tuple(to_numpy(hidden, {n, static_cast<py::ssize_t>(n_embd)}),
                                  to_numpy(logits, {n, static_cast<py::ssize_t>(n_vocab)}));
        }, py::arg("tokens"))
        .def("slot_loss_and_gradient",
             [](slot::Session& s, const std::vector<int32_t>& tokens,
                const py::array_t<float, py::array::c_style | py::array::forcecast>& delta, bool recompute) {
                 std::vector<float> d = from_numpy(delta), grad;
                 InterruptCheck check = make_interrupt_check();
                 double loss;
                 {
                     py::gil_scoped_release release;
                     loss = s.slot_loss_and_gradient(tokens, d, recompute, grad, check);
                 }
                 return py::make_tuple(loss, to_numpy(grad, {static_cast<py::ssize_t>(grad.size())}));
             },
             py::arg("tokens"), py::arg("delta"), py::arg("recompute"))
        .def("logit_bias",
             [](slot::Session& s, const py::array_t<float, py::array::c_style | py::array::forcecast>& delta) {
                 std::vector<float> d = from_numpy(delta), b;
                 {
                     py::gil_scoped_release release;
                     b = s.logit_bias(d);
                 }
                 return to_numpy(b, {static_cast<py::ssize_t>(b.size())});
             },
             py::arg("delta"))
        .def("token_logprobs",
             [](slot::Session& s, const std::vector<int32_t>& tokens, int first, py::object delta) {
                 std::vector<float> d;
                 if (!delta.is_none()) {
                     d = from_numpy(delta.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>());
                 }
                 InterruptCheck check = make_interrupt_check();
                 py::gil_scoped_release release;
                 return s.token_logprobs(tokens, first, d, check);
             },
             py::arg("tokens"), py::arg("first"), py::arg("delta"))
        .def("reference_greedy", [](slot::Session& s, const std::vector<int32_t>& prompt, int n_new) {
            InterruptCheck check = make_interrupt_check();
            double seconds = 0.0;
            std::vector<int32_t> out;
            {
                py::gil_scoped_release release;
                out = s.reference_greedy(prompt, n_new, check, &seconds);
            }
            return py::make_tuple(out, seconds);
        }, py::arg("prompt"), py::arg("n_new"))
        .def("reference_greedy_batch", [](slot::Session& s, const std::vector<std::vector<int32_t>>& prompts,
                                          int n_new) {
            InterruptCheck check = make_interrupt_check();
            double seconds = 0.0;
            std::vector<std::vector<int32_t>> out;
            {
                py::gil_scoped_release release;
                out = s.reference_greedy_batch(prompts, n_new, check, &seconds);
            }
            return py::make_tuple(out, seconds);
        }, py::arg("prompts"), py::arg("n_new"));
}
