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

// Checks for Ctrl-C at most every 20 ms, re-acquiring the GIL only then.
// Once a signal is seen the check stays true for the rest of the call.
InterruptCheck make_interrupt_check() {
    struct State {
        std::atomic<bool> hit{false};
        std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    };
    auto state = std::make_shared<State>();
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
        return false;
    };
}

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

std::vector<float> from_numpy(const py::array_t<float, py::array::c_style | py::array::forcecast>& a) {
    return std::vector<float>(a.data(), a.data() + a.size());
}

py::object g_log_sink;  // the Python callable; cleared at interpreter exit

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
        .def_readonly("prefill_seconds", &slot::GenerationResult::prefill_seconds)
        .def_readonly("optimise_seconds", &slot::GenerationResult::optimise_seconds)
        .def_readonly("generate_seconds", &slot::GenerationResult::generate_seconds);

    py::class_<slot::Session>(m, "Session")
        .def(py::init([](const std::string& path, int n_ctx, int n_batch, int n_threads, int n_gpu_layers,
                         bool use_mmap) {
                 slot::EngineParams p;
                 p.model_path = path;
                 p.n_ctx = n_ctx;
                 p.n_batch = n_batch;
                 p.n_threads = n_threads;
                 p.n_gpu_layers = n_gpu_layers;
                 p.use_mmap = use_mmap;
                 return std::make_unique<slot::Session>(p);
             }),
             py::arg("path"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("n_gpu_layers"),
             py::arg("use_mmap"), py::call_guard<py::gil_scoped_release>())
        .def("close", &slot::Session::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", &slot::Session::closed)
        .def("generate",
             [](slot::Session& s, std::vector<int32_t> prompt, int max_tokens, double temperature, int top_k,
                double top_p, double min_p, double repeat_penalty, int repeat_last_n, uint64_t seed,
                std::vector<std::string> stop, int steps, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t memory_budget, bool recompute, py::object delta, bool ignore_eos,
                py::object on_text) {
                 slot::GenerationRequest req;
                 req.prompt = std::move(prompt);
                 req.max_tokens = max_tokens;
                 req.sampling.temperature = temperature;
                 req.sampling.top_k = top_k;
                 req.sampling.top_p = top_p;
                 req.sampling.min_p = min_p;
                 req.sampling.repeat_penalty = repeat_penalty;
                 req.sampling.repeat_last_n = repeat_last_n;
                 req.sampling.seed = seed;
                 req.stop = std::move(stop);
                 req.slot.steps = steps;
                 req.slot.lr = lr;
                 req.slot.beta1 = beta1;
                 req.slot.beta2 = beta2;
                 req.slot.eps = eps;
                 req.slot.weight_decay = weight_decay;
                 req.slot.memory_budget = memory_budget;
                 req.slot.recompute = recompute;
                 req.ignore_eos = ignore_eos;
                 if (!delta.is_none()) {
                     req.delta = from_numpy(delta.cast<py::array_t<float, py::array::c_style | py::array::forcecast>>());
                 }
                 slot::TextCallback callback;
                 if (!on_text.is_none()) {
                     py::object* fn = &on_text;  // owned by this frame; called with the GIL held
                     callback = [fn](const std::string& piece) {
                         py::gil_scoped_acquire gil;
                         py::object r = (*fn)(py::bytes(piece));
                         return r.is_none() || r.cast<bool>();
                     };
                 }
                 InterruptCheck check = make_interrupt_check();
                 py::gil_scoped_release release;
                 return s.generate(req, callback, check);
             },
             py::arg("prompt"), py::arg("max_tokens"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
             py::arg("min_p"), py::arg("repeat_penalty"), py::arg("repeat_last_n"), py::arg("seed"), py::arg("stop"),
             py::arg("steps"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
             py::arg("weight_decay"), py::arg("memory_budget"), py::arg("recompute"), py::arg("delta"),
             py::arg("ignore_eos"), py::arg("on_text"))
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
        .def("token_piece", [](slot::Session& s, int32_t t) { return py::bytes(s.token_piece(t)); }, py::arg("token"))
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
            const slot::ModelFileInfo& i = s.file_info();
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
        .def_property_readonly("n_vocab", &slot::Session::n_vocab)
        .def_property_readonly("n_embd", &slot::Session::n_embd)
        .def_property_readonly("n_ctx", &slot::Session::n_ctx)
        .def_property_readonly("n_threads", &slot::Session::n_threads)
        .def_property_readonly("has_chat_template", &slot::Session::has_chat_template)
        .def("is_eog", &slot::Session::is_eog, py::arg("token"))
        .def("slot_backend", &slot::Session::slot_backend, py::call_guard<py::gil_scoped_release>())
        .def("output_matrix", [](slot::Session& s) {
            std::vector<float> w;
            {
                py::gil_scoped_release release;
                w = s.output_matrix();
            }
            const auto d = static_cast<py::ssize_t>(s.n_embd());
            return to_numpy(w, {static_cast<py::ssize_t>(w.size()) / d, d});
        })
        .def("prompt_states", [](slot::Session& s, const std::vector<int32_t>& tokens) {
            std::vector<float> hidden, logits;
            InterruptCheck check = make_interrupt_check();
            {
                py::gil_scoped_release release;
                s.prompt_states(tokens, hidden, logits, check);
            }
            const auto n = static_cast<py::ssize_t>(tokens.size());
            return py::make_tuple(to_numpy(hidden, {n, static_cast<py::ssize_t>(s.n_embd())}),
                                  to_numpy(logits, {n, static_cast<py::ssize_t>(s.n_vocab())}));
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
        }, py::arg("prompt"), py::arg("n_new"));
}
