"""LMCor: a small corrector model that reads a bigger model's candidates and
writes the final answer (Vernikos et al., arXiv 2305.13514).

1. A generator model, prompted for the task, makes a pool of ``k``
   candidates for an input x: its greedy answer and ``k - 1`` samples at a
   moderate temperature with seeds ``seed + 1 ... seed + k - 1``. All come
   from one prompt evaluation: the candidates' sequences share its KV cells.
2. A corrector, a much smaller model trained for the task, reads x and all
   candidates in one input and generates the final output: it may pick one,
   merge several, or rewrite. It never sees the generator's weights or
   logits, so the generator can be swapped.

The corrector's input (:class:`CorrectorFormat`, the default shown)::

    input: <x>
    candidate 1: <greedy candidate>
    candidate 2: <sample 1>
    ...
    candidate k: <sample k-1>
    output:

Candidates are stripped of surrounding whitespace; the corrector's answer
follows ``output:`` after a space and ends with the end-of-sequence token.
When x and the candidates do not fit the corrector's context (with room for
``max_tokens``), ``overflow="error"`` (the default) raises
:class:`CorrectorInputTooLong`; ``overflow="drop"`` drops whole candidates,
the last first, keeping at least candidate 1 (the greedy one), and reports
how many were dropped. A candidate is never cut in the middle.

Training: :func:`make_corrector_data` runs the generator over a task's
``{"input", "target"}`` rows and writes the candidates (resumable);
:func:`train_corrector` fine-tunes a LoRA adapter on a small GGUF model with
transformers and PEFT (the ``[lmcor]`` extra) and writes it as a GGUF LoRA
adapter that :class:`slot_cpp.Model` loads with ``lora=``. The adapter
records the base model's fingerprint and the corrector format it was
trained with; :class:`Corrector` reads that format back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from ._progress import Progress
from ._model import ADAPTER_BASE_DIGEST_KEY, Model, model_fingerprint
from .options import LmcorOptions, SlotOptions, specs
from .options import check_float as _check_float
from .options import check_int as _check_int

__all__ = [
    "ADAPTER_FORMAT_KEY",
    "Candidates",
    "Correction",
    "Corrector",
    "CorrectorFormat",
    "CorrectorInputTooLong",
    "EvalReport",
    "PairedDiff",
    "QAlignSamples",
    "SystemScore",
    "TrainReport",
    "evaluate",
    "generate_candidates",
    "make_corrector_data",
    "read_rows",
    "train_corrector",
]

# The corrector format an adapter was trained with (JSON), in its GGUF metadata.
ADAPTER_FORMAT_KEY = "slot_cpp.lmcor.format"

PathLike = Union[str, "os.PathLike[str]"]


class CorrectorInputTooLong(ValueError):
    """x and the candidates do not fit the corrector's context."""


@dataclass(frozen=True)
class CorrectorFormat:
    """How x and the candidates are laid out for the corrector (see the module docs)."""

    input_prefix: str = "input: "
    candidate_prefix: str = "candidate {i}: "
    output_prefix: str = "output:"
    separator: str = "\n"

    def __post_init__(self) -> None:
        for name in ("input_prefix", "candidate_prefix", "output_prefix", "separator"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"CorrectorFormat.{name} must be a str")
        if "{i}" not in self.candidate_prefix:
            raise ValueError("CorrectorFormat.candidate_prefix must contain '{i}' (the candidate's number)")
        if not self.output_prefix:
            raise ValueError("CorrectorFormat.output_prefix must not be empty")

    def render(self, x: str, candidates: Sequence[str]) -> str:
        """The corrector's input text for x and these candidates."""
        if not isinstance(x, str):
            raise TypeError(f"the input must be a str, got {type(x).__name__}")
        if len(candidates) == 0:
            raise ValueError("at least one candidate is needed")
        parts = [self.input_prefix + x.strip()]
        for i, c in enumerate(candidates, start=1):
            if not isinstance(c, str):
                raise TypeError(f"candidate {i} must be a str, got {type(c).__name__}")
            parts.append(self.candidate_prefix.replace("{i}", str(i)) + c.strip())
        parts.append(self.output_prefix)
        return self.separator.join(parts)

    @staticmethod
    def target_text(target: str) -> str:
        """What the corrector is trained to write after the output prefix."""
        return " " + target.strip()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CorrectorFormat":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a corrector format must be a JSON object")
        return cls(**data)


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


@dataclass
class Correction:
    """The corrector's answer for one input, with what it read."""

    text: str
    candidates: list[str]
    corrector_input: str
    dropped: int                    # candidates dropped to fit the context (overflow="drop")
    generator_tokens: int
    corrector_tokens: int
    generator_seconds: float
    corrector_seconds: float
    finish_reason: str = "eos"       # the corrector's: "eos", "length" (max_tokens) or "stop"


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
        options = dict(generator_options)
        if options.get("steps") and options.get("delta") is None:
            # SLOT: one delta per input, learned once; its k candidates use it.
            learn = {key: options.pop(key) for key in _SLOT_KEYS if key in options}
            shaped = generator.generate_batch(prompts[::k], max_tokens=0, cancel=options.get("cancel"), **learn)
            options["delta"] = [shaped[i // k].delta for i in range(len(prompts))]
        results = generator.generate_batch(prompts, temperature=temps, seed=draw_seeds, max_tokens=max_tokens,
                                           stop=list(stop), **options)
        texts = [[r.text.strip() for r in results[i * k:(i + 1) * k]] for i in range(len(inputs))]
        tokens = [sum(len(r.tokens) for r in results[i * k:(i + 1) * k]) for i in range(len(inputs))]
    else:
        texts, tokens = _qalign_pools(generator, prompts[::k], qalign, k, draw_seeds[::k], max_tokens, stop,
                                      generator_options)
    seconds = time.perf_counter() - t0
    return [Candidates(input=x, texts=texts[i], seeds=[None] + [draw_seeds[i * k + j] for j in range(1, k)],
                       generated_tokens=tokens[i], seconds=seconds / len(inputs))
            for i, x in enumerate(inputs)]


# SLOT's options: learned once per input by generate_candidates.
_SLOT_KEYS = tuple(name for name, _, _ in specs(SlotOptions))


def _qalign_pools(generator: Model, prompts: list[Union[str, list[int]]], options: QAlignSamples, k: int,
                  seeds: list[int], max_tokens: int, stop: Sequence[str],
                  generator_options: dict[str, Any]) -> tuple[list[list[str]], list[int]]:
    from .qalign import qalign

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


class Corrector:
    """A corrector model (any GGUF the engine loads, with or without a LoRA adapter).

    ``format`` defaults to the one recorded in the model's LoRA adapter by
    :func:`train_corrector`, else :class:`CorrectorFormat`'s default.
    The corrector decodes greedily up to ``max_tokens`` or the end of
    sequence (and ``stop`` strings, if given).
    """

    def __init__(self, model: Model, *, format: Optional[CorrectorFormat] = None, max_tokens: int = 128,
                 stop: Sequence[str] = (), overflow: str = "error") -> None:
        if not isinstance(model, Model):
            raise TypeError(f"model must be a slot_cpp.Model, got {type(model).__name__}")
        if overflow not in ("error", "drop"):
            raise ValueError(f"overflow must be 'error' or 'drop', got {overflow!r}")
        self.model = model
        self.format = format if format is not None else _adapter_format(model) or CorrectorFormat()
        self.max_tokens = _check_int("max_tokens", max_tokens, 1)
        self.stop = list(stop)
        self.overflow = overflow

    # ---- the corrector's input --------------------------------------------
    def input_tokens(self, x: str, candidates: Sequence[str]) -> tuple[list[int], str, int]:
        """The corrector's input tokens and text for x and the candidates, after
        the overflow policy, and how many candidates were dropped."""
        budget = self.model.n_ctx - self.max_tokens
        cands = list(candidates)
        while True:
            text = self.format.render(x, cands)
            tokens = self.model.tokenize(text)
            if len(tokens) <= budget:
                return tokens, text, len(candidates) - len(cands)
            if self.overflow == "error" or len(cands) == 1:
                raise CorrectorInputTooLong(
                    f"the corrector input has {len(tokens)} tokens with {len(cands)} candidate(s), but the "
                    f"corrector's context holds {self.model.n_ctx} with {self.max_tokens} kept for the answer"
                    + ("" if self.overflow == "error" else " (even with candidate 1 alone)")
                    + "; use fewer or shorter candidates, a larger n_ctx, or overflow='drop'")
            cands.pop()

    # ---- correcting ----------------------------------------------------------
    def rewrite(self, x: str, candidates: Sequence[str]) -> Correction:
        """The corrector's answer for given candidates."""
        return self.rewrite_batch([x], [candidates])[0]

    def rewrite_batch(self, inputs: Sequence[str], candidates: Sequence[Sequence[str]]) -> list[Correction]:
        if len(inputs) != len(candidates):
            raise ValueError(f"{len(inputs)} inputs but {len(candidates)} candidate lists")
        if len(inputs) == 0:
            return []
        built = [self.input_tokens(x, c) for x, c in zip(inputs, candidates)]
        t0 = time.perf_counter()
        results = self.model.generate_batch([b[0] for b in built], temperature=0.0, max_tokens=self.max_tokens,
                                            stop=self.stop)
        seconds = (time.perf_counter() - t0) / len(inputs)
        return [Correction(text=r.text.strip(), candidates=[c.strip() for c in cands], corrector_input=b[1],
                           dropped=b[2], generator_tokens=0, corrector_tokens=len(r.tokens), generator_seconds=0.0,
                           corrector_seconds=seconds, finish_reason=r.finish_reason)
                for r, b, cands in zip(results, built, candidates)]

    def correct(self, generator: Model, x: str, **options: Any) -> Correction:
        """Candidates from the generator (see :func:`generate_candidates` for
        the options: prompt, k, temperature, seed, ...), then the corrector's answer."""
        return self.correct_batch(generator, [x], **options)[0]

    def correct_batch(self, generator: Model, inputs: Sequence[str], **options: Any) -> list[Correction]:
        pools = generate_candidates(generator, inputs, **options)
        out = self.rewrite_batch(list(inputs), [p.texts for p in pools])
        for c, p in zip(out, pools):
            c.generator_tokens = p.generated_tokens
            c.generator_seconds = p.seconds
        return out


def _adapter_format(model: Model) -> Optional[CorrectorFormat]:
    for text in model.adapter_metadata(ADAPTER_FORMAT_KEY):
        if text:
            return CorrectorFormat.from_json(text)
    return None


# ---------------------------------------------------------------- rows
def _jsonl(path: PathLike, what: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file; a line
    that is not JSON raises ValueError naming it (and `what` to do)."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}){what}") from None


def read_rows(path: PathLike, *, limit: Optional[int] = None) -> list[dict[str, str]]:
    """``{"input", "target"}`` rows from a JSONL file, checked."""
    rows = []
    for line_no, row in _jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) \
                or not isinstance(row.get("target"), str):
            raise ValueError(f"{path}:{line_no}: a row must be an object with string 'input' and 'target'")
        rows.append({"input": row["input"], "target": row["target"]})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def make_corrector_data(
    generator: Model,
    rows: Sequence[dict[str, str]],
    out: PathLike,
    *,
    prompt: str = "{input}",
    k: int = 5,
    temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    **candidate_options: Any,
) -> int:
    """Write the generator's candidates for each row to ``out`` (JSONL of
    ``{"input", "target", "candidates"}``); returns the rows written now.

    Row i draws with seed ``seed + i * k``, so a run stopped part-way and
    started again appends exactly what one run would have written: rows
    already in ``out`` are checked against ``rows`` and skipped.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    k = _check_int("k", k, 1)
    path = Path(out)
    done = 0
    if path.exists():
        for line_no, rec in _jsonl(path, "; remove that line to resume"):
            if done >= len(rows) or not isinstance(rec, dict) or rec.get("input") != rows[done]["input"] \
                    or len(rec.get("candidates") or []) != k:
                raise ValueError(f"{path}:{line_no}: does not match row {done} of the data with k={k}; these are "
                                 "another run's candidates (use another output file)")
            done += 1
    bar = Progress(len(rows), "candidates", progress, initial=done)
    written = 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            for start in range(done, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                pools = generate_candidates(generator, [r["input"] for r in chunk], prompt=prompt, k=k,
                                            temperature=temperature,
                                            seeds=[seed + (start + i) * k for i in range(len(chunk))],
                                            **candidate_options)
                for r, p in zip(chunk, pools):
                    f.write(json.dumps({"input": r["input"], "target": r["target"], "candidates": p.texts},
                                       ensure_ascii=False) + "\n")
                f.flush()
                written += len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    return written


# ---------------------------------------------------------------- training
_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# llama.cpp's converter permutes the rows of Q and K for these architectures
# (rotary pairs interleaved); transformers undoes it when it reads the GGUF.
_PERMUTED_QK = {"llama"}
# Architectures whose tensors map as above and whose Q/K order is known here.
_TRAINABLE = {"llama", "qwen2", "qwen3", "gemma2", "gemma3"}


@dataclass
class TrainReport:
    """What :func:`train_corrector` did."""

    out: str
    rows: int
    skipped_too_long: int
    tokens: int                  # tokens seen per epoch (inputs and targets)
    target_tokens: int           # tokens the loss was taken on, per epoch
    epochs: float
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)   # mean loss per logging window
    parameters: int = 0          # trainable LoRA parameters


def _import_training() -> tuple[Any, Any, Any]:
    try:
        import peft
        import torch
        import transformers
    except ImportError as exc:
        raise ImportError(f"lmcor training needs torch, transformers and peft ({exc.name} is missing): "
                          "pip install 'slot_cpp[lmcor]'") from None
    return torch, transformers, peft


def _training_examples(base: Model, fmt: CorrectorFormat, records: Iterable[dict[str, Any]], max_len: int,
                       eos: int) -> tuple[list[tuple[list[int], int]], int]:
    examples, skipped = [], 0
    for rec in records:
        prompt = base.tokenize(fmt.render(rec["input"], rec["candidates"]))
        target = base.tokenize(fmt.target_text(rec["target"]), add_special=False, parse_special=False) + [eos]
        if len(prompt) + len(target) > max_len:
            skipped += 1  # never cut a row: leave it out
            continue
        examples.append((prompt + target, len(prompt)))
    return examples, skipped


def _target_loss(torch: Any, causal: Any, ids: Any, mask: Any, labels: Any) -> Any:
    """Mean cross-entropy over the target tokens, with the output head applied
    at those positions only (the head is a large share of a small model)."""
    hidden = causal.model(input_ids=ids, attention_mask=mask).last_hidden_state
    following = labels[:, 1:]
    keep = following != -100
    logits = causal.lm_head(hidden[:, :-1][keep]).float()
    cap = getattr(causal.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, following[keep])


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter: rows grouped per head as (2, dim/2) -> (dim/2, 2).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_adapter(peft_model: Any, out: Path, *, architecture: str, alpha: float, config: Any,
                   base_digest: str, fmt: CorrectorFormat) -> None:
    import gguf

    tensors: list[tuple[str, np.ndarray]] = []
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in getattr(module, "lora_A", {}):
            continue
        parts = name.split(".")
        layer = int(parts[parts.index("layers") + 1])
        key = ".".join(parts[-2:])
        if key not in _HF_TO_GGUF:
            raise ValueError(f"cannot map the LoRA module {name} to a llama.cpp tensor")
        a = module.lora_A["default"].weight.detach().float().cpu().numpy()   # (r, in)
        b = module.lora_B["default"].weight.detach().float().cpu().numpy()   # (out, r)
        if architecture in _PERMUTED_QK and key == "self_attn.q_proj":
            b = _permute_rows(b, config.num_attention_heads)
        elif architecture in _PERMUTED_QK and key == "self_attn.k_proj":
            b = _permute_rows(b, config.num_key_value_heads)
        base = f"blk.{layer}.{_HF_TO_GGUF[key]}.weight"
        tensors.append((base + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        tensors.append((base + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    if not tensors:
        raise ValueError("the trained model has no LoRA modules")
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), architecture)
    try:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", float(alpha))
        writer.add_string(ADAPTER_BASE_DIGEST_KEY, base_digest)
        writer.add_string(ADAPTER_FORMAT_KEY, fmt.to_json())
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    try:
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def train_corrector(
    base: PathLike,
    data: Union[PathLike, Sequence[dict[str, Any]]],
    out: PathLike,
    *,
    format: Optional[CorrectorFormat] = None,
    rank: int = 16,
    alpha: float = 32.0,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    epochs: float = 1.0,
    lr: float = 1e-3,
    batch_tokens: int = 2048,
    max_len: int = 1024,
    warmup: float = 0.05,
    seed: int = 0,
    threads: Optional[int] = None,
    max_rows: Optional[int] = None,
    progress: bool = False,
) -> TrainReport:
    """Fine-tune a LoRA corrector on ``base`` (a GGUF model) and write it to
    ``out`` as a GGUF LoRA adapter for that base.

    ``data``: rows ``{"input", "target", "candidates"}`` (what
    :func:`make_corrector_data` writes), or its JSONL path. The loss is on the
    target and the end-of-sequence token only. Tokens are those the engine
    makes from the same text, so training and use agree exactly. Rows longer
    than ``max_len`` tokens are left out (counted in the report). Batches
    hold up to ``batch_tokens`` tokens of rows of similar length; AdamW with a
    linear warm-up and decay. Needs the ``[lmcor]`` extra (torch,
    transformers, peft); transformers reads and dequantises the GGUF.
    """
    torch, transformers, peft = _import_training()
    fmt = format or CorrectorFormat()
    known = {key.split(".")[-1] for key in _HF_TO_GGUF}
    if isinstance(target_modules, str) or not target_modules or not set(target_modules) <= known:
        raise ValueError(f"target_modules must be a non-empty list drawn from {sorted(known)}, got {target_modules!r}")
    rank = _check_int("rank", rank, 1)
    alpha = _check_float("alpha", alpha, low=0.0, low_open=True)
    epochs = _check_float("epochs", epochs, low=0.0, low_open=True)
    lr = _check_float("lr", lr, low=0.0, low_open=True)
    batch_tokens = _check_int("batch_tokens", batch_tokens, 1)
    max_len = _check_int("max_len", max_len, 8)
    warmup = _check_float("warmup", warmup, low=0.0, high=1.0)
    base_path = Path(base)
    out_path = Path(out)
    if isinstance(data, (str, os.PathLike)):
        records = [rec for _, rec in _jsonl(data)]
    else:
        records = list(data)
    for i, rec in enumerate(records):
        if not (isinstance(rec, dict) and isinstance(rec.get("input"), str) and isinstance(rec.get("target"), str)
                and isinstance(rec.get("candidates"), list) and rec["candidates"]
                and all(isinstance(c, str) for c in rec["candidates"])):
            raise ValueError(f"training row {i}: needs string 'input' and 'target' and a non-empty list of "
                             "string 'candidates' (what 'slot-cpp lmcor make-data' writes)")
    if max_rows is not None:
        records = records[:_check_int("max_rows", max_rows, 1)]
    if not records:
        raise ValueError("no training rows")

    with Model(base_path, n_parallel=1, n_ctx=512) as tok_model:
        eos = tok_model.eos_token
        if eos is None:
            raise ValueError(f"{base_path} has no end-of-sequence token to end the corrector's answers")
        architecture = tok_model.info.architecture
        if architecture not in _TRAINABLE:
            raise ValueError(f"lmcor training supports the {', '.join(sorted(_TRAINABLE))} architectures; "
                             f"{base_path} is {architecture}")
        digest = str(model_fingerprint(tok_model)["digest"])
        examples, skipped = _training_examples(tok_model, fmt, records, max_len, eos)
    if not examples:
        raise ValueError(f"every training row is longer than max_len={max_len} tokens")

    if threads is not None:
        torch.set_num_threads(_check_int("threads", threads, 1))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Deprecation notices between transformers and peft versions are theirs to settle.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)\b")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(base_path.parent), gguf_file=base_path.name, dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(target_modules),
            task_type="CAUSAL_LM"))
    if hf.config.vocab_size < max(max(ids) for ids, _ in examples) + 1:
        raise ValueError("the GGUF as read by transformers has a smaller vocabulary than the engine's")
    model.train()
    causal = model.get_base_model()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Batches of similar lengths, in a seeded random order.
    rng = np.random.default_rng(seed)
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = max([len(examples[j][0]) for j in current] + [len(examples[i][0])])
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    total_steps = max(1, int(math.ceil(len(batches) * epochs)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warm = max(1, int(total_steps * warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm))))

    losses: list[float] = []
    window: list[float] = []
    bar = Progress(total_steps, "train", progress, unit="step")
    step = 0
    try:
        while step < total_steps:
            for bi in rng.permutation(len(batches)):
                if step >= total_steps:
                    break
                idx = batches[int(bi)]
                width = max(len(examples[j][0]) for j in idx)
                ids = torch.full((len(idx), width), eos, dtype=torch.long)
                labels = torch.full((len(idx), width), -100, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, j in enumerate(idx):
                    seq, n_prompt = examples[j]
                    ids[r, :len(seq)] = torch.tensor(seq)
                    labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
                    mask[r, :len(seq)] = 1
                loss = _target_loss(torch, causal, ids, mask, labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the training loss is not finite at step {step}; try a lower lr")
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                step += 1
                window.append(loss.item())
                if len(window) == 10 or step == total_steps:
                    losses.append(float(np.mean(window)))
                    window = []
                bar.update(1, loss=f"{window[-1] if window else losses[-1]:.3f}")
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_adapter(model, out_path, architecture=architecture, alpha=alpha, config=hf.config, base_digest=digest,
                   fmt=fmt)
    return TrainReport(out=str(out_path), rows=len(examples), skipped_too_long=skipped,
                       tokens=sum(len(s) for s, _ in examples),
                       target_tokens=sum(len(s) - n for s, n in examples), epochs=epochs, steps=step,
                       seconds=seconds, losses=losses, parameters=int(n_params))


# ---------------------------------------------------------------- evaluation
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
    return EvalReport(rows=len(records), k=k, systems=systems, paired=paired,
                      generator_seconds=gen_s / len(records), corrector_seconds=cor_s / len(records),
                      records=records)
