"""Generate calls from several threads on one Model share the token loop
(continuous batching): same outputs as alone, a bounded queue, cancellation,
and one call's failure leaving the others intact."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import slot_cpp

PROMPTS = [f"Item {i}: the number {i * 7} and" for i in range(10)]
# Batched and single decodes round differently (see README, "Rounding"), and
# the peaked model's 12x head scales that up: two greedy runs may part only
# where the top two tokens are this close (cross-talk between sequences would
# part them anywhere).
TIE = 0.1


def assert_same_greedy(got: list[int], alone: slot_cpp.GenerationResult) -> None:
    """`got` equals the greedy tokens of `alone`, or parts from them only at a
    near-tie of `alone`'s top two tokens."""
    for k, (a, b) in enumerate(zip(got, alone.tokens)):
        if a != b:
            top = sorted((lp for _, lp in alone.top_logprobs[k]), reverse=True)
            assert top[0] - top[1] < TIE, f"parted at token {k} with a margin of {top[0] - top[1]:.4f}"
            return
    assert len(got) == len(alone.tokens)


def test_threads_decode_together_and_equal_calls_alone(peaked_path: Path):
    with slot_cpp.Model(peaked_path, n_ctx=2048, n_parallel=4) as model:
        alone = []
        for p in PROMPTS:
            alone.append(model.generate(p, max_tokens=16, ignore_eos=True, cache_prompt=False, top_logprobs=2))
        start = model.stats()
        out: list[list[int]] = [[] for _ in PROMPTS]
        go = threading.Barrier(len(PROMPTS))

        def work(i: int) -> None:
            go.wait()
            out[i] = model.generate(PROMPTS[i], max_tokens=16, ignore_eos=True, cache_prompt=False).tokens

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        end = model.stats()
    for got, ref in zip(out, alone):
        assert_same_greedy(got, ref)
    tokens, steps = end.generated_tokens - start.generated_tokens, end.decode_steps - start.decode_steps
    assert tokens == 16 * len(PROMPTS)
    assert tokens > 2 * steps, "the threads' calls were not decoded together"
    assert end.live_sequences == 0 and end.waiting_requests == 0


def test_queue_limit_cancel_and_a_failing_call_leave_others_intact(peaked_path: Path):
    with slot_cpp.Model(peaked_path, n_ctx=1024, n_parallel=1, max_waiting=1) as model:
        holding = threading.Event()
        release = threading.Event()

        def blocking(piece: str) -> bool:
            holding.set()
            release.wait(30)
            return True

        first = {}
        a = threading.Thread(target=lambda: first.setdefault(
            "r", model.generate("Item 1", max_tokens=8, ignore_eos=True, on_text=blocking)))
        a.start()
        assert holding.wait(30)
        # The only sequence is taken; one call may wait, the next is refused at once.
        cancel = threading.Event()
        waited: dict[str, BaseException] = {}

        def waiter() -> None:
            try:
                model.generate("Item 2", max_tokens=8, cancel=cancel)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                waited["e"] = exc

        b = threading.Thread(target=waiter)
        b.start()
        deadline = time.monotonic() + 30
        while model.stats().waiting_requests != 1:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(slot_cpp.QueueFullError, match="waiting"):
            model.generate("Item 3", max_tokens=4)
        cancel.set()  # the waiting call gives up before it gets a sequence
        b.join(30)
        assert isinstance(waited.get("e"), slot_cpp.GenerationCancelled)
        release.set()
        a.join(30)
        assert len(first["r"].tokens) == 8 and first["r"].finish_reason == "length"

        # A callback that raises fails its own call only.
        def boom(piece: str) -> bool:
            raise RuntimeError("callback failed")

        results: dict[str, object] = {}

        def good() -> None:
            results["good"] = model.generate("Item 4", max_tokens=12, ignore_eos=True)

        g = threading.Thread(target=good)
        g.start()
        with pytest.raises(RuntimeError, match="callback failed"):
            model.generate("Item 5", max_tokens=12, ignore_eos=True, on_text=boom)
        g.join(30)
        alone = model.generate("Item 4", max_tokens=12, ignore_eos=True, cache_prompt=False, top_logprobs=2)
        assert_same_greedy(results["good"].tokens, alone)  # type: ignore[attr-defined]
        stats = model.stats()
        assert stats.live_sequences == 0 and stats.waiting_requests == 0 and stats.failed_calls == 2


def test_cancel_stops_a_running_call_and_frees_its_sequence(peaked_path: Path):
    with slot_cpp.Model(peaked_path, n_ctx=4096, n_parallel=2) as model:
        pieces = []
        stop_after = 5

        def on_text(piece: str) -> bool:
            pieces.append(piece)
            return True

        calls = 0

        def cancel() -> bool:
            nonlocal calls
            calls += 1
            return len(pieces) >= stop_after

        with pytest.raises(slot_cpp.GenerationCancelled):
            model.generate("Item 6", max_tokens=3000, ignore_eos=True, on_text=on_text, cancel=cancel)
        assert calls > 0 and stop_after <= len(pieces) < 3000
        assert model.stats().live_sequences == 0
        with pytest.raises(TypeError, match="cancel"):
            model.generate("Item 6", max_tokens=2, cancel="soon")  # type: ignore[arg-type]
        assert len(model.generate("Item 6", max_tokens=4, ignore_eos=True).tokens) == 4
