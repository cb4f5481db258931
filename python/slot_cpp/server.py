"""An OpenAI-compatible HTTP server with SLOT, RTD and QAlign as request options.

``slot-cpp serve --model PATH`` (the ``[server]`` extra: FastAPI and uvicorn)
serves ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streamed as server-sent events or not), ``GET /health`` and ``GET /metrics``
(Prometheus text). Concurrent requests decode together on the model's
sequences: each request is one generate call on the shared :class:`Model`,
whose token loop batches every live sequence (continuous batching).

The test-time methods are request-body extensions, reachable with the
official client's ``extra_body``::

    client.chat.completions.create(model=..., messages=...,
        extra_body={"slot": {"steps": 5, "lr": 0.01}})

- ``"slot": {"steps", "lr", "loss_on", "kl_budget"}``: SLOT on the prompt
  before generating; ``"lr": "auto"`` picks the step size per prompt by a
  KL trust region of ``kl_budget`` nats per loss position.
- ``"rtd": {"datastore", "k", "temperature", "lambda"}``: a datastore the
  server was started with (``--rtd NAME=PATH``), by name.
- ``"qalign": {"steps", "beta", "reward"}``: QAlign under a reward the server
  was started with (``--reward NAME=head:PATH`` or ``NAME=judge``); with
  ``"slot"`` and/or ``"rtd"`` beside it, they shape the chain's proposal.
- ``"lmcor": {"corrector", "k", "temperature"}``: the served model makes k
  candidates (greedy + k - 1 samples), and a corrector the server was
  started with (``--corrector NAME=MODEL.gguf[,ADAPTER.gguf]``) writes the
  answer from them and the input (the last user message, or the prompt).

Responses carry what was applied under ``"slot_cpp"``: SLOT's loss per step
and delta norm, RTD's settings, QAlign's acceptance rate and final reward,
LMCor's candidates.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

try:
    import anyio
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("slot_cpp.server needs the server extra: pip install 'slot_cpp[server]'") from exc

from . import _core
from ._model import DEFAULT_KL_BUDGET, GenerationResult, Model

__all__ = [
    "ServerConfig",
    "create_app",
    "parse_named_paths",
    "serve",
]


# ---- configuration -------------------------------------------------------------


@dataclass
class ServerConfig:
    """What a server exposes and its limits."""

    model_id: str
    """The name clients pass as ``model`` (default: the GGUF file's stem)."""
    api_key: Optional[str] = None
    """When set, every /v1 request needs ``Authorization: Bearer <key>``."""
    datastores: dict[str, str] = field(default_factory=dict)
    """RTD datastores by name -> file path (loaded at start-up)."""
    rewards: dict[str, str] = field(default_factory=dict)
    """QAlign rewards by name -> ``head:PATH`` (a linear reward head) or ``judge``."""
    correctors: dict[str, str] = field(default_factory=dict)
    """LMCor correctors by name -> ``MODEL.gguf`` or ``MODEL.gguf,ADAPTER.gguf`` (loaded at start-up)."""
    chat_template: Optional[str] = None
    """A built-in chat template name (or template text) for models without one."""
    max_waiting: int = 16
    """Requests that may wait for a free sequence; one more gets 503."""
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096
    """The largest ``max_tokens`` a request may ask for."""
    max_n: int = 16
    max_qalign_steps: int = 256
    retry_after_seconds: int = 1


def parse_named_paths(items: Optional[list[str]], what: str) -> dict[str, str]:
    """``["name=value", ...]`` -> dict, with clear errors."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} must be NAME=VALUE, got {item!r}")
        if name in out:
            raise ValueError(f"{what} name {name!r} is given twice")
        out[name] = value
    return out


# ---- request bodies --------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlotOptions(_Body):
    steps: int = Field(5, ge=0, le=100)
    lr: Union[Literal["auto"], float] = Field(0.1)
    loss_on: Literal["all", "user"] = "all"
    kl_budget: float = Field(DEFAULT_KL_BUDGET, gt=0.0, le=10.0)


class RtdOptions(_Body):
    datastore: str
    k: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, gt=0.0)
    lambda_: Optional[float] = Field(None, ge=0.0, le=1.0, alias="lambda")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class QAlignOptions(_Body):
    reward: str
    steps: int = Field(16, ge=1)
    beta: float = Field(1.0, gt=0.0)


class LmcorOptions(_Body):
    corrector: str
    input: Optional[str] = None
    """The bare input x the corrector reads (default: the last user message, or the prompt)."""
    k: int = Field(5, ge=1, le=16)
    temperature: float = Field(0.7, gt=0.0, le=2.0)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    cache_prompt: bool = True
    slot: Optional[SlotOptions] = None
    rtd: Optional[RtdOptions] = None
    qalign: Optional[QAlignOptions] = None
    lmcor: Optional[LmcorOptions] = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int], list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# ---- errors ------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", param
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


# ---- metrics ---------------------------------------------------------------------


class Metrics:
    """Counters exposed at /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.methods = {"slot": 0, "rtd": 0, "qalign": 0, "lmcor": 0}
        self.in_flight = 0
        self.recent: list[tuple[float, int]] = []  # (time, completion tokens) of the last minute

    def record(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, prompt: int, completion: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.recent.append((now, completion))
            self.recent = [(t, c) for t, c in self.recent if now - t <= 60.0]

    def render(self, model: Model) -> str:
        stats = model.stats()
        now = time.monotonic()
        with self.lock:
            recent = sum(c for t, c in self.recent if now - t <= 60.0)
            window = min(60.0, max(now - self.started, 1e-9))
            lines = [
                "# HELP slot_cpp_requests_total HTTP requests by endpoint and status.",
                "# TYPE slot_cpp_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'slot_cpp_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            lines += [
                "# HELP slot_cpp_prompt_tokens_total Prompt tokens of completed requests.",
                "# TYPE slot_cpp_prompt_tokens_total counter",
                f"slot_cpp_prompt_tokens_total {self.prompt_tokens}",
                "# HELP slot_cpp_completion_tokens_total Generated tokens of completed requests.",
                "# TYPE slot_cpp_completion_tokens_total counter",
                f"slot_cpp_completion_tokens_total {self.completion_tokens}",
                "# HELP slot_cpp_tokens_per_second Generated tokens per second over the last minute.",
                "# TYPE slot_cpp_tokens_per_second gauge",
                f"slot_cpp_tokens_per_second {recent / window:.3f}",
                "# HELP slot_cpp_requests_in_flight Requests being served now.",
                "# TYPE slot_cpp_requests_in_flight gauge",
                f"slot_cpp_requests_in_flight {self.in_flight}",
                "# HELP slot_cpp_method_requests_total Requests that used a test-time method.",
                "# TYPE slot_cpp_method_requests_total counter",
            ]
            for method, count in sorted(self.methods.items()):
                lines.append(f'slot_cpp_method_requests_total{{method="{method}"}} {count}')
        lines += [
            "# HELP slot_cpp_queue_depth Generate calls waiting for a free sequence.",
            "# TYPE slot_cpp_queue_depth gauge",
            f"slot_cpp_queue_depth {stats.waiting_requests}",
            "# HELP slot_cpp_live_sequences Sequences decoding now.",
            "# TYPE slot_cpp_live_sequences gauge",
            f"slot_cpp_live_sequences {stats.live_sequences}",
            "# HELP slot_cpp_engine_generated_tokens_total Tokens the engine sampled (all calls).",
            "# TYPE slot_cpp_engine_generated_tokens_total counter",
            f"slot_cpp_engine_generated_tokens_total {stats.generated_tokens}",
            "# HELP slot_cpp_engine_cached_prompt_tokens_total Prompt tokens reused from the prompt cache.",
            "# TYPE slot_cpp_engine_cached_prompt_tokens_total counter",
            f"slot_cpp_engine_cached_prompt_tokens_total {stats.cached_tokens}",
        ]
        return "\n".join(lines) + "\n"


# ---- the application ------------------------------------------------------------


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "callback": "stop"}


@dataclass
class _Job:
    """One request, resolved: token ids and generate_batch's keyword arguments."""

    tokens: list[int]
    messages: Optional[list[dict[str, str]]]
    n: int
    kwargs: dict[str, Any]
    applied: dict[str, Any]
    qalign: Optional[QAlignOptions]
    lmcor: Optional[LmcorOptions]
    lmcor_input: Optional[str]
    top_logprobs: int
    want_logprobs: bool


class _State:
    def __init__(self, model: Model, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = Metrics()
        self.datastores: dict[str, Any] = {}
        self.rewards: dict[str, Any] = {}
        self.capacity = model.n_parallel + config.max_waiting
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.created = int(time.time())
        if config.datastores:
            from .rtd import Datastore

            for name, path in config.datastores.items():
                self.datastores[name] = Datastore.load(path, model)
        for name, spec in config.rewards.items():
            self.rewards[name] = _make_reward(model, name, spec)
        self.correctors: dict[str, Any] = {}
        try:
            for name, spec in config.correctors.items():
                self.correctors[name] = _make_corrector(model, name, spec)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Frees the correctors' models (the served model is the caller's)."""
        for corrector in self.correctors.values():
            corrector.model.close()

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.capacity:
                raise ApiError(503, f"the server is serving {self.admitted} requests, its limit; retry later",
                               type="server_overloaded", code="overloaded",
                               headers={"Retry-After": str(self.config.retry_after_seconds)})
            self.admitted += 1
            self.metrics.in_flight = self.admitted

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1
            self.metrics.in_flight = self.admitted


def _make_reward(model: Model, name: str, spec: str) -> Any:
    from . import qalign as qa

    kind, _, arg = spec.partition(":")
    if kind == "head":
        if not arg:
            raise ValueError(f"reward {name!r}: head needs a path (head:PATH)")
        reward = qa.LinearReward.load(arg, model)
        reward.name = name
        return reward
    if kind == "judge":
        return qa.JudgeReward(model, name=name)
    raise ValueError(f"reward {name!r}: unknown kind {kind!r} (expected head:PATH or judge)")


def _make_corrector(model: Model, name: str, spec: str) -> Any:
    from .lmcor import Corrector

    path, _, adapter = spec.partition(",")
    if not path:
        raise ValueError(f"corrector {name!r}: expected MODEL.gguf[,ADAPTER.gguf], got {spec!r}")
    corrector_model = Model(path, n_ctx=2048 * model.n_parallel, n_parallel=model.n_parallel,
                            lora=adapter or None)
    try:
        return Corrector(corrector_model, overflow="drop")
    except BaseException:
        corrector_model.close()
        raise


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > 4:
        raise ApiError(400, "stop may hold at most 4 sequences", param="stop")
    if any(s == "" for s in items):
        raise ApiError(400, "stop sequences must not be empty", param="stop")
    return items


def _check_unsupported(body: _Sampling) -> None:
    if body.presence_penalty != 0.0:
        raise ApiError(400, "presence_penalty is not supported (use repeat_penalty)", param="presence_penalty")
    if body.frequency_penalty != 0.0:
        raise ApiError(400, "frequency_penalty is not supported (use repeat_penalty)", param="frequency_penalty")
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")


def create_app(model: Model, config: Optional[ServerConfig] = None) -> FastAPI:
    """The ASGI application serving ``model``; the caller owns the model."""
    if config is None:
        config = ServerConfig(model_id=Path(model.path).stem)
    state = _State(model, config)
    app = FastAPI(title="slot_cpp", version=getattr(_core, "__version__", "0"), docs_url=None, redoc_url=None)
    app.state.slot_cpp = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Response:
        path = request.url.path
        try:
            if path.startswith("/v1/"):
                if config.api_key is not None:
                    header = request.headers.get("authorization", "")
                    scheme, _, token = header.partition(" ")
                    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                             config.api_key.encode()):
                        raise ApiError(401, "invalid or missing API key", type="authentication_error",
                                       code="invalid_api_key")
                length = request.headers.get("content-length")
                if length is not None:
                    try:
                        too_big = int(length) > config.max_body_bytes
                    except ValueError:
                        raise ApiError(400, "bad Content-Length header") from None
                    if too_big:
                        raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes",
                                       code="request_too_large")
                elif request.method == "POST":
                    body = b""
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > config.max_body_bytes:
                            raise ApiError(413, f"the request body is larger than {config.max_body_bytes} bytes",
                                           code="request_too_large")
                    request._body = body  # read once here; handlers read it from the cache
            response: Response = await call_next(request)
        except ApiError as exc:
            response = exc.response()
        state.metrics.record(path if path in _ENDPOINTS else "other", response.status_code)
        return response

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = model.stats()
        return {"status": "ok", "model": config.model_id, "live_sequences": stats.live_sequences,
                "waiting": stats.waiting_requests}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(state.metrics.render(model), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def model_card(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        _check_unsupported(body)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise ApiError(400, "only response_format type 'text' is supported", param="response_format")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": content})
        try:
            tokens = model.prompt_tokens(messages, chat_template=config.chat_template)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        except _core.SlotError as exc:
            raise ApiError(400, f"the chat template could not format these messages: {exc}",
                           param="messages") from None
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        job = _resolve(state, body, tokens, max_tokens, body.logprobs, top, messages=messages)
        return await _serve(state, request, job, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        _check_unsupported(body)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported (use n, or the qalign extension)", param="best_of")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        try:
            if isinstance(prompt, str):
                if prompt == "":
                    raise ApiError(400, "the prompt is empty", param="prompt")
                tokens = model.tokenize(prompt)
            else:
                if not prompt:
                    raise ApiError(400, "the prompt is empty", param="prompt")
                tokens = model._check_tokens(prompt)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        top = body.logprobs or 0
        job = _resolve(state, body, tokens, body.max_tokens, body.logprobs is not None, top)
        return await _serve(state, request, job, body, chat=False)

    return app


_ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"})


def _model_card(state: _State) -> dict[str, Any]:
    info = state.model.info
    return {"id": state.config.model_id, "object": "model", "created": state.created, "owned_by": "slot_cpp",
            "meta": {"architecture": info.architecture, "n_ctx": state.model.n_ctx,
                     "n_parallel": state.model.n_parallel, "datastores": sorted(state.datastores),
                     "rewards": sorted(state.rewards)}}


def _check_model(state: _State, name: Optional[str]) -> None:
    if name is not None and name != state.config.model_id:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.config.model_id!r}",
                       type="not_found_error", param="model", code="model_not_found")


def _resolve(state: _State, body: _Sampling, tokens: list[int], max_tokens: Optional[int], want_logprobs: bool,
             top_logprobs: int, messages: Optional[list[dict[str, str]]] = None) -> _Job:
    """Checks a request against the server's limits and builds the generate call."""
    config, model = state.config, state.model
    if max_tokens is None:
        max_tokens = max(1, min(config.max_tokens_cap, model.n_ctx - len(tokens)))
        if body.lmcor is not None:
            # k candidates each reserve max_tokens cells: keep them short unless asked.
            max_tokens = min(max_tokens, 256)
    if max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"max_tokens must be <= {config.max_tokens_cap}", param="max_tokens")
    if body.n > config.max_n:
        raise ApiError(400, f"n must be <= {config.max_n}", param="n")
    if len(tokens) + max_tokens > model.n_ctx:
        raise ApiError(400, f"the prompt has {len(tokens)} tokens and max_tokens is {max_tokens}: more than the "
                       f"context window of {model.n_ctx} tokens", param="messages" if isinstance(
                           body, ChatCompletionRequest) else "prompt", code="context_length_exceeded")
    seed = body.seed if body.seed is not None else secrets.randbits(62)
    kwargs: dict[str, Any] = dict(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        min_p=body.min_p, repeat_penalty=body.repeat_penalty, seed=seed, stop=_stop_list(body.stop),
        logprobs=want_logprobs, top_logprobs=top_logprobs, cache_prompt=body.cache_prompt)
    applied: dict[str, Any] = {}
    if body.slot is not None and isinstance(body.slot.lr, float) and not 0.0 < body.slot.lr <= 10.0:
        raise ApiError(400, "slot.lr must be 'auto' or a number in (0, 10]", param="slot.lr")
    if body.slot is not None and body.slot.steps > 0:
        kwargs.update(steps=body.slot.steps, lr=body.slot.lr, kl_budget=body.slot.kl_budget)
        applied["slot"] = {"steps": body.slot.steps, "lr": body.slot.lr, "loss_on": body.slot.loss_on}
        if body.slot.lr == "auto":
            applied["slot"]["kl_budget"] = body.slot.kl_budget
        if body.slot.loss_on == "user":
            if messages is None:
                raise ApiError(400, "slot.loss_on 'user' needs chat messages (/v1/chat/completions)",
                               param="slot.loss_on")
            kwargs.update(loss_on="user", chat_template=config.chat_template)
    if body.rtd is not None:
        from .rtd import RTD

        store = state.datastores.get(body.rtd.datastore)
        if store is None:
            known = ", ".join(sorted(state.datastores)) or "none"
            raise ApiError(400, f"unknown datastore {body.rtd.datastore!r} (this server has: {known})",
                           param="rtd.datastore")
        option = RTD(store, k=body.rtd.k, temperature=body.rtd.temperature, lam=body.rtd.lambda_).resolved()
        kwargs["rtd"] = option
        applied["rtd"] = {"datastore": body.rtd.datastore, "k": option.k, "temperature": option.temperature,
                          "lambda": option.lam}
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
    return _Job(tokens=tokens, messages=messages, n=body.n, kwargs=kwargs, applied=applied, qalign=body.qalign,
                lmcor=body.lmcor, lmcor_input=lmcor_input, top_logprobs=top_logprobs, want_logprobs=want_logprobs)


def _finish(method: str, report: dict[str, Any], n_tokens: int, max_tokens: int) -> str:
    if method == "lmcor":
        return "length" if report["finish_reason"] == "length" else "stop"
    return "stop" if n_tokens < max_tokens else "length"


def _one_answer(method: str, body: _Sampling, want_logprobs: bool) -> None:
    """QAlign and LMCor return one answer, not sampled token by token."""
    if body.n != 1:
        raise ApiError(400, f"{method} returns one answer: n must be 1", param="n")
    if want_logprobs:
        raise ApiError(400, f"logprobs are not available with {method}", param="logprobs")


def _slot_report(result: GenerationResult) -> dict[str, Any]:
    out = {"losses": [float(x) for x in result.losses], "steps_done": result.steps_done,
           "delta_norm": float(result.delta_norm), "status": result.slot_status, "lr_used": result.lr}
    if result.calibration:
        out["calibration"] = [{"lr": lr, "kl": kl} for lr, kl in result.calibration]
    return out


def _piece(model: Model, token: int) -> str:
    return model.detokenize([token])


def _logprobs_chat(model: Model, r: GenerationResult) -> dict[str, Any]:
    content = []
    tops = r.top_logprobs or [[] for _ in r.tokens]
    for tok, lp, top in zip(r.tokens, r.token_logprobs, tops):
        text = _piece(model, tok)
        alternatives = []
        for t, v in top:
            piece = _piece(model, t)
            alternatives.append({"token": piece, "logprob": float(v), "bytes": list(piece.encode())})
        content.append({"token": text, "logprob": float(lp), "bytes": list(text.encode()),
                        "top_logprobs": alternatives})
    return {"content": content}


def _logprobs_text(model: Model, r: GenerationResult) -> dict[str, Any]:
    tokens, offsets, tops = [], [], []
    offset = 0
    for i, tok in enumerate(r.tokens):
        text = _piece(model, tok)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if r.top_logprobs:
            tops.append({_piece(model, t): float(v) for t, v in r.top_logprobs[i]})
    return {"tokens": tokens, "token_logprobs": [float(x) for x in r.token_logprobs],
            "top_logprobs": tops if r.top_logprobs else None, "text_offset": offsets}


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _run_generate(state: _State, job: _Job, on_text: Any, cancel: threading.Event) -> list[GenerationResult]:
    # The user-content loss mask is found from the messages; otherwise the tokens are used as they are.
    prompt: Any = job.messages if job.kwargs.get("loss_on") == "user" else job.tokens
    return state.model.generate_batch([prompt], n=job.n, on_text=on_text, cancel=cancel, **job.kwargs)


def _learn_delta(state: _State, job: _Job, cancel: threading.Event) -> Optional[GenerationResult]:
    """SLOT for methods that sample several answers (QAlign, LMCor): learn delta
    on the prompt once, so that every answer uses it; None without SLOT."""
    kw = job.kwargs
    if not kw.get("steps"):
        return None
    user = kw.get("loss_on") == "user"
    return state.model.generate_batch([job.messages if user else job.tokens], max_tokens=0, steps=kw["steps"],
                                      lr=kw["lr"], loss_on=kw.get("loss_on", "all"), kl_budget=kw["kl_budget"],
                                      chat_template=kw.get("chat_template"), cancel=cancel)[0]


def _applied_beside(job: _Job) -> dict[str, Any]:
    """What a QAlign or LMCor response reports beside the method's own report:
    RTD's settings (SLOT's delta is reported inside the method's report)."""
    return {key: value for key, value in job.applied.items() if key != "slot"}


def _run_qalign(state: _State, job: _Job, cancel: threading.Event) -> tuple[str, int, dict[str, Any]]:
    from .qalign import qalign

    assert job.qalign is not None
    q = job.qalign
    kw = job.kwargs
    shaped = _learn_delta(state, job, cancel)
    delta = None if shaped is None else shaped.delta

    def on_step(step: int, accept_rate: float, reward: float) -> None:
        if cancel.is_set():
            raise _Cancelled()

    result = qalign(state.model, "", prompt_token_ids=job.tokens, reward=state.rewards[q.reward], beta=q.beta,
                    steps=q.steps, max_tokens=kw["max_tokens"], seed=kw["seed"] % (2**32), top_k=kw["top_k"],
                    stop=kw["stop"], delta=delta, rtd=kw.get("rtd"), answer="mbr", on_step=on_step)
    final = result.chain[-1]
    report: dict[str, Any] = {"steps": q.steps, "beta": q.beta, "reward": q.reward,
                              "accept_rate": result.accept_rate, "final_reward": final.reward,
                              "generated_tokens": result.generated_tokens}
    if shaped is not None:
        report["slot"] = _slot_report(shaped)
    return final.text, len(final.tokens), report


def _run_lmcor(state: _State, job: _Job, cancel: threading.Event) -> tuple[str, int, dict[str, Any]]:
    from .lmcor import generate_candidates

    assert job.lmcor is not None and job.lmcor_input is not None
    options = {key: value for key, value in job.kwargs.items()
               if key not in ("temperature", "seed", "logprobs", "top_logprobs", "loss_on", "chat_template", "steps",
                              "lr", "kl_budget")}
    shaped = _learn_delta(state, job, cancel)
    if shaped is not None:
        options["delta"] = shaped.delta
    pool = generate_candidates(state.model, [job.lmcor_input], prompt_tokens=[job.tokens], k=job.lmcor.k,
                               temperature=job.lmcor.temperature, seed=job.kwargs["seed"] % (2**62),
                               cancel=cancel, **options)[0]
    corrector = state.correctors[job.lmcor.corrector]
    answer = corrector.rewrite(job.lmcor_input, pool.texts)
    report = {"corrector": job.lmcor.corrector, "input": job.lmcor_input, "k": job.lmcor.k,
              "temperature": job.lmcor.temperature, "candidates": pool.texts, "dropped": answer.dropped,
              "generator_tokens": pool.generated_tokens, "corrector_tokens": answer.corrector_tokens,
              "finish_reason": answer.finish_reason}
    return answer.text, answer.corrector_tokens, report


class _Cancelled(Exception):
    pass


async def _in_thread(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(fn, *args, limiter=_LIMITER)


_LIMITER = anyio.CapacityLimiter(1024)


async def _serve(state: _State, request: Request, job: _Job, body: _Sampling, *, chat: bool) -> Response:
    state.admit()
    released = False
    try:
        for method in ("slot", "rtd", "qalign", "lmcor"):
            if getattr(body, method) is not None:
                with state.metrics.lock:
                    state.metrics.methods[method] += 1
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        if body.stream:
            released = True  # the response releases its admission when it ends, however it ends
            return _EventStream(_stream(state, job, body, chat=chat, rid=rid, created=created),
                                on_close=state.release)
        cancel = threading.Event()
        try:
            if job.qalign is not None or job.lmcor is not None:
                method, runner = ("qalign", _run_qalign) if job.qalign is not None else ("lmcor", _run_lmcor)
                text, n_tokens, report = await _in_thread(runner, state, job, cancel)
                finish = _finish(method, report, n_tokens, job.kwargs["max_tokens"])
                results_view = [(text, finish, None)]
                completion = n_tokens
                extension: dict[str, Any] = {**_applied_beside(job), method: report}
            else:
                results = await _in_thread(_run_generate, state, job, None, cancel)
                results_view = [(r.text, _FINISH.get(r.finish_reason, "stop"), r) for r in results]
                completion = sum(len(r.tokens) for r in results)
                extension = dict(job.applied)
                if "slot" in extension:
                    extension["slot"] = {**extension["slot"], **_slot_report(results[0])}
        except asyncio.CancelledError:
            cancel.set()
            raise
        finally:
            cancel.set()
        state.metrics.tokens(len(job.tokens), completion)
        choices = []
        for i, (text, finish, r) in enumerate(results_view):
            if chat:
                choice: dict[str, Any] = {"index": i, "message": {"role": "assistant", "content": text},
                                          "finish_reason": finish, "logprobs": None}
                if r is not None and job.want_logprobs:
                    choice["logprobs"] = _logprobs_chat(state.model, r)
            else:
                choice = {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
                if r is not None and job.want_logprobs:
                    choice["logprobs"] = _logprobs_text(state.model, r)
            choices.append(choice)
        out: dict[str, Any] = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                               "created": created, "model": state.config.model_id, "choices": choices,
                               "usage": _usage(len(job.tokens), completion), "system_fingerprint": None}
        if extension:
            out["slot_cpp"] = extension
        return JSONResponse(out)
    except _core.QueueFullError as exc:
        raise ApiError(503, str(exc), type="server_overloaded", code="overloaded",
                       headers={"Retry-After": str(state.config.retry_after_seconds)}) from None
    except _core.ContextLengthError as exc:
        raise ApiError(400, str(exc), code="context_length_exceeded") from None
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None
    finally:
        if not released:
            state.release()


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """A server-sent event stream that runs `on_close` once when the response
    ends: sent, failed, or abandoned by the client before it began."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Any) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _stream(state: _State, job: _Job, body: _Sampling, *, chat: bool, rid: str,
                  created: int) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per text piece, per choice; then the
    finish reasons, the usage (with stream_options.include_usage) and [DONE].
    A client that goes away cancels the call: its sequences are freed at once."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    cancel = threading.Event()
    model_id = state.config.model_id
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: Optional[str], finish: Optional[str], extra: Optional[dict[str, Any]] = None,
              role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        out: dict[str, Any] = {"id": rid, "object": kind, "created": created, "model": model_id,
                               "choices": [choice]}
        if extra:
            out.update(extra)
        return out

    def on_text(index: int, piece: str) -> bool:
        if cancel.is_set():
            return False
        loop.call_soon_threadsafe(events.put_nowait, ("text", (index, piece)))
        return True

    def work() -> None:
        try:
            if job.qalign is not None:
                value: Any = ("qalign", _run_qalign(state, job, cancel))
            elif job.lmcor is not None:
                value = ("lmcor", _run_lmcor(state, job, cancel))
            else:
                value = ("results", _run_generate(state, job, on_text, cancel))
        except BaseException as exc:  # handed to the event loop
            value = ("error", exc)
        try:
            loop.call_soon_threadsafe(events.put_nowait, value)
        except RuntimeError:  # the loop has closed: nobody is listening
            pass

    worker = threading.Thread(target=work, name="slot_cpp-request", daemon=True)
    started = False
    try:
        worker.start()
        started = True
        if chat:
            for i in range(job.n):
                yield _sse(chunk(i, "", None, role=True))
        while True:
            kind_, value = await events.get()
            if kind_ == "text":
                index, piece = value
                yield _sse(chunk(index, piece, None))
                continue
            if kind_ == "error":
                if isinstance(value, _core.GenerationCancelled) or isinstance(value, _Cancelled):
                    return
                status, message, code = 500, f"{type(value).__name__}: {value}", "internal_error"
                if isinstance(value, _core.QueueFullError):
                    status, code = 503, "overloaded"
                elif isinstance(value, (_core.ContextLengthError, ValueError, TypeError)):
                    status, code = 400, "invalid_request"
                yield _sse({"error": {"message": message, "type": "server_error" if status >= 500 else
                                      "invalid_request_error", "param": None, "code": code, "status": status}})
                break
            extension: dict[str, Any] = dict(job.applied)
            if kind_ in ("qalign", "lmcor"):
                text, completion, report = value
                extension = {**_applied_beside(job), kind_: report}
                yield _sse(chunk(0, text, None))
                finishes = [_finish(kind_, report, completion, job.kwargs["max_tokens"])]
            else:
                results: list[GenerationResult] = value
                completion = sum(len(r.tokens) for r in results)
                finishes = [_FINISH.get(r.finish_reason, "stop") for r in results]
                if "slot" in extension:
                    extension["slot"] = {**extension["slot"], **_slot_report(results[0])}
            state.metrics.tokens(len(job.tokens), completion)
            for i, finish in enumerate(finishes):
                extra = {"slot_cpp": extension} if extension and i == len(finishes) - 1 else None
                yield _sse(chunk(i, None if chat else "", finish, extra))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield _sse({"id": rid, "object": kind, "created": created, "model": model_id, "choices": [],
                            "usage": _usage(len(job.tokens), completion)})
            break
        yield b"data: [DONE]\n\n"
    finally:
        cancel.set()
        if started:
            # The call stops within one token step; its sequences are free
            # before the admission is released.
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(worker.join, limiter=_LIMITER)


# ---- running it --------------------------------------------------------------------


def serve(model_path: Union[str, os.PathLike[str], None] = None, *, host: str = "127.0.0.1", port: int = 8080,
          n_parallel: int = 4, n_ctx: int = 0, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
          api_key: Optional[str] = None, datastores: Optional[dict[str, str]] = None,
          rewards: Optional[dict[str, str]] = None, correctors: Optional[dict[str, str]] = None,
          max_waiting: int = 16, max_tokens_cap: int = 4096,
          model_id: Optional[str] = None, chat_template: Optional[str] = None, rpc: Optional[str] = None,
          lora: Optional[list[tuple[str, float]]] = None, log_level: str = "info") -> None:
    """Load a model and serve it until interrupted (binds to 127.0.0.1 unless told otherwise)."""
    if n_ctx == 0:
        n_ctx = 2048 * n_parallel
    model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_parallel=n_parallel,
                  max_waiting=0, rpc=rpc, lora=lora)
    try:
        config = ServerConfig(model_id=model_id or Path(model.path).stem, api_key=api_key,
                              datastores=datastores or {}, rewards=rewards or {}, correctors=correctors or {},
                              max_waiting=max_waiting, max_tokens_cap=max_tokens_cap, chat_template=chat_template)
        app = create_app(model, config)
        try:
            uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        finally:
            app.state.slot_cpp.close()
    finally:
        model.close()


