// Routes llama.cpp and ggml log lines to a sink the bindings install (Python
// logging), without touching the process's stdout or stderr.
#pragma once

#include <functional>
#include <string>

namespace slot {

// Levels follow ggml_log_level: 1 debug, 2 info, 3 warn, 4 error.
using LogSink = std::function<void(int level, const std::string& line)>;

// Installs the sink and the minimum level forwarded; lines below it are dropped
// in C++ without calling the sink. A null sink silences everything.
void set_log_sink(LogSink sink, int min_level);
void set_log_level(int min_level);

// The most recent error-level line, to enrich exceptions after a failed call.
std::string last_error_line();
void clear_last_error_line();

// Registers the forwarding callback with llama.cpp; idempotent.
void install_log_callback();

}  // namespace slot
