"""slot-cpp generate and slot-cpp chat."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

import numpy as np

from .._files import atomic_write
from .._model import Prompt
from ..options import ChatOptions, RequestExtras, add_arguments, group_from_arguments
from ._common import (UsageError, _add_model_options, _add_rtd_options, _add_sampling_options, _check_rtd_args,
                      _open_model, _read_prompt, _report_slot, _rtd_option, _sampling_group, _slot_group,
                      result_json)


def register(sub: Any) -> None:
    gen = sub.add_parser("generate", help="generate text with SLOT")
    gen.add_argument("prompt", nargs="?", help="prompt text ('-' or absent: read stdin)")
    gen.add_argument("--file", "-f", help="read the prompt from a file")
    gen.add_argument("--chat", action="store_true", help="apply the chat template to the prompt")
    gen.add_argument("--system", default=None, help="system prompt (implies --chat)")
    add_arguments(gen, ChatOptions)
    gen.add_argument("--json", action="store_true", help="print the full result as JSON")
    gen.add_argument("--save-delta", default=None, help="save the learned delta to this .npy file")
    _add_model_options(gen)
    _add_sampling_options(gen)
    _add_rtd_options(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat; SLOT re-optimised on each turn")
    chat.add_argument("--system", default=None)
    add_arguments(chat, ChatOptions)
    _add_model_options(chat)
    _add_sampling_options(chat)
    _add_rtd_options(chat)
    chat.set_defaults(func=cmd_chat)


def save_delta(path: str, delta: np.ndarray) -> str:
    """Writes delta as a .npy file (the suffix added if missing), atomically."""
    path = path if path.endswith(".npy") else path + ".npy"
    with atomic_write(path) as f:
        np.save(f, np.asarray(delta, dtype=np.float32))
    return path


def cmd_generate(args: argparse.Namespace) -> int:
    _check_rtd_args(args)
    text = _read_prompt(args)
    chat = args.chat or args.system is not None
    sampling, slot = _sampling_group(args), _slot_group(args)  # each group made once, handed on whole
    with _open_model(args) as model:
        extras = RequestExtras(rtd=_rtd_option(args, model))
        prompt: Prompt = text
        template = args.chat_template
        if chat:
            messages = [{"role": "system", "content": args.system}] if args.system else []
            prompt, template = _chat_prompt(model, messages + [{"role": "user", "content": text}], args)
        if args.loss_on == "user" and not chat and args.chat_template is None:
            raise UsageError("--loss-on user needs a chat prompt (--chat, --system or --chat-template)")
        kwargs: dict[str, Any] = dict(chat_template=template, sampling=sampling, slot=slot, extras=extras)
        if args.json:
            result = model.generate_with_slot(prompt, **kwargs)
            print(json.dumps(result_json(result), indent=2))
        else:
            result = model.generate_with_slot(prompt, on_text=lambda s: print(s, end="", flush=True), **kwargs)
            print(flush=True)
            _report_slot(result, sys.stderr)
        if args.save_delta and result.delta is not None:
            save_delta(args.save_delta, result.delta)
    return 0


def _chat_prompt(model: Any, messages: list[dict[str, str]], args: argparse.Namespace
                 ) -> tuple[Prompt, Optional[str]]:
    """The prompt and chat template generate takes: the messages as they are,
    or rendered here when the chat options differ from the defaults (the
    template's variables; --loss-on user then cannot find the user's messages)."""
    chat = group_from_arguments(args, ChatOptions)
    if chat == ChatOptions():
        return messages, args.chat_template
    if args.loss_on == "user":
        raise UsageError("--loss-on user is not available with --no-enable-thinking, --chat-template-kwargs or "
                         "--drop-oldest-turns")
    from ..chat import format_chat

    budget = max(1, model.seq_capacity - args.max_tokens)  # the answer's cells kept free
    return format_chat(model, messages, chat_template=args.chat_template, chat=chat, prompt_budget=budget).prompt, None


def cmd_chat(args: argparse.Namespace) -> int:
    _check_rtd_args(args)
    sampling, slot = _sampling_group(args), _slot_group(args)
    with _open_model(args) as model:
        extras = RequestExtras(rtd=_rtd_option(args, model))
        messages: list[dict[str, str]] = []
        if args.system:
            messages.append({"role": "system", "content": args.system})
        print("slot-cpp chat: empty line or /exit to quit, /reset to start over", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            if line.strip() in ("", "/exit", "/quit"):
                break
            if line.strip() == "/reset":
                messages = messages[:1] if args.system else []
                continue
            messages.append({"role": "user", "content": line})
            prompt, template = _chat_prompt(model, messages, args)
            result = model.generate_with_slot(
                prompt, chat_template=template, sampling=sampling, slot=slot, extras=extras,
                on_text=lambda s: print(s, end="", flush=True))
            print(flush=True)
            _report_slot(result, sys.stderr)
            messages.append({"role": "assistant", "content": result.text})
    return 0
