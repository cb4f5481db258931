"""RTD speed, side by side in one run on gemma-3-270m:

(a) datastore build throughput (keys/s and prompt tokens/s) against plain
    prefill of the same rows through the engine (last position only);
(b) greedy decoding with RTD over N keys (exact search) against plain
    decoding of the same prompts;
(c) the same with an inverted file over M keys (approximate search), and its
    recall@K against exact search on real decode-time queries.

Keys come from GSM8K training solutions (prompt: the question, completion:
the solution). Larger stores repeat the real keys with Gaussian noise of the
size of the keys' own spread around their nearest neighbour, so that their
neighbourhood structure is realistic; the README says so next to the figures.

    python benchmarks/bench_rtd.py --data ../shared/data/gsm8k/train.jsonl

Writes benchmarks/results/bench_rtd.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

import slot_cpp
from slot_cpp.rtd import RTD, Datastore

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402


def load_rows(path: str, limit: int, skip: int = 0) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i < skip:
                continue
            r = json.loads(line)
            rows.append({"prompt": f"Question: {r['question']}\nAnswer:", "completion": " " + r["answer"]})
            if len(rows) == limit:
                break
    return rows


def grown(store: Datastore, n: int, seed: int = 0) -> Datastore:
    """A store of n keys: the real keys, then noisy copies of them."""
    rng = np.random.default_rng(seed)
    real = np.asarray(store.keys, dtype=np.float32)
    # Noise of the size of a key's distance to its nearest other key.
    sample = real[rng.choice(len(real), 256, replace=False)]
    d2 = (sample ** 2).sum(1)[:, None] - 2.0 * sample @ real.T + (real ** 2).sum(1)[None, :]
    d2.sort(axis=1)
    sigma = float(np.sqrt(np.median(d2[:, 1]) / real.shape[1]))
    parts, values, have = [real.astype(np.float16)], [np.asarray(store.values)], len(real)
    while have < n:
        take = min(len(real), n - have)
        parts.append((real[:take] + rng.standard_normal((take, real.shape[1])).astype(np.float32) * sigma)
                     .astype(np.float16))
        values.append(np.asarray(store.values)[:take])
        have += take
    return Datastore(keys=np.ascontiguousarray(np.concatenate(parts)), values=np.concatenate(values),
                     mode=store.mode, heads=1, fingerprint=store.fingerprint, params=dict(store.params),
                     defaults=dict(store.defaults))


def decode(model, prompts, max_tokens, **kw):
    start = time.perf_counter()
    res = [model.generate(p, max_tokens=max_tokens, ignore_eos=True, cache_prompt=False, **kw) for p in prompts]
    seconds = time.perf_counter() - start
    gen = sum(r.timings.generate for r in res)
    tokens = sum(len(r.tokens) for r in res)
    return {"seconds": seconds, "tokens": tokens, "decode_tok_s": tokens / gen}


def paired(model, prompts, max_tokens, repeats, base: Optional[dict] = None, **kw) -> dict:
    """RTD decoding and plain decoding (or decoding with `base`) in turn,
    `repeats` times: the ratio is the median of the pairs' ratios, so that
    drift in the machine's speed over the run falls on both sides alike."""
    pairs = [(decode(model, prompts, max_tokens, **(base or {})), decode(model, prompts, max_tokens, **kw))
             for _ in range(repeats)]
    ratios = [r["decode_tok_s"] / p["decode_tok_s"] for p, r in pairs]
    out = dict(pairs[0][1])
    out.update({"decode_tok_s": statistics.median(r["decode_tok_s"] for _, r in pairs),
                "plain_tok_s": statistics.median(p["decode_tok_s"] for p, _ in pairs),
                "ratio": statistics.median(ratios), "ratios": ratios, "repeats": repeats})
    return out


def run(args: argparse.Namespace) -> dict:
    model = slot_cpp.Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_parallel=4)
    rows = load_rows(args.data, args.rows, skip=args.skip)
    prompts = [r["prompt"] for r in load_rows(args.data, args.prompts)]
    report: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
                    "model": Path(str(model.path)).name, "rows": len(rows),
                    "build_rows": min(args.build_rows, len(rows))}

    # (a) build vs plain prefill of the same tokens (--build-rows of them)
    rows, all_rows = rows[:args.build_rows], rows
    token_rows = [model.tokenize(r["prompt"]) + model.tokenize(r["completion"], add_special=False) for r in rows]
    model.generate_batch(token_rows[:8], max_tokens=0, cache_prompt=False)  # warm up
    start = time.perf_counter()
    model.generate_batch(token_rows, max_tokens=0, cache_prompt=False)
    prefill = time.perf_counter() - start
    store = Datastore.build(model, rows[:8], progress=False)  # warm up the states context
    start = time.perf_counter()
    store = Datastore.build(model, rows, progress=False)
    build = time.perf_counter() - start
    # The keys of every row for the decoding runs.
    store.extend(model, all_rows[len(rows):], progress=False)
    n_tokens = sum(len(t) for t in token_rows)
    report["build"] = {"tokens": n_tokens, "keys": len(store), "build_seconds": build, "prefill_seconds": prefill,
                       "build_tok_s": n_tokens / build, "prefill_tok_s": n_tokens / prefill,
                       "ratio": prefill / build}
    print(json.dumps(report["build"]), file=sys.stderr)

    # (b) exact search
    plain = decode(model, prompts, args.max_tokens)
    report["plain"] = plain
    exact_runs = []
    for n in args.exact_keys:
        big = grown(store, n)
        big.index(model)  # key norms outside the timing
        r = paired(model, prompts, args.max_tokens, args.repeats, rtd=RTD(big, k=args.k, lam=0.25))
        r["keys"] = n
        # The gate's own cost: the same search with the gate against fixed lambda.
        g = paired(model, prompts, args.max_tokens, args.repeats, base={"rtd": RTD(big, k=args.k, lam=0.25, gate=False)},
                   rtd=RTD(big, k=args.k, lam=0.25, gate=True))
        r["gate"] = {key: g[key] for key in ("decode_tok_s", "plain_tok_s", "ratio", "ratios")}
        exact_runs.append(r)
        print(json.dumps(r), file=sys.stderr)
    report["exact"] = exact_runs

    # (c) inverted file
    approx_runs = []
    for n in args.ivf_keys:
        big = grown(store, n, seed=1)
        queries = []
        for p in prompts:
            res = model.generate(p, max_tokens=1, return_hidden=True, cache_prompt=False)
            queries.append(np.asarray(res.hidden))
        start = time.perf_counter()
        big.build_ivf(model, nlist=args.nlist, nprobe=args.nprobe)
        ivf_seconds = time.perf_counter() - start
        big.index(model)
        q = np.stack(queries).astype(np.float32)
        recall = big.recall(model, q, args.k, args.nprobe)
        r = paired(model, prompts, args.max_tokens, args.repeats, rtd=RTD(big, k=args.k, lam=0.25, nprobe=args.nprobe))
        r.update({"keys": n, "nlist": args.nlist, "nprobe": args.nprobe, "recall": recall,
                  "ivf_build_seconds": ivf_seconds})
        approx_runs.append(r)
        print(json.dumps(r), file=sys.stderr)
        del big
    report["approximate"] = approx_runs
    model.close()
    return report


def markdown(r: dict) -> str:
    b = r["build"]
    lines = [
        f"RTD on {r['model']}, {r['threads']} threads ({r['machine']})",
        "",
        "| what | tokens/s | plain tokens/s | vs plain |",
        "| --- | ---: | ---: | ---: |",
        f"| datastore build, {r['build_rows']} rows ({b['tokens']} tokens, {b['keys']} keys) | {b['build_tok_s']:.0f} "
        f"| {b['prefill_tok_s']:.0f} (prefill) | {b['ratio']:.2f}x |",
    ]
    for e in r["exact"]:
        lines.append(f"| decoding, RTD exact search, {e['keys']:,} keys | {e['decode_tok_s']:.1f} | {e['plain_tok_s']:.1f} "
                     f"| {e['ratio']:.2f}x |")
        if "gate" in e:
            g = e["gate"]
            lines.append(f"| the same with the gate, against fixed lambda | {g['decode_tok_s']:.1f} | "
                         f"{g['plain_tok_s']:.1f} (fixed lambda) | {g['ratio']:.3f}x |")
    for a in r["approximate"]:
        lines.append(f"| decoding, RTD inverted file ({a['nlist']} lists, nprobe {a['nprobe']}), {a['keys']:,} keys, "
                     f"recall@K {a['recall']:.3f} | {a['decode_tok_s']:.1f} | {a['plain_tok_s']:.1f} | {a['ratio']:.2f}x |")
    runs = (r["exact"] + r["approximate"])[:1]
    if runs:
        lines += ["", f"Decoding: {runs[0]['tokens']} greedy tokens a run, RTD and plain in turn {runs[0]['repeats']} "
                  "times; medians of the runs and of the pairs' ratios."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(slot_cpp.default_model_path()))
    ap.add_argument("--data", required=True, help="GSM8K train.jsonl")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--build-rows", type=int, default=60, help="rows of the build-throughput comparison")
    ap.add_argument("--skip", type=int, default=100, help="rows skipped before the datastore's rows")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--exact-keys", type=int, nargs="*", default=[100_000])
    ap.add_argument("--ivf-keys", type=int, nargs="*", default=[1_000_000])
    ap.add_argument("--nlist", type=int, default=4096)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="RTD and plain decoding runs, in turn")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=2048)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    save_report(args.out, "bench_rtd", run(args), markdown)


if __name__ == "__main__":
    main()
