"""Choosing RTD's settings on validation rows by cross-validation, and the
blend's gold-token NLL, computed from neighbours searched once.

The candidates are the plain model, one lambda for every query (k, T,
lambda), and a gate (k, T, a ceiling lambda): lambda(q) = ceiling *
sigmoid(bias + distance * nearest(q) / scale + top_mass * max_v r(v)), its
three weights fitted on the training folds by maximising the blend's
likelihood of the answers (or gold tokens). Every candidate gets a held-out
gain per validation row (a gate's from the folds it was not fitted on).
The rule that picks a candidate takes, among those whose mean gain is within
one standard error of the best, the one that blends least (the smallest mean
lambda; the plain model blends nothing). The whole rule is cross-validated
again (picked on the other folds, scored on each fold); unless that held-out
gain's 95% interval lies above zero, the plain model is kept."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .. import probes
from .._model import Model
from ..options import check_float as _check_float
from ..options import check_int as _check_int
from .build import row_keys
from .prompts import _label_tokens, answer_index
from .request import GATE_FEATURES, RTD, check_gate
from .store import Datastore, RtdOption, as_rtd

# A setting's scores, e.g. {"k": 16, "temperature": 40.0, "lam": 0.25, "gate": 0, "nll": 1.9,
# "cv_gain": 0.1, "cv_se": 0.02}: the metric on the validation rows (a gate's held out) and the
# held-out gain per row over the plain model (positive is better) with its standard error.
Entry = dict[str, float]


def _reference_mass(store: Datastore, dist: np.ndarray, ids: np.ndarray, targets: np.ndarray,
                    k: int, temperature: float) -> np.ndarray:
    """r(target) for each query from its neighbours (n, heads, >= k): the
    same formula as the native stage, vectorised. targets: (n, m) -> (n, m)."""
    w, vals = _weights(store, dist, ids, k, temperature)
    match = vals[:, :, :, None] == targets[:, None, None, :]
    return (w[:, :, :, None] * match).sum(axis=2).mean(axis=1)


def _weights(store: Datastore, dist: np.ndarray, ids: np.ndarray, k: int, temperature: float
             ) -> tuple[np.ndarray, np.ndarray]:
    """Each head's neighbour weights softmax(-heads * d / T) and the neighbours' values, (n, heads, k)."""
    d = dist[:, :, :k].astype(np.float64)
    i = ids[:, :, :k]
    valid = i >= 0
    d = np.where(valid, d, np.inf)
    w = np.exp(-(d - d.min(axis=2, keepdims=True)) * store.heads / temperature)
    w = np.where(valid, w, 0.0)
    w /= w.sum(axis=2, keepdims=True)
    return w, np.asarray(store.values)[np.where(valid, i, 0)]


def _reference_top(store: Datastore, dist: np.ndarray, ids: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """max_v r(v) for each query: the reference distribution's top mass, (n,)."""
    w, vals = _weights(store, dist, ids, k, temperature)
    n = w.shape[0]
    w = (w / store.heads).reshape(n, -1)
    vals = vals.reshape(n, -1)
    order = np.argsort(vals, axis=1, kind="stable")
    sv = np.take_along_axis(vals, order, 1)
    cum = np.cumsum(np.take_along_axis(w, order, 1), axis=1)
    # A run of equal values ends where the next value differs: its mass is
    # the cumulative sum there less the cumulative sum at the previous end.
    end = np.ones_like(sv, dtype=bool)
    end[:, :-1] = sv[:, 1:] != sv[:, :-1]
    at_end = np.where(end, cum, 0.0)
    before = np.zeros_like(cum)
    before[:, 1:] = np.maximum.accumulate(at_end, axis=1)[:, :-1]
    return np.where(end, cum - before, 0.0).max(axis=1)


def _nearest(store: Datastore, dist: np.ndarray) -> np.ndarray:
    """The distance to the nearest key, heads times the heads' mean (as the native gate), (n,)."""
    return dist[:, :, 0].astype(np.float64).sum(axis=1)


def gate_lambda(lam: float, gate: Mapping[str, float], nearest_relative: np.ndarray, top_mass: np.ndarray
                ) -> np.ndarray:
    """lambda(q) = lam * sigmoid(bias + distance * nearest / scale + top_mass * max_v r(v))."""
    z = gate["bias"] + gate["distance"] * np.asarray(nearest_relative, np.float64) \
        + gate["top_mass"] * np.asarray(top_mass, np.float64)
    return lam / (1.0 + np.exp(-np.clip(z, -700.0, 700.0)))


@dataclass(frozen=True)
class TuneResult:
    """The chosen settings (``lam`` 0 and ``gate`` None: the plain model was
    kept), the chosen setting's score on all validation rows, the plain
    model's, and the cross-validated gain of the whole choice with its 95%
    interval (accuracy points or nats per token, positive is better)."""

    k: int
    temperature: float
    lam: float
    metric: str              # "accuracy" (higher is better) or "nll" (lower is better)
    score: float
    plain_score: float
    table: list[dict[str, float]]
    gate: Optional[dict[str, float]] = None
    gain: float = 0.0
    gain_interval: tuple[float, float] = (0.0, 0.0)
    folds: int = 0
    kept_plain: bool = False
    distance_scale: float = 1.0
    chosen_by_folds: list[str] = field(default_factory=list)


@dataclass
class _Queries:
    """Every query of the validation rows, searched once at the largest k."""

    dist: np.ndarray          # (n, heads, kmax)
    ids: np.ndarray
    targets: np.ndarray       # (n, m) token ids, -1 where a row has fewer
    plain: np.ndarray         # (n, m) the model's probabilities of the targets (0 where none)
    row: np.ndarray           # (n,) the validation row of each query
    answer: Optional[np.ndarray]  # choice: (n,) the answer's column; generation: None (column 0)
    near: np.ndarray          # (n,) nearest distance / the datastore's scale
    n_rows: int


def _choice_parts(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]]
                  ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[int]]:
    prompts = [store.choice_prompt(r["question"], r["choices"]) for r in rows]
    labels = [_label_tokens(model, len(r["choices"])) for r in rows]
    res = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, return_hidden=True)
    hidden = np.stack([np.asarray(r.hidden) for r in res]).astype(np.float32)
    return hidden, [np.asarray(r.score_logprobs) for r in res], [np.asarray(l) for l in labels], \
        [answer_index(r) for r in rows]


def _generation_parts(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]],
                      deltas: Optional[Sequence[Optional[np.ndarray]]] = None
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row: the states before each completion token, the model's
    log-probabilities of those tokens (under the row's delta, if any), and
    the tokens."""
    if deltas is not None and len(deltas) != len(rows):
        raise ValueError(f"deltas has {len(deltas)} entries for {len(rows)} rows")
    out = []
    for i, row in enumerate(rows):
        toks, span, gold = row_keys(store, model, row)
        hidden = probes.hidden_states(model, [toks], [span])
        delta = None if deltas is None else deltas[i]
        lp = np.asarray(probes.token_logprobs(model, toks, span[0] + 1, delta), dtype=np.float64)
        out.append((hidden, lp, np.asarray(gold)))
    return out


def _queries(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], kmax: int,
             scale: float) -> _Queries:
    if store.mode == "choice":
        hidden, lps, labels, answers = _choice_parts(model, store, rows)
        width = max(len(l) for l in labels)
        targets = np.full((len(rows), width), -1, dtype=np.int64)
        plain = np.zeros((len(rows), width))
        for i, (l, lp) in enumerate(zip(labels, lps)):
            targets[i, :len(l)] = l
            plain[i, :len(l)] = np.exp(lp)
        row = np.arange(len(rows))
        answer: Optional[np.ndarray] = np.asarray(answers)
    else:
        parts = _generation_parts(model, store, rows)
        hidden = np.concatenate([h for h, _, _ in parts]).astype(np.float32)
        targets = np.concatenate([g for _, _, g in parts]).astype(np.int64)[:, None]
        plain = np.exp(np.concatenate([lp for _, lp, _ in parts]))[:, None]
        row = np.concatenate([np.full(len(g), i) for i, (_, _, g) in enumerate(parts)])
        answer = None
    dist, ids = store.search(model, hidden, kmax)
    return _Queries(dist, ids, targets, plain, row, answer, _nearest(store, dist) / scale, len(rows))


class _Scorer:
    """Per-row scores of a blend with per-query weights lam (n,)."""

    def __init__(self, q: _Queries):
        self.q = q
        self.count = np.bincount(q.row, minlength=q.n_rows).astype(np.float64)

    def rows(self, lam: np.ndarray, r: np.ndarray) -> np.ndarray:
        """The metric per row, higher is better: correct (0/1) or minus the row's mean NLL."""
        q = self.q
        b = lam[:, None] * r + (1.0 - lam[:, None]) * q.plain
        if q.answer is not None:
            b = np.where(q.targets >= 0, b, -1.0)
            return (np.argmax(b, axis=1) == q.answer).astype(np.float64)
        nll = -np.log(np.maximum(b[:, 0], 1e-300))
        return -np.bincount(q.row, nll, minlength=q.n_rows) / self.count

    def fit_gate(self, r: np.ndarray, top: np.ndarray, cap: float, train: np.ndarray,
                 steps: int = 200) -> dict[str, float]:
        """The gate's weights maximising the blend's mean log-likelihood of
        the answers (or gold tokens, each row weighing the same) on the rows
        `train` (a mask over rows), by Adam with a small L2 penalty."""
        q = self.q
        sel = train[q.row]
        feats = np.stack([np.ones(int(sel.sum())), q.near[sel], top[sel]], axis=1)
        rr, pp = r[sel], q.plain[sel]
        if q.answer is not None:
            a = q.answer[sel]
            cols = np.arange(len(a))
            ra, pa = rr[cols, a], pp[cols, a]
            rs, ps = rr.sum(axis=1), pp.sum(axis=1)
            weight = np.full(len(a), 1.0 / len(a))
        else:
            ra, pa = rr[:, 0], pp[:, 0]
            weight = 1.0 / (self.count[q.row[sel]] * float(train.sum()))
        theta = np.zeros(3)
        m = np.zeros(3)
        v = np.zeros(3)
        l2 = 1e-3
        for t in range(1, steps + 1):
            z = np.clip(feats @ theta, -700.0, 700.0)
            s = 1.0 / (1.0 + np.exp(-z))
            lam = cap * s
            num = lam * ra + (1.0 - lam) * pa
            dlam = (ra - pa) / np.maximum(num, 1e-300)
            if q.answer is not None:
                den = lam * rs + (1.0 - lam) * ps
                dlam = dlam - (rs - ps) / np.maximum(den, 1e-300)
            g = feats.T @ (weight * dlam * cap * s * (1.0 - s)) - 2 * l2 * np.array([0.0, theta[1], theta[2]])
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            theta += 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return dict(zip(GATE_FEATURES, (float(x) for x in theta)))


@dataclass
class _Candidate:
    name: str
    k: int
    temperature: float
    lam: float
    gate: bool
    gains: np.ndarray        # held-out gain per row
    weights: np.ndarray      # the mean lambda applied per row
    entry: Entry


def _select(cands: Sequence[_Candidate], rows: np.ndarray) -> Optional[_Candidate]:
    """The one-standard-error rule on the rows `rows` (a mask): among the
    candidates whose mean gain is within one standard error of the best
    (the plain model's gain is 0), the one that blends least; None: plain."""
    n = int(rows.sum())
    means = [float(c.gains[rows].mean()) for c in cands]
    best = int(np.argmax(means))
    if means[best] <= 0.0:
        return None
    se = float(cands[best].gains[rows].std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    floor = means[best] - se
    if floor <= 0.0:
        return None  # the plain model is within one standard error and blends nothing
    eligible = [i for i, m in enumerate(means) if m >= floor]
    pick = min(eligible, key=lambda i: (float(cands[i].weights[rows].mean()), -means[i]))
    return cands[pick]


def tune(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
         ks: Optional[Sequence[int]] = None, temperature_scales: Sequence[float] = (0.3, 1.0, 3.0),
         lams: Sequence[float] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85), gate_caps: Sequence[float] = (0.25, 0.5, 1.0),
         folds: int = 5, seed: int = 0, save: bool = True, progress: bool = True) -> TuneResult:
    """Chooses RTD's settings on validation rows (not in the datastore):
    the plain model, one lambda, or a fitted gate, by k-fold
    cross-validation (see the module's description); accuracy for a choice
    datastore, gold-token NLL for a generation one. ``ks`` defaults to 8 ...
    256 (choice) or 16 ... 1024 (generation), capped at the datastore's
    size; ``gate_caps`` () tries no gate. With ``save``, the choice becomes
    the datastore's defaults (the plain model: lambda 0)."""
    rows = list(rows)
    if len(rows) < 2:
        raise ValueError("tune needs at least 2 validation rows")
    if ks is None:
        ks = (8, 16, 32, 64, 128, 256) if store.mode == "choice" else (16, 64, 256, 1024)
    ks = sorted({min(int(k), len(store)) for k in ks if int(k) >= 1})
    if not ks:
        raise ValueError("no usable k")
    for lam in list(lams) + list(gate_caps):
        _check_float("lam", lam, low=0.0, high=1.0)
    for scale in temperature_scales:
        _check_float("temperature scale", scale, low=0.0, low_open=True)
    folds = min(_check_int("folds", folds, 2), len(rows))
    base_t = store.typical_distance(model, k=ks[len(ks) // 2])
    scale = store.nearest_distance_scale(model)
    q = _queries(model, store, rows, ks[-1], scale)
    scorer = _Scorer(q)
    fold_of = np.empty(len(rows), dtype=np.int64)
    for f, part in enumerate(np.array_split(np.random.default_rng(seed).permutation(len(rows)), folds)):
        fold_of[part] = f
    plain_rows = scorer.rows(np.zeros(len(q.row)), np.zeros_like(q.plain))
    metric = "accuracy" if q.answer is not None else "nll"
    sign = 1.0 if metric == "accuracy" else -1.0  # rows are scored higher-is-better; the table shows the metric

    def per_row_mean(x: np.ndarray) -> np.ndarray:
        return np.bincount(q.row, x, minlength=q.n_rows) / scorer.count

    cands: list[_Candidate] = []
    table: list[Entry] = []
    for k in ks:
        for t_scale in temperature_scales:
            t = base_t * t_scale
            r = _reference_mass(store, q.dist, q.ids, q.targets, k, t)
            top = _reference_top(store, q.dist, q.ids, k, t) if gate_caps else None
            for lam in lams:
                s = scorer.rows(np.full(len(q.row), float(lam)), r)
                entry = {"k": k, "temperature": t, "lam": float(lam), "gate": 0,
                         metric: sign * float(s.mean()), "cv_gain": float((s - plain_rows).mean())}
                cands.append(_Candidate(f"k={k} T={t:.4g} lambda={lam:g}", k, t, float(lam), False,
                                        s - plain_rows, np.full(q.n_rows, float(lam)), entry))
            for cap in gate_caps:
                assert top is not None
                gains = np.zeros(q.n_rows)
                weights = np.zeros(q.n_rows)
                for f in range(folds):
                    held = fold_of == f
                    g = scorer.fit_gate(r, top, float(cap), ~held)
                    lam_q = gate_lambda(float(cap), g, q.near, top)
                    s = scorer.rows(lam_q, r)
                    gains[held] = (s - plain_rows)[held]
                    weights[held] = per_row_mean(lam_q)[held]
                entry = {"k": k, "temperature": t, "lam": float(cap), "gate": 1,
                         metric: sign * float((plain_rows + gains).mean()), "cv_gain": float(gains.mean()),
                         "mean_lambda": float(weights.mean())}
                cands.append(_Candidate(f"k={k} T={t:.4g} gate, ceiling {cap:g}", k, t, float(cap), True,
                                        gains, weights, entry))
    for c in cands:
        n = len(c.gains)
        c.entry["cv_se"] = float(c.gains.std(ddof=1) / math.sqrt(n))
        table.append(c.entry)

    # The rule, cross-validated: chosen on the other folds, scored on each.
    held_gain = np.zeros(q.n_rows)
    by_fold = []
    for f in range(folds):
        held = fold_of == f
        c = _select(cands, ~held)
        by_fold.append("plain" if c is None else c.name)
        if c is not None:
            held_gain[held] = c.gains[held]
    gain = float(held_gain.mean())
    half = 1.96 * float(held_gain.std(ddof=1)) / math.sqrt(q.n_rows)
    chosen = _select(cands, np.ones(q.n_rows, dtype=bool))
    kept_plain = chosen is None or gain - half <= 0.0
    plain_score = sign * float(plain_rows.mean())
    fitted: Optional[dict[str, float]] = None
    if kept_plain:
        k, t, lam, score = ks[len(ks) // 2], base_t, 0.0, plain_score
    else:
        assert chosen is not None
        k, t, lam = chosen.k, chosen.temperature, chosen.lam
        r = _reference_mass(store, q.dist, q.ids, q.targets, k, t)
        if chosen.gate:
            top = _reference_top(store, q.dist, q.ids, k, t)
            fitted = scorer.fit_gate(r, top, lam, np.ones(q.n_rows, dtype=bool))
            lam_q = gate_lambda(lam, fitted, q.near, top)
        else:
            lam_q = np.full(len(q.row), lam)
        score = sign * float(scorer.rows(lam_q, r).mean())
    result = TuneResult(k=int(k), temperature=float(t), lam=float(lam), metric=metric, score=score,
                        plain_score=plain_score, table=table, gate=fitted, gain=gain,
                        gain_interval=(gain - half, gain + half), folds=folds, kept_plain=kept_plain,
                        distance_scale=scale, chosen_by_folds=by_fold)
    if save:
        store.defaults.update({"k": result.k, "temperature": result.temperature, "lam": result.lam,
                               "gate": fitted, "distance_scale": scale, "tuned_on": len(rows),
                               "tuned_metric": metric, "tuned_gain": gain,
                               "tuned_gain_interval": list(result.gain_interval)})
    return result


def generation_nll(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
                   rtd: Optional[RtdOption] = None,
                   deltas: Optional[Sequence[Optional[np.ndarray]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean gold-token NLL per row under the model and under the blend
    (settings from ``rtd`` or the datastore's defaults, the gate included).

    With ``deltas`` (a SLOT delta per row, or None for a row without one),
    the model's distribution is the one shifted by each row's delta, and the
    blend is RTD on top of SLOT; the query stays the plain state, as in
    generation."""
    opt = (as_rtd(rtd) or RTD(store)).resolved()
    assert opt.k is not None and opt.temperature is not None and opt.lam is not None
    gate: Optional[dict[str, float]] = None
    scale = 1.0
    if opt.gate:
        gate, scale = store.gate_settings(model)
        gate = check_gate(gate)
    parts = _generation_parts(model, store, rows, deltas)
    model_nll, blended = [], []
    for h, lp, g in parts:
        d, i = store.search(model, h, opt.k, nprobe=opt.nprobe or 0)
        r = _reference_mass(store, d, i, g[:, None], opt.k, opt.temperature)[:, 0]
        if gate is not None:
            lam = gate_lambda(opt.lam, gate, _nearest(store, d) / scale,
                              _reference_top(store, d, i, opt.k, opt.temperature))
        else:
            lam = np.full(len(r), opt.lam)
        model_nll.append(float(np.mean(-lp)))
        blended.append(float(np.mean(-np.log(lam * r + (1 - lam) * np.exp(lp)))))
    return np.asarray(model_nll), np.asarray(blended)
