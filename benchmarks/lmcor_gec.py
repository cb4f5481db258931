"""LMCor on grammatical error correction, on a laptop.

The task: sentences taken from GSM8K questions, corrupted on purpose
(articles dropped or swapped, subject-verb agreement broken, prepositions
swapped, letters swapped or dropped); the clean sentence is the target.
Train and test sentences come from disjoint questions.

  1. the generator (gemma-3-270m, base, few-shot) makes k = 5 candidates
     (greedy + 4 samples at T = 0.7) for every training sentence;
  2. a LoRA corrector on SmolLM2-135M-Instruct is trained on them;
  3. on held-out sentences: generator greedy vs the oracle (the best of the
     k candidates by sentence chrF) vs LMCor, with paired intervals; then the
     same corrector reads a second generator's candidates (SmolLM2 itself,
     few-shot) without retraining: plug and play.

    python benchmarks/lmcor_gec.py --gsm8k ../shared/data/gsm8k/train.jsonl \\
        --corrector-base ~/.cache/slot_cpp/models/SmolLM2-135M-Instruct.Q4_1.gguf

Stages are cached in --work (candidates resume, the adapter is kept).
Writes benchmarks/results/lmcor_gec.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

import slot_cpp
from slot_cpp import lmcor

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402

PROMPT = """Correct the grammar and spelling of each sentence.

Sentence: She have three apple in her bag.
Corrected: She has three apples in her bag.

Sentence: Tom buyed a new bike for the $120.
Corrected: Tom bought a new bike for $120.

Sentence: There is 12 students on class.
Corrected: There are 12 students in class.

Sentence: A farmer sell eggs at market every weeks.
Corrected: A farmer sells eggs at the market every week.

Sentence: {input}
Corrected:"""

SWAPS = [("is", "are"), ("are", "is"), ("was", "were"), ("were", "was"), ("has", "have"), ("have", "has"),
         ("does", "do"), ("do", "does"), ("in", "on"), ("on", "in"), ("at", "in"), ("of", "for"),
         ("for", "of"), ("a", "the"), ("the", "a"), ("an", "a"), ("a", "an")]
ARTICLES = {"a", "an", "the"}


def sentences(questions: list[str]) -> list[str]:
    out = []
    for q in questions:
        for s in re.split(r"(?<=[.?!])\s+", q.strip()):
            words = s.split()
            if 6 <= len(words) <= 25 and s.isascii() and s[0].isupper() and s[-1] in ".?!":
                out.append(s)
    return out


def corrupt(sentence: str, rng: random.Random) -> str:
    """One to three errors of the kinds listed in the module docs."""
    words = sentence.split()
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["article", "swap", "verb", "typo", "typo"])
        idx = list(range(len(words)))
        rng.shuffle(idx)
        for i in idx:
            w = words[i]
            core = w.rstrip(".,?!")
            tail = w[len(core):]
            low = core.lower()
            if kind == "article" and low in ARTICLES and len(words) > 4:
                del words[i]
                break
            if kind == "swap" and any(low == a for a, _ in SWAPS):
                choices = [b for a, b in SWAPS if a == low]
                new = rng.choice(choices)
                words[i] = (new.capitalize() if core[0].isupper() else new) + tail
                break
            if kind == "verb" and len(low) > 3 and low.endswith("s") and not low.endswith("ss") and i > 0:
                words[i] = core[:-1] + tail
                break
            if kind == "typo" and len(core) >= 5 and core.isalpha():
                j = rng.randrange(1, len(core) - 2)
                if rng.random() < 0.5:
                    core = core[:j] + core[j + 1] + core[j] + core[j + 2:]
                else:
                    core = core[:j] + core[j + 1:]
                words[i] = core + tail
                break
    out = " ".join(words)
    if out and out[0].islower() and rng.random() < 0.5:
        out = out[0].upper() + out[1:]
    return out


def make_rows(path: Path, n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    questions = [json.loads(line)["question"] for line in path.open()]
    rng = random.Random(seed)
    rng.shuffle(questions)
    cut = len(questions) // 2  # train and test sentences from disjoint questions
    out = []
    for part, n in ((questions[:cut], n_train), (questions[cut:], n_test)):
        rows = []
        for s in sentences(part):
            bad = corrupt(s, rng)
            if bad != s:
                rows.append({"input": bad, "target": s})
            if len(rows) == n:
                break
        out.append(rows)
    return out[0], out[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gsm8k", required=True, type=Path)
    ap.add_argument("--corrector-base", required=True, type=Path)
    ap.add_argument("--generator", default=None, help="GGUF (default: the embedded Gemma 3 270M)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmcor_gec"))
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stage", choices=["data", "candidates", "train", "eval", "all"], default="all")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "lmcor_gec")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_rows, test_rows = make_rows(args.gsm8k, args.train, args.test, seed=0)
    write_jsonl(args.work / "gec_train.jsonl", train_rows)
    write_jsonl(args.work / "gec_test.jsonl", test_rows)
    (args.work / "prompt.txt").write_text(PROMPT)
    print(f"{len(train_rows)} train / {len(test_rows)} test rows in {args.work}", file=sys.stderr)
    if args.stage == "data":
        return 0
    cands = args.work / "candidates.jsonl"
    adapter = args.work / "gec-corrector.gguf"
    # Stages run separately add to one report.
    saved = args.out.with_suffix(".json")
    report: dict = json.loads(saved.read_text()) if saved.exists() else {}
    report.update({"train_rows": len(train_rows), "test_rows": len(test_rows), "k": args.k})
    opts = dict(prompt=PROMPT, k=args.k, temperature=0.7, max_tokens=64, stop=["\n"])
    if args.stage in ("candidates", "all"):
        with slot_cpp.Model(args.generator, n_ctx=4096, n_parallel=20, n_threads=args.threads) as gen:
            t0 = time.perf_counter()
            n = lmcor.make_corrector_data(gen, train_rows, cands, batch_size=4, progress=True, **opts)
            report["make_data_seconds"] = time.perf_counter() - t0
            report["make_data_rows"] = n
    if args.stage in ("train", "all"):
        rep = lmcor.train_corrector(args.corrector_base, cands, adapter, epochs=args.epochs, threads=args.threads,
                                    progress=True)
        report["train"] = dataclasses.asdict(rep)
    if args.stage in ("eval", "all"):
        with slot_cpp.Model(args.corrector_base, n_ctx=2048, n_parallel=8, n_threads=args.threads,
                            lora=adapter) as cor_model:
            corrector = lmcor.Corrector(cor_model, max_tokens=64)
            for name, path in (("gemma-3-270m", args.generator), ("SmolLM2-135M-Instruct", args.corrector_base)):
                with slot_cpp.Model(path, n_ctx=4096, n_parallel=20, n_threads=args.threads) as gen:
                    t0 = time.perf_counter()
                    ev = lmcor.evaluate(gen, corrector, test_rows, batch_size=4, progress=True, **opts)
                    d = dataclasses.asdict(ev)
                    d["seconds"] = time.perf_counter() - t0
                    # The generator alone, for the time ratio: greedy only, batched the same way.
                    t0 = time.perf_counter()
                    for start in range(0, len(test_rows), 4):
                        gen.generate_batch([PROMPT.replace("{input}", r["input"])
                                            for r in test_rows[start:start + 4]], max_tokens=64, stop=["\n"])
                    d["greedy_only_seconds"] = (time.perf_counter() - t0) / len(test_rows)
                    report[f"eval:{name}"] = d
    save_report(str(args.out.parent), args.out.name, report, markdown)
    return 0


def markdown(report: dict) -> str:
    lines = []
    for key, ev in report.items():
        if not key.startswith("eval:"):
            continue
        lines += [f"Generator {key[5:]}, {ev['rows']} held-out sentences, k = {ev['k']}:", "",
                  "| system | exact match (95% CI) | chrF | BLEU | sentence chrF (95% CI) |",
                  "| --- | --- | ---: | ---: | --- |"]
        for s in ev["systems"]:
            lines.append(f"| {s['name']} | {100 * s['exact_match']:.1f}% ± {100 * s['exact_match_ci']:.1f} | "
                         f"{s['chrf']:.1f} | {s['bleu']:.1f} | {s['sentence_chrf']:.1f} ± "
                         f"{s['sentence_chrf_ci']:.1f} |")
        lines += ["", "| LMCor minus | exact match (95% CI) | sentence chrF (95% CI) | better | worse |",
                  "| --- | --- | --- | ---: | ---: |"]
        for p in ev["paired"]:
            lines.append(f"| {p['versus']} | {100 * p['exact_match']:+.1f} pt ± {100 * p['exact_match_ci']:.1f} | "
                         f"{p['sentence_chrf']:+.2f} ± {p['sentence_chrf_ci']:.2f} | {p['better']} | "
                         f"{p['worse']} |")
        total = ev["generator_seconds"] + ev["corrector_seconds"]
        lines += ["", "| time per sentence | seconds | vs generator alone |", "| --- | ---: | ---: |",
                  f"| generator alone (greedy) | {ev['greedy_only_seconds']:.3f} | 1.00x |",
                  f"| generator, k candidates | {ev['generator_seconds']:.3f} | "
                  f"{ev['generator_seconds'] / ev['greedy_only_seconds']:.2f}x |",
                  f"| corrector | {ev['corrector_seconds']:.3f} | "
                  f"{ev['corrector_seconds'] / ev['greedy_only_seconds']:.2f}x |",
                  f"| LMCor in all | {total:.3f} | {total / ev['greedy_only_seconds']:.2f}x |", ""]
    if "train" in report:
        t = report["train"]
        lines += [f"Training: {t['rows']} rows, {t['epochs']:g} epochs, {t['steps']} steps, {t['tokens']} tokens per "
                  f"epoch, {t['parameters']} LoRA parameters: {t['seconds'] / 60:.1f} min; loss {t['losses'][0]:.3f} "
                  f"-> {t['losses'][-1]:.3f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
