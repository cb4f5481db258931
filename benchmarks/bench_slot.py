"""Side-by-side timing of plain generation, SLOT (cached fast path) and SLOT
(recompute path, the published algorithm) in one process and one run.

    python benchmarks/bench_slot.py --data ../shared/data/gsm8k/train.jsonl --prompts 8

Writes benchmarks/results/bench_slot.json and .md. Not a test: numbers depend
on the machine; ratios are taken within the run. Each prompt runs every mode
from an empty prompt cache, in forward order on even prompts and backward on
odd ones, so that a drift in the machine's speed during the run falls on
every mode alike.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import slot_cpp
from slot_cpp import probes
from slot_cpp._files import atomic_write

FALLBACK_QUESTIONS = [
    "A baker makes 24 muffins in the morning and twice as many in the afternoon. He sells 50 of them. "
    "How many muffins does he have left at the end of the day?",
    "Tom has 3 boxes with 12 pencils each. He gives 9 pencils to his sister and buys 5 more. "
    "How many pencils does Tom have now?",
    "A train travels 60 miles per hour for 2.5 hours and then 40 miles per hour for 1.5 hours. "
    "How many miles does it travel in total?",
    "Sara saves 15 dollars a week for 8 weeks. She then spends a third of her savings on a gift. "
    "How many dollars does she have left?",
]


def load_questions(path: str | None, count: int) -> list[str]:
    questions: list[str] = []
    if path and Path(path).exists():
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                questions.append(json.loads(line)["question"])
                if len(questions) >= count:
                    break
    while len(questions) < count:
        questions.append(FALLBACK_QUESTIONS[len(questions) % len(FALLBACK_QUESTIONS)])
    return questions


def save_report(out_dir: str, name: str, report: dict, markdown: Callable[[dict], str]) -> None:
    """Writes NAME.json and NAME.md under out_dir and prints the Markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(report)  # before any write: a failing formatter leaves the last report whole
    for suffix, body in ((".json", json.dumps(report, indent=2) + "\n"), (".md", text)):
        with atomic_write(out / f"{name}{suffix}", "w", encoding="utf-8") as f:  # a killed run keeps the old file
            f.write(body)
    print(text)


def torch_reference(path: str, prompt_ids: list[list[int]], args: argparse.Namespace) -> list[dict]:
    """The published prompt stage in PyTorch/transformers (float32) on the same prompts:
    hidden states once, then W(H + delta), loss and backward every step."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    rows = []
    for ids in [prompt_ids[0]] + prompt_ids:  # the first run warms up and is dropped
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            hidden = model.model(input_ids).last_hidden_state
        delta = torch.zeros(1, 1, hidden.shape[-1], requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=args.lr, betas=(0.9, 0.999), eps=1e-5, weight_decay=1e-8)
        for _ in range(args.steps):
            logits = model.lm_head(hidden + delta)
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append(dict(prompt_tokens=len(ids), total=time.perf_counter() - start))
    return rows[1:]


def layer_macs_per_token(path: str) -> float | None:
    """Multiply-adds per token of the model's matrices other than the embedding
    and output head (from the GGUF's tensor shapes; None without gguf)."""
    try:
        import gguf
    except ImportError:
        return None
    total = 0
    for t in gguf.GGUFReader(path).tensors:
        if len(t.shape) == 2 and not t.name.startswith(("token_embd", "output.")):
            total += int(t.shape[0]) * int(t.shape[1])
    return float(total)


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / (1024 * 1024)


def run(args: argparse.Namespace) -> dict:
    questions = load_questions(args.data, args.prompts)
    rows = {"plain": [], "slot_cached": [], "slot_recompute": [], "slot_auto": [], "llama_cpp_greedy": []}
    prompt_ids: list[list[int]] = []
    with slot_cpp.Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads) as model:
        prompts = [f"Question: {q}\nAnswer:" for q in questions]
        # Warm-up (weights paged in, graphs built) on a text outside the measured prompts:
        # the first prompt then starts without a prompt-cache hit, as the others do.
        warm_up = "Question: What is 12 times 7, minus 5?\nAnswer:"
        model.generate(warm_up, max_tokens=4)
        model.generate_with_slot(warm_up, steps=1, max_tokens=1)
        common = dict(max_tokens=args.max_tokens, ignore_eos=True)
        modes = (("plain", dict(steps=0)),
                 ("slot_cached", dict(steps=args.steps, lr=args.lr)),
                 ("slot_recompute", dict(steps=args.steps, lr=args.lr, recompute=True)),
                 ("slot_auto", dict(steps=args.steps, lr="auto")))
        for i, prompt in enumerate(prompts):
            # Forward order on even prompts, backward on odd ones: a drift in the
            # machine's speed during the run falls on every mode alike.
            for name, kwargs in (modes if i % 2 == 0 else modes[::-1]):
                model.clear_cache()  # every run evaluates its prompt whole
                r = model.generate_with_slot(prompt, **kwargs, **common)
                rows[name].append(dict(prompt_tokens=r.prompt_tokens, prefill=r.timings.prefill,
                                       optimise=r.timings.optimise, generate=r.timings.generate,
                                       total=r.timings.total, tokens=r.generated_tokens,
                                       tps=r.tokens_per_second, cache_bytes=r.slot_cache_bytes,
                                       calibration=r.calibration_seconds,
                                       **{f"opt_{k}": v for k, v in r.slot_profile.items()}))
            tokens = model.tokenize(prompt)
            prompt_ids.append(tokens)
            start = time.perf_counter()
            out, decode_s = probes.reference_greedy(model, tokens, args.max_tokens)
            rows["llama_cpp_greedy"].append(dict(prompt_tokens=len(tokens), total=time.perf_counter() - start,
                                                 generate=decode_s, tokens=len(out),
                                                 tps=len(out) / decode_s if decode_s else 0.0))
        info = model.info
    if args.torch_reference:
        rows["torch_reference_prompt_stage"] = torch_reference(info.path, prompt_ids, args)
    mean = {k: {f: statistics.fmean(r[f] for r in v) for f in v[0]} for k, v in rows.items()}
    plain, fast, slow, auto = mean["plain"], mean["slot_cached"], mean["slot_recompute"], mean["slot_auto"]
    ratios = {
        "slot_end_to_end_vs_plain": fast["total"] / plain["total"],
        "slot_auto_end_to_end_vs_plain": auto["total"] / plain["total"],
        "auto_calibration_vs_fixed_steps": auto["calibration"] / fast["optimise"],
        "prompt_stage_speedup_vs_recompute": (slow["prefill"] + slow["optimise"]) / (fast["prefill"] + fast["optimise"]),
        "optimise_vs_extra_head_pass": fast["optimise"] / max(fast["prefill"] - plain["prefill"], 1e-9),
        "decode_tps_with_delta_vs_plain": fast["tps"] / plain["tps"],
        "plain_decode_tps_vs_llama_cpp": plain["tps"] / mean["llama_cpp_greedy"]["tps"],
    }
    # SLOT's extra prefill is the output head at every prompt position; its
    # rate next to that of the model's own layers in plain prefill.
    tokens = plain["prompt_tokens"]
    head_rate = tokens * info.n_vocab * info.n_embd / max(fast["prefill"] - plain["prefill"], 1e-9) / 1e9
    layers = layer_macs_per_token(info.path)
    rates = {"head_pass_gmacs": head_rate}
    if layers is not None:
        rates["plain_prefill_layers_gmacs"] = tokens * layers / plain["prefill"] / 1e9
    if "torch_reference_prompt_stage" in mean:
        ratios["prompt_stage_speedup_vs_torch_reference"] = (
            mean["torch_reference_prompt_stage"]["total"] / (fast["prefill"] + fast["optimise"]))
    return {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "model": {"path": info.path, "architecture": info.architecture, "head_type": info.head_type,
                  "n_vocab": info.n_vocab, "n_embd": info.n_embd},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": args.threads, "system_info": slot_cpp.system_info().strip()},
        "settings": {"prompts": len(questions), "max_tokens": args.max_tokens, "steps": args.steps, "lr": args.lr},
        "mean": mean, "ratios": ratios, "rates": rates, "peak_rss_mib": peak_rss_mib(), "runs": rows,
    }


def markdown(report: dict) -> str:
    m = report["mean"]
    lines = [
        f"`{report['command']}`  ",
        f"model: {report['model']['architecture']} ({report['model']['head_type']} head, "
        f"vocab {report['model']['n_vocab']}), {report['settings']['prompts']} prompts of "
        f"{m['plain']['prompt_tokens']:.0f} tokens on average, {report['settings']['max_tokens']} new tokens, "
        f"steps {report['settings']['steps']}, lr {report['settings']['lr']}",
        "",
        "| mode | prefill s | optimise s | generate s | total s | decode tok/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ("plain", "slot_cached", "slot_recompute", "slot_auto"):
        r = m[name]
        lines.append(f"| {name} | {r['prefill']:.3f} | {r['optimise']:.3f} | {r['generate']:.3f} | "
                     f"{r['total']:.3f} | {r['tps']:.1f} |")
    g = m["llama_cpp_greedy"]
    lines.append(f"| llama.cpp greedy loop | | | {g['generate']:.3f} | {g['total']:.3f} | {g['tps']:.1f} |")
    if "torch_reference_prompt_stage" in m:
        lines.append(f"| transformers reference, prompt stage only | | | | "
                     f"{m['torch_reference_prompt_stage']['total']:.3f} | |")
    f = m["slot_cached"]
    lines += ["", f"slot_cached optimisation by part (s, {report['settings']['steps']} steps): "
              f"W*delta and normalisers {f['opt_forward']:.3f}, P0^T*r {f['opt_cache']:.3f}, "
              f"W^T*g {f['opt_backward']:.3f}, host {f['opt_host']:.3f}"]
    a = m["slot_auto"]
    lines += ["", f"slot_auto (lr auto): calibration {a['calibration']:.3f} s of its {a['optimise']:.3f} s optimisation"]
    r = report.get("rates", {})
    if r:
        lines += ["", f"SLOT's extra prefill (the head at every prompt position) runs at {r['head_pass_gmacs']:.1f} "
                  "GMAC/s" + (f"; the model's layers in plain prefill at {r['plain_prefill_layers_gmacs']:.1f} GMAC/s"
                              if "plain_prefill_layers_gmacs" in r else "")]
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    lines.append(f"| peak RSS (MiB) | {report['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF path (default: the embedded Gemma 3 270M)")
    p.add_argument("--data", default=None, help="GSM8K-format JSONL to take questions from")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--torch-reference", action="store_true",
                   help="also time the published prompt stage in PyTorch/transformers")
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    save_report(args.out, "bench_slot", run(args), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
