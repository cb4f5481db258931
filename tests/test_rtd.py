"""RTD: the blend formula, exact and approximate search against NumPy, the
datastore file, the native stage in the batched loop, and its failure modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

import slot_cpp
from slot_cpp import _core, rtd
from slot_cpp.rtd import RTD, Datastore, DatastoreError, DatastoreMismatchError
from slot_cpp import probes

PASSAGE = (" Zorblax the purple heron ate seventeen lemons on Tuesday while reciting the poem about the "
           "silver kettle and the quiet mountain.")


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max()
    return z - m - math.log(np.exp(z - m).sum())


def brute_force(keys: np.ndarray, queries: np.ndarray, k: int, heads: int = 1):
    kf = keys.astype(np.float32).astype(np.float64)
    q = queries.astype(np.float64)
    dh = kf.shape[1] // heads
    dist, ids = [], []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        d = ((q[:, None, sl] - kf[None, :, sl]) ** 2).sum(-1)
        i = np.argsort(d, axis=1, kind="stable")[:, :k]
        dist.append(np.take_along_axis(d, i, 1))
        ids.append(i)
    return np.stack(dist, 1), np.stack(ids, 1)


def reference_definition(dist, ids, values, heads, temperature):
    r: dict[int, float] = {}
    for h in range(heads):
        d = dist[h].astype(np.float64)
        w = np.exp(-heads * (d - d.min()) / temperature)
        w /= w.sum()
        for wi, i in zip(w, ids[h]):
            r[int(values[i])] = r.get(int(values[i]), 0.0) + wi / heads
    return r


def random_store(model, n=3000, heads=1, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, model.n_embd)) * scale).astype(np.float16)
    values = rng.integers(0, 50, n).astype(np.int32)
    return Datastore(keys=keys, values=values, mode="generation", heads=heads,
                     fingerprint=slot_cpp._model.model_fingerprint(model),
                     defaults={"k": 8, "temperature": float(model.n_embd), "lam": 0.5})


# ---- the blend -----------------------------------------------------------------
def test_blend_equals_the_formula_on_hand_computed_cases():
    z = np.array([2.0, 0.5, -1.0, 1.0, 0.0], dtype=np.float32)
    ref = [(1, 0.7), (3, 0.3)]
    p_lm = np.exp(log_softmax(z))
    for lam in (0.25, 0.5, 0.9):
        want = lam * np.array([0, 0.7, 0, 0.3, 0]) + (1 - lam) * p_lm
        got = _core.rtd_blend(z, ref, lam)
        np.testing.assert_allclose(np.exp(log_softmax(got)), want, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.exp(got), want, rtol=1e-5, atol=1e-7)  # already normalised
        # A blend of logits instead of probabilities would not pass.
        wrong = np.exp(log_softmax(lam * np.log(np.maximum([0, 0.7, 0, 0.3, 0], 1e-30)) + (1 - lam) * z))
        assert np.abs(wrong - want).max() > 1e-2
    # lambda 0 leaves the logits untouched, bit for bit.
    assert np.array_equal(_core.rtd_blend(z, ref, 0.0), z)
    # lambda 1 is pure retrieval: zero probability elsewhere.
    pure = _core.rtd_blend(z, ref, 1.0)
    assert np.isneginf(pure[[0, 2, 4]]).all()
    np.testing.assert_allclose(np.exp(pure[[1, 3]]), [0.7, 0.3], rtol=1e-6)
    with pytest.raises(ValueError, match="lambda"):
        _core.rtd_blend(z, ref, 1.5)


def test_blend_over_a_full_vocabulary_matches_double_precision():
    # A vocabulary of gemma's size takes the vectorised log-sum-exp (blocks
    # of 256 and a tail); every finite entry must equal the double-precision
    # formula to float32 rounding (of the result, and of the normaliser that
    # shifts it), with masked (-inf) logits and logits spread over hundreds
    # of nats.
    rng = np.random.default_rng(7)
    rows = []
    for scale in (0.5, 4.0, 60.0):
        z = (rng.standard_normal(262_144 + 37) * scale).astype(np.float32)
        z[rng.integers(0, len(z), 2000)] = -np.inf
        z[[5, len(z) - 7]] = rng.standard_normal(2).astype(np.float32)
        rows.append(z)
    # Equal logits below the maximum, over a short row so that the result is
    # small: every term has the same error, which cannot average out over
    # random terms (5.2 nats is the worst case for the polynomial).
    for gap in (0.3466, 5.2, 40.1):
        z = np.full(1024 + 3, -gap, np.float32)
        z[0] = 0.0
        rows.append(z)
    for z in rows:
        ref = [(5, 0.3), (len(z) - 7, 0.7)]
        zz = z.astype(np.float64)
        lse = zz.max() + np.log(np.exp(zz - zz.max()).sum())
        p = 0.5 * np.exp(zz - lse)
        for v, r in ref:
            p[v] += 0.5 * r
        with np.errstate(divide="ignore"):
            want = np.log(p)
        got = _core.rtd_blend(z, ref, 0.5).astype(np.float64)
        finite = np.isfinite(want)
        assert np.array_equal(finite, np.isfinite(got))
        err = np.abs(got[finite] - want[finite])
        rounding = 2 * np.spacing(np.abs(want[finite]).astype(np.float32)) + 2 * np.spacing(np.float32(abs(lse)))
        assert np.all(err <= rounding + 1e-7)
        # The normaliser is right, not merely consistent: the blend sums to one.
        assert np.exp(got[finite]).sum() == pytest.approx(1.0, abs=1e-5)


def test_reference_distribution_and_huge_distances(tiny_model):
    store = random_store(tiny_model, n=500, seed=1)
    rng = np.random.default_rng(2)
    q = rng.standard_normal(tiny_model.n_embd).astype(np.float32)
    dist, ids = brute_force(store.keys, q[None], 16)
    for t in (1.0, 10.0, 100.0):
        got = store.reference(tiny_model, q, k=16, temperature=t)
        want = reference_definition(dist[0], ids[0], store.values, 1, t)
        assert set(got) == set(want)
        for v in want:
            assert got[v] == pytest.approx(want[v], rel=1e-3, abs=1e-6)
    # Keys far away (distances ~1e9) with a small temperature: exp(-d/T)
    # underflows for every neighbour unless shifted by the nearest distance.
    far = random_store(tiny_model, n=200, seed=3, scale=3000.0)
    r = far.reference(tiny_model, q, k=8, temperature=0.5)
    assert all(math.isfinite(p) for p in r.values())
    assert sum(r.values()) == pytest.approx(1.0)
    z = np.zeros(tiny_model.n_vocab, np.float32)
    assert np.all(np.isfinite(_core.rtd_blend(z, list(r.items()), 0.5)))


# ---- search ----------------------------------------------------------------------
@pytest.mark.parametrize("heads", [1, 4])
def test_exact_search_equals_brute_force(tiny_model, heads):
    store = random_store(tiny_model, n=4000, heads=heads, seed=heads)
    rng = np.random.default_rng(10)
    # The ggml product rounds the query to float16, like the keys: with
    # queries that are float16 values already, it is exact up to float32 sums.
    q = rng.standard_normal((5, tiny_model.n_embd)).astype(np.float16).astype(np.float32)
    dist, ids = store.search(tiny_model, q, 10)
    want_d, want_i = brute_force(store.keys, q, 10, heads)
    assert dist.shape == ids.shape == (5, heads, 10)
    assert np.array_equal(ids, want_i)
    np.testing.assert_allclose(dist, want_d, rtol=1e-4)
    # Any float32 query: the same neighbours up to near-ties, distances close.
    q32 = rng.standard_normal((5, tiny_model.n_embd)).astype(np.float32)
    dist, ids = store.search(tiny_model, q32, 10)
    want_d, want_i = brute_force(store.keys, q32, 10, heads)
    np.testing.assert_allclose(dist, want_d, rtol=2e-3)
    assert np.mean(ids == want_i) > 0.9


def test_multi_head_reference_is_the_average_of_heads(tiny_model):
    store = random_store(tiny_model, n=800, heads=4, seed=5)
    q = np.random.default_rng(6).standard_normal(tiny_model.n_embd).astype(np.float32)
    dist, ids = brute_force(store.keys, q[None], 12, heads=4)
    got = store.reference(tiny_model, q, k=12, temperature=40.0)
    want = reference_definition(dist[0], ids[0], store.values, 4, 40.0)
    assert set(got) == set(want)
    for v in want:
        assert got[v] == pytest.approx(want[v], rel=1e-3, abs=1e-6)
    # The comparison rejects a wrong variant: weights softmax(-d / T) per head
    # (without the factor H) give another distribution.
    wrong = reference_definition(dist[0], ids[0], store.values, 4, 40.0 * 4)
    assert any(wrong[v] != pytest.approx(want[v], rel=1e-3, abs=1e-6) for v in want)
    # Tuning's vectorised copy of the formula agrees with the native one.
    targets = np.array([sorted(want)])
    mass = rtd._reference_mass(store, dist.astype(np.float32), ids, targets, 12, 40.0)[0]
    np.testing.assert_allclose(mass, [want[v] for v in sorted(want)], rtol=1e-3, atol=1e-6)


def test_inverted_file_probing_every_list_is_exact_and_recall_is_reported(tiny_model):
    rng = np.random.default_rng(7)
    centres = rng.standard_normal((20, tiny_model.n_embd)) * 4
    keys = (centres[rng.integers(0, 20, 6000)] + rng.standard_normal((6000, tiny_model.n_embd))).astype(np.float16)
    store = random_store(tiny_model, n=6000)
    store.keys = keys
    queries = (centres[rng.integers(0, 20, 40)] + rng.standard_normal((40, tiny_model.n_embd))).astype(np.float32)
    _, exact = store.search(tiny_model, queries, 10)
    store.build_ivf(tiny_model, nlist=32, nprobe=4)
    assert store.has_ivf and store.defaults["nprobe"] == 4
    _, all_lists = store.search(tiny_model, queries, 10, nprobe=32)
    # Reordered keys: compare the keys found, not their positions.
    assert np.array_equal(np.sort(store.keys[all_lists[:, 0]].view(np.uint16), axis=1),
                          np.sort(keys[exact[:, 0]].view(np.uint16), axis=1))
    recall = store.recall(tiny_model, queries, 10, nprobe=4)
    assert 0.8 <= recall <= 1.0
    assert store.recall(tiny_model, queries, 10, nprobe=1) <= recall


# ---- the datastore ---------------------------------------------------------------
def test_build_takes_the_state_before_each_completion_token(tiny_model):
    rows = [{"prompt": "Once upon a time", "completion": " there was a fox"},
            {"prompt": "Hello", "completion": " world and more"}]
    store = Datastore.build(tiny_model, rows, progress=False)
    expected_values, expected_keys = [], []
    for row in rows:
        p = tiny_model.tokenize(row["prompt"])
        c = tiny_model.tokenize(row["completion"], add_special=False, parse_special=False)
        hidden, _ = probes.prompt_states(tiny_model, p + c)
        expected_keys.append(hidden[len(p) - 1:len(p) + len(c) - 1])
        expected_values += c
    assert store.values.tolist() == expected_values
    np.testing.assert_allclose(store.keys.astype(np.float32), np.concatenate(expected_keys), rtol=2e-2, atol=2e-2)
    assert store.params["rows"] == 2 and store.defaults["temperature"] > 0


def test_save_load_append_and_bad_files(tiny_model, peaked_path, tmp_path):
    rows = [{"prompt": "A", "completion": " b c d e f"}]
    store = Datastore.build(tiny_model, rows, progress=False)
    path = store.save(tmp_path / "s.rtd")
    loaded = Datastore.load(path, tiny_model)
    assert isinstance(loaded.keys, np.memmap)
    assert np.array_equal(loaded.keys, store.keys) and np.array_equal(loaded.values, store.values)
    assert loaded.defaults == store.defaults and loaded.mode == "generation"
    loaded.extend(tiny_model, [{"prompt": "X", "completion": " y z"}], progress=False)
    assert len(loaded) == len(store) + len(tiny_model.tokenize(" y z", add_special=False))
    loaded.save(tmp_path / "s2.rtd")
    assert len(Datastore.load(tmp_path / "s2.rtd")) == len(loaded)

    data = path.read_bytes()
    (tmp_path / "cut.rtd").write_bytes(data[:-100])
    with pytest.raises(DatastoreError, match="truncated"):
        Datastore.load(tmp_path / "cut.rtd")
    (tmp_path / "foreign.rtd").write_bytes(b"GGUF" + bytes(200))
    with pytest.raises(DatastoreError, match="not a slot_cpp datastore"):
        Datastore.load(tmp_path / "foreign.rtd")
    with pytest.raises(DatastoreError, match="cannot read"):
        Datastore.load(tmp_path / "missing.rtd")
    # Another model: same tokenizer and sizes, another head.
    with slot_cpp.Model(peaked_path, n_ctx=256, n_threads=2) as other:
        with pytest.raises(DatastoreMismatchError, match="head"):
            Datastore.load(path, other)
        with pytest.raises(DatastoreMismatchError):
            other.generate("A", max_tokens=2, rtd=store)
    # Keys of another width.
    narrow = Datastore(keys=np.zeros((4, 8), np.float16), values=np.zeros(4, np.int32), mode="generation",
                       heads=1, fingerprint={**store.fingerprint, "n_embd": 8}, defaults=dict(store.defaults))
    with pytest.raises(DatastoreMismatchError, match="n_embd"):
        tiny_model.generate("A", max_tokens=2, rtd=narrow)


def test_bad_settings_raise_clear_errors(tiny_model):
    store = random_store(tiny_model, n=50)
    cases = [
        (RTD(store, k=51), "larger than the datastore"),
        (RTD(store, k=0), "rtd k"),
        (RTD(store, lam=1.5), "rtd lambda"),
        (RTD(store, lam=-0.1), "rtd lambda"),
        (RTD(store, temperature=0.0), "rtd temperature"),
        (RTD(store, temperature=-3.0), "rtd temperature"),
        (RTD(store, nprobe=4), "inverted-file"),
    ]
    for option, message in cases:
        with pytest.raises(ValueError, match=message):
            tiny_model.generate("Hello", max_tokens=2, rtd=option)
    with pytest.raises(TypeError, match="rtd must be"):
        tiny_model.generate("Hello", max_tokens=2, rtd="store.rtd")
    bad_values = random_store(tiny_model, n=50)
    bad_values.values[3] = tiny_model.n_vocab + 5
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        tiny_model.generate("Hello", max_tokens=2, rtd=bad_values)
    with pytest.raises(DatastoreError, match="no rows"):
        Datastore.build(tiny_model, [], progress=False)
    with pytest.raises(DatastoreError, match="row 1"):
        Datastore.build(tiny_model, [{"prompt": "a", "completion": " b"}, {"prompt": "a"}], progress=False)
    with pytest.raises(DatastoreError, match="heads"):
        Datastore.build(tiny_model, [{"prompt": "a", "completion": " b"}], heads=7, progress=False)
    assert tiny_model.generate("Hello", max_tokens=3).tokens  # still works


# ---- the native stage --------------------------------------------------------------
def test_lambda_zero_is_exactly_the_plain_model(peaked):
    store = random_store(peaked, n=300)
    plain = peaked.generate("Hello world", max_tokens=12, logprobs=True, cache_prompt=False)
    off = peaked.generate("Hello world", max_tokens=12, logprobs=True, cache_prompt=False, rtd=RTD(store, lam=0.0))
    assert off.tokens == plain.tokens and off.token_logprobs == plain.token_logprobs


def test_blend_applies_after_slot_bias_and_queries_the_plain_state(peaked):
    """score_tokens under SLOT's delta and RTD equal the formula computed by
    hand from the plain hidden state h and the logits of h + delta."""
    rows = [{"prompt": "Numbers: 1, 2, 3,", "completion": " 4, 5, 6, 7"}]
    store = Datastore.build(peaked, rows, progress=False)
    delta = np.random.default_rng(0).standard_normal(peaked.n_embd).astype(np.float32) * 0.05
    vocab = list(range(peaked.n_vocab))
    base = peaked.generate("Count: 1, 2,", max_tokens=0, delta=delta, score_tokens=vocab, return_hidden=True,
                           cache_prompt=False)
    option = RTD(store, k=4, temperature=50.0, lam=0.6, gate=False)
    blended = peaked.generate("Count: 1, 2,", max_tokens=0, delta=delta, score_tokens=vocab, rtd=option,
                              cache_prompt=False)
    r = store.reference(peaked, base.hidden, k=4, temperature=50.0)
    want = 0.6 * np.array([r.get(v, 0.0) for v in vocab]) + 0.4 * np.exp(np.asarray(base.score_logprobs))
    got = np.exp(np.asarray(blended.score_logprobs))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    # SLOT learning and RTD at once: runs, learns, and the blend changes the text.
    both = peaked.generate_with_slot("Count: 1, 2,", steps=3, lr=0.05, max_tokens=8,
                                     rtd=RTD(store, k=1, lam=1.0, gate=False))
    assert both.steps_done == 3 and both.delta is not None
    assert set(both.tokens) <= set(store.values.tolist())


def test_batched_generation_with_rtd_equals_one_at_a_time(peaked):
    rows = [{"prompt": p, "completion": c} for p, c in [
        ("The quick brown fox", " jumps over the lazy dog again and again"),
        ("Hello world", " and hello moon and hello sun"),
    ]]
    store = Datastore.build(peaked, rows, progress=False)
    option = RTD(store, k=3, lam=0.7)
    prompts = ["The quick brown fox", "Hello world", "In the beginning", "One two three"]
    batch = peaked.generate_batch(prompts, max_tokens=10, rtd=option, cache_prompt=False)
    single = [peaked.generate(p, max_tokens=10, rtd=option, cache_prompt=False) for p in prompts]
    assert [b.tokens for b in batch] == [s.tokens for s in single]
    plain = peaked.generate_batch(prompts, max_tokens=10, cache_prompt=False)
    assert [b.tokens for b in batch] != [p.tokens for p in plain]


@pytest.fixture(scope="module")
def peaked(peaked_path):
    model = slot_cpp.Model(peaked_path, n_ctx=512, n_threads=2, n_parallel=4)
    yield model
    model.close()


def test_tune_chooses_settings_that_beat_the_plain_model(tiny_model):
    rows = [{"prompt": f"Item {i}:", "completion": " red green blue yellow red green blue"} for i in range(14)]
    store = Datastore.build(tiny_model, rows[:4], progress=False)
    result = rtd.tune(tiny_model, store, rows[4:], ks=(1, 4, 16), temperature_scales=(0.3, 1.0),
                      lams=(0.2, 0.6), gate_caps=(), progress=False)
    assert result.metric == "nll" and len(result.table) == 3 * 2 * 2
    assert result.score < result.plain_score and result.gate is None
    assert store.defaults["k"] == result.k and store.defaults["lam"] == result.lam
    plain, blended = rtd.generation_nll(tiny_model, store, rows[4:])  # the tuned defaults
    assert blended.mean() == pytest.approx(result.score, rel=1e-6)
    assert plain.mean() == pytest.approx(result.plain_score, rel=1e-6)
    rows = rows[:6]
    plain, blended = plain[:2], blended[:2]

    # RTD on top of SLOT: the model's part is the NLL under each row's delta,
    # the reference part is unchanged (the query is the plain state).
    rng = np.random.default_rng(4)
    deltas = [rng.normal(0, 0.5, tiny_model.n_embd).astype(np.float32), None]
    shifted, both = rtd.generation_nll(tiny_model, store, rows[4:], deltas=deltas)
    for row, delta, nll in zip(rows[4:], deltas, shifted):
        p = tiny_model.tokenize(row["prompt"])
        c = tiny_model.tokenize(row["completion"], add_special=False)
        assert nll == pytest.approx(-probes.token_logprobs(tiny_model, p + c, len(p), delta).mean(), rel=1e-9)
    assert shifted[1] == plain[1] and both[1] == blended[1]
    assert abs(shifted[0] - plain[0]) > 1e-3 and both[0] != blended[0]
    # Per token, lam * r + (1 - lam) * p: with r fixed, the blend moves with p.
    assert (both[0] < blended[0]) == (shifted[0] < plain[0])
    with pytest.raises(ValueError, match="deltas"):
        rtd.generation_nll(tiny_model, store, rows[4:], deltas=[None])


# ---- gemma -------------------------------------------------------------------------
@pytest.mark.slow
def test_memorised_passage_is_continued_on_gemma(gemma):
    store = Datastore.build(gemma, [{"prompt": "Story:", "completion": PASSAGE}], progress=False)
    plain = gemma.generate("Story:", max_tokens=24)
    recalled = gemma.generate("Story:", max_tokens=24, rtd=RTD(store, k=1, lam=1.0))
    target = gemma.tokenize(PASSAGE, add_special=False)
    assert recalled.tokens == target[:24]
    assert plain.tokens[:5] != target[:5]


@pytest.mark.slow
def test_choice_datastore_recalls_stored_answers_on_gemma(gemma):
    questions = [
        {"question": "Which colour is the zorble fruit?", "choices": ["red", "blue", "green", "white"], "answer": 2},
        {"question": "How many legs has a quintapod?", "choices": ["two", "five", "seven", "ten"], "answer": 3},
        {"question": "Who built the Glass Tower of Vell?", "choices": ["Ana", "Bo", "Cy", "Di"], "answer": "B"},
    ]
    store = Datastore.build(gemma, questions, progress=False)
    assert store.mode == "choice" and len(store) == 3
    scores = rtd.score_choices(gemma, questions, rtd=RTD(store, k=1, lam=0.9))
    assert [s.rtd_choice for s in scores] == [2, 3, 1]
    for s in scores:
        assert s.plain.sum() == pytest.approx(1.0) and s.rtd is not None and s.rtd.sum() == pytest.approx(1.0)
