// The exception types: slot::Error and its subclasses become SlotError and
// its subclasses (SlotError is a RuntimeError, so callers that predate the
// specific types still catch them); slot::Interrupted becomes
// KeyboardInterrupt, as if Ctrl-C had arrived while Python code ran.
#include "bind_common.h"

namespace slot::bind {

void bind_errors(py::module_& m) {
    auto base = py::register_exception<Error>(m, "SlotError", PyExc_RuntimeError);
    py::register_exception<ModelLoadError>(m, "ModelLoadError", base.ptr());
    py::register_exception<UnsupportedModelError>(m, "UnsupportedModelError", base.ptr());
    py::register_exception<ContextLengthError>(m, "ContextLengthError", base.ptr());
    py::register_exception<QueueFullError>(m, "QueueFullError", base.ptr());
    py::register_exception<CpuBackendError>(m, "CpuBackendError", base.ptr());
    py::register_exception<Cancelled>(m, "GenerationCancelled", base.ptr());
    // Interrupted maps to the built-in KeyboardInterrupt, not to a new type,
    // so it takes a translator rather than register_exception.
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const Interrupted&) {
            PyErr_SetNone(PyExc_KeyboardInterrupt);
        }
    });
}

}  // namespace slot::bind
