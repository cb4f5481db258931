"""OpenAI's presence and frequency penalties and logit_bias, against their
definitions: logit[t] -= frequency * count(t) + presence * (count(t) > 0) over
the tokens generated so far, and logit[t] += logit_bias[t] after every other
stage."""

from __future__ import annotations

import numpy as np
import pytest

from slot_cpp import probes

PROMPT = "The quick brown fox jumps over the lazy dog and then"


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


@pytest.mark.parametrize("which", ["presence_penalty", "frequency_penalty"])
def test_penalty_moves_the_greedy_choice_exactly_at_its_threshold(tiny_model, which):
    ids = tiny_model.tokenize(PROMPT)
    first = tiny_model.generate("", prompt_token_ids=ids, max_tokens=1, ignore_eos=True, cache_prompt=False).tokens[0]
    _, logits = probes.prompt_states(tiny_model, ids + [first])
    z = logits[-1].astype(np.float64)
    others = np.delete(np.arange(len(z)), first)
    best_other = int(others[np.argmax(z[others])])
    # A logit_bias on `first` puts it 0.5 above the runner-up at the second
    # step; a penalty on it (generated once) then moves the greedy choice
    # exactly when it passes 0.5.
    bias = float(z[best_other] - z[first] + 0.5)

    def second(value: float) -> int:
        r = tiny_model.generate("", prompt_token_ids=ids, max_tokens=2, ignore_eos=True, cache_prompt=False,
                                logit_bias={first: bias}, **{which: value})
        assert r.tokens[0] == first  # nothing generated yet at the first step: no penalty
        return r.tokens[1]

    assert second(0.0) == first
    assert second(0.45) == first
    assert second(0.55) == best_other


def test_frequency_counts_repeats_and_the_prompt_is_not_counted(tiny_model):
    # Two tokens X and Y lifted far above the rest with logit_bias, X by D
    # more. X (which the prompt holds three times) is generated at steps 1 and 2; at
    # step 3 frequency 2 has taken 2 * 2 from it and Y wins, while presence 2
    # takes 2 once and X wins again. Counting the prompt's X, or not counting
    # repeats, changes these choices.
    base = tiny_model.tokenize(PROMPT)
    for x in range(5, 60):
        ids = base + [x] * 3
        z = [probes.prompt_states(tiny_model, ids + [x] * k)[1][-1].astype(np.float64) for k in range(3)]
        for y in range(5, 60):
            if y == x:
                continue
            d = 3.5 - (z[2][x] - z[2][y])  # step 3: X - Y = -0.5 under frequency, +1.5 under presence
            # X wins steps 1 and 2 by 0.5; at step 1 by less than the 6 that
            # frequency 2 would take if the prompt's three X counted.
            if z[0][y] - z[0][x] + 0.5 < d < z[0][y] - z[0][x] + 5.5 and d > z[1][y] - z[1][x] + 2.5:
                break
        else:
            continue
        break
    else:
        pytest.fail("no pair of tokens fits the construction")
    bias = {x: 100.0, y: 100.0 - d}

    def run(**penalty: float) -> list[int]:
        return tiny_model.generate("", prompt_token_ids=ids, max_tokens=3, ignore_eos=True, cache_prompt=False,
                                   logit_bias=bias, **penalty).tokens

    assert run(frequency_penalty=2.0) == [x, x, y]
    assert run(presence_penalty=2.0) == [x, x, x]
    assert run() == [x, x, x]


def test_logit_bias_bans_forces_and_is_reported(tiny_model):
    ids = tiny_model.tokenize(PROMPT)
    plain = tiny_model.generate("", prompt_token_ids=ids, max_tokens=1, cache_prompt=False).tokens[0]
    banned = tiny_model.generate_batch([ids], n=16, max_tokens=1, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                       seed=3, logit_bias={plain: -100})
    assert all(r.tokens[0] != plain for r in banned)
    forced_token = 7
    forced = tiny_model.generate_batch([ids], n=16, max_tokens=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                       seed=3, logit_bias={str(forced_token): 100}, ignore_eos=True)
    assert all(r.tokens == [forced_token] * 3 for r in forced)
    # Logprobs and scores report the distribution after the bias.
    bias = {3: 2.5, 11: -4.0}
    scored = tiny_model.generate("", prompt_token_ids=ids, max_tokens=0, score_tokens=[3, 11, 20], logit_bias=bias,
                                 cache_prompt=False)
    _, logits = probes.prompt_states(tiny_model, ids)
    z = logits[-1].astype(np.float64)
    for t, b in bias.items():
        z[t] += b
    np.testing.assert_allclose(scored.score_logprobs, _log_softmax(z)[[3, 11, 20]], rtol=1e-4, atol=1e-4)


def test_bad_penalties_and_bias_are_refused(tiny_model):
    with pytest.raises(ValueError, match="presence_penalty"):
        tiny_model.generate("hi", presence_penalty=2.5, max_tokens=1)
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_model.generate("hi", logit_bias={1: 150}, max_tokens=1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model.generate("hi", logit_bias={10**9: 1.0}, max_tokens=1)
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_model.generate("hi", logit_bias={"x": 1.0}, max_tokens=1)
