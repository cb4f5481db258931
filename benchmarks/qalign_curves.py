"""QAlign against best-of-n, majority vote and weighted majority vote as the
compute budget grows, on generated arithmetic problems the policy solves
some of the time, with an imperfect learned reward (arXiv 2504.03790's
central claim); greedy and SLOT (fixed lr, auto, and as QAlign's proposal)
beside them.

  1. data: `slot-cpp eval make-arithmetic` splits (train / val / test);
  2. reward: a linear head on the policy's states, trained on the train
     split (`train_linear_reward`), its ROC AUC measured on answers sampled
     for the val split;
  3. per test problem, one run at the largest budget: a sample pool (sample
     i with seed + i, each scored by the head) and a QAlign chain (and one
     with SLOT's delta as proposal). A pool or chain at a smaller budget is a
     prefix of these (`qalign.pool_prefix`, `qalign.chain_prefix`), so every
     budget's answer comes from this one run; records are appended per
     problem and method, and an interrupted run resumes;
  4. accuracy per method and budget with 95% Wilson intervals, QAlign paired
     against each baseline at each budget (exact McNemar), the reward of the
     chosen answers, CPU seconds per problem; a plot.

    python benchmarks/qalign_curves.py --level two-step --test 200

Budgets are multiples of one answer's tokens (the mean greedy answer on the
val split, an end-of-sequence token counted): 1, 2, 4, ..., 32 by default.
Writes benchmarks/results/NAME.{json,md,png} (--name, default qalign_curves);
everything else in --work. On two cores, two shards of one thread each:

    python benchmarks/qalign_curves.py ARGS --prepare-only
    python benchmarks/qalign_curves.py ARGS --threads 1 --shard 0/2 &
    python benchmarks/qalign_curves.py ARGS --threads 1 --shard 1/2; wait
    python benchmarks/qalign_curves.py ARGS --report-only

--deterministic runs the model in deterministic mode, so that a run's
answers do not depend on the shards or the order; --sample-seed (default
--seed) draws other samples and chains on the same problems and reward head
(copy data/, head.* and unit.json into each seed's --work);
benchmarks/paired_seeds.py averages several such runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import save_report  # noqa: E402

import slot_cpp  # noqa: E402
from slot_cpp import arithmetic, gsm8k  # noqa: E402
from slot_cpp import qalign as qa  # noqa: E402
from slot_cpp._files import atomic_write, open_append, record_line, sync  # noqa: E402
from slot_cpp.evaluation import gsm8k_prompt  # noqa: E402

BASELINES = ("mv", "bon", "wmv")
GREEDY_METHODS = ("greedy", "slot", "slot-auto", "slot-auto-last")  # one greedy answer each


def _prompt(question: str) -> tuple[Any, list[str]]:
    return gsm8k_prompt(question, "fewshot")


def make_data(args: argparse.Namespace, work: Path) -> dict[str, list[gsm8k.Problem]]:
    sizes = {"train": args.train, "val": args.val, "test": args.test}
    data = work / "data"
    if not (data / "test.jsonl").exists():
        data.mkdir(parents=True, exist_ok=True)
        rows = arithmetic.generate(args.level.split(","), sum(sizes.values()), seed=args.seed)
        for name, part in arithmetic.split(rows, sizes).items():
            arithmetic.write_jsonl(part, data / f"{name}.jsonl")
    return {name: gsm8k.load_problems(data / f"{name}.jsonl") for name in sizes}


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """P(score of a right answer > score of a wrong one), ties half."""
    pos = np.array([s for s, y in zip(scores, labels) if y])
    neg = np.array([s for s, y in zip(scores, labels) if not y])
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def reward_head(model: slot_cpp.Model, parts: dict, args: argparse.Namespace, work: Path) -> tuple[qa.LinearReward,
                                                                                                   dict]:
    path, info_path = work / "head.npz", work / "head.json"
    if path.exists() and info_path.exists():
        return qa.LinearReward.load(str(path), model), json.loads(info_path.read_text())
    stop = gsm8k.FEWSHOT_STOP
    start = time.perf_counter()
    head, info = qa.train_linear_reward(model, [(_prompt(p.question)[0], p.reference) for p in parts["train"]],
                                        extract=gsm8k.extract_answer, is_correct=gsm8k.is_correct,
                                        samples=args.head_samples, max_tokens=args.max_tokens, seed=args.seed,
                                        stop=stop)
    info["train_seconds"] = time.perf_counter() - start
    # held out: answers sampled for the val split, scored by the head
    scores, labels = [], []
    for p in parts["val"]:
        prompt = _prompt(p.question)[0]
        samples = model.generate_batch([prompt], n=args.head_samples, max_tokens=args.max_tokens,
                                       seed=args.seed + 7919 + p.index, temperature=1.0, top_k=0, top_p=1.0,
                                       min_p=0.0, stop=stop)
        scores += head.score(qa.candidates_of(model, prompt, samples))
        labels += [gsm8k.is_correct(gsm8k.extract_answer(s.text), p.reference) for s in samples]
    info.update({"val_answers": len(labels), "val_right": int(sum(labels)), "val_auc": roc_auc(scores, labels)})
    head.save(str(path))
    with atomic_write(info_path, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)
    return head, info


def answer_unit(model: slot_cpp.Model, parts: dict, args: argparse.Namespace, work: Path) -> int:
    """One answer's tokens: the mean greedy answer on the val split, rounded up."""
    path = work / "unit.json"
    if path.exists():
        return int(json.loads(path.read_text())["unit"])
    prompts = [_prompt(p.question)[0] for p in parts["val"]]
    greedy = model.generate_batch(prompts, max_tokens=args.max_tokens, temperature=0.0, stop=gsm8k.FEWSHOT_STOP)
    unit = math.ceil(float(np.mean([qa.sample_cost(g) for g in greedy])))
    with atomic_write(path, "w", encoding="utf-8") as f:
        json.dump({"unit": unit}, f)
    return unit


def _answer(text: str) -> Optional[str]:
    return gsm8k.extract_answer(text)


def run_problem(model: slot_cpp.Model, head: qa.LinearReward, p: gsm8k.Problem, method: str, budget: int,
                args: argparse.Namespace, deltas: dict) -> dict:
    prompt, stop = _prompt(p.question)
    seed = (args.seed if args.sample_seed is None else args.sample_seed) + 1_000_003 * p.index
    start = time.process_time()
    record: dict[str, Any] = {"index": p.index, "method": method, "reference": p.reference, "budget": budget}
    if method in GREEDY_METHODS:
        slot = {"greedy": {}, "slot": {"steps": args.slot_steps, "lr": args.slot_lr},
                "slot-auto": {"steps": args.slot_steps, "lr": "auto"},
                "slot-auto-last": {"steps": args.slot_steps, "lr": "auto", "loss_on": "last"}}[method]
        r = model.generate_with_slot(prompt, max_tokens=args.max_tokens, temperature=0.0, stop=stop,
                                     **(slot or {"steps": 0}))
        if method == "slot-auto":
            deltas[p.index] = r.delta
        record.update(answer=_answer(r.text), cost=qa.sample_cost(r), text=r.text)
    elif method == "pool":
        pool = qa.sample_pool(model, prompt, budget=budget, max_tokens=args.max_tokens, seed=seed, stop=stop)
        rewards = head.score(qa.candidates_of(model, prompt, pool))
        record.update(answers=[_answer(s.text) for s in pool], costs=[qa.sample_cost(s) for s in pool],
                      rewards=rewards)
    else:  # qalign, qalign-slot
        delta = None
        if method == "qalign-slot":
            delta = deltas.get(p.index)
            if delta is None:
                delta = model.generate_with_slot(prompt, max_tokens=1, steps=args.slot_steps, lr="auto").delta
        q = qa.qalign(model, prompt, reward=head, beta=args.beta, steps=10**6, budget=budget,
                      max_tokens=args.max_tokens, seed=seed, stop=stop, delta=delta, extract=_answer)
        chain = q.chain
        record.update(answers=[_answer(s.text) for s in chain], rewards=[s.reward for s in chain],
                      generated=[s.generated for s in chain], accept_rate=q.accept_rate)
    record["cpu_seconds"] = time.process_time() - start
    record["correct"] = gsm8k.is_correct(record["answer"], p.reference) if "answer" in record else None
    return record


def _read(work: Path) -> list[dict]:
    """Every record in --work: records.jsonl and the shards' records-I-of-N.jsonl."""
    return [r for path in sorted(work.glob("records*.jsonl")) for r in gsm8k.read_records(path)]


def _shard(text: str) -> tuple[int, int]:
    i, _, n = text.partition("/")
    if not (i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise argparse.ArgumentTypeError(f"takes I/N with 0 <= I < N, not {text!r}")
    return int(i), int(n)


def run_all(model, head, parts, methods, budget, args, work: Path) -> list[dict]:
    shard, shards = args.shard
    path = work / ("records.jsonl" if shards == 1 else f"records-{shard}-of-{shards}.jsonl")
    done = {(r["index"], r["method"]) for r in _read(work)}
    mine = [p for k, p in enumerate(parts["test"]) if k % shards == shard]
    todo = [(p, m) for p in mine for m in methods if (p.index, m) not in done]
    if done:
        print(f"resuming: {len(done)} records in {work}", file=sys.stderr)
    deltas: dict = {}
    with open_append(path) as out:
        for i, (p, m) in enumerate(todo, 1):
            out.write(record_line(run_problem(model, head, p, m, budget, args, deltas)))
            sync(out)
            if i % 20 == 0 or i == len(todo):
                print(f"  {i}/{len(todo)} records", file=sys.stderr, flush=True)
    return _read(work)


def choose(record: dict, method: str, budget: int) -> tuple[Optional[str], float, int]:
    """(answer, reward of the chosen answer, tokens used) of a method at a budget."""
    if method in GREEDY_METHODS:
        return record["answer"], float("nan"), record["cost"]
    answers, rewards = record["answers"], record["rewards"]
    if method.startswith("qalign"):
        keep = qa.pool_prefix(qa.step_costs(record["generated"]), budget)  # qa.chain_prefix's rule
        chosen, _ = qa.vote(answers[:keep])
        used = record["generated"][keep - 1]
    else:
        keep = qa.pool_prefix(record["costs"], budget)
        used = sum(record["costs"][:keep])
        if method == "mv":
            chosen, _ = qa.vote(answers[:keep])
        elif method == "bon":
            chosen, _ = qa.best_answer(answers[:keep], rewards[:keep])
        else:
            chosen, _ = qa.weighted_vote(answers[:keep], rewards[:keep])
    if method == "bon":
        reward = max(rewards[:keep])
    else:
        mine = [r for a, r in zip(answers[:keep], rewards[:keep]) if a == chosen and a is not None]
        reward = float(np.mean(mine)) if mine else float("nan")
    return chosen, reward, used


def summarise(records: list[dict], parts: dict, methods: list[str], unit: int, multiples: list[int]) -> list[dict]:
    by = {(r["index"], r["method"]): r for r in records}
    test = [p for p in parts["test"] if all((p.index, m) in by for m in methods)]
    curve_methods = [m for m in methods if m not in (*GREEDY_METHODS, "pool")]
    curve_methods = [*BASELINES, *curve_methods] if "pool" in methods else curve_methods
    rows = []
    for mult in multiples:
        budget = mult * unit
        right: dict[str, list[bool]] = {}
        for m in ([x for x in methods if x in GREEDY_METHODS] + curve_methods):
            source = "pool" if m in BASELINES else m
            if m in curve_methods and any(by[(p.index, source)].get("budget", budget) < budget for p in test):
                continue  # this method was run to a smaller largest budget (--multiples)
            got = [choose(by[(p.index, source)], m, budget) for p in test]
            right[m] = [gsm8k.is_correct(a, p.reference) for (a, _, _), p in zip(got, test)]
            n, k = len(test), sum(right[m])
            lo, hi = gsm8k.wilson_interval(k, n)
            rewards = [r for _, r, _ in got if not math.isnan(r)]
            seconds = float(np.mean([by[(p.index, source)]["cpu_seconds"] for p in test]))
            rows.append({"method": m, "multiple": mult, "budget": budget, "n": n, "right": k, "accuracy": k / n,
                         "low": lo, "high": hi, "tokens": float(np.mean([u for _, _, u in got])),
                         "reward": float(np.mean(rewards)) if rewards else None,
                         "cpu_seconds_at_largest": seconds})
        for row in rows[-len(right):]:
            for q in ("qalign", "qalign-slot"):
                if q in right and row["method"] != q:
                    fixed = sum(a and not b for a, b in zip(right[q], right[row["method"]]))
                    broken = sum(b and not a for a, b in zip(right[q], right[row["method"]]))
                    row[f"vs_{q}"] = {"qalign_only": fixed, "other_only": broken,
                                      "p": gsm8k.mcnemar_p(fixed, broken)}
    return rows


def markdown(report: dict) -> str:
    h = report["head"]
    lines = [f"`{report['command']}`  ",
             f"policy {report['model']}; task: {report['level']} ({report['n']} test problems; reward head trained "
             f"on {h['answers']} sampled answers of {report['split']['train']} train problems, ROC AUC "
             f"{h['val_auc']:.3f} on {h['val_answers']} answers to {report['split']['val']} val problems, "
             f"{h['val_right']} right); one answer = {report['unit']} tokens; QAlign beta {report['beta']}", "",
             "| method | budget (answers) | tokens used | accuracy | 95% CI | reward of chosen | vs QAlign: "
             "QAlign only | other only | McNemar p | CPU s/problem at the largest budget |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        once = row["method"] in GREEDY_METHODS
        if once and row["multiple"] != report["multiples"][0]:
            continue
        vs = row.get("vs_qalign")
        paired = f"{vs['qalign_only']} | {vs['other_only']} | {vs['p']:.3f}" if vs else "- | - | -"
        reward = "-" if row["reward"] is None else f"{row['reward']:.2f}"
        lines.append(f"| {row['method']} | {'1 (one answer)' if once else row['multiple']} | {row['tokens']:.0f} | "
                     f"{100 * row['accuracy']:.1f}% | {100 * row['low']:.1f}-{100 * row['high']:.1f}% | {reward} | "
                     f"{paired} | {row['cpu_seconds_at_largest']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"qalign": "C3", "qalign-slot": "C4", "mv": "C0", "bon": "C1", "wmv": "C2"}
    for m, colour in styles.items():
        rows = [r for r in report["rows"] if r["method"] == m]
        if not rows:
            continue
        x = [r["multiple"] for r in rows]
        acc = np.array([100 * r["accuracy"] for r in rows])
        err = np.array([[100 * (r["accuracy"] - r["low"]) for r in rows], [100 * (r["high"] - r["accuracy"])
                                                                             for r in rows]])
        ax1.errorbar(x, acc, yerr=np.maximum(err, 0.0), marker="o", capsize=3, color=colour, label=m)
        ax2.plot(x, [r["reward"] for r in rows], marker="o", color=colour, label=m)
    for m, style in (("greedy", "k--"), ("slot", "k:"), ("slot-auto", "k-."), ("slot-auto-last", "c-.")):
        row = next((r for r in report["rows"] if r["method"] == m), None)
        if row is not None:
            ax1.axhline(100 * row["accuracy"], linestyle=style[1:], color="k", linewidth=1, label=m)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (answers' worth of sampled tokens)")
        ax.grid(alpha=0.3)
    ax1.set_ylabel("accuracy (%), 95% CI")
    ax2.set_ylabel("mean reward of the chosen answer")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{report['level']}, {report['model']}, n={report['n']}")
    ax2.set_title("reward head's score of what each method picks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="policy GGUF (default: the embedded gemma-3-270m)")
    ap.add_argument("--level", default="two-step", help="arithmetic level(s), comma-separated")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-seed", type=int, default=None, help="the samples' and chains' seed (default: --seed)")
    ap.add_argument("--deterministic", action="store_true", help="run the model in deterministic mode")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--multiples", default="1,2,4,8,16,32", help="budgets, in answers' worth of tokens")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--head-samples", type=int, default=4)
    ap.add_argument("--methods", default="greedy,slot,slot-auto,pool,qalign,qalign-slot")
    ap.add_argument("--slot-steps", type=int, default=3)
    ap.add_argument("--slot-lr", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="benchmarks/work/qalign_curves")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default="qalign_curves", help="report file name in --out (.json, .md, .png)")
    ap.add_argument("--shard", type=_shard, default=(0, 1),
                    help="I/N: run the test problems at positions I, I+N, ... (N processes of --threads 1 each "
                         "use two cores better than one of two threads; run --prepare-only once first, "
                         "--report-only after)")
    ap.add_argument("--prepare-only", action="store_true", help="make the data, the reward head and the unit, then stop")
    ap.add_argument("--report-only", action="store_true",
                    help="summarise the records in --work so far (the test problems every method has finished)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    methods = args.methods.split(",")
    multiples = [int(x) for x in args.multiples.split(",")]
    if args.shard[1] > 1 and not (work / "unit.json").exists():
        raise SystemExit(f"shards share one reward head: run with --prepare-only first (--work {work})")
    parts = make_data(args, work)
    path = args.model or slot_cpp.default_model_path()
    with slot_cpp.Model(path, n_ctx=8192, n_parallel=16, n_threads=args.threads,
                        deterministic=args.deterministic) as model:
        head, info = reward_head(model, parts, args, work)
        print(f"reward head: {info}", file=sys.stderr, flush=True)
        unit = answer_unit(model, parts, args, work)
        if args.prepare_only:
            return 0
        records = _read(work) if args.report_only else \
            run_all(model, head, parts, methods, max(multiples) * unit, args, work)
    if args.shard[1] > 1:
        return 0  # one report from all shards' records, by --report-only, not one per shard racing on --out
    rows = summarise(records, parts, methods, unit, multiples)
    report = {"command": "python benchmarks/qalign_curves.py " + " ".join(sys.argv[1:]), "model": Path(path).stem,
              "level": args.level, "split": {"train": args.train, "val": args.val, "test": args.test},
              "n": rows[0]["n"] if rows else 0, "unit": unit, "multiples": multiples, "beta": args.beta,
              "head": info, "rows": rows}
    save_report(args.out, args.name, report, markdown)
    plot(report, Path(args.out) / f"{args.name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
