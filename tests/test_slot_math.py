"""SLOT's numerics against independent float64 statements of the method,
on a tiny random model run by llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import open_with_portable_head_ops
from reference import slot_adamw, slot_loss, slot_loss_and_grad
from slot_cpp import probes

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine, they said."


@pytest.fixture(scope="module")
def states(tiny_model):
    tokens = tiny_model.tokenize(TEXT)
    hidden, logits = probes.prompt_states(tiny_model, tokens)
    weight = probes.output_matrix(tiny_model)
    return tokens, hidden, logits, weight


@pytest.fixture(scope="module", params=["cpu-kernels", "portable-ops"])
def head_model(request, tiny_model, tiny_path):
    """The tiny model with SLOT's head products on the CPU kernels, and on the
    portable ggml ops that GPU backends use."""
    if request.param == "cpu-kernels":
        yield tiny_model
        return
    model = open_with_portable_head_ops(tiny_path)
    yield model
    model.close()


def test_slot_backend_names_the_code_path(head_model, tiny_model, states):
    weight = states[3]
    backend = head_model.slot_backend
    if head_model is tiny_model:
        assert backend == "CPU (CPU head kernels)"
        return
    mib = round(weight.size * 4 / 2**20)  # a float32 head gets a float32 transposed copy
    assert backend == f"CPU (portable ggml ops; transposed head copy {mib} MiB)"


def test_engine_hidden_states_reproduce_its_logits(states):
    tokens, hidden, logits, weight = states
    assert hidden.shape == (len(tokens), weight.shape[1])
    np.testing.assert_allclose(hidden @ weight.T, logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("recompute", [False, True], ids=["cached", "recompute"])
def test_gradient_matches_central_differences(head_model, states, recompute):
    tokens, hidden, _, weight = states
    rng = np.random.default_rng(7)
    delta = (0.3 * rng.standard_normal(weight.shape[1])).astype(np.float32)
    loss, grad = probes.slot_loss_and_gradient(head_model, tokens, delta, recompute=recompute)

    h = 1e-4
    fd = np.empty(weight.shape[1])
    d64 = delta.astype(np.float64)
    for i in range(weight.shape[1]):
        e = np.zeros_like(d64)
        e[i] = h
        fd[i] = (slot_loss(hidden, weight, tokens, d64 + e) - slot_loss(hidden, weight, tokens, d64 - e)) / (2 * h)
    assert loss == pytest.approx(slot_loss(hidden, weight, tokens, d64), rel=1e-5)
    assert np.linalg.norm(grad - fd) / np.linalg.norm(fd) < 1e-4
    assert np.linalg.norm(fd) > 1e-3  # the check is not vacuous


def test_optimiser_matches_numpy_adamw(head_model, states):
    tokens, hidden, _, weight = states
    ref_delta, ref_losses = slot_adamw(hidden, weight, tokens, steps=5, lr=0.1)
    result = head_model.generate_with_slot("", prompt_token_ids=tokens, steps=5, lr=0.1, max_tokens=0)
    assert result.steps_done == 5 and result.slot_status == "completed" and result.slot_path == "cached"
    assert result.delta is not None and result.delta.dtype == np.float32
    rel = np.linalg.norm(result.delta - ref_delta) / np.linalg.norm(ref_delta)
    assert rel < 1e-5
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-5)


def test_recompute_path_and_memory_fallback_agree_with_cached(head_model, states):
    tokens = states[0]
    common = dict(prompt_token_ids=tokens, steps=5, lr=0.05, max_tokens=0)
    cached = head_model.generate_with_slot("", **common)
    forced = head_model.generate_with_slot("", recompute=True, **common)
    # A budget too small for a float32 cache falls back to recomputation by
    # itself (with cache_precision="auto" it takes the bounded cache instead).
    squeezed = head_model.generate_with_slot("", memory_budget=1 << 20, cache_precision="float32", **common)
    assert cached.slot_path == "cached"
    assert forced.slot_path == "recompute" and squeezed.slot_path == "recompute"
    assert head_model.generate_with_slot("", memory_budget=1 << 20, **common).slot_path == "bounded"
    for other in (forced, squeezed):
        assert np.linalg.norm(other.delta - cached.delta) / np.linalg.norm(cached.delta) < 1e-4
        np.testing.assert_allclose(other.losses, cached.losses, rtol=1e-5)


def test_generation_applies_delta_as_logit_bias(head_model, tiny_model, states):
    tokens, hidden, _, weight = states
    rng = np.random.default_rng(3)
    delta = rng.standard_normal(weight.shape[1]).astype(np.float32)
    np.testing.assert_allclose(probes.logit_bias(head_model, delta), weight @ delta, rtol=1e-4, atol=1e-4)
    # Greedy decoding with delta must follow argmax of W(h + delta) at each step.
    result = head_model.generate("", prompt_token_ids=tokens, delta=delta, max_tokens=6, ignore_eos=True)
    seq = list(tokens)
    for tok in result.tokens:
        h, _ = probes.prompt_states(tiny_model, seq)
        assert tok == int(np.argmax(weight @ (h[-1] + delta)))
        seq.append(tok)


def test_loss_helpers_agree():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((6, 8))
    weight = rng.standard_normal((11, 8))
    tokens = [1, 4, 2, 9, 3, 0]
    delta = rng.standard_normal(8)
    loss, _ = slot_loss_and_grad(hidden, weight, tokens, delta)
    assert loss == pytest.approx(slot_loss(hidden, weight, tokens, delta), rel=1e-12)


def test_token_logprobs_match_float64_log_softmax(tiny_model, states):
    tokens, hidden, _, weight = states
    delta = np.random.default_rng(0).standard_normal(weight.shape[1]).astype(np.float32)
    for d in (None, delta):
        got = probes.token_logprobs(tiny_model, tokens, 3, d)
        h = hidden.astype(np.float64) + (0.0 if d is None else d.astype(np.float64))
        z = h @ weight.astype(np.float64).T
        m = z.max(axis=1)
        lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
        rows = np.arange(2, len(tokens) - 1)
        want = z[rows, np.asarray(tokens)[rows + 1]] - lse[rows]
        np.testing.assert_allclose(got, want, atol=1e-4)
