"""What the routes share: the configuration, the model, what was loaded at
start-up (datastores, rewards, correctors), the metrics and the admission count."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Optional

from .._model import Model
from ..options import ServerSettings
from .errors import overloaded
from .metrics import Metrics

ServerConfig = ServerSettings
"""What a server exposes and its limits: :class:`slot_cpp.options.ServerSettings`,
the same definition as ``slot-cpp serve``'s flags (``model_id`` None: the GGUF
file's stem)."""


def _api_keys(config: ServerSettings) -> tuple[bytes, ...]:
    """Every accepted API key: api_key and api_key_file's lines; empty: no key needed."""
    keys = [] if config.api_key is None else [config.api_key]
    if config.api_key_file is not None:
        try:
            text = Path(config.api_key_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"api_key_file: cannot read {config.api_key_file}: {exc.strerror}") from None
        from_file = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not from_file:
            raise ValueError(f"api_key_file: {config.api_key_file} holds no key")
        keys += from_file
    return tuple(k.encode() for k in keys)


def parse_named_paths(items: Optional[list[str]], what: str) -> dict[str, str]:
    """``["name=value", ...]`` -> dict, with clear errors."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} must be NAME=VALUE, got {item!r}")
        if name in out:
            raise ValueError(f"{what} name {name!r} is given twice")
        out[name] = value
    return out


class State:
    """What the routes share: the model, what was loaded at start-up, the
    metrics, and the admission count."""

    def __init__(self, model: Model, config: ServerSettings) -> None:
        self.model = model
        self.config = config
        self.metrics = Metrics()
        self.datastores: dict[str, Any] = {}
        self.rewards: dict[str, Any] = {}
        # Requests beyond the live sequences and the waiting room get 503 at
        # once, rather than queueing without bound.
        self.capacity = model.n_parallel + config.max_waiting
        self.admitted = 0
        self.admit_lock = threading.Lock()
        self.created = int(time.time())
        self.api_keys = _api_keys(config)
        if config.datastores:
            from ..rtd import Datastore

            for name, path in config.datastores.items():
                self.datastores[name] = Datastore.load(path, model)
        for name, spec in config.rewards.items():
            self.rewards[name] = _make_reward(model, name, spec)
        self.correctors: dict[str, Any] = {}
        try:
            for name, spec in config.correctors.items():
                self.correctors[name] = _make_corrector(model, name, spec)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Frees the correctors' models (the served model is the caller's)."""
        for corrector in self.correctors.values():
            corrector.model.close()

    def admit(self) -> None:
        with self.admit_lock:
            if self.admitted >= self.capacity:
                raise overloaded(f"the server is serving {self.admitted} requests, its limit; retry later",
                                 self.config.retry_after_seconds)
            self.admitted += 1
            self.metrics.in_flight = self.admitted

    def release(self) -> None:
        with self.admit_lock:
            self.admitted -= 1
            self.metrics.in_flight = self.admitted


def _make_reward(model: Model, name: str, spec: str) -> Any:
    from .. import qalign as qa

    kind, _, arg = spec.partition(":")
    if kind == "head":
        if not arg:
            raise ValueError(f"reward {name!r}: head needs a path (head:PATH)")
        reward = qa.LinearReward.load(arg, model)
        reward.name = name
        return reward
    if kind == "judge":
        return qa.JudgeReward(model, name=name)
    raise ValueError(f"reward {name!r}: unknown kind {kind!r} (expected head:PATH or judge)")


def _make_corrector(model: Model, name: str, spec: str) -> Any:
    from ..lmcor import Corrector

    path, _, adapter = spec.partition(",")
    if not path:
        raise ValueError(f"corrector {name!r}: expected MODEL.gguf[,ADAPTER.gguf], got {spec!r}")
    corrector_model = Model(path, n_ctx=2048 * model.n_parallel, n_parallel=model.n_parallel,
                            lora=adapter or None)
    try:
        return Corrector(corrector_model, overflow="drop")
    except BaseException:
        corrector_model.close()
        raise
