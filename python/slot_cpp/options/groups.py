"""The option groups: each field's type, default, range and documentation,
written once. A group checks its own values when it is made."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .spec import _Group, _opt

# ---- the groups --------------------------------------------------------------

KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
"""The KV cache types llama.cpp's CPU backend stores (llama-server's --cache-type-k/-v)."""


@dataclass(frozen=True)
class SamplingOptions(_Group):
    """How the next token is chosen, and when generation stops."""

    max_tokens: int = _opt(256, "tokens to generate at most (0: none, e.g. for scoring)", "int", low=0,
                           short="-n", http=None)
    temperature: float = _opt(0.0, "sampling temperature (0: greedy)", "float", low=0.0, http_default=1.0,
                              http_high=2.0)
    top_k: int = _opt(40, "keep the k most likely tokens (0: all)", "int", low=0, http_default=0)
    top_p: float = _opt(0.95, "keep the smallest set of tokens whose probability reaches p", "float", low=0.0,
                        high=1.0, low_open=True, http_default=1.0)
    min_p: float = _opt(0.05, "drop tokens less likely than min_p times the most likely one", "float", low=0.0,
                        high=1.0, http_default=0.0)
    repeat_penalty: float = _opt(1.0, "divide the logits of recently generated tokens by this (1: off)", "float",
                                 low=0.0, low_open=True)
    repeat_last_n: int = _opt(64, "how many recent tokens repeat_penalty looks at", "int", low=0)
    seed: Optional[int] = _opt(None, "the sampler's seed (default: the Model's; a server draws one); sample j of a "
                               "prompt draws with seed + j", "int", low=0, high=2**63 - 1, optional=True, flag=None,
                               native=None)
    stop: tuple[str, ...] = _opt((), "stop strings (not included in the text)", "strings", http=None, native=None)
    ignore_eos: bool = _opt(False, "keep generating past the end-of-sequence token", "bool")
    presence_penalty: float = _opt(0.0, "subtract this from the logit of every token the answer already holds "
                                   "(OpenAI's presence_penalty)", "float", low=-2.0, high=2.0)
    frequency_penalty: float = _opt(0.0, "subtract this times the number of times the answer already holds a "
                                    "token from its logit (OpenAI's frequency_penalty)", "float", low=-2.0,
                                    high=2.0)
    logit_bias: Optional[tuple[tuple[int, float], ...]] = _opt(
        None, "added to these tokens' logits after every other stage, -100 to 100 (OpenAI's logit_bias: "
        "-100 bans a token, 100 all but forces it); a mapping token id -> bias", "bias", optional=True,
        native=None)
    grammar: Optional[str] = _opt(None, "a GBNF grammar (llama.cpp's, start rule 'root') every answer follows: "
                                  "the tokens it refuses are masked before each draw", "grammar", optional=True,
                                  flag="--grammar-file", native=None)
    json_schema: Optional[str] = _opt(None, "a JSON schema every answer follows (converted to a grammar by "
                                      "llama.cpp's json-schema-to-grammar); a mapping, a pydantic model class "
                                      "or JSON text", "schema", optional=True, native=None)
    draft_max: int = _opt(0, "speculation: tokens drafted per step, by the model's draft_model or else by prompt "
                          "lookup (the answer's last n-gram seen earlier in the prompt or the answer), checked in "
                          "the same batch; the samples' distribution is unchanged (0: off)", "int", low=0, high=64)
    draft_ngram: int = _opt(3, "prompt-lookup speculation: the longest n-gram matched to draft (shorter ones are "
                            "tried after)", "int", low=1, high=16)
    draft_p_min: float = _opt(0.75, "draft-model speculation: a draft ends at a token the draft model gives less "
                              "than this probability", "float", low=0.0, high=1.0)


@dataclass(frozen=True)
class SlotOptions(_Group):
    """SLOT: a vector delta added to the final hidden state, learned on the prompt's own loss."""

    steps: int = _opt(5, "SLOT optimisation steps (0: plain generation)", "int", low=0, http_high=100)
    lr: Union[float, str] = _opt(0.1, "SLOT learning rate, or 'auto': chosen per prompt by a KL trust region "
                                 "(kl_budget)", "lr", low=0.0, low_open=True, http_high=10.0, native=None)
    kl_budget: float = _opt(0.002, "lr auto: the mean KL (nats per loss position) by which delta may move the "
                            "prompt's next-token distributions", "float", low=0.0, low_open=True, http_high=10.0)
    loss_on: str = _opt("all", "SLOT's loss over every prompt token (the paper), only the user's message "
                        "content (chat prompts), or only the prompt's last block, the text after its last blank "
                        "line (the question of a few-shot prompt, whose exemplars' style is then not learned)",
                        "str", choices=("all", "user", "last"), native=None)
    loss_window: Optional[int] = _opt(None, "the loss covers only the predictions of the prompt's last N tokens "
                                      "(with loss_on: of those, the user's); the output head runs at those "
                                      "positions alone (None: the whole prompt)", "int", low=1, optional=True,
                                      native=None)
    beta1: float = _opt(0.9, "AdamW's first-moment decay", "float", low=0.0, high=1.0, high_open=True)
    beta2: float = _opt(0.999, "AdamW's second-moment decay", "float", low=0.0, high=1.0, high_open=True)
    eps: float = _opt(1e-5, "AdamW's epsilon", "float", low=0.0, low_open=True)
    weight_decay: float = _opt(1e-8, "AdamW's weight decay", "float", low=0.0)
    memory_budget: Optional[int] = _opt(None, "bytes SLOT may add (prefill logits and its cache of the prompt's "
                                        "distributions); past it, the loss is recomputed from the states (None: a "
                                        "quarter of the memory available on the device, 1 to 8 GiB)", "int",
                                        low=1 << 20, optional=True, http=None, native=None)
    recompute: bool = _opt(False, "evaluate the head at every step (the published algorithm) instead of caching "
                           "the prompt's distributions", "bool")
    cache_precision: str = _opt("auto", "how the prompt's distributions are cached: float32, bfloat16 (half the "
                                "memory; the CPU only, a GPU keeps float32), bounded (each position's most "
                                "probable tokens and the rest's total mass; the losses carry a reported error "
                                "bound), or auto: float32 up to 256 MiB (on a GPU: while it fits memory_budget), "
                                "else bfloat16 when it fits memory_budget, else bounded",
                                "str", choices=("auto", "float32", "bfloat16", "bounded"))
    cache_tail_mass: float = _opt(1e-3, "bounded cache: each position keeps its most probable tokens (at most "
                                  "4096) until the others hold at most this probability", "float", low=0.0,
                                  high=1.0, low_open=True, high_open=True)


@dataclass(frozen=True)
class RtdOptions(_Group):
    """RTD settings of one request; None takes the datastore's defaults (``Datastore.defaults``)."""

    datastore: Any = _opt(dataclasses.MISSING, "the datastore (Python: a slot_cpp.rtd.Datastore; command line: "
                          "its path; HTTP: the name a server was started with)", "object", flag=None, http=None,
                          native=None)
    k: Optional[int] = _opt(None, "neighbours retrieved (default: the datastore's)", "int", low=1, optional=True,
                            flag="--rtd-k", native="rtd_k")
    temperature: Optional[float] = _opt(None, "softmax temperature over neighbour distances (default: the "
                                        "datastore's)", "float", low=0.0, low_open=True, optional=True,
                                        flag="--rtd-temperature", native="rtd_temperature")
    lam: Optional[float] = _opt(None, "weight of the retrieved distribution in the blend (default: the "
                                "datastore's)", "float", low=0.0, high=1.0, optional=True, flag="--rtd-lambda",
                                http="lambda", native="rtd_lambda")
    nprobe: Optional[int] = _opt(None, "inverted-file lists searched per query (default: the datastore's; 0: "
                                 "exact search)", "int", low=0, optional=True, flag="--rtd-nprobe", native="rtd_nprobe")
    gate: Optional[bool] = _opt(None, "scale lambda per query by the datastore's gate, a logistic function of "
                                "the nearest key's distance (relative to the datastore's typical distance) and "
                                "the retrieved distribution's top mass: lambda(q) = lambda * gate(q), near 0 where "
                                "the datastore does not reach (default: the datastore's; off: one lambda for "
                                "every query)", "bool", optional=True, flag="--rtd-gate", native=None)
    _prefix = "rtd "


@dataclass(frozen=True)
class QAlignOptions(_Group):
    """QAlign: a Metropolis-Hastings chain over whole answers under a reward."""

    steps: int = _opt(64, "proposals in the chain", "int", low=1, http_default=16, native=None)
    beta: float = _opt(1.0, "the target's temperature: p(y) exp(r(y) / beta)", "float", low=0.0, low_open=True,
                       native=None)


@dataclass(frozen=True)
class LmcorOptions(_Group):
    """LMCor: the generator's candidates, rewritten by a corrector model."""

    k: int = _opt(5, "candidates: the greedy answer and k - 1 samples", "int", low=1, http_high=16, flag="-k",
                  native=None)
    temperature: float = _opt(0.7, "the samples' temperature", "float", low=0.0, low_open=True, http_high=2.0,
                              native=None)


@dataclass(frozen=True)
class RequestExtras(_Group):
    """What a request reports or reuses besides its text (Python API only)."""

    logprobs: bool = _opt(False, "record each generated token's log-probability", "bool", flag=None, http=None)
    top_logprobs: int = _opt(0, "also record the N most likely alternatives at each step", "int", low=0,
                             flag=None, http=None)
    cache_prompt: bool = _opt(True, "reuse (and leave behind) the prompt's KV cells", "bool", flag=None)
    lora: Optional[tuple[tuple[int, float], ...]] = _opt(
        None, "the scales of the model's LoRA adapters for this request, by adapter id (those not named: 0; "
        "default: the model's scales); requests with other scales than the running ones wait for them", "lora",
        optional=True, flag=None, native=None)
    return_hidden: bool = _opt(False, "report the final hidden state at the context's last token", "bool",
                               flag=None, http=None)
    delta: Optional[Any] = _opt(None, "apply this delta (float32, n_embd) without optimising", "object",
                                optional=True, flag=None, http=None, native=None)
    response_prefix: Optional[Any] = _opt(None, "token ids of a response already begun (continued, not "
                                          "returned)", "object", optional=True, flag=None, http=None, native=None)
    prompt_logprobs: bool = _opt(False, "report each context token's log-probability after the first (under the "
                                 "request's stages; the context is evaluated whole, without the prompt cache; "
                                 "not with SLOT's optimisation or RTD)", "bool", flag=None, http=None)
    score_tokens: Optional[Any] = _opt(None, "token ids whose log-probabilities after the context are reported",
                                       "object", optional=True, flag=None, http=None, native=None)
    rtd: Optional[Any] = _opt(None, "a slot_cpp.rtd.Datastore or RTD blended into every next-token "
                              "distribution", "object", optional=True, flag=None, http=None, native=None)
    chat_format: Optional[Any] = _opt(None, "a slot_cpp.chat.ChatFormat (format_chat): the answer follows its "
                                      "tool-call grammar and stops, and shows its control tokens", "object",
                                      optional=True, flag=None, http=None, native=None)


REASONING_FORMATS = ("none", "auto", "deepseek", "deepseek-legacy")
"""llama.cpp's reasoning formats (llama-server's --reasoning-format)."""


@dataclass(frozen=True)
class ChatOptions(_Group):
    """How chat messages are rendered by the chat template, and a thinking model's answer read back
    (``reasoning_format`` is for the OpenAI message an answer is read into: Python and HTTP)."""

    reasoning_format: str = _opt("auto", "where a thinking model's reasoning goes: 'auto', 'deepseek' or "
                                 "'deepseek-legacy' (the pinned llama.cpp reads the last two alike) take it out of "
                                 "the content into reasoning_content; 'none' leaves it in the content", "str",
                                 choices=REASONING_FORMATS, flag=None, native=None)
    enable_thinking: bool = _opt(True, "let a thinking model think (the template's enable_thinking variable; "
                                 "chat_template_kwargs' enable_thinking wins)", "bool", http=None, native=None)
    chat_template_kwargs: Optional[str] = _opt(None, "extra variables for the chat template, a JSON object (e.g. "
                                               "{\"enable_thinking\": false})", "json", optional=True,
                                               native=None)

    drop_oldest_turns: bool = _opt(False, "when the chat and its answer do not fit the context, drop its oldest "
                                   "turns (a user message with the answers and tool results after it, the system "
                                   "message kept) until they fit, instead of refusing it", "bool", native=None)

    def template_inputs(self) -> tuple[str, bool, str]:
        """(reasoning_format, enable_thinking, kwargs JSON) as the chat template's renderer takes them."""
        thinking = self.enable_thinking
        if self.chat_template_kwargs:
            value = json.loads(self.chat_template_kwargs).get("enable_thinking")
            if isinstance(value, bool):
                thinking = value
        return self.reasoning_format, thinking, self.chat_template_kwargs or ""


@dataclass(frozen=True)
class ModelSettings(_Group):
    """How a Model is loaded and shared by its callers (``Model(...)``'s keyword arguments)."""

    n_ctx: int = _opt(4096, "KV cells of the context, shared by all its sequences (serve: 0 is 2048 per "
                      "sequence)", "int", low=0, http=None, native=None)
    n_threads: Optional[int] = _opt(None, "CPU threads (default: llama.cpp's choice)", "int", low=1, optional=True,
                                    flag="--threads", dest="threads", http=None, native=None)
    n_gpu_layers: int = _opt(0, "layers offloaded to the GPU (-1: offload every layer)", "int", low=-1, http=None,
                             native=None)
    n_batch: int = _opt(512, "tokens per llama_decode", "int", low=1, flag=None, http=None, native=None)
    n_parallel: int = _opt(4, "sequences decoded together; they share the --n-ctx KV cells", "int", low=1,
                           http=None, native=None)
    seed: int = _opt(0, "the sampler's default seed", "int", low=0, http=None, native=None)
    use_mmap: bool = _opt(True, "map the GGUF file instead of reading it", "bool", flag=None, http=None,
                          native=None)
    max_waiting: int = _opt(0, "generate calls that may wait for a free sequence; one more raises QueueFullError "
                            "(0: no bound)", "int", low=0, flag=None, http=None, native=None)
    rpc: Optional[Any] = _opt(None, "ggml rpc-server endpoints ('host:port', a list or comma-separated) the layers "
                              "are offloaded to", "object", optional=True, flag=None, http=None, native=None)
    lora: Optional[Any] = _opt(None, "GGUF LoRA adapters: a path, a (path, scale) pair, or a list of them",
                               "object", optional=True, flag=None, http=None, native=None)
    cache_type_k: str = _opt("f16", "the KV cache's type for keys (llama.cpp's; q8_0 halves the cache, q4_0 quarters "
                             "it, at some accuracy)", "str", choices=KV_CACHE_TYPES, http=None, native=None)
    cache_type_v: str = _opt("f16", "the KV cache's type for values (a quantised type needs flash attention)", "str",
                             choices=KV_CACHE_TYPES, http=None, native=None)
    flash_attn: str = _opt("auto", "flash attention: on, off, or auto (llama.cpp's choice for the device)", "str",
                           choices=("auto", "on", "off"), http=None, native=None)
    rope_freq_base: float = _opt(0.0, "RoPE base frequency (0: the model's)", "float", low=0.0, http=None,
                                 native=None)
    rope_freq_scale: float = _opt(0.0, "RoPE frequency scale, e.g. 0.5 to stretch the context twofold by linear "
                                  "interpolation (0: the model's)", "float", low=0.0, http=None, native=None)
    rope_scaling: Optional[str] = _opt(None, "RoPE scaling: none, linear, or yarn to stretch the context beyond "
                                       "the trained one (default: the model's)", "str", optional=True,
                                       choices=("none", "linear", "yarn"), http=None, native=None)
    yarn_orig_ctx: int = _opt(0, "YaRN: the context the model was trained on (0: the model's)", "int", low=0,
                              http=None, native=None)
    yarn_ext_factor: float = _opt(-1.0, "YaRN: the extrapolation mix factor (negative: the model's, or 1 with "
                                  "yarn)", "float", http=None, native=None)
    yarn_attn_factor: float = _opt(-1.0, "YaRN: the attention magnitude scale (negative: the model's)", "float",
                                   http=None, native=None)
    yarn_beta_fast: float = _opt(-1.0, "YaRN: low correction dimension (negative: the model's)", "float", http=None,
                                 native=None)
    yarn_beta_slow: float = _opt(-1.0, "YaRN: high correction dimension (negative: the model's)", "float",
                                 http=None, native=None)
    kv_overrides: Optional[tuple[tuple[str, str, str], ...]] = _opt(
        None, "GGUF metadata overridden at load: a mapping key -> int, float, bool or str (command line: "
        "KEY=TYPE:VALUE, as llama.cpp's --override-kv)", "kv", optional=True, flag="--override-kv",
        http=None, native=None)
    use_mlock: bool = _opt(False, "lock the model's memory so the system cannot swap it out", "bool", http=None,
                           native=None)
    draft_model: Optional[str] = _opt(None, "a small GGUF model with this model's vocabulary that drafts tokens for "
                                      "speculation (requests with draft_max; default: prompt lookup drafts)",
                                      "text", optional=True, http=None, native=None)
    deterministic: bool = _opt(False, "batch-invariant evaluation: a request's tokens and logprobs are the same "
                               "whatever else runs beside it or sits in the prompt cache (each sequence gets "
                               "n_ctx / n_parallel KV cells of its own; CPU only)", "bool", http=None, native=None)

    def _check_together(self) -> None:
        limit = min(self.n_batch, 256)
        if self.n_parallel > limit:
            raise ValueError(f"n_parallel must be <= min(n_batch, 256) = {limit}, got {self.n_parallel}")


@dataclass(frozen=True)
class ServerSettings(_Group):
    """What a server exposes and its limits (``slot-cpp serve``'s flags, :class:`slot_cpp.server.ServerConfig`)."""

    model_id: Optional[str] = _opt(None, "the model name clients pass as 'model' (default: the GGUF file's stem)",
                                   "text", optional=True, http=None, native=None)
    api_key: Optional[str] = _opt(None, "require 'Authorization: Bearer KEY' on every /v1 request (command "
                                  "line default: $SLOT_CPP_API_KEY, else none)", "text",
                                  optional=True, http=None, native=None)
    api_key_file: Optional[str] = _opt(None, "a file of API keys, one per line (blank lines and lines starting "
                                       "with # skipped); any of them, or api_key, is accepted", "text",
                                       optional=True, http=None, native=None)
    cors_origins: tuple[str, ...] = _opt((), "browser origins allowed to call the server (CORS), e.g. "
                                         "http://localhost:3000; '*' for any", "strings", http=None, native=None)
    datastores: Mapping[str, str] = _opt(None, "RTD datastores requests may name: name -> file path (loaded at "
                                         "start-up)", "object", factory=dict, flag=None, http=None, native=None)
    rewards: Mapping[str, str] = _opt(None, "QAlign rewards requests may name: name -> 'head:PATH' (a linear "
                                      "reward head) or 'judge'", "object", factory=dict, flag=None, http=None,
                                      native=None)
    correctors: Mapping[str, str] = _opt(None, "LMCor correctors requests may name: name -> 'MODEL.gguf' or "
                                         "'MODEL.gguf,ADAPTER.gguf' (loaded at start-up)", "object", factory=dict,
                                         flag=None, http=None, native=None)
    chat_template: Optional[str] = _opt(None, "built-in chat template name (or template text) for models without "
                                        "one (see 'slot-cpp info')", "text", optional=True, http=None, native=None)
    slot_save_path: Optional[str] = _opt(None, "a directory for the state files of POST /slots/{id}?action=save "
                                         "and restore (none: those actions are refused)", "text", optional=True,
                                         http=None, native=None)
    pooling: str = _opt("mean", "how /v1/embeddings pools a text's final hidden states (see Model.embed)", "str",
                        choices=("mean", "last"), http=None, native=None)
    max_waiting: int = _opt(16, "requests that may wait for a free sequence; more get 503", "int", low=0,
                            http=None, native=None)
    max_body_bytes: int = _opt(1 << 20, "the largest request body", "int", low=1, flag=None, http=None,
                               native=None)
    max_tokens_cap: int = _opt(4096, "the largest max_tokens a request may ask", "int", low=1, http=None,
                               native=None)
    max_n: int = _opt(16, "the largest n a request may ask", "int", low=1, flag=None, http=None, native=None)
    max_qalign_steps: int = _opt(256, "the most QAlign steps a request may ask", "int", low=1, flag=None,
                                 http=None, native=None)
    retry_after_seconds: int = _opt(1, "the Retry-After of a 503", "int", low=0, flag=None, http=None,
                                    native=None)


GROUPS: tuple[type, ...] = (SamplingOptions, SlotOptions, RequestExtras)
"""The groups a generate call takes as flat keyword arguments."""

_FLAT: dict[str, type] = {f.name: g for g in GROUPS for f in dataclasses.fields(g)}


def split_options(options: Mapping[str, Any], *, where: str) -> dict[type, dict[str, Any]]:
    """Flat keyword arguments -> {group: its arguments}; unknown names are a TypeError."""
    out: dict[type, dict[str, Any]] = {g: {} for g in GROUPS}
    unknown = []
    for key, value in options.items():
        group = _FLAT.get(key)
        if group is None:
            unknown.append(key)
        else:
            out[group][key] = value
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    return out

