// A ggml compute backend with its graph allocator: the place where SLOT's
// products and reductions run as ggml graphs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace slot {

// A ggml context holding only tensor headers, plus one graph.
struct GraphBuilder {
    ggml_context* ctx = nullptr;
    ggml_cgraph* graph = nullptr;
    explicit GraphBuilder(size_t n_tensors);
    ~GraphBuilder();
    GraphBuilder(const GraphBuilder&) = delete;
    GraphBuilder& operator=(const GraphBuilder&) = delete;

    ggml_tensor* input(ggml_type type, int64_t ne0, int64_t ne1 = 1);
    void output(ggml_tensor* t);
};

// Host memory a graph's tensor is set from (GraphInput) or read into
// (GraphOutput): `bytes` at `offset` in the tensor, the whole tensor when
// bytes is 0. An input with a null tensor (an optional one) is skipped.
struct GraphInput {
    ggml_tensor* tensor;
    const void* data;
    size_t offset = 0;
    size_t bytes = 0;
};
struct GraphOutput {
    ggml_tensor* tensor;
    void* data;
    size_t offset = 0;
    size_t bytes = 0;
};

// Tensors that outlive a graph (weights, caches) live in a StaticTensors.
struct StaticTensors {
    ggml_context* ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    // Set when the buffer is a backend's reusable one: gives it back instead of freeing it.
    std::function<void()> release;
    explicit StaticTensors(size_t n_tensors);
    ~StaticTensors();
    StaticTensors(const StaticTensors&) = delete;
    StaticTensors& operator=(const StaticTensors&) = delete;
};

// The ggml backend of one device: the CPU (device == nullptr) or a GPU that
// ggml was built for (CUDA, Metal, ...).
class ComputeBackend {
public:
    ComputeBackend(int n_threads, ggml_backend_dev_t device = nullptr);
    ~ComputeBackend();
    ComputeBackend(const ComputeBackend&) = delete;
    ComputeBackend& operator=(const ComputeBackend&) = delete;

    int n_threads() const { return n_threads_; }
    bool is_cpu() const { return is_cpu_; }
    ggml_backend_dev_t device() const { return device_; }
    // Bytes of memory free on this backend's device now: the GPU's free
    // memory, or the host's available memory (MemAvailable on Linux; ggml's
    // figure for the CPU device elsewhere).
    int64_t available_memory() const;
    const char* name() const { return ggml_backend_name(backend_); }
    // Allocates every tensor of `tensors` on this backend.
    void allocate(StaticTensors& tensors, const char* what);
    // The same for a single tensor rewritten for every prompt (a SLOT
    // problem's P0): it goes in a buffer the backend keeps between uses, when that is
    // free and the tensor is at most kMaxReusableBytes. Fresh memory costs a
    // page fault per page when first written: 4 KiB pages cost about as much
    // as the write, so on Linux the CPU's buffer asks for 2 MiB pages.
    void allocate_reusable(StaticTensors& tensors, const char* what);
    static constexpr size_t kMaxReusableBytes = size_t(256) << 20;
    // Checks that the backend supports every op of the graph (an unsupported op
    // would abort inside ggml) and allocates its intermediate tensors; set
    // inputs after this.
    void prepare(GraphBuilder& g);
    void compute(GraphBuilder& g, const char* what);
    // The steps of every one-off graph: prepare, set the inputs, compute
    // (`what` names it in errors), read the outputs back.
    void run(GraphBuilder& g, const char* what, const std::vector<GraphInput>& inputs = {},
             const std::vector<GraphOutput>& outputs = {});

private:
    int n_threads_ = 1;
    bool is_cpu_ = true;
    ggml_backend_dev_t device_ = nullptr;
    ggml_backend_t backend_ = nullptr;
    ggml_gallocr_t galloc_ = nullptr;
    std::mutex reusable_mutex_;
    ggml_backend_buffer_t reusable_ = nullptr;
    bool reusable_in_use_ = false;
    // The reusable buffer's memory on the CPU where it is ours (Linux: an
    // anonymous mapping in transparent huge pages), unmapped with it.
    void* reusable_pages_ = nullptr;
    size_t reusable_pages_bytes_ = 0;
    void free_reusable();
};

}  // namespace slot
