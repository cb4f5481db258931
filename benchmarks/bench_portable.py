"""Plain decode speed of the portable build (CPU backend loaded at run time,
its best variant for this CPU) against the native static build, back to back.

Each build is a Python environment with slot_cpp installed: the native one
by `pip install .`, the portable one from the portable wheel, e.g.

    python -m venv /tmp/portable && /tmp/portable/bin/pip install --no-deps dist/slot_cpp-*.whl numpy
    python benchmarks/bench_portable.py --build native=.venv/bin/python \\
        --build portable=/tmp/portable/bin/python [--build portable-x64=/tmp/portable/bin/python:x64]

A ':variant' suffix forces that CPU variant (SLOT_CPP_CPU_VARIANT). The
builds take turns, one round each, for --rounds rounds; each round loads the
model in a fresh process and times greedy decoding of --tokens tokens
(ignore_eos) after a warm-up generation. Writes benchmarks/results/portable.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, sys, time
import slot_cpp
from slot_cpp import _core
path, threads, tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
prompt = "Write a short story about a lighthouse keeper who finds a message in a bottle."
with slot_cpp.Model(path, n_threads=threads, n_parallel=1, n_ctx=1024) as m:
    m.generate_with_slot(prompt, steps=0, max_tokens=16, ignore_eos=True)  # warm-up
    rates, cpu_rates = [], []
    for _ in range(repeats):
        c0 = time.process_time()
        r = m.generate_with_slot(prompt, steps=0, max_tokens=tokens, ignore_eos=True)
        c1 = time.process_time()
        rates.append(r.tokens_per_second)
        # tokens per CPU-second of this process (prefill included, the same in every build):
        # what a machine shared with other jobs measures more steadily than wall time
        cpu_rates.append(len(r.tokens) / max(c1 - c0, 1e-9))
    cpu = _core.cpu_backend()
    print(json.dumps({"rates": rates, "cpu_rates": cpu_rates, "variant": cpu["variant"], "dynamic": cpu["dynamic"],
                      "kernels": cpu["kernels"], "tokens": list(r.tokens)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="append", required=True, help="name=python[:variant]")
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="timed generations per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "portable.md"))
    args = ap.parse_args()
    if args.model is None:
        from slot_cpp._default_model import default_model_path

        args.model = str(default_model_path())

    builds = []
    for spec in args.build:
        name, _, rest = spec.partition("=")
        python, _, variant = rest.partition(":")
        builds.append((name, python, variant))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in builds}
    cpu_rates: dict[str, list[float]] = {name: [] for name, _, _ in builds}
    facts: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for name, python, variant in builds:
            env = {k: v for k, v in os.environ.items() if k not in ("SLOT_CPP_CPU_VARIANT", "PYTHONPATH")}
            if variant:
                env["SLOT_CPP_CPU_VARIANT"] = variant
            proc = subprocess.run([python, "-c", WORKER, args.model, str(args.threads), str(args.tokens),
                                   str(args.repeats)], env=env, cwd="/", capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            rates[name] += out["rates"]
            cpu_rates[name] += out["cpu_rates"]
            facts[name] = out
            print(f"round {rnd + 1} {name} ({out['variant']}): wall " + " ".join(f"{r:.1f}" for r in out["rates"])
                  + " cpu " + " ".join(f"{r:.1f}" for r in out["cpu_rates"]), file=sys.stderr)

    ref = builds[0][0]
    med = {name: statistics.median(v) for name, v in rates.items()}
    cmed = {name: statistics.median(v) for name, v in cpu_rates.items()}
    lines = [
        "# Portable build against the native static build: plain decode speed",
        "",
        "`python benchmarks/bench_portable.py " + " ".join(f"--build {b}" for b in args.build).replace(
            str(Path.home()), "~") + f" --threads {args.threads} --tokens {args.tokens} --repeats {args.repeats} "
        f"--rounds {args.rounds}`",
        "",
        f"Model: {Path(args.model).name}; greedy decoding of {args.tokens} tokens (ignore_eos) after a warm-up, "
        f"{args.threads} threads; the builds take turns, {args.rounds} rounds of {args.repeats} generations each, "
        "every round a fresh process. Machine: "
        f"{platform.machine()}, {os.cpu_count()} logical CPUs (shared with other jobs while this ran: "
        "the spread shows how much).",
        "",
        "Wall-clock tokens/s swing with the other jobs; tokens per CPU-second of the process (prefill "
        "included) are steadier, and the best wall-clock figure shows the speed with the machine to itself.",
        "",
        "| build | CPU variant | head kernels | tokens/CPU-s median | vs " + ref + " | wall tokens/s median | best | "
        "vs " + ref + " (best) | same tokens as " + ref + " |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, _, _ in builds:
        f = facts[name]
        v = rates[name]
        kind = f"{f['variant']} ({'run-time' if f['dynamic'] else 'static'})"
        same = "yes" if f["tokens"] == facts[ref]["tokens"] else "no"
        best, best_ref = max(v), max(rates[ref])
        lines.append(f"| {name} | {kind} | {f['kernels']} | {cmed[name]:.1f} | {100 * (cmed[name] / cmed[ref] - 1):+.1f}% | "
                     f"{med[name]:.1f} | {best:.1f} | {100 * (best / best_ref - 1):+.1f}% | {same} |")
    lines.append("")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
