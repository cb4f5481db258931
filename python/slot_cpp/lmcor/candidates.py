"""The generator's pool of candidates for each input: its greedy answer and
k - 1 samples (or QAlign chains' last states), from one prompt evaluation."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from .._model import Model
from ..options import LmcorOptions, SlotOptions, specs
from ..options import check_float as _check_float
from ..options import check_int as _check_int


@dataclass(frozen=True)
class QAlignSamples:
    """Draw the k - 1 sampled candidates with QAlign instead of plain sampling:
    candidate j + 1 is the last state of chain j, after ``steps`` steps under
    ``reward`` (the chains run side by side, seeded from the input's seed + 1). The
    pool then leans toward answers the reward prefers; the greedy candidate
    stays as it is."""

    reward: Any
    steps: int = 16
    beta: float = 1.0


@dataclass
class Candidates:
    """A generator's pool for one input: candidate 1 is greedy, the rest samples."""

    input: str
    texts: list[str]
    seeds: list[Optional[int]]     # None for the greedy candidate
    generated_tokens: int
    seconds: float


def _fill(template: str, x: str) -> str:
    # str.replace, not str.format: few-shot prompts contain braces.
    if "{input}" not in template:
        raise ValueError("the generator prompt template must contain '{input}'")
    return template.replace("{input}", x)


def generate_candidates(
    generator: Model,
    inputs: Sequence[str],
    *,
    prompt: str = "{input}",
    k: int = LmcorOptions.k,
    temperature: float = LmcorOptions.temperature,
    seed: int = 0,
    max_tokens: int = 128,
    stop: Sequence[str] = ("\n",),
    seeds: Optional[Sequence[int]] = None,
    prompt_tokens: Optional[Sequence[Sequence[int]]] = None,
    qalign: Optional[QAlignSamples] = None,
    **generator_options: Any,
) -> list[Candidates]:
    """k candidates per input from the generator: greedy, then k - 1 samples.

    Sample j (1 <= j < k) of input i draws at ``temperature`` with seed
    ``seeds[i] + j`` (``seeds`` defaults to ``seed`` for every input). The
    input's prompt is ``prompt`` with ``{input}`` replaced by it; its k
    sequences share its KV cells. ``generator_options`` go to
    :meth:`Model.generate_batch` (SLOT's ``steps``/``lr``, ``rtd``, ``top_k``,
    ``cancel``, ...), so SLOT and RTD can shape the generator.
    ``prompt_tokens``, one token list per input, replaces the template (a
    prompt already formatted, e.g. with a chat template). ``qalign``
    (:class:`QAlignSamples`) draws the samples with QAlign chains instead
    (``temperature`` is then 1, QAlign's proposal).
    """
    if isinstance(inputs, str) or not isinstance(inputs, Sequence):
        raise TypeError("inputs must be a list of str")
    k = _check_int("k", k, 1)
    temperature = _check_float("temperature", temperature, low=0.0, low_open=True)
    seed = _check_int("seed", seed, 0)
    if seeds is None:
        seeds = [seed] * len(inputs)
    if len(seeds) != len(inputs):
        raise ValueError(f"seeds has {len(seeds)} values for {len(inputs)} inputs")
    if prompt_tokens is not None and len(prompt_tokens) != len(inputs):
        raise ValueError(f"prompt_tokens has {len(prompt_tokens)} prompts for {len(inputs)} inputs")
    if len(inputs) == 0:
        return []
    prompts: list[Union[str, list[int]]] = []
    temps: list[float] = []
    draw_seeds: list[int] = []
    for i, (x, s) in enumerate(zip(inputs, seeds)):
        if not isinstance(x, str):
            raise TypeError(f"every input must be a str, got {type(x).__name__}")
        text: Union[str, list[int]] = _fill(prompt, x) if prompt_tokens is None else list(prompt_tokens[i])
        base = _check_int("seed", s, 0)
        for j in range(k):
            prompts.append(text)
            temps.append(0.0 if j == 0 else temperature)
            draw_seeds.append(base + j)
    t0 = time.perf_counter()
    if qalign is None:
        texts, tokens = _sampled_pools(generator, prompts, temps, draw_seeds, k, max_tokens, stop,
                                       generator_options)
    else:
        texts, tokens = _qalign_pools(generator, prompts[::k], qalign, k, draw_seeds[::k], max_tokens, stop,
                                      generator_options)
    seconds = time.perf_counter() - t0
    return [Candidates(input=x, texts=texts[i], seeds=[None] + [draw_seeds[i * k + j] for j in range(1, k)],
                       generated_tokens=tokens[i], seconds=seconds / len(inputs))
            for i, x in enumerate(inputs)]


# SLOT's options: learned once per input by generate_candidates.
_SLOT_KEYS = tuple(name for name, _, _ in specs(SlotOptions))


def _sampled_pools(generator: Model, prompts: list[Union[str, list[int]]], temps: list[float],
                   seeds: list[int], k: int, max_tokens: int, stop: Sequence[str],
                   generator_options: dict[str, Any]) -> tuple[list[list[str]], list[int]]:
    """Each input's k texts (its k consecutive prompts) and the tokens generated for them."""
    options = dict(generator_options)
    if options.get("steps") and options.get("delta") is None:
        # SLOT: one delta per input, learned once; its k candidates use it.
        learn = {key: options.pop(key) for key in _SLOT_KEYS if key in options}
        shaped = generator.generate_batch(prompts[::k], max_tokens=0, cancel=options.get("cancel"), **learn)
        options["delta"] = [shaped[i // k].delta for i in range(len(prompts))]
    results = generator.generate_batch(prompts, temperature=temps, seed=seeds, max_tokens=max_tokens,
                                       stop=list(stop), **options)
    n = len(prompts) // k
    texts = [[r.text.strip() for r in results[i * k:(i + 1) * k]] for i in range(n)]
    tokens = [sum(len(r.tokens) for r in results[i * k:(i + 1) * k]) for i in range(n)]
    return texts, tokens


def _qalign_pools(generator: Model, prompts: list[Union[str, list[int]]], options: QAlignSamples, k: int,
                  seeds: list[int], max_tokens: int, stop: Sequence[str],
                  generator_options: dict[str, Any]) -> tuple[list[list[str]], list[int]]:
    from ..qalign import qalign

    if not isinstance(options, QAlignSamples):
        raise TypeError("qalign must be a QAlignSamples")
    unsupported = set(generator_options) - {"cancel"}
    if unsupported:
        raise ValueError(f"with qalign, the generator takes no {', '.join(sorted(unsupported))}")
    greedy = generator.generate_batch(prompts, temperature=0.0, max_tokens=max_tokens, stop=list(stop),
                                      **generator_options)
    texts, tokens = [], []
    for prompt, seed, first in zip(prompts, seeds, greedy):
        pool, count = [first.text.strip()], len(first.tokens)
        if k > 1:
            ids = prompt if isinstance(prompt, list) else generator.tokenize(prompt)
            result = qalign(generator, "", prompt_token_ids=ids, reward=options.reward, beta=options.beta,
                            steps=options.steps, chains=k - 1, seed=seed + 1, max_tokens=max_tokens, stop=stop,
                            answer="mbr")
            pool += [chain[-1].text.strip() for chain in result.chains]
            count += result.generated_tokens
        texts.append(pool)
        tokens.append(count)
    return texts, tokens
