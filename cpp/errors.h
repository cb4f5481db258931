// Exception types the bindings translate into specific Python exceptions.
#pragma once

#include <stdexcept>
#include <string>

namespace slot {

// Base of every slot_cpp failure that is not a bad argument.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The file could not be read as a usable GGUF model.
struct ModelLoadError : Error {
    using Error::Error;
};

// The model loads but SLOT cannot be applied to it exactly.
struct UnsupportedModelError : Error {
    using Error::Error;
};

// The prompt (plus requested tokens) does not fit the context window.
struct ContextLengthError : Error {
    using Error::Error;
};

// The model is serving as many waiting requests as it was told to queue.
struct QueueFullError : Error {
    using Error::Error;
};

// No ggml CPU backend could be loaded (portable build): the variant asked
// for is missing or this CPU lacks its instructions, or no variant runs here.
struct CpuBackendError : Error {
    using Error::Error;
};

// The caller's cancel check turned true; the bindings raise GenerationCancelled.
struct Cancelled : Error {
    Cancelled() : Error("the generate call was cancelled") {}
};

// A Python signal (Ctrl-C) arrived; the bindings re-raise it as KeyboardInterrupt.
struct Interrupted : std::exception {
    const char* what() const noexcept override { return "interrupted"; }
};

}  // namespace slot
