"""The OpenAI wire format: request bodies (pydantic) and response shapes.

Each extension group (``slot``, ``rtd``, ``qalign``, ``lmcor``) is one
model, so that any of them can be replaced on its own. Response objects are
plain dicts: the same helpers build the whole response and the streamed
chunks, so that both carry the same fields.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field

from .. import options as opts
from .._model import GenerationResult, Model
from ..chat import ReasoningDelta, ToolCallDelta

# ---- request bodies --------------------------------------------------------------


class _Body(BaseModel):
    # Unknown fields are errors, not silently ignored options.
    model_config = ConfigDict(extra="forbid")


# The method extensions and the sampling fields are made from the option
# definitions in slot_cpp.options: their types, ranges, defaults and
# descriptions are written there once.
SlotOptions = opts.request_model("SlotOptions", opts.http_fields(opts.SlotOptions), base=_Body,
                                 doc=opts.SlotOptions.__doc__)

RtdOptions = opts.request_model(
    "RtdOptions", {"datastore": (str, Field(description="the name of a datastore the server was started with")),
                   **opts.http_fields(opts.RtdOptions)}, base=_Body, doc=opts.RtdOptions.__doc__)

QAlignOptions = opts.request_model(
    "QAlignOptions", {"reward": (str, Field(description="the name of a reward the server was started with")),
                      **opts.http_fields(opts.QAlignOptions)}, base=_Body, doc=opts.QAlignOptions.__doc__)

LmcorOptions = opts.request_model(
    "LmcorOptions", {"corrector": (str, Field(description="the name of a corrector the server was started with")),
                     "input": (Optional[str], Field(None, description="the bare input x the corrector reads "
                                                    "(default: the last user message, or the prompt)")),
                     **opts.http_fields(opts.LmcorOptions)}, base=_Body, doc=opts.LmcorOptions.__doc__)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    user: Optional[str] = None
    slot: Optional[SlotOptions] = None  # type: ignore[valid-type]
    rtd: Optional[RtdOptions] = None  # type: ignore[valid-type]
    qalign: Optional[QAlignOptions] = None  # type: ignore[valid-type]
    lmcor: Optional[LmcorOptions] = None  # type: ignore[valid-type]


SamplingRequest: Any = opts.request_model(
    "SamplingRequest", {**opts.http_fields(opts.SamplingOptions),
                        **opts.http_fields(opts.RequestExtras, only=("cache_prompt", "lora"))},
    base=_SamplingBody, doc="What both endpoints share: sampling, streaming and the extensions.")


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str = Field(description="the arguments as JSON text")


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # A message a client sends back as it received it may carry fields of
    # the response (refusal, annotations): they are read and ignored.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[ContentPart], None] = Field(
        None, description="may be null only in an assistant message with tool_calls")
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None
    tool_call_id: Optional[str] = Field(None, description="in a tool message: the call it answers")


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="a JSON schema of the arguments object")
    strict: Optional[bool] = None


class ToolDefinition(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


_ChatBody: Any = opts.request_model("ChatBody", opts.http_fields(opts.ChatOptions), base=_Body,
                                    doc=opts.ChatOptions.__doc__)


class ChatCompletionRequest(SamplingRequest, _ChatBody):  # type: ignore[misc, valid-type]
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    response_format: Optional[dict[str, Any]] = None
    tools: Optional[list[ToolDefinition]] = Field(None, description="functions the model may call; the model's chat "
                                                   "template renders them and the answer is parsed into tool_calls")
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = Field(
        None, description="'auto' (the default with tools), 'none', 'required' (a call is forced by a grammar) or a "
        "named function")
    parallel_tool_calls: bool = Field(True, description="whether an answer may hold several calls")


class ApplyTemplateRequest(_ChatBody):  # type: ignore[misc, valid-type]
    """llama-server's /apply-template: the chat's prompt text, not generated from."""

    messages: list[ChatMessage] = Field(min_length=1)
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True


class SlotActionRequest(_Body):
    """llama-server's /slots/{id}?action=save|restore: a file name inside the server's --slot-save-path."""

    filename: str = Field(min_length=1, max_length=255)


class EmbeddingRequest(_Body):
    input: Union[str, list[str], list[int], list[list[int]]]
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class CompletionRequest(SamplingRequest):  # type: ignore[misc, valid-type]
    prompt: Union[str, list[int], list[str]]
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


# ---- response shapes ---------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape: every error the server answers."""

    error: ErrorDetail


# The errors any route may answer, documented once for the OpenAPI schema
# (a body that does not match its model is a 400, never FastAPI's 422).
ERROR_RESPONSES: dict[Union[int, str], dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "an invalid request (the message names the field)"},
    401: {"model": ErrorResponse, "description": "a missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "an unknown model, datastore, reward, corrector or route"},
    413: {"model": ErrorResponse, "description": "a body over the size limit"},
    503: {"model": ErrorResponse, "description": "overloaded: retry after the Retry-After header's seconds"},
}


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens the prompt cache held."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _pieces(model: Model) -> Any:
    """token -> its text, each distinct token detokenized once per response."""
    cache: dict[int, str] = {}

    def piece(token: int) -> str:
        text = cache.get(token)
        if text is None:
            text = cache[token] = model.detokenize([token])
        return text
    return piece


def logprobs_chat(model: Model, r: GenerationResult) -> dict[str, Any]:
    """Chat's shape: one entry per token, with its bytes and alternatives."""
    _piece = _pieces(model)
    content = []
    tops = r.top_logprobs or [[] for _ in r.tokens]
    for tok, lp, top in zip(r.tokens, r.token_logprobs, tops):
        text = _piece(tok)
        alternatives = []
        for t, v in top:
            piece = _piece(t)
            alternatives.append({"token": piece, "logprob": float(v), "bytes": list(piece.encode())})
        content.append({"token": text, "logprob": float(lp), "bytes": list(text.encode()),
                        "top_logprobs": alternatives})
    return {"content": content}


def logprobs_text(model: Model, r: GenerationResult, prompt: Optional[list[int]] = None) -> dict[str, Any]:
    """The legacy completions' shape: parallel lists and character offsets;
    with ``prompt`` (echo), the prompt's tokens first (the first one without
    a log-probability, the others without alternatives)."""
    _piece = _pieces(model)
    token_logprobs: list[Optional[float]] = []
    tops: list[Optional[dict[str, float]]] = []
    if prompt is not None:
        assert r.prompt_logprobs is not None and len(r.prompt_logprobs) == len(prompt) - 1
        token_logprobs = [None] + [float(x) for x in r.prompt_logprobs]
        tops = [None] * len(prompt)
    token_logprobs.extend(float(x) for x in r.token_logprobs)
    if r.top_logprobs:
        tops.extend({_piece(t): float(v) for t, v in step} for step in r.top_logprobs)
    tokens = [_piece(tok) for tok in (prompt or []) + r.tokens]
    offsets = [0] * len(tokens)
    for i in range(1, len(tokens)):
        offsets[i] = offsets[i - 1] + len(tokens[i - 1])
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops if r.top_logprobs else None,
            "text_offset": offsets}


@dataclass(frozen=True)
class Reply:
    """What every object of one response shares (id, creation time, model),
    and the chat or text-completion shapes built from it."""

    id: str
    created: int
    model: str
    chat: bool
    _frames: dict[int, tuple[bytes, bytes]] = field(default_factory=dict, repr=False, compare=False)
    """piece_event's fixed parts, by choice index."""

    @classmethod
    def new(cls, model: str, *, chat: bool) -> Reply:
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        return cls(id=rid, created=int(time.time()), model=model, chat=chat)

    def _object(self, kind: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, **fields}

    def choice(self, index: int, text: str, finish: str, logprobs: Optional[dict[str, Any]],
               message: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """One choice of the whole response (chat: ``message`` when the answer
        was read into content and tool calls)."""
        if self.chat:
            return {"index": index, "message": message or {"role": "assistant", "content": text},
                    "finish_reason": finish, "logprobs": logprobs}
        return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, Any],
              extension: Optional[dict[str, Any]], timings: Optional[dict[str, float]] = None) -> dict[str, Any]:
        out = self._object("chat.completion" if self.chat else "text_completion", choices=choices, usage=usage,
                           system_fingerprint=None)
        if extension:
            out["slot_cpp"] = extension
        if timings:
            out["timings"] = timings
        return out

    def chunk(self, index: int, text: Optional[str], finish: Optional[str], *, role: bool = False,
              extension: Optional[dict[str, Any]] = None, tool_call: Optional[ToolCallDelta] = None,
              reasoning: Optional[ReasoningDelta] = None,
              timings: Optional[dict[str, float]] = None) -> dict[str, Any]:
        """One streamed chunk: a choice's text piece, a piece of its reasoning
        or of a tool call, its role (chat's first chunk) or its finish reason
        (``text`` None)."""
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if reasoning is not None:
                delta["reasoning_content"] = reasoning.text
            if tool_call is not None:
                call: dict[str, Any] = {"index": tool_call.index}
                if tool_call.id:  # the call's first piece: its id and name
                    call.update(id=tool_call.id, type="function")
                function: dict[str, Any] = {"arguments": tool_call.arguments}
                if tool_call.name:
                    function["name"] = tool_call.name
                call["function"] = function
                delta["tool_calls"] = [call]
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        out = self._object(self._chunk_kind, choices=[choice])
        if extension:
            out["slot_cpp"] = extension
        if timings:
            out["timings"] = timings
        return out

    def piece_event(self, index: int, text: str) -> bytes:
        """The server-sent event of a text piece: ``chunk(index, text, None)``
        as ``data: ...`` bytes, its fixed parts encoded once per response."""
        frame = self._frames.get(index)
        if frame is None:
            probe = "\u0000slot\u0000"
            encoded = orjson.dumps(self.chunk(index, probe, None))
            head, _, tail = encoded.partition(orjson.dumps(probe))
            frame = self._frames[index] = (b"data: " + head, tail + b"\n\n")
        return frame[0] + orjson.dumps(text) + frame[1]

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices."""
        return self._object(self._chunk_kind, choices=[], usage=usage)

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
