"""lr="auto": SLOT's step size chosen per prompt by a trust region. A reference
run gives delta's direction; the mean KL(p0 || p_delta) over the loss
positions is measured on a ladder of scaled copies of it, the step size where
it meets kl_budget is read off the ladder, and SLOT then runs at that step
size on the whole prompt."""

from __future__ import annotations

import numpy as np
import pytest

import slot_cpp
from slot_cpp._model import AUTO_LR_REFERENCE, DEFAULT_KL_BUDGET
from slot_cpp import probes

TEXT = ("Question: A farmer has 12 cows and buys 7 more. How many cows does he have?\nAnswer: 12 + 7 = 19. "
        "The farmer has 19 cows.\nQuestion: A box holds 6 apples. How many apples are in 4 boxes?\nAnswer:")
LADDER = [AUTO_LR_REFERENCE * 2.0 ** e for e in range(-4, 5)]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def _mean_kl(model: slot_cpp.Model, text: str):
    """NumPy (float64): delta -> mean over the prompt's loss positions of KL(p0_t || p_t(delta))."""
    _, logits = probes.prompt_states(model, model.tokenize(text))
    z0 = logits[:-1].astype(np.float64)
    lp0 = _log_softmax(z0)
    w = probes.output_matrix(model).astype(np.float64)

    def kl(delta: np.ndarray) -> float:
        lp = _log_softmax(z0 + w @ delta.astype(np.float64))
        return float(np.mean(np.sum(np.exp(lp0) * (lp0 - lp), axis=1)))

    return kl


def _auto(model: slot_cpp.Model, text: str, **kwargs) -> slot_cpp.GenerationResult:
    return model.generate_with_slot(text, steps=5, lr="auto", max_tokens=0, cache_prompt=False, **kwargs)


def test_auto_reads_the_step_size_off_the_kl_ladder(tiny_model: slot_cpp.Model):
    kl = _mean_kl(tiny_model, TEXT)
    first = _auto(tiny_model, TEXT)
    lrs = [lr for lr, _ in first.calibration]
    assert lrs == pytest.approx(LADDER)
    # Each rung is the KL of the reference run's delta (a fixed run at the
    # reference step size) scaled by lr / reference.
    reference = tiny_model.generate_with_slot(TEXT, steps=5, lr=AUTO_LR_REFERENCE, max_tokens=0, cache_prompt=False)
    expected = [kl(lr / AUTO_LR_REFERENCE * reference.delta) for lr in lrs]
    assert [k for _, k in first.calibration] == pytest.approx(expected, rel=2e-3, abs=1e-7)  # float rounding
    assert all(a < b for a, b in zip(expected, expected[1:]))

    # A budget between two rungs: the step size lies between them, and the
    # reference delta scaled to it moves the distributions by about the budget
    # (log-log interpolation of a curve that grows about as the square).
    budget = float(np.sqrt(expected[3] * expected[4]))
    r = _auto(tiny_model, TEXT, kl_budget=budget)
    assert lrs[3] < r.lr < lrs[4]
    assert kl(r.lr / AUTO_LR_REFERENCE * reference.delta) == pytest.approx(budget, rel=0.1)
    # SLOT then runs at that step size, exactly as a fixed lr would, and its
    # own delta stays near the budget too.
    fixed = tiny_model.generate_with_slot(TEXT, steps=5, lr=r.lr, max_tokens=0, cache_prompt=False)
    np.testing.assert_array_equal(r.delta, fixed.delta)
    assert r.losses == fixed.losses and r.steps_done == 5 and r.slot_status == "completed"
    assert 0.5 * budget < kl(r.delta) < 2.0 * budget
    assert r.calibration_seconds > 0

    # A larger budget allows a larger step; one beyond the ladder stops at its top.
    assert _auto(tiny_model, TEXT, kl_budget=4 * budget).lr > r.lr
    assert _auto(tiny_model, TEXT, kl_budget=1e3 * expected[-1]).lr == pytest.approx(LADDER[-1])
    # Below the ladder's first rung the step size follows KL ~ lr^2 down from it.
    low = first.calibration[0][1] / 16
    assert _auto(tiny_model, TEXT, kl_budget=low).lr == pytest.approx(LADDER[0] / 4, rel=1e-6)


def test_auto_recompute_path_measures_the_same_ladder(tiny_model: slot_cpp.Model):
    cached = _auto(tiny_model, TEXT)
    recomputed = _auto(tiny_model, TEXT, recompute=True)
    assert recomputed.slot_path == "recompute" and cached.slot_path == "cached"
    np.testing.assert_allclose([k for _, k in recomputed.calibration], [k for _, k in cached.calibration],
                               rtol=2e-3, atol=1e-7)
    assert recomputed.lr == pytest.approx(cached.lr, rel=1e-3)


def test_auto_on_gemma_meets_the_budget_on_a_real_prompt(gemma: slot_cpp.Model):
    kl = _mean_kl(gemma, TEXT)
    r = _auto(gemma, TEXT)
    assert r.steps_done == 5 and 0 < r.lr < LADDER[-1]
    assert 0.5 * DEFAULT_KL_BUDGET < kl(r.delta) < 2.0 * DEFAULT_KL_BUDGET
    # The paper's lr 0.1 moves this prompt's distributions far past the budget.
    paper = gemma.generate_with_slot(TEXT, steps=5, lr=0.1, max_tokens=0, cache_prompt=False)
    assert kl(paper.delta) > 10 * DEFAULT_KL_BUDGET


def test_auto_per_prompt_in_a_batch_and_bad_values(tiny_model: slot_cpp.Model):
    results = tiny_model.generate_batch([TEXT, TEXT, TEXT], steps=5, lr=["auto", 0.01, "auto"],
                                        kl_budget=[DEFAULT_KL_BUDGET, DEFAULT_KL_BUDGET, 4 * DEFAULT_KL_BUDGET],
                                        max_tokens=0, cache_prompt=False)
    assert len(results[0].calibration) == len(LADDER) and results[1].calibration == [] and results[1].lr == 0.01
    alone = _auto(tiny_model, TEXT)
    np.testing.assert_array_equal(results[0].delta, alone.delta)
    assert results[2].lr > results[0].lr
    with pytest.raises(ValueError, match="auto"):
        tiny_model.generate_with_slot(TEXT, steps=5, lr="fast", max_tokens=0)
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="kl_budget"):
            tiny_model.generate_with_slot(TEXT, steps=5, lr="auto", kl_budget=bad, max_tokens=0)
    with pytest.raises(TypeError, match="kl_budget"):
        tiny_model.generate_with_slot(TEXT, steps=5, lr="auto", kl_budget="small", max_tokens=0)  # type: ignore[arg-type]
