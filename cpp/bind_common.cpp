#include "bind_common.h"

#include <algorithm>

namespace slot::bind {

py::array_t<float> to_numpy(const std::vector<float>& v, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

py::array_t<float> to_numpy(const std::vector<float>& v) {
    return to_numpy(v, {static_cast<py::ssize_t>(v.size())});
}

std::vector<float> from_numpy(const FloatArray& a) {
    return std::vector<float>(a.data(), a.data() + a.size());
}

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
                // A failing cancel callable stops the call rather than being ignored.
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

}  // namespace slot::bind
