"""QAlign against its baselines on GSM8K as the token budget grows.

  1. a linear reward head is trained on GSM8K training problems (`slot-cpp
     qalign-head`: sampled answers, labelled by their final number);
  2. on other training problems, greedy, majority vote, best-of-n, weighted
     majority vote and QAlign run at each budget of generated tokens per
     problem (`slot-cpp eval gsm8k --method ... --budget B`), all records in
     one resumable file;
  3. the table (accuracy with 95% Wilson intervals per method and budget,
     each paired against greedy) and a plot of accuracy against budget.

    python benchmarks/qalign_budget.py --data ../shared/data/gsm8k/train.jsonl \\
        --head-rows 301-450 --eval-rows 201-260 --budgets 128,512,1024

Rows are 1-based line numbers of --data. Everything but the results is kept
in --work, so an interrupted run resumes where it stopped. Writes
benchmarks/results/qalign_budget.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402

from slot_cpp import gsm8k  # noqa: E402

METHODS = ("greedy", "mv", "bon", "wmv", "qalign")


def _rows(spec: str) -> tuple[int, int]:
    first, last = (int(x) for x in spec.split("-"))
    if not 1 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST line numbers, got {spec!r}")
    return first, last


def _cut(data: Path, rows: tuple[int, int], out: Path) -> None:
    lines = data.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(lines[rows[0] - 1:rows[1]]), encoding="utf-8")


def _cli(*args: str, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "slot_cpp", *args]
    print("+ slot-cpp " + " ".join(args), file=sys.stderr, flush=True)
    if log is None:
        subprocess.run(cmd, check=True)
        return
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    log.write_text(proc.stderr, encoding="utf-8")
    sys.stderr.write(proc.stderr.splitlines()[-1] + "\n" if proc.stderr else "")
    if proc.returncode:
        raise SystemExit(f"slot-cpp {args[0]} failed (exit {proc.returncode}); see {log}")


def _head_summary(log: Path) -> dict | None:
    """The answers the head was trained on, from qalign-head's last line."""
    if not log.exists():
        return None
    found = re.search(r"reward head on (\d+) answers \((\d+) right\), training accuracy ([0-9.]+)",
                      log.read_text(encoding="utf-8"))
    return None if found is None else {"answers": int(found[1]), "right": int(found[2]),
                                       "training_accuracy": float(found[3])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="GSM8K-format JSONL (question, answer)")
    ap.add_argument("--head-rows", type=_rows, default=(301, 450))
    ap.add_argument("--eval-rows", type=_rows, default=(201, 260))
    ap.add_argument("--budgets", default="128,512,1024")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--head-samples", type=int, default=4)
    ap.add_argument("--model", default=None, help="policy GGUF (default: the embedded gemma-3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="qalign-budget-work")
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    head_rows, eval_rows = args.head_rows, args.eval_rows
    if not (head_rows[1] < eval_rows[0] or eval_rows[1] < head_rows[0]):
        ap.error("--head-rows and --eval-rows overlap")
    budgets = [int(b) for b in args.budgets.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = ["--model", args.model] if args.model else []
    common = [*model, "--threads", str(args.threads)]

    head = work / "gsm_head.npz"
    if not head.exists():
        _cut(Path(args.data), head_rows, work / "gsm_head.jsonl")
        _cli("qalign-head", "--data", str(work / "gsm_head.jsonl"), "--samples", str(args.head_samples),
             "--max-tokens", "160", "--out", str(head), *common, log=work / "head.log")
    _cut(Path(args.data), eval_rows, work / "gsm_eval.jsonl")
    records_path = work / "records.jsonl"
    for budget in budgets:
        _cli("eval", "gsm8k", "--data", str(work / "gsm_eval.jsonl"), "--method", ",".join(METHODS),
             "--budget", str(budget), "--max-tokens", str(args.max_tokens), "--reward", f"head:{head}",
             "--output", str(records_path), *common)

    records = [json.loads(x) for x in records_path.read_text(encoding="utf-8").splitlines() if x.strip()]
    n = eval_rows[1] - eval_rows[0] + 1
    greedy = {r["index"]: r["correct"] for r in records if r["setting"] == "greedy"}
    table = []
    for method in METHODS:
        for budget in ([None] if method == "greedy" else budgets):
            setting = "greedy" if budget is None else f"{method}@{budget}"
            got = {r["index"]: r for r in records if r["setting"] == setting}
            if len(got) != n:
                raise SystemExit(f"{setting}: {len(got)} of {n} records in {records_path}")
            right = sum(r["correct"] for r in got.values())
            fixed = sum(r["correct"] and not greedy[i] for i, r in got.items())
            broken = sum(greedy[i] and not r["correct"] for i, r in got.items())
            lo, hi = gsm8k.wilson_interval(right, n)
            table.append({"method": method, "budget": budget, "n": n, "correct": right, "accuracy": right / n,
                          "ci95": [lo, hi], "fixed": fixed, "broken": broken,
                          "mcnemar_p": gsm8k.mcnemar_p(fixed, broken),
                          "mean_generated_tokens": sum(r["generated_tokens"] for r in got.values()) / n})
    report = {"policy": Path(args.model).name if args.model else "gemma-3-270m", "command": "python benchmarks/qalign_budget.py " + " ".join(sys.argv[1:]),
              "head_rows": list(head_rows), "eval_rows": list(eval_rows), "budgets": budgets,
              "max_tokens": args.max_tokens, "head": _head_summary(work / "head.log"), "table": table}
    save_report(args.out_dir, "qalign_budget", report, markdown)
    plot(report, Path(args.out_dir) / "qalign_budget.png")
    return 0


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`  ",
             f"policy {report['policy']}; GSM8K training problems {report['eval_rows'][0]}-{report['eval_rows'][1]} (reward head trained on "
             f"{report['head_rows'][0]}-{report['head_rows'][1]}), {report['max_tokens']} tokens per answer",
             "", "| method | budget | n | solved | accuracy | 95% CI | vs greedy: fixed | broken | McNemar p | "
             "tokens generated |",
             "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for row in report["table"]:
        lo, hi = row["ci95"]
        budget = "-" if row["budget"] is None else str(row["budget"])
        paired = ("- | - | -" if row["method"] == "greedy"
                  else f"{row['fixed']} | {row['broken']} | {row['mcnemar_p']:.3f}")
        lines.append(f"| {row['method']} | {budget} | {row['n']} | {row['correct']} | {100 * row['accuracy']:.1f}% | "
                     f"{100 * lo:.1f}-{100 * hi:.1f}% | {paired} | {row['mean_generated_tokens']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    greedy = next(r for r in report["table"] if r["method"] == "greedy")
    ax.axhline(100 * greedy["accuracy"], color="grey", linestyle="--", label="greedy")
    for k, method in enumerate(METHODS[1:]):
        rows = [r for r in report["table"] if r["method"] == method]
        xs = [r["budget"] * (1 + 0.04 * (k - 1.5)) for r in rows]  # side by side, so the intervals do not hide
        ys = [100 * r["accuracy"] for r in rows]
        err = [[100 * (r["accuracy"] - r["ci95"][0]) for r in rows], [100 * (r["ci95"][1] - r["accuracy"]) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("generated tokens per problem (budget)")
    ax.set_ylabel("GSM8K accuracy (%)")
    ax.set_title(f"{report['policy']} policy, {greedy['n']} problems")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
