// Constrained decoding: a GBNF grammar, parsed and run by llama.cpp's grammar
// sampler, as the last stage before a sequence's token is drawn. JSON schemas
// become GBNF through llama.cpp's common/json-schema-to-grammar.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct llama_sampler;
struct llama_vocab;

namespace slot {

struct SamplerFree {
    void operator()(llama_sampler* s) const;
};
using GrammarState = std::unique_ptr<llama_sampler, SamplerFree>;

// A parsed grammar (its start rule is "root"); each sequence works on a copy
// of its state (fork), advanced token by token (accept).
class Grammar {
public:
    // Throws std::invalid_argument naming llama.cpp's complaint when the text
    // is not a grammar it can run. With trigger patterns (regular expressions
    // over the answer) or trigger tokens the grammar is lazy: it applies from
    // the first trigger on. `prefill`: tokens the grammar reads before the
    // answer (text the prompt already ends with that the grammar spells out).
    Grammar(const llama_vocab* vocab, const std::string& gbnf, const std::vector<std::string>& trigger_patterns = {},
            const std::vector<int32_t>& trigger_tokens = {}, const std::vector<int32_t>& prefill = {});

    GrammarState fork() const;

private:
    GrammarState parsed_;
};

// The vocabulary as a forest of prefixes: token b is a child of token a when
// a's piece is the longest token piece that b's piece starts with. A grammar
// that refuses a token refuses every token that extends its piece (pieces are
// matched character by character from the grammar's state), so a mask walks
// the forest level by level and never visits below a refused token.
struct PrefixForest {
    std::vector<int32_t> roots;
    std::vector<std::vector<int32_t>> children;  // by token id
    std::vector<int32_t> loose;  // end-of-generation tokens and empty pieces: checked one by one
};
std::unique_ptr<PrefixForest> build_prefix_forest(const llama_vocab* vocab);

// Whether `token` may come next in state s.
bool grammar_allows(llama_sampler* s, int32_t token);
// Sets every token the grammar does not allow next to -inf (walking the
// vocabulary's prefix forest).
void grammar_mask_all(llama_sampler* s, const PrefixForest& forest, float* logits, int64_t n_vocab);
// Masks only as far as a draw needs: the highest logits are checked in
// descending order until `needed` allowed tokens are found; every token
// above the last of those that the grammar refuses, and every token below
// it, is set to -inf. With top-k truncation (needed = k) or greedy decoding
// (needed = 1) the draw then equals a draw from the fully masked logits.
void grammar_mask_top(llama_sampler* s, const PrefixForest& forest, float* logits, int64_t n_vocab, int needed);
// Advances s past `token` (which it must allow).
void grammar_accept(llama_sampler* s, int32_t token);

// GBNF for a JSON schema (JSON text); std::invalid_argument when the text is
// not JSON or the schema cannot be converted. The last 64 conversions are
// kept (thread-safe).
std::string json_schema_to_gbnf(const std::string& schema_json);

}  // namespace slot
