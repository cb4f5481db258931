"""lr="auto": SLOT's step size chosen per prompt on held-out prompt positions
(two folds: learn on one half, score the other), then used on the whole prompt."""

from __future__ import annotations

import numpy as np
import pytest

import slot_cpp

TEXT = ("Question: A farmer has 12 cows and buys 7 more. How many cows does he have?\nAnswer: 12 + 7 = 19. "
        "The farmer has 19 cows.\nQuestion: A box holds 6 apples. How many apples are in 4 boxes?\nAnswer:")


def test_auto_picks_the_candidate_with_the_lowest_held_out_loss(tiny_model: slot_cpp.Model):
    r = tiny_model.generate_with_slot(TEXT, steps=5, lr="auto", max_tokens=0, cache_prompt=False)
    lrs = [lr for lr, _ in r.calibration]
    losses = [loss for _, loss in r.calibration]
    assert lrs == pytest.approx([0.0, 0.003, 0.01, 0.03])
    assert r.lr == lrs[int(np.argmin(losses))]
    assert r.calibration_seconds > 0

    # The held-out loss at delta = 0 is the plain NLL of each half, averaged over the two folds.
    tokens = tiny_model.tokenize(TEXT)
    nll = -np.asarray(tiny_model.token_logprobs(tokens, 1))
    half = len(nll) // 2
    assert losses[0] == pytest.approx((nll[:half].mean() + nll[half:].mean()) / 2, rel=1e-4)

    # The chosen step size is then used on the whole prompt, as a fixed lr would be.
    if r.lr > 0:
        fixed = tiny_model.generate_with_slot(TEXT, steps=5, lr=r.lr, max_tokens=0, cache_prompt=False)
        np.testing.assert_array_equal(r.delta, fixed.delta)
        assert r.losses == fixed.losses and r.steps_done == 5


def test_auto_keeps_delta_zero_when_no_step_helps_the_held_out_half(gemma: slot_cpp.Model):
    # Learning either half makes the other less likely: nothing carries over.
    text = "apple " * 40 + "zebra " * 40
    r = gemma.generate_with_slot(text, steps=5, lr="auto", max_tokens=0, cache_prompt=False)
    assert r.lr == 0.0 and r.steps_done == 0 and r.losses == []
    assert not np.any(r.delta) and "no step size" in r.slot_status
    losses = [loss for _, loss in r.calibration]
    assert min(losses) == losses[0]


def test_auto_per_prompt_in_a_batch_and_bad_values(tiny_model: slot_cpp.Model):
    results = tiny_model.generate_batch([TEXT, TEXT], steps=5, lr=["auto", 0.01], max_tokens=0, cache_prompt=False)
    assert len(results[0].calibration) == 4 and results[1].calibration == [] and results[1].lr == 0.01
    with pytest.raises(ValueError, match="auto"):
        tiny_model.generate_with_slot(TEXT, steps=5, lr="fast", max_tokens=0)
