"""Command line: ``slot-cpp`` or ``python -m slot_cpp``.

Subcommands: generate, chat, eval gsm8k, explain, info.
Exit codes: 0 success, 1 runtime failure, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from . import SlotError, _core, gsm8k
from ._model import GenerationResult, Model, Prompt


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
    p.add_argument("--quiet", "-q", action="store_true", help="silence llama.cpp's log")
    p.add_argument("--verbose", "-v", action="count", default=0, help="show llama.cpp's log (-vv: debug)")


def _add_sampling_options(p: argparse.ArgumentParser, *, slot_lists: bool = False) -> None:
    if slot_lists:
        p.add_argument("--steps", type=_int_list, default=[0, 5], help="comma-separated steps values")
        p.add_argument("--lr", type=_float_list, default=[0.1], help="comma-separated learning rates")
    else:
        p.add_argument("--steps", type=int, default=5, help="SLOT optimisation steps (0: plain generation)")
        p.add_argument("--lr", type=float, default=0.1, help="SLOT learning rate")
    p.add_argument("--max-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--chat-template", default=None, help="built-in template name or template string")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed)


def _open_model(args: argparse.Namespace) -> Model:
    n_parallel = max(args.n_parallel, getattr(args, "parallel", 1))
    return Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
                 n_parallel=n_parallel, seed=args.seed)


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

    def advance(self, note: str = "") -> None:
        self.done += 1
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
    text = _read_prompt(args)
    chat = args.chat or args.system is not None
    with _open_model(args) as model:
        prompt: Prompt = text
        if chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = messages + [{"role": "user", "content": text}]
        kwargs = dict(steps=args.steps, lr=args.lr, stop=args.stop, chat_template=args.chat_template,
                      **_sampling_kwargs(args))
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
    with _open_model(args) as model:
        if args.chat_template is None and not model.info.has_chat_template:
            raise UsageError("this model has no chat template; pass --chat-template "
                             f"(one of: {', '.join(_core.chat_templates())})")
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
                messages, steps=args.steps, lr=args.lr, stop=args.stop, chat_template=args.chat_template,
                on_text=lambda s: print(s, end="", flush=True), **_sampling_kwargs(args))
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


def _eval_settings(args: argparse.Namespace) -> list[tuple[int, float]]:
    settings = []
    for steps in args.steps:
        for lr in (args.lr if steps > 0 else args.lr[:1]):
            if steps < 0 or lr <= 0:
                raise UsageError("--steps must be >= 0 and --lr > 0")
            settings.append((steps, lr))
    if not settings:
        raise UsageError("no settings to evaluate")
    return settings


def cmd_eval(args: argparse.Namespace) -> int:
    problems = gsm8k.load_problems(args.data, args.limit)
    if not problems:
        raise UsageError(f"{args.data} has no problems")
    methods = _methods(args)
    if methods != ["greedy"]:
        return _eval_methods(args, problems, methods)
    settings = _eval_settings(args)
    names = [gsm8k.setting_name(s, lr) for s, lr in settings]
    out_path = Path(args.output) if args.output else Path(f"gsm8k-{args.metric}.jsonl")
    done = _done_records(out_path, args.metric)
    todo = [(p, s, lr) for p in problems for (s, lr) in settings if (p.index, gsm8k.setting_name(s, lr)) not in done]
    _say_resuming(done, todo, out_path)
    if args.parallel < 1:
        raise UsageError("--parallel must be >= 1")
    # Generation decodes --parallel problems together; the NLL metric generates nothing.
    chunk = args.parallel if args.metric == "accuracy" else 1
    with _open_model(args) as model:
        progress = Progress(len(todo), f"gsm8k {args.metric}")
        with out_path.open("a", encoding="utf-8") as out:
            for start in range(0, len(todo), chunk):
                items = todo[start:start + chunk]
                if args.metric == "accuracy":
                    records = _eval_generate(model, args, items)
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

    names = [f"{m}@{args.budget}" if m != "greedy" else "greedy" for m in methods]
    out_path = Path(args.output) if args.output else Path("gsm8k-methods.jsonl")
    done = _done_records(out_path, "accuracy")
    todo = [(p, m, n) for p in problems for m, n in zip(methods, names) if (p.index, n) not in done]
    _say_resuming(done, todo, out_path)
    samples = max(1, args.budget // args.max_tokens)
    with _open_model(args) as model:
        reward = _reward(args, model) if args.reward else None
        progress = Progress(len(todo), "gsm8k methods")
        with out_path.open("a", encoding="utf-8") as out:
            for problem, method, name in todo:
                prompt, stop = _eval_prompt(args, problem.question)
                stop = stop + list(args.stop)
                start = time.monotonic()
                common: dict[str, Any] = dict(max_tokens=args.max_tokens, seed=args.seed + problem.index, stop=stop)
                if method == "greedy":
                    r = model.generate(prompt, chat_template=args.chat_template, **common)
                    prediction, tokens, text = gsm8k.extract_answer(r.text), r.generated_tokens, r.text
                elif method == "qalign":
                    assert reward is not None  # _methods requires --reward for qalign
                    q = qa.qalign(model, prompt, reward=reward, beta=args.beta, steps=10**6, budget=args.budget,
                                  chat_template=args.chat_template, **common)
                    prediction, tokens = q.answer, q.generated_tokens
                    text = q.answer_state.text if q.answer_state is not None else ""
                else:
                    fn = {"mv": qa.majority_vote, "bon": qa.best_of_n, "wmv": qa.weighted_majority_vote}[method]
                    kwargs: dict[str, Any] = dict(n=samples, chat_template=args.chat_template, **common)
                    if method != "mv":
                        kwargs["reward"] = reward
                    b = fn(model, prompt, **kwargs)
                    prediction, tokens, text = b.answer, b.generated_tokens, b.samples[0].text
                record = {"metric": "accuracy", "index": problem.index, "setting": name, "method": method,
                          "budget": args.budget, "question": problem.question, "reference": problem.reference,
                          "completion": text, "prediction": prediction,
                          "correct": gsm8k.is_correct(prediction, problem.reference), "losses": [],
                          "generated_tokens": tokens, "seconds": time.monotonic() - start}
                out.write(json.dumps(record) + "\n")
                out.flush()
                progress.advance(f"{name}: {'right' if record['correct'] else 'wrong'}")
        progress.close()
    _summarise_records(out_path, problems, names, "accuracy")
    return 0


def _record_base(args: argparse.Namespace, problem: gsm8k.Problem, steps: int, lr: float) -> dict:
    return {"metric": args.metric, "index": problem.index, "setting": gsm8k.setting_name(steps, lr),
            "steps": steps, "lr": lr, "format": args.format}


def _eval_nll(model: Model, args: argparse.Namespace, problem: gsm8k.Problem, steps: int, lr: float) -> dict:
    prompt, _ = _eval_prompt(args, problem.question)
    start = time.monotonic()
    prompt_ids = model.prompt_tokens(prompt, chat_template=args.chat_template)
    solution_ids = model.tokenize(" " + problem.answer, add_special=False, parse_special=False)
    slot = model.generate_with_slot("", prompt_token_ids=prompt_ids, steps=steps, lr=lr, max_tokens=0)
    logp = model.token_logprobs(prompt_ids + solution_ids, len(prompt_ids), slot.delta if steps else None)
    return {**_record_base(args, problem, steps, lr), "nll": float(-logp.mean()),
            "solution_tokens": len(solution_ids), "losses": slot.losses, "seconds": time.monotonic() - start}


def _eval_generate(model: Model, args: argparse.Namespace,
                   items: list[tuple[gsm8k.Problem, int, float]]) -> list[dict]:
    """Generates the answers of several (problem, steps, lr) items in one batch."""
    prompts, stops = [], []
    for problem, _, _ in items:
        prompt, stop = _eval_prompt(args, problem.question)
        prompts.append(prompt)
        stops.append(stop + list(args.stop))
    start = time.monotonic()
    results = model.generate_batch(prompts, steps=[s for _, s, _ in items], lr=[lr for _, _, lr in items],
                                   stop=stops, chat_template=args.chat_template, **_sampling_kwargs(args))
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


# ---------------------------------------------------------------- explain
def cmd_explain(args: argparse.Namespace) -> int:
    text = _read_prompt(args)
    with _open_model(args) as model:
        prompt: Prompt = [{"role": "user", "content": text}] if args.chat else text
        result = model.generate_with_slot(prompt, steps=args.steps, lr=args.lr, max_tokens=0,
                                          chat_template=args.chat_template)
        if result.delta is None or result.steps_done == 0:
            raise UsageError(f"no delta was learned: {result.slot_status}")
        bias = model.logit_bias(result.delta)
        order = np.argsort(bias)
        top = [int(i) for i in order[::-1][: args.top]]
        bottom = [int(i) for i in order[: args.top]]

        def label(t: int) -> str:
            return model._s().token_piece(t).decode("utf-8", "replace")

        report = {
            "losses": result.losses,
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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5))
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
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat; SLOT re-optimised on each turn")
    chat.add_argument("--system", default=None)
    _add_model_options(chat)
    _add_sampling_options(chat)
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
    g.set_defaults(func=cmd_eval)

    ex = sub.add_parser("explain", help="learn delta for a prompt and show what it does")
    ex.add_argument("prompt", nargs="?")
    ex.add_argument("--file", "-f")
    ex.add_argument("--chat", action="store_true")
    ex.add_argument("--steps", type=int, default=5)
    ex.add_argument("--lr", type=float, default=0.1)
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
    qa_p.add_argument("--json", action="store_true")
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

    info = sub.add_parser("info", help="model metadata and build facts")
    info.add_argument("--json", action="store_true")
    _add_model_options(info)
    info.set_defaults(func=cmd_info)
    return parser


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
        progress = Progress(args.steps, "qalign")
        result = qa.qalign(
            model, prompt, reward=reward, beta=args.beta, steps=args.steps, max_tokens=args.max_tokens,
            chains=args.chains, seed=args.seed, top_k=args.top_k, stop=args.stop, answer=args.answer,
            extract=None if args.extract == "gsm8k" else (lambda t: t.strip() or None),
            burn_in=args.burn_in, chat_template=args.chat_template,
            on_step=lambda step, rate, mean: progress.advance(f"accept {rate:.2f} reward {mean:+.3f}"))
        progress.close()
    if args.json:
        print(json.dumps({
            "answer": result.answer, "accept_rate": result.accept_rate, "votes": result.votes,
            "generated_tokens": result.generated_tokens, "decoded_tokens": result.decoded_tokens,
            "reward_calls": result.reward_calls,
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, FileNotFoundError, _core.ModelLoadError,
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
