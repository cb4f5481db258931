"""Small real files of each kind slot_cpp writes, for the fuzzing and the
crash-safe-writes tests; `python slot_files.py KIND PATH [MODEL]` rewrites
PATH over and over (content stamped with a version) until it is killed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

import slot_cpp
from slot_cpp import evaluation
from slot_cpp._files import open_append, sync
from slot_cpp.lmcor.adapter import write_adapter_file
from slot_cpp.lmcor.corrector import CorrectorFormat
from slot_cpp.qalign import LinearReward
from slot_cpp.rtd import Datastore


def write_datastore(model: slot_cpp.Model, path: Path, n: int = 320, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    store = Datastore(keys=rng.standard_normal((n, model.n_embd)).astype(np.float16),
                      values=rng.integers(0, 50, n).astype(np.int32), mode="generation", heads=1,
                      fingerprint=slot_cpp._model.model_fingerprint(model),
                      defaults={"k": 8, "temperature": float(model.n_embd), "lam": 0.5})
    store.build_ivf(model, 8)
    store.save(path)
    return path


def stamped_datastore(path: Path, version: int, n: int = 40000, dim: int = 64) -> None:
    Datastore(keys=np.full((n, dim), version % 1000, np.float16), values=np.full(n, version, np.int32),
              mode="generation", heads=1, fingerprint={"digest": "stamp"},
              defaults={"k": 8, "temperature": 1.0, "lam": 0.5}).save(path)


def write_reward(model: slot_cpp.Model, path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return Path(LinearReward(model, rng.standard_normal(model.n_embd), 0.25).save(str(path)))


def write_records(path: Path, n: int = 6) -> Path:
    with open_append(path) as out:
        for i in range(n):
            evaluation._append(out, {"metric": "accuracy", "index": i, "setting": "steps=0,lr=0.01",
                                     "correct": i % 2 == 0, "prediction": str(17 * i), "seconds": 0.25 * i})
    return path


def write_adapter(model: slot_cpp.Model, path: Path, rank: int = 2, seed: int = 0,
                  value: Optional[float] = None) -> Path:
    """A LoRA adapter on layers 0 and 1 (random, or every weight `value`)."""
    rng = np.random.default_rng(seed)
    n_embd = model.n_embd
    tensors = []
    for layer in range(2):
        for name in ("attn_q", "attn_output"):   # both n_embd x n_embd in the tiny Qwen2
            out = n_embd
            tensors.append((f"blk.{layer}.{name}.weight.lora_a",
                            _weights(rng, (rank, n_embd), value)))
            tensors.append((f"blk.{layer}.{name}.weight.lora_b", _weights(rng, (out, rank), value)))
    write_adapter_file(path, tensors, architecture="qwen2", alpha=4.0,
                       base_digest=str(slot_cpp._model.model_fingerprint(model)["digest"]), fmt=CorrectorFormat())
    return path


def _weights(rng: np.random.Generator, shape: tuple[int, int], value: Optional[float]) -> np.ndarray:
    if value is not None:
        return np.full(shape, value, np.float32)
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)


# ---- versions written over and over, read back --------------------------------
def _uniform(*arrays: Any) -> Optional[float]:
    values = {float(v) for a in arrays for v in np.unique(np.asarray(a))}
    return values.pop() if len(values) == 1 else None


def write_version(kind: str, path: Path, version: int, model: Optional[slot_cpp.Model]) -> None:
    if kind == "datastore":
        stamped_datastore(path, version)
    elif kind == "reward":
        assert model is not None
        LinearReward(model, np.full(model.n_embd, float(version)), float(version)).save(str(path))
    elif kind == "delta":
        from slot_cpp.cli.generate import save_delta

        save_delta(str(path), np.full(200000, float(version), np.float32))
    elif kind == "adapter":
        assert model is not None
        write_adapter(model, path, rank=8, value=float(version))
    elif kind == "records":
        with open_append(path) as out:
            first = len(read_version("records", path, None) or [])
            for i in range(first, first + 50):
                evaluation._append(out, {"metric": "accuracy", "index": i, "setting": "s", "text": "x" * 3000})
                sync(out)
    else:
        raise ValueError(kind)


def read_version(kind: str, path: Path, model: Optional[slot_cpp.Model]) -> Any:
    """The version a file holds (one number for a whole file; the record
    indices for records); raises when the file is damaged or mixed."""
    if kind == "datastore":
        s = Datastore.load(path)
        v = _uniform(s.values)
        assert v is not None and _uniform(s.keys) == v % 1000, "a mixed datastore"
        return v
    if kind == "reward":
        assert model is not None
        head = LinearReward.load(str(path), model)
        v = _uniform(head.weight, np.array([head.bias]))
        assert v is not None, "a mixed reward head"
        return v
    if kind == "delta":
        d = np.load(path, allow_pickle=False)
        assert d.shape == (200000,), d.shape
        v = _uniform(d)
        assert v is not None, "a mixed delta"
        return v
    if kind == "adapter":
        import gguf

        reader = gguf.GGUFReader(str(path))
        v = _uniform(*[np.asarray(t.data) for t in reader.tensors])
        assert v is not None and len(reader.tensors) == 8, "a mixed adapter"
        if model is not None:
            with slot_cpp.Model(model.path, n_ctx=64, n_threads=1, lora=str(path)) as m:
                m.generate("hi", max_tokens=1)
        return v
    if kind == "records":
        from slot_cpp import gsm8k

        if not path.exists():
            return None
        return [r["index"] for r in gsm8k.read_records(path)]
    raise ValueError(kind)


def _main(argv: list[str]) -> None:
    kind, path = argv[0], Path(argv[1])
    model = slot_cpp.Model(argv[2], n_ctx=64, n_threads=1) if len(argv) > 2 and argv[2] else None
    version = 1
    while True:
        write_version(kind, path, version, model)
        print(f"wrote {version}", flush=True)
        version += 1


if __name__ == "__main__":
    _main(sys.argv[1:])
