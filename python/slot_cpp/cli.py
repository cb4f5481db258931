"""Command line: ``slot-cpp`` or ``python -m slot_cpp``.

Subcommands: generate, chat, eval gsm8k, eval mc, explain, info, qalign,
qalign-head, rtd build, rtd info, rtd tune.
Exit codes: 0 success, 1 runtime failure, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO, Union

import numpy as np

from . import SlotError, _core, gsm8k
from ._model import DEFAULT_KL_BUDGET, GenerationResult, Model, Prompt
from .rtd import CHOICE_LABELS, RTD, Datastore, DatastoreError, _answer_index, score_choices, tune


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


# ---------------------------------------------------------------- helpers
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
    from ._logging import set_llama_log_level

    set_llama_log_level(level)


def _lr(text: str) -> Union[float, str]:
    """A SLOT step size: a number, or 'auto' (chosen per prompt)."""
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from exc


def _lr_list(text: str) -> list[Union[float, str]]:
    return [_lr(x) for x in text.split(",") if x.strip()]


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF model path (default: the embedded Gemma 3 270M)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-gpu-layers", type=int, default=0, help="-1: offload every layer")
    p.add_argument("--n-parallel", type=int, default=4,
                   help="sequences decoded together; they share the --n-ctx KV cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rpc", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                   help="offload the layers to these ggml rpc-server processes (see 'slot-cpp rpc-server')")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER.gguf[:SCALE]",
                   help="apply a GGUF LoRA adapter made for --model (repeatable; see 'slot-cpp lmcor train')")
    p.add_argument("--quiet", "-q", action="store_true", help="silence llama.cpp's log")
    p.add_argument("--verbose", "-v", action="count", default=0, help="show llama.cpp's log (-vv: debug)")


def _add_sampling_options(p: argparse.ArgumentParser, *, slot_lists: bool = False) -> None:
    if slot_lists:
        p.add_argument("--steps", type=_int_list, default=[0, 5], help="comma-separated steps values")
        p.add_argument("--lr", type=_lr_list, default=[0.1],
                       help="comma-separated learning rates ('auto': chosen per prompt)")
    else:
        p.add_argument("--steps", type=int, default=5, help="SLOT optimisation steps (0: plain generation)")
        p.add_argument("--lr", type=_lr, default=0.1,
                       help="SLOT learning rate, or 'auto': chosen per prompt by a KL trust region (--kl-budget)")
    p.add_argument("--loss-on", choices=["all", "user"], default="all",
                   help="SLOT's loss over every prompt token (the paper) or only the user's message content "
                        "(chat prompts)")
    _add_kl_budget_option(p)
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat-template", default=None, help="built-in template name or template string")


def _add_kl_budget_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kl-budget", type=float, default=DEFAULT_KL_BUDGET,
                   help="lr auto: the mean KL (nats per loss position) by which delta may move the prompt's "
                        f"next-token distributions (default {DEFAULT_KL_BUDGET:g})")


def _slot_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """SLOT's options besides steps and lr."""
    return dict(loss_on=args.loss_on, kl_budget=args.kl_budget)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed)


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


def _open_model(args: argparse.Namespace) -> Model:
    n_parallel = max(args.n_parallel, getattr(args, "parallel", 1))
    return Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                 n_parallel=n_parallel, seed=args.seed, rpc=args.rpc, lora=_lora_specs(args.lora) or None)


# ---------------------------------------------------------------- RTD options and rows
def _add_rtd_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rtd", default=None, metavar="STORE",
                   help="blend retrieval from this RTD datastore (see 'slot-cpp rtd build') into every "
                        "next-token distribution")
    p.add_argument("--rtd-k", type=int, default=None, help="neighbours retrieved (default: the datastore's)")
    p.add_argument("--rtd-temperature", type=float, default=None,
                   help="softmax temperature over neighbour distances (default: the datastore's)")
    p.add_argument("--rtd-lambda", type=float, default=None,
                   help="weight of the retrieved distribution, 0 to 1 (default: the datastore's)")
    p.add_argument("--rtd-nprobe", type=int, default=None,
                   help="inverted lists searched (0: exact search; >0 needs a datastore built with --ivf)")


_RTD_SETTINGS = (("rtd_k", "--rtd-k"), ("rtd_temperature", "--rtd-temperature"), ("rtd_lambda", "--rtd-lambda"),
                 ("rtd_nprobe", "--rtd-nprobe"))


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
    option = RTD(store, k=args.rtd_k, temperature=args.rtd_temperature, lam=args.rtd_lambda,
                 nprobe=args.rtd_nprobe)
    # Check the settings now (as a request would), not after a long run has begun.
    option._apply(model, _core.Request())
    return option


def _rtd_description(option: RTD) -> dict[str, Any]:
    r = option.resolved()
    return {"datastore": str(r.datastore.path) if r.datastore.path else None, "mode": r.datastore.mode,
            "keys": len(r.datastore), "k": r.k, "temperature": r.temperature, "lam": r.lam, "nprobe": r.nprobe}


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
        _answer_index(row)
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
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
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
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not rows:
        raise UsageError(f"{path} has no rows")
    assert mode is not None
    return rows, lines, mode


def _check_count(name: str, value: Optional[int]) -> None:
    if value is not None and value < 0:
        raise UsageError(f"{name} must be >= 0")


def _require_faiss() -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("--ivf needs faiss: pip install 'slot_cpp[ann]' (faiss-cpu)") from None


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


class Progress:
    """A one-line progress bar with ETA on stderr."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def advance(self, note: str = "", n: int = 1) -> None:
        self.done += n
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s {note}")
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


# ---------------------------------------------------------------- generate
def _read_prompt(args: argparse.Namespace) -> str:
    if args.file:
        return Path(args.file).read_text(encoding="utf-8")
    if args.prompt is None or args.prompt == "-":
        return sys.stdin.read()
    return str(args.prompt)


def cmd_generate(args: argparse.Namespace) -> int:
    _check_rtd_args(args)
    text = _read_prompt(args)
    chat = args.chat or args.system is not None
    with _open_model(args) as model:
        rtd = _rtd_option(args, model)
        prompt: Prompt = text
        if chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = messages + [{"role": "user", "content": text}]
        if args.loss_on == "user" and not chat and args.chat_template is None:
            raise UsageError("--loss-on user needs a chat prompt (--chat, --system or --chat-template)")
        kwargs = dict(steps=args.steps, lr=args.lr, stop=args.stop, chat_template=args.chat_template, rtd=rtd,
                      **_slot_kwargs(args), **_sampling_kwargs(args))
        if args.json:
            result = model.generate_with_slot(prompt, **kwargs)
            print(json.dumps(result_json(result), indent=2))
        else:
            result = model.generate_with_slot(prompt, on_text=lambda s: print(s, end="", flush=True), **kwargs)
            print(flush=True)
            _report_slot(result, sys.stderr)
        if args.save_delta and result.delta is not None:
            np.save(args.save_delta, result.delta)
    return 0


# ---------------------------------------------------------------- chat
def cmd_chat(args: argparse.Namespace) -> int:
    _check_rtd_args(args)
    with _open_model(args) as model:
        if args.chat_template is None and not model.info.has_chat_template:
            raise UsageError("this model has no chat template; pass --chat-template "
                             f"(one of: {', '.join(_core.chat_templates())})")
        rtd = _rtd_option(args, model)
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        print("slot-cpp chat: empty line or /exit to quit, /reset to start over", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() in ("", "/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages = messages[:1] if args.system else []
                continue
            messages.append({"role": "user", "content": line})
            result = model.generate_with_slot(
                messages, steps=args.steps, lr=args.lr, stop=args.stop, chat_template=args.chat_template, rtd=rtd,
                on_text=lambda s: print(s, end="", flush=True), **_slot_kwargs(args), **_sampling_kwargs(args))
            print(flush=True)
            _report_slot(result, sys.stderr)
            messages.append({"role": "assistant", "content": result.text})
    return 0


# ---------------------------------------------------------------- eval
METHODS = ("greedy", "mv", "bon", "wmv", "qalign")


def _methods(args: argparse.Namespace) -> list[str]:
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"unknown --method {m!r}; choose from {', '.join(METHODS)}")
    if not methods:
        raise UsageError("no --method given")
    if any(m != "greedy" for m in methods):
        if args.metric != "accuracy":
            raise UsageError("--method other than greedy needs --metric accuracy")
        if args.budget is None or args.budget < args.max_tokens:
            raise UsageError("sampling methods need --budget (generated tokens per problem, >= --max-tokens)")
        if any(m in ("bon", "wmv", "qalign") for m in methods) and args.reward is None:
            raise UsageError("bon, wmv and qalign need --reward")
    return methods


def _setting_name(args: argparse.Namespace, steps: int, lr: Union[float, str]) -> str:
    """The setting's name in records; '+user', a KL budget other than the
    default and '+rtd' are marked, so that resuming a file never mixes
    records of different settings."""
    budget = getattr(args, "kl_budget", DEFAULT_KL_BUDGET)
    return (gsm8k.setting_name(steps, lr) + ("+user" if getattr(args, "loss_on", "all") == "user" and steps else "")
            + (f",kl={budget:g}" if lr == "auto" and steps and budget != DEFAULT_KL_BUDGET else "")
            + ("+rtd" if args.rtd else ""))


def _eval_settings(args: argparse.Namespace) -> list[tuple[int, float]]:
    settings = []
    for steps in args.steps:
        for lr in (args.lr if steps > 0 else args.lr[:1]):
            if steps < 0 or (lr != "auto" and lr <= 0):
                raise UsageError("--steps must be >= 0 and --lr > 0 (or auto)")
            settings.append((steps, lr))
    if not settings:
        raise UsageError("no settings to evaluate")
    return settings


def cmd_eval(args: argparse.Namespace) -> int:
    _check_rtd_args(args)
    if args.loss_on == "user" and args.format != "chat":
        raise UsageError("--loss-on user needs --format chat (the few-shot format has no user messages)")
    if args.rtd and args.metric == "nll":
        raise UsageError("--rtd needs --metric accuracy (the nll metric scores the plain model's log-probabilities)")
    problems = gsm8k.load_problems(args.data, args.limit)
    if not problems:
        raise UsageError(f"{args.data} has no problems")
    methods = _methods(args)
    if methods != ["greedy"]:
        return _eval_methods(args, problems, methods)
    settings = _eval_settings(args)
    names = [_setting_name(args, s, lr) for s, lr in settings]
    out_path = Path(args.output) if args.output else Path(f"gsm8k-{args.metric}.jsonl")
    done = _done_records(out_path, args.metric)
    todo = [(p, s, lr) for p in problems for (s, lr) in settings if (p.index, _setting_name(args, s, lr)) not in done]
    _say_resuming(done, todo, out_path)
    if args.parallel < 1:
        raise UsageError("--parallel must be >= 1")
    # Generation decodes --parallel problems together; the NLL metric generates nothing.
    chunk = args.parallel if args.metric == "accuracy" else 1
    with _open_model(args) as model:
        rtd = _rtd_option(args, model)
        progress = Progress(len(todo), f"gsm8k {args.metric}")
        with out_path.open("a", encoding="utf-8") as out:
            for start in range(0, len(todo), chunk):
                items = todo[start:start + chunk]
                if args.metric == "accuracy":
                    records = _eval_generate(model, args, items, rtd)
                else:
                    records = [_eval_nll(model, args, *item) for item in items]
                for record in records:
                    out.write(json.dumps(record) + "\n")
                    note = f"{record['setting']}: " + (
                        ("right" if record["correct"] else "wrong") if args.metric == "accuracy"
                        else f"nll {record['nll']:.3f}")
                    progress.advance(note)
                out.flush()
        progress.close()
    _summarise_records(out_path, problems, names, args.metric)
    return 0


def _done_records(out_path: Path, metric: str) -> set[tuple[int, str]]:
    """(problem index, setting) of the records already written: they are not redone."""
    return {(r["index"], r["setting"]) for r in gsm8k.read_records(out_path) if r.get("metric") == metric}


def _say_resuming(done: set[tuple[int, str]], todo: list[Any], out_path: Path) -> None:
    if done:
        print(f"resuming: {len(done)} records already in {out_path}, {len(todo)} to go", file=sys.stderr)


def _summarise_records(out_path: Path, problems: list[gsm8k.Problem], names: list[str], metric: str) -> None:
    records = [r for r in gsm8k.read_records(out_path) if r.get("metric") == metric]
    indices = {p.index for p in problems}
    _print_summary(gsm8k.summarise([r for r in records if r["index"] in indices], names, metric), metric, out_path)


def _eval_prompt(args: argparse.Namespace, question: str) -> tuple[Prompt, list[str]]:
    if args.format == "chat":
        return gsm8k.chat_messages(question), gsm8k.CHAT_STOP
    return gsm8k.fewshot_prompt(question), gsm8k.FEWSHOT_STOP


def _eval_methods(args: argparse.Namespace, problems: list[gsm8k.Problem], methods: list[str]) -> int:
    """Test-time methods at one budget of generated tokens per problem."""
    from . import qalign as qa

    names = [(f"{m}@{args.budget}" if m != "greedy" else "greedy") + ("+rtd" if args.rtd else "") for m in methods]
    out_path = Path(args.output) if args.output else Path("gsm8k-methods.jsonl")
    done = _done_records(out_path, "accuracy")
    todo = [(p, m, n) for p in problems for m, n in zip(methods, names) if (p.index, n) not in done]
    _say_resuming(done, todo, out_path)
    samples = max(1, args.budget // args.max_tokens)
    with _open_model(args) as model:
        reward = _reward(args, model) if args.reward else None
        rtd = _rtd_option(args, model)
        progress = Progress(len(todo), "gsm8k methods")
        with out_path.open("a", encoding="utf-8") as out:
            for problem, method, name in todo:
                prompt, stop = _eval_prompt(args, problem.question)
                stop = stop + list(args.stop)
                start = time.monotonic()
                common: dict[str, Any] = dict(max_tokens=args.max_tokens, seed=args.seed + problem.index, stop=stop)
                if method == "greedy":
                    r = model.generate(prompt, chat_template=args.chat_template, rtd=rtd, **common)
                    prediction, tokens, text = gsm8k.extract_answer(r.text), r.generated_tokens, r.text
                elif method == "qalign":
                    assert reward is not None  # _methods requires --reward for qalign
                    q = qa.qalign(model, prompt, reward=reward, beta=args.beta, steps=10**6, budget=args.budget,
                                  chat_template=args.chat_template, rtd=rtd, **common)
                    prediction, tokens = q.answer, q.generated_tokens
                    text = q.answer_state.text if q.answer_state is not None else ""
                else:
                    fn = {"mv": qa.majority_vote, "bon": qa.best_of_n, "wmv": qa.weighted_majority_vote}[method]
                    kwargs: dict[str, Any] = dict(n=samples, chat_template=args.chat_template, rtd=rtd, **common)
                    if method != "mv":
                        kwargs["reward"] = reward
                    b = fn(model, prompt, **kwargs)
                    prediction, tokens, text = b.answer, b.generated_tokens, b.samples[0].text
                record = {"metric": "accuracy", "index": problem.index, "setting": name, "method": method,
                          "budget": args.budget, "question": problem.question, "reference": problem.reference,
                          "completion": text, "prediction": prediction,
                          "correct": gsm8k.is_correct(prediction, problem.reference), "losses": [],
                          "generated_tokens": tokens, "seconds": time.monotonic() - start}
                if args.rtd:
                    record["rtd"] = args.rtd
                out.write(json.dumps(record) + "\n")
                out.flush()
                progress.advance(f"{name}: {'right' if record['correct'] else 'wrong'}")
        progress.close()
    _summarise_records(out_path, problems, names, "accuracy")
    return 0


def _record_base(args: argparse.Namespace, problem: gsm8k.Problem, steps: int, lr: float) -> dict:
    base = {"metric": args.metric, "index": problem.index, "setting": _setting_name(args, steps, lr),
            "steps": steps, "lr": lr, "format": args.format, "loss_on": args.loss_on}
    if args.rtd:
        base["rtd"] = args.rtd
    return base


def _eval_nll(model: Model, args: argparse.Namespace, problem: gsm8k.Problem, steps: int, lr: float) -> dict:
    prompt, _ = _eval_prompt(args, problem.question)
    start = time.monotonic()
    prompt_ids = model.prompt_tokens(prompt, chat_template=args.chat_template)
    solution_ids = model.tokenize(" " + problem.answer, add_special=False, parse_special=False)
    if args.loss_on == "user":
        slot = model.generate_with_slot(prompt, chat_template=args.chat_template, steps=steps, lr=lr, max_tokens=0,
                                        **_slot_kwargs(args))
    else:
        slot = model.generate_with_slot("", prompt_token_ids=prompt_ids, steps=steps, lr=lr, max_tokens=0,
                                        kl_budget=args.kl_budget)
    logp = model.token_logprobs(prompt_ids + solution_ids, len(prompt_ids), slot.delta if steps else None)
    return {**_record_base(args, problem, steps, lr), "nll": float(-logp.mean()),
            "solution_tokens": len(solution_ids), "losses": slot.losses, "seconds": time.monotonic() - start,
            "chosen_lr": slot.lr, "optimise_seconds": slot.timings.optimise,
            "calibration": [[c_lr, c_kl] for c_lr, c_kl in slot.calibration],
            "calibration_seconds": slot.calibration_seconds}


def _eval_generate(model: Model, args: argparse.Namespace, items: list[tuple[gsm8k.Problem, int, float]],
                   rtd: Optional[RTD] = None) -> list[dict]:
    """Generates the answers of several (problem, steps, lr) items in one batch."""
    prompts, stops = [], []
    for problem, _, _ in items:
        prompt, stop = _eval_prompt(args, problem.question)
        prompts.append(prompt)
        stops.append(stop + list(args.stop))
    start = time.monotonic()
    results = model.generate_batch(prompts, steps=[s for _, s, _ in items], lr=[lr for _, _, lr in items],
                                   stop=stops, chat_template=args.chat_template, rtd=rtd, **_slot_kwargs(args),
                                   **_sampling_kwargs(args))
    seconds = (time.monotonic() - start) / len(items)
    records = []
    for (problem, steps, lr), result in zip(items, results):
        prediction = gsm8k.extract_answer(result.text)
        records.append({
            **_record_base(args, problem, steps, lr), "question": problem.question, "reference": problem.reference,
            "completion": result.text, "prediction": prediction,
            "correct": gsm8k.is_correct(prediction, problem.reference), "losses": result.losses,
            "generated_tokens": result.generated_tokens, "seconds": seconds})
    return records


def _print_summary(rows: list[dict], metric: str, path: Path) -> None:
    print(f"\nGSM8K {metric} ({path}):")
    if metric == "accuracy":
        print("| setting | n | accuracy | 95% CI | fixed | broken | McNemar p |")
        print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
        for r in rows:
            lo, hi = r["ci95"]
            extra = (f"{r['fixed']} | {r['broken']} | {r['p_value']:.3f}" if "fixed" in r else "- | - | -")
            print(f"| {r['setting']} | {r['n']} | {100 * r['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | {extra} |")
    else:
        print("| setting | n | NLL/token | vs first setting (95% CI) | better | worse |")
        print("| --- | ---: | ---: | --- | ---: | ---: |")
        for r in rows:
            extra = (f"{r['delta_nll']:+.4f} ± {r['delta_ci95']:.4f} | {r['better']} | {r['worse']}"
                     if "delta_nll" in r else "- | - | -")
            print(f"| {r['setting']} | {r['n']} | {r['nll']:.4f} | {extra} |")


# ---------------------------------------------------------------- eval mc
def cmd_eval_mc(args: argparse.Namespace) -> int:
    """Multiple-choice accuracy of the plain model, of SLOT's settings (--steps,
    --lr) and, with --rtd, of the blend on each, on the same prompts (paired
    against plain: fixed, broken, exact McNemar p)."""
    _check_rtd_args(args)
    _check_count("--shots", args.shots)
    _check_count("--limit", args.limit)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    settings = [(0, args.lr[0])] + [s for s in _eval_settings(args) if s[0] > 0]
    names = ["plain"] + [gsm8k.setting_name(steps, lr) for steps, lr in settings[1:]]
    rows, lines, _ = _read_rows(args.data, "choice")
    shots, questions = rows[:args.shots], rows[args.shots:]
    first = args.shots
    if args.limit is not None:
        questions = questions[:args.limit]
    if not questions:
        raise UsageError(f"{args.data} has no questions left to evaluate after {args.shots} shot(s)")
    answers = [_answer_index(q) for q in questions]
    n = len(questions)
    with _open_model(args) as model:
        rtd = _rtd_option(args, model)
        prompt_shots = len(shots)
        template: Optional[str] = None
        if rtd is not None and rtd.datastore.mode == "choice":
            stored = list(rtd.datastore.params.get("shots", ()))
            if not shots:
                prompt_shots = len(stored)  # score_choices takes the datastore's own prompt format
            else:
                template = rtd.datastore.params.get("template")  # its template, with these shots
            if shots and stored != shots:
                print(f"slot-cpp: note: --shots {len(shots)} replaces the datastore's prompt format "
                      f"({len(stored)} stored shot(s)); its keys were taken with that one", file=sys.stderr)
        progress = Progress(n * len(settings), "mc")
        scores: list[list[Any]] = []  # per setting, per question
        for (steps, lr), name in zip(settings, names):
            got_all: list[Any] = []
            for start in range(0, n, args.batch_size):
                chunk = questions[start:start + args.batch_size]
                got_all.extend(score_choices(model, chunk, rtd=rtd, shots=shots, template=template, steps=steps,
                                             lr=lr, kl_budget=args.kl_budget))
                right = sum(sc.plain_choice == answers[i] for i, sc in enumerate(got_all))
                progress.advance(f"{name} {right / len(got_all):.3f}", n=len(chunk))
            scores.append(got_all)
        progress.close()
    # One row per setting, and per setting with RTD; each paired against plain.
    plain_ok = [sc.plain_choice == a for sc, a in zip(scores[0], answers)]
    table: list[dict[str, Any]] = []
    for (steps, lr), setting, got in zip(settings, names, scores):
        variants = [("", [sc.plain_choice == a for sc, a in zip(got, answers)])]
        if rtd is not None:
            variants.append(("+rtd", [sc.rtd_choice == a for sc, a in zip(got, answers)]))
        for suffix, ok in variants:
            name = setting + suffix
            fixed = sum(o and not p for p, o in zip(plain_ok, ok))
            broken = sum(p and not o for p, o in zip(plain_ok, ok))
            lo, hi = gsm8k.wilson_interval(sum(ok), n)
            row: dict[str, Any] = {"setting": name, "steps": steps, "lr": lr, "rtd": bool(suffix),
                                   "correct": sum(ok), "accuracy": sum(ok) / n, "ci95": [lo, hi]}
            if name != "plain":
                row.update({"fixed": fixed, "broken": broken, "mcnemar_p": gsm8k.mcnemar_p(fixed, broken)})
            if steps > 0 and lr == "auto":
                # The trust region's step sizes are continuous: their spread, not a count per value.
                chosen = np.array([sc.lr for sc in got])
                row["lr_chosen"] = {"median": float(np.median(chosen)), "min": float(chosen.min()),
                                    "max": float(chosen.max())}
            table.append(row)
    summary: dict[str, Any] = {"data": args.data, "n": n, "shots": prompt_shots, "settings": table}
    base = table[0]
    summary.update({"plain_correct": base["correct"], "plain_accuracy": base["accuracy"],
                    "plain_ci95": base["ci95"]})
    if rtd is not None:
        with_rtd = table[1]
        summary.update({"rtd_correct": with_rtd["correct"], "rtd_accuracy": with_rtd["accuracy"],
                        "rtd_ci95": with_rtd["ci95"], "fixed": with_rtd["fixed"], "broken": with_rtd["broken"],
                        "mcnemar_p": with_rtd["mcnemar_p"], "rtd": _rtd_description(rtd)})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            for i, (q, a) in enumerate(zip(questions, answers)):
                sc = scores[0][i]
                record: dict[str, Any] = {
                    "index": first + i, "line": lines[first + i], "question": q["question"],
                    "choices": q["choices"], "answer": a, "plain_probs": [float(x) for x in sc.plain],
                    "plain_choice": sc.plain_choice, "plain_correct": plain_ok[i]}
                if sc.rtd is not None:
                    record.update({"rtd_probs": [float(x) for x in sc.rtd], "rtd_choice": sc.rtd_choice,
                                   "rtd_correct": sc.rtd_choice == a})
                for setting, got in zip(names[1:], scores[1:]):
                    g = got[i]
                    entry: dict[str, Any] = {"probs": [float(x) for x in g.plain], "choice": g.plain_choice,
                                             "correct": g.plain_choice == a, "lr": g.lr}
                    if g.rtd is not None:
                        entry.update({"rtd_probs": [float(x) for x in g.rtd], "rtd_choice": g.rtd_choice})
                    record.setdefault("slot", {})[setting] = entry
                out.write(json.dumps(record) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"\nMultiple choice ({args.data}, {prompt_shots} shot(s)):")
    print("| setting | n | accuracy | 95% CI | fixed | broken | McNemar p |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for row in table:
        name = row["setting"]
        if row["rtd"] and rtd is not None:
            d = summary["rtd"]
            name += f" (k={d['k']} T={d['temperature']:.4g} lambda={d['lam']:g})"
        lo, hi = row["ci95"]
        paired = (f"{row['fixed']} | {row['broken']} | {row['mcnemar_p']:.3f}" if "fixed" in row else "- | - | -")
        print(f"| {name} | {n} | {100 * row['accuracy']:.1f}% | {100 * lo:.1f}-{100 * hi:.1f}% | {paired} |")
    for row in table:
        if row.get("lr_chosen") and not row["rtd"]:
            c = row["lr_chosen"]
            print(f"{row['setting']}: step sizes chosen: median {c['median']:.4g} (range {c['min']:.4g}-{c['max']:.4g})")
    return 0


# ---------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    text = _read_prompt(args)
    with _open_model(args) as model:
        prompt: Prompt = [{"role": "user", "content": text}] if args.chat else text
        result = model.generate_with_slot(prompt, steps=args.steps, lr=args.lr, max_tokens=0,
                                          chat_template=args.chat_template, kl_budget=args.kl_budget)
        calibration = [{"lr": lr, "kl": kl} for lr, kl in result.calibration]
        if calibration and not args.json:
            print(f"lr auto, mean KL per step size (budget {args.kl_budget:g}): " +
                  "  ".join(f"{c['lr']:.3g}: {c['kl']:.2e}" for c in calibration) + f"  -> lr {result.lr:.4g}")
        if result.delta is None or result.steps_done == 0:
            if calibration and args.plot:
                _plot_explain({"calibration": calibration, "lr": result.lr, "kl_budget": args.kl_budget}, args.plot)
            raise UsageError(f"no delta was learned: {result.slot_status}")
        bias = model.logit_bias(result.delta)
        order = np.argsort(bias)
        top = [int(i) for i in order[::-1][: args.top]]
        bottom = [int(i) for i in order[: args.top]]

        def label(t: int) -> str:
            return model._s().token_piece(t).decode("utf-8", "replace")

        report = {
            "losses": result.losses,
            "lr": result.lr,
            "calibration": calibration,
            "kl_budget": args.kl_budget,
            "delta_norm": result.delta_norm,
            "raised": [{"token": t, "piece": label(t), "logit_change": float(bias[t])} for t in top],
            "lowered": [{"token": t, "piece": label(t), "logit_change": float(bias[t])} for t in bottom],
        }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("loss per step: " + " ".join(f"{x:.4f}" for x in report["losses"]))
        print(f"|delta| = {report['delta_norm']:.4f}")
        print(f"\nraised most by delta (logit change, from W*delta):")
        for r in report["raised"]:
            print(f"  {r['logit_change']:+8.3f}  {r['piece']!r}")
        print(f"\nlowered most:")
        for r in report["lowered"]:
            print(f"  {r['logit_change']:+8.3f}  {r['piece']!r}")
    if args.plot:
        _plot_explain(report, args.plot)
    return 0


def _plot_explain(report: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'slot_cpp[plot]'") from exc
    calibration = report.get("calibration") or []
    panels = (1 if calibration else 0) + (2 if "losses" in report else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 5), squeeze=False)
    ax = list(axes[0])
    if calibration:
        # lr="auto": the KL ladder of the reference delta, the budget and the step size read off it.
        cal = ax.pop(0)
        lrs = [c["lr"] for c in calibration]
        kls = [c["kl"] for c in calibration]
        shown = [(lr, kl) for lr, kl in zip(lrs, kls) if kl > 0]
        cal.loglog([lr for lr, _ in shown], [kl for _, kl in shown], marker="o", label="reference delta, scaled")
        cal.axhline(report["kl_budget"], color="tab:grey", linestyle="--", label="KL budget")
        if report["lr"] > 0:
            cal.axvline(report["lr"], color="tab:red", label=f"chosen lr {report['lr']:.3g}")
        cal.set_xlabel("step size")
        cal.set_ylabel("mean KL(p0 || p_delta) over the prompt (nats)")
        cal.set_title("lr=auto: trust region")
        cal.legend()
    if "losses" in report:
        ax1, ax2 = ax
        ax1.plot(range(1, len(report["losses"]) + 1), report["losses"], marker="o")
        ax1.set_xlabel("step")
        ax1.set_ylabel("prompt loss (nats/token)")
        ax1.set_title("SLOT loss per step")
        items = report["raised"][::-1] + report["lowered"][::-1]
        ax2.barh([repr(r["piece"]) for r in items], [r["logit_change"] for r in items],
                 color=["tab:green"] * len(report["raised"]) + ["tab:red"] * len(report["lowered"]))
        ax2.set_xlabel("logit change (W*delta)")
        ax2.set_title("tokens delta raises and lowers most")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from . import __version__

    build = {"slot_cpp": __version__, "llama_cpp": _core.llama_cpp_source, "devices": _core.backend_devices(),
             "gpu_offload": _core.supports_gpu_offload(), "system_info": _core.system_info().strip()}
    with _open_model(args) as model:
        info = model.info
        data = {"model": dict(info.__dict__), "build": build}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section, values in data.items():
        print(f"[{section}]")
        for k, v in values.items():
            print(f"  {k}: {v}")
    return 0


# ---------------------------------------------------------------- rtd
def _row_error(exc: DatastoreError, path: str, lines: list[int]) -> UsageError:
    """A datastore's 'row i: ...' error, told as the JSONL line it came from."""
    msg = str(exc)
    m = re.match(r"row (\d+)\b", msg)
    if m and int(m.group(1)) < len(lines):
        return UsageError(f"{path} line {lines[int(m.group(1))]}{msg[m.end():]}")
    return UsageError(msg)


def cmd_rtd_build(args: argparse.Namespace) -> int:
    _check_count("--shots", args.shots)
    _check_count("--limit", args.limit)
    if args.heads is not None and args.heads < 1:
        raise UsageError("--heads must be >= 1")
    existing: Optional[Datastore] = None
    mode = args.mode
    if args.append:
        if args.shots:
            raise UsageError("--shots cannot be used with --append: the datastore keeps the prompt format "
                             "it was built with")
        if not Path(args.out).exists():
            raise UsageError(f"--append: {args.out} does not exist (build it first, without --append)")
        existing = Datastore.load(args.out)
        if mode is not None and mode != existing.mode:
            raise UsageError(f"--mode {mode}, but {args.out} is a {existing.mode} datastore")
        if args.heads is not None and args.heads != existing.heads:
            raise UsageError(f"--heads {args.heads}, but {args.out} has {existing.heads} head(s)")
        mode = existing.mode
    if args.ivf is not None:
        if args.ivf < 1:
            raise UsageError("--ivf must be >= 1 (the number of inverted lists)")
        _require_faiss()
    elif args.nprobe is not None:
        raise UsageError("--nprobe needs --ivf")
    rows, lines, mode = _read_rows(args.data, mode)
    if args.shots and mode != "choice":
        raise UsageError("--shots is for choice datastores (rows with question, choices, answer)")
    if args.shots >= len(rows):
        raise UsageError(f"--shots {args.shots} leaves none of the {len(rows)} rows of {args.data} to add")
    shots, rows, lines = rows[:args.shots], rows[args.shots:], lines[args.shots:]
    if args.limit is not None:
        rows, lines = rows[:args.limit], lines[:args.limit]
    if not rows:
        raise UsageError("no rows to add (--limit 0)")
    progress = sys.stderr.isatty()
    with _open_model(args) as model:
        start = time.perf_counter()
        try:
            if existing is not None:
                existing.check_model(model)
                had_ivf = existing.has_ivf
                before = len(existing)
                store = existing.extend(model, rows, progress=progress)
                if had_ivf and args.ivf is None:
                    print(f"slot-cpp: note: appending dropped {args.out}'s inverted file; pass --ivf to build it "
                          "again", file=sys.stderr)
            else:
                before = 0
                store = Datastore.build(model, rows, mode=mode, heads=args.heads or 1, shots=shots,
                                        progress=progress)
        except DatastoreError as exc:
            raise _row_error(exc, args.data, lines) from None
        if args.ivf is not None:
            try:
                store.build_ivf(model, args.ivf, nprobe=args.nprobe)
            except ImportError as exc:
                raise UsageError(str(exc)) from None
        seconds = time.perf_counter() - start
        path = store.save(args.out)
    added = len(store) - before
    line = (f"rtd build: {added} keys from {len(rows)} rows in {seconds:.1f}s ({added / max(seconds, 1e-9):.1f} "
            f"keys/s); {path}: {len(store)} {store.mode} keys" + (f", ivf {args.ivf} lists" if args.ivf else ""))
    if args.json:
        print(line, file=sys.stderr)
        print(json.dumps(store.info(), indent=2))
    else:
        print(line)
    return 0


def _print_tree(values: dict[str, Any], indent: int = 0) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            _print_tree(value, indent + 2)
        elif isinstance(value, float):
            print(f"{' ' * indent}{key}: {value:.6g}")
        else:
            print(f"{' ' * indent}{key}: {value}")


def cmd_rtd_info(args: argparse.Namespace) -> int:
    info = Datastore.load(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_tree(info)
    return 0


def cmd_rtd_tune(args: argparse.Namespace) -> int:
    _check_count("--limit", args.limit)
    store = Datastore.load(args.store)
    rows, lines, _ = _read_rows(args.data, store.mode)
    if args.limit is not None:
        rows = rows[:args.limit]
    if not rows:
        raise UsageError("no validation rows (--limit 0)")
    grid: dict[str, Any] = {}
    if args.ks is not None:
        grid["ks"] = args.ks
    if args.temperature_scales is not None:
        grid["temperature_scales"] = args.temperature_scales
    if args.lams is not None:
        grid["lams"] = args.lams
    with _open_model(args) as model:
        store.check_model(model)
        try:
            result = tune(model, store, rows, save=True, progress=sys.stderr.isatty(), **grid)
        except DatastoreError as exc:
            raise _row_error(exc, args.data, lines) from None
        path = store.save(args.out or args.store)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    if result.metric == "accuracy":
        scores = f"accuracy plain {100 * result.plain_score:.1f}% -> tuned {100 * result.score:.1f}%"
    else:
        scores = f"NLL/token plain {result.plain_score:.4f} -> tuned {result.score:.4f}"
    print(f"rtd tune on {len(rows)} rows: k={result.k} temperature={result.temperature:.4g} "
          f"lambda={result.lam:g}; {scores}")
    print(f"saved as the defaults of {path}")
    return 0


# ---------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slot-cpp", description="SLOT test-time optimisation for GGUF models")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with SLOT")
    gen.add_argument("prompt", nargs="?", help="prompt text ('-' or absent: read stdin)")
    gen.add_argument("--file", "-f", help="read the prompt from a file")
    gen.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    gen.add_argument("--system", default=None, help="system prompt (implies --chat)")
    gen.add_argument("--json", action="store_true", help="print the full result as JSON")
    gen.add_argument("--save-delta", default=None, help="save the learned delta to this .npy file")
    _add_model_options(gen)
    _add_sampling_options(gen)
    _add_rtd_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat; SLOT re-optimised on each turn")
    chat.add_argument("--system", default=None)
    _add_model_options(chat)
    _add_sampling_options(chat)
    _add_rtd_options(chat)
    chat.set_defaults(func=cmd_chat)

    ev = sub.add_parser("eval", help="evaluate SLOT settings on a benchmark")
    ev_sub = ev.add_subparsers(dest="benchmark", required=True)
    g = ev_sub.add_parser("gsm8k", help="GSM8K-format JSONL (question, answer with '#### N')")
    g.add_argument("--data", required=True, help="GSM8K-format JSONL file")
    g.add_argument("--limit", type=int, default=None, help="first N problems only")
    g.add_argument("--metric", choices=("accuracy", "nll"), default="accuracy",
                   help="accuracy: generate and check the final number; nll: teacher-forced NLL of the "
                        "reference solution, delta learned on the prompt only")
    g.add_argument("--format", choices=gsm8k.FORMATS, default="fewshot",
                   help="fewshot: plain few-shot prompt; chat: chat template with a think/answer system prompt")
    g.add_argument("--output", "-o", default=None, help="JSONL of per-problem records (resumed if present)")
    g.add_argument("--parallel", type=int, default=1,
                   help="problems decoded together (accuracy metric); records are written per batch")
    g.add_argument("--method", default="greedy",
                   help="comma-separated: greedy (with --steps/--lr), mv (majority vote), bon (best-of-n), "
                        "wmv (weighted majority vote), qalign; the sampling methods share --budget")
    g.add_argument("--budget", type=int, default=None, help="generated tokens per problem for sampling methods")
    g.add_argument("--reward", default=None, help="for bon, wmv, qalign: judge, head:FILE.npz or contains:TEXT")
    g.add_argument("--beta", type=float, default=1.0, help="QAlign's beta")
    g.add_argument("--judge-model", default=None)
    g.add_argument("--judge-template", default=None)
    g.add_argument("--judge-yes", default=" yes")
    g.add_argument("--judge-no", default=" no")
    _add_model_options(g)
    _add_sampling_options(g, slot_lists=True)
    _add_rtd_options(g)
    g.set_defaults(func=cmd_eval)

    mc = ev_sub.add_parser("mc", help="multiple-choice accuracy (question, choices, answer): plain, with SLOT "
                                      "settings (--steps, --lr) and with --rtd")
    mc.add_argument("--data", required=True,
                    help="JSONL of {question, choices, answer}; answer a choice index or a letter")
    mc.add_argument("--shots", type=int, default=0,
                    help="the first N rows are the prompt's solved examples and are not evaluated (default: "
                         "none, or with --rtd of a choice datastore, the datastore's own prompt format)")
    mc.add_argument("--limit", type=int, default=None, help="evaluate the first N questions (after the shots)")
    mc.add_argument("--batch-size", type=int, default=32, help="questions scored per batch")
    mc.add_argument("--steps", type=_int_list, default=[0],
                    help="comma-separated SLOT steps; each setting above 0 learns a delta on every prompt "
                         "(default: 0, plain only)")
    mc.add_argument("--lr", type=_lr_list, default=[0.1],
                    help="comma-separated SLOT learning rates ('auto': chosen per prompt)")
    _add_kl_budget_option(mc)
    mc.add_argument("--json", action="store_true", help="print the summary as JSON")
    mc.add_argument("--out", "--output", "-o", dest="out", default=None,
                    help="write per-question records (probabilities, choices, correctness) to this JSONL")
    _add_model_options(mc)
    _add_rtd_options(mc)
    mc.set_defaults(func=cmd_eval_mc)

    ex = sub.add_parser("explain", help="learn delta for a prompt and show what it does")
    ex.add_argument("prompt", nargs="?")
    ex.add_argument("--file", "-f")
    ex.add_argument("--chat", action="store_true")
    ex.add_argument("--steps", type=int, default=5)
    ex.add_argument("--lr", type=_lr, default=0.1, help="SLOT learning rate, or 'auto' (the trust region's "
                    "KL ladder is shown and plotted)")
    _add_kl_budget_option(ex)
    ex.add_argument("--top", type=int, default=15, help="tokens to list in each direction")
    ex.add_argument("--chat-template", default=None)
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--plot", default=None, help="write a PNG of the losses and token shifts")
    _add_model_options(ex)
    ex.set_defaults(func=cmd_explain)

    qa_p = sub.add_parser("qalign", help="QAlign: sample an answer by MCMC under a reward")
    qa_p.add_argument("prompt", nargs="?", help="prompt text ('-' or absent: read stdin)")
    qa_p.add_argument("--file", "-f")
    qa_p.add_argument("--chat", action="store_true")
    qa_p.add_argument("--system", default=None)
    qa_p.add_argument("--reward", required=True,
                      help="judge (an LLM judge: this model or --judge-model), head:FILE.npz (a trained linear "
                           "head, see qalign-head), or contains:TEXT (1 if the response contains TEXT)")
    qa_p.add_argument("--judge-model", default=None, help="GGUF of the judge (default: the policy model)")
    qa_p.add_argument("--judge-template", default=None, help="judge prompt with {prompt} and {response}")
    qa_p.add_argument("--judge-yes", default=" yes")
    qa_p.add_argument("--judge-no", default=" no")
    qa_p.add_argument("--steps", type=int, default=64)
    qa_p.add_argument("--beta", type=float, default=1.0)
    qa_p.add_argument("--chains", type=int, default=1)
    qa_p.add_argument("--burn-in", type=int, default=0)
    qa_p.add_argument("--max-tokens", "-n", type=int, default=256)
    qa_p.add_argument("--top-k", type=int, default=0, help="restrict the proposal (0: the full distribution)")
    qa_p.add_argument("--stop", action="append", default=[])
    qa_p.add_argument("--answer", choices=("vote", "mbr"), default="vote")
    qa_p.add_argument("--extract", choices=("gsm8k", "text"), default="gsm8k",
                      help="what a vote counts: GSM8K's final number, or the whole text")
    qa_p.add_argument("--chat-template", default=None)
    qa_p.add_argument("--slot-steps", type=int, default=0,
                      help="shape the proposal with SLOT: optimisation steps on the prompt (0: off)")
    qa_p.add_argument("--slot-lr", type=_lr, default=0.01, help="SLOT's step size (or auto)")
    qa_p.add_argument("--json", action="store_true")
    _add_rtd_options(qa_p)
    _add_model_options(qa_p)
    qa_p.set_defaults(func=cmd_qalign)

    qh = sub.add_parser("qalign-head", help="train a linear reward head on GSM8K-format problems")
    qh.add_argument("--data", required=True, help="GSM8K-format JSONL (question, answer with '#### N')")
    qh.add_argument("--limit", type=int, default=None)
    qh.add_argument("--samples", type=int, default=4, help="answers sampled per problem")
    qh.add_argument("--max-tokens", type=int, default=256)
    qh.add_argument("--l2", type=float, default=100.0)
    qh.add_argument("--format", choices=gsm8k.FORMATS, default="fewshot")
    qh.add_argument("--chat-template", default=None)
    qh.add_argument("--out", "-o", required=True, help="where to write the head (.npz)")
    _add_model_options(qh)
    qh.set_defaults(func=cmd_qalign_head)

    rtd_p = sub.add_parser("rtd", help="RTD retrieval datastores: build, info, tune")
    rtd_sub = rtd_p.add_subparsers(dest="rtd_command", required=True)
    rb = rtd_sub.add_parser("build", help="build (or --append to) a datastore from JSONL rows")
    rb.add_argument("--data", required=True,
                    help="JSONL of {prompt, completion} (generation) or {question, choices, answer} (choice)")
    rb.add_argument("--out", "-o", required=True, help="the datastore file to write (with --append: to extend)")
    rb.add_argument("--mode", choices=("generation", "choice"), default=None,
                    help="default: what the first row holds")
    rb.add_argument("--heads", type=int, default=None, help="split keys into H slices searched apart (default 1)")
    rb.add_argument("--shots", type=int, default=0,
                    help="choice mode: the first N rows become the prompt's solved examples (stored in the "
                         "datastore) and are not added as keys")
    rb.add_argument("--append", action="store_true",
                    help="load --out (built with this model) and add the rows' keys to it")
    rb.add_argument("--ivf", type=int, default=None, metavar="NLIST",
                    help="also build an inverted file of NLIST lists (needs faiss; heads=1)")
    rb.add_argument("--nprobe", type=int, default=None, help="with --ivf: the default lists searched per query")
    rb.add_argument("--limit", type=int, default=None, help="add the first N rows only (after the shots)")
    rb.add_argument("--json", action="store_true", help="print the datastore's info as JSON")
    _add_model_options(rb)
    rb.set_defaults(func=cmd_rtd_build)

    ri = rtd_sub.add_parser("info", help="sizes, build parameters and defaults of a datastore (no model needed)")
    ri.add_argument("store", help="datastore file")
    ri.add_argument("--json", action="store_true")
    ri.set_defaults(func=cmd_rtd_info)

    rt = rtd_sub.add_parser("tune", help="choose k, temperature and lambda on validation rows; saved as defaults")
    rt.add_argument("store", help="datastore file")
    rt.add_argument("--data", required=True, help="validation JSONL (rows not in the datastore), same format")
    rt.add_argument("--limit", type=int, default=None, help="first N validation rows only")
    rt.add_argument("--ks", type=_int_list, default=None, help="comma-separated k values to try")
    rt.add_argument("--temperature-scales", type=_float_list, default=None,
                    help="comma-separated multiples of the typical neighbour distance to try as temperatures")
    rt.add_argument("--lams", type=_float_list, default=None, help="comma-separated lambda values to try")
    rt.add_argument("--out", "-o", default=None, help="write the tuned datastore here (default: STORE itself)")
    rt.add_argument("--json", action="store_true", help="print the whole tuning result as JSON")
    _add_model_options(rt)
    rt.set_defaults(func=cmd_rtd_tune)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [server] extra)")
    _add_model_options(sv)
    sv.set_defaults(n_ctx=0, n_parallel=4)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--api-key", default=os.environ.get("SLOT_CPP_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $SLOT_CPP_API_KEY, else none)")
    sv.add_argument("--rtd", action="append", metavar="NAME=PATH", help="an RTD datastore requests may name")
    sv.add_argument("--reward", action="append", metavar="NAME=SPEC",
                    help="a QAlign reward requests may name: NAME=head:FILE.npz or NAME=judge")
    sv.add_argument("--corrector", action="append", metavar="NAME=MODEL.gguf[,ADAPTER.gguf]",
                    help="an LMCor corrector requests may name (extra_body lmcor.corrector)")
    sv.add_argument("--max-waiting", type=int, default=16,
                    help="requests that may wait for a free sequence; more get 503")
    sv.add_argument("--max-tokens-cap", type=int, default=4096, help="the largest max_tokens a request may ask")
    sv.add_argument("--model-id", default=None, help="the model name clients use (default: the file's stem)")
    sv.add_argument("--chat-template", default=None,
                    help="built-in chat template name for models without one (see 'slot-cpp info')")
    sv.set_defaults(func=cmd_serve)

    rs = sub.add_parser("rpc-server", help="run llama.cpp's ggml rpc-server (built with this package) so that "
                                           "another machine's model can offload layers here",
                        description="Runs the rpc-server binary built from the same llama.cpp tree; every option "
                                    "after 'rpc-server' goes to it (e.g. -H 0.0.0.0 -p 50052 -t 4). It has no "
                                    "authentication: expose it on trusted networks only.")
    rs.add_argument("server_args", nargs=argparse.REMAINDER)
    rs.set_defaults(func=cmd_rpc_server)

    info = sub.add_parser("info", help="model metadata and build facts")
    info.add_argument("--json", action="store_true")
    _add_model_options(info)
    info.set_defaults(func=cmd_info)

    lm = sub.add_parser("lmcor", help="LMCor: a small corrector model rewrites a generator's candidates")
    lm_sub = lm.add_subparsers(dest="lmcor_command", required=True)
    lc = lm_sub.add_parser("correct", help="candidates from --model, the final answer from --corrector")
    lc.add_argument("input", nargs="?", help="the input x ('-' or absent: read stdin)")
    _add_lmcor_options(lc)
    lc.add_argument("--json", action="store_true", help="print the answer, candidates and corrector input as JSON")
    lc.set_defaults(func=cmd_lmcor_correct)
    lmd = lm_sub.add_parser("make-data", help="the generator's candidates for {input, target} rows: the "
                                              "corrector's training data (resumes an existing --out)")
    lmd.add_argument("--data", required=True, help="JSONL of {input, target}")
    lmd.add_argument("--out", "-o", required=True, help="JSONL of {input, target, candidates}")
    lmd.add_argument("--limit", type=int, default=None)
    lmd.add_argument("--batch-size", type=int, default=8, help="inputs decoded together (k sequences each)")
    _add_lmcor_options(lmd, corrector=False)
    lmd.set_defaults(func=cmd_lmcor_make_data)
    lt = lm_sub.add_parser("train", help="fine-tune a LoRA corrector on a GGUF base model (needs the [lmcor] "
                                         "extra) and write it as a GGUF LoRA adapter")
    lt.add_argument("--base", required=True, help="the corrector's GGUF base model")
    lt.add_argument("--data", required=True, help="what 'lmcor make-data' wrote")
    lt.add_argument("--out", "-o", required=True, help="the adapter to write (.gguf)")
    lt.add_argument("--rank", type=int, default=16)
    lt.add_argument("--alpha", type=float, default=32.0)
    lt.add_argument("--target-modules", default=",".join(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj")),
                    help="comma-separated projections that get LoRA matrices")
    lt.add_argument("--epochs", type=float, default=2.0)
    lt.add_argument("--lr", type=float, default=1e-3)
    lt.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch (rows of similar length)")
    lt.add_argument("--max-len", type=int, default=1024, help="rows longer than this are left out, not cut")
    lt.add_argument("--limit", type=int, default=None, help="first N rows only")
    lt.add_argument("--threads", type=int, default=None)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--json", action="store_true")
    lt.set_defaults(func=cmd_lmcor_train)

    le = ev_sub.add_parser("lmcor", help="LMCor vs the generator's greedy answer and the best candidate "
                                         "(oracle) on {input, target} JSONL: exact match, chrF, BLEU")
    le.add_argument("--data", required=True, help="JSONL of {input, target}")
    le.add_argument("--limit", type=int, default=None)
    le.add_argument("--batch-size", type=int, default=8)
    le.add_argument("--json", action="store_true")
    le.add_argument("--out", "--output", dest="out", default=None, help="per-row records (JSONL)")
    _add_lmcor_options(le)
    le.set_defaults(func=cmd_eval_lmcor)
    return parser


# ---------------------------------------------------------------- lmcor
def _add_lmcor_options(p: argparse.ArgumentParser, *, corrector: bool = True) -> None:
    if corrector:
        p.add_argument("--corrector", required=True, help="the corrector's GGUF model")
        p.add_argument("--corrector-lora", action="append", default=[], metavar="ADAPTER.gguf[:SCALE]",
                       help="LoRA adapter on the corrector (what 'lmcor train' writes)")
        p.add_argument("--corrector-n-ctx", type=int, default=2048)
        p.add_argument("--corrector-max-tokens", type=int, default=128)
        p.add_argument("--overflow", choices=("error", "drop"), default="error",
                       help="when x and the candidates overflow the corrector's context: fail, or drop whole "
                            "candidates from the last")
    p.add_argument("--prompt-file", default=None,
                   help="the generator's prompt template with {input} (e.g. few-shot); default: the input alone")
    p.add_argument("-k", type=int, default=5, help="candidates: the greedy answer and k-1 samples")
    p.add_argument("--temperature", type=float, default=0.7, help="the samples' temperature")
    p.add_argument("--max-tokens", "-n", type=int, default=128, help="tokens per candidate")
    p.add_argument("--stop", action="append", default=None, help="candidate stop string (default: newline)")
    p.add_argument("--steps", type=int, default=0, help="SLOT steps on the generator's prompt (0: off)")
    p.add_argument("--lr", type=_lr, default=0.01, help="SLOT learning rate for the generator, or 'auto'")
    p.add_argument("--qalign-steps", type=int, default=0,
                   help="draw the k-1 samples as the last states of QAlign chains of this many steps (0: off)")
    p.add_argument("--reward", default=None, help="QAlign's reward: head:FILE.npz, contains:TEXT or judge")
    p.add_argument("--beta", type=float, default=1.0, help="QAlign's beta")
    p.set_defaults(judge_model=None, judge_template=None, judge_yes=" yes", judge_no=" no", chat_template=None)
    _add_model_options(p)
    _add_rtd_options(p)


def _candidate_options(args: argparse.Namespace, generator: Model) -> dict[str, Any]:
    prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else "{input}"
    if "{input}" not in prompt:
        raise UsageError(f"--prompt-file {args.prompt_file} has no '{{input}}' placeholder")
    opts: dict[str, Any] = dict(prompt=prompt, k=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                                stop=["\n"] if args.stop is None else args.stop, seed=args.seed)
    if args.steps:
        opts.update(steps=args.steps, lr=args.lr)
    rtd = _rtd_option(args, generator)
    if rtd is not None:
        opts["rtd"] = rtd
    if args.qalign_steps:
        from .lmcor import QAlignSamples

        if args.reward is None:
            raise UsageError("--qalign-steps needs --reward")
        if args.steps or rtd is not None:
            raise UsageError("--qalign-steps cannot be combined with --steps or --rtd")
        opts["qalign"] = QAlignSamples(reward=_reward(args, generator), steps=args.qalign_steps, beta=args.beta)
    elif args.reward is not None:
        raise UsageError("--reward is for --qalign-steps")
    return opts


def _open_corrector(args: argparse.Namespace) -> Model:
    return Model(args.corrector, n_ctx=args.corrector_n_ctx, n_threads=args.threads, n_parallel=args.n_parallel,
                 seed=args.seed, lora=_lora_specs(args.corrector_lora) or None)


def cmd_lmcor_correct(args: argparse.Namespace) -> int:
    from . import lmcor

    _check_rtd_args(args)
    x = args.input if args.input not in (None, "-") else sys.stdin.read()
    with _open_model(args) as generator, _open_corrector(args) as corrector_model:
        corrector = lmcor.Corrector(corrector_model, max_tokens=args.corrector_max_tokens, overflow=args.overflow)
        result = corrector.correct(generator, x.strip(), **_candidate_options(args, generator))
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
        return 0
    for i, c in enumerate(result.candidates, start=1):
        print(f"candidate {i}: {c}", file=sys.stderr)
    if result.dropped:
        print(f"({result.dropped} candidate(s) dropped to fit the corrector's context)", file=sys.stderr)
    print(result.text)
    return 0


def cmd_lmcor_make_data(args: argparse.Namespace) -> int:
    from . import lmcor

    _check_rtd_args(args)
    rows = lmcor.read_rows(args.data, limit=args.limit)
    with _open_model(args) as generator:
        opts = _candidate_options(args, generator)
        seed = opts.pop("seed")
        n = lmcor.make_corrector_data(generator, rows, args.out, seed=seed, batch_size=args.batch_size,
                                      progress=sys.stderr.isatty(), **opts)
    print(f"{n} rows written to {args.out} ({len(rows) - n} were there already)", file=sys.stderr)
    return 0


def cmd_lmcor_train(args: argparse.Namespace) -> int:
    from . import lmcor

    report = lmcor.train_corrector(args.base, args.data, args.out, rank=args.rank, alpha=args.alpha,
                                   target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
                                   epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens,
                                   max_len=args.max_len, seed=args.seed, threads=args.threads,
                                   max_rows=args.limit, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
        return 0
    print(f"trained on {report.rows} rows ({report.skipped_too_long} too long, left out), {report.steps} steps, "
          f"{report.seconds:.0f} s; loss {report.losses[0]:.3f} -> {report.losses[-1]:.3f}")
    print(f"wrote {report.out}: load it with --lora (or Model(..., lora=...)) on {args.base}")
    return 0


def cmd_eval_lmcor(args: argparse.Namespace) -> int:
    from . import lmcor

    _check_rtd_args(args)
    lmcor._import_sacrebleu()  # before loading two models
    rows = lmcor.read_rows(args.data, limit=args.limit)
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    try:
        with _open_model(args) as generator, _open_corrector(args) as corrector_model:
            corrector = lmcor.Corrector(corrector_model, max_tokens=args.corrector_max_tokens,
                                        overflow=args.overflow)
            report = lmcor.evaluate(
                generator, corrector, rows, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                on_record=None if out is None else (lambda r: out.write(json.dumps(r, ensure_ascii=False) + "\n")),
                **_candidate_options(args, generator))
    finally:
        if out is not None:
            out.close()
    if args.json:
        d = dataclasses.asdict(report)
        d.pop("records")
        print(json.dumps(d, indent=2))
        return 0
    print(f"{report.rows} rows, k={report.k}")
    print("| system | exact match | chrF | BLEU | sentence chrF |")
    print("| --- | --- | ---: | ---: | --- |")
    for sc in report.systems:
        print(f"| {sc.name} | {100 * sc.exact_match:.1f}% ± {100 * sc.exact_match_ci:.1f} | {sc.chrf:.1f} | "
              f"{sc.bleu:.1f} | {sc.sentence_chrf:.1f} ± {sc.sentence_chrf_ci:.1f} |")
    for p in report.paired:
        print(f"LMCor - {p.versus}: exact match {100 * p.exact_match:+.1f} pt ± {100 * p.exact_match_ci:.1f}, "
              f"sentence chrF {p.sentence_chrf:+.2f} ± {p.sentence_chrf_ci:.2f} (better {p.better}, "
              f"worse {p.worse})")
    print(f"per row: generator {report.generator_seconds:.2f} s, corrector {report.corrector_seconds:.2f} s")
    return 0


# ---------------------------------------------------------------- qalign
def _reward(args: argparse.Namespace, model: Model):
    from . import qalign as qa

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


def cmd_qalign(args: argparse.Namespace) -> int:
    from . import qalign as qa

    text = _read_prompt(args)
    with _open_model(args) as model:
        prompt: Prompt = text
        if args.chat or args.system is not None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = messages + [{"role": "user", "content": text}]
        reward = _reward(args, model)
        rtd = _rtd_option(args, model)
        slot = None
        if args.slot_steps:
            slot = model.generate_with_slot(prompt, steps=args.slot_steps, lr=args.slot_lr, max_tokens=0,
                                            chat_template=args.chat_template)
        progress = Progress(args.steps, "qalign")
        result = qa.qalign(
            model, prompt, reward=reward, beta=args.beta, steps=args.steps, max_tokens=args.max_tokens,
            chains=args.chains, seed=args.seed, top_k=args.top_k, stop=args.stop, answer=args.answer,
            delta=None if slot is None else slot.delta, rtd=rtd,
            extract=None if args.extract == "gsm8k" else (lambda t: t.strip() or None),
            burn_in=args.burn_in, chat_template=args.chat_template,
            on_step=lambda step, rate, mean: progress.advance(f"accept {rate:.2f} reward {mean:+.3f}"))
        progress.close()
    if args.json:
        print(json.dumps({
            "answer": result.answer, "accept_rate": result.accept_rate, "votes": result.votes,
            "generated_tokens": result.generated_tokens, "decoded_tokens": result.decoded_tokens,
            "reward_calls": result.reward_calls,
            "slot": None if slot is None else {"steps": args.slot_steps, "lr": slot.lr, "losses": list(slot.losses)},
            "rtd": None if rtd is None else _rtd_description(rtd),
            "chains": [[{"step": s.step, "text": s.text, "tokens": s.tokens, "reward": s.reward,
                         "accepted": s.accepted} for s in chain] for chain in result.chains],
        }, indent=2))
    else:
        state = result.answer_state
        print(state.text if state is not None else "")
        print(f"[qalign] answer: {result.answer!r}  acceptance {result.accept_rate:.2f}  "
              f"{result.generated_tokens} tokens generated, {result.decoded_tokens} evaluated", file=sys.stderr)
    return 0


def cmd_qalign_head(args: argparse.Namespace) -> int:
    from . import qalign as qa

    problems = gsm8k.load_problems(args.data, args.limit)
    if not problems:
        raise UsageError(f"{args.data} has no problems")
    with _open_model(args) as model:
        progress = Progress(len(problems), "reward head")
        pairs = [(_eval_prompt(args, p.question)[0], p.reference) for p in problems]
        stop = gsm8k.CHAT_STOP if args.format == "chat" else gsm8k.FEWSHOT_STOP
        head, stats = qa.train_linear_reward(model, pairs, samples=args.samples, max_tokens=args.max_tokens,
                                             l2=args.l2, seed=args.seed, stop=stop,
                                             on_problem=lambda k: progress.advance())
        progress.close()
        head.save(args.out)
    print(f"[qalign] reward head on {stats['answers']} answers ({stats['right']} right), training accuracy "
          f"{stats['train_accuracy']:.3f}: {args.out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------- rpc
def rpc_server_path() -> Path:
    """The ggml rpc-server binary shipped in the package."""
    exe = "rpc-server.exe" if os.name == "nt" else "rpc-server"
    # Beside the native module (an editable install keeps the Python files elsewhere).
    return Path(_core.__file__).resolve().parent / "bin" / exe


def cmd_rpc_server(args: argparse.Namespace) -> int:
    path = rpc_server_path()
    if not path.is_file():
        raise UsageError(f"this build has no rpc-server ({path}); build with -DSLOT_CPP_RPC=ON")
    os.execv(str(path), [str(path), *args.server_args])
    return 0  # not reached


# ---------------------------------------------------------------- serve
def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from . import server
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    for name, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--max-tokens-cap", args.max_tokens_cap, 1), ("--n-parallel", args.n_parallel, 1),
                             ("--n-ctx", args.n_ctx, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}")
    datastores = server.parse_named_paths(args.rtd, "--rtd")
    rewards = server.parse_named_paths(args.reward, "--reward")
    correctors = server.parse_named_paths(args.corrector, "--corrector")
    for name, path in datastores.items():
        if not Path(path).is_file():
            raise UsageError(f"--rtd {name}: no such file: {path}")
    for name, spec in correctors.items():
        for path in spec.split(","):
            if not Path(path).is_file():
                raise UsageError(f"--corrector {name}: no such file: {path}")
    print(f"slot-cpp: serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.serve(args.model, host=args.host, port=args.port, n_parallel=args.n_parallel, n_ctx=args.n_ctx,
                 n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, api_key=args.api_key,
                 datastores=datastores, rewards=rewards, correctors=correctors, max_waiting=args.max_waiting,
                 max_tokens_cap=args.max_tokens_cap, model_id=args.model_id, chat_template=args.chat_template,
                 rpc=args.rpc, lora=_lora_specs(getattr(args, "lora", [])) or None,
                 log_level="warning" if args.quiet else "info")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError, _core.ModelLoadError,
            _core.ContextLengthError, _core.UnsupportedModelError) as exc:
        print(f"slot-cpp: error: {exc}", file=sys.stderr)
        return 2
    except (SlotError, OSError) as exc:
        print(f"slot-cpp: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nslot-cpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
