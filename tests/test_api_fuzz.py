"""API fuzzing: Schemathesis generates requests from the OpenAPI schema of a
real `slot-cpp serve` process (the tiny model, with a datastore, a reward
head and a corrector, so the method extensions run) on a loopback port.

Every operation gets SLOT_CPP_API_EXAMPLES schema-valid requests and as many
schema-violating ones (default 6 each; completions and chat also 6 with each
method extension), from a fixed seed. Properties: no
5xx, responses conform to the documented schema and status codes, every
error is OpenAI's shape, invalid requests are refused with 4xx, and the
server still answers a known request the same way afterwards."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import httpx
import pytest

EXAMPLES = int(os.environ.get("SLOT_CPP_API_EXAMPLES", "6"))
KEY = "fuzz-key"
EXTENSIONS = {"slot": "SlotOptions", "rtd": "RtdOptions", "qalign": "QAlignOptions", "lmcor": "LmcorOptions"}
KNOWN = {"model": "tiny", "prompt": "Item 1", "max_tokens": 4, "temperature": 0}


# The planted defect: the shared request handler raises, so completions and chat answer 500.
_PLANTED = """
import sys
import slot_cpp.server.routes as routes
def broken(*args, **kwargs):
    raise RuntimeError("planted fault")
routes.resolve = broken
from slot_cpp.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(tiny_path: Path, tmp: Path, planted: bool = False) -> tuple[subprocess.Popen, str]:
    from slot_files import write_datastore, write_reward

    import slot_cpp

    with slot_cpp.Model(tiny_path, n_ctx=512, n_threads=1) as m:
        store = write_datastore(m, tmp / "store.rtd")
        head = write_reward(m, tmp / "head.npz")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    launcher = ["-c", _PLANTED] if planted else ["-m", "slot_cpp"]
    log = open(tmp / "server.log", "w")   # a file, not a pipe: a full pipe would stall the server
    proc = subprocess.Popen(
        [sys.executable, *launcher, "serve", "--model", str(tiny_path), "--port", str(port), "--n-ctx", "2048",
         "--n-parallel", "2", "--threads", "2", "--api-key", KEY, "--quiet", "--model-id", "tiny",
         "--max-tokens-cap", "16", "--rtd", f"facts={store}", "--reward", f"head=head:{head}",
         "--corrector", f"fix={tiny_path}"],
        stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            log.close()
            raise AssertionError(f"the server exited ({proc.returncode}): {(tmp / 'server.log').read_text()[-2000:]}")
        assert time.monotonic() < deadline, "the server did not start"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                log.close()   # the server holds its own descriptor
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tiny_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = _serve(tiny_path, tmp_path_factory.mktemp("api-fuzz"))
    try:
        yield url
    finally:
        _stop(proc)


def _known(url: str) -> str:
    r = httpx.post(url + "/v1/completions", json=KNOWN, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _value(node: dict):
    """Values valid under one property's schema: enums, bounded numbers, booleans, strings, anyOf."""
    from hypothesis import strategies as st

    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "anyOf" in node:
        return st.one_of([_value(sub) for sub in node["anyOf"]])
    kind = node.get("type")
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return st.text(max_size=20)
    if kind in ("integer", "number"):
        low = node.get("minimum", node.get("exclusiveMinimum"))
        high = node.get("maximum", node.get("exclusiveMaximum"))
        if kind == "integer":
            low = None if low is None else int(low) + ("exclusiveMinimum" in node)
            high = None if high is None else int(high) - ("exclusiveMaximum" in node)
            return st.integers(low, high if high is not None else (low or 0) + 1000)
        return st.floats(low, high if high is not None else (low or 0) + 1000.0, allow_nan=False, allow_infinity=False,
                         exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node)
    return st.just(None)


def _options(component: dict):
    """An extension's options: required fields always, each other field or not."""
    from hypothesis import strategies as st

    required = set(component.get("required", ()))
    props = component.get("properties", {})
    return st.fixed_dictionaries({k: _value(v) for k, v in props.items() if k in required},
                                 optional={k: _value(v) for k, v in props.items() if k not in required})


def fuzz(url: str, examples: int = EXAMPLES) -> tuple[Counter, list[str]]:
    """Runs Schemathesis on every operation of the server's schema; returns
    (requests per operation and mode, failures)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup   # a BaseExceptionGroup, not an Exception
    from schemathesis.checks import (negative_data_rejection, not_a_server_error, response_schema_conformance,
                                     status_code_conformance)

    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    components = httpx.get(url + "/openapi.json", timeout=30).json()["components"]["schemas"]
    tried: Counter = Counter()
    failures: list[str] = []
    auth = {"Authorization": f"Bearer {KEY}"}

    def with_extension(ext: str, strategy: st.SearchStrategy) -> st.SearchStrategy:
        """Schema-valid cases that carry the extension `ext` (optional, so rarely drawn otherwise)."""
        def put(pair: tuple) -> schemathesis.Case:
            case, options = pair
            case.body[ext] = options
            return case
        return st.tuples(strategy, _options(components[EXTENSIONS[ext]])).map(put)

    for result in schema.get_all_operations():
        op = result.ok()
        runs = [(f"{op.label} {m.value}", m, op.as_strategy(generation_mode=m))
                for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
        if op.label in ("POST /v1/completions", "POST /v1/chat/completions"):
            runs += [(f"{op.label} positive +{ext}", GenerationMode.POSITIVE,
                      with_extension(ext, op.as_strategy(generation_mode=GenerationMode.POSITIVE)))
                     for ext in EXTENSIONS]
        for label, mode, strategy in runs:
            checks = [not_a_server_error, response_schema_conformance, status_code_conformance]
            if mode is GenerationMode.NEGATIVE:
                checks.append(negative_data_rejection)

            @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @seed(29)
            @given(strategy)
            def one(case: schemathesis.Case) -> None:
                tried[label] += 1
                response = case.call(base_url=url, headers=auth, timeout=60)
                if isinstance(case.body, dict):
                    for ext in ("slot", "rtd", "qalign", "lmcor"):
                        if isinstance(case.body.get(ext), dict):
                            tried[f"{label} {ext}"] += 1
                            tried[f"{label} {ext} answered {response.status_code}"] += 1
                if os.environ.get("SLOT_CPP_API_VERBOSE") and mode is GenerationMode.POSITIVE:
                    print(response.status_code, str(case.body)[:300], response.text[:200])
                try:
                    case.validate_response(response, checks=checks)
                    if response.status_code >= 400:
                        body = response.json()
                        assert set(body) == {"error"}, body
                        assert {"message", "type", "param", "code"} <= set(body["error"]), body
                        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
                except (Exception, FailureGroup) as exc:  # noqa: BLE001 - a failed check or assertion
                    failures.append(f"{label}: {response.status_code} {case.body!r:.300}: {exc}"[:1500])

            try:
                one()
            except Unsatisfiable:
                if mode is not GenerationMode.NEGATIVE:
                    raise
                # An operation without parameters or body: no request can violate its schema.
            except (Exception, FailureGroup) as exc:  # noqa: BLE001 - a generation problem is a finding too
                failures.append(f"{label}: {type(exc).__name__}: {exc}"[:1500])
    return tried, failures


def test_schemathesis_finds_no_server_error_and_the_server_answers_after(server):
    before = _known(server)
    tried, failures = fuzz(server)
    print(dict(tried))
    assert not failures, "\n".join(failures[:10])
    labels = {" ".join(k.split()[:2]) for k in tried}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /v1/embeddings", "POST /tokenize",
            "POST /detokenize", "GET /v1/models", "GET /health"} <= labels
    # Each method extension ran, and ran to a 200 (the names it needs are the schema's enums).
    for ext in EXTENSIONS:
        assert tried[f"POST /v1/completions positive +{ext} {ext} answered 200"] > 0, dict(tried)
    assert _known(server) == before


def test_schemathesis_catches_a_planted_failing_handler(tiny_path, tmp_path):
    # A server whose completions handler raises on one option: the fuzzer must report the 500.
    proc, url = _serve(tiny_path, tmp_path, planted=True)
    try:
        tried, failures = fuzz(url, examples=3)
    finally:
        _stop(proc)
    assert any("500" in f and "completions" in f for f in failures), failures[:5]
