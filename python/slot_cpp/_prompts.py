"""Prompts to tokens: chat messages through the chat template, and SLOT's
loss masks over a prompt's tokens.

The Model's public methods (``apply_chat_template``, ``prompt_tokens``,
``user_loss_mask``, ``last_block_loss_mask``) call these. They see the Model
through :class:`Tokenizer`, the few methods they use, so that this module
sits below ``_model`` and imports nothing of it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union

from . import _core
from . import options as opts

_LOG = logging.getLogger("slot_cpp")

Message = Mapping[str, Any]
Prompt = Union[str, Sequence[Message]]
"""Raw text, or chat messages formatted with the chat template."""

ROLES = frozenset({"system", "user", "assistant", "tool"})


class Tokenizer(Protocol):
    """What the prompt functions use of a Model."""

    def native_session(self) -> _core.Session: ...

    def tokenize(self, text: str) -> list[int]: ...

    def check_tokens(self, tokens: Any) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[Message], *, template: Optional[str] = None) -> str: ...


# ---- chat templates ------------------------------------------------------------
class ChatTemplates:
    """One model's chat formatting, all of it through llama.cpp's common/chat:
    the GGUF's own template rendered by its Jinja engine, or a template
    given as Jinja text, or one of llama.cpp's built-in templates by name
    (``slot_cpp.chat_templates()``). A GGUF without a template gets the
    built-in one of its architecture (Gemma's turns for gemma*, else ChatML),
    said once in the log. Each template is parsed once.

    ``session`` is the Model's session getter (it raises once the Model is
    closed), called only after the arguments are checked."""

    def __init__(self, file_name: str) -> None:
        self._file_name = file_name
        self._fallback_said = False
        self._parsed: dict[tuple[str, bool], Any] = {}

    def apply(self, session: Callable[[], _core.Session], messages: Sequence[Message], add_generation_prompt: bool,
              template: Optional[str], chat: Optional[Any] = None) -> str:
        """The prompt text of ``messages`` (``chat``: a ChatOptions)."""
        check_messages(messages)
        templates = self.parsed(session, template)
        reasoning, thinking, kwargs = (chat or opts.ChatOptions()).template_inputs()
        out = session().apply_chat(templates, messages_json(messages), "", "none", False, add_generation_prompt,
                                   reasoning, thinking, kwargs)
        return str(out.prompt)

    def parsed(self, session: Callable[[], _core.Session], template: Optional[str]) -> Any:
        """llama.cpp's chat templates for ``template`` (None: the model's), parsed once."""
        if template is not None and not isinstance(template, str):
            raise TypeError("chat_template must be a built-in template's name or Jinja text (a str), or None")
        if template == "":
            raise ValueError("chat_template is empty")
        if template is None:
            key = ("", True) if session().has_chat_template else (
                self._fallback(str(session().file_info()["architecture"])), False)
        elif template in _core.chat_templates():
            key = (template, False)
        elif "{{" in template or "{%" in template:
            key = (template, True)
        else:
            raise ValueError(f"chat template {template!r} is neither a built-in template's name (see "
                             "slot_cpp.chat_templates()) nor Jinja text")
        templates = self._parsed.get(key)
        if templates is None:
            templates = self._parsed[key] = session().chat_templates(*key)
        return templates

    def _fallback(self, arch: str) -> str:
        # llama.cpp's built-in for the architecture (Gemma's turn markers for
        # gemma*, else ChatML, as llama.cpp falls back).
        name = "gemma" if arch.startswith("gemma") else "phi3" if arch == "phi3" else "chatml"
        if not self._fallback_said:
            self._fallback_said = True
            _LOG.warning("%s has no chat template; formatting chats with llama.cpp's built-in %r template "
                         "(pass chat_template to choose another)", self._file_name, name)
        return name


def messages_json(messages: Sequence[Message]) -> str:
    """Chat messages as the JSON text llama.cpp's common/chat reads."""
    try:
        return json.dumps([dict(m) for m in messages])
    except (TypeError, ValueError) as exc:
        raise TypeError(f"messages must be JSON-serialisable: {exc}") from None


def check_messages(messages: Any) -> None:
    """OpenAI-shaped chat messages: a role, and content (a str, or text
    parts; None only beside tool_calls)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role': ..., 'content': ...} mappings")
    if len(messages) == 0:
        raise ValueError("messages is empty")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m:
            raise TypeError(f"message {i} must be a mapping with 'role' and 'content'")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {sorted(ROLES)}")
        if content is None and not m.get("tool_calls"):
            raise TypeError(f"message {i} must have 'content' (None only in an assistant message with tool_calls)")
        if content is not None and not isinstance(content, (str, list)):
            raise TypeError(f"message {i} content must be a str or a list of text parts")


# ---- prompts -------------------------------------------------------------------
def prompt_text_and_tokens(model: Tokenizer, prompt: Prompt, chat_template: Optional[str],
                           system: Optional[str]) -> tuple[str, list[int], Optional[list[Message]]]:
    """The prompt's text (formatted when it is chat messages, or given a
    system prompt or chat template), its tokens, and its messages if any."""
    messages: Optional[list[Message]] = None
    if isinstance(prompt, str):
        if system is not None:
            messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
        elif chat_template is not None:
            messages = [{"role": "user", "content": prompt}]
        text = prompt if messages is None else model.apply_chat_template(messages, template=chat_template)
    else:
        text = model.apply_chat_template(prompt, template=chat_template)
        messages = list(prompt)
    if text == "":
        raise ValueError("the prompt is empty")
    tokens = model.tokenize(text)
    if not tokens:
        raise ValueError("the prompt produced no tokens")
    return text, tokens, messages


# ---- loss masks ----------------------------------------------------------------
def user_loss_mask(model: Tokenizer, prompt: Prompt, chat_template: Optional[str],
                   system: Optional[str]) -> tuple[list[int], list[bool]]:
    text, tokens, messages = prompt_text_and_tokens(model, prompt, chat_template, system)
    if messages is None:
        raise ValueError("loss_on='user' needs chat messages (or a chat_template or system prompt)")
    data = text.encode("utf-8")
    pieces = token_pieces(model, tokens)
    joined = b"".join(pieces)
    if joined == data or joined.endswith(data):
        shift = len(joined) - len(data)
    else:
        raise ValueError("the prompt's tokens do not spell out its formatted text; loss_on='user' cannot "
                         "locate the user's messages")
    spans = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "user" or not isinstance(m.get("content"), str) or not m["content"]:
            continue
        content = m["content"].encode("utf-8")
        at = data.find(content, cursor)
        if at < 0:
            raise ValueError(f"message {i}'s content does not appear verbatim in the formatted prompt; "
                             "loss_on='user' cannot locate it")
        spans.append((at + shift, at + shift + len(content)))
        cursor = at + len(content)
    return tokens, span_mask(pieces, spans)


def last_block_loss_mask(model: Tokenizer, tokens: Sequence[int]) -> list[bool]:
    pieces = token_pieces(model, model.check_tokens(tokens))
    data = b"".join(pieces)
    start = data.rfind(b"\n\n")
    mask = span_mask(pieces, [(0 if start < 0 else start + 2, len(data))])
    if sum(mask) < 2:
        raise ValueError("the prompt's last block (the text after its last blank line) holds fewer than three "
                         "tokens; loss_on='last' has nothing to learn from")
    return mask


def token_pieces(model: Tokenizer, tokens: list[int]) -> list[bytes]:
    s = model.native_session()
    return [s.token_piece(t) for t in tokens]


def span_mask(pieces: list[bytes], spans: list[tuple[int, int]]) -> list[bool]:
    """Byte spans of the joined pieces -> entry t True when tokens t and
    t+1 both lie inside one span."""
    inside = []
    offset = 0
    for piece in pieces:
        start, end = offset, offset + len(piece)
        offset = end
        span = next((k for k, (a, b) in enumerate(spans) if a <= start and end <= b and end > start), -1)
        inside.append(span)
    return [inside[t] >= 0 and inside[t] == inside[t + 1] for t in range(len(pieces) - 1)]
