"""The generator's pool of candidates for each input: its greedy answer and
k - 1 samples (or another sampler's, e.g. QAlign chains' last states), from
one prompt evaluation."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from .._model import Model
from ..options import LmcorOptions, SamplingOptions, SlotOptions, specs
from ..options import check_float as _check_float
from ..options import check_int as _check_int

CANDIDATE_SAMPLING = SamplingOptions(max_tokens=128, stop=("\n",))
"""The candidates' sampling options: the group's defaults but for a shorter
answer (128 tokens, not 256) that ends at the first newline. LMCor's tasks
(grammar correction, translation, short answers) have one-line outputs, and
the corrector reads all k candidates in one context, so shorter candidates
keep its input within bounds. The candidates' temperature and seeds are
LMCor's own (:class:`~slot_cpp.options.LmcorOptions`, ``seed``), not this
group's."""

Sampler = Callable[[Model, list[int], int, int, SamplingOptions], tuple[list[str], int]]
"""Draws an input's k - 1 sampled candidates in place of plain sampling:
``sampler(generator, prompt_ids, n, seed, sampling) -> (n texts, tokens
generated)``, ``seed`` the input's seed + 1 and ``sampling`` the candidates'
options (max_tokens, stop). :class:`slot_cpp.qalign.QAlignSamples` is one:
QAlign chains' last states. The caller composes the two methods; LMCor does
not import QAlign."""

_SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingOptions))


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
    k: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: int = 0,
    seeds: Optional[Sequence[int]] = None,
    prompt_tokens: Optional[Sequence[Sequence[int]]] = None,
    options: Optional[LmcorOptions] = None,
    sampling: Optional[SamplingOptions] = None,
    sampler: Optional[Sampler] = None,
    **generator_options: Any,
) -> list[Candidates]:
    """k candidates per input from the generator: greedy, then k - 1 samples.

    Sample j (1 <= j < k) of input i draws at ``temperature`` with seed
    ``seeds[i] + j`` (``seeds`` defaults to ``seed`` for every input). ``k``
    and ``temperature`` are :class:`~slot_cpp.options.LmcorOptions`' fields:
    None takes them from ``options`` (default: the group's defaults). The
    input's prompt is ``prompt`` with ``{input}`` replaced by it; its k
    sequences share its KV cells. ``sampling`` (default
    :data:`CANDIDATE_SAMPLING`) is how every candidate is drawn, but for its
    temperature and seed; its fields may also be given as keywords
    (``max_tokens``, ``stop``, ``top_k``, ...), which override it. The other
    ``generator_options`` go to :meth:`Model.generate_batch` (SLOT's
    ``steps``/``lr``, ``rtd``, ``delta``, ``cancel``, ...), so SLOT and RTD can
    shape the generator. ``prompt_tokens``, one token list per input,
    replaces the template (a prompt already formatted, e.g. with a chat
    template). ``sampler`` (:data:`Sampler`, e.g.
    :class:`slot_cpp.qalign.QAlignSamples`) draws the k - 1 samples instead
    (``temperature`` is then the sampler's).
    """
    if isinstance(inputs, str) or not isinstance(inputs, Sequence):
        raise TypeError("inputs must be a list of str")
    group = LmcorOptions() if options is None else options
    if not isinstance(group, LmcorOptions):
        raise TypeError(f"options must be a slot_cpp.options.LmcorOptions, got {type(group).__name__}")
    k = _check_int("k", group.k if k is None else k, 1)
    temperature = _check_float("temperature", group.temperature if temperature is None else temperature, low=0.0,
                               low_open=True)
    changes = {key: generator_options.pop(key) for key in list(generator_options) if key in _SAMPLING_NAMES}
    given = CANDIDATE_SAMPLING if sampling is None else sampling
    if not isinstance(given, SamplingOptions):
        raise TypeError(f"sampling must be a slot_cpp.options.SamplingOptions, got {type(given).__name__}")
    draw = given.replace(**changes) if changes else given
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
    if sampler is None:
        texts, tokens = _sampled_pools(generator, prompts, temps, draw_seeds, k, draw, generator_options)
    else:
        texts, tokens = _sampler_pools(generator, prompts[::k], sampler, k, draw_seeds[::k], draw, changes,
                                       generator_options)
    seconds = time.perf_counter() - t0
    return [Candidates(input=x, texts=texts[i], seeds=[None] + [draw_seeds[i * k + j] for j in range(1, k)],
                       generated_tokens=tokens[i], seconds=seconds / len(inputs))
            for i, x in enumerate(inputs)]


# SLOT's options: learned once per input by generate_candidates.
_SLOT_KEYS = tuple(name for name, _, _ in specs(SlotOptions))


def _sampled_pools(generator: Model, prompts: list[Union[str, list[int]]], temps: list[float],
                   seeds: list[int], k: int, sampling: SamplingOptions,
                   generator_options: dict[str, Any]) -> tuple[list[list[str]], list[int]]:
    """Each input's k texts (its k consecutive prompts) and the tokens generated for them."""
    options = dict(generator_options)
    if options.get("steps") and options.get("delta") is None:
        # SLOT: one delta per input, learned once; its k candidates use it.
        learn = {key: options.pop(key) for key in _SLOT_KEYS if key in options}
        shaped = generator.generate_batch(prompts[::k], max_tokens=0, cancel=options.get("cancel"), **learn)
        options["delta"] = [shaped[i // k].delta for i in range(len(prompts))]
    results = generator.generate_batch(prompts, sampling=sampling, temperature=temps, seed=seeds, **options)
    n = len(prompts) // k
    texts = [[r.text.strip() for r in results[i * k:(i + 1) * k]] for i in range(n)]
    tokens = [sum(len(r.tokens) for r in results[i * k:(i + 1) * k]) for i in range(n)]
    return texts, tokens


def _sampler_pools(generator: Model, prompts: list[Union[str, list[int]]], sampler: Sampler, k: int,
                   seeds: list[int], sampling: SamplingOptions, changes: dict[str, Any],
                   generator_options: dict[str, Any]) -> tuple[list[list[str]], list[int]]:
    if not callable(sampler):
        raise TypeError("sampler must be callable: sampler(generator, prompt_ids, n, seed, sampling)")
    unsupported = (set(generator_options) - {"cancel"}) | (set(changes) - {"max_tokens", "stop"})
    if unsupported:
        raise ValueError(f"with a sampler, the generator takes no {', '.join(sorted(unsupported))}")
    greedy = generator.generate_batch(prompts, temperature=0.0, max_tokens=sampling.max_tokens,
                                      stop=list(sampling.stop), **generator_options)
    texts, tokens = [], []
    for prompt, seed, first in zip(prompts, seeds, greedy):
        pool, count = [first.text.strip()], len(first.tokens)
        if k > 1:
            ids = prompt if isinstance(prompt, list) else generator.tokenize(prompt)
            drawn, drawn_tokens = sampler(generator, list(ids), k - 1, seed + 1, sampling)
            pool += [text.strip() for text in drawn]
            count += drawn_tokens
        texts.append(pool)
        tokens.append(count)
    return texts, tokens
