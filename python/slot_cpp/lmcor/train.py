"""Fine-tuning a LoRA corrector with torch, transformers and PEFT (the
``[lmcor]`` extra), on the tokens the engine makes from the same text."""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .._files import read_jsonl
from .._model import Model, model_fingerprint
from .._progress import Progress
from ..options import check_float as _check_float
from ..options import check_int as _check_int
from .adapter import _HF_TO_GGUF, _TRAINABLE, _write_adapter
from .corrector import CorrectorFormat
from .data import PathLike

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# A training example: the prompt's and the target's tokens, and the prompt's length.
Example = tuple[list[int], int]


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


def _training_rows(data: Union[PathLike, Sequence[dict[str, Any]]], max_rows: Optional[int]) -> list[dict[str, Any]]:
    """The rows of `data` (a JSONL path or a list), checked, the first `max_rows` of them."""
    if isinstance(data, (str, os.PathLike)):
        records = [rec for _, rec in read_jsonl(data)]
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
    return records


def _training_examples(base: Model, fmt: CorrectorFormat, records: Iterable[dict[str, Any]], max_len: int,
                       eos: int) -> tuple[list[Example], int]:
    examples, skipped = [], 0
    for rec in records:
        prompt = base.tokenize(fmt.render(rec["input"], rec["candidates"]))
        target = base.tokenize(fmt.target_text(rec["target"]), add_special=False, parse_special=False) + [eos]
        if len(prompt) + len(target) > max_len:
            skipped += 1  # never cut a row: leave it out
            continue
        examples.append((prompt + target, len(prompt)))
    return examples, skipped


def _tokenized(base_path: Path, fmt: CorrectorFormat, records: Sequence[dict[str, Any]], max_len: int
               ) -> tuple[str, str, int, list[Example], int]:
    """The base model's architecture, fingerprint digest and end-of-sequence
    token, the examples, and how many rows were longer than `max_len`."""
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
    return architecture, digest, eos, examples, skipped


def _lora_model(torch: Any, transformers: Any, peft: Any, base_path: Path, rank: int, alpha: float,
                target_modules: Sequence[str]) -> tuple[Any, Any]:
    """The base model as transformers reads the GGUF, and it with LoRA modules."""
    with warnings.catch_warnings():
        # Deprecation notices between transformers and peft versions are theirs to settle.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)\b")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(base_path.parent), gguf_file=base_path.name, dtype=torch.float32)
        model = peft.get_peft_model(hf, peft.LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=list(target_modules),
            task_type="CAUSAL_LM"))
    return hf, model


def _length_batches(examples: Sequence[Example], batch_tokens: int, rng: np.random.Generator) -> list[list[int]]:
    """Batches of examples of similar lengths, up to `batch_tokens` padded
    tokens each, in a seeded random order."""
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
    return batches


def _batch(torch: Any, examples: Sequence[Example], idx: Sequence[int], eos: int) -> tuple[Any, Any, Any]:
    """Token ids (padded with eos), attention mask and labels (-100 outside the targets)."""
    width = max(len(examples[j][0]) for j in idx)
    ids = torch.full((len(idx), width), eos, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for r, j in enumerate(idx):
        seq, n_prompt = examples[j]
        ids[r, :len(seq)] = torch.tensor(seq)
        labels[r, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        mask[r, :len(seq)] = 1
    return ids, mask, labels


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


def _train(torch: Any, model: Any, causal: Any, examples: Sequence[Example], batches: Sequence[list[int]],
           rng: np.random.Generator, *, eos: int, total_steps: int, lr: float, warmup: float,
           progress: bool) -> tuple[list[float], int]:
    """AdamW with a linear warm-up and decay over `total_steps` steps, the
    batches in a new random order each epoch. Returns the mean loss of each
    window of 10 steps, and the steps run."""
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
                ids, mask, labels = _batch(torch, examples, batches[int(bi)], eos)
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
    return losses, step


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
    records = _training_rows(data, max_rows)
    architecture, digest, eos, examples, skipped = _tokenized(base_path, fmt, records, max_len)

    if threads is not None:
        torch.set_num_threads(_check_int("threads", threads, 1))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    hf, model = _lora_model(torch, transformers, peft, base_path, rank, alpha, target_modules)
    if hf.config.vocab_size < max(max(ids) for ids, _ in examples) + 1:
        raise ValueError("the GGUF as read by transformers has a smaller vocabulary than the engine's")
    model.train()
    causal = model.get_base_model()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rng = np.random.default_rng(seed)
    batches = _length_batches(examples, batch_tokens, rng)
    total_steps = max(1, int(math.ceil(len(batches) * epochs)))
    losses, steps = _train(torch, model, causal, examples, batches, rng, eos=eos, total_steps=total_steps, lr=lr,
                           warmup=warmup, progress=progress)
    seconds = time.perf_counter() - t0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _write_adapter(model, out_path, architecture=architecture, alpha=alpha, config=hf.config, base_digest=digest,
                   fmt=fmt)
    return TrainReport(out=str(out_path), rows=len(examples), skipped_too_long=skipped,
                       tokens=sum(len(s) for s, _ in examples),
                       target_tokens=sum(len(s) - n for s, n in examples), epochs=epochs, steps=steps,
                       seconds=seconds, losses=losses, parameters=int(n_params))
