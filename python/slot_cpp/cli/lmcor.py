"""slot-cpp lmcor correct, lmcor make-data and lmcor train: a small corrector
model rewrites a generator's candidates."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .._model import Model
from ..lmcor.candidates import CANDIDATE_SAMPLING
from ..options import LmcorOptions, SlotOptions, add_arguments, from_arguments
from ._common import (UsageError, _add_model_options, _add_rtd_options, _check_rtd_args, _lora_specs,
                      _open_model, _reward, _rtd_option)


def register(sub: Any) -> None:
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
    lt.add_argument("--lora-lr", "--lr", dest="lr", type=float, default=1e-3,
                    help="the LoRA training's learning rate (--lr is an older name)")
    lt.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batch (rows of similar length)")
    lt.add_argument("--max-len", type=int, default=1024, help="rows longer than this are left out, not cut")
    lt.add_argument("--limit", type=int, default=None, help="first N rows only")
    lt.add_argument("--threads", type=int, default=None)
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--json", action="store_true")
    lt.set_defaults(func=cmd_lmcor_train)


def _add_lmcor_options(p: argparse.ArgumentParser, *, corrector: bool = True) -> None:
    """The generator's candidates (and with ``corrector``, the corrector): lmcor correct, make-data, eval lmcor."""
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
    add_arguments(p, LmcorOptions)
    p.add_argument("--max-tokens", "-n", type=int, default=CANDIDATE_SAMPLING.max_tokens,
                   help="tokens per candidate")
    p.add_argument("--stop", action="append", default=None, help="candidate stop string (default: newline)")
    # SLOT on the generator's prompt (--steps 0: off).
    add_arguments(p, SlotOptions, defaults={"steps": 0, "lr": 0.01})
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
    stop = list(CANDIDATE_SAMPLING.stop) if args.stop is None else args.stop
    opts: dict[str, Any] = dict(prompt=prompt, k=args.k, temperature=args.temperature, max_tokens=args.max_tokens,
                                stop=stop, seed=args.seed)
    if args.steps:
        opts.update(from_arguments(args, SlotOptions))
    rtd = _rtd_option(args, generator)
    if rtd is not None:
        opts["rtd"] = rtd
    if args.qalign_steps:
        from ..qalign import QAlignSamples

        if args.reward is None:
            raise UsageError("--qalign-steps needs --reward")
        if args.steps or rtd is not None:
            raise UsageError("--qalign-steps cannot be combined with --steps or --rtd")
        opts["sampler"] = QAlignSamples(reward=_reward(args, generator), steps=args.qalign_steps, beta=args.beta)
    elif args.reward is not None:
        raise UsageError("--reward is for --qalign-steps")
    return opts


def _open_corrector(args: argparse.Namespace) -> Model:
    return Model(args.corrector, n_ctx=args.corrector_n_ctx, n_threads=args.threads, n_parallel=args.n_parallel,
                 seed=args.seed, lora=_lora_specs(args.corrector_lora) or None)


def cmd_lmcor_correct(args: argparse.Namespace) -> int:
    from .. import lmcor

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
    from .. import lmcor

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
    from .. import lmcor

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
