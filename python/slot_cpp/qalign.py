"""QAlign: test-time alignment by Metropolis-Hastings under a reward
(arXiv 2504.03790, the QUEST sampler), with the language model as proposal.

The chain samples responses y from pi(y | x) proportional to
p(y | x) * exp(r(x, y) / beta):

1. y0 ~ p(. | x), drawn at temperature 1 (no top-p or min-p; ``top_k``
   restricts the proposal, and then p is the top-k-truncated distribution).
2. Each step picks i uniformly in {0, ..., |y| - 1}, keeps y[:i] and draws a
   new suffix from p(. | x, y[:i]): that is y'. The fork reuses the KV cells
   of x + y[:i] from the engine's cache, so only the new suffix is evaluated.
3. y' is accepted with probability min(1, exp((r(y') - r(y)) / beta) * |y| / |y'|),
   computed in log space.

|y| counts tokens, the end-of-sequence token included when the response
ended with one (a response cut by max_tokens has no such token). With stop
strings, a response ends at the token that completes the stop string. With a
``delta`` (SLOT), p is the model's distribution under delta's logit bias.

The answer is a majority vote over the chain's states (an answer extractor:
GSM8K's final number by default) or, for free text, the state with the
highest mean ROUGE-1 F1 to the others (minimum Bayes risk). Baselines on the
same reward interface: :func:`best_of_n`, :func:`majority_vote`,
:func:`weighted_majority_vote`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np

from . import gsm8k
from ._model import GenerationResult, Model, Prompt

__all__ = [
    "CallableReward",
    "ChainState",
    "QAlignResult",
    "Reward",
    "RewardError",
    "best_of_n",
    "majority_vote",
    "qalign",
    "rouge1_f1",
    "weighted_majority_vote",
]

Extractor = Callable[[str], Optional[str]]


class RewardError(RuntimeError):
    """A reward raised or returned a non-finite value. ``chains`` holds every
    chain as it stood before the failing step."""

    def __init__(self, message: str, chains: list[list["ChainState"]]) -> None:
        super().__init__(message)
        self.chains = chains


class Reward:
    """Scores (prompt, response) pairs; higher is better. Subclasses implement
    :meth:`score` for a batch of pairs."""

    name: str = "reward"

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        raise NotImplementedError


class CallableReward(Reward):
    """A Python function ``fn(prompt, response) -> float`` as a reward (exact
    answer checkers, regular expressions, unit tests)."""

    def __init__(self, fn: Callable[[str, str], float], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError("the reward must be callable: fn(prompt, response) -> float")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [float(self.fn(p, r)) for p, r in pairs]


RewardLike = Union[Reward, Callable[[str, str], float]]


def as_reward(reward: RewardLike) -> Reward:
    if isinstance(reward, Reward):
        return reward
    return CallableReward(reward)


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

    @property
    def length(self) -> int:
        """|y| of the acceptance rule."""
        return len(self.tokens) + (1 if self.ended else 0)


@dataclass(frozen=True)
class QAlignResult:
    chains: list[list[ChainState]]
    """Every chain's states, one per step, step 0 first."""
    answer: Optional[str]
    """The majority answer over the states (or the MBR text)."""
    answer_state: Optional[ChainState]
    """A state whose answer is the chosen one (the MBR state for free text)."""
    accept_rate: float
    generated_tokens: int
    """Tokens sampled by the proposal (the compute of the method)."""
    decoded_tokens: int
    """Tokens the engine evaluated (prompt, forks' re-evaluated token, suffixes)."""
    reward_calls: int
    votes: dict[str, float] = field(default_factory=dict)

    @property
    def chain(self) -> list[ChainState]:
        """The first chain."""
        return self.chains[0]


def _terminal(result: GenerationResult) -> bool:
    """The response ended with an end-of-sequence token (not in its tokens)."""
    return result.finish_reason == "eos"


def _prompt_text(model: Model, prompt: Prompt) -> str:
    return model.detokenize(model.prompt_tokens(prompt))


def _score(reward: Reward, prompt_text: str, texts: Sequence[str], chains: list[list[ChainState]]) -> list[float]:
    try:
        values = reward.score([(prompt_text, t) for t in texts])
    except Exception as exc:
        raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}", chains) from exc
    values = list(values)
    if len(values) != len(texts):
        raise RewardError(f"reward {reward.name!r} returned {len(values)} scores for {len(texts)} responses",
                          chains)
    for v in values:
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(float(v)):
            raise RewardError(f"reward {reward.name!r} returned a non-finite or non-numeric score: {v!r}",
                              chains)
    return [float(v) for v in values]


def log_acceptance(r_new: float, r_old: float, len_new: int, len_old: int, beta: float) -> float:
    """log of the acceptance probability min(1, exp((r'-r)/beta) * |y| / |y'|)."""
    value = (r_new - r_old) / beta + math.log(len_old) - math.log(len_new)
    return min(0.0, value)


def qalign(
    model: Model,
    prompt: Prompt,
    *,
    reward: RewardLike,
    beta: float = 1.0,
    steps: int = 64,
    max_tokens: int = 256,
    chains: int = 1,
    seed: int = 0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    delta: Optional[np.ndarray] = None,
    answer: str = "vote",
    extract: Optional[Extractor] = None,
    burn_in: int = 0,
    chat_template: Optional[str] = None,
    system: Optional[str] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    on_step: Optional[Callable[[int, float, float], None]] = None,
) -> QAlignResult:
    """Run ``chains`` QAlign chains of ``steps`` steps on one prompt, side by
    side (one batched decode per step for all chains).

    ``answer="vote"`` takes the majority of ``extract`` (default: GSM8K's
    final number) over the states after ``burn_in``; ``answer="mbr"`` the state
    with the highest mean ROUGE-1 F1 to the others. ``on_step(step,
    accept_rate, mean_reward)`` is called after every step (progress bars).
    """
    if not isinstance(model, Model):
        raise TypeError("model must be a slot_cpp.Model")
    rew = as_reward(reward)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    for name, value, low in (("steps", steps, 1), ("max_tokens", max_tokens, 1), ("chains", chains, 1),
                             ("top_k", top_k, 0), ("burn_in", burn_in, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if burn_in > steps:
        raise ValueError("burn_in must be <= steps")
    if answer not in ("vote", "mbr"):
        raise ValueError("answer must be 'vote' or 'mbr'")
    if 2 * chains > model.n_parallel:
        # Each chain's state and its proposal hold a sequence at once, so that
        # proposals fork the state's cells instead of evaluating the prefix again.
        raise ValueError(f"{chains} chain(s) need n_parallel >= {2 * chains}; the model has {model.n_parallel}")
    extract = extract or gsm8k.extract_answer
    if prompt_token_ids is not None:
        x = list(prompt_token_ids)
        if not x:
            raise ValueError("the prompt is empty")
    else:
        x = model.prompt_tokens(prompt, chat_template=chat_template, system=system)
    prompt_text = model.detokenize(x)
    rng = np.random.default_rng(seed)
    stops = list(stop)

    def text_of(tokens: list[int]) -> str:
        text = model.detokenize(tokens)
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return text[:cut] if cut >= 0 else text

    proposal = dict(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, repeat_penalty=1.0, stop=list(stop),
                    delta=delta)

    def draw(prefixes: list[list[int]], budgets: list[int]) -> list[GenerationResult]:
        seeds = [int(s) for s in rng.integers(0, 2**62, size=len(prefixes))]
        return model.generate_batch([x] * len(prefixes), response_prefix=prefixes, max_tokens=budgets,
                                    seed=seeds, **proposal)

    decoded_before = model.decoded_tokens
    first = draw([[] for _ in range(chains)], [max_tokens] * chains)
    texts = [text_of(list(r.tokens)) for r in first]
    history: list[list[ChainState]] = [[] for _ in range(chains)]
    rewards = _score(rew, prompt_text, texts, history)
    reward_calls = chains
    generated = sum(r.generated_tokens + (1 if _terminal(r) else 0) for r in first)
    for c, r in enumerate(first):
        history[c].append(ChainState(0, list(r.tokens), texts[c], rewards[c], True, _terminal(r)))
    accepted = 0
    for step in range(1, steps + 1):
        current = [h[-1] for h in history]
        cut = [int(rng.integers(0, s.length)) for s in current]
        results = draw([s.tokens[:i] for s, i in zip(current, cut)], [max_tokens - i for i in cut])
        texts = [text_of(s.tokens[:i] + list(r.tokens)) for s, i, r in zip(current, cut, results)]
        new_rewards = _score(rew, prompt_text, texts, history)
        reward_calls += chains
        u = rng.random(chains)
        dead: list[tuple[list[int], list[int]]] = []
        for c, (s, i, r) in enumerate(zip(current, cut, results)):
            generated += r.generated_tokens + (1 if _terminal(r) else 0)
            tokens = s.tokens[:i] + list(r.tokens)
            proposed = ChainState(step, tokens, texts[c], new_rewards[c], True, _terminal(r))
            log_a = log_acceptance(proposed.reward, s.reward, proposed.length, s.length, float(beta))
            if math.log(max(u[c], 1e-300)) < log_a:
                history[c].append(proposed)
                accepted += 1
                dead.append((s.tokens, tokens))
            else:
                history[c].append(ChainState(step, s.tokens, s.text, s.reward, False, s.ended))
                dead.append((tokens, s.tokens))
        # Drop each step's losing branch from the cache, from its first token
        # that the chain's state does not share, so that the state's cells
        # stay for the next proposals to fork.
        for lost, kept in dead:
            k = next((j for j, (a, b) in enumerate(zip(lost, kept)) if a != b), None)
            if k is None and len(lost) > len(kept):
                k = len(kept)
            if k is not None:
                model.drop_cached(x + lost[:k + 1])
        if on_step is not None:
            on_step(step, accepted / (step * chains), float(np.mean([h[-1].reward for h in history])))

    kept = [s for h in history for s in h[burn_in:]]
    votes: dict[str, float] = {}
    chosen: Optional[str] = None
    chosen_state: Optional[ChainState] = None
    if answer == "vote":
        counts = Counter(a for a in (extract(s.text) for s in kept) if a is not None)
        votes = {k: float(v) for k, v in counts.items()}
        if counts:
            chosen = max(counts, key=lambda k: (counts[k], -_first_index(kept, extract, k)))
            chosen_state = next(s for s in kept if extract(s.text) == chosen)
    else:
        chosen_state = mbr_choice([s.text for s in kept], kept)
        chosen = chosen_state.text if chosen_state is not None else None
    return QAlignResult(
        chains=history, answer=chosen, answer_state=chosen_state,
        accept_rate=accepted / (steps * chains), generated_tokens=generated,
        decoded_tokens=model.decoded_tokens - decoded_before, reward_calls=reward_calls, votes=votes,
    )


def _first_index(states: Sequence[ChainState], extract: Extractor, value: str) -> int:
    return next(k for k, s in enumerate(states) if extract(s.text) == value)


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


@dataclass(frozen=True)
class BaselineResult:
    answer: Optional[str]
    samples: list[GenerationResult]
    rewards: Optional[list[float]]
    votes: dict[str, float]
    generated_tokens: int


def _samples(model: Model, prompt: Prompt, n: int, max_tokens: int, seed: int, top_k: int,
             stop: Sequence[str], delta: Optional[np.ndarray], **kwargs: object) -> list[GenerationResult]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return model.generate_batch([prompt], n=n, max_tokens=max_tokens, seed=seed, temperature=1.0, top_k=top_k,
                                top_p=1.0, min_p=0.0, stop=list(stop), delta=delta, **kwargs)


def best_of_n(model: Model, prompt: Prompt, *, reward: RewardLike, n: int = 16, max_tokens: int = 256,
              seed: int = 0, top_k: int = 0, stop: Sequence[str] = (), delta: Optional[np.ndarray] = None,
              extract: Optional[Extractor] = None, **kwargs: object) -> BaselineResult:
    """n samples at temperature 1; the answer of the one with the highest reward."""
    rew, extract = as_reward(reward), extract or gsm8k.extract_answer
    samples = _samples(model, prompt, n, max_tokens, seed, top_k, stop, delta, **kwargs)
    rewards = _score(rew, _prompt_text(model, prompt), [s.text for s in samples], [])
    best = int(np.argmax(rewards))
    return BaselineResult(extract(samples[best].text), samples, rewards, {},
                          sum(s.generated_tokens for s in samples))


def majority_vote(model: Model, prompt: Prompt, *, n: int = 16, max_tokens: int = 256, seed: int = 0,
                  top_k: int = 0, stop: Sequence[str] = (), delta: Optional[np.ndarray] = None,
                  extract: Optional[Extractor] = None, **kwargs: object) -> BaselineResult:
    """n samples at temperature 1; the most frequent extracted answer."""
    extract = extract or gsm8k.extract_answer
    samples = _samples(model, prompt, n, max_tokens, seed, top_k, stop, delta, **kwargs)
    answers = [extract(s.text) for s in samples]
    counts = Counter(a for a in answers if a is not None)
    chosen = max(counts, key=lambda k: (counts[k], -answers.index(k))) if counts else None
    return BaselineResult(chosen, samples, None, {k: float(v) for k, v in counts.items()},
                          sum(s.generated_tokens for s in samples))


def weighted_majority_vote(model: Model, prompt: Prompt, *, reward: RewardLike, n: int = 16,
                           max_tokens: int = 256, seed: int = 0, top_k: int = 0, stop: Sequence[str] = (),
                           delta: Optional[np.ndarray] = None, extract: Optional[Extractor] = None,
                           **kwargs: object) -> BaselineResult:
    """n samples; each answer's mass is the sum of softmax(rewards) over the samples giving it."""
    rew, extract = as_reward(reward), extract or gsm8k.extract_answer
    samples = _samples(model, prompt, n, max_tokens, seed, top_k, stop, delta, **kwargs)
    rewards = _score(rew, _prompt_text(model, prompt), [s.text for s in samples], [])
    r = np.asarray(rewards)
    weights = np.exp(r - r.max())
    weights /= weights.sum()
    mass: dict[str, float] = {}
    for s, w in zip(samples, weights):
        a = extract(s.text)
        if a is not None:
            mass[a] = mass.get(a, 0.0) + float(w)
    chosen = max(mass, key=lambda k: mass[k]) if mass else None
    return BaselineResult(chosen, samples, rewards, mass, sum(s.generated_tokens for s in samples))
