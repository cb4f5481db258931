"""Chats: tools (function calling) and reasoning.

The model's own chat template renders the messages and the tool definitions
(llama.cpp's common/chat runs it with its Jinja engine), and the same module
says how this model writes a call and its reasoning: :func:`format_chat`
returns a :class:`ChatFormat` with the prompt, the grammar that makes an
answer a well-formed call (lazy with ``tool_choice="auto"``: it applies once
the model starts a call; from the first token with ``"required"`` or a named
function), and the parser that reads the answer back into its reasoning, its
text and :class:`ToolCall` objects, whole or as it streams::

    fmt = format_chat(model, messages, tools=tools, tool_choice="required")
    result = model.generate(fmt.tokens, chat_format=fmt, max_tokens=256)
    message = fmt.parse(result.text)      # ChatMessage(content=..., tool_calls=[...])

A template that cannot write calls (a built-in template, or a Jinja template
without tools) still takes tools: they are described in a system message and
a call is one JSON object ``{"name": ..., "arguments": {...}}`` (format
``"json-call"``), forced by a grammar for ``"required"``.

The methods compose with it: SLOT, RTD and the penalties act on the
distribution the grammar then masks. A grammar of the request's own (or a
JSON schema) applies after the reasoning block a thinking template opens
in the prompt; where the template leaves reasoning optional it binds from
the first token.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Optional, Sequence, Union

from . import _core, _prompts
from . import options as opts

if TYPE_CHECKING:
    from ._model import Model

__all__ = ["ChatFormat", "ChatMessage", "ChatStream", "ReasoningDelta", "ToolCall", "ToolCallDelta", "format_chat"]

ToolChoice = Union[Literal["none", "auto", "required"], Mapping[str, Any]]
"""``"none"``, ``"auto"``, ``"required"``, or OpenAI's named function
``{"type": "function", "function": {"name": ...}}``."""


@dataclass(frozen=True)
class ToolCall:
    """One call of a tool: its id, the function's name and its arguments (JSON text)."""

    id: str
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as Python objects (ValueError when they are not JSON)."""
        return json.loads(self.arguments)

    def openai(self) -> dict[str, Any]:
        """OpenAI's shape of the call."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ChatMessage:
    """An assistant answer read back: its text, its tool calls, and a thinking model's reasoning."""

    content: Optional[str]
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning_content: Optional[str] = None

    def openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            out["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            out["tool_calls"] = [c.openai() for c in self.tool_calls]
        return out


@dataclass(frozen=True)
class ToolCallDelta:
    """What a streamed answer added to tool call ``index``: its id and name
    when the call begins, then pieces of its arguments."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ReasoningDelta:
    """What a streamed answer added to its reasoning."""

    text: str


def _message(raw: Mapping[str, Any]) -> ChatMessage:
    calls = [ToolCall(id=c.get("id", ""), name=c["function"]["name"], arguments=c["function"]["arguments"])
             for c in raw.get("tool_calls") or []]
    content = raw.get("content")
    return ChatMessage(content=content if content or not calls else None, tool_calls=calls,
                       reasoning_content=raw.get("reasoning_content") or None)


class ChatStream:
    """Reads an answer as it grows: feed the whole text so far, get what it added."""

    def __init__(self, fmt: ChatFormat) -> None:
        self._parser = _core.ChatParser(fmt._native, fmt.parse_tool_calls)
        self.message = ChatMessage(content=None)

    def update(self, text: str, *, final: bool = False) -> list[Union[str, ReasoningDelta, ToolCallDelta]]:
        """The text added to the content (str), to the reasoning and the
        tool-call pieces since the last call; ``final`` for the finished
        answer (an answer that is not a complete call then reads as plain text)."""
        out = json.loads(self._parser.update(text, not final))
        self.message = _message(out["message"])
        deltas: list[Union[str, ReasoningDelta, ToolCallDelta]] = []
        for d in out["deltas"]:
            if "reasoning_content" in d:
                deltas.append(ReasoningDelta(d["reasoning_content"]))
            if "content" in d:
                deltas.append(d["content"])
            if "tool_call_index" in d:
                call = d["tool_call"]
                deltas.append(ToolCallDelta(index=int(d["tool_call_index"]), id=call["id"], name=call["name"],
                                            arguments=call["arguments"]))
        return deltas


@dataclass(frozen=True)
class ChatFormat:
    """A chat rendered by the model's template, with what the answer needs:
    the grammar of a call (and what triggers it), extra stop strings, and the
    parser. Pass it as ``chat_format=`` to any generate call on :attr:`tokens`."""

    prompt: str
    tokens: list[int]
    format: str
    """The answer format llama.cpp recognised in the template (its name)."""
    tool_choice: str
    parse_tool_calls: bool
    _native: Any = field(repr=False, compare=False)
    dropped_messages: int = 0
    """Messages dropped from the start of the chat to fit the context (``drop_oldest_turns``)."""
    messages: list[Mapping[str, Any]] = field(default_factory=list, repr=False, compare=False)
    """The messages the prompt renders: the chat less the dropped ones."""

    @property
    def grammar(self) -> Optional[str]:
        """GBNF a call follows (None: the answer is free text)."""
        return self._native.grammar or None

    @property
    def lazy(self) -> bool:
        """Whether the grammar waits for the model to start a call."""
        return bool(self._native.grammar_lazy)

    @property
    def stops(self) -> list[str]:
        return list(self._native.stops)

    @property
    def needs_parser(self) -> bool:
        """Whether answers are read back (tool calls, or reasoning split off);
        False: an answer's text is its content as it is."""
        return bool(self._native.needs_parser)

    @property
    def thinking_end(self) -> Optional[str]:
        """The tag that ends a thinking model's reasoning here (None: it does not think)."""
        return self._native.thinking_end or None

    def parse(self, text: str) -> ChatMessage:
        """The finished answer as text and tool calls."""
        stream = ChatStream(self)
        stream.update(text, final=True)
        return stream.message

    def stream(self) -> ChatStream:
        return ChatStream(self)

    def _apply(self, request: Any) -> None:
        """Sets a native request's grammar, its triggers, prefill and stops.
        A grammar the request has of its own waits for the reasoning's end."""
        native = self._native
        if (request.grammar or request.json_schema) and native.thinking_end and native.thinking_forced_open:
            # The answer begins inside the reasoning the prompt opened: the grammar waits for its end. (Where
            # reasoning is optional the grammar binds from the first token, so that it always holds.)
            request.grammar_triggers = [_after(native.thinking_end)]
        if native.grammar:
            request.grammar = native.grammar
            if native.grammar_lazy:
                request.grammar_triggers = list(native.trigger_patterns)
                request.grammar_trigger_tokens = list(native.trigger_tokens)
            else:
                request.grammar_prefill = list(native.grammar_prefill)
        request.render_tokens = list(native.preserved_tokens)
        if native.stops:
            request.stop = list(request.stop) + [s for s in native.stops if s not in request.stop]


def _after(tag: str) -> str:
    """A lazy grammar trigger: the first non-space character after ``tag``."""
    return r"[\s\S]*?" + re.escape(tag) + r"\s*([^\s][\s\S]*)"


_CHOICES = ("none", "auto", "required")
_ROLES = ("system", "user", "assistant", "tool")


def _tools_and_choice(tools: Optional[Sequence[Mapping[str, Any]]], tool_choice: ToolChoice
                      ) -> tuple[list[dict[str, Any]], str]:
    """The tools to render and the choice common/chat takes ("none", "auto",
    "required"): a named function keeps only that tool, and requires it."""
    if tools is None:
        tools = []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TypeError("tools must be a list of {'type': 'function', 'function': {...}} mappings")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), Mapping):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        name = tool["function"].get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty str")
        out.append({"type": "function", "function": dict(tool["function"])})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tools must have distinct function names")
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or "
                             "{'type': 'function', 'function': {'name': ...}}")
        if name not in names:
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools")
        return [t for t in out if t["function"]["name"] == name], "required"
    if tool_choice not in _CHOICES:
        raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}")
    if tool_choice == "required" and not out:
        raise ValueError("tool_choice 'required' needs tools")
    return out, str(tool_choice)


def format_chat(model: Model, messages: Sequence[Mapping[str, Any]], *,
                tools: Optional[Sequence[Mapping[str, Any]]] = None, tool_choice: ToolChoice = "auto",
                parallel_tool_calls: bool = True, chat_template: Optional[str] = None,
                add_generation_prompt: bool = True, chat: Optional[opts.ChatOptions] = None,
                prompt_budget: Optional[int] = None, **chat_options: Any) -> ChatFormat:
    """Renders OpenAI-shaped ``messages`` (tool calls and ``tool`` results
    included) and ``tools`` with the model's chat template, or
    ``chat_template`` (Jinja text, or a built-in template's name). A model
    without a template gets the built-in one of its architecture.
    ``chat`` (or its fields as keywords: ``reasoning_format``,
    ``enable_thinking``, ``chat_template_kwargs``, ``drop_oldest_turns``)
    says how a thinking model's reasoning is rendered and read, and whether
    the oldest turns are dropped until the prompt has at most
    ``prompt_budget`` tokens. ValueError for messages, tools or a template
    that cannot be rendered."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError("messages must be a non-empty list of OpenAI-style message mappings")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be a mapping whose role is one of {', '.join(_ROLES)}")
    rendered_tools, choice = _tools_and_choice(tools, tool_choice)
    if not isinstance(parallel_tool_calls, bool):
        raise TypeError("parallel_tool_calls must be a bool")
    if chat is None:
        chat = opts.ChatOptions(**chat_options)
    elif chat_options:
        raise TypeError("give chat or its fields as keywords, not both")
    if prompt_budget is not None and (isinstance(prompt_budget, bool) or not isinstance(prompt_budget, int)
                                      or prompt_budget < 1):
        raise ValueError("prompt_budget must be an int >= 1")
    templates = model._chat_templates(chat_template)
    chat_messages = list(messages)
    dropped = 0
    while True:
        native = model.native_session().apply_chat(
            templates, _prompts.messages_json(chat_messages), json.dumps(rendered_tools) if rendered_tools else "", choice,
            parallel_tool_calls, add_generation_prompt, *chat.template_inputs())
        tokens = model.tokenize(native.prompt)
        if not tokens:
            raise ValueError("the chat template rendered an empty prompt")
        if not chat.drop_oldest_turns or prompt_budget is None or len(tokens) <= prompt_budget:
            break
        cut = _oldest_turn(chat_messages)
        if cut is None:
            raise ValueError(f"the chat's last user message and what follows it take {len(tokens)} tokens: more "
                             f"than the {prompt_budget} the context leaves for the prompt")
        dropped += cut[1] - cut[0]
        del chat_messages[cut[0]:cut[1]]
    return ChatFormat(prompt=native.prompt, tokens=tokens, format=native.format, tool_choice=choice,
                      parse_tool_calls=choice != "none" and bool(rendered_tools), _native=native,
                      dropped_messages=dropped, messages=chat_messages)


def _oldest_turn(messages: list[Mapping[str, Any]]) -> Optional[tuple[int, int]]:
    """The oldest turn after the system messages: a user message and what
    follows it up to the next user message; None when only the last user
    message's turn is left."""
    first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
    users = [i for i, m in enumerate(messages) if m.get("role") == "user" and i >= first]
    if len(users) < 2:
        return None
    return first, users[1]
