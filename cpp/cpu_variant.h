// The ggml CPU backend in use. A static build links one, compiled for the
// building CPU (or ggml's defaults). A portable build (SLOT_CPP_PORTABLE)
// ships ggml-cpu in several instruction-set variants as shared libraries in
// slot_cpp/lib and loads one at first use: the highest ggml_backend_score
// (each variant's own check of the CPU, as ggml_backend_load_all does), or
// the one named by SLOT_CPP_CPU_VARIANT. The other backend modules found
// there (RPC, GPUs) are loaded with it.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace slot {

struct CpuBackendInfo {
    bool dynamic = false;       // loaded at run time (portable build)
    std::string variant;        // e.g. "zen4", "haswell", "x64"; "native" or "built-in" when static
    std::string library;        // the variant's file (dynamic)
    std::string directory;      // where the variants were looked for (dynamic)
    std::string forced;         // SLOT_CPP_CPU_VARIANT, when it was set
    std::vector<std::pair<std::string, int>> variants;  // every variant found, with its score here (0: cannot run)
};

// Loads the CPU backend (and the other backend modules beside it) once;
// throws CpuBackendError if that failed, now or at the first try. Does
// nothing in a static build. Call before any use of ggml's backend registry.
void ensure_cpu_backend();
const CpuBackendInfo& cpu_backend_info();

// Instruction-set extensions this CPU has, of those ggml's x86 variants use
// (sse4.2, avx, f16c, fma, avx2, bmi2, avx512f, ...); empty elsewhere.
std::vector<std::string> cpu_features();
// The features the loaded CPU backend was compiled with (ggml's names and values).
std::vector<std::pair<std::string, std::string>> cpu_backend_features();

}  // namespace slot
