// Shared pieces of the Python bindings. The bindings are split by concept
// across the bind_*.cpp files (pybind11's advice for large modules: smaller
// translation units, faster rebuilds); bindings.cpp calls each bind_* once.
// Binding code only: argument conversion, GIL handling, interrupt checks and
// exception translation; the work lives in the other files.
#pragma once

// Every binding file sees the same type casters (the STL and std::function
// ones change how a type converts, so all files must agree on them).
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <chrono>
#include <memory>
#include <type_traits>
#include <vector>

#include "engine.h"
#include "errors.h"

namespace slot::bind {

namespace py = pybind11;

// One function per bind_*.cpp file, called in this order by PYBIND11_MODULE.
void bind_errors(py::module_& m);   // bind_errors.cpp: exception types and their translation
void bind_system(py::module_& m);   // bind_system.cpp: logging, build and device information
void bind_request(py::module_& m);  // bind_request.cpp: Request and RawResult
void bind_rtd(py::module_& m);      // bind_rtd.cpp: RtdIndex and rtd_blend
void bind_chat(py::module_& m);     // bind_chat.cpp: chat templates with tools, ChatPrompt, ChatParser
void bind_session(py::module_& m);  // bind_session.cpp: Session

// A float32 array argument, converted (copied if need be) to C order.
using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape);
py::array_t<float> to_numpy(const std::vector<float>& v);  // 1-D
std::vector<float> from_numpy(const FloatArray& a);

// Checks for Ctrl-C (and, when given, the caller's cancel callable) at most
// every 20 ms, re-acquiring the GIL only then. Once true, the check stays
// true for the rest of the call; `cancelled` says whether `cancel` made it so.
struct InterruptState {
    std::atomic<bool> hit{false};
    std::atomic<bool> cancelled{false};
    std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
    py::handle cancel;  // borrowed from the binding's frame, which outlives every check
};

InterruptCheck make_interrupt_check(const std::shared_ptr<InterruptState>& state);

// Runs `fn` with the GIL released and returns its (C++) result, which the
// caller converts once the GIL is back. Every Session call takes the session
// mutex, which a generating thread holds while it briefly needs the GIL
// (Ctrl-C checks, callbacks): so no Session call may wait for the mutex while
// holding the GIL, and long calls must not block other Python threads.
//
// When `fn` takes an InterruptCheck it gets one that polls Ctrl-C (and
// `cancel`, a Python callable or None) every 20 ms; the slot::Interrupted it
// then throws becomes KeyboardInterrupt, or slot::Cancelled
// (GenerationCancelled) when `cancel` asked for it.
template <typename Fn>
auto without_gil(Fn&& fn, py::handle cancel = py::handle()) {
    if constexpr (std::is_invocable_v<Fn&, const InterruptCheck&>) {
        auto state = std::make_shared<InterruptState>();
        state->cancel = cancel;
        const InterruptCheck check = make_interrupt_check(state);
        try {
            py::gil_scoped_release release;
            return fn(check);
        } catch (const Interrupted&) {
            if (state->cancelled.load()) throw Cancelled();
            throw;
        }
    } else {
        py::gil_scoped_release release;
        return fn();
    }
}

}  // namespace slot::bind
