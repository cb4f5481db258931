"""Every request option, defined once.

An option is a field of one of the groups below: its type, default, range and
documentation are written here and nowhere else. The other faces derive from
these definitions:

- the Python API: :meth:`slot_cpp.Model.generate_with_slot`,
  :meth:`~slot_cpp.Model.generate_batch` and :meth:`~slot_cpp.Model.stream`
  take every field as a keyword argument (or a whole group, ``slot=SlotOptions(...)``);
- the command line: :func:`add_arguments` turns a group into flags and
  :func:`from_arguments` reads them back;
- the HTTP server: :func:`request_model` turns a group into the pydantic model
  of its request-body object (ranges and enums included, so the OpenAPI schema
  describes them);
- the native request: :func:`native_request` fills ``_core.Request`` from the
  groups, the one place where options meet the C++ core.

Each group checks its own values when it is made (``ValueError`` or
``TypeError`` naming the option). Checks that need the model (token ids
inside the vocabulary, delta's length) run in :func:`native_request`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core

__all__ = [
    "AUTO_LR_REFERENCE",
    "GROUPS",
    "LmcorOptions",
    "OptionSpec",
    "QAlignOptions",
    "RequestExtras",
    "RtdOptions",
    "SamplingOptions",
    "SlotOptions",
    "add_arguments",
    "check_float",
    "check_int",
    "from_arguments",
    "from_http",
    "http_fields",
    "native_request",
    "request_model",
    "specs",
]

# lr="auto": the step size of the reference run whose direction the KL trust
# region scales (the C++ optimiser's calibration reads it from the request).
AUTO_LR_REFERENCE = 0.003


# ---- checks shared by every face ------------------------------------------------


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an int in [minimum, maximum], or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float inside the interval, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")
    return v


# ---- the option specification ------------------------------------------------

SAME = "<same>"
"""http_default's value when the HTTP default is the Python one."""


@dataclass(frozen=True)
class OptionSpec:
    """How one option is checked and shown on each face."""

    doc: str
    kind: str
    """int, float, bool, str, lr (a float or 'auto'), strings (a list of str), bias (token id -> logit
    bias, as OpenAI's logit_bias), grammar (GBNF text; a file on the command line), schema (a JSON
    schema: a mapping, a pydantic model class or JSON text; a file on the command line), or object
    (Python only)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    """None is allowed (it means: take the default from elsewhere, as documented)."""
    flag: Optional[str] = ""
    """The command-line flag ('' derives --name-with-dashes; None: not on the command line)."""
    short: Optional[str] = None
    http: Optional[str] = ""
    """The name in the HTTP request body ('' is the field name; None: not in the HTTP schema)."""
    http_default: Any = SAME
    """The HTTP default where the OpenAI protocol defines another one than the Python API."""
    http_high: Optional[float] = None
    """A tighter upper bound a server puts on a request (a cost cap)."""
    native: Optional[str] = ""
    """The field of ``_core.Request`` ('' is the field name; None: converted by hand in native_request)."""

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{name} must not be None")
        if self.kind == "bool":
            return bool(value)
        if self.kind == "lr" and isinstance(value, str):
            if value != "auto":
                raise ValueError(f"{name} must be a number > 0 or 'auto', got {value!r}")
            return value
        if self.kind == "int":
            return check_int(name, value, int(self.low if self.low is not None else -(2**63)),
                             None if self.high is None else int(self.high))
        if self.kind in ("float", "lr"):
            return check_float(name, value, low=-math.inf if self.low is None else self.low,
                               high=math.inf if self.high is None else self.high,
                               low_open=self.low_open, high_open=self.high_open)
        if self.kind == "str":
            if value not in self.choices:
                raise ValueError(f"{name} must be " + " or ".join(repr(c) for c in self.choices) + f", got {value!r}")
            return str(value)
        if self.kind == "bias":
            items = value.items() if isinstance(value, Mapping) else value
            if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
                raise TypeError(f"{name} must map token ids to biases")
            out: dict[int, float] = {}
            for pair in items:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"{name} must map token ids to biases")
                key, bias = pair
                if isinstance(key, str) and key.strip().isdigit():
                    key = int(key)
                if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
                    raise ValueError(f"{name} keys must be token ids (ints >= 0), got {key!r}")
                out[int(key)] = check_float(f"{name}[{key}]", bias, low=-100.0, high=100.0)
            return tuple(sorted(out.items()))
        if self.kind == "grammar":  # parsed by llama.cpp's grammar sampler; "" would read as no grammar there
            if not isinstance(value, str):
                raise TypeError(f"{name} must be GBNF text (a str), got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{name} is empty")
            return value
        if self.kind == "schema":
            return _schema_text(name, value)
        if self.kind == "strings":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a str or a list of str")
            items = tuple(value)
            for item in items:
                if not isinstance(item, str) or item == "":
                    raise ValueError(f"{name} must be a list of non-empty strings")
            return items
        return value

    def range_text(self) -> str:
        if self.kind == "str":
            return " | ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        left = "(" if self.low_open else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


def _schema_text(name: str, value: Any) -> str:
    """A JSON schema given as a mapping, a pydantic model class or JSON text, as JSON text."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = value.model_json_schema()
    elif isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a JSON schema (a mapping, a pydantic model class or JSON text), "
                        f"got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from None


def _opt(default: Any, doc: str, kind: str, **spec: Any) -> Any:
    s = OptionSpec(doc=doc, kind=kind, **spec)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    if default is dataclasses.MISSING:
        return field(metadata={"spec": s})
    return field(default=default, metadata={"spec": s})


class _Group:
    """Checks every field on construction, through its spec."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec: OptionSpec = f.metadata["spec"]
            object.__setattr__(self, f.name, spec.check(self._label(f.name), getattr(self, f.name)))
        self._check_together()

    _prefix = ""

    def _label(self, name: str) -> str:
        spec: OptionSpec = self.__dataclass_fields__[name].metadata["spec"]  # type: ignore[attr-defined]
        return self._prefix + (spec.http or name)

    def _check_together(self) -> None:
        """Rules that tie several fields of the group."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# ---- the groups --------------------------------------------------------------


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


GROUPS: tuple[type, ...] = (SamplingOptions, SlotOptions, RequestExtras)
"""The groups a generate call takes as flat keyword arguments."""

_FLAT: dict[str, type] = {f.name: g for g in GROUPS for f in dataclasses.fields(g)}


def specs(group: type) -> Iterator[tuple[str, Any, OptionSpec]]:
    """(name, default, spec) of every option of a group."""
    for f in dataclasses.fields(group):
        yield f.name, f.default, f.metadata["spec"]


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


# ---- the native request ---------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What native_request needs to know of the model."""

    n_vocab: int
    n_embd: int
    seed: int


def check_tokens(tokens: Any, n_vocab: int) -> list[int]:
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"token ids must be ints, got {type(t).__name__}")
        if not 0 <= t < n_vocab:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {n_vocab})")
        out.append(int(t))
    return out


def check_delta(delta: Any, n_embd: int) -> np.ndarray:
    arr = np.asarray(delta)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"delta must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 1 or arr.shape[0] != n_embd:
        raise ValueError(f"delta must have shape ({n_embd},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("delta contains NaN or infinite values")
    return np.ascontiguousarray(arr, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def schema_grammar(schema_json: str) -> str:
    """GBNF for a JSON schema (JSON text), by llama.cpp's json-schema-to-grammar."""
    return _core.json_schema_to_grammar(schema_json)


def native_request(tokens: list[int], n: int, sampling: SamplingOptions, slot: SlotOptions, extras: RequestExtras,
                   facts: ModelFacts, *, loss_mask: Optional[list[bool]] = None,
                   apply_rtd: Optional[Callable[[Any, Any], None]] = None) -> Any:
    """The one conversion from option groups to ``_core.Request``."""
    r = _core.Request()
    r.prompt = tokens
    r.n = n
    for group in (sampling, slot, extras):
        for name, _, spec in specs(type(group)):
            if spec.native is not None:
                setattr(r, spec.native or name, getattr(group, name))
    r.seed = facts.seed if sampling.seed is None else sampling.seed
    if r.seed + n - 1 >= 2**64:
        raise ValueError("seed + n - 1 must fit in 64 bits")
    r.stop = list(sampling.stop)
    r.memory_budget = 0 if slot.memory_budget is None else slot.memory_budget  # 0: sized by the C++ core
    if slot.lr == "auto":
        r.auto_lr = True
        r.lr = AUTO_LR_REFERENCE
    else:
        r.lr = float(slot.lr)
    if slot.loss_window is not None:
        # Entry t is the prediction of token t + 1: the last loss_window of them.
        rows = max(len(tokens) - 1, 0)
        window = [t >= rows - slot.loss_window for t in range(rows)]
        loss_mask = window if loss_mask is None else [a and b for a, b in zip(loss_mask, window)]
    if loss_mask is not None:
        r.loss_mask = loss_mask
    if sampling.grammar is not None and sampling.json_schema is not None:
        raise ValueError("give grammar or json_schema, not both")
    if sampling.grammar is not None:
        r.grammar = sampling.grammar
    elif sampling.json_schema is not None:
        r.grammar = schema_grammar(sampling.json_schema)
    if sampling.logit_bias:
        check_tokens([token for token, _ in sampling.logit_bias], facts.n_vocab)
        r.logit_bias = list(sampling.logit_bias)
    if extras.delta is not None:
        r.delta = check_delta(extras.delta, facts.n_embd)
    if extras.response_prefix is not None:
        if isinstance(extras.response_prefix, (str, bytes)):
            raise TypeError("response_prefix must be token ids (use model.tokenize(text, add_special=False))")
        r.response_prefix = check_tokens(extras.response_prefix, facts.n_vocab)
        if r.response_prefix and extras.delta is None and slot.steps > 0:
            raise ValueError("response_prefix needs steps=0: learn delta on the prompt first, then pass it as delta")
    if extras.top_logprobs > facts.n_vocab:
        raise ValueError(f"top_logprobs must be <= n_vocab ({facts.n_vocab})")
    r.logprobs = extras.logprobs or extras.top_logprobs > 0
    if extras.score_tokens is not None:
        if isinstance(extras.score_tokens, (str, bytes)):
            raise TypeError("score_tokens must be token ids")
        r.score_tokens = check_tokens(extras.score_tokens, facts.n_vocab)
    if extras.chat_format is not None:
        apply = getattr(extras.chat_format, "_apply", None)
        if apply is None:
            raise TypeError(f"chat_format must be a slot_cpp.chat.ChatFormat, got {type(extras.chat_format).__name__}")
        if r.grammar and extras.chat_format.grammar:
            raise ValueError("give chat_format with tools or grammar/json_schema, not both")
        apply(r)
    if extras.rtd is not None:
        if apply_rtd is None:
            raise TypeError("rtd needs a model")
        apply_rtd(extras.rtd, r)
    return r


# ---- the command line ---------------------------------------------------------


def parse_lr(text: str) -> Union[float, str]:
    """A SLOT step size on the command line: a number, or 'auto'."""
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from exc


def parse_list(item: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated values of ``item``."""
    def parse(text: str) -> list[Any]:
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from exc
    return parse


def _parse_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError(text)
        return int(token), float(bias)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS (a token id and a number), got {text!r}") from exc


_CLI_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "integers"), "float": (float, "numbers"), "lr": (parse_lr, "numbers or 'auto'"),
}


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None


def flag_of(name: str, spec: OptionSpec) -> Optional[str]:
    if spec.flag is None:
        return None
    return spec.flag or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, group: type, *, only: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = (), lists: Sequence[str] = (),
                  defaults: Optional[Mapping[str, Any]] = None, prefix: str = "", dest_prefix: str = "") -> None:
    """Add a group's options to ``parser`` as flags. Options named in ``lists``
    take comma-separated values (a sweep); ``defaults`` overrides a default for
    this command; ``prefix`` names the flags (``--slot-steps``) and their
    dests; ``dest_prefix`` the dests alone."""
    for name, default, spec in specs(group):
        flag = flag_of(name, spec)
        if flag is None or name in exclude or (only is not None and name not in only):
            continue
        if prefix:
            flag = "--" + prefix + flag[2:]
        if defaults and name in defaults:
            default = defaults[name]
        dest = dest_prefix + prefix.replace("-", "_") + name
        help_text = spec.doc + (f" (default: {default})" if default not in (None, (), False) else "")
        names = [flag] + ([spec.short] if spec.short and not prefix else [])
        metavar = flag.lstrip("-").upper().replace("-", "_")
        if spec.kind == "bool":
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=spec.doc)
        elif spec.kind == "strings":
            parser.add_argument(*names, dest=dest, action="append", default=[], metavar=metavar,
                                help=spec.doc + " (repeatable)")
        elif spec.kind == "str":
            parser.add_argument(*names, dest=dest, choices=spec.choices, default=default, help=help_text)
        elif spec.kind == "bias":
            parser.add_argument(*names, dest=dest, action="append", type=_parse_bias, default=None,
                                metavar="TOKEN=BIAS", help=spec.doc + " (repeatable)")
        elif spec.kind in ("grammar", "schema"):
            parser.add_argument(*names, dest=dest, type=_read_text_file, default=None, metavar="FILE",
                                help=spec.doc + " (read from FILE)")
        else:
            parse, what = _CLI_TYPES[spec.kind]
            if name in lists:
                parser.add_argument(*names, dest=dest, type=parse_list(parse, what), metavar=metavar,
                                    default=list(default) if isinstance(default, (list, tuple)) else [default],
                                    help=spec.doc + " (comma-separated: each value is a setting)")
            else:
                parser.add_argument(*names, dest=dest, type=parse, default=default, metavar=metavar, help=help_text)


def from_arguments(args: argparse.Namespace, group: type, *, prefix: str = "",
                   dest_prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of a group that ``add_arguments`` put on ``args``."""
    out = {}
    for name, _, _ in specs(group):
        dest = dest_prefix + prefix.replace("-", "_") + name
        if hasattr(args, dest):
            out[name] = getattr(args, dest)
    return out


# ---- the HTTP schema ------------------------------------------------------------


def http_default(name: str, default: Any, spec: OptionSpec) -> Any:
    return default if spec.http_default == SAME else spec.http_default


def http_fields(group: type, *, only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """pydantic field definitions of a group's HTTP options: their types,
    ranges (with a server's tighter caps), enums, descriptions and the
    protocol's defaults. Options without an HTTP name are left out."""
    from pydantic import AfterValidator, Field

    fields: dict[str, Any] = {}
    for field_name, default, spec in specs(group):
        if spec.http is None or (only is not None and field_name not in only):
            continue
        constraints: dict[str, Any] = {}
        if spec.low is not None:
            constraints["gt" if spec.low_open else "ge"] = spec.low
        high = spec.http_high if spec.http_high is not None else spec.high
        if high is not None:
            constraints["lt" if spec.high_open and spec.http_high is None else "le"] = high
        annotation: Any
        if spec.kind in ("int", "float"):
            annotation = int if spec.kind == "int" else float
        elif spec.kind == "bool":
            annotation, constraints = bool, {}
        elif spec.kind == "str":
            annotation, constraints = Literal[spec.choices], {}  # type: ignore[valid-type]
        elif spec.kind == "bias":
            # OpenAI's shape (token id strings -> bias), checked by the option's own rule.
            annotation = Annotated[dict[str, float], AfterValidator(lambda v, c=spec, n=field_name: c.check(n, v))]
            constraints = {}
        elif spec.kind == "grammar":
            annotation, constraints = str, {}
        elif spec.kind == "schema":
            # A JSON schema object, kept as JSON text once checked.
            annotation = Annotated[dict[str, Any], AfterValidator(lambda v, c=spec, n=field_name: c.check(n, v))]
            constraints = {}
        elif spec.kind == "lr":
            # A number or "auto": checked by the option's own rule (with the
            # server's cap), so that an error names the field, not a branch.
            capped = dataclasses.replace(spec, high=high)
            label = spec.http or field_name
            annotation = Annotated[Union[Literal["auto"], float],
                                   AfterValidator(lambda v, c=capped, n=label: c.check(n, v))]
            constraints = {}
        else:
            raise TypeError(f"{group.__name__}.{field_name} ({spec.kind}) has no HTTP form")
        if spec.optional:
            annotation = Optional[annotation]
        description = spec.doc
        if spec.kind == "lr":
            description += f" (a number in {dataclasses.replace(spec, high=high).range_text()})"
        fields[field_name] = (annotation, Field(http_default(field_name, default, spec), description=description,
                                                alias=spec.http or None, **constraints))
    return fields


def from_http(body: Any, group: type) -> dict[str, Any]:
    """The group's options a request body (made by http_fields) carries."""
    return {name: getattr(body, name) for name, _, spec in specs(group)
            if spec.http is not None and hasattr(body, name)}


def request_model(name: str, fields: Mapping[str, Any], *, base: type, doc: Optional[str] = None) -> type:
    """A pydantic model named ``name`` with these field definitions."""
    from pydantic import create_model

    model = create_model(name, __base__=base, **dict(fields))
    if doc:
        model.__doc__ = doc
    return model
