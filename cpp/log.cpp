#include "log.h"

#include <mutex>

#include "llama.h"

namespace slot {
namespace {

struct LogState {
    std::mutex mutex;
    LogSink sink;
    int min_level = 3;
    std::string pending;  // a line continued with GGML_LOG_LEVEL_CONT
    int pending_level = 2;
    std::string last_error;
};

LogState& state() {
    static LogState* s = new LogState();  // never destroyed: callbacks may outlive statics
    return *s;
}

void forward(ggml_log_level level, const char* text, void*) {
    LogState& s = state();
    LogSink sink;
    std::string line;
    int line_level = 0;
    {
        std::lock_guard<std::mutex> lock(s.mutex);
        if (level != GGML_LOG_LEVEL_CONT) s.pending_level = static_cast<int>(level);
        s.pending += text ? text : "";
        const size_t nl = s.pending.rfind('\n');
        if (nl == std::string::npos) return;
        line = s.pending.substr(0, nl);
        s.pending.erase(0, nl + 1);
        line_level = s.pending_level;
        if (line_level >= GGML_LOG_LEVEL_ERROR) s.last_error = line;
        if (line_level < s.min_level || !s.sink) return;
        sink = s.sink;
    }
    sink(line_level, line);
}

}  // namespace

void set_log_sink(LogSink sink, int min_level) {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().sink = std::move(sink);
    state().min_level = min_level;
}

void set_log_level(int min_level) {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().min_level = min_level;
}

std::string last_error_line() {
    std::lock_guard<std::mutex> lock(state().mutex);
    return state().last_error;
}

void clear_last_error_line() {
    std::lock_guard<std::mutex> lock(state().mutex);
    state().last_error.clear();
}

void install_log_callback() {
    static std::once_flag once;
    std::call_once(once, [] { llama_log_set(forward, nullptr); });
}

}  // namespace slot
