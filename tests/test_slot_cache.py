"""SLOT's cache of the prompt's distributions in bfloat16: half the memory of
float32, so long prompts stay on the cached path instead of recomputing the
head at every step.

The stated error: each cached probability is rounded to bfloat16 (8
significant bits, to nearest even), a relative error of at most 2^-9; each
normaliser S_t = sum_v P0_tv q_v then carries at most that relative error, so
the loss, a mean of log S_t plus exact terms, is within -log(1 - 2^-9) <
0.00196 nats of the float32 cache's. The step's sums are kept in float32."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import slot_cpp
from slot_cpp import probes

LOSS_BOUND = -np.log1p(-2.0**-9)
TEXT = ("The committee met on Tuesday to discuss the budget for the coming year. After a long debate about "
        "roads, schools and the new library, the members agreed to postpone the vote until the figures from "
        "the treasurer were checked again by an independent auditor.")


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32, rounding to nearest even (as ggml does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (rounded << 16).astype(np.uint32).view(np.float32)


def softmax64(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def reference(logits: np.ndarray, weight: np.ndarray, y: np.ndarray, delta: np.ndarray,
              p0: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """SLOT's loss and gradient in float64 from the prompt logits z0: softmax(z0 + W delta);
    with p0 given (the cache's probabilities), through S_t = sum_v p0_tv softmax(b)_v."""
    b = weight @ delta.astype(np.float64)
    z = logits.astype(np.float64)
    n = len(y)
    if p0 is None:
        p = softmax64(z + b)
        loss = float(np.mean(-np.log(p[np.arange(n), y])))
    else:
        q = softmax64(b)
        s = p0.astype(np.float64) @ q
        lse_z = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
        lse_b = np.log(np.exp(b - b.max()).sum()) + b.max()
        logp0 = z[np.arange(n), y] - lse_z
        loss = float(np.mean(-logp0 + lse_b + np.log(s) - b[y]))
        p = p0.astype(np.float64) * q / s[:, None]
    g = p.sum(axis=0)
    np.subtract.at(g, y, 1.0)
    return loss, weight.T @ (g / n)


def test_bf16_kernels_equal_their_definition(tiny_model):
    # On the tiny model, against NumPy with the same bfloat16 rounding of P0:
    # this checks the kernels (products, sums, layout), not the rounding.
    ids = tiny_model.tokenize(TEXT)
    _, logits = probes.prompt_states(tiny_model, ids)
    weight = probes.output_matrix(tiny_model).astype(np.float64)
    y = np.asarray(ids[1:])
    delta = (0.3 * np.random.default_rng(0).standard_normal(tiny_model.n_embd)).astype(np.float32)
    p0_f32 = softmax64(logits[:-1].astype(np.float64)).astype(np.float32)
    want_loss, want_grad = reference(logits[:-1], weight, y, delta, p0=bf16_round(p0_f32))
    loss, grad = probes.slot_loss_and_gradient(tiny_model, ids, delta, cache_precision="bfloat16")
    assert loss == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)
    # A cache that was not rounded (float32) gives a measurably different loss:
    # the comparison above sees the rounding.
    f32_loss, _ = probes.slot_loss_and_gradient(tiny_model, ids, delta, cache_precision="float32")
    exact_loss, _ = reference(logits[:-1], weight, y, delta, p0=p0_f32)
    assert f32_loss == pytest.approx(exact_loss, rel=1e-6, abs=1e-6)
    assert abs(loss - f32_loss) > 1e-6 and abs(loss - f32_loss) < LOSS_BOUND


def _dequantised_head(path: Path, name: str) -> np.ndarray:
    reader = gguf.GGUFReader(str(path))
    head = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(np.asarray(head.data), head.tensor_type).astype(np.float64)


@pytest.mark.parametrize("which", ["gemma", "smollm2"])
def test_bf16_cache_against_float64_on_the_real_models(which, gemma_path, smollm2_path):
    path = gemma_path if which == "gemma" else smollm2_path
    with slot_cpp.Model(path, n_ctx=1024, n_parallel=1) as model:
        ids = model.tokenize(TEXT * 3)
        # Long enough to need it: a budget of the float32 cache's size leaves
        # three quarters of it for the cache (a quarter is the prefill's), where
        # float32 does not fit and bfloat16 does.
        if which == "gemma":
            budget = (len(ids) - 1) * model.n_vocab * 4
            run = model.generate_with_slot("", prompt_token_ids=ids, steps=1, max_tokens=0,
                                           memory_budget=budget, cache_prompt=False)
            assert run.slot_path == "cached_bf16"
            assert run.slot_cache_bytes == (len(ids) - 1) * model.n_vocab * 2
        hidden, _ = probes.prompt_states(model, ids)
        weight = probes.output_matrix(model).astype(np.float64)
        # The cache's prompt logits: W h from the states, in float32 lanes on the CPU.
        logits = hidden.astype(np.float64) @ weight.T
        y = np.asarray(ids[1:])
        rng = np.random.default_rng(5)
        for scale in (0.02, 0.2):
            delta = (scale * rng.standard_normal(model.n_embd)).astype(np.float32)
            want_loss, want_grad = reference(logits[:-1], weight, y, delta)
            loss, grad = probes.slot_loss_and_gradient(model, ids, delta, cache_precision="bfloat16")
            assert abs(loss - want_loss) < LOSS_BOUND, (which, scale, loss, want_loss)
            assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 2e-3, (which, scale)


def test_bf16_and_float32_learn_the_same_delta(gemma):
    ids = gemma.tokenize(TEXT * 2)
    common = dict(prompt_token_ids=ids, steps=5, lr=0.01, max_tokens=0, cache_prompt=False)
    f32 = gemma.generate_with_slot("", cache_precision="float32", **common)
    bf16 = gemma.generate_with_slot("", cache_precision="bfloat16", **common)
    assert f32.slot_path == "cached" and bf16.slot_path == "cached_bf16"
    assert bf16.slot_cache_bytes * 2 == f32.slot_cache_bytes
    cos = float(np.dot(f32.delta, bf16.delta) / (np.linalg.norm(f32.delta) * np.linalg.norm(bf16.delta)))
    assert cos > 0.999
    assert np.max(np.abs(np.asarray(f32.losses) - np.asarray(bf16.losses))) < LOSS_BOUND


def test_cache_precision_is_checked(tiny_model):
    with pytest.raises(ValueError, match="cache_precision"):
        tiny_model.generate_with_slot("hello there", cache_precision="float16", max_tokens=1)
    with pytest.raises(ValueError, match="cache_precision"):
        probes.slot_loss_and_gradient(tiny_model, [1, 2, 3], np.zeros(tiny_model.n_embd, np.float32),
                                          cache_precision="half")
