"""The serving pipeline: a request resolved into a :class:`Job`, run once, rendered twice.

:func:`resolve` checks a request body against the server's limits and
builds the option groups of the generate call, once: the groups reach the
Model as they are. :func:`run_job` is the one place that dispatches
to plain generation, QAlign or LMCor; its events are text pieces while
plain generation decodes (QAlign and LMCor have their text only at the
end: one piece), then one :class:`Finished` with the finish reasons, the
usage and the ``slot_cpp`` report. :func:`respond` runs it on a worker
thread and renders the events either as the whole JSON response or as a
server-sent event stream, so that both carry the same answer.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Callable, Optional, Union

import anyio
import orjson
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .. import options as opts
from .._model import GenerationResult
from ..chat import ChatFormat, ReasoningDelta, ToolCallDelta
from .errors import ApiError, RequestCancelled, error_from
from .protocol import (
    ChatCompletionRequest,
    LmcorOptions,
    QAlignOptions,
    Reply,
    SamplingRequest,
    logprobs_chat,
    logprobs_text,
    usage,
)

from .state import State

METHODS = ("slot", "rtd", "qalign", "lmcor")
"""The request-body extensions, as counted by the metrics."""

# The engine's finish reasons -> OpenAI's ("callback": the stream's client stopped reading).
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "callback": "stop"}

# Each ending request waits for its worker in a pool thread; anyio's default
# pool of 40 would make ending requests wait in line behind each other.
_LIMITER = anyio.CapacityLimiter(1024)

_MAX_EVENTS_PER_WRITE = 64

OnText = Callable[[int, str], bool]
"""``on_text(choice index, piece) -> keep going``."""


# ---- resolving a request ------------------------------------------------------------


@dataclass
class Job:
    """One request, resolved: token ids and the option groups of the generate call."""

    tokens: list[int]
    messages: Optional[list[dict[str, str]]]
    n: int
    sampling: opts.SamplingOptions
    slot: opts.SlotOptions
    """SLOT as asked (``steps`` 0 without it)."""
    extras: opts.RequestExtras
    chat_template: Optional[str]
    """For slot.loss_on 'user': the template that formats the messages."""
    applied: dict[str, Any]
    qalign: Optional[QAlignOptions]
    lmcor: Optional[LmcorOptions]
    lmcor_input: Optional[str]
    want_logprobs: bool
    echo: Optional[str] = None
    """Completions with echo: the prompt's text, put before each answer."""
    chat_format: Optional[ChatFormat] = None
    """A chat: its answers follow the format's grammar; with tools or
    reasoning (``needs_parser``) each is read into content, reasoning and tool calls."""


def resolve(state: State, body: SamplingRequest, tokens: list[int], max_tokens: Optional[int],
            want_logprobs: bool, top_logprobs: int, messages: Optional[list[dict[str, str]]] = None,
            echo: Optional[str] = None, chat_format: Optional[ChatFormat] = None) -> Job:
    """Checks a request against the server's limits and builds the generate call."""
    config, model = state.config, state.model
    if max_tokens is None:
        max_tokens = max(1, min(config.max_tokens_cap, model.seq_capacity - len(tokens)))
        if body.lmcor is not None:
            # k candidates each reserve max_tokens cells: keep them short unless asked.
            max_tokens = min(max_tokens, 256)
    if max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"max_tokens must be <= {config.max_tokens_cap}", param="max_tokens")
    if body.n > config.max_n:
        raise ApiError(400, f"n must be <= {config.max_n}", param="n")
    if len(tokens) + max_tokens > model.seq_capacity:
        raise ApiError(400, f"the prompt has {len(tokens)} tokens and max_tokens is {max_tokens}: more than the "
                       f"context window of {model.seq_capacity} tokens", param="messages" if isinstance(
                           body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    stop = _stop_list(body.stop)
    sampling = _group(lambda: opts.group_from_http(
        body, opts.SamplingOptions, max_tokens=max_tokens, stop=stop,
        **({"seed": secrets.randbits(62)} if body.seed is None else {})))
    slot = _NO_SLOT
    chat_template = None
    rtd = None
    applied: dict[str, Any] = {}
    if body.slot is not None and body.slot.steps > 0:
        slot = _group(lambda: opts.group_from_http(body.slot, opts.SlotOptions), "slot.")
        applied["slot"] = {"steps": body.slot.steps, "lr": body.slot.lr, "loss_on": body.slot.loss_on}
        if body.slot.lr == "auto":
            applied["slot"]["kl_budget"] = body.slot.kl_budget
        if body.slot.loss_on == "user":
            if messages is None:
                raise ApiError(400, "slot.loss_on 'user' needs chat messages (/v1/chat/completions)",
                               param="slot.loss_on")
            chat_template = config.chat_template
    if body.rtd is not None:
        from ..rtd import RTD

        store = state.datastores.get(body.rtd.datastore)
        if store is None:
            known = ", ".join(sorted(state.datastores)) or "none"
            raise ApiError(400, f"unknown datastore {body.rtd.datastore!r} (this server has: {known})",
                           param="rtd.datastore")
        rtd = RTD(**{**opts.from_http(body.rtd, opts.RtdOptions), "datastore": store}).resolved()
        applied["rtd"] = {"datastore": body.rtd.datastore, "k": rtd.k, "temperature": rtd.temperature,
                          "lambda": rtd.lam, "gate": rtd.gate}
    if body.qalign is not None:
        q = body.qalign
        if q.reward not in state.rewards:
            known = ", ".join(sorted(state.rewards)) or "none"
            raise ApiError(400, f"unknown reward {q.reward!r} (this server has: {known})", param="qalign.reward")
        if q.steps > config.max_qalign_steps:
            raise ApiError(400, f"qalign steps must be <= {config.max_qalign_steps}", param="qalign.steps")
        _one_answer("qalign", body, want_logprobs)
        if model.n_parallel < 2:
            raise ApiError(400, "qalign needs a server started with --n-parallel >= 2", param="qalign")
    lmcor_input = None
    if body.lmcor is not None:
        if body.lmcor.corrector not in state.correctors:
            known = ", ".join(sorted(state.correctors)) or "none"
            raise ApiError(400, f"unknown corrector {body.lmcor.corrector!r} (this server has: {known})",
                           param="lmcor.corrector")
        _one_answer("lmcor", body, want_logprobs)
        if body.qalign is not None:
            raise ApiError(400, "lmcor with qalign is not supported", param="lmcor")
        if body.lmcor.input is not None:
            lmcor_input = body.lmcor.input
        elif messages is not None:
            users = [m["content"] for m in messages if m["role"] == "user"]
            lmcor_input = users[-1] if users else ""
        else:
            lmcor_input = model.detokenize(tokens)
    if echo is not None and want_logprobs:
        # The prompt's own log-probabilities, from the prefill of plain generation.
        methods = (["slot"] if "slot" in applied else []) + [
            m for m in ("rtd", "qalign", "lmcor") if getattr(body, m) is not None]
        if methods:
            raise ApiError(400, f"echo with logprobs is not available with {methods[0]}", param="echo")
        if len(tokens) < 2:
            raise ApiError(400, "echo with logprobs needs a prompt of at least two tokens", param="echo")
    extras = _group(lambda: opts.group_from_http(
        body, opts.RequestExtras, logprobs=want_logprobs, top_logprobs=top_logprobs, rtd=rtd,
        chat_format=chat_format, prompt_logprobs=echo is not None and want_logprobs))
    return Job(tokens=tokens, messages=messages, n=body.n, sampling=sampling, slot=slot, extras=extras,
               chat_template=chat_template, applied=applied, qalign=body.qalign, lmcor=body.lmcor,
               lmcor_input=lmcor_input, want_logprobs=want_logprobs, echo=echo, chat_format=chat_format)


_NO_SLOT = opts.SlotOptions(steps=0)
_SCORE_ONLY = opts.SamplingOptions(max_tokens=0)
"""Learning delta alone: no tokens generated."""


def _group(make: Callable[[], Any], prefix: str = "") -> Any:
    """A group made from a request, its own check's error a 400 naming the field."""
    try:
        return make()
    except (TypeError, ValueError) as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        raise ApiError(400, message, param=prefix + name if name.isidentifier() else None) from None


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 4:
        raise ApiError(400, "stop may hold at most 4 sequences", param="stop")
    return items  # empty strings: refused by SamplingOptions' own check


def _one_answer(method: str, body: SamplingRequest, want_logprobs: bool) -> None:
    """QAlign and LMCor return one answer, not sampled token by token."""
    if body.n != 1:
        raise ApiError(400, f"{method} returns one answer: n must be 1", param="n")
    if want_logprobs:
        raise ApiError(400, f"logprobs are not available with {method}", param="logprobs")


# ---- running a job -------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """Text decoded for one choice."""

    index: int
    text: str


@dataclass(frozen=True)
class ChoiceResult:
    text: str
    finish_reason: str
    result: Optional[GenerationResult]
    """Plain generation's result (its token logprobs); None for QAlign and LMCor."""


@dataclass(frozen=True)
class Finished:
    """The last event of a job: what a response reports beside the text."""

    choices: list[ChoiceResult]
    prompt_tokens: int
    completion_tokens: int
    extension: dict[str, Any]
    """The ``slot_cpp`` report: what was applied, and how it went."""
    cached_tokens: int = 0
    """Prompt tokens taken from the prompt cache."""
    timings: Optional[dict[str, float]] = None
    """llama-server's ``timings`` (plain generation): prompt and predicted tokens, milliseconds and rates."""


Event = Union[Piece, Finished]


def run_job(state: State, job: Job, on_text: Optional[OnText], cancel: threading.Event) -> Finished:
    """Runs a job (blocking) with the method it asks for. Plain generation
    hands its pieces to ``on_text`` as they decode; QAlign and LMCor choose
    their answer at the end, so it comes as one piece."""
    if job.qalign is None and job.lmcor is None:
        results = _run_generate(state, job, on_text, cancel)
        extension = dict(job.applied)
        if "slot" in extension:
            extension["slot"] = {**extension["slot"], **_slot_report(results[0])}
        completion = sum(len(r.tokens) for r in results)
        return Finished(choices=[ChoiceResult(r.text, _FINISH.get(r.finish_reason, "stop"), r) for r in results],
                        prompt_tokens=len(job.tokens), completion_tokens=completion, extension=extension,
                        cached_tokens=results[0].cached_tokens, timings=_timings(results, completion))
    method, runner = ("qalign", _run_qalign) if job.qalign is not None else ("lmcor", _run_lmcor)
    text, n_tokens, report = runner(state, job, cancel)
    if on_text is not None:
        on_text(0, text)
    if method == "lmcor":
        finish = "length" if report["finish_reason"] == "length" else "stop"
    else:
        finish = "stop" if n_tokens < job.sampling.max_tokens else "length"
    # SLOT's delta is reported inside the method's own report; RTD's settings beside it.
    extension = {key: value for key, value in job.applied.items() if key != "slot"}
    extension[method] = report
    return Finished(choices=[ChoiceResult(text, finish, None)], prompt_tokens=len(job.tokens),
                    completion_tokens=n_tokens, extension=extension)


def _timings(results: list[GenerationResult], completion: int) -> dict[str, float]:
    """llama-server's ``timings`` object: the prompt's evaluation (what the
    cache did not hold) and the answers' decoding, in milliseconds."""
    first = results[0]
    prompt_n = first.prompt_tokens - first.cached_tokens
    prompt_ms = 1000.0 * first.timings.prefill
    predicted_ms = 1000.0 * max(r.timings.generate for r in results)

    def per(n: float, ms: float) -> tuple[float, float]:
        return (ms / n if n else 0.0), (1000.0 * n / ms if ms > 0 else 0.0)

    prompt_per_token, prompt_per_second = per(prompt_n, prompt_ms)
    predicted_per_token, predicted_per_second = per(completion, predicted_ms)
    out = {"cache_n": first.cached_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
           "prompt_per_token_ms": prompt_per_token, "prompt_per_second": prompt_per_second,
           "predicted_n": completion, "predicted_ms": predicted_ms, "predicted_per_token_ms": predicted_per_token,
           "predicted_per_second": predicted_per_second}
    drafted = sum(r.drafted_tokens for r in results)
    if drafted:  # llama-server's names
        out["draft_n"] = drafted
        out["draft_n_accepted"] = sum(r.accepted_tokens for r in results)
    return out


def _slot_report(result: GenerationResult) -> dict[str, Any]:
    out = {"losses": [float(x) for x in result.losses], "steps_done": result.steps_done,
           "delta_norm": float(result.delta_norm), "status": result.slot_status, "lr_used": result.lr}
    if result.calibration:
        out["calibration"] = [{"lr": lr, "kl": kl} for lr, kl in result.calibration]
    return out


def _run_generate(state: State, job: Job, on_text: Optional[OnText],
                  cancel: threading.Event) -> list[GenerationResult]:
    # The user-content loss mask is found from the messages; otherwise the tokens are used as they are.
    prompt: Any = job.messages if job.slot.loss_on == "user" else job.tokens
    return state.model.generate_batch([prompt], n=job.n, on_text=on_text, cancel=cancel,
                                      chat_template=job.chat_template, sampling=job.sampling, slot=job.slot,
                                      extras=job.extras)


def _learn_delta(state: State, job: Job, cancel: threading.Event) -> Optional[GenerationResult]:
    """SLOT for methods that sample several answers (QAlign, LMCor): learn delta
    on the prompt once, so that every answer uses it; None without SLOT."""
    if not job.slot.steps:
        return None
    user = job.slot.loss_on == "user"
    return state.model.generate_batch([job.messages if user else job.tokens], chat_template=job.chat_template,
                                      cancel=cancel, sampling=_SCORE_ONLY, slot=job.slot)[0]


def _run_qalign(state: State, job: Job, cancel: threading.Event) -> tuple[str, int, dict[str, Any]]:
    from ..qalign import PROPOSAL, qalign

    assert job.qalign is not None
    q = job.qalign
    sampling = job.sampling
    shaped = _learn_delta(state, job, cancel)
    delta = None if shaped is None else shaped.delta

    def on_step(step: int, accept_rate: float, reward: float) -> None:
        if cancel.is_set():
            raise RequestCancelled()

    # The proposal is the model's own distribution; the request may restrict it.
    proposal = PROPOSAL.replace(max_tokens=sampling.max_tokens, seed=sampling.seed % (2**32), top_k=sampling.top_k,
                                stop=sampling.stop, grammar=sampling.grammar, json_schema=sampling.json_schema)
    result = qalign(state.model, "", prompt_token_ids=job.tokens, reward=state.rewards[q.reward],
                    options=opts.QAlignOptions(steps=q.steps, beta=q.beta), sampling=proposal, delta=delta,
                    rtd=job.extras.rtd, answer="mbr", on_step=on_step)
    final = result.chain[-1]
    report: dict[str, Any] = {"steps": q.steps, "beta": q.beta, "reward": q.reward,
                              "accept_rate": result.accept_rate, "final_reward": final.reward,
                              "generated_tokens": result.generated_tokens}
    if shaped is not None:
        report["slot"] = _slot_report(shaped)
    return final.text, len(final.tokens), report


def _run_lmcor(state: State, job: Job, cancel: threading.Event) -> tuple[str, int, dict[str, Any]]:
    from ..lmcor import generate_candidates

    assert job.lmcor is not None and job.lmcor_input is not None
    # The candidates are drawn as the request's sampling says, but for its
    # temperature and seeds, which are LMCor's; SLOT's delta is learned once, above.
    shaped = _learn_delta(state, job, cancel)
    pool = generate_candidates(state.model, [job.lmcor_input], prompt_tokens=[job.tokens],
                               options=opts.LmcorOptions(k=job.lmcor.k, temperature=job.lmcor.temperature),
                               sampling=job.sampling, seed=job.sampling.seed % (2**62), cancel=cancel,
                               cache_prompt=job.extras.cache_prompt, rtd=job.extras.rtd,
                               delta=None if shaped is None else shaped.delta)[0]
    corrector = state.correctors[job.lmcor.corrector]
    answer = corrector.rewrite(job.lmcor_input, pool.texts)
    report = {"corrector": job.lmcor.corrector, "input": job.lmcor_input, "k": job.lmcor.k,
              "temperature": job.lmcor.temperature, "candidates": pool.texts, "dropped": answer.dropped,
              "generator_tokens": pool.generated_tokens, "corrector_tokens": answer.corrector_tokens,
              "finish_reason": answer.finish_reason}
    return answer.text, answer.corrector_tokens, report


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class _Run:
    """A job on its own worker thread, as an async iterator of its events.

    Generation blocks, so it runs in a thread. Its events go into a deque,
    and the event loop is woken once for whatever has piled up since it
    last looked (not once per token): :attr:`pending` tells a consumer that
    more events are ready, so that it can write them out together. Leaving
    the ``async with`` however it is left (finished, failed, or the client
    gone) cancels the call and waits for the thread: the call stops within
    one token step, so the job's sequences are free when the block exits."""

    def __init__(self, state: State, job: Job, *, pieces: bool) -> None:
        self._state, self._job, self._pieces = state, job, pieces
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._done = False
        self._events: collections.deque[Union[Event, _Failed]] = collections.deque()
        self._wake_pending = False

    async def __aenter__(self) -> _Run:
        loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._thread = threading.Thread(target=self._work, args=(loop,), name="slot_cpp-request", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._cancel.set()
        if self._thread is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._thread.join, limiter=_LIMITER)

    def _wake(self) -> None:  # on the event loop
        self._wake_pending = False
        self._ready.set()

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        events, cancel = self._events, self._cancel

        def push(item: Union[Event, _Failed]) -> None:
            events.append(item)
            if not self._wake_pending:  # one wake-up for everything queued until the loop runs it
                self._wake_pending = True
                try:
                    loop.call_soon_threadsafe(self._wake)
                except RuntimeError:  # the loop has closed: nobody is listening
                    pass

        def on_text(index: int, piece: str) -> bool:
            if cancel.is_set():
                return False  # stops the call (finish reason "callback")
            push(Piece(index, piece))
            return True

        try:
            # Without pieces (the whole response), no per-token hop to the loop.
            outcome: Union[Finished, _Failed] = run_job(self._state, self._job, on_text if self._pieces else None,
                                                        cancel)
        except BaseException as exc:  # handed to the event loop
            outcome = _Failed(exc)
        push(outcome)

    @property
    def pending(self) -> bool:
        """Whether another event is ready now."""
        return bool(self._events)

    def __aiter__(self) -> _Run:
        return self

    async def __anext__(self) -> Event:
        if self._done:
            raise StopAsyncIteration
        while not self._events:
            self._ready.clear()
            if self._events:
                break
            await self._ready.wait()
        event = self._events.popleft()
        if isinstance(event, _Failed):
            self._done = True
            raise event.error
        if isinstance(event, Finished):
            self._done = True
            self._state.metrics.tokens(event.prompt_tokens, event.completion_tokens)
        return event


# ---- rendering ----------------------------------------------------------------------


async def respond(state: State, job: Job, body: SamplingRequest, *, chat: bool) -> Response:
    """Admits the request (503 when full), then answers it whole or as a stream."""
    state.admit()
    streaming = False
    try:
        state.metrics.used(method for method in METHODS if getattr(body, method) is not None)
        reply = Reply.new(state.config.model_id, chat=chat)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            response = EventStream(_stream(state, job, reply, include_usage), on_close=state.release)
            streaming = True  # the response releases its admission when it ends, however it ends
            return response
        try:
            return JSONResponse(await _whole(state, job, reply))
        except Exception as exc:
            error = error_from(exc, retry_after=state.config.retry_after_seconds)
            if error is None:
                raise
            raise error from None
    finally:
        if not streaming:
            state.release()


async def _whole(state: State, job: Job, reply: Reply) -> dict[str, Any]:
    finished: Optional[Finished] = None
    async with _Run(state, job, pieces=False) as run:
        async for event in run:
            if isinstance(event, Finished):
                finished = event
    assert finished is not None
    def logprobs(result: Optional[GenerationResult]) -> Optional[dict[str, Any]]:
        if result is None or not job.want_logprobs:
            return None
        if reply.chat:
            return logprobs_chat(state.model, result)
        return logprobs_text(state.model, result, job.tokens if job.echo is not None else None)

    choices = []
    for i, c in enumerate(finished.choices):
        message, finish = None, c.finish_reason
        if job.chat_format is not None and job.chat_format.needs_parser:
            read = job.chat_format.parse(c.text)
            message = read.openai()
            if read.tool_calls:
                finish = "tool_calls"
        choices.append(reply.choice(i, (job.echo or "") + c.text, finish, logprobs(c.result), message))
    return reply.whole(choices, usage(finished.prompt_tokens, finished.completion_tokens, finished.cached_tokens),
                       finished.extension, finished.timings)


async def _stream(state: State, job: Job, reply: Reply, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """Server-sent events: one chunk per text piece, per choice; then the
    finish reasons (the last one with the ``slot_cpp`` report), the usage
    (with stream_options.include_usage) and [DONE]. The events that are
    ready together go out in one write. An error after the 200 is sent as
    an event; a cancelled call ends the stream without [DONE]."""
    out: list[bytes] = []
    try:
        async with _Run(state, job, pieces=True) as run:
            if reply.chat:
                for i in range(job.n):
                    out.append(_sse(reply.chunk(i, "", None, role=True)))
            elif job.echo:
                for i in range(job.n):
                    out.append(_sse(reply.chunk(i, job.echo, None)))
            if out:
                yield b"".join(out)
                out.clear()
            # With tools or reasoning each choice's text so far is read again at each piece.
            readers = [(job.chat_format.stream(), [""]) for _ in range(job.n)] \
                if job.chat_format is not None and job.chat_format.needs_parser else None
            async for event in run:
                if isinstance(event, Piece):
                    if readers is None:
                        out.append(reply.piece_event(event.index, event.text))
                    else:
                        stream, text = readers[event.index]
                        text[0] += event.text
                        out.extend(_sse(_delta_chunk(reply, event.index, delta)) for delta in stream.update(text[0]))
                    # What is ready goes out together, at most a bounded batch at a time.
                    if out and (not run.pending or len(out) >= _MAX_EVENTS_PER_WRITE):
                        yield b"".join(out)
                        out.clear()
                    continue
                last = len(event.choices) - 1
                for i, choice in enumerate(event.choices):
                    finish = choice.finish_reason
                    if readers is not None:
                        stream, text = readers[i]
                        for delta in stream.update(choice.text, final=True):
                            out.append(_sse(_delta_chunk(reply, i, delta)))
                        if stream.message.tool_calls:
                            finish = "tool_calls"
                    out.append(_sse(reply.chunk(i, None, finish, extension=event.extension if i == last else None,
                                                timings=event.timings if i == last else None)))
                if include_usage:
                    out.append(_sse(reply.usage_chunk(usage(event.prompt_tokens, event.completion_tokens,
                                                            event.cached_tokens))))
    except Exception as exc:
        error = error_from(exc, retry_after=state.config.retry_after_seconds)
        if error is None:
            if out:
                yield b"".join(out)
            return
        out.append(_sse(error.event()))
    out.append(b"data: [DONE]\n\n")
    yield b"".join(out)


def _delta_chunk(reply: Reply, index: int, delta: Union[str, ReasoningDelta, ToolCallDelta]) -> dict[str, Any]:
    if isinstance(delta, str):
        return reply.chunk(index, delta, None)
    if isinstance(delta, ReasoningDelta):
        return reply.chunk(index, None, None, reasoning=delta)
    return reply.chunk(index, None, None, tool_call=delta)


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data, default=_plain, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n\n"


def _plain(value: Any) -> Any:
    """numpy scalars (a report's numbers) as Python numbers."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` once when the response
    ends: sent, failed, or abandoned by the client before it began."""

    def __init__(self, content: AsyncGenerator[bytes, None], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._content = content
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                # A stream left at a yield still holds its call: closing it
                # cancels the call and waits for its sequences to be freed.
                with anyio.CancelScope(shield=True):
                    await self._content.aclose()
            finally:
                self._on_close()
