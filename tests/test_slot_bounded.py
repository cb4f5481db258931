"""SLOT's bounded cache: per loss position, the most probable tokens of P0 until
the rest (the tail, mass m_t) hold at most ``cache_tail_mass``; each step runs
the cached path's formulas on P0 with the tail spread evenly over its tokens.

The true normaliser S_t = sum_v P0_tv q_v (q = softmax(W delta)) differs from
the estimate only in the tail term sum_{v in tail} P0_tv q_v, which lies in
[m_t min q, m_t max q]; the reported bound is the mean over positions of the
larger log-ratio between the estimate and those two ends, so the true loss is
within it of the reported one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import slot_cpp
from slot_cpp import probes

from test_slot_cache import TEXT, reference, softmax64

# The float32 logits path against float64 (measured where the bound is 0, at delta = 0).
ROUNDING = 5e-5
MAX_KEPT = 4096


def bounded_reference(logits: np.ndarray, weight: np.ndarray, y: np.ndarray, delta: np.ndarray,
                      tail_mass: float) -> tuple[float, np.ndarray, float]:
    """The bounded path's loss, gradient and bound, from their definition, in float64."""
    p0 = softmax64(logits.astype(np.float64))
    n, vocab = p0.shape
    b = weight @ delta.astype(np.float64)
    q = softmax64(b)
    lse_b = np.log(np.exp(b - b.max()).sum()) + b.max()
    p_hat = np.empty_like(p0)
    loss = bound = 0.0
    for t in range(n):
        order = np.argsort(-p0[t], kind="stable")
        cum = np.cumsum(p0[t][order])
        k = min(int(np.searchsorted(cum, 1.0 - tail_mass)) + 1, MAX_KEPT)
        kept = order[:k]
        tail = 1.0 - cum[k - 1]
        p_hat[t] = tail / (vocab - k)
        p_hat[t, kept] = p0[t, kept]
        s = p_hat[t] @ q
        s_kept = p0[t, kept] @ q[kept]
        lo, hi = s_kept + tail * q.min(), s_kept + tail * q.max()
        bound += max(np.log(hi / s), np.log(s / lo)) / n
        loss += (-np.log(p0[t, y[t]]) + lse_b + np.log(s) - b[y[t]]) / n
    p = p_hat * q / (p_hat @ q)[:, None]
    g = p.sum(axis=0)
    np.subtract.at(g, y, 1.0)
    return loss, weight.T @ (g / n), bound


def test_bounded_path_equals_its_definition(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    _, logits = probes.prompt_states(tiny_model, ids)
    weight = probes.output_matrix(tiny_model).astype(np.float64)
    y = np.asarray(ids[1:])
    rng = np.random.default_rng(3)
    for tail_mass in (0.3, 0.05):
        delta = (0.5 * rng.standard_normal(tiny_model.n_embd)).astype(np.float32)
        want_loss, want_grad, want_bound = bounded_reference(logits[:-1], weight, y, delta, tail_mass)
        loss, grad, bound = probes.slot_loss_gradient_bound(tiny_model, ids, delta, cache_precision="bounded",
                                                                cache_tail_mass=tail_mass)
        assert loss == pytest.approx(want_loss, abs=1e-5)
        assert bound == pytest.approx(want_bound, rel=1e-3, abs=1e-7) and bound > 0
        np.testing.assert_allclose(grad, want_grad, rtol=1e-3, atol=1e-6)
        # The estimate is not the exact loss (the tail matters at this mass),
        # and the exact loss is within the bound.
        exact, _ = reference(logits[:-1], weight, y, delta)
        assert 1e-6 < abs(loss - exact) <= bound + ROUNDING


def _within(loss: float, bound: float, truth: float) -> bool:
    return abs(loss - truth) <= bound + ROUNDING


@pytest.mark.parametrize("which", ["gemma", "smollm2"])
def test_true_loss_lies_within_the_reported_bound(which, gemma_path, smollm2_path):
    path: Path = gemma_path if which == "gemma" else smollm2_path
    with slot_cpp.Model(path, n_ctx=1024, n_parallel=1) as model:
        ids = model.tokenize(TEXT * 3)
        hidden, _ = probes.prompt_states(model, ids)
        weight = probes.output_matrix(model).astype(np.float64)
        logits = hidden.astype(np.float64) @ weight.T  # the prompt logits, as the CPU's own head computes them
        y = np.asarray(ids[1:])
        rng = np.random.default_rng(5)
        for scale in (0.02, 0.2, 1.0):
            delta = (scale * rng.standard_normal(model.n_embd)).astype(np.float32)
            want_loss, want_grad = reference(logits[:-1], weight, y, delta)
            loss, grad, bound = probes.slot_loss_gradient_bound(model, ids, delta, cache_precision="bounded")
            assert _within(loss, bound, want_loss), (which, scale, loss, want_loss, bound)
            if scale < 1.0:  # deltas of the size SLOT learns; far larger ones reach into the tail
                assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 0.05, (which, scale)
            if scale == 0.02:
                assert bound < 2e-3  # a bound that says something
        # A bound that ignores the tail (0) is refused by the same check: at a
        # larger tail mass the estimate is measurably off.
        delta = (1.0 * rng.standard_normal(model.n_embd)).astype(np.float32)
        want_loss, _ = reference(logits[:-1], weight, y, delta)
        loss, _, bound = probes.slot_loss_gradient_bound(model, ids, delta, cache_precision="bounded",
                                                        cache_tail_mass=0.05)
        assert _within(loss, bound, want_loss)
        assert not _within(loss, 0.0, want_loss)


def test_bounded_learns_the_exact_delta(gemma):
    ids = gemma.tokenize(TEXT * 3)
    common = dict(prompt_token_ids=ids, steps=5, lr=0.01, max_tokens=0, cache_prompt=False)
    exact = gemma.generate_with_slot("", cache_precision="float32", **common)
    bounded = gemma.generate_with_slot("", cache_precision="bounded", **common)
    assert exact.slot_path == "cached" and bounded.slot_path == "bounded"
    assert 0 < bounded.slot_loss_bound < 2e-3 and exact.slot_loss_bound == 0
    assert 0 < bounded.slot_cache_mean_k <= MAX_KEPT
    assert bounded.slot_cache_bytes * 20 < exact.slot_cache_bytes
    # Each step's loss within the bound of the exact path's at the same step
    # (the deltas differ a little too, hence the slack), and the same delta.
    diffs = np.abs(np.asarray(exact.losses) - np.asarray(bounded.losses))
    assert np.all(diffs <= bounded.slot_loss_bound + 1e-4)
    cos = float(exact.delta @ bounded.delta / (np.linalg.norm(exact.delta) * np.linalg.norm(bounded.delta)))
    assert cos > 0.995


def test_auto_falls_back_to_bounded_and_calibrates_without_head_passes(gemma):
    ids = gemma.tokenize(TEXT * 3)
    # A budget below the bfloat16 cache's size: auto takes the bounded cache, not recompute.
    budget = 8 << 20
    assert (len(ids) - 1) * gemma.n_vocab * 2 > budget
    before = gemma.logit_rows
    r = gemma.generate_with_slot("", prompt_token_ids=ids, steps=5, lr="auto", max_tokens=0, cache_prompt=False,
                                 memory_budget=budget)
    assert r.slot_path == "bounded" and r.steps_done == 5 and r.lr > 0
    # lr="auto" measures its ladder on the cache: the head ran at the prompt's
    # positions once, in prefill, and never again.
    assert gemma.logit_rows - before == len(ids)
    exact = gemma.generate_with_slot("", prompt_token_ids=ids, steps=5, lr="auto", max_tokens=0,
                                     cache_prompt=False)
    assert exact.slot_path == "cached"
    assert r.lr == pytest.approx(exact.lr, rel=0.05)


def test_bad_tail_mass_is_refused(tiny_model):
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="cache_tail_mass"):
            tiny_model.generate_with_slot("hello there", cache_precision="bounded", cache_tail_mass=bad,
                                          max_tokens=1)
    with pytest.raises(ValueError, match="cache_precision"):
        tiny_model.generate_with_slot("hello there", cache_precision="topk", max_tokens=1)
    # The model is still usable.
    assert tiny_model.generate_with_slot("hello there", cache_precision="bounded", max_tokens=2).slot_path == "bounded"
