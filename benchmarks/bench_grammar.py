"""Constrained decoding's cost: tokens/s with a JSON schema against unconstrained
decoding of the same prompt, on the same model, alternating in one run.

    python benchmarks/bench_grammar.py --threads 2 --repeats 8

Each repeat generates up to 96 tokens at temperature 0.8 from a prompt that
asks for a JSON object, once free (ignore_eos, so it runs the whole length)
and once under the schema (which ends where the object is complete);
tokens/s is generated tokens over the generation seconds, for two sampler
settings: the Python API's defaults (top_k 40, top_p 0.95, min_p 0.05: the
grammar checks the highest tokens) and OpenAI's (no truncation: one draw,
redrawn from the masked logits when the grammar refuses it). Writes
benchmarks/results/bench_grammar.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import slot_cpp

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 4},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PROMPT = ("Here is a JSON record of a person, with their name, age, city and hobbies:\n")
SETTINGS = {
    "python defaults (top_k 40)": dict(top_k=40, top_p=0.95, min_p=0.05),
    "openai defaults (no truncation)": dict(top_k=0, top_p=1.0, min_p=0.0),
}


def rate(model: slot_cpp.Model, seed: int, constrained: bool, setting: dict[str, Any],
         max_tokens: int) -> tuple[int, float]:
    extra: dict[str, Any] = {"json_schema": SCHEMA} if constrained else {"ignore_eos": True}
    r = model.generate(PROMPT, max_tokens=max_tokens, temperature=0.8, seed=seed, cache_prompt=False,
                       **setting, **extra)
    if constrained:
        json.loads(r.text)  # a complete object, or the run was cut by max_tokens
    return len(r.tokens), r.timings.generate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GGUF path (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    rows = []
    with slot_cpp.Model(args.model, n_ctx=512, n_threads=args.threads, n_parallel=1) as model:
        rate(model, 0, True, SETTINGS["python defaults (top_k 40)"], args.max_tokens)  # warm-up
        for name, setting in SETTINGS.items():
            free, fixed = [], []
            for i in range(args.repeats):
                for constrained, sink in ((False, free), (True, fixed)):
                    n, seconds = rate(model, 100 + i, constrained, setting, args.max_tokens)
                    sink.append((n, seconds))
            free_rate = sum(n for n, _ in free) / sum(s for _, s in free)
            fixed_rate = sum(n for n, _ in fixed) / sum(s for _, s in fixed)
            rows.append({"setting": name, "free_tok_s": free_rate, "schema_tok_s": fixed_rate,
                         "ratio": fixed_rate / free_rate,
                         "schema_tokens_median": statistics.median(n for n, _ in fixed)})
            print(json.dumps(rows[-1]), flush=True)
        vocab = model.n_vocab
        name = Path(model.path).stem
    report = {"command": "python benchmarks/bench_grammar.py " + " ".join(sys.argv[1:]),
              "machine": f"{platform.machine()}, {args.threads} threads", "model": name, "vocab": vocab,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grammar.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"`{report['command']}`  ", f"{name} ({vocab} tokens), {report['machine']}", "",
             "| sampler | unconstrained tok/s | JSON schema tok/s | ratio | schema answer tokens (median) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['free_tok_s']:.1f} | {r['schema_tok_s']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['schema_tokens_median']:.0f} |")
    (out / "bench_grammar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
