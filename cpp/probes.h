// The probes: the model inspected outside the token loop (probes.cpp), for
// tests, benchmarks and building datastores. Each takes the session's mutex
// through Session::with_model; those that evaluate tokens in the context need
// it free of running generate calls.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"
#include "rtd.h"
#include "session.h"

namespace slot::probes {

// ---- SLOT and the output head ----
// Where SLOT's head products run, e.g. "CPU (CPU head kernels)"; loads the head.
std::string slot_backend(Session& s);
std::vector<float> output_matrix(Session& s);  // n_vocab x n_embd
// SLOT's logit bias W*delta.
std::vector<float> logit_bias(Session& s, const std::vector<float>& delta);
// W h (+ the head's bias) for rows of final hidden states (n_embd floats each)
// by SLOT's own head product (its prompt logits on a CPU backend without
// adapters): rows x n_vocab.
std::vector<float> head_logits(Session& s, const std::vector<float>& hidden);
// Every position's logits and final normed hidden state.
void prompt_states(Session& s, const std::vector<int32_t>& tokens, std::vector<float>& hidden,
                   std::vector<float>& logits, const InterruptCheck& interrupted);
// SLOT's loss on `tokens` at `delta`, its gradient, and the bounded path's error bound.
double slot_loss_and_gradient(Session& s, const std::vector<int32_t>& tokens, const std::vector<float>& delta,
                              bool recompute, const std::string& cache_precision, double cache_tail_mass,
                              std::vector<float>& grad, double& loss_bound, const InterruptCheck& interrupted);
// log p(tokens[i] | tokens[<i]) for i >= first (teacher forcing), with
// delta's logit bias when delta is non-empty.
std::vector<double> token_logprobs(Session& s, const std::vector<int32_t>& tokens, int first,
                                   const std::vector<float>& delta, const InterruptCheck& interrupted);

// ---- datastores (RTD) ----
// Final normed hidden states of rows of tokens, without logits; the prompt
// cache is untouched.
void hidden_states(Session& s, const std::vector<std::vector<int32_t>>& rows, const Engine::StatesSink& sink,
                   const InterruptCheck& interrupted);
// A datastore index searched on this model's compute device.
std::shared_ptr<RtdIndex> make_rtd_index(Session& s, const uint16_t* keys, const int32_t* values, int64_t n,
                                         int64_t dim, int heads, std::shared_ptr<void> keepalive);

}  // namespace slot::probes
