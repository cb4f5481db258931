"""Speculation: tokens drafted by prompt lookup or a draft model, checked in the same decode.

A drafted token is kept when the token the sampler draws (after every
stage: SLOT's delta, RTD's blend, penalties, logit_bias, the grammar) is
the drafted one, so greedy output is plain greedy output token for token
(in deterministic mode, where a batch of several tokens rounds as one
token at a time does), and samples keep the target distribution: checked
by a chi-square against the exact distribution, which rejects the samples
of a wrong rule (keeping every draft)."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
from scipy import stats

import slot_cpp
from slot_cpp.server import ServerConfig

from conftest import VOCAB_GGUF, _hf_qwen2, write_qwen2_gguf
from test_server import running

COPY = ("Copy the text exactly.\nText: The old lighthouse keeper climbed the stairs every evening to light "
        "the lamp for the ships.\nCopy: The old lighthouse keeper climbed")


@pytest.fixture(scope="module")
def det(gemma_path: Path) -> Iterator[slot_cpp.Model]:
    model = slot_cpp.Model(gemma_path, n_ctx=2048, n_parallel=4, deterministic=True)
    yield model
    model.close()


def _pair(model: slot_cpp.Model, prompt: Any, **options: Any) -> tuple[slot_cpp.GenerationResult, ...]:
    options = {"max_tokens": 24, "ignore_eos": True, "steps": 0, **options}
    return model.generate_with_slot(prompt, **options), model.generate_with_slot(prompt, draft_max=8, **options)


def test_greedy_with_drafts_is_plain_greedy_with_every_stage(det: slot_cpp.Model) -> None:
    plain, drafted = _pair(det, COPY)
    assert drafted.tokens == plain.tokens and drafted.accepted_tokens > 0
    assert drafted.drafted_tokens >= drafted.accepted_tokens and plain.drafted_tokens == 0
    delta = det.generate_with_slot(COPY, steps=3, lr=0.05, max_tokens=0).delta
    for options in ({"delta": delta}, {"repeat_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": 0.2},
                    {"logit_bias": {det.tokenize(" the", add_special=False)[0]: -3.0}},
                    {"grammar": 'root ::= [ a-zA-Z.,]+'}, {"json_schema": {"type": "object"}, "max_tokens": 12},
                    {"steps": 2, "lr": 0.05}):
        plain, drafted = _pair(det, COPY, **options)
        assert drafted.tokens == plain.tokens, options
    # With logprobs: the same numbers, whichever decode computed them.
    plain, drafted = _pair(det, COPY, logprobs=True, top_logprobs=3)
    assert drafted.token_logprobs == plain.token_logprobs and drafted.top_logprobs == plain.top_logprobs


def test_drafts_end_where_the_answer_would(det: slot_cpp.Model) -> None:
    # The copied text goes on past the stop string; a draft stops at the token that completes it
    # (kept: it is the answer's last), so no drafted token is wasted on text after the end.
    r = det.generate(COPY, max_tokens=40, draft_max=8, stop=["lamp"])
    assert r.finish_reason == "stop" and r.text.endswith(" light the ")
    assert r.accepted_tokens == r.drafted_tokens > 0


def _together_as_alone(model: slot_cpp.Model, draft_max: list[int], max_tokens: int, rounds: int) -> None:
    """Three requests (draft_max[i] for the i-th) decoded together give each the tokens it gets alone."""
    prompts = [COPY, "Question: What is the capital of France?\nAnswer:", "Once upon a time"]
    solo = [model.generate(p, max_tokens=max_tokens, ignore_eos=True, draft_max=k).tokens
            for p, k in zip(prompts, draft_max)]
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        got[i] = model.generate(prompts[i], max_tokens=max_tokens, ignore_eos=True, draft_max=draft_max[i]).tokens

    for _ in range(rounds):
        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got[i] for i in range(3)] == solo


def test_a_drafting_request_beside_plain_ones(det: slot_cpp.Model) -> None:
    _together_as_alone(det, [6, 0, 0], max_tokens=20, rounds=2)


def test_rtd_composes_with_drafts(det: slot_cpp.Model) -> None:
    from slot_cpp.rtd import Datastore

    facts = [{"prompt": "Copy the text exactly.\nText: The old lighthouse keeper", "completion": " climbed the stairs."},
             {"prompt": "The colour of the sky is", "completion": " blue, and the grass is green."}]
    store = Datastore.build(det, facts, progress=False)
    plain, drafted = _pair(det, COPY, rtd=store, max_tokens=16)
    assert drafted.tokens == plain.tokens and drafted.accepted_tokens > 0


# ---- the sampled distribution ---------------------------------------------------------

TOP_K = 3
N_SAMPLES = 1200


def _next(model: slot_cpp.Model, tokens: list[int], cache: dict[tuple[int, ...], dict[int, float]]
          ) -> dict[int, float]:
    """The exact next-token distribution of top-k sampling at temperature 1 after ``tokens``."""
    key = tuple(tokens)
    if key not in cache:
        r = model.generate(tokens, max_tokens=1, ignore_eos=True, logprobs=True, top_logprobs=TOP_K,
                           temperature=0.0, cache_prompt=False)
        top = dict(r.top_logprobs[0])
        z = np.logaddexp.reduce(list(top.values()))
        cache[key] = {t: float(np.exp(v - z)) for t, v in top.items()}
    return cache[key]


def _draft(history: list[int], n_max: int = 3) -> Optional[int]:
    """The first drafted token after ``history``: prompt lookup as the engine does it (the last n
    tokens matched earlier; failing that, the n before the last, the token after their match skipped)."""
    for skip in (0, 1):
        end = len(history) - skip
        for n in range(min(n_max, end - 1), 0, -1):
            tail = history[end - n:end]
            for start in range(end - n - 1, -1, -1):
                if history[start:start + n] == tail and start + n + skip < len(history):
                    return history[start + n + skip]
    return None


def _chi_square(samples: list[tuple[int, ...]], expected: dict[tuple[int, ...], float]) -> float:
    """The p-value of the samples' counts against the expected probabilities (cells under 5 expected pooled)."""
    counts = Counter(samples)
    n = len(samples)
    big = [k for k, p in expected.items() if p * n >= 5]
    observed = [counts.get(k, 0) for k in big]
    wanted = [expected[k] * n for k in big]
    rest_obs, rest_exp = n - sum(observed), n - sum(wanted)
    if rest_exp >= 5:
        observed.append(rest_obs)
        wanted.append(rest_exp)
    elif rest_obs > 0:
        return 0.0  # samples where (almost) nothing is expected
    return float(stats.chisquare(observed, np.asarray(wanted) * sum(observed) / sum(wanted)).pvalue)


def _check_samples(model: slot_cpp.Model, prompt: list[int], expected: dict[tuple[int, ...], float],
                   wrong: dict[tuple[int, ...], float], **speculation: Any) -> None:
    """N_SAMPLES speculative samples of three tokens pass the chi-square against ``expected``
    (drafts made, kept and refused), and samples drawn from ``wrong`` (a rule that keeps every
    draft) fail the same test."""
    options = dict(max_tokens=3, ignore_eos=True, temperature=1.0, top_k=TOP_K, top_p=1.0, min_p=0.0,
                   n=N_SAMPLES // 4, **speculation)
    samples: list[tuple[int, ...]] = []
    drafted = accepted = 0
    for seed in range(4):
        for r in model.generate_batch([prompt], seed=1000 * seed, **options):
            samples.append(tuple(r.tokens))
            drafted += r.drafted_tokens
            accepted += r.accepted_tokens
    assert drafted > 0 and 0 < accepted < drafted
    assert _chi_square(samples, expected) > 1e-3
    rng = np.random.default_rng(0)
    keys = list(wrong)
    picks = rng.choice(len(keys), size=len(samples), p=np.asarray([wrong[k] for k in keys]) / sum(wrong.values()))
    assert _chi_square([keys[i] for i in picks], expected) < 1e-6


def test_sampled_tokens_follow_the_target_distribution(gemma_path: Path) -> None:
    # The repeated words are the model's likely continuations, so drafts are made (and kept).
    model = slot_cpp.Model(gemma_path, n_ctx=2048, n_parallel=16, deterministic=True)
    prompt = model.tokenize("one two three one two three one two")
    cache: dict[tuple[int, ...], dict[int, float]] = {}
    # The exact joint distribution of the first three tokens.
    expected: dict[tuple[int, ...], float] = {}
    wrong: dict[tuple[int, ...], float] = {}  # keeping every draft instead of checking it
    for t1, p1 in _next(model, prompt, cache).items():
        for t2, p2 in _next(model, prompt + [t1], cache).items():
            third = _next(model, prompt + [t1, t2], cache)
            for t3, p3 in third.items():
                expected[(t1, t2, t3)] = p1 * p2 * p3
            d = _draft(prompt + [t1, t2])
            if d is not None:
                wrong[(t1, t2, d)] = wrong.get((t1, t2, d), 0.0) + p1 * p2
            else:
                for t3, p3 in third.items():
                    wrong[(t1, t2, t3)] = wrong.get((t1, t2, t3), 0.0) + p1 * p2 * p3
    _check_samples(model, prompt, expected, wrong, draft_max=4)
    model.close()


def test_drafts_through_the_server(det: slot_cpp.Model) -> None:
    import httpx

    with running(det, ServerConfig(model_id="det")) as url, httpx.Client(base_url=url, timeout=120) as http:
        body = {"prompt": COPY, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        plain = http.post("/v1/completions", json=body).json()
        drafted = http.post("/v1/completions", json={**body, "draft_max": 8}).json()
        assert drafted["choices"][0]["text"] == plain["choices"][0]["text"]
        assert drafted["timings"]["draft_n_accepted"] > 0 and "draft_n" not in plain["timings"]
        r = http.post("/v1/completions", json={**body, "draft_max": 100})
        assert r.status_code == 400 and r.json()["error"]["param"] == "draft_max"


# ---- a draft model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_drafting(gemma_path: Path) -> Iterator[slot_cpp.Model]:
    """Gemma drafting for itself: its drafts are its own greedy choices."""
    model = slot_cpp.Model(gemma_path, n_ctx=2048, n_parallel=4, deterministic=True, draft_model=gemma_path)
    yield model
    model.close()


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, peaked_path: Path) -> Iterator[slot_cpp.Model]:
    """The peaked tiny model with a draft model of other random weights and the same vocabulary:
    most of its drafts are refused."""
    import gguf

    n_vocab = len(gguf.GGUFReader(str(VOCAB_GGUF)).fields["tokenizer.ggml.tokens"].contents())
    draft = write_qwen2_gguf(_hf_qwen2(n_vocab, seed=99), tmp_path_factory.mktemp("draft") / "draft.gguf",
                             head_scale=12.0)
    model = slot_cpp.Model(peaked_path, n_ctx=512, n_parallel=4, deterministic=True, draft_model=draft)
    yield model
    model.close()


def test_a_draft_model_keeps_greedy_output_with_every_stage(self_drafting: slot_cpp.Model,
                                                             tiny_pair: slot_cpp.Model) -> None:
    prompt = "Question: What is the capital of France?\nAnswer:"
    plain, drafted = _pair(self_drafting, prompt, draft_p_min=0.0)
    assert drafted.tokens == plain.tokens
    # Its own greedy choices: (nearly) every draft is kept.
    assert drafted.accepted_tokens >= 0.9 * drafted.drafted_tokens > 0
    delta = self_drafting.generate_with_slot(prompt, steps=3, lr=0.05, max_tokens=0).delta
    for options in ({"delta": delta}, {"repeat_penalty": 1.3, "presence_penalty": 0.4},
                    {"grammar": 'root ::= [ a-zA-Z.,]+'}, {"steps": 2, "lr": 0.05}):
        plain, drafted = _pair(self_drafting, prompt, **options)
        assert drafted.tokens == plain.tokens and drafted.drafted_tokens > 0, options
    # A draft model of other weights: drafts refused, the answer still the target's own.
    for p in ("one two three", "The quick brown fox"):
        plain, drafted = _pair(tiny_pair, p, draft_p_min=0.0)
        assert drafted.tokens == plain.tokens
        assert 0 <= drafted.accepted_tokens < drafted.drafted_tokens


def test_draft_p_min_ends_drafts_the_draft_model_doubts(tiny_pair: slot_cpp.Model) -> None:
    bold = tiny_pair.generate("one two three", max_tokens=16, ignore_eos=True, draft_max=4, draft_p_min=0.0)
    shy = tiny_pair.generate("one two three", max_tokens=16, ignore_eos=True, draft_max=4, draft_p_min=1.0)
    assert bold.drafted_tokens > 0 and shy.drafted_tokens == 0 and shy.tokens == bold.tokens
    with pytest.raises(ValueError, match="draft_p_min"):
        tiny_pair.generate("x", max_tokens=2, draft_max=2, draft_p_min=1.5)


def test_a_draft_model_beside_plain_requests(self_drafting: slot_cpp.Model) -> None:
    _together_as_alone(self_drafting, [4, 0, 4], max_tokens=16, rounds=1)


def test_samples_with_a_draft_model_follow_the_target_distribution(tiny_path: Path) -> None:
    # The tiny model drafting for itself: drafts are its greedy choices, kept or refused by the samples.
    model = slot_cpp.Model(tiny_path, n_ctx=512, n_parallel=4, deterministic=True, draft_model=tiny_path)
    prompt = model.tokenize("My favourite colour is")
    cache: dict[tuple[int, ...], dict[int, float]] = {}
    expected: dict[tuple[int, ...], float] = {}
    wrong: dict[tuple[int, ...], float] = {}  # keeping every draft: the draft model's greedy choices
    for t1, p1 in _next(model, prompt, cache).items():
        second = _next(model, prompt + [t1], cache)
        g2 = max(second, key=second.__getitem__)
        for t2, p2 in second.items():
            third = _next(model, prompt + [t1, t2], cache)
            for t3, p3 in third.items():
                expected[(t1, t2, t3)] = p1 * p2 * p3
        third = _next(model, prompt + [t1, g2], cache)
        wrong[(t1, g2, max(third, key=third.__getitem__))] = p1
    _check_samples(model, prompt, expected, wrong, draft_max=4, draft_p_min=0.0)
    model.close()


def _vocab_with(tmp: Path, token: int, text: str) -> Path:
    """VOCAB_GGUF with one token's text changed."""
    import gguf

    reader = gguf.GGUFReader(str(VOCAB_GGUF))
    writer = gguf.GGUFWriter(str(tmp / "vocab.gguf"), "gpt2")
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        value = field.contents()
        if name == "tokenizer.ggml.tokens":
            value = list(value)
            value[token] = text
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, value, field.types[0], sub_type=sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return tmp / "vocab.gguf"


def test_a_draft_model_with_another_vocabulary_is_refused(tmp_path: Path, gemma_path: Path, tiny_path: Path,
                                                          tiny_qwen2: tuple[Path, Any]) -> None:
    with pytest.raises(ValueError, match=r"draft_model .*50257 tokens and the model's 262144"):
        slot_cpp.Model(gemma_path, n_ctx=512, draft_model=tiny_path)
    other = write_qwen2_gguf(tiny_qwen2[1], tmp_path / "other.gguf", vocab_path=_vocab_with(tmp_path, 1000, "zzz"))
    with pytest.raises(ValueError, match="token 1000 is 'zzz' there"):
        slot_cpp.Model(tiny_path, n_ctx=512, draft_model=other)
    with pytest.raises(slot_cpp.ModelLoadError, match="draft_model: model file not found"):
        slot_cpp.Model(tiny_path, n_ctx=512, draft_model=tmp_path / "missing.gguf")
    with pytest.raises(TypeError, match="draft_model must be a str"):
        slot_cpp.Model(tiny_path, n_ctx=512, draft_model=3)  # type: ignore[arg-type]
