// Module-level functions: the log sink and what this build and machine offer.
#include <algorithm>
#include <string>
#include <vector>

#include "bind_common.h"
#include "cpu_variant.h"
#include "head_kernels.h"
#include "grammar.h"
#include "log.h"

namespace slot::bind {
namespace {

py::object g_log_sink;  // the Python callable; cleared at interpreter exit

}  // namespace

void bind_system(py::module_& m) {
    m.def("set_log_sink", [](py::object sink, int min_level) {
        g_log_sink = sink;
        if (sink.is_none()) {
            set_log_sink(nullptr, min_level);
            return;
        }
        // llama.cpp logs from any thread, with or without the GIL.
        set_log_sink([](int level, const std::string& line) {
            if (!Py_IsInitialized()) return;
            py::gil_scoped_acquire gil;
            if (!g_log_sink || g_log_sink.is_none()) return;
            try {
                g_log_sink(level, py::bytes(line));
            } catch (py::error_already_set& e) {
                e.discard_as_unraisable("slot_cpp log sink");
            }
        }, min_level);
        install_log_callback();
    }, py::arg("sink"), py::arg("min_level"));
    m.def("set_log_level", &set_log_level, py::arg("min_level"));
    m.def("json_schema_to_grammar", &json_schema_to_gbnf, py::arg("schema_json"),
          "GBNF for a JSON schema (JSON text), by llama.cpp's common/json-schema-to-grammar.");
    m.def("system_info", [] {
        slot::ensure_cpu_backend();
        return std::string(llama_print_system_info());
    });
    m.def("supports_gpu_offload", [] {
        slot::ensure_cpu_backend();
        return llama_supports_gpu_offload();
    });
    m.def("cpu_backend", [] {
        const slot::CpuBackendInfo& info = slot::cpu_backend_info();  // CpuBackendError if none loads
        py::dict d;
        d["backend"] = "CPU";
        d["variant"] = info.variant;
        d["dynamic"] = info.dynamic;
        d["library"] = info.library;
        d["directory"] = info.directory;
        d["forced"] = info.forced;
        py::dict variants;
        for (const auto& [name, score] : info.variants) variants[py::str(name)] = score;
        d["variants"] = variants;
        py::dict compiled;
        for (const auto& [name, value] : slot::cpu_backend_features()) compiled[py::str(name)] = value;
        d["variant_features"] = compiled;
        d["cpu_features"] = slot::cpu_features();
        d["kernels"] = std::string(slot::kernel_isa());
        std::vector<std::string> backends;
        for (size_t i = 0; i < ggml_backend_reg_count(); ++i) backends.emplace_back(ggml_backend_reg_name(ggml_backend_reg_get(i)));
        d["backends"] = backends;
        return d;
    }, "The ggml CPU backend in use: its variant (portable build: loaded at run time, the best this CPU runs or "
       "SLOT_CPP_CPU_VARIANT's), the variants present with their scores, the CPU's features and the head kernels' "
       "instruction set. Raises CpuBackendError when no CPU backend can be loaded.");
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
        slot::ensure_cpu_backend();
        std::vector<std::string> out;
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            out.push_back(std::string(ggml_backend_dev_name(dev)) + ": " + ggml_backend_dev_description(dev));
        }
        return out;
    });
}

}  // namespace slot::bind
