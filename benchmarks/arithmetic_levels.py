"""Which generated arithmetic levels are inside the small models' reach:
greedy accuracy, the accuracy of one sample at temperature 1, and pass@k
(any of k samples right), per level and model, on the GSM8K few-shot prompt.

    python benchmarks/arithmetic_levels.py --model gemma --model PATH/SmolLM2-135M-Instruct.Q4_1.gguf

Writes benchmarks/results/NAME.{json,md} (--name, default arithmetic_levels). The problems are drawn
with a seed of their own (not those of the QAlign curves' splits).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402

import slot_cpp  # noqa: E402
from slot_cpp import arithmetic, gsm8k  # noqa: E402
from slot_cpp.evaluation import gsm8k_prompt  # noqa: E402


def measure(model: slot_cpp.Model, level: str, rows: int, k: int, max_tokens: int, seed: int, top_k: int = 0) -> dict:
    problems = arithmetic.generate(level, rows, seed=seed)
    prompts, stops = zip(*(gsm8k_prompt(p["question"], "fewshot") for p in problems))
    references = [gsm8k.parse_reference(p["answer"]) for p in problems]
    start = time.perf_counter()
    greedy = model.generate_batch(list(prompts), max_tokens=max_tokens, temperature=0.0, stop=list(stops[0]))
    samples = model.generate_batch(list(prompts), n=k, max_tokens=max_tokens, temperature=1.0, top_p=1.0,
                                   min_p=0.0, top_k=top_k, seed=seed, stop=list(stops[0]))
    seconds = time.perf_counter() - start
    right = [gsm8k.is_correct(gsm8k.extract_answer(g.text), r) for g, r in zip(greedy, references)]
    sample_right = [[gsm8k.is_correct(gsm8k.extract_answer(s.text), r) for s in samples[i * k:(i + 1) * k]]
                    for i, r in enumerate(references)]
    return {"level": level, "rows": rows, "greedy": sum(right) / rows,
            "sample": sum(map(sum, sample_right)) / (rows * k),
            f"pass@{k}": sum(any(s) for s in sample_right) / rows, "top_k": top_k,
            "answer_tokens": sum(g.generated_tokens for g in greedy) / rows, "seconds": seconds}


def markdown(report: dict) -> str:
    k = report["k"]
    lines = [f"`{report['command']}`  ", f"{report['rows']} problems per level, few-shot prompt, {k} samples at "
             "temperature 1 per problem (top-k: 0 for none)", "",
             f"| model | level | greedy | top-k | one sample | pass@{k} | greedy answer tokens |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["results"]:
        lines.append(f"| {row['model']} | {row['level']} | {100 * row['greedy']:.0f}% | {row['top_k']} | "
                     f"{100 * row['sample']:.0f}% "
                     f"| {100 * row[f'pass@{k}']:.0f}% | {row['answer_tokens']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, help="GGUF path or 'gemma' (repeatable)")
    ap.add_argument("--levels", default=",".join(arithmetic.LEVELS))
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--top-k", default="0", help="comma-separated top-k values of the samples (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="arithmetic_levels", help="report file name in --out (.json, .md)")
    args = ap.parse_args()
    results = []
    for spec in args.model or ["gemma"]:
        path = slot_cpp.default_model_path() if spec == "gemma" else spec
        with slot_cpp.Model(path, n_ctx=8192, n_parallel=16, n_threads=args.threads) as model:
            for level in args.levels.split(","):
                for top_k in (int(x) for x in args.top_k.split(",")):
                    row = measure(model, level, args.rows, args.k, args.max_tokens, args.seed, top_k)
                    row["model"] = Path(path).stem
                    print(row, file=sys.stderr, flush=True)
                    results.append(row)
    report = {"command": "python benchmarks/arithmetic_levels.py " + " ".join(sys.argv[1:]), "rows": args.rows,
              "k": args.k, "results": results}
    save_report(args.out, args.name, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
