"""Model.embed: pooled final hidden states, against pooling prompt_states by hand."""

from __future__ import annotations

import numpy as np
import pytest

from slot_cpp import probes

TEXTS = ["The quick brown fox jumps over the lazy dog.", "A second, rather different sentence.", "Short."]


def test_embed_equals_pooling_the_states_by_hand(tiny_model):
    out = tiny_model.embed(TEXTS)
    assert out.shape == (3, tiny_model.n_embd) and out.dtype == np.float32
    for text, row in zip(TEXTS, out):
        states, _ = probes.prompt_states(tiny_model, tiny_model.tokenize(text))
        mean = states.astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)
        last = tiny_model.embed(text, pooling="last", normalize=False)[0]
        np.testing.assert_allclose(last, states[-1], rtol=1e-4, atol=1e-5)
    # A batch equals one text at a time, within rounding.
    alone = np.stack([tiny_model.embed(t)[0] for t in TEXTS])
    np.testing.assert_allclose(out, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_bad_embedding_input_is_refused(tiny_model):
    with pytest.raises(ValueError, match="pooling"):
        tiny_model.embed("x", pooling="max")
    with pytest.raises(ValueError, match="empty"):
        tiny_model.embed([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny_model.embed([[1, 10**9]])
