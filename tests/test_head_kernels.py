"""The output-head products of a SLOT step on a Q8_0 head (Gemma's format)
against float64 NumPy on the dequantised weights: with the dedicated CPU
kernels, and with the portable ggml ops of GPU backends (which round delta to
8 bits in W*delta and keep a float16 transposed head for W^T g). The tiny
model's vocabulary (50257) is not a multiple of the kernels' row tiles, so the
tail rows are covered too."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from conftest import open_with_portable_head_ops
from slot_cpp import probes

TEXT = "Question: A shop sells 7 pens for 3 dollars each and 2 books for 11 dollars each. Total cost?"


# Relative tolerances: (W*delta against max |W*delta|, loss, gradient norm).
TOLERANCE = {"cpu-kernels": (1e-5, 1e-5, 1e-5), "portable-ops": (2e-2, 1e-4, 3e-3)}


@pytest.fixture(scope="module", params=["cpu-kernels", "portable-ops"])
def q8(request, tiny_q8_head):
    path, model = tiny_q8_head
    reader = gguf.GGUFReader(str(path))
    head = next(t for t in reader.tensors if t.name == "output.weight")
    assert head.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = gguf.quants.dequantize(np.asarray(head.data), head.tensor_type).astype(np.float64)
    if request.param == "cpu-kernels":
        assert model.slot_backend == "CPU (CPU head kernels)"
        yield model, weight, TOLERANCE[request.param]
        return
    portable = open_with_portable_head_ops(path)
    mib = round(weight.size * 2 / 2**20)  # float16 transposed copy
    assert portable.slot_backend == f"CPU (portable ggml ops; transposed head copy {mib} MiB)"
    yield portable, weight, TOLERANCE[request.param]
    portable.close()


def test_output_matrix_is_the_dequantised_head(q8):
    model, weight, _ = q8
    np.testing.assert_array_equal(probes.output_matrix(model), weight.astype(np.float32))


def test_w_times_delta(q8):
    model, weight, (tol, _, _) = q8
    rng = np.random.default_rng(11)
    for scale in (1e-3, 1.0):  # a small delta is where rounding it to 8 bits would show
        delta = (scale * rng.standard_normal(weight.shape[1])).astype(np.float32)
        want = weight @ delta.astype(np.float64)
        got = probes.logit_bias(model, delta).astype(np.float64)
        assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_slot_loss_and_gradient_on_a_q8_head(q8):
    """The cached path's loss and W^T g against float64. Its prompt logits: W h from the states in
    float32 with the CPU kernels; llama.cpp's (each block of h rounded to 8 bits) with portable ops."""
    model, weight, (_, loss_tol, grad_tol) = q8
    tokens = model.tokenize(TEXT)
    hidden, logits = probes.prompt_states(model, tokens)
    rng = np.random.default_rng(5)
    delta = (0.2 * rng.standard_normal(weight.shape[1])).astype(np.float32)

    own_head = model.slot_backend == "CPU (CPU head kernels)"
    z0 = hidden[:-1].astype(np.float64) @ weight.T if own_head else logits[:-1].astype(np.float64)
    z = z0 + weight @ delta.astype(np.float64)  # log p0 + b, up to a per-row constant
    z -= z.max(axis=1, keepdims=True)
    q = np.exp(z)
    q /= q.sum(axis=1, keepdims=True)
    y = np.asarray(tokens[1:])
    n = len(y)
    want_loss = float(np.mean(-np.log(q[np.arange(n), y])))
    r = q.sum(axis=0)
    np.subtract.at(r, y, 1.0)
    want_grad = weight.T @ (r / n)

    loss, grad = probes.slot_loss_and_gradient(model, tokens, delta, recompute=False)
    assert loss == pytest.approx(want_loss, rel=loss_tol)
    assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < grad_tol


def test_prompt_logits_are_exact_and_batch_invariant(tiny_q8_head):
    """SLOT's own prompt logits on the CPU: W h in float32 within 1e-5 of float64, and each row's
    logits bit for bit the same whether it is computed alone or among others (37 rows: neither a
    multiple of the kernel's tiles of rows nor of its groups of vocabulary rows, 50257)."""
    path, model = tiny_q8_head
    assert model.slot_backend == "CPU (CPU head kernels)"
    reader = gguf.GGUFReader(str(path))
    head = next(t for t in reader.tensors if t.name == "output.weight")
    weight = gguf.quants.dequantize(np.asarray(head.data), head.tensor_type).astype(np.float64)
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((37, weight.shape[1])).astype(np.float32)
    together = probes.head_logits(model, hidden)
    want = hidden.astype(np.float64) @ weight.T
    assert together.shape == want.shape
    assert np.abs(together - want).max() <= 1e-5 * np.abs(want).max()
    for rows in (hidden[:1], hidden[5:18], hidden[36:]):
        alone = probes.head_logits(model, rows)
        first = int(np.flatnonzero((hidden == rows[0]).all(axis=1))[0])
        np.testing.assert_array_equal(alone, together[first:first + len(rows)])
    with pytest.raises(ValueError, match="shape"):
        probes.head_logits(model, hidden[:, :-1])
