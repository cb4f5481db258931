#include "backend.h"

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_variant.h"
#include "errors.h"

namespace slot {

GraphBuilder::GraphBuilder(size_t n_tensors) {
    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead() * n_tensors + ggml_graph_overhead();
    p.no_alloc = true;
    ctx = ggml_init(p);
    if (ctx == nullptr) throw Error("ggml_init failed");
    graph = ggml_new_graph(ctx);
}

GraphBuilder::~GraphBuilder() { ggml_free(ctx); }

ggml_tensor* GraphBuilder::input(ggml_type type, int64_t ne0, int64_t ne1) {
    ggml_tensor* t = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_set_input(t);
    return t;
}

void GraphBuilder::output(ggml_tensor* t) {
    ggml_set_output(t);
    ggml_build_forward_expand(graph, t);
}

StaticTensors::StaticTensors(size_t n_tensors) {
    ggml_init_params p{};
    p.mem_size = ggml_tensor_overhead() * n_tensors;
    p.no_alloc = true;
    ctx = ggml_init(p);
    if (ctx == nullptr) throw Error("ggml_init failed");
}

StaticTensors::~StaticTensors() {
    if (release) release();
    else if (buffer) ggml_backend_buffer_free(buffer);
    ggml_free(ctx);
}

ComputeBackend::ComputeBackend(int n_threads, ggml_backend_dev_t device)
    : n_threads_(std::max(1, n_threads)), is_cpu_(device == nullptr), device_(device) {
    // One code path for the static build and the portable one (whose CPU
    // backend is a module loaded at run time): the CPU device and its thread
    // count through the backend registry.
    ensure_cpu_backend();
    if (is_cpu_) {
        device_ = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (device_ == nullptr) throw CpuBackendError("no ggml CPU backend is loaded");
        backend_ = ggml_backend_dev_init(device_, nullptr);
        if (backend_ == nullptr) throw Error("could not initialise the ggml CPU backend");
        auto set_n_threads = reinterpret_cast<ggml_backend_set_n_threads_t>(
            ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(device_), "ggml_backend_set_n_threads"));
        if (set_n_threads != nullptr) set_n_threads(backend_, n_threads_);
    } else {
        backend_ = ggml_backend_dev_init(device, nullptr);
        if (backend_ == nullptr) {
            throw Error(std::string("could not initialise the ggml backend of ") + ggml_backend_dev_name(device));
        }
    }
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    if (galloc_ == nullptr) throw Error("could not create a ggml graph allocator");
}

int64_t ComputeBackend::available_memory() const {
    size_t free = 0, total = 0;
    if (!is_cpu_) {
        ggml_backend_dev_memory(device_, &free, &total);
        return static_cast<int64_t>(free);
    }
    // ggml reports the CPU device's total as free on Linux: read what the
    // kernel says can be allocated without swapping.
    std::ifstream meminfo("/proc/meminfo");
    std::string key, unit;
    long long kib = 0;
    while (meminfo >> key >> kib >> unit) {
        if (key == "MemAvailable:") return static_cast<int64_t>(kib) * 1024;
    }
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu != nullptr) ggml_backend_dev_memory(cpu, &free, &total);
    return static_cast<int64_t>(free);
}

void ComputeBackend::free_reusable() {
    if (reusable_ != nullptr) ggml_backend_buffer_free(reusable_);
    reusable_ = nullptr;
#if defined(__linux__)
    if (reusable_pages_ != nullptr) munmap(reusable_pages_, reusable_pages_bytes_);
#endif
    reusable_pages_ = nullptr;
    reusable_pages_bytes_ = 0;
}

ComputeBackend::~ComputeBackend() {
    free_reusable();
    ggml_gallocr_free(galloc_);
    ggml_backend_free(backend_);
}

void ComputeBackend::allocate(StaticTensors& tensors, const char* what) {
    tensors.buffer = ggml_backend_alloc_ctx_tensors(tensors.ctx, backend_);
    if (tensors.buffer == nullptr) throw Error(std::string("out of memory allocating ") + what);
}

void ComputeBackend::allocate_reusable(StaticTensors& tensors, const char* what) {
    ggml_tensor* t = ggml_get_first_tensor(tensors.ctx);
    if (t == nullptr || ggml_get_next_tensor(tensors.ctx, t) != nullptr) {
        allocate(tensors, what);
        return;
    }
    const size_t need = ggml_backend_buft_get_alloc_size(ggml_backend_get_default_buffer_type(backend_), t);
    std::unique_lock<std::mutex> lock(reusable_mutex_);
    if (reusable_in_use_ || need > kMaxReusableBytes) {
        lock.unlock();
        allocate(tensors, what);
        return;
    }
    if (reusable_ == nullptr || ggml_backend_buffer_get_size(reusable_) < need) {
        // Grow geometrically, so that prompts of rising lengths reallocate rarely.
        size_t size = need;
        if (reusable_ != nullptr) {
            size = std::min(kMaxReusableBytes, std::max(need, ggml_backend_buffer_get_size(reusable_) * 2));
            free_reusable();
        }
#if defined(__linux__)
        if (is_cpu_) {
            // Whole 2 MiB pages, which the kernel may back with huge pages
            // (transparent huge pages in "madvise" or "always" mode): a fault
            // per 2 MiB instead of per 4 KiB, and fewer TLB misses in the
            // passes over the buffer.
            constexpr size_t kHuge = size_t(2) << 20;
            const size_t bytes = (size + kHuge - 1) / kHuge * kHuge;
            const size_t mapped = bytes + kHuge;  // room to start on a 2 MiB boundary
            void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p != MAP_FAILED) {
                const uintptr_t at = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) / kHuge * kHuge;
                void* start = reinterpret_cast<void*>(at);
                madvise(start, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages if refused
                reusable_ = ggml_backend_cpu_buffer_from_ptr(start, bytes);
                if (reusable_ == nullptr) {
                    munmap(p, mapped);
                } else {
                    reusable_pages_ = p;
                    reusable_pages_bytes_ = mapped;
                }
            }
        }
#endif
        if (reusable_ == nullptr) reusable_ = ggml_backend_alloc_buffer(backend_, size);
        if (reusable_ == nullptr) throw Error(std::string("out of memory allocating ") + what);
    }
    if (ggml_backend_tensor_alloc(reusable_, t, ggml_backend_buffer_get_base(reusable_)) != GGML_STATUS_SUCCESS) {
        throw Error(std::string("could not place ") + what + " in its buffer");
    }
    reusable_in_use_ = true;
    tensors.buffer = reusable_;
    tensors.release = [this] {
        std::lock_guard<std::mutex> guard(reusable_mutex_);
        reusable_in_use_ = false;
    };
}

void ComputeBackend::prepare(GraphBuilder& g) {
    for (int i = 0; i < ggml_graph_n_nodes(g.graph); ++i) {
        const ggml_tensor* node = ggml_graph_node(g.graph, i);
        if (!ggml_backend_supports_op(backend_, node)) {
            throw UnsupportedModelError(std::string("the ") + name() + " backend cannot run " + ggml_op_desc(node) +
                                        " on " + ggml_type_name(node->src[0] ? node->src[0]->type : node->type) +
                                        " tensors");
        }
    }
    if (!ggml_gallocr_alloc_graph(galloc_, g.graph)) throw Error("could not allocate a ggml graph");
}

void ComputeBackend::compute(GraphBuilder& g, const char* what) {
    if (ggml_backend_graph_compute(backend_, g.graph) != GGML_STATUS_SUCCESS) {
        throw Error(std::string("ggml computation failed: ") + what);
    }
}

void ComputeBackend::run(GraphBuilder& g, const char* what, const std::vector<GraphInput>& inputs,
                         const std::vector<GraphOutput>& outputs) {
    prepare(g);
    for (const GraphInput& in : inputs) {
        if (in.tensor == nullptr) continue;
        ggml_backend_tensor_set(in.tensor, in.data, in.offset, in.bytes != 0 ? in.bytes : ggml_nbytes(in.tensor));
    }
    compute(g, what);
    for (const GraphOutput& out : outputs) {
        ggml_backend_tensor_get(out.tensor, out.data, out.offset, out.bytes != 0 ? out.bytes : ggml_nbytes(out.tensor));
    }
}

}  // namespace slot
