"""Generation: the one path from a Model's generate calls to the native batch.

:meth:`Model.generate_with_slot` is a one-prompt :func:`generate_batch`. Each
call's option groups (``sampling=``, ``slot=``, ``extras=``) reach
:func:`slot_cpp.options.native_request` as the very objects given, unless
keyword options override fields (then a new group is made, once); each
prompt's tokens and loss mask are found once; one native batch runs them all.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from . import _core
from . import options as opts
from .options import RequestExtras, SamplingOptions, SlotOptions, check_int
from .results import GenerationResult, Timings

Groups = tuple[SamplingOptions, SlotOptions, RequestExtras]
"""A request's option groups, in native_request's order."""
Job = tuple[Any, Groups]
"""One prompt (text, chat messages or token ids) and its groups."""


def cancel_check(cancel: Any) -> Optional[Callable[[], bool]]:
    """``cancel`` (a threading.Event or a callable) as the native loop's poll."""
    if cancel is None:
        return None
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    if not callable(cancel):
        raise TypeError("cancel must be a threading.Event or a callable returning bool")
    return lambda: bool(cancel())


def generate_one(model: Any, prompt: Any, *, chat_template: Optional[str], system: Optional[str],
                 prompt_token_ids: Optional[Sequence[int]], on_text: Any, cancel: Any,
                 sampling: Optional[SamplingOptions], slot: Optional[SlotOptions], extras: Optional[RequestExtras],
                 options: Mapping[str, Any]) -> GenerationResult:
    """Model.generate_with_slot: one prompt of the batch path, its errors unlabelled."""
    model._s()
    if on_text is not None and not callable(on_text):
        raise TypeError("on_text must be callable")
    groups = groups_of(options, sampling, slot, extras, where="generate_with_slot()")
    one: Any = prompt
    if prompt_token_ids is not None:
        if groups[1].loss_on == "user":
            raise ValueError("loss_on='user' needs chat messages, not prompt_token_ids")
        one = model.check_tokens(prompt_token_ids)
        if not one:
            raise ValueError("the prompt is empty")
    callback = None
    if on_text is not None:
        user_callback = on_text

        def callback(index: int, piece: bytes) -> bool:
            keep = user_callback(piece.decode("utf-8", "replace"))
            return keep is None or bool(keep)

    return run_batch(model, [(one, groups)], 1, chat_template, system, callback, cancel, label=False)[0]


def generate_batch(model: Any, prompts: Any, n: Any, *, chat_template: Optional[str], system: Optional[str],
                   on_text: Any, cancel: Any, sampling: Optional[SamplingOptions], slot: Optional[SlotOptions],
                   extras: Optional[RequestExtras], options: Mapping[str, Any]) -> list[GenerationResult]:
    """Model.generate_batch: keyword options split per prompt over the given groups."""
    model._s()
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError("prompts must be a list of prompts (text, chat messages or token ids)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    n = check_int("n", n, 1)
    if on_text is not None and not callable(on_text):
        raise TypeError("on_text must be callable")
    opts.split_options(options, where="generate_batch()")  # unknown names fail before anything runs
    if slot is None and "steps" not in options:
        options = {**options, "steps": 0}
    per_prompt: list[dict[str, Any]] = [dict() for _ in prompts]
    for key, value in options.items():
        for one, v in zip(per_prompt, _split_per_prompt(key, value, len(prompts))):
            one[key] = v
    jobs = []
    for i, (prompt, one) in enumerate(zip(prompts, per_prompt)):
        try:
            jobs.append((prompt, groups_of(one, sampling, slot, extras, where="generate_batch()")))
        except (TypeError, ValueError) as exc:
            raise _labelled(exc, i) from None
    callback = None
    if on_text is not None:
        user_callback = on_text

        def callback(index: int, piece: bytes) -> bool:
            keep = user_callback(index, piece.decode("utf-8", "replace"))
            return keep is None or bool(keep)

    return run_batch(model, jobs, n, chat_template, system, callback, cancel, label=True)


def run_batch(model: Any, jobs: Sequence[Job], n: int, chat_template: Optional[str], system: Optional[str],
              callback: Optional[Callable[[int, bytes], bool]], cancel: Any, *,
              label: bool) -> list[GenerationResult]:
    """The one generate path: each prompt's tokens and loss mask, its native
    request (from its groups, unchanged), one batch."""
    s = model._s()
    check = cancel_check(cancel)
    requests = []
    for i, (prompt, groups) in enumerate(jobs):
        try:
            if groups[1].loss_on == "user":
                tokens, loss_mask = _tokens_and_mask(model, prompt, groups[1], chat_template, system)
            else:
                tokens = _batch_prompt_tokens(model, prompt, i, chat_template, system, label=label)
                loss_mask = _tokens_loss_mask(model, tokens, groups[1])
            requests.append(build_request(model, tokens, n, groups, loss_mask))
        except (TypeError, ValueError) as exc:
            if not label:
                raise
            raise _labelled(exc, i) from None
    raws = s.generate_batch(requests, callback, check)
    return [_result(raw, requests[k // n]) for k, raw in enumerate(raws)]


def groups_of(options: Mapping[str, Any], sampling: Optional[SamplingOptions], slot: Optional[SlotOptions],
              extras: Optional[RequestExtras] = None, *, where: str) -> Groups:
    """The groups of a call: a given group as it is (the same object), or
    with the keyword options over it, or made from them; checked once, by
    the groups themselves."""
    split = opts.split_options(options, where=where)
    out = []
    for group_type, given in ((SamplingOptions, sampling), (SlotOptions, slot), (RequestExtras, extras)):
        if given is not None and not isinstance(given, group_type):
            raise TypeError(f"expected a {group_type.__name__}, got {type(given).__name__}")
        values = split[group_type]
        out.append(given.replace(**values) if given is not None and values else given or group_type(**values))
    return out[0], out[1], out[2]


def build_request(model: Any, tokens: list[int], n: int, groups: Groups,
                  loss_mask: Optional[list[bool]]) -> _core.Request:
    """The native request of one prompt: :func:`slot_cpp.options.native_request`."""
    facts = opts.ModelFacts(n_vocab=model.n_vocab, n_embd=model.n_embd, seed=model._seed,
                            n_adapters=model.n_adapters)
    return opts.native_request(tokens, n, *groups, facts, loss_mask=loss_mask,
                               apply_rtd=lambda value, request: _apply_rtd(model, value, request))


def _apply_rtd(model: Any, value: Any, request: _core.Request) -> None:
    # A Datastore or an RTD: each knows how to check itself against this
    # model and set the native request's retrieval fields.
    apply = getattr(value, "_apply", None)
    if apply is None:
        raise TypeError(f"rtd must be a Datastore or an RTD, got {type(value).__name__}")
    apply(model, request)


def _tokens_and_mask(model: Any, prompt: Any, slot: SlotOptions, chat_template: Optional[str],
                     system: Optional[str]) -> tuple[list[int], Optional[list[bool]]]:
    if slot.loss_on == "user":
        return model.user_loss_mask(prompt, chat_template=chat_template, system=system)
    tokens = model.prompt_tokens(prompt, chat_template=chat_template, system=system)
    return tokens, _tokens_loss_mask(model, tokens, slot)


def _tokens_loss_mask(model: Any, tokens: list[int], slot: SlotOptions) -> Optional[list[bool]]:
    # The masks that the tokens alone decide ("user" needs the messages).
    return model.last_block_loss_mask(tokens) if slot.loss_on == "last" else None


def _batch_prompt_tokens(model: Any, prompt: Any, index: int, chat_template: Optional[str],
                         system: Optional[str], *, label: bool = True) -> list[int]:
    if (isinstance(prompt, Sequence) and not isinstance(prompt, (str, bytes)) and len(prompt) > 0
            and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)):
        return model.check_tokens(prompt)
    if isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
        if prompt.size == 0:
            raise ValueError(f"prompt {index} is empty" if label else "the prompt is empty")
        return model.check_tokens(prompt.tolist())
    return model.prompt_tokens(prompt, chat_template=chat_template, system=system)


def _labelled(exc: Exception, index: int) -> Exception:
    """The error with the index of the prompt it is about."""
    message = str(exc)
    return type(exc)(message if message.startswith(f"prompt {index}") else f"prompt {index}: {message}")


def _split_per_prompt(key: str, value: Any, count: int) -> list[Any]:
    """One value per prompt: `value` itself for all, or its items when it is given per prompt."""
    if key == "delta":
        if isinstance(value, np.ndarray) and value.ndim == 2:
            per = list(value)
        elif isinstance(value, (list, tuple)) and not all(isinstance(v, (int, float, np.number)) for v in value):
            per = list(value)
        else:
            return [value] * count
    elif key == "logit_bias":
        # Per prompt: a list of mappings (or None); otherwise one bias for all.
        nested = (isinstance(value, (list, tuple)) and len(value) > 0
                  and all(v is None or isinstance(v, Mapping) for v in value))
        if not nested:
            return [value] * count
        per = list(value)
    elif key in ("stop", "response_prefix", "score_tokens"):
        nested = (isinstance(value, (list, tuple)) and len(value) > 0
                  and all(v is None or (isinstance(v, (list, tuple)) and not isinstance(v, str)) for v in value))
        if not nested:
            return [value] * count
        per = [(() if key == "stop" else None) if v is None else v for v in value]
    elif isinstance(value, (list, tuple)):
        per = list(value)
    else:
        return [value] * count
    if len(per) != count:
        raise ValueError(f"{key} is given per prompt with {len(per)} values for {count} prompts")
    return per


def _result(raw: _core.RawResult, request: _core.Request) -> GenerationResult:
    logprobs = [float(x) for x in raw.token_logprobs] if request.logprobs else None
    top = ([[(int(t), float(lp)) for t, lp in step] for step in raw.top_logprobs]
           if request.top_logprobs > 0 else None)
    return GenerationResult(
        text=raw.text_bytes.decode("utf-8", "replace"),
        tokens=list(raw.tokens),
        finish_reason=raw.finish_reason,
        delta=raw.delta,
        losses=list(raw.losses),
        steps_done=raw.steps_done,
        slot_status=raw.slot_status,
        slot_path=raw.slot_path,
        slot_cache_bytes=raw.slot_cache_bytes,
        prompt_tokens=raw.prompt_tokens,
        timings=Timings(raw.prefill_seconds, raw.optimise_seconds, raw.generate_seconds),
        slot_profile=dict(raw.slot_profile),
        cached_tokens=raw.cached_tokens,
        drafted_tokens=raw.drafted_tokens,
        accepted_tokens=raw.accepted_tokens,
        lr=float(raw.slot_lr),
        calibration=[(float(a), float(b)) for a, b in zip(raw.calibration_lrs, raw.calibration_kls)],
        calibration_seconds=float(raw.calibration_seconds),
        slot_loss_bound=float(raw.slot_loss_bound),
        slot_cache_mean_k=float(raw.slot_cache_mean_k),
        seed=raw.seed,
        token_logprobs=logprobs,
        top_logprobs=top,
        score_logprobs=[float(x) for x in raw.score_logprobs] if request.score_tokens else None,
        prompt_logprobs=[float(x) for x in raw.prompt_logprobs] if request.prompt_logprobs else None,
        hidden=raw.hidden,
    )


class TextStream:
    """Iterator over generated text pieces; ``result`` holds the full result after it ends."""

    _DONE = object()

    def __init__(self, model: Any, prompt: Any, kwargs: dict[str, Any]) -> None:
        self._queue: "queue.Queue[object]" = queue.Queue()
        self._cancel = threading.Event()
        self.result: Optional[GenerationResult] = None
        self._error: Optional[BaseException] = None

        def on_text(piece: str) -> bool:
            self._queue.put(piece)
            return not self._cancel.is_set()

        def work() -> None:
            try:
                self.result = model.generate_with_slot(prompt, on_text=on_text, **kwargs)
            except BaseException as exc:  # re-raised in the consumer
                self._error = exc
            finally:
                self._queue.put(self._DONE)

        self._thread = threading.Thread(target=work, name="slot_cpp-stream", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    break
                assert isinstance(item, str)
                yield item
        finally:
            self._cancel.set()
            self._thread.join()
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self._cancel.set()


def options_section() -> str:
    """The options of generate_with_slot's docstring, from their definitions."""
    lines = ["", "        Options (keyword arguments, or fields of the groups given as ``sampling=``, ``slot=`` and "
             "``extras=``; defaults in brackets):", ""]
    for group in opts.GROUPS:
        for name, default, spec in opts.specs(group):
            bound = spec.range_text()
            lines.append(f"        - ``{name}`` [{default!r}]{' ' + bound if bound else ''}: {spec.doc}")
    return "\n".join(lines) + "\n"
