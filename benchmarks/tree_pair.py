"""Two builds of slot_cpp timed back to back on the same work, alternating.

Each round runs one worker process per build (a Python interpreter whose
environment has that build installed); a worker loads the model once and
times plain greedy decoding, SLOT (5 steps) and a batch of 8 prompts. The
report gives each build's median over the rounds and the ratio new / old.

    python benchmarks/tree_pair.py --old /tmp/old/.venv/bin/python --new .venv/bin/python --rounds 5

Writes benchmarks/results/tree_pair.json and .md. Not a test: numbers depend
on the machine; only the ratio within one run means anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_slot import save_report

WORKER = r"""
import json, sys, time
import slot_cpp

questions = [
    "Question: A baker makes 24 muffins in the morning and twice as many in the afternoon. He sells 50 of them. "
    "How many muffins does he have left?\nAnswer:",
    "Question: Tom has 3 boxes with 12 pencils each. He gives 9 pencils to his sister and buys 5 more. "
    "How many pencils does Tom have now?\nAnswer:",
]
out = {}
with slot_cpp.Model(n_ctx=2048, n_parallel=8, n_threads=2) as model:
    model.generate(questions[0], max_tokens=4, cache_prompt=False)  # warm-up
    t = time.perf_counter()
    tokens = sum(model.generate(q, max_tokens=48, ignore_eos=True, cache_prompt=False).generated_tokens
                 for q in questions)
    out["plain tokens/s"] = tokens / (time.perf_counter() - t)
    t = time.perf_counter()
    for q in questions:
        model.generate_with_slot(q, steps=5, lr=0.1, max_tokens=48, ignore_eos=True, cache_prompt=False)
    out["SLOT(5) seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    results = model.generate_batch(questions * 4, max_tokens=48, ignore_eos=True, cache_prompt=False)
    out["batch of 8 tokens/s"] = sum(r.generated_tokens for r in results) / (time.perf_counter() - t)
print(json.dumps(out))
"""


def run_worker(python: str) -> dict[str, float]:
    proc = subprocess.run([python, "-c", WORKER], capture_output=True, text=True, cwd="/")
    if proc.returncode != 0:
        sys.exit(f"tree_pair: the worker under {python} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="the Python interpreter of the old build")
    parser.add_argument("--new", required=True, help="the Python interpreter of the new build")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--name", default="tree_pair", help="the report's file name in benchmarks/results/")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for which in (("old", "new") if i % 2 == 0 else ("new", "old")):
            runs[which].append(run_worker(getattr(args, which)))
            print(f"round {i + 1}/{args.rounds} {which}: {runs[which][-1]}", flush=True)
    medians = {which: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for which, rs in runs.items()}
    lines = ["| measure | old | new | new / old |", "| --- | ---: | ---: | ---: |"]
    for key in medians["old"]:
        old, new = medians["old"][key], medians["new"][key]
        lines.append(f"| {key} | {old:.2f} | {new:.2f} | {new / old:.3f} |")
    markdown = (f"Medians of {args.rounds} alternating rounds "
                f"(`python benchmarks/tree_pair.py --rounds {args.rounds}`).\n\n" + "\n".join(lines) + "\n")
    report = {"rounds": runs, "medians": medians, "old": args.old, "new": args.new}
    save_report(str(Path(__file__).parent / "results"), args.name, report, lambda _: markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
