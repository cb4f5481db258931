"""QAlign's rewards: the interface a chain or a baseline scores candidates
with (a Python function, an LLM judge, a linear head on the policy's hidden
state), and the training of a linear head on problems with known answers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .._files import atomic_write
from .._model import GenerationResult, Model, Prompt
from .._model import model_fingerprint as _model_fingerprint
from .answers import ChainState, Extractor


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


def train_linear_reward(model: Model, problems: Sequence[tuple[Prompt, str]], *, extract: Extractor,
                        is_correct: Callable[[Optional[str], str], bool], samples: int = 4,
                        max_tokens: int = 256, l2: float = 1.0, seed: int = 0, stop: Sequence[str] = (),
                        on_problem: Optional[Callable[[int], None]] = None) -> tuple[LinearReward, dict]:
    """Train a linear reward head on problems with known answers: sample
    ``samples`` answers per (prompt, reference) at temperature 1, label each
    by checking its extracted answer (``extract`` and ``is_correct(answer,
    reference)`` are the task's, e.g. slot_cpp.gsm8k's), take the hidden
    state at each answer's last token, and fit a regularised logistic
    regression."""
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


def candidates_of(model: Model, prompt: Prompt, samples: Sequence[GenerationResult]) -> list[Candidate]:
    """The samples of one prompt as candidates, with the policy's token ids."""
    x = model.prompt_tokens(prompt)
    text = model.detokenize(x)
    return [Candidate(text, s.text, tuple(x), tuple(s.tokens), model) for s in samples]


class TokenMeter:
    """Tokens a reward's model evaluates while scoring."""

    def __init__(self) -> None:
        self.tokens = 0


def checked_scores(reward: Reward, candidates: Sequence[Candidate], chains: list[list[ChainState]],
                   meter: Optional[TokenMeter] = None) -> list[float]:
    """The reward's scores, checked (one finite number per candidate, else
    RewardError holding ``chains``); ``meter`` counts the reward model's tokens."""
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
