// Speculation's second drafter: a small model with the target's vocabulary
// (llama-server's --model-draft). It runs in an engine of its own, one
// sequence per target sequence; what each sequence holds is matched against
// the target lane's tokens at every draft, so it needs no other bookkeeping.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"

namespace slot {

class Drafter {
public:
    // Loads `path` with the target's context settings (its own RoPE, no
    // adapters or overrides). std::invalid_argument when its vocabulary is
    // not the target's, token for token.
    Drafter(const std::string& path, const Engine& target);

    struct Ask {
        int seq = 0;                                   // the target's sequence id
        const std::vector<int32_t>* history = nullptr;  // its tokens, the pending one last
        int max = 0;                                   // tokens to draft at most
    };
    // Greedy drafts after each ask's history, all asks advancing in one batch
    // per drafted position. A draft ends early at a token the draft model
    // gives less than p_min. A draft that does not fit the draft's context is
    // empty (speculation only saves time; the answer is the target's).
    std::vector<std::vector<int32_t>> draft(const std::vector<Ask>& asks, float p_min);

private:
    // Clears a cached sequence that is not in `busy`; false when there is none.
    bool free_one(const std::vector<int>& busy);
    // Brings the sequence to its history less the last token, from what it holds.
    void catch_up(const Ask& ask, const MakeRoom& room);

    std::unique_ptr<Engine> e_;
};

}  // namespace slot
