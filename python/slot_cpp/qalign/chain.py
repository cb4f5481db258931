"""The QAlign chain: Metropolis-Hastings over whole answers, with the
language model as its proposal (see :mod:`slot_cpp.qalign`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .._model import GenerationResult, Model, Prompt
from ..options import QAlignOptions, SamplingOptions
from .answers import ChainState, Extractor, chain_answer, check_answer, terminal
from .proposal import proposal_options, split_sampling
from .rewards import Candidate, RewardLike, TokenMeter, as_reward, checked_scores

_QALIGN_NAMES = frozenset(("steps", "beta"))


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
    """Tokens the policy's engine evaluated for the chain (prompt, forks'
    re-evaluated token, suffixes), the reward's excluded."""
    reward_tokens: int
    """Tokens the reward's model evaluated (0 for a Python reward)."""
    reward_calls: int
    votes: dict[str, float] = field(default_factory=dict)

    @property
    def chain(self) -> list[ChainState]:
        """The first chain."""
        return self.chains[0]


def log_acceptance(r_new: float, r_old: float, len_new: int, len_old: int, beta: float) -> float:
    """log of the acceptance probability min(1, exp((r'-r)/beta) * |y| / |y'|)."""
    value = (r_new - r_old) / beta + math.log(len_old) - math.log(len_new)
    return min(0.0, value)


def _check_qalign_options(model: Model, *, steps: int, max_tokens: int, chains: int, burn_in: int,
                          budget: Optional[int]) -> None:
    """The checks the option groups do not make (beta, steps, top_k and seed are theirs)."""
    for name, value, low in (("max_tokens", max_tokens, 1), ("chains", chains, 1), ("burn_in", burn_in, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if burn_in > steps:
        raise ValueError("burn_in must be <= steps")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if 2 * chains > model.n_parallel:
        # Each chain's state and its proposal hold a sequence at once, so that
        # proposals fork the state's cells instead of evaluating the prefix again.
        raise ValueError(f"{chains} chain(s) need n_parallel >= {2 * chains}; the model has {model.n_parallel}")


def _accept_or_keep(history: list[list[ChainState]], step: int, proposals: list[list[int]],
                    results: Sequence[GenerationResult], texts: list[str], rewards: list[float],
                    u: np.ndarray, beta: float) -> tuple[int, int, list[tuple[list[int], list[int]]]]:
    """Appends each chain's next state: its proposal if accepted, else its
    current state again. Returns the proposals accepted, the tokens they
    sampled, and each chain's (losing, surviving) responses."""
    accepted = generated = 0
    branches: list[tuple[list[int], list[int]]] = []
    for c, (tokens, r) in enumerate(zip(proposals, results)):
        s = history[c][-1]
        generated += r.generated_tokens + (1 if terminal(r) else 0)
        proposed = ChainState(step, tokens, texts[c], rewards[c], True, terminal(r))
        log_a = log_acceptance(proposed.reward, s.reward, proposed.length, s.length, beta)
        if math.log(max(u[c], 1e-300)) < log_a:
            history[c].append(proposed)
            accepted += 1
            branches.append((s.tokens, tokens))
        else:
            history[c].append(ChainState(step, s.tokens, s.text, s.reward, False, s.ended))
            branches.append((tokens, s.tokens))
    return accepted, generated, branches


def _drop_lost_branches(model: Model, x: list[int], branches: list[tuple[list[int], list[int]]]) -> None:
    """Drops each step's losing branch from the cache, from its first token
    that the chain's state does not share, so that the state's cells stay
    for the next proposals to fork."""
    for lost, survivor in branches:
        k = next((j for j, (a, b) in enumerate(zip(lost, survivor)) if a != b), None)
        if k is None and len(lost) > len(survivor):
            k = len(survivor)
        if k is not None:
            model.drop_cached(x + lost[:k + 1])


def qalign(
    model: Model,
    prompt: Prompt,
    *,
    reward: RewardLike,
    options: Optional[QAlignOptions] = None,
    sampling: Optional[SamplingOptions] = None,
    chains: int = 1,
    answer: str = "vote",
    extract: Optional[Extractor] = None,
    burn_in: int = 0,
    budget: Optional[int] = None,
    delta: Optional[np.ndarray] = None,
    rtd: Any = None,
    chat_template: Optional[str] = None,
    system: Optional[str] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    on_step: Optional[Callable[[int, float, float], None]] = None,
    **overrides: Any,
) -> QAlignResult:
    """Run ``chains`` QAlign chains of ``steps`` steps on one prompt, side by
    side (one batched decode per step for all chains).

    ``options`` (:class:`~slot_cpp.options.QAlignOptions`: ``steps``,
    ``beta``) and ``sampling`` (the proposal's
    :class:`~slot_cpp.options.SamplingOptions`, default
    :data:`~slot_cpp.qalign.PROPOSAL`: ``max_tokens``, ``seed``, ``top_k``,
    ``stop``, ``grammar``, ``json_schema``, ``logit_bias``) may also be given
    field by field as keyword arguments, which override the groups. ``delta``
    (SLOT's) and ``rtd`` (a :class:`slot_cpp.rtd.Datastore` or
    :class:`~slot_cpp.rtd.RTD`) shape the proposal: the caller composes them.

    ``answer="vote"`` takes the majority of ``extract`` (the task's answer
    extractor, e.g. :func:`slot_cpp.gsm8k.extract_answer`; required for a
    vote) over the states after ``burn_in``; ``answer="mbr"`` the state with
    the highest mean ROUGE-1 F1 to the others. ``on_step(step, accept_rate,
    mean_reward)`` is called after every step (progress bars). With
    ``budget``, the chains stop after the step at which the tokens sampled so
    far reach it (``steps`` stays an upper bound), for comparisons with other
    methods at equal compute. With ``grammar`` or ``json_schema`` the
    proposals are constrained, and the chain targets p_c(y) exp(r/beta), p_c
    the product of the masked, renormalised next-token probabilities.
    """
    if not isinstance(model, Model):
        raise TypeError("model must be a slot_cpp.Model")
    rew = as_reward(reward)
    group_changes, rest = split_sampling(overrides)
    qalign_changes = {k: v for k, v in rest.items() if k in _QALIGN_NAMES}
    unknown = sorted(set(rest) - _QALIGN_NAMES)
    if unknown:
        raise TypeError(f"qalign() got unexpected keyword argument(s): {', '.join(unknown)}")
    settings = QAlignOptions() if options is None else options
    if not isinstance(settings, QAlignOptions):
        raise TypeError(f"options must be a slot_cpp.options.QAlignOptions, got {type(settings).__name__}")
    if qalign_changes:
        settings = settings.replace(**qalign_changes)
    proposal_group = proposal_options(sampling, group_changes)
    steps, beta, max_tokens = settings.steps, settings.beta, proposal_group.max_tokens
    _check_qalign_options(model, steps=steps, max_tokens=max_tokens, chains=chains, burn_in=burn_in, budget=budget)
    check_answer(answer, extract)
    if 2 * chains > model.n_parallel:
        # Each chain's state and its proposal hold a sequence at once, so that
        # proposals fork the state's cells instead of evaluating the prefix again.
        raise ValueError(f"{chains} chain(s) need n_parallel >= {2 * chains}; the model has {model.n_parallel}")
    if prompt_token_ids is not None:
        x = list(prompt_token_ids)
        if not x:
            raise ValueError("the prompt is empty")
    else:
        x = model.prompt_tokens(prompt, chat_template=chat_template, system=system)
    prompt_text = model.detokenize(x)
    rng = np.random.default_rng(proposal_group.seed)
    stops = list(proposal_group.stop)

    def text_of(tokens: list[int]) -> str:
        text = model.detokenize(tokens)
        cut = min((text.find(marker) for marker in stops if marker in text), default=-1)
        return text[:cut] if cut >= 0 else text

    def draw(prefixes: list[list[int]], budgets: list[int]) -> list[GenerationResult]:
        seeds = [int(s) for s in rng.integers(0, 2**62, size=len(prefixes))]
        return model.generate_batch([x] * len(prefixes), response_prefix=prefixes, max_tokens=budgets,
                                    seed=seeds, sampling=proposal_group, delta=delta, rtd=rtd)

    def candidates(responses: list[list[int]], response_texts: list[str]) -> list[Candidate]:
        return [Candidate(prompt_text, t, tuple(x), tuple(toks), model) for toks, t in zip(responses, response_texts)]

    decoded_before = model.decoded_tokens
    meter = TokenMeter()
    first = draw([[] for _ in range(chains)], [max_tokens] * chains)
    texts = [text_of(list(r.tokens)) for r in first]
    history: list[list[ChainState]] = [[] for _ in range(chains)]
    rewards = checked_scores(rew, candidates([list(r.tokens) for r in first], texts), history, meter)
    reward_calls = chains
    generated = sum(r.generated_tokens + (1 if terminal(r) else 0) for r in first)
    for c, r in enumerate(first):
        history[c].append(ChainState(0, list(r.tokens), texts[c], rewards[c], True, terminal(r), generated))
    accepted = 0
    steps_run = 0
    for step in range(1, steps + 1):
        if budget is not None and generated >= budget:
            break
        steps_run = step
        current = [h[-1] for h in history]
        cut = [int(rng.integers(0, s.length)) for s in current]
        results = draw([s.tokens[:i] for s, i in zip(current, cut)], [max_tokens - i for i in cut])
        proposals = [s.tokens[:i] + list(r.tokens) for s, i, r in zip(current, cut, results)]
        texts = [text_of(t) for t in proposals]
        new_rewards = checked_scores(rew, candidates(proposals, texts), history, meter)
        reward_calls += chains
        took, sampled, branches = _accept_or_keep(history, step, proposals, results, texts, new_rewards,
                                                  rng.random(chains), float(beta))
        accepted += took
        generated += sampled
        for h in history:
            h[-1] = replace(h[-1], generated=generated)
        _drop_lost_branches(model, x, branches)
        if on_step is not None:
            on_step(step, accepted / (step * chains), float(np.mean([h[-1].reward for h in history])))
    burn_in = min(burn_in, steps_run)
    kept: list[ChainState] = [state for h in history for state in h[burn_in:]]
    chosen, chosen_state, votes = chain_answer(kept, answer, extract)
    return QAlignResult(
        chains=history, answer=chosen, answer_state=chosen_state,
        accept_rate=accepted / max(1, steps_run * chains), generated_tokens=generated,
        decoded_tokens=model.decoded_tokens - decoded_before - (meter.tokens if rew.model is model else 0),
        reward_tokens=meter.tokens, reward_calls=reward_calls, votes=votes,
    )


@dataclass(frozen=True)
class QAlignSamples:
    """QAlign chains as a sampler of LMCor's candidates
    (:func:`slot_cpp.lmcor.generate_candidates`'s ``sampler``): sample j is
    the last state of chain j, after ``steps`` steps under ``reward`` (the
    chains run side by side, from the seed LMCor gives). The pool then leans
    toward answers the reward prefers."""

    reward: Any
    steps: int = QAlignOptions.steps
    beta: float = QAlignOptions.beta

    def __call__(self, generator: Model, prompt_ids: Sequence[int], n: int, seed: int,
                 sampling: SamplingOptions) -> tuple[list[str], int]:
        """``n`` texts from ``n`` chains on the prompt's tokens (the answers'
        ``max_tokens`` and ``stop`` from ``sampling``, the proposal
        otherwise QAlign's), and the tokens the chains sampled."""
        result = qalign(generator, "", prompt_token_ids=list(prompt_ids), reward=self.reward,
                        options=QAlignOptions(steps=self.steps, beta=self.beta), chains=n, seed=seed,
                        max_tokens=sampling.max_tokens, stop=sampling.stop, answer="mbr")
        return [chain[-1].text for chain in result.chains], result.generated_tokens
