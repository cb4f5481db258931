"""The arithmetic task's paired comparison in deterministic mode, over
several sampling seeds: greedy, SLOT (fixed lr, auto, auto with
loss_on="last"), majority vote, best-of-n, weighted vote and QAlign at a few
budgets, each seed a full qalign_curves.py run on the same problems and
reward head; reports each method's mean accuracy with its spread.

Deterministic mode makes each run reproducible (its answers do not depend
on the shards or on what ran before), so the spread left is the seeds'.

    python benchmarks/paired_seeds.py --seeds 0,1,2 --test 30

Runs qalign_curves.py (two shards of one thread per seed) in --work/seedN,
writes benchmarks/results/NAME.{json,md,png} and each seed's report as
NAME-seedN.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CURVES = str(HERE / "qalign_curves.py")


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def one_seed(seed: int, common: list[str], work: Path, prepared: Path, out: str, name: str) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    if work != prepared:
        for item in ("data", "head.npz", "head.json", "unit.json"):
            src, dst = prepared / item, work / item
            if not dst.exists():
                shutil.copytree(src, dst) if src.is_dir() else shutil.copy2(src, dst)
    args = common + ["--work", str(work), "--sample-seed", str(seed)]
    procs = [subprocess.Popen([sys.executable, CURVES, *args, "--threads", "1", "--shard", f"{i}/2"])
             for i in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit(f"a shard of seed {seed} failed")
    run([sys.executable, CURVES, *args, "--report-only", "--out", out, "--name", f"{name}-seed{seed}"])
    return json.loads((Path(out) / f"{name}-seed{seed}.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--level", default="groups,units")
    ap.add_argument("--train", type=int, default=100)
    ap.add_argument("--val", type=int, default=40)
    ap.add_argument("--test", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--multiples", default="1,4,32")
    ap.add_argument("--methods", default="greedy,slot,slot-auto,slot-auto-last,pool,qalign")
    ap.add_argument("--work", default="benchmarks/work/paired_seeds")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="paired_seeds")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    common = [f"--level={args.level}", "--train", str(args.train), "--val", str(args.val), "--test", str(args.test),
              "--max-tokens", str(args.max_tokens), "--multiples", args.multiples, "--methods", args.methods,
              "--deterministic", "--seed", "0"]
    work = Path(args.work)
    prepared = work / f"seed{seeds[0]}"
    run([sys.executable, CURVES, *common, "--work", str(prepared), "--prepare-only"])
    reports = {s: one_seed(s, common, work / f"seed{s}", prepared, args.out, args.name) for s in seeds}

    acc: dict[tuple[str, int], list[float]] = {}
    for rep in reports.values():
        for row in rep["rows"]:
            acc.setdefault((row["method"], row["multiple"]), []).append(row["accuracy"])
    first = next(iter(reports.values()))
    rows = []
    smallest = min(mult for _, mult in acc)
    for (method, mult), values in acc.items():
        if method in ("greedy", "slot", "slot-auto", "slot-auto-last") and mult != smallest:
            continue  # one greedy answer whatever the budget
        v = np.array(values)
        rows.append({"method": method, "multiple": mult, "mean": float(v.mean()),
                     "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
                     "max": float(v.max()), "per_seed": values})
    cmd = "python benchmarks/paired_seeds.py " + " ".join(sys.argv[1:])
    lines = [f"`{cmd}`  ",
             f"policy {first['model']}, deterministic mode; task {first['level']}, {first['n']} test problems; "
             f"reward head ROC AUC {first['head']['val_auc']:.3f}; one answer = {first['unit']} tokens; "
             f"seeds {args.seeds} (sampling and chains; the problems and the head are the same)", "",
             "| method | budget (answers) | mean accuracy | sd over seeds | min | max | per seed |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['multiple']} | {100 * r['mean']:.1f}% | {100 * r['sd']:.1f} | "
                     f"{100 * r['min']:.1f}% | {100 * r['max']:.1f}% | "
                     + ", ".join(f"{100 * x:.1f}%" for x in r["per_seed"]) + " |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    (out / f"{args.name}.md").write_text(md)
    (out / f"{args.name}.json").write_text(json.dumps({"command": cmd, "seeds": seeds, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(md)
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["multiple"])
        xs = [r["multiple"] for r in mine]
        ax.errorbar(xs, [100 * r["mean"] for r in mine], yerr=[100 * r["sd"] for r in mine], capsize=3,
                    marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget (answers' worth of tokens)")
    ax.set_ylabel("accuracy, mean over seeds (%)")
    ax.set_title("deterministic mode, error bars: sd over sampling seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
