#include "grammar.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <list>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "json-schema-to-grammar.h"
#include "llama.h"
#include "log.h"
#include "sampling.h"

namespace slot {

void SamplerFree::operator()(llama_sampler* s) const {
    if (s != nullptr) llama_sampler_free(s);
}

Grammar::Grammar(const llama_vocab* vocab, const std::string& gbnf, const std::vector<std::string>& trigger_patterns,
                 const std::vector<int32_t>& trigger_tokens, const std::vector<int32_t>& prefill) {
    clear_last_error_line();
    if (trigger_patterns.empty() && trigger_tokens.empty()) {
        parsed_.reset(llama_sampler_init_grammar(vocab, gbnf.c_str(), "root"));
    } else {
        std::vector<const char*> patterns;
        for (const auto& p : trigger_patterns) patterns.push_back(p.c_str());
        try {
            parsed_.reset(llama_sampler_init_grammar_lazy_patterns(vocab, gbnf.c_str(), "root", patterns.data(),
                                                                   patterns.size(), trigger_tokens.data(),
                                                                   trigger_tokens.size()));
        } catch (const std::exception& e) {  // a trigger that is not a regular expression
            throw std::invalid_argument(std::string("grammar trigger: ") + e.what());
        }
    }
    if (!parsed_) {
        const std::string why = last_error_line();
        throw std::invalid_argument("grammar: llama.cpp cannot use it" + (why.empty() ? std::string(" (see the log)")
                                                                           : ": " + why));
    }
    for (size_t i = 0; i < prefill.size(); ++i) {
        if (!grammar_allows(parsed_.get(), prefill[i])) {
            throw std::invalid_argument("grammar: its prefill is refused at token " + std::to_string(i));
        }
        grammar_accept(parsed_.get(), prefill[i]);
    }
}

GrammarState Grammar::fork() const { return GrammarState(llama_sampler_clone(parsed_.get())); }

namespace {

constexpr float kRefused = -std::numeric_limits<float>::infinity();

// The grammar's verdict on each token of `ids`: data[i].logit is -inf where
// it refuses ids[i].
void judge(llama_sampler* s, const std::vector<int32_t>& ids, std::vector<llama_token_data>& data) {
    data.clear();
    for (int32_t id : ids) data.push_back({id, 0.0f, 0.0f});
    llama_token_data_array array{data.data(), data.size(), -1, false};
    llama_sampler_apply(s, &array);
}

}  // namespace

bool grammar_allows(llama_sampler* s, int32_t token) {
    llama_token_data one{token, 0.0f, 0.0f};  // once per drawn token: no allocation
    llama_token_data_array array{&one, 1, -1, false};
    llama_sampler_apply(s, &array);
    return one.logit != kRefused;
}

std::unique_ptr<PrefixForest> build_prefix_forest(const llama_vocab* vocab) {
    auto forest = std::make_unique<PrefixForest>();
    const int32_t n = llama_vocab_n_tokens(vocab);
    std::vector<std::string> pieces(static_cast<size_t>(n));
    std::vector<int32_t> order;
    std::vector<char> buf(256);
    for (int32_t t = 0; t < n; ++t) {
        int32_t len = llama_token_to_piece(vocab, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
        if (len < 0) {
            buf.resize(static_cast<size_t>(-len));
            len = llama_token_to_piece(vocab, t, buf.data(), static_cast<int32_t>(buf.size()), 0, true);
        }
        pieces[static_cast<size_t>(t)].assign(buf.data(), static_cast<size_t>(std::max(len, 0)));
        const std::string& piece = pieces[static_cast<size_t>(t)];
        if (llama_vocab_is_eog(vocab, t) || piece.empty() || piece[0] == '\0') forest->loose.push_back(t);
        else order.push_back(t);
    }
    std::sort(order.begin(), order.end(), [&pieces](int32_t a, int32_t b) {
        return pieces[static_cast<size_t>(a)] < pieces[static_cast<size_t>(b)] ||
               (pieces[static_cast<size_t>(a)] == pieces[static_cast<size_t>(b)] && a < b);
    });
    // In sorted order, the tokens whose pieces a token extends are on a stack.
    forest->children.resize(static_cast<size_t>(n));
    std::vector<int32_t> open;
    for (int32_t t : order) {
        const std::string& piece = pieces[static_cast<size_t>(t)];
        while (!open.empty() && piece.compare(0, pieces[static_cast<size_t>(open.back())].size(),
                                              pieces[static_cast<size_t>(open.back())]) != 0) {
            open.pop_back();
        }
        if (open.empty()) forest->roots.push_back(t);
        else forest->children[static_cast<size_t>(open.back())].push_back(t);
        open.push_back(t);
    }
    return forest;
}

void grammar_mask_all(llama_sampler* s, const PrefixForest& forest, float* logits, int64_t n_vocab) {
    std::vector<char> allowed(static_cast<size_t>(n_vocab), 0);
    std::vector<int32_t> level = forest.roots, next;
    level.insert(level.end(), forest.loose.begin(), forest.loose.end());
    std::vector<llama_token_data> data;
    while (!level.empty()) {
        judge(s, level, data);
        next.clear();
        for (const llama_token_data& d : data) {
            if (d.logit == kRefused) continue;
            allowed[static_cast<size_t>(d.id)] = 1;
            const auto& kids = forest.children[static_cast<size_t>(d.id)];
            next.insert(next.end(), kids.begin(), kids.end());
        }
        level.swap(next);
    }
    for (int64_t v = 0; v < n_vocab; ++v) {
        if (!allowed[static_cast<size_t>(v)]) logits[v] = kRefused;
    }
}

void grammar_mask_top(llama_sampler* s, const PrefixForest& forest, float* logits, int64_t n_vocab, int needed) {
    // The m highest logits, judged together and read in descending order;
    // the grammar usually allows enough of them, else the whole vocabulary
    // is masked.
    std::vector<std::pair<float, int32_t>> top;
    highest_logits(logits, n_vocab, std::max<size_t>(64, 2 * static_cast<size_t>(needed)), top);
    std::sort(top.begin(), top.end(), higher_logit);
    std::vector<int32_t> ids;
    ids.reserve(top.size());
    for (const auto& c : top) ids.push_back(c.second);
    std::vector<llama_token_data> data;
    judge(s, ids, data);
    std::vector<std::pair<float, int32_t>> keep;  // the allowed ones, down to the last one needed
    for (size_t i = 0; i < top.size() && keep.size() < static_cast<size_t>(needed); ++i) {
        if (data[i].logit != kRefused) keep.push_back(top[i]);
    }
    if (keep.size() < static_cast<size_t>(needed)) {
        grammar_mask_all(s, forest, logits, n_vocab);
        return;
    }
    // Everything else is out of reach of the draw.
    std::fill(logits, logits + n_vocab, kRefused);
    for (const auto& [value, id] : keep) logits[id] = value;
}

void grammar_accept(llama_sampler* s, int32_t token) { llama_sampler_accept(s, token); }

namespace {

// The last conversions, most recent first: a server's requests usually
// repeat a few schemas. Failures are not kept.
struct SchemaCache {
    static constexpr size_t kEntries = 64;
    std::mutex mutex;
    std::list<std::pair<std::string, std::string>> entries;  // schema text, GBNF
};

SchemaCache& schema_cache() {
    static SchemaCache cache;
    return cache;
}

std::string convert_schema(const std::string& schema_json) {
    common_json schema;
    try {
        schema = common_json::parse(schema_json);
    } catch (const std::exception& e) {
        throw std::invalid_argument(std::string("json_schema is not valid JSON: ") + e.what());
    }
    try {
        return json_schema_to_grammar(schema);
    } catch (const std::exception& e) {
        throw std::invalid_argument(std::string("json_schema: ") + e.what());
    }
}

}  // namespace

std::string json_schema_to_gbnf(const std::string& schema_json) {
    SchemaCache& cache = schema_cache();
    {
        std::lock_guard<std::mutex> lock(cache.mutex);
        for (auto it = cache.entries.begin(); it != cache.entries.end(); ++it) {
            if (it->first == schema_json) {
                cache.entries.splice(cache.entries.begin(), cache.entries, it);
                return it->second;
            }
        }
    }
    std::string gbnf = convert_schema(schema_json);  // unlocked: another thread may convert it too
    std::lock_guard<std::mutex> lock(cache.mutex);
    cache.entries.emplace_front(schema_json, gbnf);
    if (cache.entries.size() > SchemaCache::kEntries) cache.entries.pop_back();
    return gbnf;
}

}  // namespace slot
