"""What llama-server clients read beside the OpenAI API: ``timings`` and
``usage.prompt_tokens_details.cached_tokens`` in answers, ``/props``,
``/apply-template``, several API keys from a file, and CORS for browser
clients. A real uvicorn server on the embedded model, the official openai
client where it can speak."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest

import slot_cpp
from slot_cpp.server import ServerConfig, create_app
from test_server import running

KEYS = ("first-key", "second-key")
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def server(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, slot_cpp.Model]]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# one key per line\n{KEYS[0]}\n\n{KEYS[1]}\n")
    model = slot_cpp.Model(gemma_path, n_ctx=4096, n_parallel=2)
    config = ServerConfig(model_id="m", api_key_file=str(key_file), cors_origins=(ORIGIN,))
    with running(model, config) as url:
        yield url, model
    model.close()


def _http(url: str, key: str = KEYS[0]) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_cached_tokens_and_timings_of_a_whole_answer(server: tuple[str, slot_cpp.Model]) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEYS[1], max_retries=0)
    prompt = "A list of the planets of the solar system, in order from the sun:"
    first = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    again = client.completions.create(model="m", prompt=prompt, max_tokens=8, temperature=0)
    assert first.usage is not None and again.usage is not None
    assert first.usage.prompt_tokens_details is not None and again.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # All but the last prompt token came from the cache (the last is evaluated for its logits).
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    timings = (again.model_extra or {})["timings"]
    assert timings["cache_n"] + timings["prompt_n"] == again.usage.prompt_tokens
    assert timings["predicted_n"] == again.usage.completion_tokens
    assert timings["prompt_ms"] > 0 and timings["predicted_ms"] > 0
    assert timings["predicted_per_second"] == pytest.approx(1000 * timings["predicted_n"] / timings["predicted_ms"])
    client.close()


def test_timings_and_cached_tokens_in_a_stream(server: tuple[str, slot_cpp.Model]) -> None:
    url, _ = server
    body = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with _http(url) as http:
        chunks = []
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and "timings" in finishing[0]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == finishing[0]["timings"]["cache_n"]
    assert finishing[0]["timings"]["predicted_n"] == usage["completion_tokens"]


def test_props(server: tuple[str, slot_cpp.Model]) -> None:
    url, model = server
    with _http(url) as http:
        props = http.get("/props").json()
    assert props["total_slots"] == model.n_parallel
    assert props["default_generation_settings"]["n_ctx"] == model.seq_capacity
    assert props["default_generation_settings"]["params"]["temperature"] == 1.0  # the HTTP default
    assert props["chat_template"] == "gemma"  # the GGUF has none: llama.cpp's built-in for its architecture
    assert props["model_alias"] == "m" and props["model_path"] == model.path


def test_apply_template_gives_the_prompt_a_chat_generates_from(server: tuple[str, slot_cpp.Model]) -> None:
    url, model = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    with _http(url) as http:
        r = http.post("/apply-template", json={"messages": messages})
        assert r.status_code == 200, r.text
        prompt = r.json()["prompt"]
        done = http.post("/v1/chat/completions", json={"model": "m", "messages": messages, "max_tokens": 1}).json()
        bad = http.post("/apply-template", json={"messages": [{"role": "wizard", "content": "x"}]})
    assert prompt == model.apply_chat_template(messages)
    assert done["usage"]["prompt_tokens"] == len(model.tokenize(prompt))
    assert bad.status_code == 400 and bad.json()["error"]["param"]


def test_every_key_of_the_file_and_no_other(server: tuple[str, slot_cpp.Model]) -> None:
    url, _ = server
    for key, status in ((KEYS[0], 200), (KEYS[1], 200), ("third-key", 401), (KEYS[0] + "x", 401)):
        with _http(url, key) as http:
            assert http.get("/v1/models").status_code == status, key
            assert http.get("/props").status_code == status, key


def test_an_empty_or_missing_key_file_is_refused(gemma: slot_cpp.Model, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app(gemma, ServerConfig(api_key_file=str(empty)))
    with pytest.raises(ValueError, match="cannot read"):
        create_app(gemma, ServerConfig(api_key_file=str(tmp_path / "missing.txt")))


def test_cors_for_the_allowed_origin_only(server: tuple[str, slot_cpp.Model]) -> None:
    url, _ = server
    preflight: dict[str, Any] = {"Access-Control-Request-Method": "POST",
                                 "Access-Control-Request-Headers": "authorization,content-type"}
    with httpx.Client(base_url=url, timeout=60) as http:
        ok = http.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
        other = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight})
        get = http.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEYS[0]}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in other.headers
    assert get.status_code == 200 and get.headers["access-control-allow-origin"] == ORIGIN
