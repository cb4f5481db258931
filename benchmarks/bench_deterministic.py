"""The cost of deterministic mode: the same measurements with
``Model(deterministic=True)`` and without, taking turns, one fresh process
per mode and round.

- decode at batch 1: greedy tokens per second of one sequence (ignore_eos);
- decode at batch 8: eight prompts' tokens per second of one generate_batch;
- prefill: tokens per second evaluating a 1,000-token prompt (cache off);
- server: tokens per second of ``slot-cpp serve`` (``--deterministic`` or
  not) under --clients streaming clients for --seconds (bench_server's load).

Each figure is the median over --rounds rounds; the ratio is default time
over deterministic time (1.00 = free, 0.87 = the mode takes 1.15x as long).

    python benchmarks/bench_deterministic.py --rounds 3 --seconds 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import bench_server

RESULTS = Path(__file__).resolve().parent / "results"

WORKER = r"""
import json, sys, time
import slot_cpp
det, threads, prompts = sys.argv[1] == "1", int(sys.argv[2]), json.loads(sys.argv[3])
long_prompt = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 70)
with slot_cpp.Model(None, n_threads=threads, n_parallel=8, n_ctx=8 * 1280, deterministic=det) as m:
    m.generate(prompts[0], max_tokens=8, cache_prompt=False)  # warm-up
    r = m.generate(prompts[0], max_tokens=128, ignore_eos=True, cache_prompt=False)
    batch1 = r.tokens_per_second
    t0 = time.perf_counter()
    rs = m.generate_batch(prompts, max_tokens=64, ignore_eos=True, cache_prompt=False)
    batch8 = sum(len(x.tokens) for x in rs) / (time.perf_counter() - t0)
    n = len(m.tokenize(long_prompt))
    p = m.generate(long_prompt, max_tokens=1, cache_prompt=False)
    prefill = n / p.timings.prefill
print(json.dumps({"decode_batch1": batch1, "decode_batch8": batch8, "prefill": prefill, "prefill_tokens": n}))
"""


def engine_round(det: bool, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", WORKER, "1" if det else "0", str(threads),
                          json.dumps(bench_server.PROMPTS)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def server_round(det: bool, args: argparse.Namespace) -> float:
    port = bench_server.free_port()
    cmd = [sys.executable, "-m", "slot_cpp", "serve", "--port", str(port), "--threads", str(args.threads),
           "--n-parallel", "8", "--n-ctx", str(8 * 1024), "--max-waiting", str(args.clients + 8), "--model-id",
           "bench", "--quiet"] + (["--deterministic"] if det else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        bench_server.wait_ready(url, proc, "/health")
        res = asyncio.run(bench_server.phase(url, "bench", args.clients, args.seconds, 64))
        if res["errors"] or res["lost"]:
            raise RuntimeError(f"server errors: {res}")
        return float(res["tokens_per_s"])
    finally:
        bench_server.stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--no-server", action="store_true", help="skip the server measurement")
    ap.add_argument("--out", default=str(RESULTS / "bench_deterministic"))
    args = ap.parse_args()

    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for rnd in range(args.rounds):
        for det in ((False, True) if rnd % 2 == 0 else (True, False)):
            rec = engine_round(det, args.threads)
            if not args.no_server:
                rec["server"] = server_round(det, args)
            runs[det].append(rec)
            print(f"round {rnd + 1} {'deterministic' if det else 'default'}: {rec}", flush=True)

    keys = [("decode_batch1", "decode, batch 1 (tokens/s)"), ("decode_batch8", "decode, batch 8 (tokens/s)"),
            ("prefill", f"prefill, {int(runs[False][0]['prefill_tokens'])}-token prompt (tokens/s)")]
    if not args.no_server:
        keys.append(("server", f"server, {args.clients} streaming clients (tokens/s)"))
    rows = []
    summary = {}
    for key, label in keys:
        default = statistics.median(r[key] for r in runs[False])
        det = statistics.median(r[key] for r in runs[True])
        summary[key] = {"default": default, "deterministic": det, "ratio": det / default}
        rows.append(f"| {label} | {default:.1f} | {det:.1f} | {det / default:.2f} | {default / det:.2f}x |")
    cmd = "python benchmarks/bench_deterministic.py " + " ".join(sys.argv[1:])
    md = "\n".join([
        "# Deterministic mode: its cost",
        "",
        f"`{cmd}` on {platform.processor() or platform.machine()}, {args.threads} threads, the embedded Gemma 3 "
        f"270M, medians of {args.rounds} alternating rounds (a fresh process per mode and round).",
        "",
        "| measurement | default | deterministic | deterministic / default | time cost |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])
    Path(args.out + ".md").write_text(md)
    Path(args.out + ".json").write_text(json.dumps({"runs": {str(k): v for k, v in runs.items()},
                                                    "summary": summary}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
