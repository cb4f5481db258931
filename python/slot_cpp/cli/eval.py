"""slot-cpp eval gsm8k, eval mc, eval lmcor and eval make-arithmetic: the
flags, and the results of slot_cpp.evaluation printed."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Union

from .. import evaluation as ev
from .._files import atomic_write
from .. import gsm8k
from ..options import SlotOptions, add_arguments
from ._common import (UsageError, _add_model_options, _add_rtd_options,
                      _add_sampling_options, _check_count, _check_rtd_args, _open_model,
                      _read_rows, _reward, _rtd_option, _sampling_kwargs, _slot_kwargs)
from .lmcor import _add_lmcor_options, _candidate_options, _open_corrector


def register(sub: Any) -> None:
    ev_p = sub.add_parser("eval", help="evaluate SLOT settings on a benchmark")
    ev_sub = ev_p.add_subparsers(dest="benchmark", required=True)
    _register_gsm8k(ev_sub)
    _register_mc(ev_sub)
    _register_lmcor(ev_sub)
    _register_make_arithmetic(ev_sub)


def _register_gsm8k(ev_sub: Any) -> None:
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


def _register_make_arithmetic(ev_sub: Any) -> None:
    from .. import arithmetic

    ma = ev_sub.add_parser("make-arithmetic", help="write generated arithmetic word problems (GSM8K format) as "
                           "disjoint splits, for eval gsm8k and qalign-head",
                           description="levels: " + "; ".join(f"{k}: {v[0]}" for k, v in arithmetic.LEVELS.items()))
    ma.add_argument("--level", required=True, help="comma-separated levels, drawn in turn")
    ma.add_argument("--split", default="train=200,val=100,test=200",
                    help="NAME=ROWS,...: one NAME.jsonl per part, disjoint, in this order")
    ma.add_argument("--seed", type=int, default=0)
    ma.add_argument("--output", "-o", required=True, help="directory for the parts and task.json")
    ma.set_defaults(func=cmd_make_arithmetic)


def cmd_make_arithmetic(args: argparse.Namespace) -> int:
    from .. import arithmetic

    levels = [x.strip() for x in args.level.split(",") if x.strip()]
    sizes: dict[str, int] = {}
    for part in args.split.split(","):
        name, _, rows = part.partition("=")
        if not name.strip() or not rows.strip().isdigit():
            raise UsageError(f"--split expects NAME=ROWS,..., got {part!r}")
        sizes[name.strip()] = int(rows)
    try:
        rows = arithmetic.generate(levels, sum(sizes.values()), seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in arithmetic.split(rows, sizes).items():
        arithmetic.write_jsonl(part, out / f"{name}.jsonl")
    with atomic_write(out / "task.json", "w", encoding="utf-8") as meta:
        json.dump({"generator": "slot_cpp.arithmetic", "levels": levels, "seed": args.seed, "split": sizes}, meta,
                  indent=2)
    print(f"wrote {', '.join(f'{n}.jsonl ({k} rows)' for n, k in sizes.items())} to {out}", file=sys.stderr)
    return 0


def _register_mc(ev_sub: Any) -> None:
    mc = ev_sub.add_parser("mc", help="multiple-choice accuracy (question, choices, answer): plain, with SLOT "
                                      "settings (--steps, --lr) and with --rtd")
    mc.add_argument("--data", required=True,
                    help="JSONL of {question, choices, answer}; answer a choice index or a letter")
    mc.add_argument("--shots", type=int, default=0,
                    help="the first N rows are the prompt's solved examples and are not evaluated (default: "
                         "none, or with --rtd of a choice datastore, the datastore's own prompt format)")
    mc.add_argument("--limit", type=int, default=None, help="evaluate the first N questions (after the shots)")
    mc.add_argument("--batch-size", type=int, default=32, help="questions scored per batch")
    add_arguments(mc, SlotOptions, only=("steps", "lr", "kl_budget"), lists=("steps", "lr"), defaults={"steps": (0,)})
    mc.add_argument("--json", action="store_true", help="print the summary as JSON")
    mc.add_argument("--out", "--output", "-o", dest="out", default=None,
                    help="write per-question records (probabilities, choices, correctness) to this JSONL")
    _add_model_options(mc)
    _add_rtd_options(mc)
    mc.set_defaults(func=cmd_eval_mc)


def _register_lmcor(ev_sub: Any) -> None:
    le = ev_sub.add_parser("lmcor", help="LMCor vs the generator's greedy answer and the best candidate "
                                         "(oracle) on {input, target} JSONL: exact match, chrF, BLEU")
    le.add_argument("--data", required=True, help="JSONL of {input, target}")
    le.add_argument("--limit", type=int, default=None)
    le.add_argument("--batch-size", type=int, default=8)
    le.add_argument("--json", action="store_true")
    le.add_argument("--out", "--output", dest="out", default=None, help="per-row records (JSONL)")
    _add_lmcor_options(le)
    le.set_defaults(func=cmd_eval_lmcor)


# ---------------------------------------------------------------- eval gsm8k
def _methods(args: argparse.Namespace) -> list[str]:
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for m in methods:
        if m not in ev.METHODS:
            raise UsageError(f"unknown --method {m!r}; choose from {', '.join(ev.METHODS)}")
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


def _eval_settings(args: argparse.Namespace) -> list[tuple[int, Union[float, str]]]:
    """The (steps, lr) grid of --steps and --lr (steps 0 once)."""
    settings = []
    for steps in args.steps:
        for lr in (args.lr if steps > 0 else args.lr[:1]):
            if steps < 0 or (lr != "auto" and lr <= 0):
                raise UsageError("--steps must be >= 0 and --lr > 0 (or auto)")
            settings.append((steps, lr))
    if not settings:
        raise UsageError("no settings to evaluate")
    return settings


def _say_resuming(done: set[tuple[int, str]], todo: list[Any], out_path: Path) -> None:
    note = ev.resume_note(done, todo, out_path)
    if note:
        print(note, file=sys.stderr)


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
    options = ev.GSM8KOptions(metric=args.metric, format=args.format, chat_template=args.chat_template,
                              stop=list(args.stop), loss_on=args.loss_on, kl_budget=args.kl_budget,
                              rtd_path=args.rtd, sampling=_sampling_kwargs(args),
                              slot={k: v for k, v in _slot_kwargs(args).items() if k not in ("loss_on", "kl_budget")})
    variants = [(s, options.setting_name(*s)) for s in _eval_settings(args)]
    out_path = Path(args.output) if args.output else Path(f"gsm8k-{args.metric}.jsonl")
    done = ev.done_records(out_path, args.metric)
    todo = ev.pending(problems, variants, done)
    _say_resuming(done, todo, out_path)
    if args.parallel < 1:
        raise UsageError("--parallel must be >= 1")
    with _open_model(args) as model:
        rtd = _rtd_option(args, model)
        ev.evaluate_settings(model, todo, out_path, options, rtd=rtd, parallel=args.parallel)
    rows = ev.summarise_file(out_path, problems, [name for _, name in variants], args.metric)
    print(ev.summary_table(rows, args.metric, out_path))
    return 0


def _eval_methods(args: argparse.Namespace, problems: list[gsm8k.Problem], methods: list[str]) -> int:
    """Test-time methods at one budget of generated tokens per problem."""
    variants = [(m, ev.method_name(m, args.budget, rtd=bool(args.rtd))) for m in methods]
    out_path = Path(args.output) if args.output else Path("gsm8k-methods.jsonl")
    done = ev.done_records(out_path, "accuracy")
    todo = ev.pending(problems, variants, done)
    _say_resuming(done, todo, out_path)
    with _open_model(args) as model:
        reward = _reward(args, model) if args.reward else None
        rtd = _rtd_option(args, model)
        ev.evaluate_methods(model, todo, out_path, budget=args.budget, max_tokens=args.max_tokens, seed=args.seed,
                            format=args.format, stop=args.stop, chat_template=args.chat_template, reward=reward,
                            beta=args.beta, rtd=rtd, rtd_path=args.rtd)
    rows = ev.summarise_file(out_path, problems, [name for _, name in variants], "accuracy")
    print(ev.summary_table(rows, "accuracy", out_path))
    return 0


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
    rows, lines, _ = _read_rows(args.data, "choice")
    shots, questions = rows[:args.shots], rows[args.shots:]
    if args.limit is not None:
        questions = questions[:args.limit]
    if not questions:
        raise UsageError(f"{args.data} has no questions left to evaluate after {args.shots} shot(s)")
    with _open_model(args) as model:
        rtd = _rtd_option(args, model)
        prompt_shots, template, replaced = ev.choice_prompt_format(rtd, shots)
        if replaced is not None:
            print(f"slot-cpp: note: --shots {len(shots)} replaces the datastore's prompt format "
                  f"({replaced} stored shot(s)); its keys were taken with that one", file=sys.stderr)
        result = ev.evaluate_choices(model, questions, settings, shots=shots, template=template, rtd=rtd,
                                     batch_size=args.batch_size, kl_budget=args.kl_budget)
    summary = ev.choice_summary(result, data=args.data, shots=prompt_shots, rtd=rtd)
    if args.out:
        with atomic_write(args.out, "w", encoding="utf-8") as out:
            for record in ev.choice_records(result, questions, first=args.shots, lines=lines):
                out.write(json.dumps(record) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(ev.choice_table(summary))
    return 0


# ---------------------------------------------------------------- eval lmcor
def cmd_eval_lmcor(args: argparse.Namespace) -> int:
    from .. import lmcor

    _check_rtd_args(args)
    lmcor._import_sacrebleu()  # before loading two models
    rows = lmcor.read_rows(args.data, limit=args.limit)
    # The records go to a temporary file renamed over --out when the run is complete.
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(atomic_write(args.out, "w", encoding="utf-8")) if args.out else None
        with _open_model(args) as generator, _open_corrector(args) as corrector_model:
            corrector = lmcor.Corrector(corrector_model, max_tokens=args.corrector_max_tokens,
                                        overflow=args.overflow)
            report = lmcor.evaluate(
                generator, corrector, rows, batch_size=args.batch_size, progress=sys.stderr.isatty(),
                on_record=None if out is None else (lambda r: out.write(json.dumps(r, ensure_ascii=False) + "\n")),
                **_candidate_options(args, generator))
    if args.json:
        print(json.dumps(ev.lmcor_summary(report), indent=2))
        return 0
    print(ev.lmcor_table(report))
    return 0
