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

