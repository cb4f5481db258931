"""RTD's query-dependent gate (native, against its NumPy formula; closed far
from the datastore, open near it) and the cross-validated tuner (keeps the
plain model on noise, finds real signal)."""

from __future__ import annotations

import numpy as np
import pytest

import slot_cpp
from slot_cpp import rtd
from slot_cpp.rtd import RTD, Datastore
from slot_cpp.rtd.tuning import _nearest, _reference_top, gate_lambda


@pytest.fixture(scope="module")
def peaked(peaked_path):
    model = slot_cpp.Model(peaked_path, n_ctx=512, n_threads=2, n_parallel=4)
    yield model
    model.close()


def _scored(store, n_vocab):
    """The tokens a test scores: every value of the datastore and 64 others
    (log-probabilities are of the whole distribution, so a subset will do)."""
    others = np.random.default_rng(0).choice(n_vocab, 64, replace=False)
    return sorted(set(np.asarray(store.values).tolist()) | set(others.tolist()))


def _blend_by_hand(model, store, prompt, k, temperature, lam, gate, scale):
    """The gated blend from the plain state and plain distribution, in NumPy."""
    vocab = _scored(store, model.n_vocab)
    base = model.generate(prompt, max_tokens=0, score_tokens=vocab, return_hidden=True, cache_prompt=False)
    dist, ids = store.search(model, np.asarray(base.hidden)[None], k)
    r = store.reference(model, base.hidden, k=k, temperature=temperature)
    r_vec = np.array([r.get(v, 0.0) for v in vocab])
    near = dist[0, :, 0].astype(np.float64).sum() / scale
    lam_q = float(gate_lambda(lam, gate, np.array([near]), np.array([max(r.values())]))[0])
    p = np.exp(np.asarray(base.score_logprobs, np.float64))
    return lam_q * r_vec + (1 - lam_q) * p, p, lam_q, near


def test_gate_blend_equals_its_formula_and_fixed_lambda_ignores_it(peaked):
    rows = [{"prompt": "Numbers: 1, 2, 3,", "completion": " 4, 5, 6, 7, 8"}]
    store = Datastore.build(peaked, rows, progress=False)
    scale = store.defaults["distance_scale"]
    vocab = _scored(store, peaked.n_vocab)
    prompt = "Count: 1, 2,"
    _, _, _, near = _blend_by_hand(peaked, store, prompt, 4, 50.0, 0.8, rtd.DEFAULT_GATE, scale)
    # Weights that put this query's gate near half-way, where an error in
    # any of its terms shows.
    gate = {"bias": 0.4 + 1.5 * near - 0.7, "distance": -1.5, "top_mass": 0.7}
    store.defaults["gate"] = gate
    want, p, lam_q, _ = _blend_by_hand(peaked, store, prompt, 4, 50.0, 0.8, gate, scale)
    assert 0.2 < lam_q < 0.7
    got = peaked.generate(prompt, max_tokens=0, score_tokens=vocab, rtd=RTD(store, k=4, temperature=50.0, lam=0.8),
                          cache_prompt=False)
    np.testing.assert_allclose(np.exp(np.asarray(got.score_logprobs)), want, rtol=1e-4, atol=1e-7)
    # The gate is on because the datastore has one; off, the request blends with lambda itself.
    fixed = peaked.generate(prompt, max_tokens=0, score_tokens=vocab, cache_prompt=False,
                            rtd=RTD(store, k=4, temperature=50.0, lam=0.8, gate=False))
    r = store.reference(peaked, np.asarray(peaked.generate(prompt, max_tokens=0, return_hidden=True,
                                                           cache_prompt=False).hidden), k=4, temperature=50.0)
    r_vec = np.array([r.get(v, 0.0) for v in vocab])
    np.testing.assert_allclose(np.exp(np.asarray(fixed.score_logprobs)), 0.8 * r_vec + 0.2 * p, rtol=1e-4, atol=1e-7)
    assert np.abs(np.exp(np.asarray(fixed.score_logprobs)) - want).max() > 1e-3
    # Fixed lambda is the blend as before, bit for bit: a datastore without a
    # gate (a file written before gates) gives the same logits as gate=False.
    old = Datastore(keys=store.keys, values=store.values, mode="generation", heads=1,
                    fingerprint=store.fingerprint, defaults={"k": 4, "temperature": 50.0, "lam": 0.8})
    before = peaked.generate(prompt, max_tokens=0, score_tokens=vocab, rtd=old, cache_prompt=False)
    assert before.score_logprobs == fixed.score_logprobs
    # Generation with the gate equals the NumPy NLL of generation_nll (same formula).
    plain_nll, gated_nll = rtd.generation_nll(peaked, store, rows, rtd=RTD(store, k=4, temperature=50.0, lam=0.8))
    tokens = peaked.tokenize(rows[0]["prompt"]) + peaked.tokenize(rows[0]["completion"], add_special=False)
    n_p = len(peaked.tokenize(rows[0]["prompt"]))
    nll = []
    for t in range(n_p, len(tokens)):
        res = peaked.generate("", prompt_token_ids=tokens[:t], max_tokens=0, score_tokens=[tokens[t]],
                              rtd=RTD(store, k=4, temperature=50.0, lam=0.8), cache_prompt=False)
        nll.append(-res.score_logprobs[0])
    assert gated_nll[0] == pytest.approx(np.mean(nll), rel=1e-3)
    # Bad gates are clear errors.
    store.defaults["gate"] = {"bias": 1.0}
    with pytest.raises(ValueError, match="gate"):
        peaked.generate(prompt, max_tokens=1, rtd=store)
    store.defaults["gate"] = {"bias": float("nan"), "distance": 0.0, "top_mass": 0.0}
    with pytest.raises(ValueError, match="gate bias"):
        peaked.generate(prompt, max_tokens=1, rtd=store)


def test_gate_closes_far_from_the_datastore_and_opens_near_it(peaked):
    # A datastore of one domain (counting); a query that repeats a stored
    # context is near its keys, a query from another domain is far.
    rows = [{"prompt": f"Count from {i}:", "completion": " " + ", ".join(str(i + j) for j in range(1, 12))}
            for i in range(0, 40, 4)]
    store = Datastore.build(peaked, rows, progress=False)
    assert store.defaults["gate"] == rtd.DEFAULT_GATE  # an untuned datastore is gated
    vocab = _scored(store, peaked.n_vocab)
    near_prompt = rows[3]["prompt"]
    far_prompt = "The recipe calls for flour, butter, eggs and a pinch of salt; bake until golden."
    option = RTD(store, k=8, lam=0.9)
    for prompt, expect_near in ((near_prompt, True), (far_prompt, False)):
        _, p, lam_q, near = _blend_by_hand(peaked, store, prompt, 8, store.defaults["temperature"], 0.9,
                                           store.defaults["gate"], store.defaults["distance_scale"])
        gated = np.exp(np.asarray(peaked.generate(prompt, max_tokens=0, score_tokens=vocab, rtd=option,
                                                  cache_prompt=False).score_logprobs))
        fixed = np.exp(np.asarray(peaked.generate(prompt, max_tokens=0, score_tokens=vocab, cache_prompt=False,
                                                  rtd=RTD(store, k=8, lam=0.9, gate=False)).score_logprobs))
        # Without the gate both queries get the same heavy blend.
        assert np.abs(fixed - p).sum() > 0.5
        if expect_near:
            assert near < 1.0 and lam_q > 0.8
            assert np.abs(gated - fixed).sum() < 0.2 * np.abs(fixed - p).sum()
        else:
            assert near > 3.0 and lam_q < 0.02
            assert np.abs(gated - p).sum() < 0.05 * np.abs(fixed - p).sum()


def _questions(n, seed):
    rng = np.random.default_rng(seed)
    words = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper",
             "kelp", "lagoon", "marble", "nectar", "onyx", "pumice", "quartz", "reef", "slate", "tundra"]
    out = []
    for i in range(n):
        w = rng.choice(words, size=4, replace=False)
        out.append({"question": f"Item {i}: which goes with {w[0]} {w[1]}?",
                    "choices": [str(x) for x in rng.choice(words, size=4, replace=False)],
                    "answer": int(rng.integers(0, 4))})
    return out


def test_tuner_keeps_the_plain_model_on_noise_and_finds_real_signal(tiny_model):
    questions = _questions(48, seed=3)
    store = Datastore.build(tiny_model, questions, mode="choice", progress=False)
    # Real signal: the validation questions are the stored ones, with their answers.
    real = rtd.tune(tiny_model, store, questions, save=False, progress=False)
    assert not real.kept_plain and real.lam > 0
    assert real.gain_interval[0] > 0.2 and real.score > real.plain_score + 0.2
    # Noise: the same questions with shuffled answers. The best setting in
    # sample beats the plain model (an argmax tuner would take it), but the
    # gain does not hold on held-out folds: the plain model is kept.
    rng = np.random.default_rng(11)
    shuffled = [dict(q, answer=int(a)) for q, a in zip(questions, rng.permutation([q["answer"] for q in questions]))]
    noise = rtd.tune(tiny_model, store, shuffled, save=True, progress=False)
    best_in_sample = max(e["accuracy"] for e in noise.table if not e["gate"])
    assert best_in_sample > noise.plain_score
    assert noise.kept_plain and noise.lam == 0.0 and noise.gate is None
    assert noise.gain_interval[0] <= 0.0
    assert store.defaults["lam"] == 0.0 and store.defaults["gate"] is None
    # Kept plain: the datastore's defaults leave the model's answers as they
    # are (up to the rounding of the second pass, which reuses cached cells).
    scores = rtd.score_choices(tiny_model, shuffled[:6], rtd=store)
    for s in scores:
        np.testing.assert_allclose(s.plain, s.rtd, atol=2e-3)
        assert int(np.argmax(s.plain)) == int(np.argmax(s.rtd))


def test_tuner_reaches_large_k_and_fits_a_gate_for_generation(tiny_model):
    rows = [{"prompt": f"Item {i}:", "completion": " red green blue yellow red green blue"} for i in range(16)]
    store = Datastore.build(tiny_model, rows[:4], progress=False)
    result = rtd.tune(tiny_model, store, rows[4:], ks=(1, 4, 16, 1024), temperature_scales=(0.3, 1.0),
                      lams=(0.2, 0.6), gate_caps=(0.5,), folds=4, progress=False)
    assert result.metric == "nll" and not result.kept_plain
    assert {e["k"] for e in result.table} == {1, 4, 16, len(store)}  # 1024 capped at the datastore's size
    assert len(result.table) == 4 * 2 * (2 + 1)
    assert result.score < result.plain_score and result.gain_interval[0] > 0
    plain, blended = rtd.generation_nll(tiny_model, store, rows[4:])
    assert blended.mean() == pytest.approx(result.score, rel=1e-6)
    assert plain.mean() == pytest.approx(result.plain_score, rel=1e-6)
