"""Deterministic mode (``Model(deterministic=True)``): a request's tokens and
logprobs are bit-identical whether it runs alone or among others, whatever
the prompt cache holds, in any order, at any thread count. Each test runs the
same comparison with the mode off too and shows that there it differs, so
that the test can fail.

The embedded Gemma 3 270M is the model (its sliding-window layers and its
262k vocabulary are the realistic case); a needle prompt is compared with
itself run alone and cache off.
"""

from __future__ import annotations

import concurrent.futures
import random
from typing import Any, Iterator, Sequence

import numpy as np
import pytest

import slot_cpp
from slot_cpp import ContextLengthError, Model

pytestmark = pytest.mark.slow

NEEDLE = "Question: What is the capital of France?\nAnswer:"
N_PARALLEL = 16
SEQ_CELLS = 2304  # a 2,048-token prefix, the needle and its answer
GREEDY = dict(max_tokens=16, logprobs=True)
WORDS = ("the a of to in is was for on that with as by at from his her it an are were be this have which or one "
         "had not but what all when there can river stone light seven under market winter paper").split()


def _random_prompts(n: int, seed: int, low: int = 3, high: int = 120) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def _models(gemma_path: Any, **kw: Any) -> Iterator[dict[bool, Model]]:
    models = {det: Model(gemma_path, n_ctx=N_PARALLEL * SEQ_CELLS, n_parallel=N_PARALLEL, n_threads=2,
                         deterministic=det, **kw) for det in (True, False)}
    try:
        yield models
    finally:
        for m in models.values():
            m.close()


@pytest.fixture(scope="module")
def models(gemma_path: Any) -> Iterator[dict[bool, Model]]:
    """The mode on (True) and off (False), otherwise the same settings."""
    yield from _models(gemma_path)


def _fingerprint(r: slot_cpp.GenerationResult) -> tuple[str, bytes]:
    """The text and the logprobs' exact bits."""
    assert r.token_logprobs
    return r.text, np.asarray(r.token_logprobs, dtype=np.float32).tobytes()


def _alone(m: Model, prompt: Any, **kw: Any) -> slot_cpp.GenerationResult:
    m.clear_cache()
    return m.generate_batch([prompt], cache_prompt=False, **{**GREEDY, **kw})[0]


def _needle_among(m: Model, others: Sequence[str], at: int, **kw: Any) -> slot_cpp.GenerationResult:
    prompts = list(others[:at]) + [NEEDLE] + list(others[at:])
    return m.generate_batch(prompts, cache_prompt=False, **{**GREEDY, **kw})[at]


def test_the_mode_is_reported_and_gives_each_sequence_its_own_cells(models: dict[bool, Model]) -> None:
    det, default = models[True], models[False]
    assert det.deterministic and not default.deterministic
    assert det.seq_capacity == SEQ_CELLS and default.seq_capacity == default.n_ctx


def test_needle_alone_and_among_31_random_prompts(models: dict[bool, Model]) -> None:
    others = _random_prompts(31, seed=1)
    diffs = {}
    for det, m in models.items():
        alone = _fingerprint(_alone(m, NEEDLE))
        among = _fingerprint(_needle_among(m, others, at=13))
        diffs[det] = alone != among
        if det:
            assert among == alone
    assert diffs == {True: False, False: True}


def test_batch_sizes_1_to_16(models: dict[bool, Model]) -> None:
    others = _random_prompts(15, seed=2)
    sizes = (1, 2, 3, 8, 16)
    seen = {det: {_fingerprint(_needle_among(m, others[:k - 1], at=(k - 1) // 2)) for k in sizes}
            for det, m in models.items()}
    assert len(seen[True]) == 1
    assert len(seen[False]) > 1


@pytest.mark.parametrize("prefix_tokens", [1, 511, 2048])
def test_a_shared_prefix_cached_or_flushed(models: dict[bool, Model], prefix_tokens: int) -> None:
    """A long document then a question: answered with the document fresh, and
    again after another question about it left the document in the cache."""
    differs = {}
    for det, m in models.items():
        bos = m.tokenize("")
        body = m.tokenize(" ".join(_random_prompts(1, seed=3, low=3000, high=3000)), add_special=False)
        prefix = (bos + body)[:prefix_tokens]
        question = m.tokenize("\n" + NEEDLE, add_special=False)
        fresh = _fingerprint(_alone(m, prefix + question))
        m.generate_batch([prefix + m.tokenize("\nQuestion: Who wrote it?\nAnswer:", add_special=False)], max_tokens=4)
        r = m.generate_batch([prefix + question], **GREEDY)[0]
        assert r.cached_tokens >= prefix_tokens - 1
        differs[det] = _fingerprint(r) != fresh
        if det:
            assert _fingerprint(r) == fresh
    assert not differs[True]
    if prefix_tokens == 511:
        # The default mode evaluates the uncached rest in other chunks, with other kernels.
        assert differs[False]


def test_any_order_with_the_prompt_cache(models: dict[bool, Model]) -> None:
    """Few-shot prompts sharing a header, run in one order and reversed:
    what the cache holds when each arrives differs."""
    header = "Answer each question in one word.\n" + "\n".join(_random_prompts(6, seed=4, low=20, high=40)) + "\n"
    questions = [f"{header}Q{i}: {q}\nA:" for i, q in enumerate(_random_prompts(8, seed=5, low=3, high=12))]
    differs = {}
    for det, m in models.items():
        m.clear_cache()
        forward = [_fingerprint(m.generate_batch([q], **GREEDY)[0]) for q in questions]
        m.clear_cache()
        backward = [_fingerprint(m.generate_batch([q], **GREEDY)[0]) for q in reversed(questions)][::-1]
        differs[det] = forward != backward
    assert differs == {True: False, False: True}


def test_sampling_with_a_seed_slot_delta_and_a_grammar(models: dict[bool, Model]) -> None:
    """Sampled tokens (temperature 0.9, seed 7), SLOT's learned delta and
    losses, and a grammar's greedy answer are bit-identical alone and among
    others."""
    others = _random_prompts(7, seed=6)
    kw: dict[str, Any] = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=7, steps=3)
    m = models[True]
    alone = _alone(m, NEEDLE, **kw)
    among = _needle_among(m, others, at=3, **kw)
    assert _fingerprint(alone) == _fingerprint(among)
    assert np.array_equal(np.asarray(alone.delta), np.asarray(among.delta))
    assert alone.losses == among.losses
    assert np.any(np.asarray(alone.delta) != 0)

    grammar = 'root ::= " " [A-Z] [a-z]+ ("," " " [a-z]+)* "."'
    constrained = [_fingerprint(r) for r in (_alone(m, NEEDLE, grammar=grammar),
                                             _needle_among(m, others, at=5, grammar=grammar))]
    assert constrained[0] == constrained[1]


def test_float_and_q8_0_weights_at_every_batch_size(tiny_path: Any, tiny_q8_head: Any) -> None:
    """The tiny random model: F32 weights (llamafile's float tiles on x86-64)
    with an F32 and a Q8_0 output head, batch sizes 1 to 9."""
    prompts = [[1 + (7 * i + j) % 200 for j in range(5 + 3 * i)] for i in range(9)]
    needle = [11, 12, 13, 14, 15, 16, 17]
    answers = {}
    for head, path in (("F32", tiny_path), ("Q8_0", tiny_q8_head[0])):
        for det in (True, False):
            with Model(path, n_ctx=9 * 256, n_parallel=9, n_threads=2, deterministic=det) as m:
                answers[head, det] = {_fingerprint(m.generate_batch(prompts[:k] + [needle], cache_prompt=False,
                                                                    **GREEDY)[k]) for k in range(9)}
    assert len(answers["F32", True]) == len(answers["Q8_0", True]) == 1
    assert len(answers["F32", False]) > 1  # the float head's tiles differ from its one-row product


def test_thread_count_does_not_change_the_answer(gemma_path: Any, models: dict[bool, Model]) -> None:
    with Model(gemma_path, n_ctx=4 * 512, n_parallel=4, n_threads=1, deterministic=True) as one:
        assert _fingerprint(_alone(one, NEEDLE)) == _fingerprint(_alone(models[True], NEEDLE))


def test_a_sequence_longer_than_its_cells_is_a_clear_error(gemma_path: Any) -> None:
    with Model(gemma_path, n_ctx=4 * 256, n_parallel=4, deterministic=True) as m:
        assert m.seq_capacity == 256
        with pytest.raises(ContextLengthError, match="in deterministic mode a sequence holds 256"):
            m.generate(" ".join(["word"] * 300), max_tokens=4)
        assert m.generate(NEEDLE, max_tokens=4).text  # and the model still serves


def test_gpu_offload_is_refused(gemma_path: Any) -> None:
    with pytest.raises(ValueError, match="CPU backend only"):
        Model(gemma_path, n_gpu_layers=1, deterministic=True)


def test_server_answers_the_same_bytes_alone_and_under_32_clients(gemma_path: Any) -> None:
    import httpx

    from test_server import running  # noqa: PLC0415  (the same real uvicorn server as test_server)

    from slot_cpp.server import ServerConfig

    body = {"model": "m", "prompt": NEEDLE, "max_tokens": 12, "temperature": 0, "logprobs": 1}
    load = [{"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0.7, "seed": i}
            for i, p in enumerate(_random_prompts(32, seed=7))]
    answers = {}
    for det in (True, False):
        model = Model(gemma_path, n_ctx=8 * 512, n_parallel=8, n_threads=2, deterministic=det)
        with running(model, ServerConfig(model_id="m", max_waiting=64)) as url, \
                httpx.Client(base_url=url, timeout=120) as http:
            def post(b: dict[str, Any]) -> bytes:
                r = http.post("/v1/completions", json=b)
                assert r.status_code == 200, r.text
                return r.content

            import json

            def choice(raw: bytes) -> str:
                return json.dumps(json.loads(raw)["choices"][0], sort_keys=True)

            alone = choice(post(body))
            with concurrent.futures.ThreadPoolExecutor(33) as pool:
                futures = [pool.submit(post, b) for b in load[:16]] + [pool.submit(post, body)] + \
                          [pool.submit(post, b) for b in load[16:]]
                loaded = choice(futures[16].result())
                for f in futures:
                    f.result()
            answers[det] = (alone, loaded)
    assert answers[True][0] == answers[True][1]
    assert answers[False][0] != answers[False][1]
