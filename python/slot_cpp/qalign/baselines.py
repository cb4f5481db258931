"""QAlign's baselines on the same reward interface: best-of-n, majority vote
and weighted majority vote, over samples of the model's own distribution
(:data:`~slot_cpp.qalign.PROPOSAL`), ``n`` of them or up to a token budget
(:func:`sample_pool`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .._model import GenerationResult, Model, Prompt
from ..options import SamplingOptions
from .answers import Extractor, best_answer, sample_cost, vote, weighted_vote
from .proposal import proposal_options, split_sampling
from .rewards import RewardLike, as_reward, candidates_of, checked_scores

DEFAULT_N = 16
"""Samples a baseline draws when given neither ``n`` nor ``budget``."""


@dataclass(frozen=True)
class BaselineResult:
    answer: Optional[str]
    samples: list[GenerationResult]
    rewards: Optional[list[float]]
    votes: dict[str, float]
    generated_tokens: int
    """Tokens the samples drew, an end-of-sequence token counted as one."""


def _samples(model: Model, prompt: Prompt, n: int, sampling: SamplingOptions, delta: Optional[np.ndarray],
             **kwargs: Any) -> list[GenerationResult]:
    """n samples of the proposal ``sampling`` (sample i draws with its seed + i)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return model.generate_batch([prompt], n=n, sampling=sampling, delta=delta, **kwargs)


def _pool(model: Model, prompt: Prompt, budget: int, sampling: SamplingOptions, delta: Optional[np.ndarray],
          **kwargs: Any) -> list[GenerationResult]:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    max_tokens, seed = sampling.max_tokens, int(sampling.seed or 0)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    pool: list[GenerationResult] = []
    used = 0
    while used < budget:
        mean = used / len(pool) if pool else max_tokens
        n = max(1, min(model.n_parallel, math.ceil((budget - used) / max(1.0, mean))))
        for sample in _samples(model, prompt, n, sampling.replace(seed=seed + len(pool)), delta, **kwargs):
            if used >= budget:
                break
            pool.append(sample)
            used += sample_cost(sample)
    return pool


def sample_pool(model: Model, prompt: Prompt, *, budget: int, sampling: Optional[SamplingOptions] = None,
                delta: Optional[np.ndarray] = None, **options: Any) -> list[GenerationResult]:
    """Samples of the proposal (``sampling``, default
    :data:`~slot_cpp.qalign.PROPOSAL`, its fields also as keyword arguments)
    until their tokens reach ``budget``: sample i draws with ``seed + i``, and
    the pool is the shortest prefix of that sequence that reaches the budget,
    so it overshoots by less than one answer and a pool at a smaller budget
    is a prefix of this one. Drawn in batches sized by the mean answer so
    far. Other ``options`` (``rtd``, ``chat_template``, ...) go to
    :meth:`Model.generate_batch`."""
    changes, rest = split_sampling(options)
    return _pool(model, prompt, budget, proposal_options(sampling, changes), delta, **rest)


def _draw(model: Model, prompt: Prompt, n: Optional[int], budget: Optional[int],
          sampling: Optional[SamplingOptions], delta: Optional[np.ndarray],
          options: dict[str, Any]) -> list[GenerationResult]:
    """n samples, or samples up to a token budget (not both)."""
    if n is not None and budget is not None:
        raise ValueError("give n (samples) or budget (tokens), not both")
    changes, rest = split_sampling(options)
    group = proposal_options(sampling, changes)
    if budget is not None:
        return _pool(model, prompt, budget, group, delta, **rest)
    return _samples(model, prompt, DEFAULT_N if n is None else n, group, delta, **rest)


def _check_extract(extract: Extractor) -> None:
    if not callable(extract):
        raise TypeError("extract must be the task's answer extractor: extract(text) -> answer or None")


def best_of_n(model: Model, prompt: Prompt, *, reward: RewardLike, extract: Extractor, n: Optional[int] = None,
              budget: Optional[int] = None, sampling: Optional[SamplingOptions] = None,
              delta: Optional[np.ndarray] = None, **options: Any) -> BaselineResult:
    """Samples of the proposal (``n``, default 16, or up to ``budget``
    tokens: :func:`sample_pool`); the answer (``extract``: the task's answer
    extractor) of the one with the highest reward."""
    _check_extract(extract)
    rew = as_reward(reward)
    samples = _draw(model, prompt, n, budget, sampling, delta, options)
    rewards = checked_scores(rew, candidates_of(model, prompt, samples), [])
    chosen, _ = best_answer([extract(s.text) for s in samples], rewards)
    return BaselineResult(chosen, samples, rewards, {}, sum(sample_cost(s) for s in samples))


def majority_vote(model: Model, prompt: Prompt, *, extract: Extractor, n: Optional[int] = None,
                  budget: Optional[int] = None, sampling: Optional[SamplingOptions] = None,
                  delta: Optional[np.ndarray] = None, **options: Any) -> BaselineResult:
    """Samples of the proposal (``n``, default 16, or up to ``budget``
    tokens); the most frequent answer (``extract``: the task's answer extractor)."""
    _check_extract(extract)
    samples = _draw(model, prompt, n, budget, sampling, delta, options)
    chosen, votes = vote([extract(s.text) for s in samples])
    return BaselineResult(chosen, samples, None, votes, sum(sample_cost(s) for s in samples))


def weighted_majority_vote(model: Model, prompt: Prompt, *, reward: RewardLike, extract: Extractor,
                           n: Optional[int] = None, budget: Optional[int] = None,
                           sampling: Optional[SamplingOptions] = None, delta: Optional[np.ndarray] = None,
                           **options: Any) -> BaselineResult:
    """Samples of the proposal (``n``, default 16, or up to ``budget``
    tokens); each answer's mass is the sum of softmax(rewards) over the
    samples giving it (``extract``: the task's answer extractor)."""
    _check_extract(extract)
    rew = as_reward(reward)
    samples = _draw(model, prompt, n, budget, sampling, delta, options)
    rewards = checked_scores(rew, candidates_of(model, prompt, samples), [])
    chosen, mass = weighted_vote([extract(s.text) for s in samples], rewards)
    return BaselineResult(chosen, samples, rewards, mass, sum(sample_cost(s) for s in samples))
