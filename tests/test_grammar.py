"""Constrained decoding: a GBNF grammar (or a JSON schema, converted by
llama.cpp's json-schema-to-grammar) masks the tokens it refuses before each
draw. Definition: the draw is from the penalised logits with the refused tokens
at -inf, then temperature and truncation, as without a grammar; logprobs
report the masked, renormalised distribution before temperature."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydantic import BaseModel, Field
from scipy import stats

import slot_cpp
from slot_cpp.rtd import RTD, Datastore
from slot_cpp import probes

DIGITS = 'root ::= [0-9]+'
PROMPT = "The weather today is"


def _allowed_first(model: slot_cpp.Model) -> np.ndarray:
    """Tokens the digits grammar allows first: pieces made of ASCII digits only."""
    ok = np.zeros(model.n_vocab, dtype=bool)
    for t in range(model.n_vocab):
        piece = model.token_piece(t)
        ok[t] = bool(piece) and all(48 <= b <= 57 for b in piece)
    return ok


def _expected(z: np.ndarray, allowed: np.ndarray, temperature: float, top_k: int, *,
              mask_first: bool = True) -> np.ndarray:
    """The draw's distribution: mask, then temperature and top-k (mask_first=False
    is the wrong order: truncate the unmasked logits, then mask)."""
    z = z.astype(np.float64) / temperature
    keep = allowed.copy()
    if mask_first:
        order = np.argsort(-np.where(allowed, z, -np.inf), kind="stable")
        if top_k:
            keep = np.zeros_like(allowed)
            keep[order[:top_k]] = True
            keep &= allowed
    else:
        order = np.argsort(-z, kind="stable")
        keep = np.zeros_like(allowed)
        keep[order[:top_k]] = True
        keep &= allowed
    p = np.where(keep, np.exp(z - z[keep].max() if keep.any() else z), 0.0)
    return p / p.sum() if p.sum() > 0 else p


def _pvalue(draws: list[int], p: np.ndarray) -> float:
    """Chi-square of the draws against p, over p's likely tokens and the rest pooled."""
    counts = np.bincount(draws, minlength=len(p)).astype(np.float64)
    n = len(draws)
    if p.sum() == 0 or counts[p == 0].sum() > 0:
        return 0.0
    big = p * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(p[big] * n, p[~big].sum() * n)
    keep = expected > 0
    return float(stats.chisquare(observed[keep], expected[keep]).pvalue)


@pytest.mark.parametrize("setting", [
    dict(temperature=0.8, top_k=5, top_p=1.0, min_p=0.0),    # top-k: the highest allowed tokens
    dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0),    # no truncation: draw, redraw if refused
])
def test_first_token_follows_the_masked_renormalised_softmax(tiny_model, setting):
    ids = tiny_model.tokenize(PROMPT)
    _, logits = probes.prompt_states(tiny_model, ids)
    z = logits[-1]
    allowed = _allowed_first(tiny_model)
    assert allowed.sum() > 10 and not allowed[np.argsort(-z)[:5]].all()
    results = tiny_model.generate_batch([PROMPT], n=3000, max_tokens=1, grammar=DIGITS, seed=11, **setting)
    draws = [r.tokens[0] for r in results]
    assert all(allowed[d] for d in draws)
    want = _expected(z, allowed, setting["temperature"], setting["top_k"])
    assert _pvalue(draws, want) > 1e-3
    if setting["top_k"]:
        # Truncating first and masking after keeps none of the digits here: rejected.
        wrong = _expected(z, allowed, setting["temperature"], setting["top_k"], mask_first=False)
        assert _pvalue(draws, wrong) < 1e-6
    else:
        # A fast path that, when the unconstrained draw is refused, takes the
        # best allowed token instead of redrawing from the masked logits: rejected.
        free = _expected(z, np.ones_like(allowed), setting["temperature"], 0)
        wrong = np.where(allowed, free, 0.0)
        wrong[int(np.argmax(np.where(allowed, z, -np.inf)))] += 1.0 - wrong.sum()
        assert _pvalue(draws, wrong) < 1e-6


def test_logprobs_report_the_masked_distribution(tiny_model):
    ids = tiny_model.tokenize(PROMPT)
    _, logits = probes.prompt_states(tiny_model, ids)
    allowed = _allowed_first(tiny_model)
    z = np.where(allowed, logits[-1].astype(np.float64), -np.inf)
    logp = z - z[allowed].max() - np.log(np.exp(z[allowed] - z[allowed].max()).sum())
    r = tiny_model.generate(PROMPT, max_tokens=1, grammar=DIGITS, logprobs=True, top_logprobs=3)
    t = r.tokens[0]
    assert t == int(np.argmax(z))
    assert r.token_logprobs[0] == pytest.approx(logp[t], abs=1e-4)
    top = np.argsort(-z, kind="stable")[:3]
    assert [tok for tok, _ in r.top_logprobs[0]] == top.tolist()


GBNF = r'''root ::= ("yes" | "no") ", because " [a-z ]{1,24} "."'''
PATTERN = re.compile(r"(yes|no), because [a-z ]{1,24}\.")


class Verdict(BaseModel):
    answer: str = Field(max_length=16)
    confidence: int = Field(ge=0, le=100)


def test_every_sample_follows_the_grammar_with_slot_and_rtd(gemma):
    store = Datastore.build(gemma, [{"prompt": "Is the sky blue?", "completion": " yes, because it is."}],
                            progress=False)
    prompts = ["Question: Is the sky blue?\nAnswer:", "Question: Do fish fly?\nAnswer:"]
    for seed in (1, 2):
        results = gemma.generate_batch(prompts, n=2, max_tokens=40, temperature=1.0, top_k=0, top_p=1.0,
                                       min_p=0.0, seed=seed, grammar=GBNF, steps=2, lr=0.01,
                                       rtd=RTD(store, k=1, lam=0.3), cache_prompt=False)
        for r in results:
            assert PATTERN.fullmatch(r.text), r.text
            assert r.finish_reason == "eos" and r.steps_done == 2
    results = gemma.generate_batch(prompts, n=2, max_tokens=48, temperature=0.7, seed=3, json_schema=Verdict,
                                   steps=2, lr=0.01)
    for r in results:
        Verdict.model_validate_json(r.text)
        assert r.finish_reason == "eos"
    # The same schema as a mapping and as JSON text, through stream().
    schema = Verdict.model_json_schema()
    text = "".join(gemma.stream(prompts[0], max_tokens=48, json_schema=json.dumps(schema), cache_prompt=False))
    assert text == gemma.generate_with_slot(prompts[0], max_tokens=48, json_schema=schema, cache_prompt=False).text
    Verdict.model_validate_json(text)


def test_a_response_prefix_continues_inside_the_grammar(tiny_model):
    prefix = tiny_model.tokenize("12", add_special=False)
    r = tiny_model.generate(PROMPT, max_tokens=4, grammar=DIGITS, response_prefix=prefix, temperature=0.9,
                            top_k=0, top_p=1.0, min_p=0.0)
    assert re.fullmatch(r"[0-9]*", r.text)
    with pytest.raises(ValueError, match="response prefix leaves the grammar"):
        tiny_model.generate(PROMPT, max_tokens=2, grammar=DIGITS,
                            response_prefix=tiny_model.tokenize("ab", add_special=False))


@pytest.mark.parametrize("kwargs, match", [
    (dict(grammar="root ::= undefined-rule"), "grammar"),
    (dict(grammar="no rules here"), "grammar"),
    (dict(grammar="   "), "grammar is empty"),
    (dict(grammar=7), "grammar must be GBNF text"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema={"$ref": "#/definitions/missing"}), "json_schema"),
    (dict(json_schema=[1, 2]), "json_schema must be a JSON schema"),
    (dict(grammar=DIGITS, json_schema={"type": "object"}), "not both"),
])
def test_bad_grammar_or_schema_is_a_clear_error_and_the_model_lives(tiny_model, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_model.generate(PROMPT, max_tokens=2, **kwargs)
    assert len(tiny_model.generate(PROMPT, max_tokens=2, ignore_eos=True).tokens) == 2
