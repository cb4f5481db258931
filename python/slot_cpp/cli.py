"""Command line: ``slot-cpp`` or ``python -m slot_cpp``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from . import SlotError, _model
from ._model import Model


def _add_generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="GGUF model path (default: the embedded Gemma 3 270M)")
    p.add_argument("--steps", type=int, default=5, help="SLOT optimisation steps (0: plain generation)")
    p.add_argument("--lr", type=float, default=0.1, help="SLOT learning rate")
    p.add_argument("--max-tokens", "-n", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    p.add_argument("--chat-template", default=None, help="built-in template name or template string")
    p.add_argument("--system", default=None, help="system prompt (implies --chat)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")


def _result_json(result: _model.GenerationResult) -> dict:
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


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    kwargs = dict(steps=args.steps, lr=args.lr, max_tokens=args.max_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repeat_penalty=args.repeat_penalty,
                  seed=args.seed, stop=args.stop)
    chat = args.chat or args.system is not None or args.chat_template is not None
    with Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, seed=args.seed) as model:
        if chat:
            messages = []
            if args.system is not None:
                messages.append({"role": "system", "content": args.system})
            messages.append({"role": "user", "content": prompt})
            prompt_arg: _model.Prompt = messages
        else:
            prompt_arg = prompt
        if args.json:
            result = model.generate_with_slot(prompt_arg, chat_template=args.chat_template, **kwargs)
            print(json.dumps(_result_json(result), indent=2))
            return 0

        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        result = model.generate_with_slot(prompt_arg, chat_template=args.chat_template, on_text=show, **kwargs)
        sys.stdout.write("\n")
        if result.losses:
            losses = " ".join(f"{x:.4f}" for x in result.losses)
            print(f"[slot] loss per step: {losses}  |delta|={result.delta_norm:.4f}", file=sys.stderr)
        else:
            print(f"[slot] {result.slot_status}", file=sys.stderr)
        t = result.timings
        print(f"[slot] prefill {t.prefill:.2f}s, optimise {t.optimise:.2f}s, generate {t.generate:.2f}s "
              f"({result.tokens_per_second:.1f} tok/s), finish: {result.finish_reason}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slot-cpp", description="SLOT test-time optimisation for GGUF models")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with SLOT")
    gen.add_argument("prompt", nargs="?", help="prompt text ('-' or absent: read stdin)")
    _add_generation_options(gen)
    gen.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SlotError, ValueError, TypeError, OSError) as exc:
        print(f"slot-cpp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slot-cpp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
