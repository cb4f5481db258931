"""Prompt-lookup speculation on tasks that copy from their input.

Two tasks on the embedded Gemma 3 270M (few-shot prompts, greedy, one
request at a time, the answer ends at its line's end):

- gec: grammar correction, the answer rewrites the sentence with one fix;
- quotes: a paragraph and a question, the answer quotes a sentence of it.

For each task: decoding tokens/s of plain greedy, with ``draft_max`` (and
the same with a SLOT delta learned on each prompt), the share of drafted
tokens kept, and whether the output is plain greedy's token for token
(default mode, and deterministic mode). Each variant runs ``--rounds``
times, alternating; the table shows the median round's tokens/s and the
median over rounds of each round's speed-up (draft over plain in the same
round). ``--llama-server PATH`` runs the
same prompts through llama.cpp's server without and with its own n-gram
speculation (``--spec-type ngram-simple``) for comparison.

    python benchmarks/bench_speculative.py --llama-server ~/.cache/slot_cpp/llama-server/build/bin/llama-server
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx

import slot_cpp
from slot_cpp._files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, stop, wait_ready  # noqa: E402

GEC_SHOTS = ("Correct the grammar of each sentence.\n\n"
             "Sentence: She go to the market every mornings to buy fresh bread.\n"
             "Corrected: She goes to the market every morning to buy fresh bread.\n\n"
             "Sentence: The childrens were playing in the garden when the rain started.\n"
             "Corrected: The children were playing in the garden when the rain started.\n\n")
GEC = ["My brother have a new bicycle that he rides to his office on sunny days.",
       "We was waiting for the bus for more than an hour before it finally arrived.",
       "The teacher explained the lesson very clear so that every student could follow it.",
       "He don't like to eat vegetables, but he always eats the soup his mother makes.",
       "There is many reasons why people decide to move to a bigger city after school.",
       "I have seen that film yesterday with my friends at the small cinema downtown.",
       "The results of the experiment was surprising for everyone in the laboratory.",
       "She can speaks three languages and is learning a fourth one this year."]

PARAGRAPHS = [
    ("The harbour town was built on a narrow strip of land between the cliffs and the sea. Fishing boats left "
     "before dawn and came back in the early afternoon. The market opened as soon as the first boat was tied up. "
     "In winter, storms often kept the boats in the harbour for days.", "what happened in winter"),
    ("Bees collect nectar from flowers and turn it into honey inside the hive. A single hive can hold tens of "
     "thousands of bees in summer. Worker bees live for only a few weeks during the busy season. The queen can "
     "live for several years and lays eggs almost every day.", "how long the queen lives"),
    ("The library was founded in 1850 by a group of local merchants. Its first collection held fewer than five "
     "hundred books. A new reading room was added after the war, with tall windows facing the park. Today the "
     "library lends books, music and films to the whole region.", "the new reading room"),
    ("Mount Kell rises above the valley to a height of almost three thousand metres. The first recorded climb "
     "took place in the summer of 1872. Two shepherds guided the climbers along the eastern ridge. The same "
     "route is still the most popular way to reach the top.", "who guided the climbers"),
]
QUOTE_SHOT = ("Paragraph: The river flows through three countries before it reaches the sea. Its water is used "
              "to grow rice along the lower valley. Every spring the melting snow raises the level of the river.\n"
              "Question: Quote the sentence about the spring.\n"
              "Quote: Every spring the melting snow raises the level of the river.\n\n")


def prompts() -> dict[str, list[str]]:
    gec = [GEC_SHOTS + f"Sentence: {s}\nCorrected:" for s in GEC]
    quotes = [QUOTE_SHOT + f"Paragraph: {p}\nQuestion: Quote the sentence about {topic}.\nQuote:"
              for p, topic in PARAGRAPHS]
    return {"gec": gec, "quotes": quotes}


def run_slot(model: slot_cpp.Model, texts: list[str], options: dict[str, Any],
             deltas: Optional[list[Any]] = None) -> dict[str, Any]:
    tokens = seconds = drafted = accepted = 0
    outputs = []
    for i, text in enumerate(texts):
        extra = {} if deltas is None else {"delta": deltas[i]}
        r = model.generate(text, max_tokens=64, stop=["\n"], cache_prompt=False, **options, **extra)
        tokens += len(r.tokens)
        seconds += r.timings.generate
        drafted += r.drafted_tokens
        accepted += r.accepted_tokens
        outputs.append(r.tokens)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "drafted": drafted,
            "accepted": accepted, "outputs": outputs}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median tokens/s, with every run's figure beside it."""
    ranked = sorted(runs, key=lambda r: r["tokens_per_s"])
    return ranked[len(ranked) // 2] | {"rounds_tokens_per_s": [r["tokens_per_s"] for r in runs]}


def paired_speedup(runs: list[dict[str, Any]], bases: list[dict[str, Any]]) -> float:
    """The median over rounds of a run's tokens/s over its base's in the same round (a slow or fast
    moment of the machine falls on both)."""
    return statistics.median(r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(runs, bases))


def run_llama_server(binary: str, model_path: str, texts: list[str], spec: bool, threads: int) -> dict[str, Any]:
    port = free_port()
    cmd = [binary, "-m", model_path, "--port", str(port), "-t", str(threads), "-np", "1", "-c", "4096",
           "--log-disable"]
    if spec:
        cmd += ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m", "8",
                "--spec-draft-n-max", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, "/health")
        tokens = 0
        ms = 0.0
        drafted = accepted = 0
        outputs = []
        with httpx.Client(base_url=url, timeout=300) as http:
            http.post("/completion", json={"prompt": texts[0], "n_predict": 8, "temperature": 0})  # warm-up
            for text in texts:
                r = http.post("/completion", json={"prompt": text, "n_predict": 64, "temperature": 0,
                                                   "stop": ["\n"], "cache_prompt": False}).json()
                t = r["timings"]
                tokens += t["predicted_n"]
                ms += t["predicted_ms"]
                drafted += t.get("draft_n", 0)
                accepted += t.get("draft_n_accepted", 0)
                outputs.append(r["content"])
        return {"tokens": tokens, "seconds": ms / 1000, "tokens_per_s": 1000 * tokens / ms, "drafted": drafted,
                "accepted": accepted, "outputs": outputs}
    finally:
        stop(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="each variant runs this often, alternating; medians")
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--out", default=str(RESULTS / "bench_speculative"))
    args = ap.parse_args()
    model_path = str(slot_cpp.default_model_path())
    tasks = prompts()
    results: dict[str, Any] = {"config": vars(args) | {"model": Path(model_path).name}, "tasks": {}}
    rows = ["| task | run | tokens/s | speed-up | drafted | kept | same tokens as plain |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    spec = {"draft_max": args.draft_max, "draft_ngram": 3}
    with slot_cpp.Model(model_path, n_ctx=4096, n_parallel=1, n_threads=args.threads) as model, \
            slot_cpp.Model(model_path, n_ctx=4096, n_parallel=1, n_threads=args.threads, deterministic=True) as det:
        model.generate(tasks["gec"][0], max_tokens=8)  # warm-up
        for task, texts in tasks.items():
            deltas = [model.generate_with_slot(t, steps=5, lr="auto", max_tokens=0).delta for t in texts]
            variants = {"plain": ({}, None), "draft": (spec, None), "SLOT delta, plain": ({}, deltas),
                        "SLOT delta, draft": (spec, deltas)}
            per: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
            for _ in range(args.rounds):  # alternating, so that a slow moment falls on every variant alike
                for name, (options, given) in variants.items():
                    per[name].append(run_slot(model, texts, options, given))
            runs = {name: median_run(r) for name, r in per.items()}
            det_same = [a == b for a, b in zip(run_slot(det, texts, {})["outputs"], run_slot(det, texts, spec)["outputs"])]
            out: dict[str, Any] = {"deterministic_same": sum(det_same), "n": len(texts)}
            for name, r in runs.items():
                base_name = "SLOT delta, plain" if name.startswith("SLOT") else "plain"
                base = runs[base_name]
                same = sum(a == b for a, b in zip(r["outputs"], base["outputs"]))
                speedup = paired_speedup(per[name], per[base_name])
                kept = f"{r['accepted'] / r['drafted']:.0%}" if r["drafted"] else ""
                rows.append(f"| {task} | slot_cpp, {name} | {r['tokens_per_s']:.1f} | {speedup:.2f}x | "
                            f"{r['drafted']} | {kept} | {same} of {len(texts)} |")
                out[name] = {k: v for k, v in r.items() if k != "outputs"} | {"same": same, "speedup": speedup}
            rows.append(f"| {task} | slot_cpp, deterministic mode: draft vs plain | | | | | "
                        f"{sum(det_same)} of {len(texts)} |")
            if args.llama_server:
                pairs = [(run_llama_server(args.llama_server, model_path, texts, False, args.threads),
                          run_llama_server(args.llama_server, model_path, texts, True, args.threads))
                         for _ in range(args.rounds)]
                plain = median_run([a for a, _ in pairs])
                ngram = median_run([b for _, b in pairs])
                ratios = {"llama-server": 1.0,
                          "llama-server --spec-type ngram-simple": paired_speedup([b for _, b in pairs],
                                                                                  [a for a, _ in pairs])}
                same = sum(a == b for a, b in zip(plain["outputs"], ngram["outputs"]))
                for name, r in (("llama-server", plain), ("llama-server --spec-type ngram-simple", ngram)):
                    kept = f"{r['accepted'] / r['drafted']:.0%}" if r["drafted"] else ""
                    speedup = ratios[name]
                    rows.append(f"| {task} | {name} | {r['tokens_per_s']:.1f} | {speedup:.2f}x | {r['drafted']} | "
                                f"{kept} | {same if r is ngram else len(texts)} of {len(texts)} |")
                    out[name] = {k: v for k, v in r.items() if k != "outputs"} | {"speedup": speedup}
            results["tasks"][task] = out
    table = "\n".join(rows)
    print(table)
    out_path = Path(args.out)
    with atomic_write(out_path.with_suffix(".json"), "w") as f:
        f.write(json.dumps(results, indent=2) + "\n")
    with atomic_write(out_path.with_suffix(".md"), "w") as f:
        f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
