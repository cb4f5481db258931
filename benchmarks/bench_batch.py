"""Side-by-side timing of the multi-sequence engine in one process and one run:

(a) n samples of one prompt through generate_batch (the prompt evaluated once,
    its cells shared) vs n sequential calls;
(b) a batch of GSM8K prompts through generate_batch vs one call each;
(c) the same batch through llama.cpp's own batched loop on the same build
    (one context, a stock greedy sampler per sequence, one llama_decode per
    step), against slot_cpp's batched throughput.

    python benchmarks/bench_batch.py --data ../shared/data/gsm8k/train.jsonl

Writes benchmarks/results/bench_batch.json and .md. Not a test: numbers depend
on the machine; ratios are taken within the run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import slot_cpp
from slot_cpp import probes

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import load_questions, save_report  # noqa: E402

FEWSHOT_PREFIX = "Answer the question with a short worked solution.\n\n"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    batch = args.batch
    model = slot_cpp.Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_parallel=max(batch, args.samples))
    rows: dict[str, dict] = {}

    # (a) n samples of one ~100-token prompt.
    questions = load_questions(args.data, batch + 8)
    long_prompt = FEWSHOT_PREFIX + " ".join(questions[batch:batch + 8])
    ids = model.tokenize(long_prompt)[:100]
    sample_kw = dict(max_tokens=args.max_tokens, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, ignore_eos=True,
                     cache_prompt=False)
    model.generate_batch([ids], n=2, max_tokens=8, ignore_eos=True, cache_prompt=False)  # warm-up
    together, t_together = timed(lambda: model.generate_batch([ids], n=args.samples, seed=1, **sample_kw))
    apart, t_apart = timed(lambda: [model.generate("", prompt_token_ids=ids, seed=1 + j, **sample_kw)
                                    for j in range(args.samples)])
    n_tok = sum(r.generated_tokens for r in together)
    rows["a_samples_batched"] = dict(seconds=t_together, tokens=n_tok, tps=n_tok / t_together)
    rows["a_samples_sequential"] = dict(seconds=t_apart, tokens=n_tok, tps=n_tok / t_apart)

    # (b) and (c): a batch of GSM8K prompts, greedy.
    prompts = [model.tokenize(f"Question: {q}\nAnswer:") for q in questions[:batch]]
    greedy_kw = dict(max_tokens=args.max_tokens, ignore_eos=True, cache_prompt=False)
    batched, t_batched = timed(lambda: model.generate_batch(prompts, **greedy_kw))
    sequential, t_seq = timed(lambda: [model.generate("", prompt_token_ids=p, **greedy_kw) for p in prompts])
    (ref_tokens, ref_decode_s), t_ref = timed(lambda: probes.reference_greedy_batch(model, prompts, args.max_tokens))
    n_b = sum(r.generated_tokens for r in batched)
    n_ref = sum(len(t) for t in ref_tokens)
    rows["b_prompts_batched"] = dict(seconds=t_batched, tokens=n_b, tps=n_b / t_batched)
    rows["b_prompts_sequential"] = dict(seconds=t_seq, tokens=n_b, tps=n_b / t_seq)
    rows["c_llama_cpp_batched"] = dict(seconds=t_ref, tokens=n_ref, tps=n_ref / t_ref)
    same = sum(r.tokens[:len(t)] == t for r, t in zip(batched, ref_tokens))
    model.close()
    ratios = {
        "a_samples_speedup": rows["a_samples_sequential"]["seconds"] / rows["a_samples_batched"]["seconds"],
        "b_prompts_speedup": rows["b_prompts_sequential"]["seconds"] / rows["b_prompts_batched"]["seconds"],
        "c_batched_tps_vs_llama_cpp": rows["b_prompts_batched"]["tps"] / rows["c_llama_cpp_batched"]["tps"],
    }
    return dict(
        command="python benchmarks/bench_batch.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {args.threads or 'all'} threads",
        model=Path(model.path).name, batch=batch, samples=args.samples, max_tokens=args.max_tokens,
        prompt_tokens=dict(samples=len(ids), batch_mean=sum(map(len, prompts)) / len(prompts)),
        rows=rows, ratios=ratios, same_greedy_as_llama_cpp=f"{same}/{batch}",
    )


def markdown(report: dict) -> str:
    lines = [
        f"`{report['command']}`  ",
        f"model: {report['model']}, {report['machine']}; (a) {report['samples']} samples of a "
        f"{report['prompt_tokens']['samples']}-token prompt; (b, c) {report['batch']} GSM8K prompts of "
        f"{report['prompt_tokens']['batch_mean']:.0f} tokens on average; {report['max_tokens']} new tokens each",
        "",
        "| run | seconds | generated tokens | tokens/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in report["rows"].items():
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['tokens']} | {r['tps']:.1f} |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in report["ratios"].items()]
    lines += ["", f"Greedy tokens equal to llama.cpp's batched loop: {report['same_greedy_as_llama_cpp']} sequences."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF path (default: the embedded Gemma 3 270M)")
    p.add_argument("--data", default=None, help="GSM8K-format JSONL to take questions from")
    p.add_argument("--batch", type=int, default=16, help="prompts in (b) and (c)")
    p.add_argument("--samples", type=int, default=8, help="samples of one prompt in (a)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    save_report(args.out, "bench_batch", run(args), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
