"""llama.cpp's RPC backend: a model whose layers run in two ggml rpc-server
processes on loopback (the binary built with the package) gives the local
run's greedy output, and SLOT's head products keep working."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import slot_cpp
from slot_cpp.cli import rpc_server_path

PROMPT = "Question: What is the capital of France?\nAnswer:"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def rpc_servers() -> Iterator[list[str]]:
    exe = rpc_server_path()
    assert exe.is_file(), f"the package has no rpc-server binary at {exe}"
    endpoints, procs = [], []
    try:
        for _ in range(2):
            port = free_port()
            # Through the CLI, as a user starts it: every option after 'rpc-server' goes to the binary.
            procs.append(subprocess.Popen([sys.executable, "-m", "slot_cpp", "rpc-server", "-H", "127.0.0.1",
                                           "-p", str(port), "-t", "1"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            endpoints.append(f"127.0.0.1:{port}")
        for endpoint, proc in zip(endpoints, procs):
            host, port = endpoint.split(":")
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, f"rpc-server exited with code {proc.returncode}"
                try:
                    socket.create_connection((host, int(port)), timeout=0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "rpc-server did not start"
                    time.sleep(0.05)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)


@pytest.mark.slow
def test_layers_on_two_rpc_servers_match_the_local_run(gemma_path: Path, rpc_servers: list[str]):
    with slot_cpp.Model(gemma_path, n_ctx=512, n_parallel=1) as local:
        want = local.generate(PROMPT, max_tokens=12, logprobs=True, cache_prompt=False)
        want_slot = local.generate_with_slot(PROMPT, steps=3, lr=0.01, max_tokens=0, cache_prompt=False)
    with slot_cpp.Model(gemma_path, n_ctx=512, n_parallel=1, rpc=rpc_servers) as remote:
        got = remote.generate(PROMPT, max_tokens=12, logprobs=True, cache_prompt=False)
        got_slot = remote.generate_with_slot(PROMPT, steps=3, lr=0.01, max_tokens=0, cache_prompt=False)
        assert remote.slot_backend.startswith("CPU")
    assert got.tokens == want.tokens
    # The servers' CPU backend multiplies the Q4_K weights unpacked, the local
    # one repacked: the same rounding-level differences as batching (README).
    diff = np.abs(np.array(got.token_logprobs) - np.array(want.token_logprobs))
    assert diff.max() < 0.3 and np.median(diff) < 0.06, diff
    # SLOT: the prompt states come from the remote layers, the head products run here.
    assert got_slot.steps_done == 3
    np.testing.assert_allclose(got_slot.losses, want_slot.losses, rtol=5e-3)


def test_rpc_errors_are_clear(tiny_path: Path):
    with pytest.raises(ValueError, match="host:port"):
        slot_cpp.Model(tiny_path, rpc=["localhost"])
    with pytest.raises(TypeError, match="host:port"):
        slot_cpp.Model(tiny_path, rpc=[50052])  # type: ignore[list-item]
    with pytest.raises(slot_cpp.ModelLoadError, match="no ggml rpc-server answered at 127.0.0.1:"):
        slot_cpp.Model(tiny_path, rpc=[f"127.0.0.1:{free_port()}"])
