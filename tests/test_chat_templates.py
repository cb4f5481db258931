"""Chat templates through llama.cpp's common/chat: a GGUF's own Jinja
template rendered as Jinja2 renders it, a thinking model's reasoning split
from its content (whole, streamed, through the server), a grammar that
waits for the reasoning's end, and tools on a model whose template cannot
write calls (the embedded Gemma: the json-call format)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import jinja2
import openai
import pytest

import slot_cpp
from slot_cpp.chat import ReasoningDelta, format_chat
from slot_cpp.server import ServerConfig

from test_server import client, running

DATA = Path(__file__).parent / "data"

# No built-in template of llama.cpp looks like this one.
CUSTOM = ("{% for m in messages %}[[{{ m['role'] | upper }}]]{{ m['content'] | trim }}"
          "{% if not loop.last %} || {% endif %}{% endfor %}"
          "{% if add_generation_prompt %} ==> {% endif %}")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
QUESTION = [{"role": "user", "content": "Is 7 a prime number?"}]
ANSWER = "Seven has no divisor but 1 and itself.\n</think>\n\nYes, 7 is prime."


def _with_template(source: Path, template: str, out: Path) -> Path:
    file = out.with_suffix(".jinja")
    file.write_text(template)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source), str(out),
                    "--chat-template-file", str(file), "--force"], check=True, capture_output=True)
    return out


# ---- a template of the GGUF's own ------------------------------------------------


def test_a_custom_template_renders_as_jinja2_renders_it(tiny_path: Path, tmp_path: Path) -> None:
    path = _with_template(tiny_path, CUSTOM, tmp_path / "custom.gguf")
    chats = [
        [{"role": "user", "content": "  hello  "}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
    ]
    expected = jinja2.Environment().from_string(CUSTOM)
    with slot_cpp.Model(path, n_ctx=256) as model:
        assert model.info.has_chat_template
        for messages in chats:
            for add in (True, False):
                text = model.apply_chat_template(messages, add_generation_prompt=add)
                assert text == expected.render(messages=messages, add_generation_prompt=add)
        # The same text through format_chat, a generate call and the prompt's tokens.
        fmt = format_chat(model, chats[1])
        assert fmt.prompt == model.apply_chat_template(chats[1]) and fmt.tokens == model.tokenize(fmt.prompt)
        assert model.prompt_tokens(chats[1]) == fmt.tokens
        # A name that is neither built in nor Jinja is refused, not rendered as text.
        with pytest.raises(ValueError, match="neither a built-in"):
            model.apply_chat_template(chats[0], template="no-such-template")
        with pytest.raises(ValueError, match="could not format"):
            model.apply_chat_template(chats[0], template="{{ messages[5]['content'] | nosuchfilter }}")


# ---- reasoning ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[slot_cpp.Model]:
    """SmolLM2 with a thinking template: its generation prompt opens <think>,
    or closes it at once when enable_thinking is false."""
    template = (DATA / "thinking_chatml.jinja").read_text()
    path = _with_template(smollm2_path, template, tmp_path_factory.mktemp("thinking") / "smol-thinking.gguf")
    model = slot_cpp.Model(path, n_ctx=1024, n_parallel=2, seed=3)
    yield model
    model.close()


def test_reasoning_is_split_from_the_content_whole_and_streamed(thinking: slot_cpp.Model) -> None:
    fmt = format_chat(thinking, QUESTION)
    assert fmt.prompt.endswith("<|im_start|>assistant\n<think>\n") and fmt.thinking_end == "</think>"
    assert fmt.needs_parser
    whole = fmt.parse(ANSWER)
    assert whole.content == "Yes, 7 is prime."
    assert whole.reasoning_content is not None and whole.reasoning_content.strip() == \
        "Seven has no divisor but 1 and itself."
    stream = fmt.stream()
    reasoning, content = "", ""
    for end in list(range(1, len(ANSWER), 3)) + [len(ANSWER)]:
        for delta in stream.update(ANSWER[:end], final=end == len(ANSWER)):
            if isinstance(delta, ReasoningDelta):
                assert not content, "reasoning after the content began"
                reasoning += delta.text
            else:
                assert isinstance(delta, str)
                content += delta
    assert (reasoning, content) == (whole.reasoning_content, whole.content)
    # reasoning_format 'none': nothing to read back; the text is the content.
    plain = format_chat(thinking, QUESTION, reasoning_format="none")
    assert not plain.needs_parser and plain.prompt == fmt.prompt


def test_enable_thinking_false_closes_the_reasoning_block(thinking: slot_cpp.Model) -> None:
    off = format_chat(thinking, QUESTION, enable_thinking=False)
    assert off.prompt.endswith("<think>\n\n</think>\n\n") and off.thinking_end is None
    by_kwargs = format_chat(thinking, QUESTION, chat_template_kwargs={"enable_thinking": False})
    assert by_kwargs.prompt == off.prompt
    assert off.parse("Yes.").content == "Yes." and off.parse("Yes.").reasoning_content is None
    with pytest.raises(TypeError, match="chat_template_kwargs must be a JSON object"):
        format_chat(thinking, QUESTION, chat_template_kwargs=[1, 2])


def test_a_grammar_applies_after_the_reasoning(thinking: slot_cpp.Model) -> None:
    grammar = 'root ::= "yes" | "no"'
    thinking_on = format_chat(thinking, QUESTION)
    r = thinking.generate(thinking_on.tokens, chat_format=thinking_on, grammar=grammar, max_tokens=12)
    # The reasoning is free text (the model does not close it within 12 tokens) ...
    assert r.text not in ("yes", "no") and "</think>" not in r.text and len(r.tokens) == 12
    # ... and the grammar binds from the first token when there is no reasoning.
    off = format_chat(thinking, QUESTION, enable_thinking=False)
    assert thinking.generate(off.tokens, chat_format=off, grammar=grammar, max_tokens=12).text in ("yes", "no")


def test_where_reasoning_is_optional_the_grammar_binds_from_the_first_token(smollm2_path: Path,
                                                                            tmp_path: Path) -> None:
    # The same template, but its generation prompt leaves opening <think> to the model.
    template = (DATA / "thinking_chatml.jinja").read_text().replace("{{- '<think>\\n' -}}", "{{- '' -}}")
    path = _with_template(smollm2_path, template, tmp_path / "optional.gguf")
    with slot_cpp.Model(path, n_ctx=512) as model:
        fmt = format_chat(model, QUESTION)
        assert fmt.thinking_end == "</think>" and fmt.prompt.endswith("<|im_start|>assistant\n")
        r = model.generate(fmt.tokens, chat_format=fmt, grammar='root ::= "yes" | "no"', max_tokens=8)
        assert r.text in ("yes", "no")


def _served(model: slot_cpp.Model, model_id: str) -> Iterator[str]:
    with running(model, ServerConfig(model_id=model_id, api_key="test-key")) as url:
        yield url


@pytest.fixture(scope="module")
def thinking_server(thinking: slot_cpp.Model) -> Iterator[str]:
    yield from _served(thinking, "smol-thinking")


def test_the_server_returns_reasoning_content_whole_and_streamed(thinking_server: str) -> None:
    c = client(thinking_server, "test-key")
    kwargs: dict[str, Any] = dict(model="smol-thinking", messages=QUESTION, max_tokens=24, temperature=0.0)
    whole = c.chat.completions.create(**kwargs).choices[0].message
    reasoning = getattr(whole, "reasoning_content", None)
    assert reasoning  # the prompt opened <think>: the answer begins inside it
    streamed = {"reasoning": "", "content": ""}
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            streamed["reasoning"] += getattr(ch.delta, "reasoning_content", None) or ""
            streamed["content"] += ch.delta.content or ""
    assert streamed == {"reasoning": reasoning, "content": whole.content or ""}
    # reasoning_format 'none': the same tokens, all in the content.
    raw = c.chat.completions.create(extra_body={"reasoning_format": "none"}, **kwargs).choices[0].message
    assert getattr(raw, "reasoning_content", None) is None and raw.content.startswith(reasoning.rstrip()[:10])
    # enable_thinking through chat_template_kwargs, as llama-server takes it.
    r = httpx.post(thinking_server + "/apply-template", headers={"Authorization": "Bearer test-key"},
                   json={"messages": QUESTION, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["prompt"].endswith("<think>\n\n</think>\n\n")
    r = httpx.post(thinking_server + "/v1/chat/completions", headers={"Authorization": "Bearer test-key"},
                   json={"messages": QUESTION, "reasoning_format": "sideways"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format"


# ---- tools on a template that cannot write calls --------------------------------------


def test_a_template_without_tools_gets_json_calls(gemma: slot_cpp.Model) -> None:
    fmt = format_chat(gemma, ASK, tools=[WEATHER, TIME], tool_choice="required")
    assert fmt.format == "json-call" and fmt.grammar and not fmt.lazy
    assert "get_weather" in fmt.prompt and fmt.prompt.startswith("<start_of_turn>user\n")
    r = gemma.generate(fmt.tokens, chat_format=fmt, max_tokens=64)
    message = fmt.parse(r.text)
    assert len(message.tool_calls) == 1 and message.tool_calls[0].name in ("get_weather", "get_time")
    assert set(message.tool_calls[0].parsed_arguments()) == {"city"}
    named = format_chat(gemma, ASK, tools=[WEATHER, TIME],
                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    r = gemma.generate(named.tokens, chat_format=named, max_tokens=64, temperature=0.8, seed=1)
    assert [c.name for c in named.parse(r.text).tool_calls] == ["get_time"]
    # auto: the grammar waits for an answer that begins a JSON object.
    auto = format_chat(gemma, ASK, tools=[WEATHER])
    assert auto.lazy and auto.parse("It is sunny.").content == "It is sunny."
    assert auto.parse(' {"name": "get_weather", "arguments": {"city": "Rome"}}').tool_calls[0].name == "get_weather"
    # A call and its result in the history are written as text the template renders.
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    text = format_chat(gemma, history, tools=[WEATHER], tool_choice="none").prompt
    assert '{"name":"get_weather","arguments":{"city":"Paris"}}' in text
    assert "The result of get_weather: sunny, 21 C" in text
    # Two results and the user's next message are one user turn (turns alternate).
    two = history[:1] + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "sunny"}, {"role": "tool", "tool_call_id": "b", "content": "rain"},
        {"role": "user", "content": "Which is warmer?"}]
    text = format_chat(gemma, two, tools=[WEATHER], tool_choice="none").prompt
    assert text.count("<start_of_turn>user") == 2 and "get_weather: rain\n\nWhich is warmer?" in text
    # A function whose parameters cannot be a grammar is a clear error.
    bad = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"$ref": "#/definitions/nope"}}}}}
    with pytest.raises(ValueError, match="cannot be made a grammar"):
        format_chat(gemma, ASK, tools=[bad], tool_choice="required")


@pytest.fixture(scope="module")
def gemma_server(gemma: slot_cpp.Model) -> Iterator[str]:
    yield from _served(gemma, "gemma")


def test_required_gives_a_call_on_the_embedded_model_through_the_openai_client(gemma_server: str) -> None:
    c = client(gemma_server, "test-key")
    kwargs: dict[str, Any] = dict(model="gemma", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                  max_tokens=64, temperature=0.0)
    whole = c.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.tool_calls
    call = whole.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time") and "city" in json.loads(call.function.arguments)
    calls: dict[int, dict[str, str]] = {}
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                entry["name"] += d.function.name or ""
                entry["arguments"] += d.function.arguments or ""
    assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == \
        [(call.function.name, json.loads(call.function.arguments))]
    named = c.chat.completions.create(**{**kwargs, "temperature": 0.9, "seed": 4, "tool_choice": {
        "type": "function", "function": {"name": "get_time"}}}).choices[0]
    assert [t.function.name for t in named.message.tool_calls] == ["get_time"]
    # The tool's result goes back; the next answer is text.
    messages: list[Any] = ASK + [whole.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = c.chat.completions.create(model="gemma", messages=messages, tools=[WEATHER], tool_choice="none",
                                       max_tokens=16, temperature=0.0).choices[0]
    assert second.message.tool_calls is None and second.message.content


def test_stream_deltas_of_a_plain_chat_are_its_text(gemma_server: str) -> None:
    # No tools, no reasoning: nothing is parsed, the text is the content.
    c = client(gemma_server, "test-key")
    kwargs: dict[str, Any] = dict(model="gemma", messages=QUESTION, max_tokens=16, temperature=0.0)
    whole = c.chat.completions.create(**kwargs).choices[0].message
    text = "".join(ch.delta.content or "" for chunk in c.chat.completions.create(stream=True, **kwargs)
                   for ch in chunk.choices)
    assert text == whole.content and getattr(whole, "reasoning_content", None) is None


def test_the_command_line_takes_the_template_variables(thinking: slot_cpp.Model, capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    from slot_cpp.cli import main

    counts = {}
    for flags in ([], ["--no-enable-thinking"], ["--chat-template-kwargs", '{"enable_thinking": false}']):
        assert main(["generate", "Is 7 a prime number?", "--model", thinking.path, "--chat", "--steps", "0",
                     "--max-tokens", "1", "--n-ctx", "512", "--json", *flags]) == 0
        counts[len(flags)] = json.loads(capsys.readouterr().out)["prompt_tokens"]
    off = len(thinking.tokenize(format_chat(thinking, QUESTION, enable_thinking=False).prompt))
    assert counts[1] == counts[2] == off > counts[0]


# ---- a chat longer than the context ------------------------------------------------


def _long_chat(turns: int) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": "You are terse."}]
    for i in range(turns):
        chat += [{"role": "user", "content": f"Tell me fact number {i} about the sea, in detail please."},
                 {"role": "assistant", "content": f"Fact {i}: the sea is large, salty and deep in many places."}]
    return chat + [{"role": "user", "content": "Which fact was the last one?"}]


def test_the_oldest_turns_are_dropped_when_a_chat_outgrows_the_context(gemma_path: Path) -> None:
    chat = _long_chat(12)
    with slot_cpp.Model(gemma_path, n_ctx=256, n_parallel=1) as model:
        whole = format_chat(model, chat)
        assert len(whole.tokens) > model.seq_capacity  # it does not fit
        fmt = format_chat(model, chat, drop_oldest_turns=True, prompt_budget=model.seq_capacity - 16)
        assert len(fmt.tokens) <= model.seq_capacity - 16 and fmt.dropped_messages % 2 == 0 < fmt.dropped_messages
        assert fmt.prompt == format_chat(model, chat[:1] + chat[1 + fmt.dropped_messages:]).prompt
        assert "You are terse." in fmt.prompt and "Which fact was the last one?" in fmt.prompt
        assert model.generate(fmt.tokens, max_tokens=16).tokens
        with pytest.raises(ValueError, match="last user message"):
            format_chat(model, chat, drop_oldest_turns=True, prompt_budget=20)
        with running(model, ServerConfig(model_id="small")) as url, httpx.Client(base_url=url, timeout=120) as http:
            body: dict[str, Any] = {"messages": chat, "max_tokens": 16}
            r = http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
            r = http.post("/v1/chat/completions", json={**body, "drop_oldest_turns": True})
            assert r.status_code == 200 and r.json()["slot_cpp"]["dropped_messages"] == fmt.dropped_messages
            assert r.json()["usage"]["prompt_tokens"] == len(fmt.tokens)
