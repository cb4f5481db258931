// What slot_cpp needs to know about a GGUF file before and beside llama.cpp:
// the architecture, the output head's location and type, and whether the head
// is linear in the hidden state (which SLOT's exactness relies on).
#pragma once

#include <cstdint>
#include <string>

#include "ggml.h"

namespace slot {

struct TensorLocation {
    std::string name;
    ggml_type type = GGML_TYPE_F32;
    int64_t ne0 = 0;  // contiguous dimension (n_embd for the head)
    int64_t ne1 = 0;  // rows (n_vocab for the head)
    uint64_t file_offset = 0;  // absolute offset of the data in the file
    uint64_t nbytes = 0;
};

struct ModelFileInfo {
    std::string path;
    std::string architecture;
    std::string name;
    int64_t n_embd = 0;
    int64_t n_vocab = 0;  // rows of the head tensor
    int64_t n_tensors = 0;
    bool has_head = false;
    bool tied_embeddings = false;  // head is token_embd.weight
    TensorLocation head;
    bool has_head_bias = false;
    TensorLocation head_bias;
    bool has_head_scale = false;  // output.scale tensor
    float final_logit_softcapping = 0.0f;
    float logit_scale = 0.0f;  // 0: absent
    std::string chat_template;
    uint64_t file_size = 0;

    // Empty when SLOT applies exactly, else the reason it does not.
    std::string slot_unsupported_reason() const;
};

// Reads metadata only (no tensor data). Throws ModelLoadError with a message
// that names the problem (missing, not a file, not GGUF, truncated, ...).
ModelFileInfo read_model_file_info(const std::string& path);

}  // namespace slot
