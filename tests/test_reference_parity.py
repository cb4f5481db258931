"""slot_cpp against the authors' published algorithm run in PyTorch/transformers
on the same weights (a tiny random Qwen2 model)."""

from __future__ import annotations

import numpy as np
import pytest

import torch  # noqa: E402  (a test extra: its absence must fail, not skip)

TEXT = "In the beginning the universe was created. This has made a lot of people very angry."


def torch_slot(model, ids: list[int], *, steps: int, lr: float, n_new: int):
    """The published SLOT loop: hidden states once, W(H + delta) every step, AdamW."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        hidden = model.model(input_ids).last_hidden_state  # after the final norm
    delta = torch.zeros(1, 1, hidden.shape[-1], requires_grad=True)
    opt = torch.optim.AdamW([delta], lr=lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8)
    losses = []
    for _ in range(steps):
        logits = model.lm_head(hidden + delta)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    seq = list(ids)
    new = []
    with torch.no_grad():
        for _ in range(n_new):
            h = model.model(torch.tensor([seq])).last_hidden_state[0, -1]
            tok = int(torch.argmax(model.lm_head(h + delta[0, 0])))
            new.append(tok)
            seq.append(tok)
    return delta.detach()[0, 0].numpy(), losses, new


def test_matches_published_pytorch_slot(tiny_qwen2, tiny_model):
    _, hf = tiny_qwen2
    ids = tiny_model.tokenize(TEXT)
    ref_delta, ref_losses, ref_tokens = torch_slot(hf, ids, steps=5, lr=0.1, n_new=32)
    result = tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=5, lr=0.1, max_tokens=32,
                                           ignore_eos=True)
    cos = float(np.dot(result.delta, ref_delta) / (np.linalg.norm(result.delta) * np.linalg.norm(ref_delta)))
    assert cos > 0.999
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-3)
    assert ref_losses[-1] < ref_losses[0]
    assert result.tokens == ref_tokens


def test_plain_generation_matches_transformers_greedy(tiny_qwen2, tiny_model):
    _, hf = tiny_qwen2
    ids = tiny_model.tokenize(TEXT)
    _, _, ref_tokens = torch_slot(hf, ids, steps=0, lr=0.1, n_new=32)
    result = tiny_model.generate("", prompt_token_ids=ids, max_tokens=32, ignore_eos=True)
    assert result.delta is None and result.losses == []
    assert result.tokens == ref_tokens
