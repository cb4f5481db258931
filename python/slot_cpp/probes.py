"""Research probes: a Model's internals, read apart from generation.

The output head, a prompt's hidden states and logits, SLOT's loss and its
gradient at a given delta, forced-token log-probabilities, and llama.cpp's
own greedy loops as references. The tests check SLOT's maths against these;
the method modules (RTD, evaluation) build on a few. Each takes the Model::

    from slot_cpp import probes
    hidden, logits = probes.prompt_states(model, model.tokenize("Hello"))
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import options as opts
from ._model import Model
from .options import SlotOptions, check_int


def hidden_states(model: Model, rows: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Final normed hidden states at ``spans[i]`` (start, end) positions of
    each token row, stacked (sum of span lengths, n_embd), float32."""
    lists = [model.check_tokens(r) for r in rows]
    return model.native_session().hidden_states(lists, [(int(a), int(b)) for a, b in spans])


def output_matrix(model: Model) -> np.ndarray:
    """The output head W as float32, shape (n_vocab, n_embd)."""
    return model.native_session().output_matrix()


def prompt_states(model: Model, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Final normed hidden states (N, n_embd) and logits (N, n_vocab) of a prompt."""
    toks = model.check_tokens(tokens)
    if not toks:
        raise ValueError("tokens is empty")
    return model.native_session().prompt_states(toks)


def slot_loss_and_gradient(model: Model, tokens: Sequence[int], delta: np.ndarray, *, recompute: bool = False,
                           cache_precision: str = SlotOptions.cache_precision,
                           cache_tail_mass: float = SlotOptions.cache_tail_mass) -> tuple[float, np.ndarray]:
    """SLOT's prompt loss at ``delta`` and its analytical gradient, on the
    path a request with these options takes (the memory budget automatic)."""
    loss, grad, _ = slot_loss_gradient_bound(model, tokens, delta, recompute=recompute,
                                             cache_precision=cache_precision, cache_tail_mass=cache_tail_mass)
    return loss, grad


def slot_loss_gradient_bound(model: Model, tokens: Sequence[int], delta: np.ndarray, *, recompute: bool = False,
                             cache_precision: str = SlotOptions.cache_precision,
                             cache_tail_mass: float = SlotOptions.cache_tail_mass) -> tuple[float, np.ndarray, float]:
    """As :func:`slot_loss_and_gradient`, with the bound on |true loss -
    loss| that the bounded cache reports (0 on the exact paths)."""
    toks = model.check_tokens(tokens)
    if len(toks) < 2:
        raise ValueError("the prompt needs at least two tokens for a SLOT loss")
    d = opts.check_delta(delta, model.n_embd)
    SlotOptions(cache_precision=cache_precision, cache_tail_mass=cache_tail_mass)  # checks them
    return model.native_session().slot_loss_and_gradient(toks, d, bool(recompute), cache_precision,
                                                         float(cache_tail_mass))


def logit_bias(model: Model, delta: np.ndarray) -> np.ndarray:
    """b = W delta: the logit bias that delta adds at every position."""
    return model.native_session().logit_bias(opts.check_delta(delta, model.n_embd))


def head_logits(model: Model, hidden: np.ndarray) -> np.ndarray:
    """W h (+ the head's bias) for each row of final hidden states ([rows, n_embd]): [rows,
    n_vocab], by SLOT's own head product, which gives SLOT's prompt logits on a CPU backend
    without LoRA adapters (elsewhere SLOT takes llama.cpp's)."""
    arr = np.asarray(hidden)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"hidden must be a floating-point array, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] != model.n_embd:
        raise ValueError(f"hidden must have shape (rows, {model.n_embd}) with rows >= 1, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("hidden contains NaN or infinite values")
    z = model.native_session().head_logits(np.ascontiguousarray(arr, dtype=np.float32).reshape(-1))
    return z.reshape(arr.shape[0], -1)


def token_logprobs(model: Model, tokens: Sequence[int], first: int, delta: Optional[np.ndarray] = None) -> np.ndarray:
    """log p(tokens[i] | tokens[:i]) for i >= first, under delta's logit bias if given."""
    toks = model.check_tokens(tokens)
    first = check_int("first", first, 1)
    if first >= len(toks):
        raise ValueError(f"first ({first}) must be < the number of tokens ({len(toks)})")
    d = None if delta is None else opts.check_delta(delta, model.n_embd)
    return np.asarray(model.native_session().token_logprobs(toks, first, d), dtype=np.float64)


def reference_greedy_batch(model: Model, prompts: Sequence[Sequence[int]],
                           n_new: int) -> tuple[list[list[int]], float]:
    """Greedy tokens for several prompts from llama.cpp's own batched loop
    (one context, one stock greedy sampler per sequence, one llama_decode
    per step): a reference for generate_batch. Returns the tokens and the
    seconds spent in the decode steps."""
    lists = [model.check_tokens(p) for p in prompts]
    if not lists or any(not p for p in lists):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    out, seconds = model.native_session().reference_greedy_batch(lists, check_int("n_new", n_new, 0))
    return [list(o) for o in out], float(seconds)


def reference_greedy(model: Model, tokens: Sequence[int], n_new: int) -> tuple[list[int], float]:
    """Greedy tokens from llama.cpp's own decode loop and sampler (a reference)."""
    toks = model.check_tokens(tokens)
    if not toks:
        raise ValueError("tokens is empty")
    out, seconds = model.native_session().reference_greedy(toks, check_int("n_new", n_new, 0))
    return list(out), float(seconds)

