"""SLOT's loss window: the loss over the last N predictions only, and the
output head evaluated at those positions alone."""

from __future__ import annotations

import numpy as np
import pytest

from reference import slot_adamw
from slot_cpp import probes

TEXT = "In the beginning the universe was created. This has made a lot of people very angry and been widely " \
       "regarded as a bad move."


@pytest.mark.parametrize("recompute", [False, True])
def test_window_is_slot_on_the_last_predictions(tiny_model, recompute):
    ids = tiny_model.tokenize(TEXT)
    rows = len(ids) - 1
    window = 7
    result = tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=4, lr=0.05, loss_window=window,
                                           max_tokens=0, recompute=recompute, cache_prompt=False)
    hidden, _ = probes.prompt_states(tiny_model, ids)
    weight = probes.output_matrix(tiny_model)
    # The window's predictions: states rows-window .. rows-1, targets the tokens after them.
    start = rows - window
    ref_delta, ref_losses = slot_adamw(hidden[start:], weight, ids[start:], steps=4, lr=0.05)
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.delta, ref_delta, rtol=1e-3, atol=1e-5)
    # The whole-prompt loss is another problem: the window changes what is learned.
    whole, _ = slot_adamw(hidden, weight, ids, steps=4, lr=0.05)
    assert not np.allclose(result.delta, whole, rtol=1e-3, atol=1e-5)


def test_window_wider_than_the_prompt_is_the_whole_prompt(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    wide = tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=3, lr=0.05, loss_window=10_000,
                                         max_tokens=0)
    whole = tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=3, lr=0.05, max_tokens=0)
    np.testing.assert_array_equal(wide.delta, whole.delta)


def test_the_head_runs_only_at_the_window(tiny_model):
    ids = tiny_model.tokenize(TEXT)
    rows = len(ids) - 1

    def head_rows(**kwargs):
        before = tiny_model.logit_rows
        tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=2, lr=0.05, max_tokens=0,
                                      cache_prompt=False, **kwargs)
        return tiny_model.logit_rows - before

    # Every loss position, then the last prompt token alone.
    assert head_rows() == rows + 1
    assert head_rows(loss_window=5) == 5 + 1
    assert head_rows(loss_window=5, recompute=True) == 5 + 1


def test_bad_window_is_refused(tiny_model):
    with pytest.raises(ValueError, match="loss_window"):
        tiny_model.generate_with_slot("hello there", loss_window=0, max_tokens=1)
    with pytest.raises(TypeError, match="loss_window"):
        tiny_model.generate_with_slot("hello there", loss_window=2.5, max_tokens=1)


FEW_SHOT = ("Question: Ann has 2 pens and buys 3 more. How many pens?\nAnswer: 2 + 3 = 5. Then 5 - 1 = 4. #### 4"
            "\n\nQuestion: Bo has 4 bags of 6 apples. How many apples?\nAnswer:")


def test_loss_on_last_is_slot_on_the_last_block(tiny_model):
    ids = tiny_model.tokenize(FEW_SHOT)
    pieces = [tiny_model._s().token_piece(t) for t in ids]
    mask = tiny_model.last_block_loss_mask(ids)
    # The targets are the last block's tokens after its first one, and nothing of the exemplar.
    targets = b"".join(p for p, m in zip(pieces[1:], mask) if m).decode()
    block = FEW_SHOT.rpartition("\n\n")[2]
    assert block.endswith(targets) and len(targets) >= len(block) - 10 and "Ann" not in targets
    assert mask == sorted(mask)   # a suffix of the predictions
    start = mask.index(True)
    result = tiny_model.generate_with_slot(FEW_SHOT, steps=4, lr=0.05, loss_on="last", max_tokens=0,
                                           cache_prompt=False)
    hidden, _ = probes.prompt_states(tiny_model, ids)
    weight = probes.output_matrix(tiny_model)
    ref_delta, ref_losses = slot_adamw(hidden[start:], weight, ids[start:], steps=4, lr=0.05)
    np.testing.assert_allclose(result.losses, ref_losses, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result.delta, ref_delta, rtol=1e-3, atol=1e-5)
    whole, _ = slot_adamw(hidden, weight, ids, steps=4, lr=0.05)
    assert not np.allclose(result.delta, whole, rtol=1e-3, atol=1e-5)
    # Token ids, a batch and lr="auto" take the same mask.
    by_ids = tiny_model.generate_with_slot("", prompt_token_ids=ids, steps=4, lr=0.05, loss_on="last",
                                           max_tokens=0, cache_prompt=False)
    np.testing.assert_array_equal(by_ids.delta, result.delta)
    batch = tiny_model.generate_batch([FEW_SHOT, ids], steps=4, lr=0.05, loss_on=["all", "last"], max_tokens=0,
                                      cache_prompt=False)
    np.testing.assert_array_equal(batch[1].delta, result.delta)
    auto_last = tiny_model.generate_with_slot(FEW_SHOT, steps=3, lr="auto", loss_on="last", max_tokens=0)
    auto_window = tiny_model.generate_with_slot(FEW_SHOT, steps=3, lr="auto", loss_window=len(mask) - start,
                                                max_tokens=0)
    assert auto_last.lr == pytest.approx(auto_window.lr, rel=1e-5)


def test_loss_on_last_needs_a_last_block(tiny_model):
    # No blank line: the whole prompt is the block.
    ids = tiny_model.tokenize(TEXT)
    assert all(tiny_model.last_block_loss_mask(ids)[1:])
    with pytest.raises(ValueError, match="last block"):
        tiny_model.generate_with_slot(TEXT + "\n\nQ", steps=1, lr=0.05, loss_on="last", max_tokens=1)
