"""The native request: the one conversion from option groups to ``_core.Request``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .. import _core
from .groups import RequestExtras, SamplingOptions, SlotOptions
from .spec import AUTO_LR_REFERENCE, specs


@dataclass(frozen=True)
class ModelFacts:
    """What native_request needs to know of the model."""

    n_vocab: int
    n_embd: int
    seed: int
    n_adapters: int = 0


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


def lora_scales(pairs: Any, n_adapters: int) -> list[float]:
    """(adapter id, scale) pairs as one scale per adapter the model loaded (those not named: 0)."""
    scales = [0.0] * n_adapters
    for adapter, scale in pairs:
        if adapter >= n_adapters:
            raise ValueError(f"lora names adapter {adapter}; the model loaded {n_adapters}")
        scales[adapter] = scale
    return scales


def schema_grammar(schema_json: str) -> str:
    """GBNF for a JSON schema (JSON text), by llama.cpp's json-schema-to-grammar
    (the conversion a request's ``json_schema`` gets in the C++ core; cached there)."""
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
    # Both given: refused by the C++ core's check. A schema becomes a grammar there, cached.
    if sampling.grammar is not None:
        r.grammar = sampling.grammar
    if sampling.json_schema is not None:
        r.json_schema = sampling.json_schema
    if sampling.logit_bias:
        check_tokens([token for token, _ in sampling.logit_bias], facts.n_vocab)
        r.logit_bias = list(sampling.logit_bias)
    if extras.delta is not None:
        r.delta = check_delta(extras.delta, facts.n_embd)
    if extras.response_prefix is not None:
        if isinstance(extras.response_prefix, (str, bytes)):
            raise TypeError("response_prefix must be token ids (use model.tokenize(text, add_special=False))")
        r.response_prefix = check_tokens(extras.response_prefix, facts.n_vocab)  # with steps > 0: refused by C++
    if extras.top_logprobs > facts.n_vocab:
        raise ValueError(f"top_logprobs must be <= n_vocab ({facts.n_vocab})")
    r.logprobs = extras.logprobs or extras.top_logprobs > 0
    if extras.score_tokens is not None:
        if isinstance(extras.score_tokens, (str, bytes)):
            raise TypeError("score_tokens must be token ids")
        r.score_tokens = check_tokens(extras.score_tokens, facts.n_vocab)
    if extras.lora is not None:
        r.lora_scales = lora_scales(extras.lora, facts.n_adapters)
    if extras.chat_format is not None:
        apply = getattr(extras.chat_format, "_apply", None)
        if apply is None:
            raise TypeError(f"chat_format must be a slot_cpp.chat.ChatFormat, got {type(extras.chat_format).__name__}")
        if (r.grammar or r.json_schema) and extras.chat_format.grammar:
            raise ValueError("give chat_format with tools or grammar/json_schema, not both")
        apply(r)
    if extras.rtd is not None:
        if apply_rtd is None:
            raise TypeError("rtd needs a model")
        apply_rtd(extras.rtd, r)
    return r

