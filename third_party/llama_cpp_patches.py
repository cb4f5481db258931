"""Small changes slot_cpp makes to the pinned llama.cpp tree, applied by
fetch_llama_cpp.py right after unpacking. Each edit replaces one exact piece
of text that must occur exactly once, so a new pin that moved the code fails
loudly instead of building unpatched.

batch-invariant kernels (deterministic mode): ggml's CPU backend has a
per-backend ``use_ref`` switch that already keeps flash attention and the
tiled matrix product on their one-row reference loops. The edits give every
matrix product one kernel for one row and for many under it: llamafile's
sgemm, which ggml takes only from 2 (or 4) rows of a batch, takes every row
count on x86-64 (its tiles compute each element the same way whatever their
shape) and none elsewhere; the two-row i8mm dot product is off. They also let
a llama_context turn the switch on for its CPU backend.

faster int8 tiles: with VNNI (AVX512-VNNI or AVX-VNNI), sgemm's 4xN tiles of
8-bit blocks (the output head of Q8_0 models, most prompt and batch products)
take a + 128 as unsigned bytes times b in one dpbusd, from int32 lanes that
start at -128 * sum(b), instead of |a| times sign(b, a): the same lanes, so
the same results bit for bit, in fewer instructions.

logits left in the graph: a llama_context can be told to keep no logits
(llama_set_logits_copy), for batches whose graph an eval callback stops
before the output head: its output buffer then holds no n_outputs * n_vocab
floats (cleared, so faulted in, on every growth) and nothing that was never
computed is copied into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# (file, old text, new text)
EDITS: tuple[tuple[str, str, str], ...] = (
    ("ggml/src/ggml-cpu/ggml-cpu.c",
     "void ggml_compute_forward_mul_mat(\n",
     "// With use_ref, llamafile's sgemm serves every row count (x86-64) or none.\n"
     "#if defined(__x86_64__) || defined(_M_X64)\n#define GGML_REF_SGEMM 1\n#else\n#define GGML_REF_SGEMM 0\n#endif\n\n"
     "void ggml_compute_forward_mul_mat(\n"),
    ("ggml/src/ggml-cpu/ggml-cpu.c",
     "    const bool src1_cont = ggml_is_contiguous(src1);\n\n    if (src1_cont) {\n",
     "    const bool src1_cont = ggml_is_contiguous(src1);\n\n    if (src1_cont && (GGML_REF_SGEMM || !params->use_ref)) {\n"),
    ("ggml/src/ggml-cpu/ggml-cpu.c",
     "#if GGML_USE_LLAMAFILE\n    if (src1->type != vec_dot_type) {\n",
     "#if GGML_USE_LLAMAFILE\n    if (src1->type != vec_dot_type && (GGML_REF_SGEMM || !params->use_ref)) {\n"),
    ("ggml/src/ggml-cpu/llamafile/sgemm.cpp",
     "#if !defined(__MMA__)\n    if (n < 2)\n        return false;\n#endif\n",
     "#if !defined(__MMA__)\n    if (n < 2 && !params->use_ref)\n        return false;\n#endif\n"),
    ("ggml/src/ggml-cpu/ggml-cpu.c",
     "        if ((nr0 % 2 != 0) || (ne11 % 2 != 0) || ((ir0_end - ir0_start) % 2 != 0) || "
     "((ir1_end - ir1_start) % 2 != 0)) {\n",
     "        if (params->use_ref || (nr0 % 2 != 0) || (ne11 % 2 != 0) || ((ir0_end - ir0_start) % 2 != 0) || "
     "((ir1_end - ir1_start) % 2 != 0)) {\n"),
    ("include/llama.h",
     "    LLAMA_API void llama_set_abort_callback(struct llama_context * ctx, ggml_abort_callback abort_callback, "
     "void * abort_callback_data);\n",
     "    LLAMA_API void llama_set_abort_callback(struct llama_context * ctx, ggml_abort_callback abort_callback, "
     "void * abort_callback_data);\n\n"
     "    // The CPU backend's reference kernels (ggml_backend_cpu_set_use_ref): results that do not\n"
     "    // depend on the batch, at some cost in speed\n"
     "    LLAMA_API void llama_set_cpu_use_ref(struct llama_context * ctx, bool use_ref);\n"),
    ("src/llama-context.h",
     "    void set_abort_callback(bool (*abort_callback)(void * data), void * abort_callback_data);\n",
     "    void set_abort_callback(bool (*abort_callback)(void * data), void * abort_callback_data);\n\n"
     "    void set_cpu_use_ref(bool use_ref);\n"),
    ("src/llama-context.cpp",
     "void llama_set_abort_callback(llama_context * ctx, bool (*abort_callback)(void * data), "
     "void * abort_callback_data) {\n    ctx->set_abort_callback(abort_callback, abort_callback_data);\n}\n",
     "void llama_set_abort_callback(llama_context * ctx, bool (*abort_callback)(void * data), "
     "void * abort_callback_data) {\n    ctx->set_abort_callback(abort_callback, abort_callback_data);\n}\n\n"
     "void llama_set_cpu_use_ref(llama_context * ctx, bool use_ref) {\n    ctx->set_cpu_use_ref(use_ref);\n}\n"),
    ("src/llama-context.cpp",
     "void llama_context::set_embeddings(bool value) {\n",
     "void llama_context::set_cpu_use_ref(bool use_ref) {\n"
     "    for (auto & backend : backends) {\n"
     "        auto * reg = ggml_backend_dev_backend_reg(ggml_backend_get_device(backend.get()));\n"
     "        if (reg) {\n"
     "            auto * set_use_ref_fn = (void (*)(ggml_backend_t, bool)) "
     "ggml_backend_reg_get_proc_address(reg, \"ggml_backend_cpu_set_use_ref\");\n"
     "            if (set_use_ref_fn) {\n"
     "                set_use_ref_fn(backend.get(), use_ref);\n"
     "            }\n"
     "        }\n"
     "    }\n"
     "}\n\n"
     "void llama_context::set_embeddings(bool value) {\n"),
    ("ggml/src/ggml-cpu/llamafile/sgemm.cpp",
     '#if defined(__AVX2__) && defined(__F16C__)\n// Templated functions for gemm of dimensions 4xN\n',
     '#if defined(__AVX512VNNI__) && defined(__AVX512VL__)\n#define SLOT_DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)\n#elif defined(__AVXVNNI__)\n#define SLOT_DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)\n#endif\n#if defined(__AVX2__) && defined(__F16C__)\n// Templated functions for gemm of dimensions 4xN\n'),
    ("ggml/src/ggml-cpu/llamafile/sgemm.cpp",
     '                for (int64_t j = 0; j < RN; ++j) {\n                        __m128 db = _mm_set1_ps(unhalf(B[ldb * (jj + j) + l].d));\n                        // Computation of product of delta values for four blocks and replicate it across 256 bit lane\n                        __m256 dvec =  _mm256_castps128_ps256(_mm_mul_ps(da, db));\n                        dvec = _mm256_permute2f128_ps(dvec ,dvec, 0);\n                        // Computation of dot product and multiplication with appropriate delta value products\n                        Cv[j][0] = madd(_mm256_shuffle_ps(dvec, dvec, 0),\n                                    updot(_mm256_sign_epi8(avec0, avec0),\n                                          _mm256_sign_epi8(load(B + ldb * (jj + j) + l), avec0)),\n                                    Cv[j][0]);\n',
     '#if (defined(__AVX512VNNI__) && defined(__AVX512VL__)) || defined(__AVXVNNI__)\n                // a + 128 (unsigned) times b, from lanes that start at -128 * sum(b): the same\n                // int32 lanes as |a| times sign(b, a), in one instruction instead of three.\n                const __m256i flip = _mm256_set1_epi8((char)0x80);\n                const __m256i au0 = _mm256_xor_si256(avec0, flip);\n                const __m256i au1 = _mm256_xor_si256(avec1, flip);\n                const __m256i au2 = _mm256_xor_si256(avec2, flip);\n                const __m256i au3 = _mm256_xor_si256(avec3, flip);\n                for (int64_t j = 0; j < RN; ++j) {\n                        __m128 db = _mm_set1_ps(unhalf(B[ldb * (jj + j) + l].d));\n                        __m256 dvec =  _mm256_castps128_ps256(_mm_mul_ps(da, db));\n                        dvec = _mm256_permute2f128_ps(dvec ,dvec, 0);\n                        const __m256i bvec = load(B + ldb * (jj + j) + l);\n                        const __m256i base = _mm256_sub_epi32(_mm256_setzero_si256(),\n                                                              SLOT_DPBUSD(_mm256_setzero_si256(), flip, bvec));\n                        Cv[j][0] = madd(_mm256_shuffle_ps(dvec, dvec, 0),\n                                        _mm256_cvtepi32_ps(SLOT_DPBUSD(base, au0, bvec)), Cv[j][0]);\n                        Cv[j][1] = madd(_mm256_shuffle_ps(dvec, dvec, 85),\n                                        _mm256_cvtepi32_ps(SLOT_DPBUSD(base, au1, bvec)), Cv[j][1]);\n                        Cv[j][2] = madd(_mm256_shuffle_ps(dvec, dvec, 170),\n                                        _mm256_cvtepi32_ps(SLOT_DPBUSD(base, au2, bvec)), Cv[j][2]);\n                        Cv[j][3] = madd(_mm256_shuffle_ps(dvec, dvec, 255),\n                                        _mm256_cvtepi32_ps(SLOT_DPBUSD(base, au3, bvec)), Cv[j][3]);\n                }\n                if (false)  // the loop without VNNI\n#endif\n                for (int64_t j = 0; j < RN; ++j) {\n                        __m128 db = _mm_set1_ps(unhalf(B[ldb * (jj + j) + l].d));\n                        // Computation of product of delta values for four blocks and replicate it across 256 bit lane\n                        __m256 dvec =  _mm256_castps128_ps256(_mm_mul_ps(da, db));\n                        dvec = _mm256_permute2f128_ps(dvec ,dvec, 0);\n                        // Computation of dot product and multiplication with appropriate delta value products\n                        Cv[j][0] = madd(_mm256_shuffle_ps(dvec, dvec, 0),\n                                    updot(_mm256_sign_epi8(avec0, avec0),\n                                          _mm256_sign_epi8(load(B + ldb * (jj + j) + l), avec0)),\n                                    Cv[j][0]);\n'),
    ("include/llama.h",
     "    LLAMA_API void llama_set_cpu_use_ref(struct llama_context * ctx, bool use_ref);\n",
     "    LLAMA_API void llama_set_cpu_use_ref(struct llama_context * ctx, bool use_ref);\n\n"
     "    // Whether llama_decode keeps logits, copied out of the graph (true by default)\n"
     "    LLAMA_API void llama_set_logits_copy(struct llama_context * ctx, bool copy);\n"),
    ("src/llama-context.h",
     "    void set_cpu_use_ref(bool use_ref);\n",
     "    void set_cpu_use_ref(bool use_ref);\n"
     "    void set_logits_copy(bool copy);\n"
     "    bool logits_copy = true;\n"),
    ("src/llama-context.cpp",
     "void llama_set_cpu_use_ref(llama_context * ctx, bool use_ref) {\n    ctx->set_cpu_use_ref(use_ref);\n}\n",
     "void llama_set_cpu_use_ref(llama_context * ctx, bool use_ref) {\n    ctx->set_cpu_use_ref(use_ref);\n}\n\n"
     "void llama_set_logits_copy(llama_context * ctx, bool copy) {\n    ctx->set_logits_copy(copy);\n}\n"),
    ("src/llama-context.cpp",
     "void llama_context::set_cpu_use_ref(bool use_ref) {\n",
     "void llama_context::set_logits_copy(bool copy) {\n    logits_copy = copy;\n}\n\n"
     "void llama_context::set_cpu_use_ref(bool use_ref) {\n"),
    ("src/llama-context.cpp",
     "    bool has_logits     = true;\n    bool has_embd       = cparams.embeddings;\n",
     "    bool has_logits     = logits_copy;\n    bool has_embd       = cparams.embeddings;\n"),
    ("src/llama-context.cpp",
     "        if (logits.data && t_logits && n_outputs > 0 && needs_raw_logits(ubatch, sampling.samplers)) {\n",
     "        if (logits_copy && logits.data && t_logits && n_outputs > 0 && needs_raw_logits(ubatch, sampling.samplers)) {\n"),
)


def digest() -> str:
    """A short hash of the edits, recorded in the unpacked tree's stamp."""
    h = hashlib.sha256()
    for path, old, new in EDITS:
        h.update(f"{path}\0{old}\0{new}\0".encode())
    return h.hexdigest()[:16]


def apply(root: Path) -> None:
    for path, old, new in EDITS:
        file = root / path
        text = file.read_text(encoding="utf-8")
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"llama_cpp_patches: {path}: expected the text to patch exactly once, found {count}")
        file.write_text(text.replace(old, new), encoding="utf-8")


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: llama_cpp_patches.py LLAMA_CPP_DIR")
    apply(Path(sys.argv[1]))
