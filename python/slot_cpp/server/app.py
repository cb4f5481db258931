"""The application: :func:`create_app` (the routes of :mod:`.routes`, the
error handlers, the guard in front of /v1 and the OpenAPI schema) and
:func:`serve`."""

from __future__ import annotations

import hmac
import os
from pathlib import Path
from typing import Any, Optional, Union

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import _core
from .. import options as opts
from .._model import Model
from .errors import ApiError, internal_error, validation_message
from .protocol import ERROR_RESPONSES
from .routes import router
from .state import ServerConfig, State, parse_named_paths

__all__ = ["ServerConfig", "bound_heap_growth", "create_app", "parse_named_paths", "serve"]

_ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/tokenize",
                        "/detokenize", "/health", "/metrics", "/props", "/apply-template", "/slots",
                        "/lora-adapters"})
"""Paths the metrics count by name; any other path counts as "other"."""
_GUARDED = ("/v1/", "/tokenize", "/detokenize", "/props", "/apply-template", "/slots", "/lora-adapters")
"""Path prefixes that read the model: they need the API key when one is set."""


def create_app(model: Model, config: Optional[ServerConfig] = None) -> FastAPI:
    """The ASGI application serving ``model``; the caller owns the model."""
    if config is None:
        config = ServerConfig()
    if config.model_id is None:
        config = config.replace(model_id=Path(model.path).stem)
    app = FastAPI(title="slot_cpp", version=getattr(_core, "__version__", "0"), docs_url=None, redoc_url=None,
                  responses=ERROR_RESPONSES)
    app.state.slot_cpp = State(model, config)
    generated = app.openapi
    app.openapi = lambda: _openapi(generated(), config, model)  # type: ignore[method-assign]
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)
    app.middleware("http")(_guard)
    if config.cors_origins:
        # Outside the guard: a browser's preflight carries no API key.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.include_router(router)
    return app


# ---- errors and the guard ------------------------------------------------------------


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    message, param = validation_message(exc)
    return ApiError(400, message, param=param).response()


async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return ApiError(exc.status_code, str(exc.detail), type=kind).response()


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    return internal_error(exc).response()


async def _guard(request: Request, call_next: Any) -> Response:
    """Authentication and the body size limit, before a body is parsed."""
    state: State = request.app.state.slot_cpp
    config = state.config
    path = request.url.path
    try:
        if path.startswith(_GUARDED):
            if state.api_keys:
                header = request.headers.get("authorization", "")
                scheme, _, token = header.partition(" ")
                given = token.strip().encode()
                # Every key compared, so that the time taken does not say which one nearly matched.
                matched = [hmac.compare_digest(given, key) for key in state.api_keys]
                if scheme.lower() != "bearer" or not any(matched):
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


# ---- the OpenAPI schema ------------------------------------------------------------------


def _openapi(schema: dict[str, Any], config: ServerConfig, model: Model) -> dict[str, Any]:
    """FastAPI's schema without its 422 answers (invalid bodies get a 400 in
    OpenAI's shape), and with the names of this server's datastores,
    rewards and correctors as the enums of the fields that name them."""
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
          settings: Optional[opts.ModelSettings] = None, config: Optional[ServerConfig] = None,
          log_level: str = "info", **options: Any) -> None:
    """Load a model and serve it until interrupted (binds to 127.0.0.1 unless told otherwise).

    ``settings`` (the Model's, :class:`~slot_cpp.options.ModelSettings`;
    ``n_ctx`` 0: 2048 cells per sequence) and ``config`` (the server's,
    :class:`~slot_cpp.options.ServerSettings`) are whole groups; keyword
    arguments, any field of either (``max_waiting``: the server's), override them."""
    server_names = {name for name, _, _ in opts.specs(ServerConfig)}
    model_names = {name for name, _, _ in opts.specs(opts.ModelSettings)} - server_names
    unknown = sorted(set(options) - server_names - model_names)
    if unknown:
        raise TypeError(f"serve() got unexpected keyword argument(s): {', '.join(unknown)}")
    settings = settings if settings is not None else opts.ModelSettings(n_ctx=0)
    model_options = {k: v for k, v in options.items() if k in model_names}
    if model_options:
        settings = settings.replace(**model_options)
    if settings.n_ctx == 0:
        settings = settings.replace(n_ctx=2048 * settings.n_parallel)
    config = config if config is not None else ServerConfig()
    server_options = {k: v for k, v in options.items() if k in server_names}
    if server_options:
        config = config.replace(**server_options)
    bound_heap_growth()
    model = Model(model_path, **settings.as_dict())
    try:
        app = create_app(model, config)
        try:
            uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
        finally:
            app.state.slot_cpp.close()
    finally:
        model.close()
