"""Saved states: a prompt's KV cells kept across processes.

A state file holds what llama.cpp serialises of one sequence
(``llama_state_seq_get_data``), the tokens those cells hold (the prompt
cache's key) and, when given, a SLOT delta learned on them. Restored, the
cells go back into the prompt cache, so that a prompt that begins with the
state's tokens skips their evaluation::

    state = model.save_state("system.state", messages)   # evaluates the prompt if it is not cached
    ...                                                    # another process, or after a restart
    state = model.load_state("system.state")
    model.generate(state.tokens + more_tokens, delta=state.delta)

The file is versioned and checksummed (SHA-256 over everything before it)
and written crash-safely (atomic replace); it records the model's
fingerprint and the KV cache's types, and a file of another model or
another cache layout, or a damaged one, is refused with a ValueError
naming the problem.
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np

from . import _files

__all__ = ["STATE_VERSION", "SavedState", "read_state", "write_state"]

STATE_VERSION = 1
_MAGIC = b"SLOT_CPP_STATE\n"
_PREFIX = struct.Struct("<IQ")  # version, header length
_DIGEST = 32


@dataclass(frozen=True)
class SavedState:
    """A saved state: the tokens its cells hold and the SLOT delta saved with them."""

    tokens: list[int]
    delta: Optional[np.ndarray]
    path: Path
    kv_bytes: int
    """The size of llama.cpp's serialised cells."""
    lora_scales: list[float]
    """The LoRA adapters' scales the cells were computed under."""


Identity = tuple[Mapping[str, Any], Mapping[str, Any]]
"""What a state belongs to: the model's fingerprint (with a sample of its
weights), and what else the cells depend on (the KV cache's types,
deterministic mode, RoPE settings, metadata overrides, the LoRA adapters
loaded); ``Model._state_identity()``."""


def weights_sample(path: Union[str, Path], chunks: int = 8, size: int = 1 << 16) -> str:
    """A digest of a GGUF file's size and of chunks read at even offsets: two
    quantisations or fine-tunes of one model differ here."""
    p = Path(path)
    total = p.stat().st_size
    digest = hashlib.sha256(str(total).encode())
    with open(p, "rb") as f:
        for i in range(chunks):
            f.seek(max(0, (total - size) * i // max(1, chunks - 1)))
            digest.update(f.read(size))
    return digest.hexdigest()[:24]


def write_state(identity: Identity, path: Union[str, Path], tokens: list[int], data: bytes,
                delta: Optional[np.ndarray] = None, lora_scales: Optional[list[float]] = None) -> SavedState:
    """Writes a state file (atomic replace); ``data`` is llama.cpp's serialised cells of ``tokens``."""
    fingerprint, layout = identity
    header = {"version": STATE_VERSION, "fingerprint": dict(fingerprint), "layout": dict(layout),
              "tokens": [int(t) for t in tokens], "kv_bytes": len(data), "created": time.time(),
              "lora_scales": [float(x) for x in lora_scales or []],
              "delta": None if delta is None else [float(x) for x in np.asarray(delta, dtype=np.float32)]}
    head = json.dumps(header).encode()
    body = _MAGIC + _PREFIX.pack(STATE_VERSION, len(head)) + head
    digest = hashlib.sha256(body)
    digest.update(data)
    target = Path(path)
    with _files.atomic_write(target) as f:
        f.write(body)
        f.write(data)
        f.write(digest.digest())
    return SavedState(tokens=list(header["tokens"]), delta=None if delta is None else np.asarray(delta, np.float32),
                      path=target, kv_bytes=len(data), lora_scales=list(header["lora_scales"]))


def read_state(identity: Identity, path: Union[str, Path]) -> tuple[SavedState, bytes]:
    """Reads and checks a state file: its checksum, version, model and cache
    layout. ValueError naming the problem; FileNotFoundError when it is missing."""
    mine, layout = identity
    target = Path(path)
    raw = target.read_bytes()
    if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + _PREFIX.size + _DIGEST:
        raise ValueError(f"{target} is not a slot_cpp state file")
    version, head_len = _PREFIX.unpack_from(raw, len(_MAGIC))
    if version != STATE_VERSION:
        raise ValueError(f"{target} is a state file of version {version}; this slot_cpp reads version "
                         f"{STATE_VERSION}")
    if hashlib.sha256(raw[:-_DIGEST]).digest() != raw[-_DIGEST:]:
        raise ValueError(f"{target} is damaged: its checksum does not match its contents")
    start = len(_MAGIC) + _PREFIX.size
    try:
        header = json.loads(raw[start:start + head_len])
    except ValueError:
        raise ValueError(f"{target} is damaged: its header is not JSON") from None
    data = raw[start + head_len:-_DIGEST]
    if len(data) != header.get("kv_bytes"):
        raise ValueError(f"{target} is damaged: it holds {len(data)} bytes of cells, its header says "
                         f"{header.get('kv_bytes')}")
    theirs = header.get("fingerprint", {})
    for key in ("architecture", "n_embd", "n_vocab", "vocab", "head", "weights"):
        if theirs.get(key) != mine.get(key):
            raise ValueError(f"{target} was saved with another model: {key} is {theirs.get(key)!r}, this "
                             f"model's is {mine.get(key)!r}")
    saved_layout = header.get("layout", {})
    for key in sorted(set(saved_layout) | set(layout)):
        value = saved_layout.get(key)
        if layout.get(key) != value:
            raise ValueError(f"{target} was saved with {key}={value!r}; this model has {key}={layout.get(key)!r}")
    delta = header.get("delta")
    state = SavedState(tokens=[int(t) for t in header["tokens"]],
                       delta=None if delta is None else np.asarray(delta, dtype=np.float32), path=target,
                       kv_bytes=len(data), lora_scales=[float(x) for x in header.get("lora_scales", [])])
    return state, data
