"""SLOT's cost against prompt length: plain generation and SLOT's paths side by
side, for each model and prompt length, in one process and one run.

    python benchmarks/bench_slot_long.py --data ../shared/data/gsm8k/train.jsonl \\
        --model gemma --model SmolLM2-135M-Instruct.Q4_1.gguf --lengths 100,500,1500,5000

Modes, each on the same prompt (GSM8K problems and solutions, concatenated
and cut to the length), 32 new tokens, 5 steps at lr 0.01, no prompt cache:

- plain: no SLOT;
- exact: SLOT's default (the cache of the prompt's distributions in float32
  when it fits the memory budget, else bfloat16, else recompute);
- bf16: the cache in bfloat16;
- bounded: each position's most probable tokens until the rest hold at most
  1e-3 of the probability (``cache_precision="bounded"``), with the bound on
  the loss's error that SLOT reports;
- window: the loss on the last 256 predictions (``loss_window=256``);
- recompute: the published algorithm (the head over every position each step).

Reports seconds by stage, the ratio to plain, the path taken, the cache's size,
the output head's evaluations (rows of logits) and the peak memory the call
added (Linux: VmHWM over the resident size before it). Writes
benchmarks/results/bench_slot_long.json, .md and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import slot_cpp

MODES = {
    "plain": dict(steps=0),
    "exact": dict(),
    "bf16": dict(cache_precision="bfloat16"),
    "bounded": dict(cache_precision="bounded"),
    "window": dict(loss_window=256),
    "recompute": dict(recompute=True),
}


def long_text(path: str | None) -> str:
    parts = []
    if path and Path(path).exists():
        with open(path, encoding="utf-8") as handle:
            for i, line in enumerate(handle):
                row = json.loads(line)
                parts.append(f"Question: {row['question']}\nAnswer: {row['answer']}\n")
                if i >= 400:
                    break
    else:
        parts = [f"Line {i}: the quick brown fox jumps over the lazy dog, {i * 7 % 13} times.\n" for i in range(3000)]
    return "\n".join(parts)


def _status(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_one(model: slot_cpp.Model, ids: list[int], mode: str, args: argparse.Namespace) -> dict[str, Any]:
    options = dict(steps=args.steps, lr=args.lr, max_tokens=args.max_tokens, ignore_eos=True, cache_prompt=False)
    options.update(MODES[mode])
    base = _status("VmRSS")
    peak_known = _reset_peak()
    rows = model.logit_rows
    start = time.perf_counter()
    r = model.generate_with_slot("", prompt_token_ids=ids, **options)
    total = time.perf_counter() - start
    return {"mode": mode, "total": total, "prefill": r.timings.prefill, "optimise": r.timings.optimise,
            "generate": r.timings.generate, "path": r.slot_path or "-", "cache_mib": r.slot_cache_bytes / 2**20,
            "head_rows": model.logit_rows - rows, "steps_done": r.steps_done,
            "peak_added_mib": (_status("VmHWM") - base) / 2**20 if peak_known else None,
            "final_loss": r.losses[-1] if r.losses else None, "loss_bound": r.slot_loss_bound,
            "mean_k": r.slot_cache_mean_k}


def run(args: argparse.Namespace) -> dict[str, Any]:
    text = long_text(args.data)
    lengths = [int(x) for x in args.lengths.split(",")]
    models = args.model or ["gemma"]
    report: dict[str, Any] = {"command": "python benchmarks/bench_slot_long.py " + " ".join(sys.argv[1:]),
                              "machine": f"{platform.machine()}, {args.threads} threads", "rows": []}
    for spec in models:
        path = None if spec == "gemma" else spec
        with slot_cpp.Model(path, n_ctx=max(lengths) + args.max_tokens + 16, n_threads=args.threads,
                            n_parallel=1) as model:
            name = Path(model.path).stem
            all_ids = model.tokenize(text)
            if len(all_ids) < max(lengths):
                raise SystemExit(f"the text has {len(all_ids)} tokens for {name}; need {max(lengths)}")
            # Warm-up at the longest prompt: llama.cpp's buffers grow to their
            # largest once, so that no mode pays for them.
            run_one(model, all_ids[:max(lengths)], "window", args)
            run_one(model, all_ids[:64], "exact", args)
            for length in lengths:
                ids = all_ids[:length]
                plain = None
                for mode in args.modes.split(","):
                    row = run_one(model, ids, mode, args)
                    row.update(model=name, vocab=model.n_vocab, tokens=length)
                    if mode == "plain":
                        plain = row["total"]
                    row["ratio"] = row["total"] / plain if plain else None
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
    return report


def _bound(row: dict[str, Any]) -> str:
    if row["path"] != "bounded":
        return "exact" if row["path"] != "-" else ""
    return f"{row['loss_bound']:.1e} (K {row['mean_k']:.0f})"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}`  ", f"{report['machine']}", "",
             "| model | prompt tokens | mode | path | total s | vs plain | prefill s | optimise s | generate s "
             "| cache MiB | head rows | peak added MiB | loss bound |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["rows"]:
        peak = "" if r["peak_added_mib"] is None else f"{r['peak_added_mib']:.0f}"
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['model']} | {r['tokens']} | {r['mode']} | {r['path']} | {r['total']:.2f} | {ratio} | "
                     f"{r['prefill']:.2f} | {r['optimise']:.2f} | {r['generate']:.2f} | {r['cache_mib']:.0f} | "
                     f"{r['head_rows']} | {peak} | {_bound(r)} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in report["rows"]})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, name in zip(axes[0], models):
        rows = [r for r in report["rows"] if r["model"] == name and r["mode"] != "plain"]
        for mode in dict.fromkeys(r["mode"] for r in rows):
            pts = [(r["tokens"], r["ratio"]) for r in rows if r["mode"] == mode]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
        ax.axhline(1.0, color="grey", linestyle=":")
        ax.set_xscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time / plain generation")
        ax.set_title(f"{name}: SLOT 5 steps, 32 new tokens")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help="'gemma' (the embedded model) or a GGUF path; repeatable")
    p.add_argument("--data", default=None, help="GSM8K-format JSONL whose problems make the long prompt")
    p.add_argument("--lengths", default="100,500,1500,5000")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench_slot_long.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out / "bench_slot_long.json")
    text = markdown(report)
    (out / "bench_slot_long.md").write_text(text)
    plot(report, out / "bench_slot_long.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
