// The plain structs of a generate call: Request (what to generate, with its
// sampling, SLOT and RTD settings) and RawResult (what came back). Both are
// copied across the boundary; neither touches a Session.
#include <string>
#include <utility>
#include <vector>

#include "bind_common.h"
#include "generation.h"

namespace slot::bind {

void bind_request(py::module_& m) {
    py::class_<GenerationResult>(m, "RawResult")
        .def_property_readonly("text_bytes", [](const GenerationResult& r) { return py::bytes(r.text); })
        .def_readonly("tokens", &GenerationResult::tokens)
        .def_readonly("finish_reason", &GenerationResult::finish_reason)
        .def_property_readonly("delta", [](const GenerationResult& r) -> py::object {
            if (r.delta.empty()) return py::none();
            return to_numpy(r.delta);
        })
        .def_readonly("losses", &GenerationResult::losses)
        .def_readonly("steps_done", &GenerationResult::steps_done)
        .def_readonly("slot_lr", &GenerationResult::slot_lr)
        .def_readonly("calibration_lrs", &GenerationResult::calibration_lrs)
        .def_readonly("calibration_kls", &GenerationResult::calibration_kls)
        .def_readonly("calibration_seconds", &GenerationResult::calibration_seconds)
        .def_readonly("slot_status", &GenerationResult::slot_status)
        .def_readonly("slot_path", &GenerationResult::slot_path)
        .def_readonly("slot_cache_bytes", &GenerationResult::slot_cache_bytes)
        .def_readonly("slot_loss_bound", &GenerationResult::slot_loss_bound)
        .def_readonly("slot_cache_mean_k", &GenerationResult::slot_cache_mean_k)
        .def_property_readonly("slot_profile", [](const GenerationResult& r) {
            py::dict d;
            d["forward"] = r.slot_profile.forward;
            d["cache"] = r.slot_profile.cache;
            d["backward"] = r.slot_profile.backward;
            d["host"] = r.slot_profile.host;
            return d;
        })
        .def_readonly("prompt_tokens", &GenerationResult::prompt_tokens)
        .def_readonly("cached_tokens", &GenerationResult::cached_tokens)
        .def_readonly("drafted_tokens", &GenerationResult::drafted_tokens)
        .def_readonly("accepted_tokens", &GenerationResult::accepted_tokens)
        .def_readonly("seed", &GenerationResult::seed)
        .def_readonly("token_logprobs", &GenerationResult::token_logprobs)
        .def_readonly("top_logprobs", &GenerationResult::top_logprobs)
        .def_readonly("score_logprobs", &GenerationResult::score_logprobs)
        .def_readonly("prompt_logprobs", &GenerationResult::prompt_logprobs)
        .def_property_readonly("hidden", [](const GenerationResult& r) -> py::object {
            if (r.hidden.empty()) return py::none();
            return to_numpy(r.hidden);
        })
        .def_readonly("prefill_seconds", &GenerationResult::prefill_seconds)
        .def_readonly("optimise_seconds", &GenerationResult::optimise_seconds)
        .def_readonly("generate_seconds", &GenerationResult::generate_seconds);

    // Request's fields are nested in C++ (sampling, slot, rtd_params) and flat
    // in Python: a property per field, read and written by value.
#define SLOT_FIELD(name, member) \
    def_property(name, [](const GenerationRequest& r) { return r.member; }, \
                 [](GenerationRequest& r, decltype(GenerationRequest{}.member) v) { r.member = std::move(v); })
    py::class_<GenerationRequest>(m, "Request")
        .def(py::init<>())
        .SLOT_FIELD("prompt", prompt)
        .SLOT_FIELD("response_prefix", response_prefix)
        .SLOT_FIELD("n", n)
        .SLOT_FIELD("max_tokens", max_tokens)
        .SLOT_FIELD("temperature", sampling.temperature)
        .SLOT_FIELD("top_k", sampling.top_k)
        .SLOT_FIELD("top_p", sampling.top_p)
        .SLOT_FIELD("min_p", sampling.min_p)
        .SLOT_FIELD("repeat_penalty", sampling.repeat_penalty)
        .SLOT_FIELD("repeat_last_n", sampling.repeat_last_n)
        .SLOT_FIELD("presence_penalty", sampling.presence_penalty)
        .SLOT_FIELD("frequency_penalty", sampling.frequency_penalty)
        .SLOT_FIELD("logit_bias", logit_bias)
        .SLOT_FIELD("seed", sampling.seed)
        .SLOT_FIELD("stop", stop)
        .SLOT_FIELD("steps", slot.steps)
        .SLOT_FIELD("lr", slot.lr)
        .SLOT_FIELD("auto_lr", slot.auto_lr)
        .SLOT_FIELD("kl_budget", slot.kl_budget)
        .SLOT_FIELD("beta1", slot.beta1)
        .SLOT_FIELD("beta2", slot.beta2)
        .SLOT_FIELD("eps", slot.eps)
        .SLOT_FIELD("weight_decay", slot.weight_decay)
        .SLOT_FIELD("memory_budget", slot.memory_budget)
        .SLOT_FIELD("recompute", slot.recompute)
        .SLOT_FIELD("cache_precision", slot.cache_precision)
        .SLOT_FIELD("cache_tail_mass", slot.cache_tail_mass)
        .def_property(
            "loss_mask",
            [](const GenerationRequest& r) {
                return std::vector<bool>(r.slot.loss_mask.begin(), r.slot.loss_mask.end());
            },
            [](GenerationRequest& r, const std::vector<bool>& mask) {
                r.slot.loss_mask.assign(mask.begin(), mask.end());
            })
        .SLOT_FIELD("grammar", grammar)
        .SLOT_FIELD("json_schema", json_schema)
        .SLOT_FIELD("grammar_triggers", grammar_triggers)
        .SLOT_FIELD("grammar_trigger_tokens", grammar_trigger_tokens)
        .SLOT_FIELD("grammar_prefill", grammar_prefill)
        .SLOT_FIELD("render_tokens", render_tokens)
        .SLOT_FIELD("prompt_logprobs", prompt_logprobs)
        .SLOT_FIELD("ignore_eos", ignore_eos)
        .SLOT_FIELD("logprobs", logprobs)
        .SLOT_FIELD("top_logprobs", top_logprobs)
        .SLOT_FIELD("cache_prompt", cache_prompt)
        .SLOT_FIELD("lora_scales", lora_scales)
        .SLOT_FIELD("draft_max", draft_max)
        .SLOT_FIELD("draft_ngram", draft_ngram)
        .SLOT_FIELD("draft_p_min", draft_p_min)
        .SLOT_FIELD("score_tokens", score_tokens)
        .SLOT_FIELD("return_hidden", return_hidden)
        .SLOT_FIELD("rtd", rtd)
        .SLOT_FIELD("rtd_k", rtd_params.k)
        .SLOT_FIELD("rtd_temperature", rtd_params.temperature)
        .SLOT_FIELD("rtd_lambda", rtd_params.lam)
        .SLOT_FIELD("rtd_nprobe", rtd_params.nprobe)
        .SLOT_FIELD("rtd_gate", rtd_params.gate.on)
        .SLOT_FIELD("rtd_gate_bias", rtd_params.gate.bias)
        .SLOT_FIELD("rtd_gate_distance", rtd_params.gate.distance)
        .SLOT_FIELD("rtd_gate_top_mass", rtd_params.gate.top_mass)
        .SLOT_FIELD("rtd_gate_scale", rtd_params.gate.scale)
        .def_property("delta",
                      [](const GenerationRequest& r) -> py::object {
                          if (r.delta.empty()) return py::none();
                          return to_numpy(r.delta);
                      },
                      [](GenerationRequest& r, py::object d) {
                          if (d.is_none()) r.delta.clear();
                          else r.delta = from_numpy(d.cast<FloatArray>());
                      });
#undef SLOT_FIELD
}

}  // namespace slot::bind
