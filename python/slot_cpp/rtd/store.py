"""The datastore: keys, values, how they were made, its native index per
model, exact and inverted-file search, and its file."""

from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from .. import _core
from .._model import Model, model_fingerprint
from ..options import check_int as _check_int
from .fileformat import header_fields, read_file, write_file
from .build import hidden_keys, tokenize_rows
from .errors import DatastoreError, DatastoreMismatchError
from .ivf import inverted_file
from .prompts import DEFAULT_CHOICE_TEMPLATE, format_choice_prompt
from .request import DEFAULT_GATE, RTD, check_gate


@dataclass
class Datastore:
    """Keys (n, n_embd) float16, values (n,) int32, and how they were made."""

    keys: np.ndarray
    values: np.ndarray
    mode: str                       # "generation" or "choice"
    heads: int
    fingerprint: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)   # how it was built
    defaults: dict[str, Any] = field(default_factory=dict)
    centroids: Optional[np.ndarray] = None   # (nlist, dim) float32, with an inverted file
    list_offsets: Optional[np.ndarray] = None  # (nlist + 1,) int64
    path: Optional[Path] = None
    _indexes: "weakref.WeakKeyDictionary[Any, Any]" = field(default_factory=weakref.WeakKeyDictionary, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("generation", "choice"):
            raise DatastoreError(f"mode must be 'generation' or 'choice', got {self.mode!r}")
        if self.keys.ndim != 2 or self.keys.dtype != np.float16:
            raise DatastoreError("keys must be a float16 array of shape (n, dim)")
        if self.values.shape != (self.keys.shape[0],) or self.values.dtype != np.int32:
            raise DatastoreError("values must be an int32 array with one value per key")
        if self.heads < 1 or self.keys.shape[1] % self.heads:
            raise DatastoreError(f"heads ({self.heads}) must divide the key dimension ({self.keys.shape[1]})")

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def _apply(self, model: Model, request: _core.Request) -> None:
        """``rtd=store``: the datastore with its default settings."""
        RTD(self)._apply(model, request)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Datastore(mode={self.mode!r}, keys={len(self)}, dim={self.dim}, heads={self.heads}{where})"

    @property
    def dim(self) -> int:
        return int(self.keys.shape[1])

    @property
    def has_ivf(self) -> bool:
        return self.centroids is not None

    # ---- building -------------------------------------------------------------
    @classmethod
    def build(cls, model: Model, rows: Iterable[Mapping[str, Any]], *, mode: Optional[str] = None,
              heads: int = 1, shots: Sequence[Mapping[str, Any]] = (), template: str = DEFAULT_CHOICE_TEMPLATE,
              progress: bool = True, rows_per_call: int = 64) -> "Datastore":
        """A datastore from rows: ``{"prompt", "completion"}`` (generation:
        a key at every completion token) or ``{"question", "choices",
        "answer"}`` (choice: a key at the prompt's last token, the answer's
        label as value). ``mode`` defaults to what the first row holds.
        Choice prompts are formatted by :func:`format_choice_prompt` with
        ``shots`` and ``template``, which are stored, so that queries use the
        same format. Rows are evaluated in batches in a context of their own,
        without the output head."""
        rows = list(rows)
        if not rows:
            raise DatastoreError("no rows to build a datastore from")
        if mode is None:
            mode = "choice" if "choices" in rows[0] else "generation"
        heads = _check_int("heads", heads, 1)
        if model.n_embd % heads:
            raise DatastoreError(f"heads ({heads}) must divide the model's hidden size ({model.n_embd})")
        store = cls(keys=np.zeros((0, model.n_embd), np.float16), values=np.zeros(0, np.int32), mode=mode,
                    heads=heads, fingerprint=model_fingerprint(model),
                    params={"rows": 0, "tokens": 0, "template": template,
                           "shots": [dict(s) for s in shots], "seconds": 0.0},
                    defaults={})
        store.extend(model, rows, progress=progress, rows_per_call=rows_per_call)
        return store

    def extend(self, model: Model, rows: Iterable[Mapping[str, Any]], *, progress: bool = True,
               rows_per_call: int = 64) -> "Datastore":
        """Adds rows' keys (a datastore is appendable); drops any inverted
        file (build it again) and recomputes the default temperature."""
        self.check_model(model)
        rows = list(rows)
        rows_per_call = _check_int("rows_per_call", rows_per_call, 1)
        token_rows, spans, values = tokenize_rows(self, model, rows)
        start = time.perf_counter()
        added = hidden_keys(model, token_rows, spans, progress=progress, rows_per_call=rows_per_call)
        self.keys = np.ascontiguousarray(np.concatenate([np.asarray(self.keys)] + added))
        self.values = np.concatenate([np.asarray(self.values)] + [np.asarray(v, np.int32) for v in values])
        self.params["rows"] = int(self.params.get("rows", 0)) + len(rows)
        self.params["tokens"] = int(self.params.get("tokens", 0)) + sum(len(t) for t in token_rows)
        self.params["seconds"] = float(self.params.get("seconds", 0.0)) + time.perf_counter() - start
        self.centroids = self.list_offsets = None
        self.defaults.pop("nprobe", None)
        self._indexes = weakref.WeakKeyDictionary()
        self.path = None
        if len(self) == 0:
            raise DatastoreError("the rows gave no keys")
        self.defaults.setdefault("k", 32 if self.mode == "choice" else 256)
        self.defaults["k"] = min(int(self.defaults["k"]), len(self))
        self.defaults.setdefault("lam", 0.5 if self.mode == "choice" else 0.25)
        self.defaults.setdefault("gate", dict(DEFAULT_GATE))
        self.defaults["temperature"] = self.typical_distance(model, k=int(self.defaults["k"]))
        self.defaults["distance_scale"] = self.nearest_distance_scale(model)
        return self

    def choice_prompt(self, question: str, choices: Sequence[str]) -> str:
        """The prompt format this datastore's keys were taken with."""
        return format_choice_prompt(question, choices, self.params.get("shots", ()),
                                    self.params.get("template", DEFAULT_CHOICE_TEMPLATE))

    def typical_distance(self, model: Model, *, k: int, sample: int = 256, seed: int = 0) -> float:
        """The median distance from a key to its k nearest other keys (per
        head, times heads): the scale of the default temperature."""
        n = len(self)
        if n < 2:
            return 1.0
        rng = np.random.default_rng(seed)
        pick = rng.choice(n, size=min(sample, n), replace=False)
        kk = min(k + 1, n)
        dist, ids = self.search(model, self.keys[pick].astype(np.float32), kk)
        own = ids == pick[:, None, None]
        d = np.where(own, np.nan, dist.astype(np.float64))
        typical = float(np.nanmedian(d)) * self.heads
        return typical if math.isfinite(typical) and typical > 0 else 1.0

    def nearest_distance_scale(self, model: Model, *, sample: int = 256, seed: int = 0) -> float:
        """The median distance from a key to its nearest other key (heads
        times the heads' mean): the gate's unit of distance."""
        n = len(self)
        if n < 2:
            return 1.0
        rng = np.random.default_rng(seed)
        pick = rng.choice(n, size=min(sample, n), replace=False)
        dist, ids = self.search(model, self.keys[pick].astype(np.float32), 2)
        d = dist.astype(np.float64)
        # Each head's nearest key other than the query itself.
        nearest = np.where(ids[:, :, 0] == pick[:, None], d[:, :, 1], d[:, :, 0])
        scale = float(np.median(nearest.mean(axis=1))) * self.heads
        return scale if math.isfinite(scale) and scale > 0 else 1.0

    def gate_settings(self, model: Model) -> tuple[dict[str, float], float]:
        """The gate's weights (the defaults' gate, else DEFAULT_GATE) and its
        distance scale (measured once if the datastore has none recorded)."""
        weights = check_gate(self.defaults.get("gate") or DEFAULT_GATE)
        scale = self.defaults.get("distance_scale")
        if scale is None:
            scale = self.defaults["distance_scale"] = self.nearest_distance_scale(model)
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise DatastoreError(f"the datastore's distance_scale must be > 0, got {scale}")
        return weights, scale

    # ---- searching ------------------------------------------------------------
    def check_model(self, model: Model) -> None:
        """Raises DatastoreMismatchError unless `model` is the one the keys came from."""
        mine = model_fingerprint(model)
        for key in ("architecture", "n_embd", "n_vocab", "vocab", "head"):
            if self.fingerprint.get(key) != mine.get(key):
                raise DatastoreMismatchError(
                    f"this datastore was built with another model: {key} is {self.fingerprint.get(key)!r} "
                    f"in the datastore but {mine.get(key)!r} for {Path(model.path).name}")

    def index(self, model: Model) -> _core.RtdIndex:
        """The native index of these keys for `model` (made once per model)."""
        s = model.native_session()
        idx = self._indexes.get(s)
        if idx is None:
            self.check_model(model)
            idx = s.make_rtd_index(self.keys, self.values, self.heads)
            if self.centroids is not None and self.list_offsets is not None:
                idx.set_ivf(self.centroids, [int(x) for x in self.list_offsets])
            self._indexes[s] = idx
        return idx

    def search(self, model: Model, queries: np.ndarray, k: int, *, nprobe: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Distances (n, heads, k) ascending and key indices (n, heads, k) of
        the k nearest keys of each query (n, dim); exact unless nprobe > 0."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (n, {self.dim}), got {np.shape(queries)}")
        k = _check_int("k", k, 1)
        if k > len(self):
            raise ValueError(f"k ({k}) is larger than the datastore ({len(self)} keys)")
        if nprobe and not self.has_ivf:
            raise ValueError("nprobe needs an inverted-file index (build_ivf)")
        d, i = self.index(model).search(np.ascontiguousarray(q), k, _check_int("nprobe", nprobe, 0))
        return d, i

    def reference(self, model: Model, query: np.ndarray, *, k: Optional[int] = None,
                  temperature: Optional[float] = None, nprobe: int = 0) -> dict[int, float]:
        """r(v) for one query: the reference distribution over values."""
        r = RTD(self, k=k, temperature=temperature, nprobe=nprobe).resolved()
        assert r.k is not None and r.temperature is not None
        pairs = self.index(model).reference(np.asarray(query, np.float32), int(r.k), float(r.temperature),
                                            int(r.nprobe or 0))
        return {int(v): float(p) for v, p in pairs}

    def build_ivf(self, model: Model, nlist: Optional[int] = None, *, nprobe: Optional[int] = None,
                  iterations: int = 20, seed: int = 0, train_size: int = 65536) -> "Datastore":
        """Groups the keys by their nearest of `nlist` k-means centroids
        (faiss, the ``[ann]`` extra), so that a search can read only the
        `nprobe` nearest lists. Reorders keys and values; needs heads=1."""
        if self.heads != 1:
            raise DatastoreError("an inverted-file index needs heads=1 (multi-head search is exact)")
        centroids, order, offsets = inverted_file(self.keys, nlist, iterations=iterations, seed=seed,
                                                  train_size=train_size)
        self.keys = np.ascontiguousarray(np.asarray(self.keys)[order])
        self.values = np.ascontiguousarray(np.asarray(self.values)[order])
        self.centroids = centroids
        self.list_offsets = offsets
        nlist = len(offsets) - 1
        self.defaults["nprobe"] = _check_int("nprobe", nprobe if nprobe is not None else max(1, nlist // 16), 1)
        self._indexes = weakref.WeakKeyDictionary()
        self.path = None
        return self

    def recall(self, model: Model, queries: np.ndarray, k: int, nprobe: int) -> float:
        """Recall@k of the inverted file against exact search on `queries`."""
        _, exact = self.search(model, queries, k)
        _, approx = self.search(model, queries, k, nprobe=nprobe)
        hits = sum(len(set(e[0].tolist()) & set(a[0].tolist())) for e, a in zip(exact, approx))
        return hits / (len(queries) * k)

    # ---- files ----------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike[str]]) -> Path:
        """Writes the datastore to one file (header, keys, values, inverted file)."""
        path = Path(path)
        n, dim = self.keys.shape
        sections: list[tuple[str, np.ndarray]] = [("keys", np.ascontiguousarray(self.keys, np.float16)),
                                                  ("values", np.ascontiguousarray(self.values, np.int32))]
        if self.centroids is not None and self.list_offsets is not None:
            sections += [("centroids", np.ascontiguousarray(self.centroids, np.float32)),
                         ("list_offsets", np.ascontiguousarray(self.list_offsets, np.int64))]
        header: dict[str, Any] = {
            "mode": self.mode, "n": int(n), "dim": int(dim), "heads": self.heads, "key_dtype": "float16",
            "fingerprint": self.fingerprint, "params": self.params, "defaults": self.defaults,
        }
        write_file(path, header, sections)
        self.path = path
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]], model: Optional[Model] = None, *,
             verify: Optional[bool] = None) -> "Datastore":
        """Opens a datastore file, memory-mapping its keys; with `model`,
        checks that it was built with that model. The payload's checksums
        are checked (one read of the file) unless `verify` is False, or None
        with SLOT_CPP_VERIFY_DATASTORE=0 in the environment."""
        path = Path(path)
        header, arrays = read_file(path, verify)
        with header_fields(path):
            store = cls(keys=arrays["keys"], values=arrays["values"], mode=header["mode"],
                        heads=int(header["heads"]), fingerprint=dict(header["fingerprint"]),
                        params=dict(header["params"]), defaults=dict(header["defaults"]),
                        centroids=arrays.get("centroids"), list_offsets=arrays.get("list_offsets"), path=path)
        if model is not None:
            store.check_model(model)
        return store

    def info(self) -> dict[str, Any]:
        """A summary for people: sizes, parameters, defaults."""
        out: dict[str, Any] = {
            "path": str(self.path) if self.path else None, "mode": self.mode, "keys": len(self),
            "dim": self.dim, "heads": self.heads, "key_bytes": int(self.keys.nbytes),
            "values": int(np.unique(np.asarray(self.values)).size), "defaults": dict(self.defaults),
            "params": {k: v for k, v in self.params.items() if k != "shots"},
            "shots": len(self.params.get("shots", ())), "model": dict(self.fingerprint),
        }
        if self.has_ivf:
            assert self.list_offsets is not None
            out["ivf"] = {"nlist": int(len(self.list_offsets) - 1), "nprobe": self.defaults.get("nprobe")}
        return out


RtdOption = Union[Datastore, RTD]
"""What ``rtd=`` takes: a datastore (its default settings) or an :class:`RTD`."""


def as_rtd(value: Any) -> Optional[RTD]:
    if value is None:
        return None
    if isinstance(value, RTD):
        return value
    if isinstance(value, Datastore):
        return RTD(value)
    raise TypeError(f"rtd must be a Datastore or an RTD, got {type(value).__name__}")
