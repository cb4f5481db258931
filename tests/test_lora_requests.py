"""LoRA adapters chosen per request: one model with two adapters serves
each request with its own scales (llama-server's per-request ``lora``),
each answer equal to that of a model loaded with that adapter alone;
the server's /lora-adapters; Model.from_pretrained from a hub cache."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

import slot_cpp
from slot_cpp.server import ServerConfig
from slot_files import write_adapter

from test_server import running

PROMPT = "The quick brown fox jumps over the lazy dog. Then the fox"


@pytest.fixture(scope="module")
def adapters(peaked_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    with slot_cpp.Model(peaked_path, n_ctx=256) as base:
        return (write_adapter(base, folder / "a.gguf", rank=4, seed=1),
                write_adapter(base, folder / "b.gguf", rank=4, seed=2))


def _greedy(model: slot_cpp.Model, **options: Any) -> list[int]:
    return model.generate(PROMPT, max_tokens=12, ignore_eos=True, **options).tokens


@pytest.fixture(scope="module")
def references(peaked_path: Path, adapters: tuple[Path, Path]) -> dict[str, list[int]]:
    a, b = adapters
    out = {}
    for name, lora in (("a", a), ("b", b), ("none", None)):
        with slot_cpp.Model(peaked_path, n_ctx=512, lora=lora) as model:
            out[name] = _greedy(model)
    assert out["a"] != out["b"] and out["a"] != out["none"]  # the adapters matter
    return out


def test_each_request_gets_its_own_adapters(peaked_path: Path, adapters: tuple[Path, Path],
                                            references: dict[str, list[int]]) -> None:
    a, b = adapters
    with slot_cpp.Model(peaked_path, n_ctx=512, n_parallel=4, lora=[(a, 1.0), (b, 1.0)]) as both:
        assert _greedy(both, lora={0: 1.0}) == references["a"]
        assert _greedy(both, lora=[{"id": 1, "scale": 1.0}]) == references["b"]
        assert _greedy(both, lora={}) == references["none"]
        # Requests with different adapters at once: each waits for the others' scales to finish.
        results: dict[tuple[str, int], list[int]] = {}

        def run(name: str, lora: dict[int, float], i: int) -> None:
            results[(name, i)] = _greedy(both, lora=lora)

        threads = [threading.Thread(target=run, args=(name, lora, i))
                   for i in range(2) for name, lora in (("a", {0: 1.0}), ("b", {1: 1.0}), ("none", {}))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(results) == 6 and all(tokens == references[name] for (name, _), tokens in results.items())
        # The defaults, for requests without lora of their own.
        both.set_lora_scales({1: 1.0})
        assert [scale for _, scale in both.loras] == [0.0, 1.0] and _greedy(both) == references["b"]
        with pytest.raises(ValueError, match="names adapter 5"):
            both.generate(PROMPT, max_tokens=1, lora={5: 1.0})
        with pytest.raises(ValueError, match="finite"):
            both.generate(PROMPT, max_tokens=1, lora={0: float("nan")})
        with pytest.raises(ValueError, match="twice"):
            both.generate(PROMPT, max_tokens=1, lora=[(0, 1.0), (0, 0.5)])


def test_the_server_chooses_adapters_per_request(peaked_path: Path, adapters: tuple[Path, Path],
                                                 references: dict[str, list[int]]) -> None:
    a, b = adapters
    with slot_cpp.Model(peaked_path, n_ctx=512, n_parallel=2, lora=[(a, 1.0), (b, 1.0)]) as both, \
            slot_cpp.Model(peaked_path, n_ctx=256) as plain:
        expected = {name: plain.detokenize(tokens) for name, tokens in references.items()}
        with running(both, ServerConfig(model_id="tiny")) as url, httpx.Client(base_url=url, timeout=120) as http:
            listed = http.get("/lora-adapters").json()
            assert [(x["id"], Path(x["path"]).name, x["scale"]) for x in listed] == [(0, "a.gguf", 1.0),
                                                                                     (1, "b.gguf", 1.0)]
            body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            for name, lora in (("a", [{"id": 0, "scale": 1.0}]), ("b", [{"id": 1, "scale": 1.0}]), ("none", [])):
                r = http.post("/v1/completions", json={**body, "lora": lora})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[name]
            assert http.post("/lora-adapters", json=[{"id": 0, "scale": 1.0}]).json()[1]["scale"] == 0.0
            r = http.post("/v1/completions", json=body)
            assert r.json()["choices"][0]["text"] == expected["a"]
            r = http.post("/v1/completions", json={**body, "lora": [{"id": 7, "scale": 1.0}]})
            assert r.status_code == 400 and "adapter 7" in r.json()["error"]["message"]
            assert http.post("/lora-adapters", json=[{"id": 0}]).status_code == 400


def test_from_pretrained_reads_a_hub_cache_offline(tiny_path: Path, tmp_path: Path) -> None:
    """The hub's cache layout (models--owner--name/snapshots/<commit>/file,
    refs/main), read with local_files_only: no network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-gguf"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_path, snapshot / "tiny-Q8_0.gguf")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    with slot_cpp.Model.from_pretrained("someone/tiny-gguf", "tiny-Q8_0.gguf", cache_dir=tmp_path / "hub",
                                        local_files_only=True, n_ctx=128) as model:
        assert Path(model.path) == snapshot / "tiny-Q8_0.gguf" and model.generate("hi", max_tokens=2).tokens
    with slot_cpp.Model.from_pretrained("someone/tiny-gguf", "*Q8_0.gguf", cache_dir=tmp_path / "hub",
                                        local_files_only=True, n_ctx=128) as model:
        assert Path(model.path).name == "tiny-Q8_0.gguf"
    with pytest.raises(FileNotFoundError, match="not in the hub cache"):
        slot_cpp.Model.from_pretrained("someone/tiny-gguf", "other.gguf", cache_dir=tmp_path / "hub",
                                       local_files_only=True)
    with pytest.raises(ValueError, match="match exactly one"):
        slot_cpp.Model.from_pretrained("someone/tiny-gguf", "*Q4*.gguf", cache_dir=tmp_path / "hub",
                                       local_files_only=True)
    with pytest.raises(ValueError, match="owner/name"):
        slot_cpp.Model.from_pretrained("no-slash", "x.gguf")
