"""Cost of a QAlign step against regenerating and rescoring a whole response,
side by side in one process and one run.

A QAlign step forks the chain's state at a uniform position (the prefix's
KV cells come from the cache), samples the suffix, and scores the proposal
with a linear reward head (one evaluated token: the rest is cached). The
baseline samples a new response from the prompt and scores it from scratch,
as an implementation without prefix reuse does.

    python benchmarks/bench_qalign.py --data ../shared/data/gsm8k/train.jsonl

Writes benchmarks/results/bench_qalign.json and .md. Not a test.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

import slot_cpp
from slot_cpp import gsm8k
from slot_cpp import qalign as qa

sys.path.insert(0, str(Path(__file__).parent))
from bench_slot import load_questions, save_report  # noqa: E402


def run(args: argparse.Namespace) -> dict:
    model = slot_cpp.Model(args.model, n_ctx=args.n_ctx, n_threads=args.threads, n_parallel=4)
    question = load_questions(args.data, 1)[0]
    prompt = gsm8k.fewshot_prompt(question)
    x = model.prompt_tokens(prompt)
    head = qa.LinearReward(model, np.random.default_rng(0).normal(size=model.n_embd) / model.n_embd ** 0.5, 0.0)
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=args.max_tokens)

    # Baseline: a new response from the prompt alone, scored from scratch.
    model.generate("", prompt_token_ids=x, max_tokens=4, cache_prompt=False)  # warm-up
    base_times, base_tokens = [], []
    evaluated_before = model.decoded_tokens
    for k in range(args.rounds):
        start = time.perf_counter()
        r = model.generate("", prompt_token_ids=x, seed=k, cache_prompt=False, **sampling)
        model.generate("", prompt_token_ids=x + r.tokens, max_tokens=0, return_hidden=True, cache_prompt=False)
        base_times.append(time.perf_counter() - start)
        base_tokens.append(r.generated_tokens)
    base_evaluated = (model.decoded_tokens - evaluated_before) / args.rounds

    # QAlign: steps timed one by one through the progress callback.
    stamps: list[float] = []
    model.clear_cache()
    start = time.perf_counter()
    result = qa.qalign(model, "", prompt_token_ids=x, reward=head, steps=args.steps, max_tokens=args.max_tokens,
                       seed=1, extract=gsm8k.extract_answer, on_step=lambda *_: stamps.append(time.perf_counter()))
    first_sample = stamps[0] - start  # y0 plus step 1
    step_times = list(np.diff(stamps))
    suffixes = [len(c.tokens) for c in result.chain]
    model.close()
    ratio = float(np.mean(step_times) / np.mean(base_times))
    return dict(
        command="python benchmarks/bench_qalign.py " + " ".join(sys.argv[1:]),
        machine=f"{platform.machine()}, {args.threads} threads", prompt_tokens=len(x), max_tokens=args.max_tokens,
        baseline=dict(rounds=args.rounds, mean_s=float(np.mean(base_times)), mean_tokens=float(np.mean(base_tokens)),
                      evaluated=base_evaluated),
        qalign=dict(steps=args.steps, mean_step_s=float(np.mean(step_times)), first_s=first_sample,
                    accept_rate=result.accept_rate,
                    tokens_per_step=(result.generated_tokens - result.chain[0].length) / args.steps,
                    # less the prompt (its last token evaluated on its own) and y0
                    evaluated_per_step=(result.decoded_tokens - (len(x) - 1) - result.chain[0].length) / args.steps,
                    reward_tokens_per_step=(result.reward_tokens - 1) / args.steps,
                    mean_response_tokens=float(np.mean(suffixes))),
        ratios=dict(step_vs_regenerate_and_rescore=ratio),
    )


def markdown(report: dict) -> str:
    b, q = report["baseline"], report["qalign"]
    return "\n".join([
        f"`{report['command']}`  ",
        f"{report['machine']}; prompt {report['prompt_tokens']} tokens, responses of {report['max_tokens']} tokens; "
        "reward: a linear head on the policy's hidden state",
        "",
        "| run | mean seconds | tokens sampled | tokens evaluated (sampling + reward) |",
        "| --- | ---: | ---: | ---: |",
        f"| regenerate + rescore (x{b['rounds']}) | {b['mean_s']:.3f} | {b['mean_tokens']:.0f} | "
        f"{b['evaluated']:.0f} |",
        f"| QAlign step (x{q['steps']}) | {q['mean_step_s']:.3f} | {q['tokens_per_step']:.1f} | "
        f"{q['evaluated_per_step'] + q['reward_tokens_per_step']:.1f} ({q['evaluated_per_step']:.1f} + "
        f"{q['reward_tokens_per_step']:.1f}) |",
        "",
        "| ratio | value |",
        "| --- | ---: |",
        f"| step_vs_regenerate_and_rescore | {report['ratios']['step_vs_regenerate_and_rescore']:.2f} |",
        "",
        f"Acceptance rate {q['accept_rate']:.2f}.",
    ]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None, help="GSM8K-format JSONL to take the question from")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    save_report(args.out, "bench_qalign", run(args), markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
