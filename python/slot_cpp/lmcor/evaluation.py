"""Evaluating LMCor against the generator's greedy answer and the pool's
oracle: exact match, chrF and BLEU (sacrebleu), with paired differences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .._model import Model
from .._progress import Progress
from ..options import check_int as _check_int
from .candidates import generate_candidates
from .corrector import Corrector


def _import_sacrebleu() -> Any:
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("lmcor evaluation needs sacrebleu: pip install 'slot_cpp[lmcor]'") from None
    return sacrebleu


def _norm(text: str) -> str:
    return " ".join(text.split())


@dataclass
class SystemScore:
    """One system's scores over the evaluated rows."""

    name: str
    exact_match: float
    exact_match_ci: float        # half-width of the 95% interval
    chrf: float                  # corpus chrF
    bleu: float                  # corpus BLEU
    sentence_chrf: float         # mean sentence chrF
    sentence_chrf_ci: float


@dataclass
class PairedDiff:
    """LMCor minus another system, per row, with a 95% interval."""

    versus: str
    exact_match: float
    exact_match_ci: float
    sentence_chrf: float
    sentence_chrf_ci: float
    better: int                  # rows where LMCor's sentence chrF is higher
    worse: int


@dataclass
class EvalReport:
    rows: int
    k: int
    systems: list[SystemScore]
    paired: list[PairedDiff]
    generator_seconds: float     # per row
    corrector_seconds: float     # per row
    records: list[dict[str, Any]] = field(default_factory=list)


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    if a.size < 2:
        return float(a.mean()), float("nan")
    return float(a.mean()), float(1.96 * a.std(ddof=1) / math.sqrt(a.size))


def evaluate(
    generator: Model,
    corrector: Corrector,
    rows: Sequence[dict[str, str]],
    *,
    batch_size: int = 16,
    progress: bool = False,
    on_record: Optional[Callable[[dict[str, Any]], None]] = None,
    **candidate_options: Any,
) -> EvalReport:
    """Generator greedy (candidate 1), the oracle (the candidate with the best
    sentence chrF against the target: the pool's headroom) and LMCor, on
    ``{"input", "target"}`` rows: exact match, corpus chrF and BLEU
    (sacrebleu), mean sentence chrF, and LMCor's paired differences.
    ``candidate_options`` go to :func:`generate_candidates` (prompt, k,
    temperature, seed, SLOT/RTD options)."""
    sacrebleu = _import_sacrebleu()
    batch_size = _check_int("batch_size", batch_size, 1)
    if len(rows) == 0:
        raise ValueError("no rows to evaluate")
    k = int(candidate_options.get("k", 5))
    base_seed = int(candidate_options.pop("seed", 0))
    records: list[dict[str, Any]] = []
    sentence_chrf: dict[str, list[float]] = {"greedy": [], "oracle": []}
    gen_s = cor_s = 0.0
    bar = Progress(len(rows), "lmcor eval", progress)
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            inputs = [r["input"] for r in chunk]
            pools = generate_candidates(generator, inputs,
                                        seeds=[base_seed + (start + i) * k for i in range(len(chunk))],
                                        **candidate_options)
            outs = corrector.rewrite_batch(inputs, [p.texts for p in pools])
            for r, p, c in zip(chunk, pools, outs):
                scores = [sacrebleu.sentence_chrf(t, [r["target"]]).score for t in p.texts]
                best = int(np.argmax(scores))
                # Kept for the summary, which would otherwise score these again.
                sentence_chrf["greedy"].append(scores[0])
                sentence_chrf["oracle"].append(scores[best])
                rec = {"input": r["input"], "target": r["target"], "candidates": p.texts, "greedy": p.texts[0],
                       "oracle": p.texts[best], "lmcor": c.text, "dropped": c.dropped,
                       "generator_seconds": p.seconds, "corrector_seconds": c.corrector_seconds,
                       "generator_tokens": p.generated_tokens, "corrector_tokens": c.corrector_tokens}
                records.append(rec)
                gen_s += p.seconds
                cor_s += c.corrector_seconds
                if on_record is not None:
                    on_record(rec)
            bar.update(len(chunk))
    finally:
        bar.close()
    systems, paired = _scores(sacrebleu, records, sentence_chrf)
    return EvalReport(rows=len(records), k=k, systems=systems, paired=paired,
                      generator_seconds=gen_s / len(records), corrector_seconds=cor_s / len(records),
                      records=records)


def _scores(sacrebleu: Any, records: Sequence[dict[str, Any]], sentence_chrf: dict[str, list[float]]
            ) -> tuple[list[SystemScore], list[PairedDiff]]:
    """Each system's scores, and LMCor's paired differences to the others.
    ``sentence_chrf`` holds the greedy and oracle rows' scores already."""
    targets = [r["target"] for r in records]
    sentence_chrf["lmcor"] = [sacrebleu.sentence_chrf(r["lmcor"], [r["target"]]).score for r in records]
    systems, per_row = [], {}
    for name in ("greedy", "oracle", "lmcor"):
        hyps = [r[name] for r in records]
        em = [float(_norm(h) == _norm(t)) for h, t in zip(hyps, targets)]
        sc = sentence_chrf[name]
        per_row[name] = (em, sc)
        em_m, em_ci = _mean_ci(em)
        sc_m, sc_ci = _mean_ci(sc)
        systems.append(SystemScore(name=name, exact_match=em_m, exact_match_ci=em_ci,
                                   chrf=float(sacrebleu.corpus_chrf(hyps, [targets]).score),
                                   bleu=float(sacrebleu.corpus_bleu(hyps, [targets]).score),
                                   sentence_chrf=sc_m, sentence_chrf_ci=sc_ci))
    paired = []
    for other in ("greedy", "oracle"):
        d_em = np.subtract(per_row["lmcor"][0], per_row[other][0])
        d_sc = np.subtract(per_row["lmcor"][1], per_row[other][1])
        em_m, em_ci = _mean_ci(d_em)
        sc_m, sc_ci = _mean_ci(d_sc)
        paired.append(PairedDiff(versus=other, exact_match=em_m, exact_match_ci=em_ci, sentence_chrf=sc_m,
                                 sentence_chrf_ci=sc_ci, better=int((d_sc > 1e-9).sum()),
                                 worse=int((d_sc < -1e-9).sum())))
    return systems, paired
