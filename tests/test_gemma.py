"""The real model: Gemma 3 270M Q4_K_M, the embedded default."""

from __future__ import annotations

import numpy as np

import slot_cpp
from conftest import PROMPT
from slot_cpp import probes


def test_default_build_runs_gemma_with_default_parameters(gemma_path):
    # Native builds on AMX CPUs crashed in ggml's AMX matmul on this model;
    # slot_cpp builds without AMX and must run with every default.
    assert "AMX_INT8 = 1" not in slot_cpp.system_info()
    with slot_cpp.Model(gemma_path) as model:
        result = model.generate_with_slot(PROMPT, max_tokens=8)
    assert result.generated_tokens > 0 and result.text.strip()


def test_slot_five_steps_lowers_loss_every_step(gemma):
    result = gemma.generate_with_slot(PROMPT, steps=5, lr=0.1, max_tokens=24)
    assert result.steps_done == 5 and len(result.losses) == 5
    assert all(b < a for a, b in zip(result.losses, result.losses[1:]))
    assert result.delta is not None and result.delta.shape == (gemma.n_embd,)
    assert np.linalg.norm(result.delta) > 0
    assert result.text.strip()
    assert result.timings.prefill > 0 and result.timings.optimise > 0 and result.timings.generate > 0


def test_plain_generation_produces_text(gemma):
    result = gemma.generate(PROMPT, max_tokens=24)
    assert result.text.strip() and result.steps_done == 0 and result.delta is None


def test_steps_zero_equals_plain_llama_cpp_greedy(gemma):
    tokens = gemma.tokenize(PROMPT)
    reference, _ = probes.reference_greedy(gemma, tokens, 32)
    # Evaluated whole, as the reference is (a cached prefix from another test would change the batch shapes).
    result = gemma.generate(PROMPT, max_tokens=32, cache_prompt=False)
    assert result.tokens == reference[: len(result.tokens)]
    assert len(result.tokens) == len(reference)


def test_same_seed_same_output_when_sampling(gemma):
    kwargs = dict(steps=3, lr=0.05, max_tokens=24, temperature=0.9, top_k=0, top_p=1.0, min_p=0.0)
    a = gemma.generate_with_slot(PROMPT, seed=11, **kwargs)
    b = gemma.generate_with_slot(PROMPT, seed=11, **kwargs)
    c = gemma.generate_with_slot(PROMPT, seed=12, **kwargs)
    assert a.tokens == b.tokens and a.text == b.text
    np.testing.assert_array_equal(a.delta, b.delta)
    assert a.tokens != c.tokens  # the seed does reach the sampler


def test_delta_changes_the_answer_and_can_be_reused(gemma):
    learned = gemma.generate_with_slot(PROMPT, steps=5, lr=0.1, max_tokens=16)
    reused = gemma.generate(PROMPT, delta=learned.delta, max_tokens=16)
    assert reused.tokens == learned.tokens


def test_streaming_pieces_join_to_the_text(gemma):
    pieces: list[str] = []
    result = gemma.generate_with_slot(PROMPT, steps=2, lr=0.05, max_tokens=20, on_text=pieces.append)
    assert "".join(pieces) == result.text
    stream = gemma.stream(PROMPT, steps=2, lr=0.05, max_tokens=20)
    assert "".join(stream) == result.text
    assert stream.result is not None and stream.result.tokens == result.tokens


def test_stop_string_truncates(gemma):
    full = gemma.generate(PROMPT, max_tokens=24)
    word = full.text.strip().split()[0]
    cut = gemma.generate(PROMPT, max_tokens=24, stop=[word])
    assert cut.finish_reason == "stop" and word not in cut.text
    assert full.text.startswith(cut.text)
