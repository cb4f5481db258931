"""The application: configuration, routes, the guard in front of /v1, and :func:`serve`."""

from __future__ import annotations

import base64
import hmac
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import anyio
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import _core
from .. import options as opts
from .._model import Model
from ..chat import ChatFormat, format_chat
from .errors import ApiError, internal_error, overloaded, validation_message
from .metrics import Metrics
from .protocol import (ERROR_RESPONSES, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       EmbeddingRequest, TokenizeRequest)
from .serving import resolve, respond

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
    pooling: str = "mean"
    """How /v1/embeddings pools a text's final hidden states: "mean" or "last" (see Model.embed)."""
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


# ---- state -------------------------------------------------------------------------


class _State:
    """What the routes share: the model, what was loaded at start-up, the
    metrics, and the admission count."""

    def __init__(self, model: Model, config: ServerConfig) -> None:
        self.model = model
        self.config = config
        self.metrics = Metrics()
        self.datastores: dict[str, Any] = {}
        self.rewards: dict[str, Any] = {}
        # Requests beyond the live sequences and the waiting room get 503 at
        # once, rather than queueing without bound.
        self.capacity = model.n_parallel + config.max_waiting
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.created = int(time.time())
        if config.datastores:
            from ..rtd import Datastore

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
                raise overloaded(f"the server is serving {self.admitted} requests, its limit; retry later",
                                 self.config.retry_after_seconds)
            self.admitted += 1
            self.metrics.in_flight = self.admitted

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1
            self.metrics.in_flight = self.admitted


def _make_reward(model: Model, name: str, spec: str) -> Any:
    from .. import qalign as qa

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
    from ..lmcor import Corrector

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


# ---- the application ------------------------------------------------------------


_ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
                        "/detokenize", "/health", "/metrics"})
"""Paths the metrics count by name; any other path counts as "other"."""
_GUARDED = ("/v1/", "/tokenize", "/detokenize")
"""Path prefixes that read the model: they need the API key when one is set."""


def _tool_format(state: _State, body: Any, messages: list[dict[str, Any]], has_response_format: bool) -> ChatFormat:
    """A chat with tools (or tool calls and results in its history), rendered
    by the model's Jinja template through llama.cpp's common/chat."""
    for method in ("qalign", "lmcor"):
        if getattr(body, method) is not None:
            raise ApiError(400, f"tools are not available with {method}", param="tools")
    if body.slot is not None and body.slot.loss_on == "user":
        raise ApiError(400, "slot.loss_on 'user' is not available with tools", param="slot.loss_on")
    constrained = has_response_format or body.grammar is not None or body.json_schema is not None
    if constrained and body.tools:
        raise ApiError(400, "give tools or a response format/grammar, not both", param="tools")
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
    choice: Any = "auto" if body.tool_choice is None else (
        body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump())
    if not tools and choice == "auto":
        choice = "none"
    # A Jinja template given at start-up (a built-in name is for the plain chat path).
    template = state.config.chat_template if state.config.chat_template and "{" in state.config.chat_template \
        else None
    try:
        return format_chat(state.model, messages, tools=tools, tool_choice=choice,
                           parallel_tool_calls=body.parallel_tool_calls, chat_template=template)
    except (TypeError, ValueError) as exc:
        param = "tool_choice" if "tool_choice" in str(exc) else "tools" if "tools" in str(exc) else "messages"
        raise ApiError(400, str(exc), param=param) from None


def _response_schema(response_format: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The JSON schema an OpenAI response_format asks for (None: free text)."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if spec is None and "schema" in response_format:  # llama-server's shorter form
            return response_format["schema"]
        if not isinstance(spec, dict):
            raise ApiError(400, "response_format json_schema needs a 'json_schema' object", param="response_format")
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema.schema must be an object", param="response_format")
        return schema
    raise ApiError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format")


def create_app(model: Model, config: Optional[ServerConfig] = None) -> FastAPI:
    """The ASGI application serving ``model``; the caller owns the model."""
    if config is None:
        config = ServerConfig(model_id=Path(model.path).stem)
    state = _State(model, config)
    app = FastAPI(title="slot_cpp", version=getattr(_core, "__version__", "0"), docs_url=None, redoc_url=None,
                  responses=ERROR_RESPONSES)
    app.state.slot_cpp = state
    generated = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema without its 422 answers (invalid bodies get a 400 in
        OpenAI's shape), and with the names of this server's datastores,
        rewards and correctors as the enums of the fields that name them."""
        schema = generated()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model_name, field_name, names in (("RtdOptions", "datastore", config.datastores),
                                              ("QAlignOptions", "reward", config.rewards),
                                              ("LmcorOptions", "corrector", config.correctors)):
            prop = components.get(model_name, {}).get("properties", {}).get(field_name)
            if prop is not None and names:
                prop["enum"] = sorted(names)
        for component in components.values():
            _runtime_limits(component.get("properties", {}), config, model)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return ApiError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return ApiError(exc.status_code, str(exc.detail), type=kind).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(exc).response()

    @app.middleware("http")
    async def _guard(request: Request, call_next: Any) -> Response:
        """Authentication and the body size limit, before a body is parsed."""
        path = request.url.path
        try:
            if path.startswith(_GUARDED):
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
                    # No length (chunked): read up to the limit, and no further.
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
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        _check_model(state, body.model)
        schema = _response_schema(body.response_format)
        if schema is not None:
            if body.grammar is not None or body.json_schema is not None:
                raise ApiError(400, "give response_format or grammar/json_schema, not both", param="response_format")
            try:
                body = body.model_copy(update={"json_schema": opts.SamplingOptions(json_schema=schema).json_schema})
            except (TypeError, ValueError) as exc:
                raise ApiError(400, f"response_format: {exc}", param="response_format") from None
        messages = []
        for i, m in enumerate(body.messages):
            if m.content is None and not (m.role == "assistant" and m.tool_calls):
                raise ApiError(400, f"messages[{i}] has no content", param=f"messages[{i}].content")
            content = m.content if isinstance(m.content, str) or m.content is None else \
                "".join(p.text for p in m.content)
            role = "system" if m.role == "developer" else m.role
            message: dict[str, Any] = {"role": role, "content": content}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.tool_call_id is not None:
                message["tool_call_id"] = m.tool_call_id
            if m.name is not None and role == "tool":
                message["name"] = m.name
            messages.append(message)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if body.tools or body.tool_choice is not None or any(m["role"] == "tool" or "tool_calls" in m
                                                              for m in messages):
            fmt = _tool_format(state, body, messages, schema is not None)
            job = resolve(state, body, fmt.tokens, max_tokens, body.logprobs, top, chat_format=fmt)
            return await respond(state, job, body, chat=True)
        try:
            tokens = model.prompt_tokens(messages, chat_template=config.chat_template)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="messages") from None
        except _core.SlotError as exc:
            raise ApiError(400, f"the chat template could not format these messages: {exc}",
                           param="messages") from None
        job = resolve(state, body, tokens, max_tokens, body.logprobs, top, messages=messages)
        return await respond(state, job, body, chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> Response:
        _check_model(state, body.model)
        inputs: list[Any] = [body.input] if isinstance(body.input, str) else list(body.input)
        if inputs and all(isinstance(x, int) for x in inputs):
            inputs = [inputs]  # one token list
        if not inputs:
            raise ApiError(400, "input is empty", param="input")
        if body.dimensions is not None and body.dimensions != model.n_embd:
            raise ApiError(400, f"this model's embeddings have {model.n_embd} dimensions", param="dimensions")
        try:
            rows = [model.tokenize(x) if isinstance(x, str) else x for x in inputs]  # once: for embed and usage
            vectors = await anyio.to_thread.run_sync(lambda: model.embed(rows, pooling=config.pooling))
        except (TypeError, ValueError, _core.ContextLengthError) as exc:
            raise ApiError(400, str(exc), param="input") from None
        data = []
        for i, v in enumerate(vectors):
            embedding: Any = (base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
                              else v.tolist())
            data.append({"object": "embedding", "index": i, "embedding": embedding})
        n_tokens = sum(len(r) for r in rows)
        state.metrics.tokens(n_tokens, 0)
        return JSONResponse({"object": "list", "data": data, "model": config.model_id,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        tokens = model.tokenize(body.content, add_special=body.add_special)
        if body.with_pieces:
            return {"tokens": [{"id": t, "piece": model.token_piece(t).decode("utf-8", "replace")} for t in tokens]}
        return {"tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        try:
            return {"content": model.detokenize(body.tokens)}
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="tokens") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Response:
        _check_model(state, body.model)
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
                tokens = model.check_tokens(prompt)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="prompt") from None
        top = body.logprobs or 0
        echo = None
        if body.echo:
            echo = prompt if isinstance(prompt, str) else model.detokenize(tokens)
        job = resolve(state, body, tokens, body.max_tokens, body.logprobs is not None, top, echo=echo)
        return await respond(state, job, body, chat=False)

    return app


def _nodes(node: Any) -> list[dict[str, Any]]:
    """A property's schema and the schemas inside it (anyOf, items)."""
    if not isinstance(node, dict):
        return []
    found = [node]
    for sub in node.get("anyOf", []):
        found += _nodes(sub)
    return found + _nodes(node.get("items"))


def _integers(node: Any) -> list[dict[str, Any]]:
    return [n for n in _nodes(node) if n.get("type") == "integer"]


def _runtime_limits(props: dict[str, Any], config: ServerConfig, model: Model) -> None:
    """What only the running server knows, written into a request body's
    schema: its model id, the caps on n and max_tokens, the vocabulary's
    token ids and the embedding width."""
    if "anyOf" in props.get("model", {}):
        props["model"]["anyOf"] = [{"type": "string", "enum": [config.model_id]}, {"type": "null"}]
    caps = {"n": config.max_n, "max_tokens": config.max_tokens_cap, "max_completion_tokens": config.max_tokens_cap}
    for name, cap in caps.items():
        for node in _integers(props.get(name)):
            node["maximum"] = cap
    for name in ("prompt", "input", "tokens"):
        for node in _integers(props.get(name)):
            node["minimum"], node["maximum"] = 0, model.n_vocab - 1
    for name in ("prompt", "input"):   # no empty prompt or input, one prompt per request
        for node in _nodes(props.get(name)):
            if node.get("type") == "string":
                node["minLength"] = 1
            elif node.get("type") == "array":
                node["minItems"] = 1
                if name == "prompt" and node.get("items", {}).get("type") == "string":
                    node["maxItems"] = 1
    for node in _integers(props.get("dimensions")):
        node["minimum"] = node["maximum"] = model.n_embd
    for node in props.get("logit_bias", {}).get("anyOf", []):
        if node.get("type") == "object":
            node["propertyNames"] = {"pattern": "^[0-9]+$"}


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


# ---- running it --------------------------------------------------------------------

MMAP_THRESHOLD = 256 << 10
"""Heap blocks at least this large are mapped on their own and unmapped when freed."""


def bound_heap_growth() -> bool:
    """Keeps a long-running server's resident memory flat (glibc only; True
    when set). glibc raises its mmap threshold each time a mapped block is
    freed, so the per-token buffers (a vocabulary of logits is 1 MiB on a
    262k-token model) soon come from the heap arenas, one per thread, which
    fragment and keep growing for minutes. A fixed threshold keeps those
    buffers mapped. MALLOC_MMAP_THRESHOLD_ set by the user wins."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc" or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    M_MMAP_THRESHOLD = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def serve(model_path: Union[str, os.PathLike[str], None] = None, *, host: str = "127.0.0.1", port: int = 8080,
          n_parallel: int = 4, n_ctx: int = 0, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
          api_key: Optional[str] = None, datastores: Optional[dict[str, str]] = None,
          rewards: Optional[dict[str, str]] = None, correctors: Optional[dict[str, str]] = None,
          max_waiting: int = 16, max_tokens_cap: int = 4096,
          model_id: Optional[str] = None, chat_template: Optional[str] = None, rpc: Optional[str] = None,
          lora: Optional[list[tuple[str, float]]] = None, log_level: str = "info", pooling: str = "mean") -> None:
    """Load a model and serve it until interrupted (binds to 127.0.0.1 unless told otherwise)."""
    if n_ctx == 0:
        n_ctx = 2048 * n_parallel
    bound_heap_growth()
    model = Model(model_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_parallel=n_parallel,
                  max_waiting=0, rpc=rpc, lora=lora)
    try:
        config = ServerConfig(model_id=model_id or Path(model.path).stem, api_key=api_key,
                              datastores=datastores or {}, rewards=rewards or {}, correctors=correctors or {},
                              max_waiting=max_waiting, max_tokens_cap=max_tokens_cap, chat_template=chat_template,
                              pooling=pooling)
        app = create_app(model, config)
        try:
            uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        finally:
            app.state.slot_cpp.close()
    finally:
        model.close()
