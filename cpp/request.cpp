// The checks every request passes before any work starts (generation.h).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "generation.h"

namespace slot {
namespace {

void check_token_ids(const std::vector<int32_t>& tokens, int n_vocab) {
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab) {
            throw std::invalid_argument("token id " + std::to_string(t) + " is outside the vocabulary [0, " +
                                        std::to_string(n_vocab) + ")");
        }
    }
}

}  // namespace

void validate_request(const ModelShape& e, const GenerationRequest& req, int index) {
    const std::string where = index >= 0 ? "request " + std::to_string(index) + ": " : "";
    try {
        validate(req.sampling);
        validate(req.slot);
    } catch (const std::invalid_argument& exc) {
        throw std::invalid_argument(where + exc.what());
    }
    if (req.n < 1) throw std::invalid_argument(where + "n must be >= 1");
    if (req.draft_max < 0 || req.draft_max > 64) throw std::invalid_argument(where + "draft_max must be in [0, 64]");
    if (req.draft_max > 0 && e.recurrent) {
        throw std::invalid_argument(where + "draft_max needs a model whose sequences can be cut back; this one is "
                                    "recurrent or hybrid");
    }
    if (!(req.draft_p_min >= 0.0f && req.draft_p_min <= 1.0f)) {
        throw std::invalid_argument(where + "draft_p_min must be in [0, 1]");
    }
    if (req.draft_ngram < 1 || req.draft_ngram > 16) {
        throw std::invalid_argument(where + "draft_ngram must be in [1, 16]");
    }
    if (!req.lora_scales.empty() && static_cast<int>(req.lora_scales.size()) != e.n_adapters) {
        throw std::invalid_argument(where + "lora names " + std::to_string(req.lora_scales.size()) +
                                    " adapter scales; the model loaded " + std::to_string(e.n_adapters));
    }
    for (float s : req.lora_scales) {
        if (!std::isfinite(s)) throw std::invalid_argument(where + "LoRA scales must be finite");
    }
    if (req.max_tokens < 0) throw std::invalid_argument(where + "max_tokens must be >= 0");
    if (req.top_logprobs < 0) throw std::invalid_argument(where + "top_logprobs must be >= 0");
    for (const auto& [token, value] : req.logit_bias) {
        if (token < 0 || token >= e.n_vocab || !std::isfinite(value)) {
            throw std::invalid_argument(where + "logit_bias needs token ids inside the vocabulary and finite values");
        }
    }
    if (!req.grammar.empty() && !req.json_schema.empty()) {
        throw std::invalid_argument(where + "give grammar or json_schema, not both");
    }
    if (req.prompt.empty()) throw std::invalid_argument(where + "the prompt is empty");
    for (const auto& s : req.stop) {
        if (s.empty()) throw std::invalid_argument(where + "stop strings must not be empty");
    }
    check_token_ids(req.prompt, e.n_vocab);
    check_token_ids(req.response_prefix, e.n_vocab);
    check_token_ids(req.score_tokens, e.n_vocab);
    if (!req.delta.empty()) {
        if (static_cast<int>(req.delta.size()) != e.n_embd) {
            throw std::invalid_argument(where + "delta has " + std::to_string(req.delta.size()) +
                                        " values but the model's hidden size is " + std::to_string(e.n_embd));
        }
        for (float x : req.delta) {
            if (!std::isfinite(x)) throw std::invalid_argument(where + "delta contains a non-finite value");
        }
    }
    if (req.rtd) {
        try {
            validate(req.rtd_params, *req.rtd, e.n_embd, e.n_vocab);
        } catch (const std::invalid_argument& exc) {
            throw std::invalid_argument(where + exc.what());
        }
    }
    if (!req.slot.loss_mask.empty() && req.slot.loss_mask.size() + 1 != req.prompt.size()) {
        throw std::invalid_argument(where + "the loss mask has " + std::to_string(req.slot.loss_mask.size()) +
                                    " entries but the prompt has " + std::to_string(req.prompt.size()) +
                                    " tokens (one entry per token after the first)");
    }
    if (req.prompt_logprobs && req.delta.empty() && req.slot.steps > 0) {
        throw std::invalid_argument(where + "prompt logprobs need steps=0 (they are taken before SLOT learns delta)");
    }
    if (req.prompt_logprobs && req.rtd && req.rtd_params.lam > 0.0) {
        throw std::invalid_argument(where + "prompt logprobs are not available with RTD's blend");
    }
    if (!req.response_prefix.empty() && req.delta.empty() && req.slot.steps > 0) {
        throw std::invalid_argument(where + "response_prefix needs steps=0: learn delta on the prompt first, "
                                    "then pass it as delta");
    }
}

std::shared_ptr<const Grammar> parse_grammar(const ModelShape& e, const GenerationRequest& req, int index) {
    const std::string where = index >= 0 ? "request " + std::to_string(index) + ": " : "";
    std::shared_ptr<const Grammar> grammar;
    try {
        const std::string gbnf = req.json_schema.empty() ? req.grammar : json_schema_to_gbnf(req.json_schema);
        grammar = std::make_shared<const Grammar>(e.vocab, gbnf, req.grammar_triggers, req.grammar_trigger_tokens,
                                                  req.grammar_prefill);
    } catch (const std::invalid_argument& exc) {
        throw std::invalid_argument(where + exc.what());
    }
    if (!req.response_prefix.empty()) {
        GrammarState state = grammar->fork();
        for (size_t i = 0; i < req.response_prefix.size(); ++i) {
            if (!grammar_allows(state.get(), req.response_prefix[i])) {
                throw std::invalid_argument(where + "the response prefix leaves the grammar at its token " +
                                            std::to_string(i));
            }
            grammar_accept(state.get(), req.response_prefix[i]);
        }
    }
    return grammar;
}

bool has_grammar(const GenerationRequest& req) { return !req.grammar.empty() || !req.json_schema.empty(); }

// Whether a request's stages read the final hidden state (the retrieval blend).
bool uses_hidden(const GenerationRequest& req) { return req.rtd && req.rtd_params.lam > 0.0; }

// KV cells that one group of `samples` samples of `req` may occupy: the
// context once (the samples share it) and each sample's generated tokens but
// the last, which is never evaluated.
int64_t cells_needed(const GenerationRequest& req, int samples) {
    const int64_t context = static_cast<int64_t>(req.prompt.size() + req.response_prefix.size());
    return context + static_cast<int64_t>(samples) * std::max(0, req.max_tokens - 1);
}

}  // namespace slot
