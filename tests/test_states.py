"""Saved states: a prompt's KV cells written to a checksummed file and
restored in another process, where generation goes on as if uninterrupted;
damaged and foreign files refused; the server's /slots actions."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

import slot_cpp
from slot_cpp.server import ServerConfig
from slot_cpp.states import STATE_VERSION

from test_server import running

PROMPT = ("You are a careful assistant. Answer in one short sentence.\n\n"
          "Question: Which planet is known as the red planet?\nAnswer:")


def test_a_state_restored_in_a_new_process_continues_as_an_uninterrupted_run(gemma_path: Path,
                                                                              tmp_path: Path) -> None:
    path = tmp_path / "prompt.state"
    delta = np.linspace(-0.01, 0.01, 640, dtype=np.float32)
    with slot_cpp.Model(gemma_path, n_ctx=512, n_parallel=2) as model:
        tokens = model.tokenize(PROMPT)
        saved = model.save_state(path, PROMPT, delta=delta)
        assert saved.tokens == tokens and saved.kv_bytes > 0
    script = textwrap.dedent(f"""
        import json, slot_cpp
        with slot_cpp.Model({str(gemma_path)!r}, n_ctx=512, n_parallel=2) as model:
            state = model.load_state({str(path)!r})
            restored = model.generate(state.tokens, max_tokens=16, delta=state.delta)
            model.clear_cache()
            fresh = model.generate(state.tokens, max_tokens=16, delta=state.delta)
            print(json.dumps({{"delta": state.delta.tolist(), "restored": restored.tokens,
                              "restored_cached": restored.cached_tokens, "fresh": fresh.tokens,
                              "fresh_cached": fresh.cached_tokens}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.array_equal(np.asarray(got["delta"], dtype=np.float32), delta)
    assert got["restored_cached"] >= len(tokens) - 1 and got["fresh_cached"] == 0
    assert got["restored"] == got["fresh"] and len(got["restored"]) > 0


def test_states_restored_before_any_call_go_to_sequences_of_their_own(gemma_path: Path, tmp_path: Path) -> None:
    prompts = [PROMPT, "The colour of the sky on a clear day is"]
    with slot_cpp.Model(gemma_path, n_ctx=512, n_parallel=2) as model:
        paths = [model.save_state(tmp_path / f"{i}.state", p).path for i, p in enumerate(prompts)]
    with slot_cpp.Model(gemma_path, n_ctx=512, n_parallel=3) as model:
        states = [model.load_state(p) for p in paths]
        # Both are cached, in sequences of their own: neither restore overwrote the other.
        held = sorted(tuple(s["tokens"]) for s in model.native_session().slots() if s["tokens"])
        assert held == sorted(tuple(state.tokens) for state in states)
        r = model.generate(states[1].tokens, max_tokens=1)
        assert r.cached_tokens >= len(states[1].tokens) - 1


def test_damaged_foreign_and_mismatched_states_are_refused(gemma_path: Path, tiny_path: Path,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "prompt.state"
    with slot_cpp.Model(gemma_path, n_ctx=512) as model:
        model.save_state(path, PROMPT)
        raw = path.read_bytes()
        damaged = tmp_path / "damaged.state"
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0x40
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(ValueError, match="damaged"):
            model.load_state(damaged)
        cut = tmp_path / "cut.state"
        cut.write_bytes(raw[: len(raw) - 100])
        with pytest.raises(ValueError, match="damaged"):
            model.load_state(cut)
        other = tmp_path / "other.state"
        other.write_bytes(b"not a state at all, but long enough to be read" * 4)
        with pytest.raises(ValueError, match="not a slot_cpp state file"):
            model.load_state(other)
        with pytest.raises(FileNotFoundError):
            model.load_state(tmp_path / "missing.state")
        assert model.stats().live_sequences == 0
        # The model still generates after the refusals.
        assert model.generate(PROMPT, max_tokens=2).tokens
    import struct

    newer = tmp_path / "newer.state"
    newer.write_bytes(raw[:15] + struct.pack("<I", STATE_VERSION + 1) + raw[19:])
    with slot_cpp.Model(gemma_path, n_ctx=512) as model, pytest.raises(ValueError, match="version"):
        model.load_state(newer)
    with slot_cpp.Model(gemma_path, n_ctx=512, cache_type_k="q8_0") as model, \
            pytest.raises(ValueError, match="cache_type_k"):
        model.load_state(path)
    with slot_cpp.Model(tiny_path, n_ctx=256) as tiny, pytest.raises(ValueError, match="another model"):
        tiny.load_state(path)


@pytest.fixture(scope="module")
def slot_server(gemma: slot_cpp.Model, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("slots")
    with running(gemma, ServerConfig(model_id="gemma", slot_save_path=str(folder))) as url:
        yield url, folder


def test_slots_save_erase_and_restore_through_the_server(slot_server: tuple[str, Path]) -> None:
    url, folder = slot_server
    with httpx.Client(base_url=url, timeout=120) as http:
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        for s in http.get("/slots").json():  # the shared model's cache, left by other tests
            assert http.post(f"/slots/{s['id']}?action=erase").status_code == 200
        first = http.post("/v1/completions", json=body).json()
        slots = http.get("/slots").json()
        held = [s for s in slots if s["n_cached_tokens"] > 0]
        assert held and all(not s["is_processing"] for s in slots)
        slot = held[0]["id"]
        saved = http.post(f"/slots/{slot}?action=save", json={"filename": "red-planet.state"}).json()
        assert saved["n_saved"] == held[0]["n_cached_tokens"] and (folder / "red-planet.state").exists()
        for s in http.get("/slots").json():
            assert http.post(f"/slots/{s['id']}?action=erase").status_code == 200
        assert all(s["n_cached_tokens"] == 0 for s in http.get("/slots").json())
        restored = http.post(f"/slots/{slot}?action=restore", json={"filename": "red-planet.state"}).json()
        assert restored["n_restored"] == saved["n_saved"]
        again = http.post("/v1/completions", json=body).json()
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= first["usage"]["prompt_tokens"] - 1
        assert again["choices"][0]["text"] == first["choices"][0]["text"]
        # Bad requests are clear 4xx answers, and the server keeps serving.
        r = http.post(f"/slots/{slot}?action=save", json={"filename": "../escape.state"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "filename"
        r = http.post(f"/slots/{slot}?action=restore", json={"filename": "nothing-here.state"})
        assert r.status_code == 404
        (folder / "junk.state").write_bytes(b"junk" * 64)
        r = http.post(f"/slots/{slot}?action=restore", json={"filename": "junk.state"})
        assert r.status_code == 400 and "not a slot_cpp state file" in r.json()["error"]["message"]
        assert http.post("/slots/99?action=erase").status_code == 400
        assert http.post(f"/slots/{slot}?action=fly").status_code == 400
        assert http.post("/v1/completions", json=body).status_code == 200
