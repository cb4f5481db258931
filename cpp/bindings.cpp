// The Python module slot_cpp._core. The bindings live in one file per concept
// (bind_*.cpp, declared in bind_common.h); this file only assembles them.
#include "bind_common.h"

PYBIND11_MODULE(_core, m) {
    namespace bind = slot::bind;
    m.doc() = "slot_cpp native core (llama.cpp engine, output head, SLOT optimiser, sampler)";
#ifdef SLOT_CPP_VERSION
    m.attr("__version__") = SLOT_CPP_VERSION;
#endif
#ifdef SLOT_CPP_LLAMA_SOURCE
    m.attr("llama_cpp_source") = SLOT_CPP_LLAMA_SOURCE;
#else
    m.attr("llama_cpp_source") = "unknown";
#endif

    // The order matters: pybind11 names a type in a signature by its Python
    // name only if that type is already bound (Session's methods name
    // Request, RawResult and RtdIndex, so Session comes last), and the
    // exception types come first.
    bind::bind_errors(m);
    bind::bind_system(m);
    bind::bind_request(m);
    bind::bind_rtd(m);
    bind::bind_chat(m);
    bind::bind_session(m);
}
