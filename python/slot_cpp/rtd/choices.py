"""Multiple-choice questions scored by their option labels' probabilities,
with and without RTD (and SLOT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .._model import Model
from ..options import SlotOptions
from .prompts import DEFAULT_CHOICE_TEMPLATE, _label_tokens, format_choice_prompt
from .store import RtdOption, as_rtd


@dataclass(frozen=True)
class ChoiceScores:
    """Option probabilities (renormalised over the options) of one question:
    ``plain`` without RTD, ``rtd`` with it (None without), both under SLOT's
    delta when it was learned (``lr``: the step size used, 0 without SLOT)."""

    plain: np.ndarray
    rtd: Optional[np.ndarray]
    lr: float = 0.0

    @property
    def plain_choice(self) -> int:
        return int(np.argmax(self.plain))

    @property
    def rtd_choice(self) -> Optional[int]:
        return None if self.rtd is None else int(np.argmax(self.rtd))


def score_choices(model: Model, questions: Sequence[Mapping[str, Any]], *, rtd: Optional[RtdOption] = None,
                  shots: Sequence[Mapping[str, Any]] = (), template: Optional[str] = None, steps: int = 0,
                  lr: Union[float, str] = SlotOptions.lr, kl_budget: float = SlotOptions.kl_budget) -> list[ChoiceScores]:
    """For each ``{"question", "choices"}``: the probabilities of the option
    labels without and, with ``rtd``, with the blend, both renormalised over
    the options. With a choice datastore, its stored prompt format (shots,
    template) is used unless given. With ``steps`` > 0, SLOT learns a delta
    on each prompt (``lr``: a step size or "auto", with ``kl_budget``) and
    both are scored under it; RTD's query stays the plain state, as in
    generation."""
    option = as_rtd(rtd)
    if option is not None and option.datastore.mode == "choice" and template is None and not shots:
        fmt = option.datastore.choice_prompt
    else:
        tmpl = template or DEFAULT_CHOICE_TEMPLATE

        def fmt(question: str, choices: Sequence[str]) -> str:
            return format_choice_prompt(question, choices, shots, tmpl)
    prompts, labels = [], []
    for i, q in enumerate(questions):
        try:
            prompts.append(fmt(q["question"], q["choices"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"question {i}: {exc}") from None
        labels.append(_label_tokens(model, len(q["choices"])))
    plain = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, steps=steps, lr=lr,
                                 kl_budget=kl_budget)
    blended = None
    if option is not None:
        deltas = [r.delta for r in plain]
        blended = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, rtd=option,
                                       delta=deltas if steps > 0 else None)
    out = []
    for i in range(len(prompts)):
        p = _renormalise(plain[i].score_logprobs)
        r = _renormalise(blended[i].score_logprobs) if blended is not None else None
        out.append(ChoiceScores(p, r, float(plain[i].lr) if steps > 0 else 0.0))
    return out


def _renormalise(logprobs: Optional[Sequence[float]]) -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    if not np.any(np.isfinite(lp)):
        return np.full(lp.shape, 1.0 / lp.size)
    e = np.exp(lp - np.max(lp[np.isfinite(lp)]))
    return e / e.sum()
