"""The OpenAI-compatible server: a real uvicorn server on a free local port,
driven by the official ``openai`` client (and raw HTTP for what the client
refuses to send)."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from pydantic import BaseModel, Field

import slot_cpp
from slot_cpp.qalign import LinearReward
from slot_cpp.rtd import Datastore
from slot_cpp.server import ServerConfig, create_app
from slot_cpp import probes

KEY = "test-key"
TIE = 0.1  # as in test_concurrency: a near-tie of the peaked model's top two tokens


@contextmanager
def running(model: slot_cpp.Model, config: ServerConfig) -> Iterator[str]:
    """Serves `model` on a free loopback port; yields the base URL."""
    app = create_app(model, config)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.slot_cpp.close()


_CLIENTS: list[openai.OpenAI] = []


def client(url: str, key: str = KEY) -> openai.OpenAI:
    c = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)
    _CLIENTS.append(c)
    return c


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Closes each test's clients, so that no connection is left to the garbage collector."""
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


FACTS = [{"prompt": "The colour of the sky is", "completion": " blue, and the grass is green."},
         {"prompt": "Water boils at", "completion": " one hundred degrees Celsius."}]


@pytest.fixture(scope="module")
def served(gemma: slot_cpp.Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, slot_cpp.Model]]:
    """Gemma behind a server with a key, a datastore and a reward head."""
    tmp = tmp_path_factory.mktemp("server")
    store = Datastore.build(gemma, FACTS, progress=False)
    store_path = tmp / "facts.slotrtd"
    store.save(store_path)
    rng = np.random.default_rng(0)
    head_path = str(tmp / "head.npz")
    LinearReward(gemma, rng.normal(size=gemma.n_embd) / np.sqrt(gemma.n_embd), 0.0).save(head_path)
    config = ServerConfig(model_id="gemma-3-270m", api_key=KEY, chat_template="gemma",
                          datastores={"facts": str(store_path)}, rewards={"head": "head:" + head_path},
                          max_tokens_cap=512)
    with running(gemma, config) as url:
        yield url, gemma


PROMPT = "Question: What is the capital of France?\nAnswer:"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.mark.slow
def test_streaming_equals_non_streaming_and_usage_counts(served):
    url, model = served
    c = client(url)
    # Each pair is computed from the same state of the KV cache, so the same
    # rounding (README, "Rounding").
    model.clear_cache()
    chat = c.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=24, temperature=0,
                                     logprobs=True)
    model.clear_cache()
    pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="gemma-3-270m", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}) if ch.choices]
    assert chat.choices[0].message.content and "".join(pieces) == chat.choices[0].message.content
    chat_prompt = model.prompt_tokens(MESSAGES, chat_template="gemma")
    assert chat.usage.prompt_tokens == len(chat_prompt)
    assert chat.usage.completion_tokens == len(chat.choices[0].logprobs.content)

    model.clear_cache()
    text = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=16, temperature=0, logprobs=3)
    model.clear_cache()
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="gemma-3-270m", prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
    assert text.choices[0].text and streamed == text.choices[0].text
    assert text.usage.prompt_tokens == len(model.tokenize(PROMPT))
    lp = text.choices[0].logprobs
    assert text.usage.completion_tokens == len(lp.tokens) == len(lp.token_logprobs)
    assert "".join(lp.tokens) == text.choices[0].text
    # Greedy: each chosen token is the most likely one, so its logprob is the top one.
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen == pytest.approx(max(top.values()), abs=1e-6)


@pytest.mark.slow
def test_n_seed_and_stop(served):
    url, model = served
    c = client(url)
    kw: dict[str, Any] = dict(model="gemma-3-270m", prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3)
    # Same seed, same state of the KV cache: same samples. (Where cells sit
    # and what is batched together changes rounding, which sampling can
    # amplify; README says so.)
    model.clear_cache()
    a = c.completions.create(seed=7, **kw)
    model.clear_cache()
    b = c.completions.create(seed=7, **kw)
    model.clear_cache()
    other = c.completions.create(seed=8, **kw)
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert texts == [ch.text for ch in b.choices]
    assert len(set(texts)) > 1 and texts != [ch.text for ch in other.choices]
    assert a.usage.completion_tokens <= 3 * 12

    stopped = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=32, temperature=0,
                                   stop=["\nQuestion:", "never"])
    full = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=32, temperature=0)
    assert "\nQuestion:" in full.choices[0].text, "the test needs an answer that runs on"
    assert stopped.choices[0].finish_reason == "stop" and full.choices[0].finish_reason == "length"
    assert stopped.choices[0].text == full.choices[0].text.split("\nQuestion:")[0]


@pytest.mark.slow
def test_slot_rtd_and_qalign_through_extra_body(served):
    url, _ = served
    c = client(url)
    plain = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1)
    slot = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1,
                                extra_body={"slot": {"steps": 4, "lr": 0.1}})
    report = slot.model_extra["slot_cpp"]["slot"]
    assert report["steps_done"] == 4 and len(report["losses"]) == 4 and report["delta_norm"] > 0
    assert report["losses"][-1] < report["losses"][0]
    # delta shifts the distribution: the first token's log-probability moves.
    assert abs(slot.choices[0].logprobs.token_logprobs[0] - plain.choices[0].logprobs.token_logprobs[0]) > 1e-3
    assert "slot_cpp" not in (plain.model_extra or {})
    auto = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2, temperature=0,
                                extra_body={"slot": {"steps": 5, "lr": "auto"}})
    auto_report = auto.model_extra["slot_cpp"]["slot"]
    ladder = auto_report["calibration"]
    assert [row["lr"] for row in ladder] == pytest.approx([0.003 * 2.0 ** e for e in range(-4, 5)])
    above = next(i for i, row in enumerate(ladder) if row["kl"] > 0.002)
    assert ladder[above - 1]["lr"] < auto_report["lr_used"] < ladder[above]["lr"]
    # A larger budget, asked for in the request, allows a larger step.
    wider = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2, temperature=0,
                                 extra_body={"slot": {"steps": 5, "lr": "auto", "kl_budget": 0.008}})
    assert wider.model_extra["slot_cpp"]["slot"]["lr_used"] > auto_report["lr_used"]
    # SLOT's loss on the user's message content only (chat).
    both = [c.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=2, temperature=0,
                                      extra_body={"slot": {"steps": 2, "lr": 0.01, "loss_on": on}})
            for on in ("all", "user")]
    reports = [b.model_extra["slot_cpp"]["slot"] for b in both]
    assert [r["loss_on"] for r in reports] == ["all", "user"]
    assert reports[0]["losses"][0] != pytest.approx(reports[1]["losses"][0])
    with pytest.raises(openai.BadRequestError, match="chat messages"):
        c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2,
                             extra_body={"slot": {"steps": 2, "loss_on": "user"}})
    # SLOT's loss on a few-shot prompt's last block (its question) only.
    few_shot = "Question: What is 2 + 3?\nAnswer: 5\n\nQuestion: What is 4 + 4?\nAnswer:"
    both = [c.completions.create(model="gemma-3-270m", prompt=few_shot, max_tokens=2, temperature=0,
                                 extra_body={"slot": {"steps": 2, "lr": 0.01, "loss_on": on}})
            for on in ("all", "last")]
    reports = [b.model_extra["slot_cpp"]["slot"] for b in both]
    assert [r["loss_on"] for r in reports] == ["all", "last"]
    assert reports[0]["losses"][0] != pytest.approx(reports[1]["losses"][0])

    # lambda = 1: pure retrieval; every token comes from the datastore's values.
    rtd = c.completions.create(model="gemma-3-270m", prompt="The colour of the sky is", max_tokens=6,
                               temperature=0, logprobs=1,
                               extra_body={"rtd": {"datastore": "facts", "k": 4, "lambda": 1.0, "gate": False}})
    applied = rtd.model_extra["slot_cpp"]["rtd"]
    assert applied["datastore"] == "facts" and applied["k"] == 4 and applied["lambda"] == 1.0
    assert applied["gate"] is False
    store_text = " blue, and the grass is green. one hundred degrees Celsius."
    assert all(tok in store_text for tok in rtd.choices[0].logprobs.tokens)

    qa = c.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=12, temperature=1.0,
                                   seed=3, extra_body={"qalign": {"steps": 4, "beta": 1.0, "reward": "head"}})
    q = qa.model_extra["slot_cpp"]["qalign"]
    assert q["steps"] == 4 and 0.0 <= q["accept_rate"] <= 1.0 and np.isfinite(q["final_reward"])
    assert qa.choices[0].message.content
    # RTD shapes QAlign's proposals: at lambda = 1 every state is a token of the datastore's values.
    url, model = served
    store_pieces = {model.detokenize([t]) for row in FACTS
                    for t in model.tokenize(row["prompt"] + row["completion"])[len(model.tokenize(row["prompt"])):]}
    shaped = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=1, temperature=1.0, seed=5,
                                  extra_body={"qalign": {"steps": 4, "reward": "head"},
                                              "rtd": {"datastore": "facts", "k": 4, "lambda": 1.0, "gate": False}})
    assert shaped.model_extra["slot_cpp"]["rtd"]["lambda"] == 1.0
    assert shaped.choices[0].text in store_pieces

    with pytest.raises(openai.BadRequestError, match="unknown datastore"):
        c.completions.create(model="gemma-3-270m", prompt="x", max_tokens=2,
                             extra_body={"rtd": {"datastore": "/etc/passwd"}})
    with pytest.raises(openai.BadRequestError, match="unknown reward"):
        c.completions.create(model="gemma-3-270m", prompt="x", max_tokens=2,
                             extra_body={"qalign": {"reward": "nope"}})


@pytest.mark.slow
def test_openai_penalties_and_logit_bias_through_the_client(served):
    url, model = served
    c = client(url)
    forced = model.tokenize(" Paris", add_special=False)[0]
    r = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=3, temperature=1.0, seed=1,
                             logit_bias={str(forced): 100})
    assert r.choices[0].text == model.detokenize([forced] * 3)
    plain = c.completions.create(model="gemma-3-270m", prompt="Once upon a time", max_tokens=16, temperature=0)
    # Both evaluate the prompt afresh, so that no earlier call's cells change the rounding.
    penalised = c.completions.create(model="gemma-3-270m", prompt="Once upon a time", max_tokens=16, temperature=0,
                                     presence_penalty=2.0, frequency_penalty=2.0, extra_body={"cache_prompt": False})
    direct = model.generate("Once upon a time", max_tokens=16, presence_penalty=2.0, frequency_penalty=2.0,
                            top_k=0, top_p=1.0, min_p=0.0, cache_prompt=False)
    assert penalised.choices[0].text == direct.text
    assert plain.choices[0].text != penalised.choices[0].text
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "logit_bias": {"x": 1}},
                     headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logit_bias"


def test_bad_requests_get_openai_errors_and_the_server_lives(served):
    url, _ = served
    c = client(url)
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").models.list()
    assert httpx.get(url + "/v1/models").status_code == 401
    assert [m.id for m in c.models.list().data] == ["gemma-3-270m"]
    with pytest.raises(openai.NotFoundError) as e404:
        c.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e404.value.body["code"] == "model_not_found"

    headers = {"Authorization": f"Bearer {KEY}"}

    def post(path: str, body: Any = None, content: bytes | None = None) -> httpx.Response:
        return httpx.post(url + path, json=body, content=content, headers=headers, timeout=60)

    cases = [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"prompt": "x", "slot": {"steps": 5, "lr": -1}}, "slot.lr"),
        ({"prompt": "x", "slot": {"steps": 5, "lr": "auto", "kl_budget": 0}}, "slot.kl_budget"),
    ]
    for body, param in cases:
        r = post("/v1/completions", body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"], body
        assert err["param"] == param, (body, err)
    r = post("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")
    r = post("/v1/chat/completions", {"messages": []})
    assert r.status_code == 400
    r = post("/v1/completions", content=b"{not json", )
    assert r.status_code == 400
    r = post("/v1/completions", {"prompt": "word " * 3000, "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    ok = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, temperature=0)
    assert ok.choices[0].text

    metrics = httpx.get(url + "/metrics").text
    assert 'slot_cpp_requests_total{endpoint="/v1/completions",status="400"}' in metrics
    assert "slot_cpp_queue_depth 0" in metrics and "slot_cpp_completion_tokens_total" in metrics


@pytest.mark.slow
def test_disconnect_mid_stream_frees_the_sequence(served):
    url, model = served
    before = model.stats()
    body = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
        assert model.stats().live_sequences == 1
    # 500 tokens take seconds; the cancelled call frees its sequence within a step.
    deadline = time.monotonic() + 3.0
    while model.stats().live_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    after = model.stats()
    assert after.live_sequences == 0
    # The call ended (stopped by its callback or cancelled) far short of 500 tokens.
    assert after.completed_calls + after.failed_calls == before.completed_calls + before.failed_calls + 1
    assert after.generated_tokens - before.generated_tokens < 100
    c = client(url)
    assert c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text


@pytest.mark.slow
def test_overload_answers_503_with_retry_after(gemma_path: Path):
    with slot_cpp.Model(gemma_path, n_ctx=1024, n_parallel=1) as model:
        config = ServerConfig(model_id="g", max_waiting=0)
        with running(model, config) as url:
            c = client(url)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                long = pool.submit(c.completions.create, model="g", prompt="Once upon a time", max_tokens=300,
                                   temperature=0)
                deadline = time.monotonic() + 30
                while model.stats().live_sequences == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "overloaded"
                with pytest.raises(openai.InternalServerError):  # the client's class for 5xx
                    c.completions.create(model="g", prompt="hi", max_tokens=2)
                assert long.result().choices[0].text
            assert c.completions.create(model="g", prompt="hi", max_tokens=2).choices[0].text is not None


def test_concurrent_streams_equal_sequential_calls(peaked_path: Path):
    prompts = [f"Item {i}: the number {i * 7} and" for i in range(16)]
    with slot_cpp.Model(peaked_path, n_ctx=2048, n_parallel=4) as model:
        with running(model, ServerConfig(model_id="tiny", max_waiting=16)) as url:
            c = client(url)
            # Without the prompt cache, a prompt's evaluation does not depend
            # on what earlier calls left behind (see README on rounding).
            fresh = {"cache_prompt": False}
            sequential = [c.completions.create(model="tiny", prompt=p, max_tokens=20, temperature=0, logprobs=2,
                                               extra_body=fresh).choices[0] for p in prompts]

            def stream(p: str) -> str:
                return "".join(ch.choices[0].text for ch in c.completions.create(
                    model="tiny", prompt=p, max_tokens=20, temperature=0, stream=True, extra_body=fresh))

            start = model.stats()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                concurrent_texts = list(pool.map(stream, prompts))
            end = model.stats()
    parted = 0
    for text, ref in zip(concurrent_texts, sequential):
        if text == ref.text:
            continue
        # Decoded beside others, a sequence rounds differently: it may part
        # from the sequential text only where the top two tokens tie.
        parted += 1
        at = next(i for i, (a, b) in enumerate(zip(text, ref.text)) if a != b) if text[:len(ref.text)] != ref.text \
            else len(ref.text)
        k = max(i for i, offset in enumerate(ref.logprobs.text_offset) if offset <= at)
        top = sorted(ref.logprobs.top_logprobs[k].values(), reverse=True)
        assert len(top) == 2 and top[0] - top[1] < TIE, (k, top, text, ref.text)
    assert parted <= 2
    assert all(r.text for r in sequential) and len({r.text for r in sequential}) > 1
    assert end.completed_calls - start.completed_calls == 16 and end.failed_calls == start.failed_calls
    # They decoded together: far fewer token steps than tokens.
    tokens, steps = end.generated_tokens - start.generated_tokens, end.decode_steps - start.decode_steps
    assert tokens > 2 * steps, (tokens, steps)


def test_lmcor_through_extra_body(peaked_path: Path):
    from slot_cpp.lmcor import Corrector

    with slot_cpp.Model(peaked_path, n_ctx=2048, n_parallel=4) as model:
        config = ServerConfig(model_id="tiny", correctors={"self": str(peaked_path)}, chat_template="chatml")
        with running(model, config) as url:
            c = client(url)
            r = c.completions.create(model="tiny", prompt="Fix: the cat sat", max_tokens=12, seed=5,
                                     extra_body={"lmcor": {"corrector": "self", "k": 3, "temperature": 1.0}})
            bare = c.completions.create(model="tiny", prompt="Fix: the cat sat", max_tokens=4, seed=5,
                                        extra_body={"lmcor": {"corrector": "self", "k": 2, "input": "the cat sat"}})
            assert bare.model_extra["slot_cpp"]["lmcor"]["input"] == "the cat sat"
            report = r.model_extra["slot_cpp"]["lmcor"]
            assert report["input"] == "Fix: the cat sat" and report["k"] == 3 and len(report["candidates"]) == 3
            assert report["dropped"] == 0 and report["generator_tokens"] > 0
            assert report["finish_reason"] in ("eos", "length", "stop")
            assert r.usage.completion_tokens == report["corrector_tokens"]
            chat = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                     {"role": "user", "content": "a b c"}],
                                             max_tokens=8, extra_body={"lmcor": {"corrector": "self", "k": 2}})
            assert chat.model_extra["slot_cpp"]["lmcor"]["input"] == "a b c"
            streamed = list(c.completions.create(model="tiny", prompt="Fix: the cat sat", max_tokens=12, seed=5,
                                                 stream=True, extra_body={"lmcor": {"corrector": "self", "k": 3,
                                                                                    "temperature": 1.0}}))
            for bad, param in (({"corrector": "nope"}, "lmcor.corrector"), ({"corrector": "self", "k": 0}, None)):
                resp = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "lmcor": bad},
                                  timeout=30)
                assert resp.status_code == 400
                if param:
                    assert resp.json()["error"]["param"] == param
            resp = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 2, "lmcor": {"corrector": "self"}},
                              timeout=30)
            assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"
    # The answer is the corrector's rewrite of exactly those candidates (a fresh
    # model of the server's shape, so that the numerics are the same).
    with slot_cpp.Model(peaked_path, n_ctx=2048 * 4, n_parallel=4) as corrector_model:
        local = Corrector(corrector_model).rewrite("Fix: the cat sat", report["candidates"])
    assert r.choices[0].text == local.text
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_cli_serve_runs_a_real_server_process(peaked_path: Path):
    import signal
    import subprocess
    import sys

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "slot_cpp", "serve", "--model", str(peaked_path), "--port",
                             str(port), "--n-ctx", "1024", "--n-parallel", "2", "--api-key", "k", "--quiet",
                             "--model-id", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the server exited with code {proc.returncode}"
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = client(url, key="k")
        r = c.completions.create(model="tiny", prompt="Item 1", max_tokens=5, temperature=0)
        assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="nope").completions.create(model="tiny", prompt="x", max_tokens=1)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) in (0, -signal.SIGINT, 130)
    bad = subprocess.run([sys.executable, "-m", "slot_cpp", "serve", "--rtd", "nonsense"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr


def test_embeddings_and_tokenize_as_the_anchors_serve_them(served):
    url, model = served
    c = client(url)
    texts = ["The capital of France is Paris.", "Bananas are yellow."]
    # The official client asks for base64 by default; both encodings decode to Model.embed.
    got = c.embeddings.create(model="gemma-3-270m", input=texts)
    floats = c.embeddings.create(model="gemma-3-270m", input=texts, encoding_format="float")
    want = model.embed(texts)
    for g, f, w in zip(got.data, floats.data, want):
        np.testing.assert_allclose(g.embedding, w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(f.embedding, w, rtol=1e-6, atol=1e-7)
    assert got.usage.prompt_tokens == sum(len(model.tokenize(t)) for t in texts)
    headers = {"Authorization": f"Bearer {KEY}"}
    tok = httpx.post(url + "/tokenize", json={"content": "Hello world"}, headers=headers).json()["tokens"]
    assert tok == model.tokenize("Hello world", add_special=False)
    text = httpx.post(url + "/detokenize", json={"tokens": tok}, headers=headers).json()["content"]
    assert text == "Hello world"
    assert httpx.post(url + "/tokenize", json={"content": "x"}).status_code == 401


class Verdict(BaseModel):
    answer: str = Field(max_length=16)
    confidence: int = Field(ge=0, le=100)


def test_structured_output_through_the_client(served):
    url, model = served
    c = client(url)
    # The official client's structured-output helper returns the parsed object.
    parsed = c.chat.completions.parse(model="gemma-3-270m", messages=MESSAGES, response_format=Verdict,
                                      max_tokens=64, temperature=0.7, seed=4)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)
    # json_object, with SLOT on, streamed: the joined text is one JSON object.
    chunks = c.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=64, stream=True,
                                       response_format={"type": "json_object"}, seed=5,
                                       extra_body={"slot": {"steps": 2, "lr": 0.01}})
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert isinstance(json.loads(text), dict)
    # llama-server's body fields on completions: grammar and json_schema.
    r = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=8,
                             extra_body={"grammar": 'root ::= " Paris" | " Lyon"'})
    assert r.choices[0].text in (" Paris", " Lyon")
    r = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=64,
                             extra_body={"json_schema": Verdict.model_json_schema()})
    Verdict.model_validate_json(r.choices[0].text)
    # Bad grammar or schema: 400 naming the field, and the server lives.
    for extra, field in (({"grammar": "root ::= nothing-here"}, "grammar"),
                         ({"json_schema": {"$ref": "#/nowhere"}}, "json_schema")):
        with pytest.raises(openai.BadRequestError, match=field):
            c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model="gemma-3-270m", messages=MESSAGES, max_tokens=4,
                                  response_format={"type": "xml"})  # type: ignore[arg-type]
    assert c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2).choices[0].text


def test_chat_on_a_model_without_a_template_falls_back_to_its_builtin(gemma_path, caplog):
    # The embedded Gemma's GGUF has no chat template: a server started without
    # one formats chats with llama.cpp's built-in 'gemma' template.
    model = slot_cpp.Model(gemma_path, n_ctx=512)
    assert not model.info.has_chat_template
    expected = len(model.prompt_tokens(MESSAGES, chat_template="gemma"))
    config = ServerConfig(model_id="gemma-3-270m", max_tokens_cap=64)
    with caplog.at_level(logging.WARNING, logger="slot_cpp"), running(model, config) as url:
        r = client(url, key="none").chat.completions.create(model="gemma-3-270m", messages=MESSAGES,
                                                            max_tokens=4)
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens == expected
    assert any("built-in 'gemma' template" in rec.getMessage() for rec in caplog.records)


def test_echo_and_integer_logprobs_on_completions(served):
    url, model = served
    c = client(url)
    tokens = model.tokenize(PROMPT)
    want = probes.token_logprobs(model, tokens, 1)  # the prompt's own log-probabilities, computed apart
    r = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, echo=True, logprobs=2,
                             temperature=0.0)
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT) and len(choice.text) > len(PROMPT)
    lp = choice.logprobs
    n = len(tokens)
    assert "".join(lp.tokens[:n]) == model.detokenize(tokens)
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:n], want, atol=2e-3)
    assert len(lp.tokens) == n + r.usage.completion_tokens and lp.text_offset[n] == len(model.detokenize(tokens))
    assert all(len(t) == 2 for t in lp.top_logprobs[n:]) and lp.top_logprobs[1] is None
    # Streamed: the prompt first, then the same answer.
    chunks = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=4, echo=True, stream=True,
                                  temperature=0.0)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == choice.text
    # Echo alone works with SLOT; echo with logprobs needs the plain prefill.
    r = c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2, echo=True,
                             extra_body={"slot": {"steps": 2, "lr": 0.01}})
    assert r.choices[0].text.startswith(PROMPT)
    with pytest.raises(openai.BadRequestError, match="echo with logprobs is not available with slot"):
        c.completions.create(model="gemma-3-270m", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1,
                             extra_body={"slot": {"steps": 2, "lr": 0.01}})


def test_a_full_queue_inside_a_method_is_an_overload_not_an_internal_error():
    # QAlign's reward scores its candidates through the model's queue; when
    # that queue is full the request is answered 503 (retried by clients), as
    # a full queue at admission is, not 500.
    from slot_cpp import _core
    from slot_cpp.qalign import RewardError
    from slot_cpp.server.errors import error_from

    try:
        try:
            raise _core.QueueFullError("the model already has 1 generate calls waiting")
        except _core.QueueFullError as full:
            raise RewardError("reward 'head' raised QueueFullError", []) from full
    except RewardError as exc:
        wrapped = exc
    error = error_from(wrapped, retry_after=2)
    assert error is not None and error.status == 503 and error.headers == {"Retry-After": "2"}
    plain = error_from(RewardError("reward 'head' raised KeyError", []), retry_after=2)
    assert plain is not None and plain.status == 500
