"""How should lr="auto" pick SLOT's step size? Rules side by side on GSM8K.

For each problem the prompt's and the gold solution's logits come from the
engine (one evaluation of prompt + solution); SLOT's steps and every rule are
then replayed in PyTorch (float32) on those logits and the output matrix, so
that any rule, including ones the package does not ship, is scored on the same
deltas. The score is the change in the solution's mean token NLL against plain
(negative: SLOT helps), paired per problem.

Rules:
  fixed lr            5 AdamW steps at one step size for every prompt
  folds (argmin)      learn on one half of the loss positions at lr 0.01,
                      score the other half at delta x {0, 0.3, 1, 3}, average
                      both folds, take the lowest held-out loss (0: no SLOT)
  folds + veto        the trust region's step size, kept only when the
                      held-out halves do not get worse at it
  trust region (K)    the step size whose delta moves the prompt's
                      next-token distributions by a mean KL of K (lr="auto")
  oracle              the best of {0, the fixed grid} per problem, in hindsight

    python benchmarks/slot_auto_rules.py --data ../shared/data/gsm8k/train.jsonl --rows 1001-1300 \\
        --model SmolLM2-135M-Instruct.Q4_1.gguf --format chat --loss-on user

Writes benchmarks/results/slot_auto_rules-<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

import slot_cpp
from slot_cpp import gsm8k, probes
from slot_cpp._model import AUTO_LR_REFERENCE

FIXED = (0.1, 0.01, 0.003, 0.001)
BUDGETS = (0.001, 0.002, 0.004)
LADDER = [AUTO_LR_REFERENCE * 2.0 ** e for e in range(-4, 5)]


def parse_rows(text: str) -> tuple[int, int]:
    first, _, last = text.partition("-")
    a, b = int(first), int(last or first)
    if a < 1 or b < a:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST with 1 <= FIRST <= LAST, got {text!r}")
    return a, b


class Replay:
    """SLOT on one prompt in float32: AdamW as the engine's, on given logits."""

    def __init__(self, torch: Any, w: Any, z_prompt: Any, y_prompt: Any, z_sol: Any, y_sol: Any):
        # z_prompt/y_prompt: the loss positions' logits and targets only.
        self.t, self.w = torch, w
        self.z, self.y = z_prompt, y_prompt
        self.zs, self.ys = z_sol, y_sol
        self.lp0 = torch.log_softmax(z_prompt, dim=1)

    def ce(self, delta: Any, weights: Any) -> float:
        z = self.z + self.w @ delta
        ce = self.t.logsumexp(z, 1) - z.gather(1, self.y[:, None])[:, 0]
        return float((weights * ce).sum() / weights.sum())

    def adam(self, lr: float, weights: Any, steps: int = 5) -> Any:
        t = self.t
        d = t.zeros(self.w.shape[1])
        m, v = t.zeros_like(d), t.zeros_like(d)
        wn = weights / weights.sum()
        for k in range(1, steps + 1):
            z = self.z + self.w @ d
            g = (wn[:, None] * t.softmax(z, dim=1)).sum(0)
            g.index_add_(0, self.y, -wn)
            grad = self.w.T @ g
            d = d * (1 - lr * 1e-8)
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            d = d - (lr / (1 - 0.9 ** k)) * m / (t.sqrt(v) / math.sqrt(1 - 0.999 ** k) + 1e-5)
        return d

    def kl(self, delta: Any) -> float:
        lp = self.t.log_softmax(self.z + self.w @ delta, dim=1)
        return float((self.lp0.exp() * (self.lp0 - lp)).sum(1).mean())

    def solution(self, delta: Optional[Any]) -> float:
        z = self.zs if delta is None else self.zs + self.w @ delta
        return float((self.t.logsumexp(z, 1) - z.gather(1, self.ys[:, None])[:, 0]).mean())


def trust_region_lr(replay: Replay, budget: float, reference: Any) -> float:
    """The engine's rule: KL of the reference delta on the ladder, log-log crossing."""
    kls = [replay.kl(lr / AUTO_LR_REFERENCE * reference) for lr in LADDER]
    for j, kl in enumerate(kls):
        if kl <= budget:
            continue
        if j == 0:
            return LADDER[0] * math.sqrt(budget / kl)
        x0, x1 = math.log(LADDER[j - 1]), math.log(LADDER[j])
        y0, y1 = math.log(max(kls[j - 1], 1e-30)), math.log(kl)
        return math.exp(x0 + (math.log(budget) - y0) * (x1 - x0) / (y1 - y0))
    return LADDER[-1]


def score_problem(torch: Any, model: slot_cpp.Model, w: Any, problem: gsm8k.Problem, args: argparse.Namespace) -> dict:
    if args.format == "chat":
        prompt: Any = gsm8k.chat_messages(problem.question)
    else:
        prompt = gsm8k.fewshot_prompt(problem.question)
    tokens = model.prompt_tokens(prompt)
    if args.loss_on == "user":
        _, mask_list = model.user_loss_mask(prompt)
    else:
        mask_list = [True] * (len(tokens) - 1)
    solution = model.tokenize(" " + problem.answer, add_special=False, parse_special=False)
    _, logits = probes.prompt_states(model, tokens + solution)
    n = len(tokens)
    z = torch.from_numpy(logits)
    keep = torch.tensor(mask_list)
    ids = torch.tensor(tokens + solution, dtype=torch.int64)
    # Only the loss positions take part in SLOT's loss; KL is measured on them too.
    replay = Replay(torch, w, z[:n - 1][keep], ids[1:n][keep], z[n - 1:-1], ids[n:])
    count = int(keep.sum())
    ones = torch.ones(count)
    plain = replay.solution(None)
    rec: dict[str, Any] = {"index": problem.index, "plain": plain, "fixed": {}, "rules": {}}
    deltas = {}
    for lr in sorted(set(FIXED) | {AUTO_LR_REFERENCE}):
        deltas[lr] = replay.adam(lr, ones)
        if lr in FIXED:
            rec["fixed"][f"{lr:g}"] = replay.solution(deltas[lr]) - plain
    # Position folds: the rule lr="auto" used before the trust region.
    half = count // 2
    held = np.zeros(4)
    fold_masks = []
    for fold in range(2):
        first_half = (torch.arange(count) < half).float()
        train = first_half if fold == 0 else 1.0 - first_half
        test = 1.0 - train
        fold_masks.append((train, test))
        d = replay.adam(0.01, train)
        held += [replay.ce(f * d, test) for f in (0.0, 0.3, 1.0, 3.0)]
    choice = [0.0, 0.003, 0.01, 0.03][int(np.argmin(held))]
    rec["rules"]["folds (argmin)"] = 0.0 if choice == 0 else replay.solution(replay.adam(choice, ones)) - plain
    for budget in BUDGETS:
        lr = trust_region_lr(replay, budget, deltas[AUTO_LR_REFERENCE])
        d = replay.adam(lr, ones)
        rec["rules"][f"trust region {budget:g}"] = replay.solution(d) - plain
        rec.setdefault("trust_lr", {})[f"{budget:g}"] = lr
        if budget == args.budget:
            # The veto: keep the step only if neither held-out half gets worse at it.
            worse = any(replay.ce(replay.adam(lr, tr), te) > replay.ce(torch.zeros_like(d), te)
                        for tr, te in fold_masks)
            name = f"trust region {budget:g}"
            rec["rules"][name + " + fold veto"] = 0.0 if worse else rec["rules"][name]
    rec["rules"]["oracle"] = min(0.0, min(rec["fixed"].values()))
    return rec


def summarise(records: list[dict]) -> list[dict]:
    names = [f"fixed lr {k}" for k in records[0]["fixed"]] + list(records[0]["rules"])
    rows = []
    for name in names:
        if name.startswith("fixed lr "):
            diffs = np.array([r["fixed"][name[len("fixed lr "):]] for r in records])
        else:
            diffs = np.array([r["rules"][name] for r in records])
        mean = float(diffs.mean())
        se = float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else float("inf")
        rows.append({"rule": name, "n": len(diffs), "delta_nll": mean, "ci95": 1.96 * se,
                     "t": mean / se if se > 0 else 0.0, "better": int((diffs < 0).sum()),
                     "worse": int((diffs > 0).sum())})
    return rows


def markdown(report: dict) -> str:
    lines = [f"{report['model']}, GSM8K rows {report['rows']}, {report['format']} format, loss on "
             f"{report['loss_on']}; solution NLL change against plain (nats/token):", "",
             "| rule | n | vs plain (95% CI) | t | better | worse |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["summary"]:
        lines.append(f"| {r['rule']} | {r['n']} | {r['delta_nll']:+.4f} ± {r['ci95']:.4f} | {r['t']:+.2f} | "
                     f"{r['better']} | {r['worse']} |")
    lrs = [r["trust_lr"][f"{report['budget']:g}"] for r in report["records"]]
    lines += ["", f"Trust region {report['budget']:g}: step sizes chosen, median {np.median(lrs):.4g} "
              f"(5-95%: {np.percentile(lrs, 5):.4g}-{np.percentile(lrs, 95):.4g}).", ""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="GSM8K-format JSONL")
    ap.add_argument("--rows", type=parse_rows, default=(1, 100), help="FIRST-LAST lines of the file (1-based)")
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--format", choices=gsm8k.FORMATS, default="fewshot")
    ap.add_argument("--loss-on", choices=("all", "user"), default="all")
    ap.add_argument("--budget", type=float, default=0.002, help="the trust region that also gets the fold veto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="results file name (default: from the model and settings)")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.loss_on == "user" and args.format != "chat":
        ap.error("--loss-on user needs --format chat")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    first, last = args.rows
    problems = gsm8k.load_problems(args.data, limit=last)[first - 1:]
    with slot_cpp.Model(args.model, n_ctx=4096, n_threads=args.threads) as model:
        w = torch.from_numpy(probes.output_matrix(model))
        label = Path(model.path).name
        records = []
        start = time.monotonic()
        for i, problem in enumerate(problems):
            records.append(score_problem(torch, model, w, problem, args))
            print(f"{i + 1}/{len(problems)} {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)
    report = {"model": label, "rows": f"{first}-{last}", "format": args.format, "loss_on": args.loss_on,
              "budget": args.budget, "summary": summarise(records), "records": records}
    name = args.name or f"slot_auto_rules-{Path(label).stem}-{args.format}-{args.loss_on}"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
