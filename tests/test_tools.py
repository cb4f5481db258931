"""Tool calls: SmolLM2-135M-Instruct with a tool-capable ChatML template
(written into a copy of its GGUF), rendered and parsed by llama.cpp's
common/chat; forced calls through the grammar; the server's tools and
tool_choice through the official openai client."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

import slot_cpp
from slot_cpp.chat import ChatStream, ToolCallDelta, format_chat
from slot_cpp.server import ServerConfig

from test_server import client, running

TEMPLATE = Path(__file__).parent / "data" / "tool_chatml.jinja"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def tool_path(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tools") / "smollm2-tools.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_path), str(out),
                    "--chat-template-file", str(TEMPLATE), "--force"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def tool_model(tool_path: Path) -> Iterator[slot_cpp.Model]:
    model = slot_cpp.Model(tool_path, n_ctx=2048, n_parallel=4, seed=7)
    yield model
    model.close()


def _check_call(call: Any, tools: list[dict[str, Any]]) -> None:
    """A call names one of the tools and its arguments satisfy that tool's schema."""
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.name in by_name
    args = json.loads(call.arguments)
    schema = by_name[call.name]
    assert isinstance(args, dict)
    assert set(schema["required"]) <= set(args) <= set(schema["properties"])
    for key, value in args.items():
        spec = schema["properties"][key]
        assert isinstance(value, str)
        if "enum" in spec:
            assert value in spec["enum"]


def test_the_template_renders_tools_and_the_format_is_recognised(tool_model: slot_cpp.Model) -> None:
    fmt = format_chat(tool_model, ASK, tools=TOOLS)
    assert '"name": "get_weather"' in fmt.prompt and '"name": "get_time"' in fmt.prompt
    assert fmt.prompt.endswith("<|im_start|>assistant\n")
    assert fmt.grammar is not None and fmt.lazy and fmt.parse_tool_calls
    required = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="required")
    assert required.grammar is not None and not required.lazy
    none = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="none")
    assert none.grammar is None and not none.parse_tool_calls
    # A history with a call and its result renders too (the round trip's second turn).
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    again = format_chat(tool_model, history, tools=TOOLS)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in again.prompt
    assert "<|im_start|>tool\nsunny, 21 C<|im_end|>" in again.prompt


def test_the_parser_reads_calls_only_when_calls_are_allowed(tool_model: slot_cpp.Model) -> None:
    answer = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    read = format_chat(tool_model, ASK, tools=TOOLS).parse(answer)
    assert [(c.name, c.parsed_arguments()) for c in read.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert read.tool_calls[0].id.startswith("call_") and read.content is None
    # tool_choice "none": the same text is content, never a call.
    plain = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="none").parse(answer)
    assert plain.tool_calls == [] and plain.content == answer
    # Text that is not a call stays text.
    assert format_chat(tool_model, ASK, tools=TOOLS).parse("It is sunny.").content == "It is sunny."


def test_required_always_yields_a_valid_call(tool_model: slot_cpp.Model) -> None:
    fmt = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for r in tool_model.generate_batch([fmt.tokens], n=4, chat_format=fmt, temperature=1.0, max_tokens=96, seed=1):
        message = fmt.parse(r.text)
        assert len(message.tool_calls) == 1, r.text  # parallel_tool_calls off: the first call
        _check_call(message.tool_calls[0], TOOLS)


def test_a_named_function_is_the_one_called(tool_model: slot_cpp.Model) -> None:
    fmt = format_chat(tool_model, ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
                      parallel_tool_calls=False)
    assert '"name": "get_weather"' not in fmt.prompt
    for r in tool_model.generate_batch([fmt.tokens], n=4, chat_format=fmt, temperature=1.0, max_tokens=96, seed=3):
        calls = fmt.parse(r.text).tool_calls
        assert calls and all(c.name == "get_time" for c in calls)
        for call in calls:
            _check_call(call, TOOLS)


def test_auto_constrains_a_call_once_the_model_begins_one(tool_model: slot_cpp.Model) -> None:
    """The lazy grammar: free text until the trigger, then a well-formed call.
    The answer is begun with the trigger (a response prefix, which the
    grammar reads too)."""
    fmt = format_chat(tool_model, ASK, tools=TOOLS)
    prefix = tool_model.tokenize("<tool_call>", add_special=False)
    for seed in (4, 5):
        r = tool_model.generate(fmt.prompt, chat_format=fmt, response_prefix=prefix, temperature=1.0,
                                max_tokens=64, seed=seed)
        calls = fmt.parse("<tool_call>" + r.text).tool_calls
        assert calls, r.text
        for call in calls:
            _check_call(call, TOOLS)
    # Without the grammar the same draws are not all calls (the check can fail).
    broken = 0
    for seed in (4, 5):
        r = tool_model.generate(fmt.prompt, response_prefix=prefix, temperature=1.0, max_tokens=64, seed=seed)
        try:
            calls = fmt.parse("<tool_call>" + r.text).tool_calls
            for call in calls:
                _check_call(call, TOOLS)
            broken += not calls
        except (AssertionError, ValueError):
            broken += 1
    assert broken > 0


def test_streamed_deltas_join_to_the_whole_answer(tool_model: slot_cpp.Model) -> None:
    fmt = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=True)
    r = tool_model.generate(fmt.prompt, chat_format=fmt, temperature=0.8, max_tokens=96, seed=11)
    whole = fmt.parse(r.text)
    stream: ChatStream = fmt.stream()
    content, calls = "", {}
    text = ""
    for token in r.tokens:
        text += tool_model.detokenize([token])
        for d in stream.update(text):
            if isinstance(d, str):
                content += d
            else:
                assert isinstance(d, ToolCallDelta)
                entry = calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})
                entry["arguments"] += d.arguments
    for d in stream.update(r.text, final=True):
        if isinstance(d, str):
            content += d
        else:
            calls.setdefault(d.index, {"id": d.id, "name": d.name, "arguments": ""})["arguments"] += d.arguments
    assert (content or None) == whole.content
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == \
        [(c.name, c.parsed_arguments()) for c in whole.tool_calls]


def test_bad_tools_are_clear_errors(tool_model: slot_cpp.Model) -> None:
    with pytest.raises(ValueError, match="not among the tools"):
        format_chat(tool_model, ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs tools"):
        format_chat(tool_model, ASK, tool_choice="required")
    with pytest.raises(ValueError, match="tool_choice"):
        format_chat(tool_model, ASK, tools=TOOLS, tool_choice="sometimes")
    with pytest.raises(ValueError, match="distinct"):
        format_chat(tool_model, ASK, tools=[WEATHER, WEATHER])
    with pytest.raises(ValueError, match="messages"):
        format_chat(tool_model, [{"role": "wizard", "content": "hi"}], tools=TOOLS)
    fmt = format_chat(tool_model, ASK, tools=TOOLS, tool_choice="required")
    with pytest.raises(ValueError, match="not both"):
        tool_model.generate(fmt.prompt, chat_format=fmt, grammar='root ::= "x"', max_tokens=4)
    # The model is still usable.
    assert tool_model.generate(fmt.prompt, chat_format=fmt, max_tokens=48, seed=1).tokens


# ---- the server, through the openai client ---------------------------------------------


@pytest.fixture(scope="module")
def tool_server(tool_model: slot_cpp.Model) -> Iterator[str]:
    with running(tool_model, ServerConfig(model_id="smol-tools", api_key="test-key")) as url:
        yield url


def test_a_tool_calling_round_trip_through_the_openai_client(tool_server: str) -> None:
    c = client(tool_server)
    messages: list[Any] = list(ASK)
    first = c.chat.completions.create(model="smol-tools", messages=messages, tools=TOOLS, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=96, seed=5, temperature=0.7)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id
    for call in calls:
        _check_call(call.function, TOOLS)
    # The assistant's message goes back as the client received it, then the tool's result.
    messages.append(choice.message)
    messages += [{"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"} for call in calls]
    second = c.chat.completions.create(model="smol-tools", messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=32, seed=5)
    assert second.choices[0].message.tool_calls is None
    assert isinstance(second.choices[0].message.content, str) and second.choices[0].message.content
    assert second.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_calls_join_to_the_whole_response(tool_server: str) -> None:
    c = client(tool_server)
    kwargs: dict[str, Any] = dict(model="smol-tools", messages=ASK, tools=TOOLS, tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=64, temperature=0.0)
    whole = c.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
                if d.function.name:
                    entry["name"] = d.function.name
                entry["arguments"] += d.function.arguments or ""
            finish = ch.finish_reason or finish
    assert finish == "tool_calls" == whole.finish_reason
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]


def test_the_server_refuses_bad_tool_requests(tool_server: str) -> None:
    c = client(tool_server)
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        c.chat.completions.create(model="smol-tools", messages=ASK, tools=TOOLS,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="not both"):
        c.chat.completions.create(model="smol-tools", messages=ASK, tools=TOOLS,
                                  response_format={"type": "json_object"})
    r = httpx.post(tool_server + "/v1/chat/completions", headers={"Authorization": "Bearer test-key"},
                   json={"messages": [{"role": "user"}], "tools": TOOLS})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="smol-tools", messages=ASK, tools=[{"type": "function",
                                                                            "function": {"name": "bad name!"}}])
