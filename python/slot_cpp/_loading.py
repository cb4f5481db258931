"""What Model(...) checks before it loads a GGUF file: the ggml rpc-servers
it offloads to and the LoRA adapters it applies."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Optional, Sequence, Union

from . import _core
from .options import check_float

# Written into LoRA adapters by slot_cpp.lmcor.train_corrector: the digest of
# the base model's fingerprint, checked when the adapter is loaded.
ADAPTER_BASE_DIGEST_KEY = "slot_cpp.base_model.digest"

LoraSpec = Union[str, "os.PathLike[str]", tuple[Union[str, "os.PathLike[str]"], float]]


def check_rpc(rpc: Optional[Sequence[str]]) -> list[str]:
    if rpc is None:
        return []
    if isinstance(rpc, str):
        rpc = rpc.split(",")
    out = []
    for endpoint in rpc:
        if not isinstance(endpoint, str):
            raise TypeError("rpc must be a list of 'host:port' strings")
        host, sep, port = endpoint.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"an RPC server must be given as host:port, got {endpoint!r}")
        # llama.cpp's RPC client aborts the process when it cannot connect:
        # make sure something listens first.
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
        except OSError as exc:
            raise _core.ModelLoadError(f"no ggml rpc-server answered at {endpoint.strip()} ({exc})") from None
        out.append(endpoint.strip())
    return out


def check_loras(lora: Union[LoraSpec, Sequence[LoraSpec], None]) -> list[tuple[str, float]]:
    if lora is None:
        return []
    if isinstance(lora, (str, os.PathLike)) or (isinstance(lora, tuple) and len(lora) == 2
                                                 and not isinstance(lora[1], (str, os.PathLike))):
        lora = [lora]  # type: ignore[list-item]
    out = []
    for item in lora:  # type: ignore[union-attr]
        path, scale = (item if isinstance(item, tuple) else (item, 1.0))
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("lora must be a path, a (path, scale) pair, or a list of them")
        scale = check_float("LoRA scale", scale, low=-math.inf)
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA adapter not found: {path}")
        out.append((str(path), scale))
    return out



def hub_file(repo_id: str, filename: str, *, revision: Optional[str] = None, cache_dir: Union[str, os.PathLike[str],
             None] = None, local_files_only: bool = False) -> Path:
    """A GGUF file of a Hugging Face hub repository, downloaded once into the
    hub's cache (``huggingface_hub``); ``filename`` may be a glob pattern
    (``"*Q4_K_M.gguf"``) that must match exactly one file. With
    ``local_files_only`` nothing is fetched: the file comes from the cache."""
    import fnmatch

    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("Model.from_pretrained needs huggingface_hub: pip install 'slot_cpp[hub]'") from None
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id must be 'owner/name', got {repo_id!r}")
    if not isinstance(filename, str) or not filename:
        raise ValueError("filename must be a file name or a glob pattern")
    kwargs = dict(revision=revision, cache_dir=None if cache_dir is None else str(cache_dir))
    name = filename
    if any(c in filename for c in "*?["):
        if local_files_only:
            folder = Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, allow_patterns=[filename],
                                                            **kwargs))  # type: ignore[arg-type]
            files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
        else:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision)
        matches = sorted(f for f in files if fnmatch.fnmatch(f, filename))
        if len(matches) != 1:
            found = ", ".join(matches) if matches else "none"
            raise ValueError(f"{filename!r} must match exactly one file of {repo_id}; it matches {found}")
        name = matches[0]
    try:
        path = huggingface_hub.hf_hub_download(repo_id, name, local_files_only=local_files_only,
                                               **kwargs)  # type: ignore[arg-type]
    except huggingface_hub.errors.LocalEntryNotFoundError as exc:
        raise FileNotFoundError(f"{repo_id}/{name} is not in the hub cache and local_files_only is set "
                                f"({exc})") from None
    return Path(path)
