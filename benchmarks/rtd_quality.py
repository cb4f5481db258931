"""What RTD does to answers on gemma-3-270m, on disjoint data splits:

(1) MMLU (the dev subjects file), split by subject: the subjects are cut in
    two halves (seeded); a choice datastore and the tuning rows come from
    half A; accuracy on (a) other questions of half A and (b) questions of
    half B, each paired against plain zero-shot with the exact McNemar test,
    for the setting an argmax tuner picks (the best validation accuracy over
    one-lambda settings) and for the cross-validated tuner's choice;
(2) GSM8K training problems: a generation datastore from reference
    solutions, settings tuned (cross-validated, k up to 1024) on validation
    problems, then the gold solution's mean token NLL on held-out problems:
    plain, RTD, SLOT (fixed and auto step size) and RTD on top of SLOT, each
    paired against plain with a t-test.

Within each file the parts never overlap: rows are shuffled with a fixed
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


def argmax_setting(tuned: rtd.TuneResult) -> dict:
    """The setting an argmax tuner takes: the best validation accuracy over
    the same grid of single lambdas (ties: the first)."""
    fixed = [e for e in tuned.table if not e["gate"]]
    if tuned.metric == "nll":
        return min(fixed, key=lambda e: e["nll"])
    return max(fixed, key=lambda e: e["accuracy"])


def mcnemar(plain_ok: list, ok: list) -> dict:
    fixed = sum(1 for p, r in zip(plain_ok, ok) if r and not p)
    broken = sum(1 for p, r in zip(plain_ok, ok) if p and not r)
    n = len(ok)
    return {"accuracy": sum(ok) / n, "ci": gsm8k.wilson_interval(sum(ok), n), "fixed": fixed, "broken": broken,
            "p": gsm8k.mcnemar_p(fixed, broken), "diff": (sum(ok) - sum(plain_ok)) / n}


def mmlu(model, args) -> dict:
    """Subjects cut in two halves: the store and the tuning rows come from
    half A; evaluation on (a) other questions of half A, (b) half B."""
    rows = [json.loads(line) for line in open(args.mmlu)]
    if args.mmlu_max_chars:
        rows = [r for r in rows if len(r["question"]) + sum(len(c) for c in r["choices"]) <= args.mmlu_max_chars]
    subjects = sorted({r["subject"] for r in rows})
    random.Random(args.seed).shuffle(subjects)
    half_a = set(subjects[:len(subjects) // 2])
    in_a = [r for r in rows if r["subject"] in half_a]
    in_b = [r for r in rows if r["subject"] not in half_a]
    ref, val, ev_a = split(in_a, (args.mmlu_reference, args.mmlu_validation, args.mmlu_eval), args.seed)
    ev_b = split(in_b, (0, 0, args.mmlu_eval), args.seed)[2]
    start = time.perf_counter()
    store = Datastore.build(model, ref, mode="choice")
    build = time.perf_counter() - start
    start = time.perf_counter()
    tuned = rtd.tune(model, store, val, seed=args.seed)
    tune_seconds = time.perf_counter() - start
    old = argmax_setting(tuned)
    settings = {
        "argmax tuner (one lambda)": RTD(store, k=int(old["k"]), temperature=old["temperature"], lam=old["lam"],
                                         gate=False),
        "cross-validated tuner" + (" (kept plain)" if tuned.kept_plain else ""): RTD(store),
    }
    out = {"subjects_a": sorted(half_a), "reference": len(ref), "validation": len(val), "build_seconds": build,
           "tune_seconds": tune_seconds, "argmax": old,
           "tuned": {"k": tuned.k, "temperature": tuned.temperature, "lam": tuned.lam, "gate": tuned.gate,
                     "kept_plain": tuned.kept_plain, "gain": tuned.gain, "gain_interval": tuned.gain_interval,
                     "by_fold": tuned.chosen_by_folds, "validation_plain": tuned.plain_score},
           "eval": {}}
    for part, ev in (("(a) same subjects", ev_a), ("(b) other subjects", ev_b)):
        answers = [rtd.answer_index(r) for r in ev]
        plain_ok = None
        results = {}
        for name, option in settings.items():
            scores = []
            for a in range(0, len(ev), 32):
                scores += rtd.score_choices(model, ev[a:a + 32], rtd=option)
            if plain_ok is None:
                plain_ok = [s.plain_choice == a for s, a in zip(scores, answers)]
                results["plain"] = mcnemar(plain_ok, plain_ok)
            results[name] = mcnemar(plain_ok, [s.rtd_choice == a for s, a in zip(scores, answers)])
        out["eval"][part] = {"n": len(ev), "methods": results}
        print(json.dumps({part: results}), file=sys.stderr)
    return out


def gsm(model, args) -> dict:
    problems = [json.loads(line) for line in open(args.gsm8k)]
    rows = [{"prompt": f"Question: {p['question']}\nAnswer:", "completion": " " + p["answer"]} for p in problems]
    ref, val, ev = split(rows, (args.gsm_reference, args.gsm_validation, args.gsm_eval), args.seed)
    start = time.perf_counter()
    store = Datastore.build(model, ref)
    build = time.perf_counter() - start
    tuned = rtd.tune(model, store, val, ks=(16, 64, 256, 1024), temperature_scales=(0.3, 1.0, 3.0),
                     lams=(0.05, 0.1, 0.2, 0.35, 0.5), seed=args.seed)
    plain, blended = rtd.generation_nll(model, store, ev)
    vs_plain = paired(blended, plain)
    out = {"reference": len(ref), "keys": len(store), "validation": len(val), "eval": len(ev),
           "build_seconds": build, "k": tuned.k, "temperature": tuned.temperature, "lam": tuned.lam,
           "gate": tuned.gate, "kept_plain": tuned.kept_plain, "cv_gain": tuned.gain,
           "cv_gain_interval": tuned.gain_interval,
           "plain_nll": float(plain.mean()), "rtd_nll": float(blended.mean()), **vs_plain}
    # SLOT on the same prompts (its loss on the prompt alone), alone and under
    # the blend: one delta per problem, RTD's query the plain state.
    methods = [{"method": "plain", "nll": float(plain.mean())},
               {"method": "RTD, cross-validated tuner", "nll": float(blended.mean()), **vs_plain}]
    old = argmax_setting(tuned)
    _, argmax_nll = rtd.generation_nll(model, store, ev, rtd=RTD(store, k=int(old["k"]), temperature=old["temperature"],
                                                                 lam=old["lam"], gate=False))
    methods.append({"method": f"RTD, argmax tuner (k {int(old['k'])}, lambda {old['lam']:g})",
                    "nll": float(argmax_nll.mean()), **paired(argmax_nll, plain)})
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
    m, g = r.get("mmlu"), r.get("gsm8k")
    lines = [f"RTD on {r['model']} (seed {r['seed']})", ""]
    if m is not None:
        lines += mmlu_markdown(m)
    if g is not None:
        lines += gsm_markdown(g)
    return "\n".join(lines)


def mmlu_markdown(m: dict) -> list:
    t = m["tuned"]
    if t["kept_plain"]:
        chosen = "plain kept"
    elif t["gate"] is not None:
        chosen = f"k {t['k']}, gate (ceiling {t['lam']:.2f})"
    else:
        chosen = f"k {t['k']}, lambda {t['lam']:.2f}"
    a = m["argmax"]
    lines = [
        f"MMLU dev subjects cut into two halves ({len(m['subjects_a'])} subjects in half A); the store ({m['reference']} questions) and the tuning rows "
        f"({m['validation']}) from half A. Argmax tuner: k {int(a['k'])}, lambda {a['lam']:.2f} (validation "
        f"{a.get('accuracy', a.get('score')):.3f} against plain {t['validation_plain']:.3f}). Cross-validated tuner: {chosen}, "
        f"held-out gain {t['gain']:+.3f} [{t['gain_interval'][0]:+.3f}, {t['gain_interval'][1]:+.3f}].",
        "",
        "| evaluation | questions | method | accuracy | vs plain | fixed | broken | McNemar p |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for part, e in m["eval"].items():
        for name, x in e["methods"].items():
            lines.append(f"| {part} | {e['n']} | {name} | {x['accuracy']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}] | "
                         + ("- | - | - | - |" if name == "plain" else
                            f"{100 * x['diff']:+.1f} pts | {x['fixed']} | {x['broken']} | {x['p']:.3g} |"))
    return lines + [""]


def gsm_markdown(g: dict) -> list:
    how = ("plain kept" if g["kept_plain"] else
           f"k {g['k']}, " + (f"gate (ceiling {g['lam']:.2f})" if g["gate"] is not None else f"lambda {g['lam']:.2f}"))
    lines = [
        f"GSM8K gold-solution NLL (lower is better): store of {g['reference']} solutions ({g['keys']} keys), "
        f"tuned on {g['validation']} ({how}; held-out gain {g['cv_gain']:+.4f} nats "
        f"[{g['cv_gain_interval'][0]:+.4f}, {g['cv_gain_interval'][1]:+.4f}]), {g['eval']} evaluation problems:",
        "",
        "| method | mean NLL | vs plain | better | worse | paired t p |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {x['method']} | {x['nll']:.4f} | "
              + (f"{x['diff']:+.4f} ± {x['diff_ci']:.4f} | {x['better']} | {x['worse']} | {x['p']:.3g} |" if "diff" in x
                 else "- | - | - | - |")
              for x in g["methods"]]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(slot_cpp.default_model_path()))
    ap.add_argument("--mmlu", required=True)
    ap.add_argument("--gsm8k", required=True)
    ap.add_argument("--mmlu-reference", type=int, default=400)
    ap.add_argument("--mmlu-validation", type=int, default=150)
    ap.add_argument("--mmlu-eval", type=int, default=200, help="questions in each evaluation part")
    ap.add_argument("--mmlu-max-chars", type=int, default=0,
                    help="only questions whose text and choices hold at most this many characters (0: all)")
    ap.add_argument("--skip-gsm8k", action="store_true", help="the MMLU part only")
    ap.add_argument("--skip-mmlu", action="store_true", help="the GSM8K part only")
    ap.add_argument("--gsm-reference", type=int, default=400)
    ap.add_argument("--gsm-validation", type=int, default=30)
    ap.add_argument("--gsm-eval", type=int, default=100)
    ap.add_argument("--gsm-slot-lr", type=lambda v: [x for x in v.split(",") if x], default=["0.01", "auto"],
                    help="SLOT step sizes compared on GSM8K (comma-separated; 'auto' allowed)")
    ap.add_argument("--gsm-slot-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--report-name", default="rtd_quality", help="the report's file name (.json and .md)")
    args = ap.parse_args()
    model = slot_cpp.Model(args.model, n_ctx=2048, n_threads=args.threads, n_parallel=4)
    report: dict = {"model": Path(str(model.path)).name, "seed": args.seed}
    if not args.skip_mmlu:
        report["mmlu"] = mmlu(model, args)
        print(json.dumps(report["mmlu"]), file=sys.stderr)
    if not args.skip_gsm8k:
        report["gsm8k"] = gsm(model, args)
    save_report(args.out, args.report_name, report, markdown)


if __name__ == "__main__":
    main()
