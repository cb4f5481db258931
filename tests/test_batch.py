"""The multi-sequence engine: batched generation, n samples sharing a prompt,
forks from a prefix, the prompt cache, logprobs, and their failure modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import slot_cpp
from conftest import PROMPT
from slot_cpp import probes

PROMPTS = [
    "The quick brown fox jumps over the lazy dog and",
    "Hello world",
    "One two three four five six",
    "In the beginning",
    "Numbers: 1, 2, 3,",
    "A B C D E F G",
]

# A sequence decoded in a batch of several rows goes through other matmul
# kernels (and KV-cell layouts) than alone, which sum in another order:
# measured up to 0.0064 on the tiny model's 12x head. The cache and forks
# compute exactly as from scratch, so they are compared with no tolerance.
TINY_LOGPROB_TOL = 0.02


def fresh(path, **kwargs) -> slot_cpp.Model:
    return slot_cpp.Model(path, n_ctx=kwargs.pop("n_ctx", 512), n_threads=2, **kwargs)


@pytest.fixture(scope="module")
def peaked(peaked_path):
    model = fresh(peaked_path, n_parallel=4)
    yield model
    model.close()


def singles(model: slot_cpp.Model, prompts, **kwargs) -> list[slot_cpp.GenerationResult]:
    out = []
    for p in prompts:
        model.clear_cache()
        out.append(model.generate(p, cache_prompt=False, **kwargs))
    return out


def test_greedy_batch_equals_one_at_a_time(peaked_path):
    max_tokens = [24, 10, 24, 3, 17, 24]  # per prompt, so sequences finish at different steps
    with fresh(peaked_path, n_parallel=4) as model:
        alone = [singles(model, [p], max_tokens=m, ignore_eos=True, logprobs=True)[0]
                 for p, m in zip(PROMPTS, max_tokens)]
        model.clear_cache()
        before = model.decoded_tokens
        batch = model.generate_batch(PROMPTS, max_tokens=max_tokens, ignore_eos=True, logprobs=True)
        decoded = model.decoded_tokens - before
    assert [r.tokens for r in batch] == [r.tokens for r in alone]
    for b, a in zip(batch, alone):
        np.testing.assert_allclose(b.token_logprobs, a.token_logprobs, atol=TINY_LOGPROB_TOL)
        assert b.text == a.text and b.finish_reason == "length"
    # Six prompts through four sequences: every prompt token and every
    # generated token but each sequence's last was evaluated exactly once.
    n_prompt = sum(r.prompt_tokens for r in batch)
    assert decoded == n_prompt + sum(m - 1 for m in max_tokens)


def test_batch_equals_llama_cpp_batched_loop(peaked_path):
    with fresh(peaked_path, n_parallel=4) as model:
        prompts = [model.tokenize(p) for p in PROMPTS[:3]]
        ours = model.generate_batch(prompts, max_tokens=16, cache_prompt=False)
        reference, seconds = probes.reference_greedy_batch(model, prompts, 16)
    assert [r.tokens for r in ours] == reference and seconds > 0


@pytest.mark.slow
def test_gemma_batch_logprobs_agree_with_single_calls(gemma):
    prompts = [PROMPT, "The capital of France is", "def fibonacci(n):", "Once upon a time"]
    alone = singles(gemma, prompts, max_tokens=24, logprobs=True)
    batch = gemma.generate_batch(prompts, max_tokens=24, logprobs=True, cache_prompt=False)
    diffs = []
    for b, a in zip(batch, alone):
        same = 0
        while same < min(len(a.tokens), len(b.tokens)) and a.tokens[same] == b.tokens[same]:
            same += 1
        assert same >= 3, (a.text, b.text)  # greedy paths agree until a near-tie, if any
        # Compared up to and including the first step where they part.
        k = min(same + 1, len(a.token_logprobs), len(b.token_logprobs))
        diffs += list(np.abs(np.subtract(a.token_logprobs[:k], b.token_logprobs[:k])))
    # Batches of 4+ rows go through ggml's 4-row quantised matmul, which rounds
    # otherwise than the 1-row path (README: measured max 0.28, median 0.004).
    assert len(diffs) >= 40
    assert max(diffs) < 0.5 and float(np.median(diffs)) < 0.02


def test_n_samples_share_the_prompt_and_match_independent_seeded_calls(peaked_path):
    kwargs = dict(max_tokens=12, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True)
    with fresh(peaked_path, n_parallel=3) as model:
        model.clear_cache()
        before = model.decoded_tokens
        samples = model.generate_batch([PROMPTS[0]], n=5, seed=100, **kwargs)
        decoded = model.decoded_tokens - before
        model.clear_cache()  # the same cache state, the same numbers (README: Rounding)
        again = model.generate_batch([PROMPTS[0]], n=5, seed=100, **kwargs)
        independent = [singles(model, [PROMPTS[0]], seed=100 + j, **kwargs)[0] for j in range(5)]
    assert [r.seed for r in samples] == [100, 101, 102, 103, 104]
    assert [r.tokens for r in samples] == [r.tokens for r in again]  # reproducible
    assert len({tuple(r.tokens) for r in samples}) == 5  # and different from each other
    assert [r.tokens for r in samples] == [r.tokens for r in independent]
    # The prompt was evaluated once for the first three samples (one group of
    # n_parallel), and the last two reused all but its last token.
    n = samples[0].prompt_tokens
    assert samples[3].cached_tokens == samples[4].cached_tokens == n - 1
    assert decoded == n + 1 + 5 * 11


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    from scipy import stats

    expected = probs * counts.sum()
    return float(stats.chisquare(counts, expected).pvalue)


def test_sampled_first_tokens_follow_the_model_distribution(peaked_path):
    """Many samples of one prompt (drawn through forks of its shared cells)
    follow softmax(logits / T) over the top-k logits; the same test rejects a
    wrong distribution (temperature 2T)."""
    top_k, n, temperature = 4, 3000, 3.0
    with fresh(peaked_path, n_parallel=8) as model:
        prompt = "One two three four"
        exact = model.generate(prompt, max_tokens=1, top_logprobs=top_k, ignore_eos=True).top_logprobs[0]
        ids = [t for t, _ in exact]
        logp = np.array([lp for _, lp in exact])
        draws = model.generate_batch([prompt], n=n, max_tokens=1, temperature=temperature, top_k=top_k,
                                     top_p=1.0, min_p=0.0, seed=7, ignore_eos=True)
    counts = np.array([sum(r.tokens[0] == t for r in draws) for t in ids], dtype=float)
    assert counts.sum() == n

    def softmax(x: np.ndarray) -> np.ndarray:
        return np.exp(x - np.logaddexp.reduce(x))

    right, wrong = softmax(logp / temperature), softmax(logp / (2 * temperature))
    assert min(right) * n > 20  # every cell of the test is well populated
    assert _chi_square_p(counts, right) > 0.01
    assert _chi_square_p(counts, wrong) < 1e-6


@pytest.mark.parametrize("min_p", [0.0, 0.02])
def test_untruncated_sampling_follows_the_full_distribution(peaked_path, min_p):
    """With no top-k or top-p, tokens are drawn from softmax(logits / T) over
    the whole vocabulary (less those under min_p of the most likely); exact
    probabilities from the model's own logits, a wrong temperature rejected."""
    n, temperature = 3000, 4.0
    with fresh(peaked_path, n_parallel=8) as model:
        prompt = "One two three four"
        ids = model.tokenize(prompt)
        logits = probes.prompt_states(model, ids)[1][-1].astype(np.float64)
        draws = model.generate_batch([prompt], n=n, max_tokens=1, temperature=temperature, top_k=0, top_p=1.0,
                                     min_p=min_p, seed=5, ignore_eos=True)

    def distribution(t: float) -> np.ndarray:
        p = np.exp((logits - logits.max()) / t)
        p[p < min_p] = 0.0  # min_p is relative to the most likely token (p = 1 here)
        return p / p.sum()

    drawn = np.array([r.tokens[0] for r in draws])
    right, wrong = distribution(temperature), distribution(2 * temperature)
    assert right[drawn].min() > 0  # nothing under the min-p floor was drawn
    # Categories: the tokens expected at least 10 times, and the rest pooled.
    top = np.flatnonzero(right * n >= 10)
    assert len(top) >= 3

    rest = 1.0 - right[top].sum()

    def p_value(probs: np.ndarray) -> float:
        counts = [np.sum(drawn == t) for t in top]
        expected = list(probs[top])
        if rest * n >= 5:  # the pooled rest, when it is a category worth testing
            counts.append(np.sum(~np.isin(drawn, top)))
            expected.append(1.0 - probs[top].sum())
        else:
            assert np.isin(drawn, top).mean() > 0.995
        expected_arr = np.array(expected)
        return _chi_square_p(np.array(counts, dtype=float), expected_arr / expected_arr.sum())

    assert p_value(right) > 0.01
    assert p_value(wrong) < 1e-6


def test_fork_continues_exactly_like_decoding_the_prefix_from_scratch(peaked_path):
    with fresh(peaked_path, n_parallel=2) as model:
        prompt = model.tokenize(PROMPTS[0])
        full = model.generate("", prompt_token_ids=prompt, max_tokens=20, ignore_eos=True, logprobs=True)
        y = full.tokens
        for i in (1, 7, 15):
            forked = model.generate("", prompt_token_ids=prompt, response_prefix=y[:i], max_tokens=20 - i,
                                    ignore_eos=True, logprobs=True)
            # Only the last prefix token is evaluated again: the rest comes from
            # the cells the first call left behind.
            assert forked.cached_tokens == len(prompt) + i - 1
            assert forked.tokens == y[i:]
            np.testing.assert_allclose(forked.token_logprobs, full.token_logprobs[i:], atol=TINY_LOGPROB_TOL)
            scratch = model.generate("", prompt_token_ids=prompt + y[:i], max_tokens=20 - i, ignore_eos=True,
                                     logprobs=True, cache_prompt=False)
            assert scratch.cached_tokens == 0 and scratch.tokens == y[i:]
        # The distribution after a fork is the one after the same prefix from
        # scratch (which evaluates the prefix as one batch, so within rounding).
        a = model.generate("", prompt_token_ids=prompt, response_prefix=y[:5], max_tokens=1, top_logprobs=10)
        b = model.generate("", prompt_token_ids=prompt + y[:5], max_tokens=1, top_logprobs=10, cache_prompt=False)
        assert a.cached_tokens > 0
        assert [t for t, _ in a.top_logprobs[0]] == [t for t, _ in b.top_logprobs[0]]
        np.testing.assert_allclose([lp for _, lp in a.top_logprobs[0]], [lp for _, lp in b.top_logprobs[0]],
                                   atol=TINY_LOGPROB_TOL)
        # And a fork is exact where the cells are the same: twice from the cache.
        kw = dict(max_tokens=10, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True, seed=3)
        c = model.generate("", prompt_token_ids=prompt, response_prefix=y[:5], **kw)
        d = model.generate("", prompt_token_ids=prompt, response_prefix=y[:5], **kw)
        assert c.tokens == d.tokens and c.cached_tokens == d.cached_tokens > 0


def test_prompt_cache_reuses_and_is_invalidated_correctly(peaked_path, tiny_qwen2):
    kw = dict(max_tokens=8, ignore_eos=True, logprobs=True)
    with fresh(peaked_path, n_parallel=2) as model:
        first = model.generate(PROMPTS[0], **kw)
        assert first.cached_tokens == 0
        second = model.generate(PROMPTS[0], **kw)
        assert second.cached_tokens == second.prompt_tokens - 1
        assert second.tokens == first.tokens
        # A prompt sharing a prefix reuses exactly that prefix.
        longer = PROMPTS[0] + " then"
        n_common = len(model.tokenize(PROMPTS[0]))
        extended = model.generate(longer, **kw)
        assert extended.cached_tokens == n_common
        assert extended.tokens == singles(model, [longer], **{k: v for k, v in kw.items()})[0].tokens
        # A different delta on a cached prompt gives what it gives from scratch.
        delta = np.random.default_rng(0).normal(0, 2.0, model.n_embd).astype(np.float32)
        model.generate(PROMPTS[0], **kw)
        with_delta = model.generate(PROMPTS[0], delta=delta, **kw)
        assert with_delta.cached_tokens > 0
        model.clear_cache()
        assert with_delta.tokens == model.generate(PROMPTS[0], delta=delta, cache_prompt=False, **kw).tokens
        assert with_delta.tokens != first.tokens
        # cache_prompt=False neither reuses nor leaves cells behind.
        model.generate(PROMPTS[1], cache_prompt=False, **kw)
        assert model.generate(PROMPTS[1], **kw).cached_tokens == 0
    with fresh(peaked_path, n_parallel=2) as reopened:
        assert reopened.generate(PROMPTS[0], **kw).cached_tokens == 0


def test_each_sequence_keeps_its_own_delta(peaked_path):
    rng = np.random.default_rng(1)
    with fresh(peaked_path, n_parallel=4) as model:
        d1, d2 = (rng.normal(0, 1.5, model.n_embd).astype(np.float32) for _ in range(2))
        kw = dict(max_tokens=12, ignore_eos=True)
        alone = [singles(model, [PROMPTS[0]], delta=d1, **kw)[0], singles(model, [PROMPTS[2]], delta=d2, **kw)[0],
                 singles(model, [PROMPTS[3]], **kw)[0]]
        batch = model.generate_batch([PROMPTS[0], PROMPTS[2], PROMPTS[3]], delta=[d1, d2, None], **kw)
        assert [r.tokens for r in batch] == [r.tokens for r in alone]
        np.testing.assert_array_equal(batch[0].delta, d1)
        assert batch[2].delta is None
        # SLOT learns one delta per prompt, the same as alone, shared by its samples.
        slot_alone = [model.generate_with_slot(p, steps=3, lr=0.05, max_tokens=4, cache_prompt=False)
                      for p in PROMPTS[:2]]
        slot_batch = model.generate_batch(PROMPTS[:2], n=2, steps=3, lr=0.05, max_tokens=4)
    for k, a in enumerate(slot_alone):
        for j in range(2):
            b = slot_batch[2 * k + j]
            np.testing.assert_allclose(b.delta, a.delta, rtol=1e-5, atol=1e-7)
            assert b.losses == pytest.approx(a.losses, rel=1e-6)
    assert not np.allclose(slot_batch[0].delta, slot_batch[2].delta)


def test_logprobs_are_the_model_distribution_under_the_delta(peaked_path):
    with fresh(peaked_path, n_parallel=2) as model:
        delta = np.random.default_rng(2).normal(0, 1.0, model.n_embd).astype(np.float32)
        prompt = model.tokenize(PROMPTS[2])
        for d in (None, delta):
            r = model.generate("", prompt_token_ids=prompt, delta=d, max_tokens=10, ignore_eos=True, top_logprobs=3)
            forced = probes.token_logprobs(model, prompt + r.tokens, len(prompt), delta=d)
            np.testing.assert_allclose(r.token_logprobs, forced, atol=TINY_LOGPROB_TOL)
            for tok, lp, top in zip(r.tokens, r.token_logprobs, r.top_logprobs):
                assert top[0] == (tok, pytest.approx(lp))  # greedy: the chosen token is the most likely
                assert [x[1] for x in top] == sorted((x[1] for x in top), reverse=True)
        plain = model.generate(PROMPTS[2], max_tokens=3)
        assert plain.token_logprobs is None and plain.top_logprobs is None
        empty = model.generate(PROMPTS[2], max_tokens=0, logprobs=True)
        assert empty.token_logprobs == [] and empty.tokens == []


def test_score_tokens_and_hidden_state_at_the_context_end(peaked_path):
    with fresh(peaked_path, n_parallel=2) as model:
        x = model.tokenize(PROMPTS[2])
        hidden, logits = probes.prompt_states(model, x)
        z = logits[-1].astype(np.float64)
        lse = np.logaddexp.reduce(z)
        delta = np.random.default_rng(3).normal(0, 1.0, model.n_embd).astype(np.float32)
        for d in (None, delta):
            r = model.generate("", prompt_token_ids=x, max_tokens=0, score_tokens=[5, 77, 5], return_hidden=True,
                               delta=d, cache_prompt=False)
            zz = z if d is None else z + probes.logit_bias(model, d)
            expected = zz[[5, 77, 5]] - np.logaddexp.reduce(zz)
            # prompt_states evaluates every position in one batch: other
            # kernels, so within rounding (logits here are around -80).
            np.testing.assert_allclose(r.score_logprobs, expected, atol=2e-3)
            np.testing.assert_allclose(r.hidden, hidden[-1], atol=1e-4)  # the state before delta's shift
            assert r.tokens == [] and r.token_logprobs is None
        assert lse > z.max()
        # From the cache, the same numbers exactly.
        a = model.generate("", prompt_token_ids=x, max_tokens=0, score_tokens=[5], return_hidden=True)
        b = model.generate("", prompt_token_ids=x, max_tokens=0, score_tokens=[5], return_hidden=True)
        assert b.cached_tokens == len(x) - 1 and a.score_logprobs == b.score_logprobs
        np.testing.assert_array_equal(a.hidden, b.hidden)
        plain = model.generate(PROMPTS[2], max_tokens=1)
        assert plain.score_logprobs is None and plain.hidden is None


def test_batch_larger_than_the_context_queues(peaked_path):
    # Each request needs ~50 cells and the context holds 128: they cannot all
    # be live at once, so they wait for each other and still match.
    prompts = PROMPTS[:5]
    with fresh(peaked_path, n_ctx=128, n_parallel=4) as model:
        batch = model.generate_batch(prompts, max_tokens=40, ignore_eos=True)
        alone = singles(model, prompts, max_tokens=40, ignore_eos=True)
    assert [r.tokens for r in batch] == [r.tokens for r in alone]


def test_streaming_callback_per_result_and_early_stop(peaked_path):
    pieces: dict[int, list[str]] = {}

    def on_text(index: int, piece: str) -> bool:
        pieces.setdefault(index, []).append(piece)
        return not (index == 1 and len(pieces[1]) >= 3)  # stop the second sequence early

    with fresh(peaked_path, n_parallel=4) as model:
        batch = model.generate_batch(PROMPTS[:3], max_tokens=16, ignore_eos=True, on_text=on_text)
        alone = singles(model, PROMPTS[:3], max_tokens=16, ignore_eos=True)
    assert batch[1].finish_reason == "callback" and len(batch[1].tokens) < 16
    for k in (0, 2):  # the others are untouched by it
        assert batch[k].tokens == alone[k].tokens and "".join(pieces[k]) == batch[k].text


def test_a_raising_callback_fails_the_call_and_leaves_the_model_sound(peaked_path):
    def boom(index: int, piece: str) -> bool:
        if index == 2:
            raise RuntimeError("callback failed")
        return True

    with fresh(peaked_path, n_parallel=4) as model:
        expected = model.generate_batch(PROMPTS[:3], max_tokens=8, ignore_eos=True)
        with pytest.raises(RuntimeError, match="callback failed"):
            model.generate_batch(PROMPTS[:3], max_tokens=8, ignore_eos=True, on_text=boom)
        after = model.generate_batch(PROMPTS[:3], max_tokens=8, ignore_eos=True)
    assert [r.tokens for r in after] == [r.tokens for r in expected]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m.generate_batch([]), ValueError, "empty"),
        (lambda m: m.generate_batch("a prompt"), TypeError, "list of prompts"),
        (lambda m: m.generate_batch(["a"], n=0), ValueError, "n must be >= 1"),
        (lambda m: m.generate_batch(["a", "b"], seed=[1, 2, 3]), ValueError, "seed is given per prompt"),
        (lambda m: m.generate_batch(["a", "b"], stop=[["x"]]), ValueError, "stop is given per prompt"),
        (lambda m: m.generate_batch(["a", "b"], max_tokens=[1, -1]), ValueError, "prompt 1: max_tokens"),
        (lambda m: m.generate_batch(["a", ""]), ValueError, "prompt 1"),
        (lambda m: m.generate_batch(["a", 5]), TypeError, "prompt 1"),
        (lambda m: m.generate_batch(["a"], temprature=1.0), TypeError, "temprature"),
        (lambda m: m.generate_batch(["a", [1] * 600]), slot_cpp.ContextLengthError, "request 1"),
        (lambda m: m.generate_batch(["a"], n=2, max_tokens=300), slot_cpp.ContextLengthError, "KV cells"),
        (lambda m: m.generate_with_slot("a", response_prefix=[1, 2], steps=2), ValueError, "steps=0"),
        (lambda m: m.generate_with_slot("a", response_prefix="text"), TypeError, "token ids"),
        (lambda m: m.generate("a", top_logprobs=-1), ValueError, "top_logprobs"),
        (lambda m: m.generate("a", score_tokens=[10**9]), ValueError, "outside the vocabulary"),
        (lambda m: m.generate("a", score_tokens="yes"), TypeError, "token ids"),
    ],
)
def test_bad_batch_input_is_refused_and_nothing_runs(peaked_path, call, exc, match):
    with fresh(peaked_path, n_parallel=2) as model:
        before = model.decoded_tokens
        with pytest.raises(exc, match=match):
            call(model)
        assert model.decoded_tokens == before
        assert model.generate("hello", max_tokens=2, ignore_eos=True).generated_tokens == 2


@pytest.mark.parametrize("kwargs, match", [(dict(n_parallel=0), "n_parallel"),
                                           (dict(n_parallel=8, n_batch=4), "n_parallel"),
                                           (dict(n_parallel=1.5), "n_parallel")])
def test_bad_n_parallel(peaked_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        slot_cpp.Model(peaked_path, **kwargs)


def test_more_samples_than_sequences_and_n_parallel_one(peaked_path):
    with fresh(peaked_path, n_parallel=1) as model:
        out = model.generate_batch(PROMPTS[:2], n=3, max_tokens=5, temperature=0.9, seed=11, ignore_eos=True)
        assert len(out) == 6 and model.n_parallel == 1
        assert [r.seed for r in out] == [11, 12, 13, 11, 12, 13]
        again = [model.generate(PROMPTS[k // 3], max_tokens=5, temperature=0.9, seed=11 + k % 3, ignore_eos=True)
                 for k in range(6)]
    assert [r.tokens for r in out] == [r.tokens for r in again]
    assert not math.isnan(out[0].timings.total)
