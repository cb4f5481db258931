#include "cpu_variant.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>

#include "errors.h"
#include "ggml-backend.h"

#if defined(SLOT_CPP_PORTABLE)
#if defined(_WIN32)
#define WIN32_LEAN_AND_MEAN
#ifndef NOMINMAX
#define NOMINMAX
#endif
#include <windows.h>
#else
#include <dlfcn.h>
#endif
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define SLOT_CPP_X86_BUILTINS 1
#endif

namespace slot {
namespace {

namespace fs = std::filesystem;

struct Feature {
    const char* name;
    bool present;
};

// The x86 extensions ggml's CPU variants are built for, as this CPU reports
// them (the compiler's cpuid check, which also asks the OS whether it saves
// the AVX registers).
std::vector<Feature> x86_features() {
#if defined(SLOT_CPP_X86_BUILTINS)
    __builtin_cpu_init();
    return {
        {"sse4.2", __builtin_cpu_supports("sse4.2") != 0},
        {"avx", __builtin_cpu_supports("avx") != 0},
        {"f16c", __builtin_cpu_supports("f16c") != 0},
        {"fma", __builtin_cpu_supports("fma") != 0},
        {"avx2", __builtin_cpu_supports("avx2") != 0},
        {"bmi2", __builtin_cpu_supports("bmi2") != 0},
        {"avxvnni", __builtin_cpu_supports("avxvnni") != 0},
        {"avx512f", __builtin_cpu_supports("avx512f") != 0},
        {"avx512cd", __builtin_cpu_supports("avx512cd") != 0},
        {"avx512vl", __builtin_cpu_supports("avx512vl") != 0},
        {"avx512dq", __builtin_cpu_supports("avx512dq") != 0},
        {"avx512bw", __builtin_cpu_supports("avx512bw") != 0},
        {"avx512vbmi", __builtin_cpu_supports("avx512vbmi") != 0},
        {"avx512vnni", __builtin_cpu_supports("avx512vnni") != 0},
        {"avx512bf16", __builtin_cpu_supports("avx512bf16") != 0},
    };
#else
    return {};
#endif
}

bool has_feature(const std::vector<Feature>& features, const std::string& name) {
    for (const Feature& f : features) {
        if (name == f.name) return f.present;
    }
    return false;
}

#if defined(SLOT_CPP_PORTABLE)

// What each of ggml's x86-64 variants needs (ggml/src/CMakeLists.txt), to
// name what a CPU lacks; a variant's own ggml_backend_score decides whether
// it runs.
std::vector<std::string> x86_variant_needs(const std::string& variant) {
    const std::vector<std::string> haswell = {"sse4.2", "avx", "f16c", "fma", "avx2", "bmi2"};
    std::vector<std::string> skylakex = haswell;
    for (const char* f : {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}) skylakex.push_back(f);
    auto plus = [](std::vector<std::string> base, std::initializer_list<const char*> more) {
        for (const char* f : more) base.push_back(f);
        return base;
    };
    if (variant == "sse42") return {"sse4.2"};
    if (variant == "sandybridge") return {"sse4.2", "avx"};
    if (variant == "ivybridge") return {"sse4.2", "avx", "f16c"};
    if (variant == "piledriver") return {"sse4.2", "avx", "f16c", "fma"};
    if (variant == "haswell") return haswell;
    if (variant == "alderlake") return plus(haswell, {"avxvnni"});
    if (variant == "skylakex") return skylakex;
    if (variant == "cannonlake") return plus(skylakex, {"avx512vbmi"});
    if (variant == "cascadelake") return plus(skylakex, {"avx512vnni"});
    if (variant == "icelake") return plus(skylakex, {"avx512vbmi", "avx512vnni"});
    if (variant == "cooperlake") return plus(skylakex, {"avx512vnni", "avx512bf16"});
    if (variant == "zen4") return plus(skylakex, {"avx512vbmi", "avx512vnni", "avx512bf16"});
    return {};
}

std::string missing_features(const std::string& variant) {
    const std::vector<Feature> have = x86_features();
    if (have.empty()) return "";
    std::string out;
    for (const std::string& f : x86_variant_needs(variant)) {
        if (!has_feature(have, f)) out += (out.empty() ? "" : " ") + f;
    }
    return out;
}

#if defined(_WIN32)
constexpr const char* kPrefix = "";
constexpr const char* kSuffix = ".dll";
using Handle = HMODULE;
Handle open_library(const fs::path& p) { return LoadLibraryW(p.wstring().c_str()); }
void* symbol(Handle h, const char* name) { return reinterpret_cast<void*>(GetProcAddress(h, name)); }
void close_library(Handle h) { FreeLibrary(h); }
std::string open_error() { return "error " + std::to_string(GetLastError()); }
fs::path library_of(const void* address) {
    HMODULE h = nullptr;
    if (!GetModuleHandleExW(GET_MODULE_HANDLE_EX_FLAG_FROM_ADDRESS | GET_MODULE_HANDLE_EX_FLAG_UNCHANGED_REFCOUNT,
                            static_cast<LPCWSTR>(address), &h)) {
        return {};
    }
    std::wstring buf(32768, L'\0');
    const DWORD n = GetModuleFileNameW(h, buf.data(), static_cast<DWORD>(buf.size()));
    buf.resize(n);
    return fs::path(buf);
}
#else
constexpr const char* kPrefix = "lib";
constexpr const char* kSuffix = ".so";  // ggml's backend modules are .so on macOS too
using Handle = void*;
Handle open_library(const fs::path& p) { return dlopen(p.c_str(), RTLD_NOW | RTLD_LOCAL); }
void* symbol(Handle h, const char* name) { return dlsym(h, name); }
void close_library(Handle h) { dlclose(h); }
std::string open_error() {
    const char* e = dlerror();
    return e ? e : "unknown error";
}
fs::path library_of(const void* address) {
    Dl_info info{};
    if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return {};
    return fs::path(info.dli_fname);
}
#endif

// The directory of ggml's own shared library: slot_cpp/lib in an installed
// package, the build tree's output directory in a build tree. The backend
// modules are installed beside it.
fs::path backend_directory() {
    if (const char* dir = std::getenv("SLOT_CPP_BACKEND_DIR"); dir != nullptr && *dir != '\0') return fs::path(dir);
    fs::path lib = library_of(reinterpret_cast<const void*>(&ggml_backend_load));
    if (lib.empty()) throw CpuBackendError("cannot tell where ggml's library is, to find the CPU backend variants");
    return fs::weakly_canonical(lib).parent_path();
}

std::string join_variants(const std::vector<std::pair<std::string, int>>& variants, bool with_scores) {
    std::string out;
    for (const auto& [name, score] : variants) {
        if (!out.empty()) out += ", ";
        out += name;
        if (with_scores && score == 0) {
            const std::string missing = missing_features(name);
            out += missing.empty() ? " (cannot run here)" : " (needs " + missing + ")";
        }
    }
    return out.empty() ? "none" : out;
}

void load_dynamic(CpuBackendInfo& info) {
    const fs::path dir = backend_directory();
    info.directory = dir.string();
    const std::string cpu_prefix = std::string(kPrefix) + "ggml-cpu-";
    std::vector<std::pair<std::string, fs::path>> files;  // variant name, file
    fs::path single;                                       // ggml-cpu without variants
    std::vector<fs::path> others;                          // other backend modules (RPC, GPUs)
    std::error_code ec;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        const std::string suffix = kSuffix;
        if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
        const std::string stem = name.substr(0, name.size() - suffix.size());
        if (stem.rfind(cpu_prefix, 0) == 0) {
            files.emplace_back(stem.substr(cpu_prefix.size()), it->path());
        } else if (stem == std::string(kPrefix) + "ggml-cpu") {
            single = it->path();
        } else if (stem.rfind(std::string(kPrefix) + "ggml-", 0) == 0 && stem != std::string(kPrefix) + "ggml-base") {
            others.push_back(it->path());
        }
    }
    if (ec) throw CpuBackendError("cannot list " + dir.string() + ": " + ec.message());
    std::sort(files.begin(), files.end());
    if (files.empty() && !single.empty()) files.emplace_back("default", single);
    if (files.empty()) {
        throw CpuBackendError("no ggml CPU backend (" + cpu_prefix + "*" + kSuffix + ") in " + dir.string() +
                              ": this slot_cpp installation is incomplete");
    }

    // Each variant's score on this CPU, as ggml_backend_load_best asks it:
    // 0 when the CPU lacks an instruction it was compiled for.
    std::vector<std::pair<std::string, int>> scored;
    std::vector<std::pair<std::string, fs::path>> modules;
    for (const auto& [name, path] : files) {
        int score = 0;
        Handle h = open_library(path);
        if (h == nullptr) {
            throw CpuBackendError("cannot load the CPU backend " + path.string() + ": " + open_error());
        }
        const bool is_backend = symbol(h, "ggml_backend_init") != nullptr;  // not a placeholder left in a build tree
        using ScoreFn = int (*)();
        if (auto fn = reinterpret_cast<ScoreFn>(symbol(h, "ggml_backend_score"))) score = fn();
        else score = 1;  // a module without a score (no variants) runs anywhere it loads
        close_library(h);
        if (!is_backend) continue;
        scored.emplace_back(name, score);
        modules.emplace_back(name, path);
    }
    files = modules;
    if (files.empty()) throw CpuBackendError("no ggml CPU backend in " + dir.string());
    info.variants = scored;

    std::string chosen;
    const char* forced = std::getenv("SLOT_CPP_CPU_VARIANT");
    if (forced != nullptr && *forced != '\0') {
        info.forced = forced;
        auto it = std::find_if(scored.begin(), scored.end(), [&](const auto& v) { return v.first == info.forced; });
        if (it == scored.end()) {
            throw CpuBackendError("SLOT_CPP_CPU_VARIANT=" + info.forced + ": no such CPU variant in " + dir.string() +
                                  " (present: " + join_variants(scored, false) + ")");
        }
        if (it->second == 0) {
            const std::string missing = missing_features(it->first);
            throw CpuBackendError("SLOT_CPP_CPU_VARIANT=" + info.forced + ": this CPU cannot run that variant" +
                                  (missing.empty() ? std::string() : " (it lacks " + missing + ")") +
                                  "; the variants present: " + join_variants(scored, true));
        }
        chosen = it->first;
    } else {
        int best = 0;
        for (const auto& [name, score] : scored) {
            if (score > best) {
                best = score;
                chosen = name;
            }
        }
        if (chosen.empty()) {
            throw CpuBackendError("no ggml CPU variant in " + dir.string() +
                                  " runs on this CPU: " + join_variants(scored, true));
        }
    }
    const fs::path path = std::find_if(files.begin(), files.end(), [&](const auto& f) { return f.first == chosen; })->second;
    if (ggml_backend_load(path.string().c_str()) == nullptr) {
        throw CpuBackendError("ggml could not load the CPU variant " + path.string());
    }
    info.variant = chosen;
    info.library = path.string();
    // The other backend modules shipped (RPC, Metal, CUDA, ...): a module
    // whose runtime is missing (no GPU driver) is skipped.
    std::sort(others.begin(), others.end());
    for (const fs::path& p : others) {
        if (p.filename().string() == std::string(kPrefix) + "ggml" + kSuffix) continue;  // ggml itself
        ggml_backend_load(p.string().c_str());
    }
}

#endif  // SLOT_CPP_PORTABLE

std::mutex g_mutex;
bool g_done = false;
std::string g_error;
CpuBackendInfo g_info;

}  // namespace

void ensure_cpu_backend() {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_done) {
        g_done = true;
#if defined(SLOT_CPP_PORTABLE)
        g_info.dynamic = true;
        try {
            load_dynamic(g_info);
        } catch (const std::exception& e) {
            g_error = e.what();
        }
#else
        g_info.dynamic = false;
#if defined(SLOT_CPP_STATIC_VARIANT)
        g_info.variant = SLOT_CPP_STATIC_VARIANT;
#else
        g_info.variant = "built-in";
#endif
        g_info.variants = {{g_info.variant, 1}};
        const char* forced = std::getenv("SLOT_CPP_CPU_VARIANT");
        if (forced != nullptr && *forced != '\0') {
            g_info.forced = forced;
            if (g_info.forced != g_info.variant) {
                g_error = "SLOT_CPP_CPU_VARIANT=" + g_info.forced + ": this slot_cpp is a static build with one CPU backend (" +
                          g_info.variant + "); CPU variants are chosen at run time only in a portable build "
                          "(-DSLOT_CPP_PORTABLE=ON, as in the binary wheels)";
            }
        }
#endif
    }
    if (!g_error.empty()) throw CpuBackendError(g_error);
}

const CpuBackendInfo& cpu_backend_info() {
    ensure_cpu_backend();
    return g_info;
}

std::vector<std::string> cpu_features() {
    std::vector<std::string> out;
    for (const Feature& f : x86_features()) {
        if (f.present) out.emplace_back(f.name);
    }
    return out;
}

std::vector<std::pair<std::string, std::string>> cpu_backend_features() {
    ensure_cpu_backend();
    std::vector<std::pair<std::string, std::string>> out;
    ggml_backend_dev_t dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (dev == nullptr) return out;
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    auto get = reinterpret_cast<ggml_backend_get_features_t>(
        ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features"));
    if (get == nullptr) return out;
    for (const ggml_backend_feature* f = get(reg); f != nullptr && f->name != nullptr; ++f) {
        out.emplace_back(f->name, f->value ? f->value : "");
    }
    return out;
}

}  // namespace slot
