"""What RTD does to answers on gemma-3-270m, on disjoint data splits:

(1) MMLU (the dev subjects file): a choice datastore from a reference part,
    k/T/lambda tuned on a validation part, accuracy on an evaluation part,
    plain zero-shot vs RTD, with the exact McNemar test;
(2) GSM8K training problems: a generation datastore from reference
    solutions, settings tuned on validation problems, then the gold
    solution's mean token NLL on held-out problems: plain, RTD, SLOT (fixed
    and auto step size) and RTD on top of SLOT, each paired against plain
    with a t-test.

The three parts of each file never overlap: rows are shuffled with a fixed
seed and cut into reference / validation / evaluation.

    python benchmarks/rtd_quality.py --mmlu ../shared/data/mmlu/test_dev_subjects.jsonl \\
        --gsm8k ../shared/data/gsm8k/train.jsonl

Writes benchmarks/results/rtd_quality.json and .md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

import slot_cpp
from slot_cpp import gsm8k, rtd
from slot_cpp.rtd import RTD, Datastore

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402


def split(rows: list, sizes: tuple[int, int, int], seed: int) -> tuple[list, list, list]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    a, b, c = sizes
    if a + b + c > len(rows):
        raise SystemExit(f"need {a + b + c} rows, the file has {len(rows)}")
    return rows[:a], rows[a:a + b], rows[a + b:a + b + c]


def mmlu(model, args) -> dict:
    rows = [json.loads(line) for line in open(args.mmlu)]
    ref, val, ev = split(rows, (args.mmlu_reference, args.mmlu_validation, args.mmlu_eval), args.seed)
    start = time.perf_counter()
    store = Datastore.build(model, ref, mode="choice")
    build = time.perf_counter() - start
    tuned = rtd.tune(model, store, val)
    scores = []
    for a in range(0, len(ev), 32):
        scores += rtd.score_choices(model, ev[a:a + 32], rtd=store)
    answers = [rtd.answer_index(r) for r in ev]
    plain_ok = [s.plain_choice == a for s, a in zip(scores, answers)]
    rtd_ok = [s.rtd_choice == a for s, a in zip(scores, answers)]
    fixed = sum(1 for p, r in zip(plain_ok, rtd_ok) if r and not p)
    broken = sum(1 for p, r in zip(plain_ok, rtd_ok) if p and not r)
    n = len(ev)
    return {"reference": len(ref), "validation": len(val), "eval": n, "build_seconds": build,
            "k": tuned.k, "temperature": tuned.temperature, "lam": tuned.lam,
            "validation_plain": tuned.plain_score, "validation_rtd": tuned.score,
            "plain": sum(plain_ok) / n, "plain_ci": gsm8k.wilson_interval(sum(plain_ok), n),
            "rtd": sum(rtd_ok) / n, "rtd_ci": gsm8k.wilson_interval(sum(rtd_ok), n),
            "fixed": fixed, "broken": broken, "p": gsm8k.mcnemar_p(fixed, broken)}


def gsm(model, args) -> dict:
    problems = [json.loads(line) for line in open(args.gsm8k)]
    rows = [{"prompt": f"Question: {p['question']}\nAnswer:", "completion": " " + p["answer"]} for p in problems]
    ref, val, ev = split(rows, (args.gsm_reference, args.gsm_validation, args.gsm_eval), args.seed)
    start = time.perf_counter()
    store = Datastore.build(model, ref)
    build = time.perf_counter() - start
    tuned = rtd.tune(model, store, val, ks=(16, 64, 256), temperature_scales=(0.3, 1.0, 3.0),
                     lams=(0.05, 0.1, 0.2, 0.35))
    plain, blended = rtd.generation_nll(model, store, ev)
    vs_plain = paired(blended, plain)
    out = {"reference": len(ref), "keys": len(store), "validation": len(val), "eval": len(ev),
           "build_seconds": build, "k": tuned.k, "temperature": tuned.temperature, "lam": tuned.lam,
           "plain_nll": float(plain.mean()), "rtd_nll": float(blended.mean()), **vs_plain}
    # SLOT on the same prompts (its loss on the prompt alone), alone and under
    # the blend: one delta per problem, RTD's query the plain state.
    methods = [{"method": "plain", "nll": float(plain.mean())},
               {"method": "RTD", "nll": float(blended.mean()), **vs_plain}]
    for lr in args.gsm_slot_lr:
        lr_value = lr if lr == "auto" else float(lr)
        deltas, chosen = [], []
        for row in ev:
            res = model.generate_with_slot("", prompt_token_ids=model.tokenize(row["prompt"]), steps=args.gsm_slot_steps,
                                           lr=lr_value, max_tokens=0)
            deltas.append(np.asarray(res.delta))
            chosen.append(res.lr)
        slot_nll, both = rtd.generation_nll(model, store, ev, deltas=deltas)
        name = f"SLOT {args.gsm_slot_steps} steps, lr {lr}"
        methods.append({"method": name, "nll": float(slot_nll.mean()), **paired(slot_nll, plain),
                        "lr_chosen": sorted(set(chosen)) if lr == "auto" else None})
        methods.append({"method": f"RTD + {name}", "nll": float(both.mean()), **paired(both, plain)})
        print(json.dumps(methods[-2:]), file=sys.stderr)
    out["methods"] = methods
    return out


def paired(nll: np.ndarray, plain: np.ndarray) -> dict:
    """The per-problem difference to plain: mean with a 95% interval, counts, paired t p."""
    from scipy import stats

    diff = nll - plain
    mean, half = gsm8k.paired_t(diff.tolist())
    return {"diff": mean, "diff_ci": half, "better": int((diff < 0).sum()), "worse": int((diff > 0).sum()),
            "p": float(stats.ttest_1samp(diff, 0.0).pvalue)}


def markdown(r: dict) -> str:
    m, g = r["mmlu"], r["gsm8k"]
    return "\n".join([
        f"RTD on {r['model']} (seed {r['seed']})",
        "",
        "| task | reference | tuned k / T / lambda | eval rows | plain | RTD | paired |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| MMLU dev subjects, zero-shot accuracy | {m['reference']} questions | {m['k']} / {m['temperature']:.0f} / "
        f"{m['lam']:.2f} | {m['eval']} | {m['plain']:.3f} [{m['plain_ci'][0]:.3f}, {m['plain_ci'][1]:.3f}] | "
        f"{m['rtd']:.3f} [{m['rtd_ci'][0]:.3f}, {m['rtd_ci'][1]:.3f}] | {m['fixed']} fixed, {m['broken']} broken, "
        f"McNemar p = {m['p']:.3g} |",
        f"| GSM8K gold-solution NLL (lower is better) | {g['reference']} solutions, {g['keys']} keys | {g['k']} / "
        f"{g['temperature']:.0f} / {g['lam']:.2f} | {g['eval']} | {g['plain_nll']:.4f} | {g['rtd_nll']:.4f} | "
        f"{g['diff']:+.4f} ± {g['diff_ci']:.4f}; better on {g['better']}, worse on {g['worse']}, paired t p = {g['p']:.3g} |",
        "",
        f"GSM8K gold-solution NLL on the {g['eval']} evaluation problems, each method against plain "
        "(the difference's mean with a 95% interval; lower is better):",
        "",
        "| method | mean NLL | vs plain | better | worse | paired t p |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ] + [f"| {m['method']} | {m['nll']:.4f} | "
         + (f"{m['diff']:+.4f} ± {m['diff_ci']:.4f} | {m['better']} | {m['worse']} | {m['p']:.3g} |" if "diff" in m
            else "- | - | - | - |")
         for m in g["methods"]] + [""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(slot_cpp.default_model_path()))
    ap.add_argument("--mmlu", required=True)
    ap.add_argument("--gsm8k", required=True)
    ap.add_argument("--mmlu-reference", type=int, default=1500)
    ap.add_argument("--mmlu-validation", type=int, default=150)
    ap.add_argument("--mmlu-eval", type=int, default=400)
    ap.add_argument("--gsm-reference", type=int, default=400)
    ap.add_argument("--gsm-validation", type=int, default=30)
    ap.add_argument("--gsm-eval", type=int, default=100)
    ap.add_argument("--gsm-slot-lr", type=lambda v: v.split(","), default=["0.01", "auto"],
                    help="SLOT step sizes compared on GSM8K (comma-separated; 'auto' allowed)")
    ap.add_argument("--gsm-slot-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    model = slot_cpp.Model(args.model, n_ctx=2048, n_threads=args.threads, n_parallel=4)
    report = {"model": Path(str(model.path)).name, "seed": args.seed, "mmlu": mmlu(model, args)}
    print(json.dumps(report["mmlu"]), file=sys.stderr)
    report["gsm8k"] = gsm(model, args)
    save_report(args.out, "rtd_quality", report, markdown)


if __name__ == "__main__":
    main()
