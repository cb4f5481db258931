"""What the commands share: usage errors, logging, argument types, the model,
SLOT/sampling and RTD options, prompts and JSONL rows, result JSON."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

from .. import _core
from .._files import read_jsonl
from .._model import GenerationResult, Model
from ..options import (ModelSettings, RtdOptions, SamplingOptions, SlotOptions, add_arguments, flag_of,
                       from_arguments, group_from_arguments, parse_list, specs)
from ..rtd import CHOICE_LABELS, RTD, Datastore, answer_index


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR
    if getattr(args, "verbose", 0) >= 2:
        level = logging.DEBUG
    elif getattr(args, "verbose", 0) == 1:
        level = logging.INFO
    elif getattr(args, "quiet", False):
        level = logging.CRITICAL
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root = logging.getLogger("slot_cpp")
    root.addHandler(handler)
    root.setLevel(level)
    from .._logging import set_llama_log_level

    set_llama_log_level(level)


# ---------------------------------------------------------------- argument types
_float_list = parse_list(float, "numbers")
_int_list = parse_list(int, "integers")


def _check_count(name: str, value: Optional[int]) -> None:
    if value is not None and value < 0:
        raise UsageError(f"{name} must be >= 0")


# ---------------------------------------------------------------- the model
def _add_model_options(p: argparse.ArgumentParser, *, defaults: Optional[dict[str, Any]] = None) -> None:
    p.add_argument("--model", "-m", help="GGUF model path (default: the embedded Gemma 3 270M)")
    # --n-ctx, --threads, --n-gpu-layers, --n-parallel, --seed: from the definitions of Model(...)'s settings.
    add_arguments(p, ModelSettings, defaults=defaults)
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="offload the layers to these ggml rpc-server processes (see 'slot-cpp rpc-server')")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER.gguf[:SCALE]",
                   help="apply a GGUF LoRA adapter made for --model (repeatable; see 'slot-cpp lmcor train')")
    p.add_argument("--quiet", "-q", action="store_true", help="silence llama.cpp's log")
    p.add_argument("--verbose", "-v", action="count", default=0, help="show llama.cpp's log (-vv: debug)")


def _lora_specs(values: Sequence[str]) -> list[tuple[str, float]]:
    out = []
    for v in values:
        path, sep, scale = v.rpartition(":")
        if sep and path and not Path(v).exists():
            try:
                out.append((path, float(scale)))
                continue
            except ValueError:
                pass
        out.append((v, 1.0))
    return out


def _model_settings(args: argparse.Namespace) -> ModelSettings:
    """Model(...)'s settings, made once from the flags."""
    return group_from_arguments(args, ModelSettings, n_parallel=max(args.n_parallel, getattr(args, "parallel", 1)),
                                rpc=args.rpc, lora=_lora_specs(args.lora) or None)


def _open_model(args: argparse.Namespace) -> Model:
    return Model(args.model, **_model_settings(args).as_dict())


# ---------------------------------------------------------------- SLOT and sampling options
# The flags are made from the option definitions (slot_cpp.options): names,
# types, defaults and help are written there once.
def _add_sampling_options(p: argparse.ArgumentParser, *, slot_lists: bool = False) -> None:
    """SLOT's and the sampler's options; with ``slot_lists``, --steps and --lr take
    comma-separated values, each a setting to evaluate."""
    if slot_lists:
        add_arguments(p, SlotOptions, lists=("steps", "lr"), defaults={"steps": (0, 5)})
    else:
        add_arguments(p, SlotOptions)
    add_arguments(p, SamplingOptions)
    p.add_argument("--chat-template", default=None, help="built-in template name or template string")


def _slot_group(args: argparse.Namespace) -> SlotOptions:
    """SLOT's options, made once from the flags."""
    return group_from_arguments(args, SlotOptions)


def _sampling_group(args: argparse.Namespace) -> SamplingOptions:
    """The sampler's options, made once from the flags (the seed is --seed, the model's)."""
    return group_from_arguments(args, SamplingOptions)


def _slot_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SLOT's options besides steps and lr."""
    return {k: v for k, v in from_arguments(args, SlotOptions).items() if k not in ("steps", "lr")}


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler's options besides the stop strings (the seed is --seed, the model's)."""
    return {k: v for k, v in from_arguments(args, SamplingOptions).items() if k != "stop"}


# ---------------------------------------------------------------- RTD options
def _add_rtd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtd", default=None, metavar="STORE",
                   help="blend retrieval from this RTD datastore (see 'slot-cpp rtd build') into every "
                        "next-token distribution")
    add_arguments(p, RtdOptions, dest_prefix="rtd_")


_RTD_SETTINGS = tuple(("rtd_" + name, flag_of(name, spec)) for name, _, spec in specs(RtdOptions)
                      if flag_of(name, spec))


def _check_rtd_args(args: argparse.Namespace) -> None:
    """Settings of RTD without --rtd are a mistake, not something to ignore."""
    if getattr(args, "rtd", None):
        return
    given = [flag for dest, flag in _RTD_SETTINGS if getattr(args, dest, None) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --rtd STORE")


def _rtd_option(args: argparse.Namespace, model: Model) -> Optional[RTD]:
    """The RTD of --rtd STORE (checked against `model`) with the --rtd-* settings
    (None: the datastore's defaults), or None without --rtd."""
    _check_rtd_args(args)
    if not getattr(args, "rtd", None):
        return None
    store = Datastore.load(args.rtd, model)
    option = RTD(**{**from_arguments(args, RtdOptions, dest_prefix="rtd_"), "datastore": store})
    # Check the settings now (as a request would), not after a long run has begun.
    option._apply(model, _core.Request())
    return option


# ---------------------------------------------------------------- rewards (QAlign, best-of-n)
def _reward(args: argparse.Namespace, model: Model) -> Any:
    from .. import qalign as qa

    spec = args.reward
    if spec == "judge":
        judge = model if args.judge_model is None else Model(args.judge_model, n_ctx=args.n_ctx,
                                                             n_threads=args.threads, n_parallel=model.n_parallel)
        return qa.JudgeReward(judge, args.judge_template or qa.DEFAULT_JUDGE_TEMPLATE, yes=args.judge_yes,
                              no=args.judge_no, chat_template=args.chat_template if args.judge_model is None else None)
    if spec.startswith("head:"):
        return qa.LinearReward.load(spec[len("head:"):], model)
    if spec.startswith("contains:"):
        needle = spec[len("contains:"):]
        return qa.CallableReward(lambda prompt, response: float(needle in response), name=spec)
    raise UsageError("--reward must be 'judge', 'head:FILE.npz' or 'contains:TEXT'")


# ---------------------------------------------------------------- prompts and rows
def _read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        return Path(args.file).read_text(encoding="utf-8")
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return str(args.prompt)


def _row_problem(row: dict[str, Any], mode: str) -> Optional[str]:
    """What is wrong with a JSONL row of this mode, or None."""
    if mode == "generation":
        for key in ("prompt", "completion"):
            if key not in row:
                return f'missing {key!r} (a generation row is {{"prompt", "completion"}})'
            if not isinstance(row[key], str) or not row[key]:
                return f"{key!r} must be a non-empty string"
        return None
    for key in ("question", "choices", "answer"):
        if key not in row:
            return f'missing {key!r} (a choice row is {{"question", "choices", "answer"}})'
    if not isinstance(row["question"], str) or not row["question"]:
        return "'question' must be a non-empty string"
    choices = row["choices"]
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(CHOICE_LABELS)
            or not all(isinstance(c, str) for c in choices)):
        return f"'choices' must be a list of 2 to {len(CHOICE_LABELS)} strings"
    try:
        answer_index(row)
    except ValueError as exc:
        return str(exc)
    return None


def _read_rows(path: str, mode: Optional[str]) -> tuple[list[dict[str, Any]], list[int], str]:
    """The rows of a JSONL file, their line numbers and their mode: ``{"prompt",
    "completion"}`` (generation) or ``{"question", "choices", "answer"}``
    (choice; answer an index or a letter). ``mode`` None: what the first row
    holds. A bad line is a UsageError naming it."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        for number, row in read_jsonl(path):
            if not isinstance(row, dict):
                raise UsageError(f"{path} line {number}: expected a JSON object, got {type(row).__name__}")
            if mode is None:
                mode = "choice" if "choices" in row else "generation"
            problem = _row_problem(row, mode)
            if problem is not None:
                raise UsageError(f"{path} line {number}: {problem}")
            rows.append(row)
            lines.append(number)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path} is not UTF-8 text ({exc.reason})") from None
    except ValueError as exc:  # read_jsonl: a line that is not JSON, named
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise UsageError(f"{path} has no rows")
    assert mode is not None
    return rows, lines, mode


# ---------------------------------------------------------------- results
def result_json(result: GenerationResult) -> dict[str, Any]:
    return {
        "text": result.text,
        "tokens": result.tokens,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "generated_tokens": result.generated_tokens,
        "steps_done": result.steps_done,
        "losses": result.losses,
        "slot_status": result.slot_status,
        "slot_path": result.slot_path,
        "delta_norm": result.delta_norm,
        "timings": {
            "prefill_s": result.timings.prefill,
            "optimise_s": result.timings.optimise,
            "generate_s": result.timings.generate,
            "tokens_per_second": result.tokens_per_second,
        },
    }


def _report_slot(result: GenerationResult, out: TextIO) -> None:
    if result.losses:
        losses = " ".join(f"{x:.4f}" for x in result.losses)
        print(f"[slot] loss per step: {losses}  |delta|={result.delta_norm:.4f}", file=out)
    else:
        print(f"[slot] {result.slot_status}", file=out)
    t = result.timings
    print(f"[slot] prefill {t.prefill:.2f}s, optimise {t.optimise:.2f}s, generate {t.generate:.2f}s "
          f"({result.tokens_per_second:.1f} tok/s), finish: {result.finish_reason}", file=out)
