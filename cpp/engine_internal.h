// Small llama.cpp helpers shared by the engine's source files (engine.cpp,
// reference_loop.cpp); not part of the engine's interface.
#pragma once

#include <string>

#include "llama.h"
#include "log.h"

namespace slot::detail {

struct BatchHolder {
    llama_batch batch;
    explicit BatchHolder(int n) : batch(llama_batch_init(n, 0, 1)) {}
    ~BatchHolder() { llama_batch_free(batch); }
    BatchHolder(const BatchHolder&) = delete;
    BatchHolder& operator=(const BatchHolder&) = delete;
};

// llama.cpp's own limit on sequence ids (LLAMA_MAX_SEQ, not in its public header).
constexpr int kMaxSequences = 256;

// `message`, with llama.cpp's last logged error appended when there is one.
inline std::string with_log_detail(const std::string& message) {
    const std::string detail = last_error_line();
    return detail.empty() ? message : message + " (llama.cpp: " + detail + ")";
}

}  // namespace slot::detail
