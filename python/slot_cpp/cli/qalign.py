"""slot-cpp qalign (sample an answer by MCMC under a reward) and qalign-head
(train a linear reward head)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .. import gsm8k
from .._model import Prompt
from .._progress import Progress
from ..evaluation import gsm8k_prompt, rtd_description
from ..options import QAlignOptions, SlotOptions, add_arguments, from_arguments
from ..qalign.proposal import PROPOSAL
from ._common import (UsageError, _add_model_options, _add_rtd_options, _open_model, _read_prompt, _reward,
                      _rtd_option)


def register(sub: Any) -> None:
    qa_p = sub.add_parser("qalign", help="QAlign: sample an answer by MCMC under a reward")
    qa_p.add_argument("prompt", nargs="?", help="prompt text ('-' or absent: read stdin)")
    qa_p.add_argument("--file", "-f")
    qa_p.add_argument("--chat", action="store_true")
    qa_p.add_argument("--system", default=None)
    qa_p.add_argument("--reward", required=True,
                      help="judge (an LLM judge: this model or --judge-model), head:FILE.npz (a trained linear "
                           "head, see qalign-head), or contains:TEXT (1 if the response contains TEXT)")
    qa_p.add_argument("--judge-model", default=None, help="GGUF of the judge (default: the policy model)")
    qa_p.add_argument("--judge-template", default=None, help="judge prompt with {prompt} and {response}")
    qa_p.add_argument("--judge-yes", default=" yes")
    qa_p.add_argument("--judge-no", default=" no")
    add_arguments(qa_p, QAlignOptions)
    qa_p.add_argument("--chains", type=int, default=1)
    qa_p.add_argument("--burn-in", type=int, default=0)
    qa_p.add_argument("--max-tokens", "-n", type=int, default=PROPOSAL.max_tokens)
    qa_p.add_argument("--top-k", type=int, default=PROPOSAL.top_k,
                      help="restrict the proposal (0: the full distribution)")
    qa_p.add_argument("--stop", action="append", default=[])
    qa_p.add_argument("--answer", choices=("vote", "mbr"), default="vote")
    qa_p.add_argument("--extract", choices=("gsm8k", "text"), default="gsm8k",
                      help="what a vote counts: GSM8K's final number, or the whole text")
    qa_p.add_argument("--chat-template", default=None)
    # SLOT shapes the proposal: --slot-steps on the prompt (0: off), --slot-lr, ...
    add_arguments(qa_p, SlotOptions, prefix="slot-", defaults={"steps": 0, "lr": 0.01})
    qa_p.add_argument("--json", action="store_true")
    _add_rtd_options(qa_p)
    _add_model_options(qa_p)
    qa_p.set_defaults(func=cmd_qalign)

    qh = sub.add_parser("qalign-head", help="train a linear reward head on GSM8K-format problems")
    qh.add_argument("--data", required=True, help="GSM8K-format JSONL (question, answer with '#### N')")
    qh.add_argument("--limit", type=int, default=None)
    qh.add_argument("--samples", type=int, default=4, help="answers sampled per problem")
    qh.add_argument("--max-tokens", type=int, default=256)
    qh.add_argument("--l2", type=float, default=100.0)
    qh.add_argument("--format", choices=gsm8k.FORMATS, default="fewshot")
    qh.add_argument("--chat-template", default=None)
    qh.add_argument("--out", "-o", required=True, help="where to write the head (.npz)")
    _add_model_options(qh)
    qh.set_defaults(func=cmd_qalign_head)


def cmd_qalign(args: argparse.Namespace) -> int:
    from .. import qalign as qa

    text = _read_prompt(args)
    with _open_model(args) as model:
        prompt: Prompt = text
        if args.chat or args.system is not None:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt = messages + [{"role": "user", "content": text}]
        reward = _reward(args, model)
        rtd = _rtd_option(args, model)
        slot = None
        if args.slot_steps:
            slot = model.generate_with_slot(prompt, max_tokens=0, chat_template=args.chat_template,
                                            **from_arguments(args, SlotOptions, prefix="slot-"))
        progress = Progress(args.steps, "qalign", True, plain=True)
        result = qa.qalign(
            model, prompt, reward=reward, beta=args.beta, steps=args.steps, max_tokens=args.max_tokens,
            chains=args.chains, seed=args.seed, top_k=args.top_k, stop=args.stop, answer=args.answer,
            delta=None if slot is None else slot.delta, rtd=rtd,
            extract=gsm8k.extract_answer if args.extract == "gsm8k" else (lambda t: t.strip() or None),
            burn_in=args.burn_in, chat_template=args.chat_template,
            on_step=lambda step, rate, mean: progress.update(1, f"accept {rate:.2f} reward {mean:+.3f}"))
        progress.close()
    if args.json:
        print(json.dumps({
            "answer": result.answer, "accept_rate": result.accept_rate, "votes": result.votes,
            "generated_tokens": result.generated_tokens, "decoded_tokens": result.decoded_tokens,
            "reward_calls": result.reward_calls,
            "slot": None if slot is None else {"steps": args.slot_steps, "lr": slot.lr, "losses": list(slot.losses)},
            "rtd": None if rtd is None else rtd_description(rtd),
            "chains": [[{"step": s.step, "text": s.text, "tokens": s.tokens, "reward": s.reward,
                         "accepted": s.accepted} for s in chain] for chain in result.chains],
        }, indent=2))
    else:
        state = result.answer_state
        print(state.text if state is not None else "")
        print(f"[qalign] answer: {result.answer!r}  acceptance {result.accept_rate:.2f}  "
              f"{result.generated_tokens} tokens generated, {result.decoded_tokens} evaluated", file=sys.stderr)
    return 0


def cmd_qalign_head(args: argparse.Namespace) -> int:
    from .. import qalign as qa

    problems = gsm8k.load_problems(args.data, args.limit)
    if not problems:
        raise UsageError(f"{args.data} has no problems")
    with _open_model(args) as model:
        progress = Progress(len(problems), "reward head", True, plain=True)
        pairs = [(gsm8k_prompt(p.question, args.format)[0], p.reference) for p in problems]
        stop = gsm8k_prompt("", args.format)[1]
        head, stats = qa.train_linear_reward(model, pairs, extract=gsm8k.extract_answer,
                                             is_correct=gsm8k.is_correct, samples=args.samples,
                                             max_tokens=args.max_tokens, l2=args.l2, seed=args.seed, stop=stop,
                                             on_problem=lambda k: progress.update(1))
        progress.close()
        head.save(args.out)
    print(f"[qalign] reward head on {stats['answers']} answers ({stats['right']} right), training accuracy "
          f"{stats['train_accuracy']:.3f}: {args.out}", file=sys.stderr)
    return 0
