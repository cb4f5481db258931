#include "drafter.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "errors.h"
#include "head_kernels.h"

namespace slot {
namespace {

EngineParams draft_params(const std::string& path, const Engine& target) {
    const EngineParams& t = target.params();
    EngineParams p;
    p.model_path = path;
    p.n_ctx = target.n_ctx();
    p.n_batch = t.n_batch;
    p.n_threads = target.n_threads();
    p.n_gpu_layers = t.n_gpu_layers;
    p.n_parallel = t.n_parallel;
    p.use_mmap = t.use_mmap;
    p.rpc_servers = t.rpc_servers;
    p.cache_type_k = t.cache_type_k;
    p.cache_type_v = t.cache_type_v;
    p.flash_attn = t.flash_attn;
    p.use_mlock = t.use_mlock;
    // Not deterministic: drafts only propose, the target's samples decide.
    return p;
}

std::string token_text(const llama_vocab* vocab, int32_t id) {
    const char* text = llama_vocab_get_text(vocab, id);
    return text ? text : "";
}

void check_same_vocabulary(const Engine& draft, const Engine& target, const std::string& path) {
    const std::string where = "draft_model " + path + ": ";
    if (draft.n_vocab() != target.n_vocab()) {
        throw std::invalid_argument(where + "its vocabulary has " + std::to_string(draft.n_vocab()) +
                                    " tokens and the model's " + std::to_string(target.n_vocab()) +
                                    "; a draft model needs the model's vocabulary");
    }
    if (llama_vocab_type(draft.vocab()) != llama_vocab_type(target.vocab())) {
        throw std::invalid_argument(where + "its tokenizer is of another type than the model's");
    }
    for (int32_t id = 0; id < target.n_vocab(); ++id) {
        const char* a = llama_vocab_get_text(draft.vocab(), id);
        const char* b = llama_vocab_get_text(target.vocab(), id);
        if (std::strcmp(a ? a : "", b ? b : "") != 0) {
            throw std::invalid_argument(where + "token " + std::to_string(id) + " is '" + token_text(draft.vocab(), id) +
                                        "' there and '" + token_text(target.vocab(), id) +
                                        "' in the model; a draft model needs the model's vocabulary");
        }
    }
}

// The most likely token of a row and its probability (1 when p_min is 0: not needed).
std::pair<int32_t, double> top_token(const float* logits, int n, float p_min) {
    const auto best = static_cast<int32_t>(std::max_element(logits, logits + n) - logits);
    if (p_min <= 0.0f) return {best, 1.0};
    return {best, std::exp(static_cast<double>(logits[best]) - log_sum_exp(logits, n))};
}

std::unique_ptr<Engine> load_draft(const std::string& path, const Engine& target) {
    try {
        return std::make_unique<Engine>(draft_params(path, target));
    } catch (const ModelLoadError& exc) {
        throw ModelLoadError(std::string("draft_model: ") + exc.what());
    }
}

}  // namespace

Drafter::Drafter(const std::string& path, const Engine& target) : e_(load_draft(path, target)) {
    if (e_->recurrent()) {
        throw std::invalid_argument("draft_model " + path + ": a recurrent or hybrid model cannot draft (its "
                                    "sequences cannot be cut back)");
    }
    check_same_vocabulary(*e_, target, path);
}

bool Drafter::free_one(const std::vector<int>& busy) {
    for (int s = 0; s < e_->n_parallel(); ++s) {
        if (std::find(busy.begin(), busy.end(), s) == busy.end() && !e_->seq_tokens(s).empty()) {
            e_->seq_clear(s);
            return true;
        }
    }
    return false;
}

void Drafter::catch_up(const Ask& ask, const MakeRoom& room) {
    const auto& history = *ask.history;
    const auto& held = e_->seq_tokens(ask.seq);
    const size_t want = history.size() - 1;
    size_t common = std::min(common_prefix(held, history), want);
    if (common < held.size() && !e_->seq_truncate(ask.seq, static_cast<int>(common))) common = 0;
    if (common == want) return;
    e_->append(ask.seq, std::vector<int32_t>(history.begin() + static_cast<std::ptrdiff_t>(common), history.end() - 1),
               Engine::Outputs::None, 0, {}, room, {});
}

std::vector<std::vector<int32_t>> Drafter::draft(const std::vector<Ask>& asks, float p_min) {
    std::vector<std::vector<int32_t>> out(asks.size());
    std::vector<int> busy;
    for (const Ask& a : asks) busy.push_back(a.seq);
    // Room in the draft's cache: the sequences no lane asks for go first.
    const MakeRoom room = [this, &busy] { return free_one(busy); };
    std::vector<BatchToken> batch;
    std::vector<size_t> rows;  // the ask of each batch row
    try {
        for (size_t i = 0; i < asks.size(); ++i) {
            const Ask& a = asks[i];
            if (a.max <= 0 || a.history == nullptr || a.history->empty()) continue;
            if (static_cast<int>(a.history->size()) + a.max > e_->seq_capacity()) continue;
            catch_up(a, room);
            batch.push_back({a.seq, a.history->back(), true});
            rows.push_back(i);
        }
        while (!batch.empty()) {
            e_->decode(batch, room, {});
            std::vector<BatchToken> next;
            std::vector<size_t> next_rows;
            for (size_t r = 0; r < rows.size(); ++r) {
                const size_t i = rows[r];
                const auto [token, p] = top_token(e_->logits_row(static_cast<int>(r)), e_->n_vocab(), p_min);
                if (p < p_min) continue;
                out[i].push_back(token);
                if (static_cast<int>(out[i].size()) < asks[i].max) {
                    next.push_back({asks[i].seq, token, true});
                    next_rows.push_back(i);
                }
            }
            batch = std::move(next);
            rows = std::move(next_rows);
        }
    } catch (const ContextLengthError&) {
        // The draft's cache is full: this step goes without drafts.
        for (int s = 0; s < e_->n_parallel(); ++s) e_->seq_clear(s);
        return std::vector<std::vector<int32_t>>(asks.size());
    }
    return out;
}

}  // namespace slot
