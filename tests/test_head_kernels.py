"""The output-head products of a SLOT step on a Q8_0 head (Gemma's format,
served by dedicated CPU kernels) against float64 NumPy on the dequantised
weights. The tiny model's vocabulary (50257) is not a multiple of the kernels'
row tiles, so the tail rows are covered too."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

TEXT = "Question: A shop sells 7 pens for 3 dollars each and 2 books for 11 dollars each. Total cost?"


@pytest.fixture(scope="module")
def q8(tiny_q8_head):
    path, model = tiny_q8_head
    reader = gguf.GGUFReader(str(path))
    head = next(t for t in reader.tensors if t.name == "output.weight")
    assert head.tensor_type == gguf.GGMLQuantizationType.Q8_0
    weight = gguf.quants.dequantize(np.asarray(head.data), head.tensor_type).astype(np.float64)
    return model, weight


def test_output_matrix_is_the_dequantised_head(q8):
    model, weight = q8
    np.testing.assert_array_equal(model.output_matrix(), weight.astype(np.float32))


def test_w_times_delta_keeps_delta_in_float32(q8):
    model, weight = q8
    rng = np.random.default_rng(11)
    for scale in (1e-3, 1.0):  # a small delta is where rounding it to 8 bits would show
        delta = (scale * rng.standard_normal(weight.shape[1])).astype(np.float32)
        want = weight @ delta.astype(np.float64)
        got = model.logit_bias(delta).astype(np.float64)
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_slot_loss_and_gradient_on_a_q8_head(q8):
    """The cached path's loss and W^T g against float64, from the same prompt logits."""
    model, weight = q8
    tokens = model.tokenize(TEXT)
    _, logits = model.prompt_states(tokens)
    rng = np.random.default_rng(5)
    delta = (0.2 * rng.standard_normal(weight.shape[1])).astype(np.float32)

    z0 = logits[:-1].astype(np.float64)
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

    loss, grad = model.slot_loss_and_gradient(tokens, delta, recompute=False)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 1e-5
