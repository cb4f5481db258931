// The probes: calls that inspect the model outside the token loop, for tests,
// benchmarks and datastores, each run through Session::with_model (under the
// session mutex; the ones that evaluate tokens in the context only while no
// generate call runs). The reference loops are Engine's (reference_loop.cpp),
// reached the same way.
#include "probes.h"

#include <algorithm>
#include <stdexcept>

#include "head_kernels.h"
#include "slot_optimizer.h"

namespace slot::probes {

// ---- SLOT and the output head ----

std::string slot_backend(Session& s) {
    return s.with_model(nullptr, [&](Session::ModelAccess& m) {
        OutputHead& h = m.head();
        std::string out = h.backend().name();
        if (h.portable_ops()) {
            out += " (portable ggml ops; transposed head copy " +
                   std::to_string((h.transposed_copy_bytes() + (1u << 19)) >> 20) + " MiB)";
        } else {
            out += " (CPU head kernels)";
        }
        return out;
    });
}

std::vector<float> output_matrix(Session& s) {
    return s.with_model(nullptr, [&](Session::ModelAccess& m) {
        OutputHead& h = m.head();
        std::vector<float> w(static_cast<size_t>(h.n_vocab() * h.n_embd()));
        h.dequantize(w.data());
        return w;
    });
}

std::vector<float> logit_bias(Session& s, const std::vector<float>& delta) {
    return s.with_model(nullptr, [&](Session::ModelAccess& m) {
        OutputHead& h = m.head();
        if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
        std::vector<float> b(static_cast<size_t>(h.n_vocab()));
        h.project(delta.data(), b.data());
        return b;
    });
}

std::vector<float> head_logits(Session& s, const std::vector<float>& hidden) {
    return s.with_model(nullptr, [&](Session::ModelAccess& m) {
        OutputHead& h = m.head();
        const auto d = static_cast<size_t>(h.n_embd());
        if (hidden.empty() || hidden.size() % d != 0) throw std::invalid_argument("hidden must hold whole rows of n_embd floats");
        const auto rows = static_cast<int64_t>(hidden.size() / d);
        std::vector<float> z(static_cast<size_t>(rows) * static_cast<size_t>(h.n_vocab()));
        h.logits(hidden.data(), rows, z.data());
        return z;
    });
}

void prompt_states(Session& s, const std::vector<int32_t>& tokens, std::vector<float>& hidden,
                   std::vector<float>& logits, const InterruptCheck& interrupted) {
    s.with_model("prompt_states", [&](Session::ModelAccess& m) {
        Engine& e = m.engine();
        const size_t V = static_cast<size_t>(e.n_vocab()), d = static_cast<size_t>(e.n_embd());
        hidden.assign(tokens.size() * d, 0.0f);
        logits.assign(tokens.size() * V, 0.0f);
        e.prefill(tokens, true, 0,
                  [&](int first, int count, const float* z, const float* h) {
                      std::copy(z, z + static_cast<size_t>(count) * V, logits.begin() + static_cast<ptrdiff_t>(first * V));
                      std::copy(h, h + static_cast<size_t>(count) * d, hidden.begin() + static_cast<ptrdiff_t>(first * d));
                  },
                  interrupted);
    });
}

double slot_loss_and_gradient(Session& s, const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                              bool recompute, const std::string& cache_precision, double cache_tail_mass,
                              std::vector<float>& grad, double& loss_bound,
                              const InterruptCheck& interrupted) {
    return s.with_model("slot_loss_and_gradient", [&](Session::ModelAccess& m) {
        Engine& e = m.engine();
        if (tokens.size() < 2) throw std::invalid_argument("the prompt needs at least two tokens for a SLOT loss");
        OutputHead& h = m.head();
        SlotConfig config;
        config.recompute = recompute;
        config.cache_precision = cache_precision;
        config.cache_tail_mass = cache_tail_mass;
        validate(config);
        SlotProblem problem(h, tokens, config);
        e.clear_all();
        fill_slot_problem(e, problem, 0, tokens, {}, interrupted);
        const double loss = problem.loss_and_gradient(delta, grad, interrupted);
        loss_bound = problem.last_loss_bound();
        return loss;
    });
}

std::vector<double> token_logprobs(Session& s, const std::vector<int32_t>& tokens, int first,
                                   const std::vector<float>& delta, const InterruptCheck& interrupted) {
    return s.with_model("token_logprobs", [&](Session::ModelAccess& m) {
        Engine& e = m.engine();
        if (first < 1 || first >= static_cast<int>(tokens.size())) {
            throw std::invalid_argument("first must index a token after the first one");
        }
        const int64_t V = e.n_vocab();
        std::vector<float> bias;
        if (!delta.empty()) {
            OutputHead& h = m.head();
            if (static_cast<int64_t>(delta.size()) != h.n_embd()) throw std::invalid_argument("delta has the wrong length");
            bias.resize(static_cast<size_t>(V));
            h.project(delta.data(), bias.data());
        }
        std::vector<double> out;
        out.reserve(tokens.size() - static_cast<size_t>(first));
        std::vector<float> row(static_cast<size_t>(V));
        // Row r's logits predict tokens[r + 1]; only rows first-1 .. N-2 are scored.
        e.prefill(tokens, true, 256,
                  [&](int start, int count, const float* logits, const float*) {
                      for (int i = 0; i < count; ++i) {
                          const int r = start + i;
                          if (r < first - 1 || r + 1 >= static_cast<int>(tokens.size())) continue;
                          const float* z = logits + static_cast<size_t>(i) * static_cast<size_t>(V);
                          if (!bias.empty()) {
                              for (int64_t v = 0; v < V; ++v) row[static_cast<size_t>(v)] = z[v] + bias[static_cast<size_t>(v)];
                              z = row.data();
                          }
                          const int32_t y = tokens[static_cast<size_t>(r + 1)];
                          out.push_back(static_cast<double>(z[y]) - log_sum_exp(z, V));
                      }
                  },
                  interrupted);
        return out;
    });
}

// ---- datastores (RTD) ----

void hidden_states(Session& s, const std::vector<std::vector<int32_t>>& rows, const Engine::StatesSink& sink,
                   const InterruptCheck& interrupted) {
    s.with_model(nullptr, [&](Session::ModelAccess& m) {
        m.engine().hidden_states(rows, sink, interrupted);
    });
}

std::shared_ptr<RtdIndex> make_rtd_index(Session& s, const uint16_t* keys, const int32_t* values, int64_t n,
                                         int64_t dim, int heads, std::shared_ptr<void> keepalive) {
    return s.with_model(nullptr, [&](Session::ModelAccess& m) {
        Engine& e = m.engine();
        if (dim != e.n_embd()) {
            throw std::invalid_argument("the datastore's keys have " + std::to_string(dim) +
                                        " dimensions but the model's hidden size is " + std::to_string(e.n_embd()));
        }
        return std::make_shared<RtdIndex>(keys, values, n, dim, heads, e.n_threads(), head_device(e.params()),
                                          std::move(keepalive));
    });
}

}  // namespace slot::probes
