"""The routes, on one :class:`fastapi.APIRouter`: each reads the request,
turns it into token ids and hands it to :mod:`.serving` (the generate routes)
or answers it itself (models, embeddings, tokenize, health, metrics)."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .. import _core
from .. import options as opts
from ..chat import ChatFormat, format_chat
from ..options.spec import SAME
from .errors import ApiError
from .protocol import (ApplyTemplateRequest, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                       EmbeddingRequest, SlotActionRequest, TokenizeRequest)
from .serving import resolve, respond
from .state import State

router = APIRouter()


def _state(request: Request) -> State:
    return request.app.state.slot_cpp


Served = Annotated[State, Depends(_state)]


@router.get("/health")
async def health(state: Served) -> dict[str, Any]:
    stats = state.model.stats()
    return {"status": "ok", "model": state.config.model_id, "live_sequences": stats.live_sequences,
            "waiting": stats.waiting_requests}


@router.get("/metrics")
async def metrics(state: Served) -> PlainTextResponse:
    return PlainTextResponse(state.metrics.render(state.model), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(state: Served) -> dict[str, Any]:
    return {"object": "list", "data": [_model_card(state)]}


@router.get("/v1/models/{model_id}")
async def model_card(model_id: str, state: Served) -> dict[str, Any]:
    _check_model(state, model_id)
    return _model_card(state)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, state: Served) -> Response:
    model, config = state.model, state.config
    _check_model(state, body.model)
    schema = _response_schema(body.response_format)
    if schema is not None:
        if body.grammar is not None or body.json_schema is not None:
            raise ApiError(400, "give response_format or grammar/json_schema, not both", param="response_format")
        try:
            body = body.model_copy(update={"json_schema": opts.SamplingOptions(json_schema=schema).json_schema})
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"response_format: {exc}", param="response_format") from None
    messages = _messages(body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top = body.top_logprobs or 0
    if top and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    fmt = _chat_format(state, body, messages, schema is not None, max_tokens)
    job = resolve(state, body, fmt.tokens, max_tokens, body.logprobs, top, messages=list(fmt.messages),
                  chat_format=fmt)
    if fmt.dropped_messages:
        job.applied["dropped_messages"] = fmt.dropped_messages
    return await respond(state, job, body, chat=True)


@router.post("/apply-template")
async def apply_template(body: ApplyTemplateRequest, state: Served) -> dict[str, Any]:
    """The prompt a chat completion would generate from (llama-server's /apply-template)."""
    return {"prompt": _chat_format(state, body, _messages(body.messages), False).prompt}


@router.get("/props")
async def props(state: Served) -> dict[str, Any]:
    """What llama-server's /props reports that a client reads: the slots, the
    context, the default sampling settings, the chat template and the build."""
    model, info = state.model, state.model.info
    params = {name: default if spec.http_default is SAME else spec.http_default
              for name, default, spec in opts.specs(opts.SamplingOptions)
              if name not in ("grammar", "json_schema", "logit_bias", "seed")}
    source = model._chat_templates(state.config.chat_template).source
    return {"model_path": model.path, "model_alias": state.config.model_id, "total_slots": model.n_parallel,
            "default_generation_settings": {"n_ctx": model.seq_capacity, "params": params},
            "chat_template": source, "build_info": f"slot_cpp {_core.__version__}",
            "modalities": {"vision": False, "audio": False}, "deterministic": model.deterministic,
            "architecture": info.architecture}


@router.get("/lora-adapters")
async def lora_adapters(state: Served) -> list[dict[str, Any]]:
    """The LoRA adapters the model loaded, with the scales requests without ``lora`` apply."""
    loras = await anyio.to_thread.run_sync(lambda: state.model.loras)  # waits for the engine's lock
    return [{"id": i, "path": path, "scale": scale} for i, (path, scale) in enumerate(loras)]


@router.post("/lora-adapters")
async def set_lora_adapters(body: list[dict[str, Any]], state: Served) -> list[dict[str, Any]]:
    """Sets the default scales, as llama-server's POST /lora-adapters: adapters not named get 0."""
    try:
        await anyio.to_thread.run_sync(state.model.set_lora_scales, body)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="lora") from None
    return await lora_adapters(state)


@router.get("/slots")
async def slots(state: Served) -> list[dict[str, Any]]:
    """The sequences (llama-server's slots): whether each is generating and
    how many tokens its KV cells hold for the prompt cache."""
    model = state.model
    held = await anyio.to_thread.run_sync(model.native_session().slots)  # waits for the engine's lock
    return [{"id": s["id"], "is_processing": bool(s["live"]), "n_ctx": model.seq_capacity,
             "n_cached_tokens": len(s["tokens"])} for s in held]


@router.post("/slots/{slot_id}")
async def slot_action(slot_id: int, action: str, state: Served,
                      body: Optional[SlotActionRequest] = None) -> dict[str, Any]:
    """llama-server's slot actions: save a slot's KV cells to a state file,
    restore one into a slot, or erase a slot."""
    from ..states import read_state, write_state

    model = state.model
    session = model.native_session()
    if action not in ("save", "restore", "erase"):
        raise ApiError(400, f"action must be 'save', 'restore' or 'erase', got {action!r}", param="action")
    started = time.perf_counter()
    try:
        if action == "erase":
            def erase() -> int:
                n = len(session.slots()[slot_id]["tokens"]) if 0 <= slot_id < model.n_parallel else 0
                session.erase_seq(slot_id)
                return n
            return {"id_slot": slot_id, "n_erased": await anyio.to_thread.run_sync(erase)}
        path = _state_file(state, body)
        # The engine's lock and the file's I/O: off the event loop.
        if action == "save":
            def save() -> Any:
                tokens, data, scales = session.seq_state(slot_id)
                return len(tokens), write_state(model._state_identity(), path, tokens, data, lora_scales=scales)
            n_saved, saved = await anyio.to_thread.run_sync(save)
            return {"id_slot": slot_id, "filename": path.name, "n_saved": n_saved, "n_written": saved.kv_bytes,
                    "timings": {"save_ms": 1000 * (time.perf_counter() - started)}}

        def restore() -> Any:
            restored, data = read_state(model._state_identity(), path)
            session.restore_state(restored.tokens, data, slot_id, restored.lora_scales)
            return restored
        try:
            restored = await anyio.to_thread.run_sync(restore)
        except FileNotFoundError:
            raise ApiError(404, f"no state file {path.name!r}", type="not_found_error", param="filename") from None
        return {"id_slot": slot_id, "filename": path.name, "n_restored": len(restored.tokens),
                "n_read": restored.kv_bytes, "timings": {"restore_ms": 1000 * (time.perf_counter() - started)}}
    except ValueError as exc:
        raise ApiError(400, str(exc), param="filename" if action != "erase" else None) from None
    except _core.QueueFullError as exc:
        raise ApiError(503, str(exc)) from None
    except OSError as exc:
        raise ApiError(500, f"the state file could not be {'written' if action == 'save' else 'read'}: {exc}",
                       type="server_error") from None


def _state_file(state: State, body: Optional[SlotActionRequest]) -> Path:
    """A state file inside the server's slot_save_path, named by the request."""
    if state.config.slot_save_path is None:
        raise ApiError(400, "this server was started without --slot-save-path: slots cannot be saved or restored")
    if body is None:
        raise ApiError(400, "the body must give the state file's 'filename'", param="filename")
    name = body.filename
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ApiError(400, "filename must be a plain file name (no directories, not hidden)", param="filename")
    return Path(state.config.slot_save_path) / name


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: Served) -> Response:
    model, config = state.model, state.config
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


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, state: Served) -> dict[str, Any]:
    model = state.model
    tokens = model.tokenize(body.content, add_special=body.add_special)
    if body.with_pieces:
        return {"tokens": [{"id": t, "piece": model.token_piece(t).decode("utf-8", "replace")} for t in tokens]}
    return {"tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, state: Served) -> dict[str, Any]:
    try:
        return {"content": state.model.detokenize(body.tokens)}
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="tokens") from None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, state: Served) -> Response:
    model = state.model
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


# ---- helpers --------------------------------------------------------------------------


def _messages(body_messages: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's chat messages as the chat template reads them."""
    messages = []
    for i, m in enumerate(body_messages):
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
    return messages


def _uses_tools(body: Any, messages: list[dict[str, Any]]) -> bool:
    return bool(body.tools) or body.tool_choice is not None or any(m["role"] == "tool" or "tool_calls" in m
                                                                   for m in messages)


def _chat_format(state: State, body: Any, messages: list[dict[str, Any]], has_response_format: bool,
                 max_tokens: Optional[int] = None) -> ChatFormat:
    """Every chat, rendered by the model's chat template through llama.cpp's
    common/chat, with its tools (or tool calls and results in its history)
    and how a thinking model's reasoning is read."""
    try:
        chat = opts.group_from_http(body, opts.ChatOptions)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, str(exc), param="chat_template_kwargs") from None
    slot = getattr(body, "slot", None)
    user_mask = slot is not None and slot.loss_on == "user"
    if user_mask and chat.chat_template_kwargs:
        # The user's message spans are found in the prompt the template renders without them.
        raise ApiError(400, "slot.loss_on 'user' is not available with chat_template_kwargs", param="slot.loss_on")
    tools: list[dict[str, Any]] = []
    choice: Any = "none"
    if _uses_tools(body, messages):
        for method in ("qalign", "lmcor"):
            if getattr(body, method, None) is not None:
                raise ApiError(400, f"tools are not available with {method}", param="tools")
        if user_mask:
            raise ApiError(400, "slot.loss_on 'user' is not available with tools", param="slot.loss_on")
        constrained = has_response_format or getattr(body, "grammar", None) is not None or \
            getattr(body, "json_schema", None) is not None
        if constrained and body.tools:
            raise ApiError(400, "give tools or a response format/grammar, not both", param="tools")
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []]
        choice = "auto" if body.tool_choice is None else (
            body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump())
        if not tools and choice == "auto":
            choice = "none"
    try:
        # What the answer needs of the context is kept free when old turns may be dropped.
        budget = max(1, state.model.seq_capacity - (max_tokens or 1))
        return format_chat(state.model, messages, tools=tools, tool_choice=choice,
                           parallel_tool_calls=body.parallel_tool_calls, chat_template=state.config.chat_template,
                           chat=chat, prompt_budget=budget)
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


def _model_card(state: State) -> dict[str, Any]:
    info = state.model.info
    return {"id": state.config.model_id, "object": "model", "created": state.created, "owned_by": "slot_cpp",
            "meta": {"architecture": info.architecture, "n_ctx": state.model.n_ctx,
                     "n_parallel": state.model.n_parallel, "datastores": sorted(state.datastores),
                     "rewards": sorted(state.rewards)}}


def _check_model(state: State, name: Optional[str]) -> None:
    if name is not None and name != state.config.model_id:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {state.config.model_id!r}",
                       type="not_found_error", param="model", code="model_not_found")
