"""How the prompt cache changes greedy answers on few-shot prompts.

Greedy decoding of the same problems in one process, in forward and then in
reversed order, with the prompt cache on (the default: the shared few-shot
prefix's KV cells are reused, only the new tokens evaluated) and off
(`cache_prompt=False`: every prompt evaluated whole). With the cache, a
prompt's new tokens go through batches of another shape than without it,
and which prompt ran before decides what is reused; the rounding differs,
and on a small quantised model that can flip a greedy token.

    python benchmarks/prompt_cache_order.py --data benchmarks/work/qalign_slot/data/test.jsonl --rows 60

With --deterministic the model runs in deterministic mode
(``Model(deterministic=True)``), where every comparison should read 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402

import slot_cpp  # noqa: E402
from slot_cpp import gsm8k  # noqa: E402
from slot_cpp.evaluation import gsm8k_prompt  # noqa: E402


def greedy(model: slot_cpp.Model, problems: list, cache: bool, max_tokens: int) -> dict[int, str]:
    out = {}
    for p in problems:
        prompt, stop = gsm8k_prompt(p.question, "fewshot")
        out[p.index] = model.generate(prompt, max_tokens=max_tokens, temperature=0.0, stop=stop,
                                      cache_prompt=cache).text
    return out


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`  ", f"{report['model']}, {report['rows']} problems, few-shot prompt of "
             f"{report['prompt_tokens']} tokens (the first), greedy, {report['max_tokens']} tokens"
             + (", deterministic mode" if report.get("deterministic") else ""), "",
             "| compared | texts that differ | answers that differ |", "| --- | ---: | ---: |"]
    lines += [f"| {c['what']} | {c['texts']} | {c['answers']} |" for c in report["comparisons"]]
    lines += ["", "| run | right |", "| --- | ---: |"]
    lines += [f"| {name} | {right} |" for name, right in report["right"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a JSONL of GSM8K-format problems (question, answer)")
    ap.add_argument("--rows", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=None, help="GGUF (default: the embedded gemma-3-270m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="prompt_cache_order")
    ap.add_argument("--deterministic", action="store_true", help="run the model in deterministic mode")
    args = ap.parse_args()
    problems = gsm8k.load_problems(args.data)[:args.rows]
    path = args.model or slot_cpp.default_model_path()
    runs = {}
    with slot_cpp.Model(path, n_ctx=8192, n_parallel=16, n_threads=args.threads,
                        deterministic=args.deterministic) as model:
        prompt_tokens = len(model.tokenize(gsm8k_prompt(problems[0].question, "fewshot")[0]))
        for cache in (False, True):
            for order, probs in (("forward", problems), ("reversed", problems[::-1])):
                runs[f"cache {'on' if cache else 'off'}, {order}"] = greedy(model, probs, cache, args.max_tokens)

    def compare(a: str, b: str) -> dict:
        x, y = runs[a], runs[b]
        return {"what": f"{a} / {b}", "texts": sum(x[i] != y[i] for i in x),
                "answers": sum(gsm8k.extract_answer(x[i]) != gsm8k.extract_answer(y[i]) for i in x)}

    report = {"command": "python benchmarks/prompt_cache_order.py " + " ".join(sys.argv[1:]),
              "model": Path(path).stem, "deterministic": args.deterministic, "rows": len(problems), "prompt_tokens": prompt_tokens,
              "max_tokens": args.max_tokens,
              "comparisons": [compare("cache off, forward", "cache off, reversed"),
                              compare("cache on, forward", "cache on, reversed"),
                              compare("cache off, forward", "cache on, forward")],
              "right": {name: sum(gsm8k.is_correct(gsm8k.extract_answer(out[p.index]), p.reference)
                                  for p in problems) for name, out in runs.items()}}
    save_report(args.out, args.name, report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
