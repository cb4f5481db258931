"""The second real model: SmolLM2-135M-Instruct, a llama-architecture instruct
model with tied embeddings (its head is token_embd.weight, Q8_0 in this Q4_1
file) and a ChatML template in its metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import gguf
import jinja2
import numpy as np
import pytest

import slot_cpp
from slot_cpp import probes

QUESTION = [{"role": "user", "content": "What is 17 * 6? Answer briefly."}]


@pytest.fixture(scope="module")
def smol(smollm2_path: Path) -> Iterator[tuple[slot_cpp.Model, np.ndarray]]:
    reader = gguf.GGUFReader(str(smollm2_path))
    head = next(t for t in reader.tensors if t.name == "token_embd.weight")
    weight = gguf.quants.dequantize(np.asarray(head.data), head.tensor_type).astype(np.float64)
    with slot_cpp.Model(smollm2_path, n_ctx=1024, n_parallel=2) as model:
        yield model, weight


def test_metadata_template_and_head(smol):
    model, weight = smol
    info = model.info
    assert info.architecture == "llama" and info.tied_embeddings and info.has_chat_template
    assert info.head_tensor == "token_embd.weight" and info.head_type == "q8_0" and info.slot_supported
    assert weight.shape == (model.n_vocab, model.n_embd)
    np.testing.assert_array_equal(probes.output_matrix(model), weight.astype(np.float32))
    text = model.apply_chat_template(QUESTION)
    # The GGUF's own template (its default system prompt included), as Jinja2 renders it.
    source = model._chat_templates(None).source
    expected = jinja2.Environment().from_string(source).render(messages=QUESTION, add_generation_prompt=True)
    assert text == expected and text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_chat_generation_with_its_own_template(smol):
    model, _ = smol
    r = model.generate(QUESTION, max_tokens=24)
    assert r.text.strip() and r.finish_reason == "eos"  # ChatML's <|im_end|> ends the turn
    assert "<|im_start|>" not in r.text and "17" in r.text


def reference_loss_and_grad(z: np.ndarray, weight: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(y)
    loss = float(np.mean(-np.log(p[np.arange(n), y])))
    p[np.arange(n), y] -= 1.0
    return loss, weight.T @ p.sum(axis=0) / n


def test_exact_slot_gradient_against_numpy(smol):
    """SLOT's loss and gradient against float64 NumPy on the dequantised head:
    the cached path from the prompt states' logits z0 = W h (z0 + W delta), the
    recompute path from W (h + delta). Both products keep the states in float32
    (llama.cpp's own logits round each 32-value block of them to 8 bits, which
    SmolLM2's outliers make worth up to 0.4 in a logit)."""
    model, weight = smol
    tokens = model.prompt_tokens(QUESTION)
    hidden, logits = probes.prompt_states(model, tokens)
    rng = np.random.default_rng(3)
    delta = (0.05 * rng.standard_normal(model.n_embd)).astype(np.float32)
    y = np.asarray(tokens[1:])
    h = hidden[:-1].astype(np.float64)
    cases = {
        False: h @ weight.T + weight @ delta.astype(np.float64),
        True: (h + delta.astype(np.float64)) @ weight.T,
    }
    # llama.cpp's rounded logits are measurably off the exact ones here.
    assert np.abs(logits[:-1] - h @ weight.T).max() > 0.05
    for recompute, z in cases.items():
        want_loss, want_grad = reference_loss_and_grad(z, weight, y)
        loss, grad = probes.slot_loss_and_gradient(model, tokens, delta, recompute=recompute)
        assert loss == pytest.approx(want_loss, rel=1e-5), recompute
        assert np.linalg.norm(grad - want_grad) / np.linalg.norm(want_grad) < 1e-4, recompute


def test_loss_on_user_content_masks_the_template(smol):
    model, _ = smol
    tokens, mask = model.user_loss_mask(QUESTION)
    assert len(mask) == len(tokens) - 1
    pieces = [model._s().token_piece(t).decode() for t in tokens]
    # Targets inside the content after its first token; never a template token.
    targets = "".join(p for p, m in zip(pieces[1:], mask) if m)
    assert targets == " is 17 * 6? Answer briefly."
    assert not any(m for p, m in zip(pieces[1:], mask) if p.startswith("<|") or p in ("user", "assistant"))
    full = model.generate_with_slot(QUESTION, steps=3, lr=0.01, max_tokens=0, cache_prompt=False)
    user = model.generate_with_slot(QUESTION, steps=3, lr=0.01, max_tokens=0, cache_prompt=False, loss_on="user")
    assert user.steps_done == 3 and user.losses[0] != pytest.approx(full.losses[0])
    assert user.losses[-1] < user.losses[0]
    # The masked loss at delta = 0 is the mean NLL of the selected targets.
    lp = probes.token_logprobs(model, tokens, 1)
    selected = [-lp[t] for t in range(len(mask)) if mask[t]]
    assert user.losses[0] == pytest.approx(float(np.mean(selected)), rel=1e-3)
    batch = model.generate_batch([QUESTION, "raw"], steps=3, lr=0.01, max_tokens=0, loss_on=["user", "all"],
                                 cache_prompt=False)
    assert batch[0].losses[0] == pytest.approx(user.losses[0], rel=1e-4)
    with pytest.raises(ValueError, match="chat messages"):
        model.generate_with_slot("raw text", steps=1, max_tokens=1, loss_on="user")
    with pytest.raises(ValueError, match="loss_on"):
        model.generate_with_slot(QUESTION, steps=1, max_tokens=1, loss_on="answer")


def test_prompt_logits_batch_by_batch_and_chunk_by_chunk(smollm2_path):
    """SLOT writes each batch's prompt logits into its cache rows and normalises them there. With a
    budget that takes the prompt 10 rows at a time (rows written at offsets) it learns bit for bit
    the delta of one whole batch (deterministic mode: llama.cpp's states do not depend on the
    batches either). SmolLM2's 576-wide states also take the head product over several column
    chunks, carried on from chunk to chunk: exact and the same for a row alone."""
    with slot_cpp.Model(smollm2_path, n_ctx=512, n_parallel=1, deterministic=True) as model:
        ids = model.tokenize("Question: A shop sells 7 pens for 3 dollars each and 2 books for 11 dollars "
                             "each. What is the total cost? Answer: 7 * 3 = 21 and 2 * 11 = 22.")
        assert len(ids) > 30
        common = dict(prompt_token_ids=ids, steps=3, lr=0.05, max_tokens=0, cache_prompt=False,
                      cache_precision="float32")
        whole = model.generate_with_slot("", **common)
        batched = model.generate_with_slot("", memory_budget=16 << 20, **common)  # 10 rows a batch
        assert whole.slot_path == batched.slot_path == "cached"
        np.testing.assert_array_equal(batched.losses, whole.losses)
        np.testing.assert_array_equal(batched.delta, whole.delta)

        hidden, _ = probes.prompt_states(model, ids)
        weight = probes.output_matrix(model).astype(np.float64)
        together = probes.head_logits(model, hidden)
        want = hidden.astype(np.float64) @ weight.T
        assert np.abs(together - want).max() <= 1e-5 * np.abs(want).max()
        np.testing.assert_array_equal(probes.head_logits(model, hidden[7:8]), together[7:8])
