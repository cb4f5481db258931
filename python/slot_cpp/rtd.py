"""RTD, Reference Trustable Decoding (arXiv 2409.20181): a datastore of the
model's final normed hidden states and what followed them, blended into the
next-token distribution.

A datastore holds (key, value) pairs: key = the final hidden state after the
final norm at a position (the vector SLOT shifts), value = the token that
came next (generation) or the answer's label token (multiple choice). At a
decode step the current hidden state h queries it:

* the K nearest keys by squared L2 distance d_i;
* weights w = softmax(-d / T) over them (shifted by the smallest distance,
  so large d / T cannot underflow every weight);
* the reference distribution r(v) = sum of w_i over neighbours with value v;
* p = lam * r + (1 - lam) * p_LM. lam = 0 is the plain model, exactly.

With ``heads=H`` the keys and h are split into H equal slices, each searched
on its own with softmax(-H * d / T), and the H distributions averaged.

The blend runs natively in the batched token loop (a logit stage after
SLOT's bias and before the sampler): ``model.generate(..., rtd=store)``. The
query is always the model's own h, also when SLOT is on: the keys were taken
from the unshifted model, so h is what they can be compared with; SLOT acts
through p_LM.

Search is exact (a matrix product over every key on the model's ggml
backend, then a top-K), or, after :meth:`Datastore.build_ivf`, an inverted
file: the keys are grouped by their nearest of ``nlist`` centroids (k-means
by faiss, the ``[ann]`` extra) and only the ``nprobe`` nearest lists are
searched.

A datastore file holds the keys (float16), the values, the build parameters
and the model's fingerprint; it is memory-mapped when loaded, and loading it
with another model raises :class:`DatastoreMismatchError`.
"""

from __future__ import annotations

import json
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from . import _core
from ._progress import Progress
from ._model import Model, model_fingerprint
from .options import RtdOptions, SlotOptions, specs
from .options import check_float as _check_float
from .options import check_int as _check_int

__all__ = [
    "CHOICE_LABELS",
    "ChoiceScores",
    "Datastore",
    "DatastoreError",
    "DatastoreMismatchError",
    "RTD",
    "answer_index",
    "format_choice_prompt",
    "score_choices",
]

MAGIC = b"SLOTRTD1"
FORMAT_VERSION = 1
_ALIGN = 64
CHOICE_LABELS = ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J")
DEFAULT_CHOICE_TEMPLATE = "{shots}Question: {question}\n{options}Answer:"
"""The multiple-choice prompt: keys are taken at its last token ("Answer:")."""


class DatastoreError(ValueError):
    """A datastore file or datastore argument is unusable."""


class DatastoreMismatchError(DatastoreError):
    """The datastore was built with another model."""


def format_choice_prompt(question: str, choices: Sequence[str], shots: Sequence[Mapping[str, Any]] = (),
                         template: str = DEFAULT_CHOICE_TEMPLATE) -> str:
    """The multiple-choice prompt: optional solved examples, the question, the
    options as "A. ...", and "Answer:"; the answer is one label token (" A")."""
    if len(choices) < 2 or len(choices) > len(CHOICE_LABELS):
        raise ValueError(f"a question needs 2 to {len(CHOICE_LABELS)} choices, got {len(choices)}")

    def options(cs: Sequence[str]) -> str:
        return "".join(f"{CHOICE_LABELS[i]}. {c}\n" for i, c in enumerate(cs))

    solved = "".join(
        template.format(shots="", question=s["question"], options=options(s["choices"]))
        + f" {CHOICE_LABELS[answer_index(s)]}\n\n" for s in shots)
    return template.format(shots=solved, question=question, options=options(choices))


def answer_index(row: Mapping[str, Any]) -> int:
    answer = row["answer"]
    n = len(row["choices"])
    if isinstance(answer, str):
        answer = answer.strip()
        if answer in CHOICE_LABELS[:n]:
            return CHOICE_LABELS.index(answer)
        if answer.isdigit():
            answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= int(answer) < n:
        raise ValueError(f"answer {row['answer']!r} is not a choice index or label among {n} choices")
    return int(answer)


def _label_tokens(model: Model, n: int) -> list[int]:
    out = []
    for label in CHOICE_LABELS[:n]:
        toks = model.tokenize(" " + label, add_special=False, parse_special=False)
        if len(toks) != 1:
            raise DatastoreError(f"the label ' {label}' is {len(toks)} tokens for this model; labels must be one token")
        out.append(toks[0])
    return out


@dataclass(frozen=True)
class RTD(RtdOptions):
    """RTD settings for one request: ``rtd=RTD(store, k=..., temperature=..., lam=...)``.
    Settings left None take the datastore's defaults (``Datastore.defaults``);
    the options themselves are defined in :class:`slot_cpp.options.RtdOptions`."""

    def __post_init__(self) -> None:
        # The settings are checked once they are resolved against the
        # datastore's defaults, when the request is made (see _apply).
        pass

    def resolved(self) -> "RTD":
        d = self.datastore.defaults
        return RTD(self.datastore, self.k if self.k is not None else int(d["k"]),
                   self.temperature if self.temperature is not None else float(d["temperature"]),
                   self.lam if self.lam is not None else float(d["lam"]),
                   self.nprobe if self.nprobe is not None else int(d.get("nprobe", 0)))

    def _apply(self, model: Model, request: _core.Request) -> None:
        """Checks the resolved settings and sets them on a native request."""
        r = self.resolved()
        store = r.datastore
        index = store.index(model)  # checks the model first
        checked = RtdOptions(**r.as_dict())
        assert checked.k is not None
        if checked.k > len(store):
            raise ValueError(f"rtd k ({checked.k}) is larger than the datastore ({len(store)} keys)")
        request.rtd = index
        for name, _, spec in specs(RtdOptions):
            if spec.native:
                setattr(request, spec.native, getattr(checked, name))
        if request.rtd_nprobe > 0 and not store.has_ivf:
            raise ValueError("rtd nprobe needs an inverted-file index (Datastore.build_ivf)")


RtdOption = Union["Datastore", RTD]


def as_rtd(value: Any) -> Optional[RTD]:
    if value is None:
        return None
    if isinstance(value, RTD):
        return value
    if isinstance(value, Datastore):
        return RTD(value)
    raise TypeError(f"rtd must be a Datastore or an RTD, got {type(value).__name__}")


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
        token_rows, spans, values = [], [], []
        for i, row in enumerate(rows):
            try:
                toks, span, vals = self._row_keys(model, row)
            except (KeyError, TypeError, ValueError) as exc:
                raise DatastoreError(f"row {i}: {exc}") from None
            if len(toks) > model.n_ctx:
                raise DatastoreError(f"row {i} has {len(toks)} tokens; the context holds {model.n_ctx}")
            token_rows.append(toks)
            spans.append(span)
            values.append(vals)
        keys_parts = [np.asarray(self.keys)]
        bar = Progress(len(rows), "rtd build", progress)
        start = time.perf_counter()
        added = 0
        try:
            for a in range(0, len(rows), rows_per_call):
                b = min(len(rows), a + rows_per_call)
                h = model.hidden_states(token_rows[a:b], spans[a:b])
                if not np.all(np.isfinite(h)):
                    raise DatastoreError("the model produced non-finite hidden states")
                keys_parts.append(h.astype(np.float16))
                added += h.shape[0]
                bar.update(b - a, keys=added)
        finally:
            bar.close()
        self.keys = np.ascontiguousarray(np.concatenate(keys_parts))
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
        self.defaults["temperature"] = self.typical_distance(model, k=int(self.defaults["k"]))
        return self

    def _row_keys(self, model: Model, row: Mapping[str, Any]) -> tuple[list[int], tuple[int, int], list[int]]:
        if self.mode == "choice":
            prompt = self.choice_prompt(row["question"], row["choices"])
            toks = model.tokenize(prompt)
            label = _label_tokens(model, len(row["choices"]))[answer_index(row)]
            return toks, (len(toks) - 1, len(toks)), [label]
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TypeError("prompt and completion must be strings")
        p = model.tokenize(prompt)
        c = model.tokenize(completion, add_special=False, parse_special=False)
        if not p or not c:
            raise ValueError("prompt and completion must not be empty")
        toks = p + c
        # The state at position t predicts token t + 1.
        return toks, (len(p) - 1, len(toks) - 1), c

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
        try:
            import faiss
        except ImportError:
            raise ImportError("build_ivf needs faiss: pip install 'slot_cpp[ann]' (faiss-cpu)") from None
        n = len(self)
        nlist = _check_int("nlist", nlist if nlist is not None else max(1, int(4 * math.sqrt(n))), 1)
        if nlist > n:
            raise ValueError(f"nlist ({nlist}) is larger than the datastore ({n} keys)")
        rng = np.random.default_rng(seed)
        sample = self.keys if n <= train_size else self.keys[np.sort(rng.choice(n, train_size, replace=False))]
        km = faiss.Kmeans(self.dim, nlist, niter=_check_int("iterations", iterations, 1), seed=seed,
                          verbose=False, max_points_per_centroid=max(256, train_size // nlist + 1))
        km.train(np.ascontiguousarray(sample, dtype=np.float32))
        centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
        quantizer = faiss.IndexFlatL2(self.dim)
        quantizer.add(centroids)
        assign = np.empty(n, dtype=np.int64)
        for a in range(0, n, 65536):
            _, lab = quantizer.search(np.ascontiguousarray(self.keys[a:a + 65536], dtype=np.float32), 1)
            assign[a:a + 65536] = lab[:, 0]
        order = np.argsort(assign, kind="stable")
        self.keys = np.ascontiguousarray(np.asarray(self.keys)[order])
        self.values = np.ascontiguousarray(np.asarray(self.values)[order])
        counts = np.bincount(assign, minlength=nlist)
        self.centroids = centroids
        self.list_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
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
            "format": FORMAT_VERSION, "mode": self.mode, "n": int(n), "dim": int(dim), "heads": self.heads,
            "key_dtype": "float16", "fingerprint": self.fingerprint, "params": self.params,
            "defaults": self.defaults, "sections": {},
        }
        # Two passes: the header's own length decides where the data starts.
        for _ in range(2):
            blob = json.dumps(header, sort_keys=True).encode()
            offset = _aligned(len(MAGIC) + 8 + len(blob))
            for name, arr in sections:
                header["sections"][name] = {"offset": offset, "shape": list(arr.shape), "dtype": arr.dtype.str}
                offset = _aligned(offset + arr.nbytes)
            header["size"] = offset
        blob = json.dumps(header, sort_keys=True).encode()
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, arr in sections:
                f.seek(header["sections"][name]["offset"])
                f.write(arr.tobytes())
            f.truncate(header["size"])
        os.replace(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike[str]], model: Optional[Model] = None) -> "Datastore":
        """Opens a datastore file, memory-mapping its keys; with `model`,
        checks that it was built with that model."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                magic = f.read(len(MAGIC))
                if magic != MAGIC:
                    raise DatastoreError(f"{path} is not a slot_cpp datastore (bad magic bytes)")
                length = int.from_bytes(f.read(8), "little")
                if length <= 0 or length > min(size, 1 << 26):
                    raise DatastoreError(f"{path}: the header length is invalid (truncated or corrupt file)")
                blob = f.read(length)
        except OSError as exc:
            raise DatastoreError(f"cannot read {path}: {exc}") from None
        try:
            header = json.loads(blob.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DatastoreError(f"{path}: the header is corrupt") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise DatastoreError(f"{path}: unsupported datastore format {header.get('format') if isinstance(header, dict) else '?'}")
        if header.get("size") != size:
            raise DatastoreError(f"{path} is {size} bytes but its header says {header.get('size')} (truncated?)")
        arrays: dict[str, np.ndarray] = {}
        try:
            for name, sec in header["sections"].items():
                shape = tuple(int(x) for x in sec["shape"])
                dtype = np.dtype(sec["dtype"])
                end = int(sec["offset"]) + int(np.prod(shape)) * dtype.itemsize
                if int(sec["offset"]) % _ALIGN or end > size:
                    raise DatastoreError(f"{path}: section {name} lies outside the file")
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=int(sec["offset"]), shape=shape)
            keys, values = arrays["keys"], arrays["values"]
            if keys.shape != (header["n"], header["dim"]) or values.shape != (header["n"],):
                raise DatastoreError(f"{path}: the key and value sections do not match the header")
            store = cls(keys=keys, values=values, mode=header["mode"], heads=int(header["heads"]),
                        fingerprint=dict(header["fingerprint"]), params=dict(header["params"]),
                        defaults=dict(header["defaults"]), centroids=arrays.get("centroids"),
                        list_offsets=arrays.get("list_offsets"), path=path)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, DatastoreError):
                raise
            raise DatastoreError(f"{path}: the header is incomplete ({exc})") from None
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


def _aligned(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


# ---- multiple choice ----------------------------------------------------------
@dataclass(frozen=True)
class ChoiceScores:
    """Option probabilities (renormalised over the options) of one question:
    ``plain`` without RTD, ``rtd`` with it (None without), both under SLOT's
    delta when it was learned (``lr``: the step size used, 0 without SLOT)."""

    plain: np.ndarray
    rtd: Optional[np.ndarray]
    lr: float = 0.0

    @property
    def plain_choice(self) -> int:
        return int(np.argmax(self.plain))

    @property
    def rtd_choice(self) -> Optional[int]:
        return None if self.rtd is None else int(np.argmax(self.rtd))


def score_choices(model: Model, questions: Sequence[Mapping[str, Any]], *, rtd: Optional[RtdOption] = None,
                  shots: Sequence[Mapping[str, Any]] = (), template: Optional[str] = None, steps: int = 0,
                  lr: Union[float, str] = SlotOptions.lr, kl_budget: float = SlotOptions.kl_budget) -> list[ChoiceScores]:
    """For each ``{"question", "choices"}``: the probabilities of the option
    labels without and, with ``rtd``, with the blend, both renormalised over
    the options. With a choice datastore, its stored prompt format (shots,
    template) is used unless given. With ``steps`` > 0, SLOT learns a delta
    on each prompt (``lr``: a step size or "auto", with ``kl_budget``) and
    both are scored under it; RTD's query stays the plain state, as in
    generation."""
    option = as_rtd(rtd)
    if option is not None and option.datastore.mode == "choice" and template is None and not shots:
        fmt = option.datastore.choice_prompt
    else:
        tmpl = template or DEFAULT_CHOICE_TEMPLATE

        def fmt(question: str, choices: Sequence[str]) -> str:
            return format_choice_prompt(question, choices, shots, tmpl)
    prompts, labels = [], []
    for i, q in enumerate(questions):
        try:
            prompts.append(fmt(q["question"], q["choices"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"question {i}: {exc}") from None
        labels.append(_label_tokens(model, len(q["choices"])))
    plain = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, steps=steps, lr=lr,
                                 kl_budget=kl_budget)
    blended = None
    if option is not None:
        deltas = [r.delta for r in plain]
        blended = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, rtd=option,
                                       delta=deltas if steps > 0 else None)
    out = []
    for i in range(len(prompts)):
        p = _renormalise(plain[i].score_logprobs)
        r = _renormalise(blended[i].score_logprobs) if blended is not None else None
        out.append(ChoiceScores(p, r, float(plain[i].lr) if steps > 0 else 0.0))
    return out


def _renormalise(logprobs: Optional[Sequence[float]]) -> np.ndarray:
    lp = np.asarray(logprobs, dtype=np.float64)
    if not np.any(np.isfinite(lp)):
        return np.full(lp.shape, 1.0 / lp.size)
    e = np.exp(lp - np.max(lp[np.isfinite(lp)]))
    return e / e.sum()


# ---- tuning -------------------------------------------------------------------
def _reference_mass(store: Datastore, dist: np.ndarray, ids: np.ndarray, targets: np.ndarray,
                    k: int, temperature: float) -> np.ndarray:
    """r(target) for each query from its neighbours (n, heads, >= k): the
    same formula as the native stage, vectorised. targets: (n, m) -> (n, m)."""
    d = dist[:, :, :k].astype(np.float64)
    i = ids[:, :, :k]
    valid = i >= 0
    d = np.where(valid, d, np.inf)
    w = np.exp(-(d - d.min(axis=2, keepdims=True)) * store.heads / temperature)
    w = np.where(valid, w, 0.0)
    w /= w.sum(axis=2, keepdims=True)
    vals = np.asarray(store.values)[np.where(valid, i, 0)]
    match = vals[:, :, :, None] == targets[:, None, None, :]
    return (w[:, :, :, None] * match).sum(axis=2).mean(axis=1)


@dataclass(frozen=True)
class TuneResult:
    """The chosen settings and every setting's score."""

    k: int
    temperature: float
    lam: float
    metric: str              # "accuracy" (higher is better) or "nll" (lower is better)
    score: float
    plain_score: float
    table: list[dict[str, float]]


def _choice_parts(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]]
                  ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[int]]:
    prompts = [store.choice_prompt(r["question"], r["choices"]) for r in rows]
    labels = [_label_tokens(model, len(r["choices"])) for r in rows]
    res = model.generate_batch(prompts, max_tokens=0, score_tokens=labels, return_hidden=True)
    hidden = np.stack([np.asarray(r.hidden) for r in res]).astype(np.float32)
    return hidden, [np.asarray(r.score_logprobs) for r in res], [np.asarray(l) for l in labels], \
        [answer_index(r) for r in rows]


def _generation_parts(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]],
                      deltas: Optional[Sequence[Optional[np.ndarray]]] = None
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row: the states before each completion token, the model's
    log-probabilities of those tokens (under the row's delta, if any), and
    the tokens."""
    if deltas is not None and len(deltas) != len(rows):
        raise ValueError(f"deltas has {len(deltas)} entries for {len(rows)} rows")
    out = []
    for i, row in enumerate(rows):
        toks, span, gold = store._row_keys(model, row)
        hidden = model.hidden_states([toks], [span])
        delta = None if deltas is None else deltas[i]
        lp = np.asarray(model.token_logprobs(toks, span[0] + 1, delta), dtype=np.float64)
        out.append((hidden, lp, np.asarray(gold)))
    return out


def tune(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
         ks: Sequence[int] = (8, 16, 32, 64, 128, 256), temperature_scales: Sequence[float] = (0.1, 0.3, 1.0, 3.0),
         lams: Sequence[float] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85), save: bool = True,
         progress: bool = True) -> TuneResult:
    """Chooses k, temperature and lambda on validation rows (not in the
    datastore): accuracy for a choice datastore (ties by the answer's
    probability), gold-token NLL for a generation one. Neighbours are
    searched once; every setting is scored from them. With ``save``, the
    choice becomes the datastore's defaults."""
    rows = list(rows)
    if not rows:
        raise ValueError("tune needs validation rows")
    ks = sorted({min(int(k), len(store)) for k in ks if int(k) >= 1})
    if not ks:
        raise ValueError("no usable k")
    for lam in lams:
        _check_float("lam", lam, low=0.0, high=1.0)
    base_t = store.typical_distance(model, k=ks[len(ks) // 2])
    kmax = ks[-1]
    table: list[dict[str, float]] = []
    if store.mode == "choice":
        hidden, lps, labels, answers = _choice_parts(model, store, rows)
        dist, ids = store.search(model, hidden, kmax)
        width = max(len(l) for l in labels)
        targets = np.full((len(rows), width), -1, dtype=np.int64)
        plain = np.full((len(rows), width), -np.inf)
        for i, (l, lp) in enumerate(zip(labels, lps)):
            targets[i, :len(l)] = l
            plain[i, :len(l)] = lp
        p_plain = np.exp(plain)
        ans = np.asarray(answers)

        def score(p: np.ndarray) -> tuple[float, float]:
            acc = float(np.mean(np.argmax(p, axis=1) == ans))
            p_ans = p[np.arange(len(ans)), ans] / p.sum(axis=1)
            return acc, float(np.mean(np.log(np.maximum(p_ans, 1e-300))))
        plain_score = score(p_plain)
        best: Optional[tuple[tuple[float, float], dict[str, float]]] = None
        for k in ks:
            for scale in temperature_scales:
                r = _reference_mass(store, dist, ids, targets, k, base_t * scale)
                for lam in lams:
                    s = score(lam * r + (1 - lam) * p_plain)
                    entry = {"k": k, "temperature": base_t * scale, "lam": float(lam), "accuracy": s[0],
                             "answer_logprob": s[1]}
                    table.append(entry)
                    if best is None or s > best[0]:
                        best = (s, entry)
        metric, sign = "accuracy", 1.0
        plain_value = plain_score[0]
    else:
        parts = _generation_parts(model, store, rows)
        searched = [store.search(model, h, kmax) for h, _, _ in parts]
        best_nll: Optional[tuple[float, dict[str, float]]] = None
        for k in ks:
            for scale in temperature_scales:
                rs = [_reference_mass(store, d, i, g[:, None], k, base_t * scale)[:, 0]
                      for (d, i), (_, _, g) in zip(searched, parts)]
                for lam in lams:
                    nll = float(np.mean(np.concatenate([
                        -np.log(lam * r + (1 - lam) * np.exp(lp)) for r, (_, lp, _) in zip(rs, parts)])))
                    entry = {"k": k, "temperature": base_t * scale, "lam": float(lam), "nll": nll}
                    table.append(entry)
                    if best_nll is None or nll < best_nll[0]:
                        best_nll = (nll, entry)
        assert best_nll is not None
        best = ((-best_nll[0], 0.0), best_nll[1])
        metric, sign = "nll", -1.0
        plain_value = float(np.mean(np.concatenate([-lp for _, lp, _ in parts])))
    assert best is not None
    chosen = best[1]
    result = TuneResult(k=int(chosen["k"]), temperature=float(chosen["temperature"]), lam=float(chosen["lam"]),
                        metric=metric, score=float(best[0][0]) * sign, plain_score=plain_value, table=table)
    if save:
        store.defaults.update({"k": result.k, "temperature": result.temperature, "lam": result.lam,
                               "tuned_on": len(rows), "tuned_metric": metric})
    return result


def generation_nll(model: Model, store: Datastore, rows: Sequence[Mapping[str, Any]], *,
                   rtd: Optional[RtdOption] = None,
                   deltas: Optional[Sequence[Optional[np.ndarray]]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean gold-token NLL per row under the model and under the blend
    (settings from ``rtd`` or the datastore's defaults).

    With ``deltas`` (a SLOT delta per row, or None for a row without one),
    the model's distribution is the one shifted by each row's delta, and the
    blend is RTD on top of SLOT; the query stays the plain state, as in
    generation."""
    opt = (as_rtd(rtd) or RTD(store)).resolved()
    assert opt.k is not None and opt.temperature is not None and opt.lam is not None
    parts = _generation_parts(model, store, rows, deltas)
    model_nll, blended = [], []
    for h, lp, g in parts:
        d, i = store.search(model, h, opt.k, nprobe=opt.nprobe or 0)
        r = _reference_mass(store, d, i, g[:, None], opt.k, opt.temperature)[:, 0]
        model_nll.append(float(np.mean(-lp)))
        blended.append(float(np.mean(-np.log(opt.lam * r + (1 - opt.lam) * np.exp(lp)))))
    return np.asarray(model_nll), np.asarray(blended)


__all__ += ["TuneResult", "generation_nll", "tune"]
