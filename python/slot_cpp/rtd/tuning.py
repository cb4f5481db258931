"""Choosing k, temperature and lambda on validation rows, and the blend's
gold-token NLL, computed from neighbours searched once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .._model import Model
from ..options import check_float as _check_float
from .build import row_keys
from .prompts import _label_tokens, answer_index
from .request import RTD
from .store import Datastore, RtdOption, as_rtd

# A setting's scores, e.g. {"k": 16, "temperature": 40.0, "lam": 0.25, "nll": 1.9}.
Entry = dict[str, float]


def _reference_mass(store: Datastore, dist: np.ndarray, ids: np.ndarray, targets: np.ndarray,
                    k: int, temperature: float) -> np.ndarray:
    """r(target) for each query from its neighbours (n, heads, >= k): the
    same formula as the native stage, vectorised. targets: (n, m) -> (n, m)."""
    d = dist[:, :, :k].astype(np.float64)
    i = ids[:, :, :k]
    valid = i >= 0
    d = np.where(valid, d, np.inf)
    w = np.exp(-(d - d.min(axis=2, keepdims=True)) * store.heads / temperature)
    w = np.where(valid, w, 0.0)
    w /= w.sum(axis=2, keepdims=True)
    vals = np.asarray(store.values)[np.where(valid, i, 0)]
    match = vals[:, :, :, None] == targets[:, None, None, :]
    return (w[:, :, :, None] * match).sum(axis=2).mean(axis=1)


@dataclass(frozen=True)
class TuneResult:
    """The chosen settings and every setting's score."""

    k: int
    temperature: float
    lam: float
    metric: str              # "accuracy" (higher is better) or "nll" (lower is better)
    score: float
    plain_score: float
    table: list[dict[str, float]]


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
        hidden = model.hidden_states([toks], [span])
        delta = None if deltas is None else deltas[i]
        lp = np.asarray(model.token_logprobs(toks, span[0] + 1, delta), dtype=np.float64)
        out.append((hidden, lp, np.asarray(gold)))
    return out


def _tune_choice(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], ks: Sequence[int],
                 temperature_scales: Sequence[float], lams: Sequence[float], base_t: float
                 ) -> tuple[float, float, Entry, list[Entry]]:
    """The best accuracy (ties: the answer's mean log-probability), the
    plain model's, the best setting and every setting."""
    hidden, lps, labels, answers = _choice_parts(model, store, rows)
    dist, ids = store.search(model, hidden, ks[-1])
    width = max(len(l) for l in labels)
    targets = np.full((len(rows), width), -1, dtype=np.int64)
    plain = np.full((len(rows), width), -np.inf)
    for i, (l, lp) in enumerate(zip(labels, lps)):
        targets[i, :len(l)] = l
        plain[i, :len(l)] = lp
    p_plain = np.exp(plain)
    ans = np.asarray(answers)

    def score(p: np.ndarray) -> tuple[float, float]:
        acc = float(np.mean(np.argmax(p, axis=1) == ans))
        p_ans = p[np.arange(len(ans)), ans] / p.sum(axis=1)
        return acc, float(np.mean(np.log(np.maximum(p_ans, 1e-300))))
    plain_score = score(p_plain)
    table: list[Entry] = []
    best: Optional[tuple[tuple[float, float], Entry]] = None
    for k in ks:
        for scale in temperature_scales:
            r = _reference_mass(store, dist, ids, targets, k, base_t * scale)
            for lam in lams:
                s = score(lam * r + (1 - lam) * p_plain)
                entry = {"k": k, "temperature": base_t * scale, "lam": float(lam), "accuracy": s[0],
                         "answer_logprob": s[1]}
                table.append(entry)
                if best is None or s > best[0]:
                    best = (s, entry)
    assert best is not None
    return best[0][0], plain_score[0], best[1], table


def _tune_generation(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], ks: Sequence[int],
                     temperature_scales: Sequence[float], lams: Sequence[float], base_t: float
                     ) -> tuple[float, float, Entry, list[Entry]]:
    """The best gold-token NLL, the plain model's, the best setting and every setting."""
    parts = _generation_parts(model, store, rows)
    searched = [store.search(model, h, ks[-1]) for h, _, _ in parts]
    table: list[Entry] = []
    best: Optional[tuple[float, Entry]] = None
    for k in ks:
        for scale in temperature_scales:
            rs = [_reference_mass(store, d, i, g[:, None], k, base_t * scale)[:, 0]
                  for (d, i), (_, _, g) in zip(searched, parts)]
            for lam in lams:
                nll = float(np.mean(np.concatenate([
                    -np.log(lam * r + (1 - lam) * np.exp(lp)) for r, (_, lp, _) in zip(rs, parts)])))
                entry = {"k": k, "temperature": base_t * scale, "lam": float(lam), "nll": nll}
                table.append(entry)
                if best is None or nll < best[0]:
                    best = (nll, entry)
    assert best is not None
    plain = float(np.mean(np.concatenate([-lp for _, lp, _ in parts])))
    return best[0], plain, best[1], table


def tune(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
         ks: Sequence[int] = (8, 16, 32, 64, 128, 256), temperature_scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
         lams: Sequence[float] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85), save: bool = True,
         progress: bool = True) -> TuneResult:
    """Chooses k, temperature and lambda on validation rows (not in the
    datastore): accuracy for a choice datastore (ties by the answer's
    probability), gold-token NLL for a generation one. Neighbours are
    searched once; every setting is scored from them. With ``save``, the
    choice becomes the datastore's defaults."""
    rows = list(rows)
    if not rows:
        raise ValueError("tune needs validation rows")
    ks = sorted({min(int(k), len(store)) for k in ks if int(k) >= 1})
    if not ks:
        raise ValueError("no usable k")
    for lam in lams:
        _check_float("lam", lam, low=0.0, high=1.0)
    base_t = store.typical_distance(model, k=ks[len(ks) // 2])
    if store.mode == "choice":
        metric = "accuracy"
        best, plain, chosen, table = _tune_choice(model, store, rows, ks, temperature_scales, lams, base_t)
    else:
        metric = "nll"
        best, plain, chosen, table = _tune_generation(model, store, rows, ks, temperature_scales, lams, base_t)
    result = TuneResult(k=int(chosen["k"]), temperature=float(chosen["temperature"]), lam=float(chosen["lam"]),
                        metric=metric, score=float(best), plain_score=plain, table=table)
    if save:
        store.defaults.update({"k": result.k, "temperature": result.temperature, "lam": result.lam,
                               "tuned_on": len(rows), "tuned_metric": metric})
    return result


def generation_nll(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
                   rtd: Optional[RtdOption] = None,
                   deltas: Optional[Sequence[Optional[np.ndarray]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean gold-token NLL per row under the model and under the blend
    (settings from ``rtd`` or the datastore's defaults).

    With ``deltas`` (a SLOT delta per row, or None for a row without one),
    the model's distribution is the one shifted by each row's delta, and the
    blend is RTD on top of SLOT; the query stays the plain state, as in
    generation."""
    opt = (as_rtd(rtd) or RTD(store)).resolved()
    assert opt.k is not None and opt.temperature is not None and opt.lam is not None
    parts = _generation_parts(model, store, rows, deltas)
    model_nll, blended = [], []
    for h, lp, g in parts:
        d, i = store.search(model, h, opt.k, nprobe=opt.nprobe or 0)
        r = _reference_mass(store, d, i, g[:, None], opt.k, opt.temperature)[:, 0]
        model_nll.append(float(np.mean(-lp)))
        blended.append(float(np.mean(-np.log(opt.lam * r + (1 - opt.lam) * np.exp(lp)))))
    return np.asarray(model_nll), np.asarray(blended)
