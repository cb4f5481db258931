"""The answer a QAlign run or a baseline gives: the chain's states, voting
and minimum Bayes risk, and the equal-compute bookkeeping (the tokens each
sample or step drew, the prefix of a pool or chain that a smaller budget
keeps). Nothing here runs a model."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from .._model import GenerationResult

Extractor = Callable[[str], Optional[str]]
"""A task's answer extractor: the answer a response gives (None: none)."""


@dataclass(frozen=True)
class ChainState:
    """The chain after one step (step 0: the initial sample)."""

    step: int
    tokens: list[int]
    """The response's tokens (without the end-of-sequence token)."""
    text: str
    reward: float
    accepted: bool
    """Whether this step's proposal was accepted (step 0: True)."""
    ended: bool
    """The response ended with end-of-sequence (|y| counts that token)."""
    generated: int = 0
    """Tokens sampled by all the run's chains up to and including this step."""

    @property
    def length(self) -> int:
        """|y| of the acceptance rule."""
        return len(self.tokens) + (1 if self.ended else 0)


def terminal(result: GenerationResult) -> bool:
    """The response ended with an end-of-sequence token (not in its tokens)."""
    return result.finish_reason == "eos"


def sample_cost(sample: GenerationResult) -> int:
    """Tokens a sample drew: its tokens, plus one for an end-of-sequence token
    (the count QAlign's budget uses)."""
    return sample.generated_tokens + (1 if terminal(sample) else 0)


def pool_prefix(costs: Sequence[int], budget: int) -> int:
    """How many samples of a pool (each costing ``costs[i]`` tokens) a run
    with ``budget`` keeps: the shortest prefix whose tokens reach the budget
    (the whole pool if none does)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    used = 0
    for i, cost in enumerate(costs):
        used += cost
        if used >= budget:
            return i + 1
    return len(costs)


def step_costs(generated: Sequence[int]) -> list[int]:
    """The tokens each step sampled, from the running totals of ``ChainState.generated``."""
    return [b - a for a, b in zip([0, *generated], generated)]


def chain_prefix(chains: Sequence[Sequence[ChainState]], budget: int) -> list[list[ChainState]]:
    """The states a run with ``budget`` would have had: every chain's steps up
    to the first whose sampled tokens reach the budget (all of them if none
    does), as :func:`~slot_cpp.qalign.qalign` stops with that budget and the same seed."""
    generated = [state.generated for state in chains[0]] if chains else []
    keep = pool_prefix(step_costs(generated), budget)
    return [list(chain[:keep]) for chain in chains]


def vote(answers: Sequence[Optional[str]]) -> tuple[Optional[str], dict[str, float]]:
    """Majority vote: the most frequent answer (ties: the earliest seen;
    None answers do not vote) and the counts."""
    counts = Counter(a for a in answers if a is not None)  # keeps first-seen order for max's ties
    chosen = max(counts, key=counts.__getitem__) if counts else None
    return chosen, {k: float(v) for k, v in counts.items()}


def best_answer(answers: Sequence[Optional[str]], rewards: Sequence[float]) -> tuple[Optional[str], int]:
    """Best-of-n: the answer of the highest reward (ties: the earliest) and its index."""
    if not answers or len(answers) != len(rewards):
        raise ValueError("best_answer needs one reward per answer, and at least one")
    best = int(np.argmax(rewards))
    return answers[best], best


def weighted_vote(answers: Sequence[Optional[str]], rewards: Sequence[float]
                  ) -> tuple[Optional[str], dict[str, float]]:
    """Weighted majority vote: each answer's mass is the sum of
    softmax(rewards) over the samples giving it; the heaviest, and the masses."""
    if len(answers) != len(rewards):
        raise ValueError("weighted_vote needs one reward per answer")
    if not answers:
        return None, {}
    r = np.asarray(rewards, dtype=float)
    weights = np.exp(r - r.max())
    weights /= weights.sum()
    mass: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            mass[a] = mass.get(a, 0.0) + float(w)
    return (max(mass, key=lambda k: mass[k]) if mass else None), mass


def rouge1_f1(a: str, b: str) -> float:
    """ROUGE-1 F1 between two texts (lower-cased whitespace tokens)."""
    ta, tb = Counter(a.lower().split()), Counter(b.lower().split())
    overlap = sum((ta & tb).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(tb.values()), overlap / sum(ta.values())
    return 2 * precision * recall / (precision + recall)


def mbr_choice(texts: Sequence[str], states: Sequence[ChainState]) -> Optional[ChainState]:
    """The state whose text has the highest mean ROUGE-1 F1 to the others."""
    if not states:
        return None
    if len(states) == 1:
        return states[0]
    unique = list(dict.fromkeys(texts))
    weight = Counter(texts)
    best, best_score = None, -1.0
    for t in unique:
        total = sum(weight[u] * rouge1_f1(t, u) for u in unique) - 1.0  # less itself (F1 = 1)
        score = total / (len(texts) - 1)
        if score > best_score:
            best, best_score = t, score
    return next(s for s in states if s.text == best)


def check_answer(answer: str, extract: Optional[Extractor]) -> None:
    """``answer`` is "vote" (which needs the task's extractor) or "mbr"."""
    if answer not in ("vote", "mbr"):
        raise ValueError("answer must be 'vote' or 'mbr'")
    if answer == "vote" and extract is None:
        raise ValueError("answer='vote' needs extract, the task's answer extractor "
                         "(e.g. slot_cpp.gsm8k.extract_answer); answer='mbr' needs none")
    if extract is not None and not callable(extract):
        raise TypeError("extract must be callable: extract(text) -> answer or None")


def chain_answer(kept: Sequence[ChainState], answer: str = "vote", extract: Optional[Extractor] = None
                 ) -> tuple[Optional[str], Optional[ChainState], dict[str, float]]:
    """The answer QAlign gives from these states (``answer``: "vote", the
    majority of ``extract`` over them, or "mbr"), a state giving it, and the
    votes (for "vote")."""
    check_answer(answer, extract)
    votes: dict[str, float] = {}
    chosen: Optional[str] = None
    chosen_state: Optional[ChainState] = None
    if answer == "vote":
        assert extract is not None
        answers = [extract(state.text) for state in kept]
        chosen, votes = vote(answers)
        if chosen is not None:
            chosen_state = kept[answers.index(chosen)]
    else:
        chosen_state = mbr_choice([state.text for state in kept], list(kept))
        chosen = chosen_state.text if chosen_state is not None else None
    return chosen, chosen_state, votes
