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
strings, a response ends at the token that completes the stop string.

SLOT and RTD may shape the proposal: with a ``delta`` (SLOT's logit bias
W*delta) or ``rtd`` (the retrieval blend, applied after the bias), p is the
model's distribution with these stages on, and the chain's target is
p_shaped(y | x) * exp(r(x, y) / beta). The acceptance rule needs no change:
the proposal is still the model's own conditional, only a different model.

The answer is a majority vote over the chain's states (an answer extractor:
GSM8K's final number by default) or, for free text, the state with the
highest mean ROUGE-1 F1 to the others (minimum Bayes risk). Baselines on the
same reward interface: :func:`best_of_n`, :func:`majority_vote`,
:func:`weighted_majority_vote`.

Equal compute: with ``budget`` (tokens sampled per problem, an end-of-sequence
token counted as one), the chain stops after the step that reaches it and a
baseline keeps sampling until its samples reach it, so both use the budget to
within one answer. Sample i of a pool draws with ``seed + i`` and a chain's
steps draw from one seeded stream, so a pool or chain at a smaller budget is a
prefix of the one at a larger budget: :func:`pool_prefix` and
:func:`chain_prefix` give every smaller budget's run from one run at the
largest, and :func:`vote`, :func:`best_answer`, :func:`weighted_vote` and
:func:`chain_answer` its answer.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import gsm8k
from ._files import atomic_write
from ._model import GenerationResult, Model, Prompt
from ._model import model_fingerprint as _model_fingerprint
from .options import QAlignOptions
from .rtd import RtdOption

__all__ = [
    "CallableReward",
    "Candidate",
    "ChainState",
    "JudgeReward",
    "LinearReward",
    "QAlignResult",
    "Reward",
    "RewardError",
    "best_answer",
    "best_of_n",
    "chain_answer",
    "chain_prefix",
    "majority_vote",
    "pool_prefix",
    "qalign",
    "rouge1_f1",
    "sample_cost",
    "sample_pool",
    "step_costs",
    "train_linear_reward",
    "vote",
    "weighted_majority_vote",
    "weighted_vote",
]

Extractor = Callable[[str], Optional[str]]


class RewardError(RuntimeError):
    """A reward raised or returned a non-finite value. ``chains`` holds every
    chain as it stood before the failing step."""

    def __init__(self, message: str, chains: list[list["ChainState"]]) -> None:
        super().__init__(message)
        self.chains = chains


@dataclass(frozen=True)
class Candidate:
    """A response to score: its text, and its token ids under ``policy`` (the
    model that produced it), so that a reward on that same model needs no
    re-tokenisation."""

    prompt: str
    response: str
    prompt_ids: tuple[int, ...] = ()
    response_ids: tuple[int, ...] = ()
    policy: Optional[Model] = None


class Reward:
    """Scores a batch of candidates; higher is better."""

    name: str = "reward"
    model: Optional[Model] = None
    """The model the reward evaluates with, if any (its tokens are counted)."""

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        raise NotImplementedError


class CallableReward(Reward):
    """A Python function ``fn(prompt, response) -> float`` as a reward (exact
    answer checkers, regular expressions, unit tests)."""

    def __init__(self, fn: Callable[[str, str], float], name: Optional[str] = None) -> None:
        if not callable(fn):
            raise TypeError("the reward must be callable: fn(prompt, response) -> float")
        self.fn = fn
        self.name = name or str(getattr(fn, "__name__", "reward"))

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [float(self.fn(c.prompt, c.response)) for c in candidates]


DEFAULT_JUDGE_TEMPLATE = (
    "Question: {prompt}\nProposed answer: {response}\n"
    "Is the proposed answer correct? Answer yes or no.\nAnswer:"
)


class JudgeReward(Reward):
    """An LLM judge from any GGUF model: r = log p(yes) - log p(no) for the
    token after ``template`` (with ``{prompt}`` and ``{response}``). The
    judge's prompts share their question, whose cells the judge's prompt
    cache keeps from one step to the next. ``chat=True`` (the default when
    the judge has a chat template) sends the text as a user message."""

    def __init__(self, judge: Model, template: str = DEFAULT_JUDGE_TEMPLATE, *, yes: str = " yes",
                 no: str = " no", chat: Optional[bool] = None, chat_template: Optional[str] = None,
                 name: str = "judge") -> None:
        if not isinstance(judge, Model):
            raise TypeError("judge must be a slot_cpp.Model")
        if "{response}" not in template:
            raise ValueError("the judge template needs a {response} field")
        self.judge, self.template, self.name = judge, template, name
        self.model = judge
        self.chat = judge.info.has_chat_template or chat_template is not None if chat is None else bool(chat)
        self.chat_template = chat_template
        ids = []
        for word in (yes, no):
            toks = judge.tokenize(word, add_special=False)
            if len(toks) != 1:
                raise ValueError(f"{word!r} must be one token of the judge's vocabulary, got {len(toks)}")
            ids.append(toks[0])
        self.token_ids = ids

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        texts = [self.template.format(prompt=c.prompt, response=c.response) for c in candidates]
        prompts: list = [[{"role": "user", "content": t}] for t in texts] if self.chat else texts
        results = self.judge.generate_batch(prompts, max_tokens=0, score_tokens=self.token_ids,
                                            chat_template=self.chat_template)
        return [r.score_logprobs[0] - r.score_logprobs[1] for r in results]  # type: ignore[index]


RewardLike = Union[Reward, Callable[[str, str], float]]


def as_reward(reward: RewardLike) -> Reward:
    if isinstance(reward, Reward):
        return reward
    return CallableReward(reward)


def model_fingerprint(model: Model) -> str:
    """A digest of the model's fingerprint: what a stored reward head must match."""
    return str(_model_fingerprint(model)["digest"])


class LinearReward(Reward):
    """r = w . h + b, h the model's final normed hidden state at the
    response's last token: a task-specific reward model in miniature. With
    the policy's own token ids and the prompt cache, scoring a response the
    policy just produced evaluates one token."""

    def __init__(self, model: Model, weight: np.ndarray, bias: float, *, fingerprint: Optional[str] = None,
                 name: str = "linear-head") -> None:
        w = np.asarray(weight, dtype=np.float64)
        if w.shape != (model.n_embd,):
            raise ValueError(f"the head has {w.shape} weights but the model's hidden size is {model.n_embd}")
        if fingerprint is not None and fingerprint != model_fingerprint(model):
            raise ValueError("this reward head was trained on another model (fingerprint mismatch)")
        self.head_model: Model = model  # the model whose hidden states the head reads
        self.model = model
        self.weight, self.bias, self.name = w, float(bias), name

    def _context(self, c: Candidate) -> list[int]:
        if c.policy is self.head_model and c.prompt_ids:
            return list(c.prompt_ids) + list(c.response_ids)
        return self.head_model.prompt_tokens(c.prompt) + self.head_model.tokenize(c.response, add_special=False)

    def features(self, candidates: Sequence[Candidate]) -> np.ndarray:
        contexts = [self._context(c) for c in candidates]
        results = self.head_model.generate_batch(contexts, max_tokens=0, return_hidden=True)
        return np.stack([np.asarray(r.hidden, dtype=np.float64) for r in results])

    def score(self, candidates: Sequence[Candidate]) -> list[float]:
        return [float(v) for v in self.features(candidates) @ self.weight + self.bias]

    def save(self, path: str) -> str:
        """Writes the head as ``.npz`` (the suffix added if missing), atomically;
        the archive's CRC-32 per array is checked when it is loaded. Returns the path."""
        path = str(path) if str(path).endswith(".npz") else f"{path}.npz"
        with atomic_write(path) as f:
            np.savez(f, weight=self.weight, bias=np.float64(self.bias),
                     fingerprint=model_fingerprint(self.head_model))
        return path

    @classmethod
    def load(cls, path: str, model: Model) -> "LinearReward":
        """Reads a head written by :meth:`save`; a file that is not one, is
        damaged (checksum, NaN or infinite weights) or belongs to another
        model raises ValueError."""
        try:
            with np.load(path, allow_pickle=False) as data:
                weight, bias, fp = data["weight"], data["bias"], data["fingerprint"]
        except FileNotFoundError as exc:
            raise ValueError(f"cannot read the reward head {path}: {exc.strerror}") from None
        except Exception as exc:  # zipfile, zlib and numpy's header parser each raise their own kinds
            raise ValueError(f"{path} is not a slot_cpp reward head or is damaged ({type(exc).__name__}: {exc})") \
                from None
        if weight.dtype.kind != "f" or weight.ndim != 1 or bias.shape != () or bias.dtype.kind != "f" \
                or fp.shape != () or fp.dtype.kind != "U":
            raise ValueError(f"{path} is not a slot_cpp reward head (unexpected array types or shapes)")
        if not (np.all(np.isfinite(weight)) and np.isfinite(bias)):
            raise ValueError(f"{path}: the reward head has NaN or infinite weights (damaged file)")
        return cls(model, weight, float(bias), fingerprint=str(fp))


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1.0, iterations: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method; the intercept is
    not penalised. Returns (weight, bias)."""
    X = np.hstack([np.asarray(features, dtype=np.float64), np.ones((len(features), 1))])
    y = np.asarray(labels, dtype=np.float64)
    reg = np.full(X.shape[1], float(l2))
    reg[-1] = 0.0
    w = np.zeros(X.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -40, 40)))
        grad = X.T @ (p - y) + reg * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


def train_linear_reward(model: Model, problems: Sequence[tuple[Prompt, str]], *, samples: int = 4,
                        max_tokens: int = 256, l2: float = 1.0, seed: int = 0,
                        extract: Optional[Extractor] = None, stop: Sequence[str] = (),
                        is_correct: Callable[[Optional[str], str], bool] = gsm8k.is_correct,
                        on_problem: Optional[Callable[[int], None]] = None) -> tuple[LinearReward, dict]:
    """Train a linear reward head on problems with known answers: sample
    ``samples`` answers per (prompt, reference) at temperature 1, label each
    by checking its extracted answer, take the hidden state at each answer's
    last token, and fit a regularised logistic regression."""
    extract = extract or gsm8k.extract_answer
    head = LinearReward(model, np.zeros(model.n_embd), 0.0)
    feats, labels = [], []
    for k, (prompt, reference) in enumerate(problems):
        drawn = model.generate_batch([prompt], n=samples, max_tokens=max_tokens, temperature=1.0, top_k=0,
                                     top_p=1.0, min_p=0.0, seed=seed + k * samples, stop=list(stop))
        x = tuple(model.prompt_tokens(prompt))
        cands = [Candidate("", d.text, x, tuple(d.tokens), model) for d in drawn]
        feats.append(head.features(cands))
        labels += [1.0 if is_correct(extract(d.text), reference) else 0.0 for d in drawn]
        if on_problem is not None:
            on_problem(k)
    y = np.asarray(labels)
    if y.min() == y.max():
        raise ValueError(f"every sampled answer was {'right' if y[0] else 'wrong'}: a reward head needs both")
    X = np.vstack(feats)
    weight, bias = fit_logistic(X, y, l2=l2)
    trained = LinearReward(model, weight, bias)
    accuracy = float(np.mean(((X @ weight + bias) > 0) == (y > 0.5)))
    return trained, {"answers": len(y), "right": int(y.sum()), "train_accuracy": accuracy}


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


def _terminal(result: GenerationResult) -> bool:
    """The response ended with an end-of-sequence token (not in its tokens)."""
    return result.finish_reason == "eos"


def _candidates(model: Model, prompt: Prompt, samples: Sequence[GenerationResult]) -> list[Candidate]:
    x = model.prompt_tokens(prompt)
    text = model.detokenize(x)
    return [Candidate(text, s.text, tuple(x), tuple(s.tokens), model) for s in samples]


class _TokenMeter:
    """Tokens a reward's model evaluates while scoring."""

    def __init__(self) -> None:
        self.tokens = 0


def _score(reward: Reward, candidates: Sequence[Candidate], chains: list[list[ChainState]],
           meter: Optional[_TokenMeter] = None) -> list[float]:
    before = reward.model.decoded_tokens if reward.model is not None else 0
    try:
        values = reward.score(list(candidates))
    except Exception as exc:
        raise RewardError(f"reward {reward.name!r} raised {type(exc).__name__}: {exc}", chains) from exc
    values = list(values)
    if len(values) != len(candidates):
        raise RewardError(f"reward {reward.name!r} returned {len(values)} scores for {len(candidates)} responses",
                          chains)
    for v in values:
        if not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(float(v)):
            raise RewardError(f"reward {reward.name!r} returned a non-finite or non-numeric score: {v!r}",
                              chains)
    if meter is not None and reward.model is not None:
        meter.tokens += reward.model.decoded_tokens - before
    return [float(v) for v in values]


def log_acceptance(r_new: float, r_old: float, len_new: int, len_old: int, beta: float) -> float:
    """log of the acceptance probability min(1, exp((r'-r)/beta) * |y| / |y'|)."""
    value = (r_new - r_old) / beta + math.log(len_old) - math.log(len_new)
    return min(0.0, value)


def _check_qalign_options(model: Model, beta: float, *, steps: int, max_tokens: int, chains: int, top_k: int,
                          burn_in: int, seed: int, budget: Optional[int], answer: str) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    for name, value, low in (("steps", steps, 1), ("max_tokens", max_tokens, 1), ("chains", chains, 1),
                             ("top_k", top_k, 0), ("burn_in", burn_in, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if burn_in > steps:
        raise ValueError("burn_in must be <= steps")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if answer not in ("vote", "mbr"):
        raise ValueError("answer must be 'vote' or 'mbr'")
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
        generated += r.generated_tokens + (1 if _terminal(r) else 0)
        proposed = ChainState(step, tokens, texts[c], rewards[c], True, _terminal(r))
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


def chain_answer(kept: Sequence[ChainState], answer: str = "vote", extract: Optional[Extractor] = None
                 ) -> tuple[Optional[str], Optional[ChainState], dict[str, float]]:
    """The answer QAlign gives from these states (``answer``: "vote" or
    "mbr"), a state giving it, and the votes (for "vote")."""
    extract = extract or gsm8k.extract_answer
    votes: dict[str, float] = {}
    chosen: Optional[str] = None
    chosen_state: Optional[ChainState] = None
    if answer == "vote":
        answers = [extract(state.text) for state in kept]
        chosen, votes = vote(answers)
        if chosen is not None:
            chosen_state = kept[answers.index(chosen)]
    else:
        chosen_state = mbr_choice([state.text for state in kept], list(kept))
        chosen = chosen_state.text if chosen_state is not None else None
    return chosen, chosen_state, votes


def chain_prefix(chains: Sequence[Sequence[ChainState]], budget: int) -> list[list[ChainState]]:
    """The states a run with ``budget`` would have had: every chain's steps up
    to the first whose sampled tokens reach the budget (all of them if none
    does), as :func:`qalign` stops with that budget and the same seed."""
    generated = [state.generated for state in chains[0]] if chains else []
    keep = pool_prefix(step_costs(generated), budget)
    return [list(chain[:keep]) for chain in chains]


def step_costs(generated: Sequence[int]) -> list[int]:
    """The tokens each step sampled, from the running totals of ``ChainState.generated``."""
    return [b - a for a, b in zip([0, *generated], generated)]


def qalign(
    model: Model,
    prompt: Prompt,
    *,
    reward: RewardLike,
    beta: float = QAlignOptions.beta,
    steps: int = QAlignOptions.steps,
    max_tokens: int = 256,
    chains: int = 1,
    seed: int = 0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    delta: Optional[np.ndarray] = None,
    rtd: Optional[RtdOption] = None,
    answer: str = "vote",
    extract: Optional[Extractor] = None,
    burn_in: int = 0,
    chat_template: Optional[str] = None,
    system: Optional[str] = None,
    prompt_token_ids: Optional[Sequence[int]] = None,
    on_step: Optional[Callable[[int, float, float], None]] = None,
    budget: Optional[int] = None,
    grammar: Optional[str] = None,
    json_schema: Any = None,
) -> QAlignResult:
    """Run ``chains`` QAlign chains of ``steps`` steps on one prompt, side by
    side (one batched decode per step for all chains).

    ``answer="vote"`` takes the majority of ``extract`` (default: GSM8K's
    final number) over the states after ``burn_in``; ``answer="mbr"`` the state
    with the highest mean ROUGE-1 F1 to the others. ``on_step(step,
    accept_rate, mean_reward)`` is called after every step (progress bars).
    With ``budget``, the chains stop after the step at which the tokens
    sampled so far reach it (``steps`` stays an upper bound), for comparisons
    with other methods at equal compute. With ``grammar`` or ``json_schema``
    the proposals are constrained, and the chain targets p_c(y) exp(r/beta),
    p_c the product of the masked, renormalised next-token probabilities.
    """
    if not isinstance(model, Model):
        raise TypeError("model must be a slot_cpp.Model")
    rew = as_reward(reward)
    _check_qalign_options(model, beta, steps=steps, max_tokens=max_tokens, chains=chains, top_k=top_k,
                          burn_in=burn_in, seed=seed, budget=budget, answer=answer)
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
        cut = min((text.find(marker) for marker in stops if marker in text), default=-1)
        return text[:cut] if cut >= 0 else text

    proposal: dict[str, Any] = dict(temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                    stop=list(stop), delta=delta, rtd=rtd, grammar=grammar,
                                    json_schema=json_schema)

    def draw(prefixes: list[list[int]], budgets: list[int]) -> list[GenerationResult]:
        seeds = [int(s) for s in rng.integers(0, 2**62, size=len(prefixes))]
        return model.generate_batch([x] * len(prefixes), response_prefix=prefixes, max_tokens=budgets,
                                    seed=seeds, **proposal)

    def candidates(responses: list[list[int]], response_texts: list[str]) -> list[Candidate]:
        return [Candidate(prompt_text, t, tuple(x), tuple(toks), model) for toks, t in zip(responses, response_texts)]

    decoded_before = model.decoded_tokens
    meter = _TokenMeter()
    first = draw([[] for _ in range(chains)], [max_tokens] * chains)
    texts = [text_of(list(r.tokens)) for r in first]
    history: list[list[ChainState]] = [[] for _ in range(chains)]
    rewards = _score(rew, candidates([list(r.tokens) for r in first], texts), history, meter)
    reward_calls = chains
    generated = sum(r.generated_tokens + (1 if _terminal(r) else 0) for r in first)
    for c, r in enumerate(first):
        history[c].append(ChainState(0, list(r.tokens), texts[c], rewards[c], True, _terminal(r), generated))
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
        new_rewards = _score(rew, candidates(proposals, texts), history, meter)
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
    """Tokens the samples drew, an end-of-sequence token counted as one."""


def sample_cost(sample: GenerationResult) -> int:
    """Tokens a sample drew: its tokens, plus one for an end-of-sequence token
    (the count QAlign's budget uses)."""
    return sample.generated_tokens + (1 if _terminal(sample) else 0)


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


def sample_pool(model: Model, prompt: Prompt, *, budget: int, max_tokens: int = 256, seed: int = 0,
                top_k: int = 0, stop: Sequence[str] = (), delta: Optional[np.ndarray] = None,
                **kwargs: Any) -> list[GenerationResult]:
    """Samples at temperature 1 until their tokens reach ``budget``: sample i
    draws with ``seed + i``, and the pool is the shortest prefix of that
    sequence that reaches the budget, so it overshoots by less than one
    answer and a pool at a smaller budget is a prefix of this one. Drawn in
    batches sized by the mean answer so far."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    pool: list[GenerationResult] = []
    used = 0
    while used < budget:
        mean = used / len(pool) if pool else max_tokens
        n = max(1, min(model.n_parallel, math.ceil((budget - used) / max(1.0, mean))))
        for sample in _samples(model, prompt, n, max_tokens, seed + len(pool), top_k, stop, delta, **kwargs):
            if used >= budget:
                break
            pool.append(sample)
            used += sample_cost(sample)
    return pool


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


def _samples(model: Model, prompt: Prompt, n: int, max_tokens: int, seed: int, top_k: int,
             stop: Sequence[str], delta: Optional[np.ndarray], **kwargs: Any) -> list[GenerationResult]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return model.generate_batch([prompt], n=n, max_tokens=max_tokens, seed=seed, temperature=1.0, top_k=top_k,
                                top_p=1.0, min_p=0.0, stop=list(stop), delta=delta, **kwargs)


def _draw(model: Model, prompt: Prompt, n: Optional[int], budget: Optional[int], max_tokens: int, seed: int,
          top_k: int, stop: Sequence[str], delta: Optional[np.ndarray], **kwargs: Any) -> list[GenerationResult]:
    """n samples, or samples up to a token budget (not both)."""
    if n is not None and budget is not None:
        raise ValueError("give n (samples) or budget (tokens), not both")
    if budget is not None:
        return sample_pool(model, prompt, budget=budget, max_tokens=max_tokens, seed=seed, top_k=top_k, stop=stop,
                           delta=delta, **kwargs)
    return _samples(model, prompt, 16 if n is None else n, max_tokens, seed, top_k, stop, delta, **kwargs)


def best_of_n(model: Model, prompt: Prompt, *, reward: RewardLike, n: Optional[int] = None,
              budget: Optional[int] = None, max_tokens: int = 256, seed: int = 0, top_k: int = 0,
              stop: Sequence[str] = (), delta: Optional[np.ndarray] = None, extract: Optional[Extractor] = None,
              **kwargs: Any) -> BaselineResult:
    """Samples at temperature 1 (``n``, default 16, or up to ``budget``
    tokens: :func:`sample_pool`); the answer of the one with the highest reward."""
    rew, extract = as_reward(reward), extract or gsm8k.extract_answer
    samples = _draw(model, prompt, n, budget, max_tokens, seed, top_k, stop, delta, **kwargs)
    rewards = _score(rew, _candidates(model, prompt, samples), [])
    chosen, _ = best_answer([extract(s.text) for s in samples], rewards)
    return BaselineResult(chosen, samples, rewards, {}, sum(sample_cost(s) for s in samples))


def majority_vote(model: Model, prompt: Prompt, *, n: Optional[int] = None, budget: Optional[int] = None,
                  max_tokens: int = 256, seed: int = 0, top_k: int = 0, stop: Sequence[str] = (),
                  delta: Optional[np.ndarray] = None, extract: Optional[Extractor] = None,
                  **kwargs: Any) -> BaselineResult:
    """Samples at temperature 1 (``n``, default 16, or up to ``budget``
    tokens); the most frequent extracted answer."""
    extract = extract or gsm8k.extract_answer
    samples = _draw(model, prompt, n, budget, max_tokens, seed, top_k, stop, delta, **kwargs)
    chosen, votes = vote([extract(s.text) for s in samples])
    return BaselineResult(chosen, samples, None, votes, sum(sample_cost(s) for s in samples))


def weighted_majority_vote(model: Model, prompt: Prompt, *, reward: RewardLike, n: Optional[int] = None,
                           budget: Optional[int] = None, max_tokens: int = 256, seed: int = 0, top_k: int = 0,
                           stop: Sequence[str] = (), delta: Optional[np.ndarray] = None,
                           extract: Optional[Extractor] = None, **kwargs: Any) -> BaselineResult:
    """Samples (``n``, default 16, or up to ``budget`` tokens); each answer's
    mass is the sum of softmax(rewards) over the samples giving it."""
    rew, extract = as_reward(reward), extract or gsm8k.extract_answer
    samples = _draw(model, prompt, n, budget, max_tokens, seed, top_k, stop, delta, **kwargs)
    rewards = _score(rew, _candidates(model, prompt, samples), [])
    chosen, mass = weighted_vote([extract(s.text) for s in samples], rewards)
    return BaselineResult(chosen, samples, rewards, mass, sum(sample_cost(s) for s in samples))
