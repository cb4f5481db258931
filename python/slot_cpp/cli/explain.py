"""slot-cpp explain: learn delta for a prompt and show what it does."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .._model import Prompt
from ..evaluation import plot_explain, token_shifts
from ..options import SamplingOptions, SlotOptions, add_arguments, group_from_arguments
from ._common import UsageError, _add_model_options, _open_model, _read_prompt


def register(sub: Any) -> None:
    ex = sub.add_parser("explain", help="learn delta for a prompt and show what it does")
    ex.add_argument("prompt", nargs="?")
    ex.add_argument("--file", "-f")
    ex.add_argument("--chat", action="store_true")
    add_arguments(ex, SlotOptions)  # with lr auto, the trust region's KL ladder is shown and plotted
    ex.add_argument("--top", type=int, default=15, help="tokens to list in each direction")
    ex.add_argument("--chat-template", default=None)
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--plot", default=None, help="write a PNG of the losses and token shifts")
    _add_model_options(ex)
    ex.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    text = _read_prompt(args)
    slot = group_from_arguments(args, SlotOptions)
    with _open_model(args) as model:
        prompt: Prompt = [{"role": "user", "content": text}] if args.chat else text
        result = model.generate_with_slot(prompt, chat_template=args.chat_template, slot=slot,
                                          sampling=SamplingOptions(max_tokens=0))
        calibration = [{"lr": lr, "kl": kl} for lr, kl in result.calibration]
        if calibration and not args.json:
            print(f"lr auto, mean KL per step size (budget {args.kl_budget:g}): " +
                  "  ".join(f"{c['lr']:.3g}: {c['kl']:.2e}" for c in calibration) + f"  -> lr {result.lr:.4g}")
        if result.delta is None or result.steps_done == 0:
            if calibration and args.plot:
                _plot({"calibration": calibration, "lr": result.lr, "kl_budget": args.kl_budget}, args.plot)
            raise UsageError(f"no delta was learned: {result.slot_status}")
        raised, lowered = token_shifts(model, result.delta, args.top)
        report = {"losses": result.losses, "lr": result.lr, "calibration": calibration,
                  "kl_budget": args.kl_budget, "delta_norm": result.delta_norm, "raised": raised, "lowered": lowered}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("loss per step: " + " ".join(f"{x:.4f}" for x in report["losses"]))
        print(f"|delta| = {report['delta_norm']:.4f}")
        print("\nraised most by delta (logit change, from W*delta):")
        for r in raised:
            print(f"  {r['logit_change']:+8.3f}  {r['piece']!r}")
        print("\nlowered most:")
        for r in lowered:
            print(f"  {r['logit_change']:+8.3f}  {r['piece']!r}")
    if args.plot:
        _plot(report, args.plot)
    return 0


def _plot(report: dict, path: str) -> None:
    try:
        plot_explain(report, path)
    except ImportError as exc:
        raise UsageError("--plot needs matplotlib: pip install 'slot_cpp[plot]'") from exc
