"""The datastore file: magic bytes, a JSON header's length and the header,
then each array (section) at a 64-byte aligned offset the header records.
Sections are memory-mapped when read."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import DatastoreError

MAGIC = b"SLOTRTD1"
FORMAT_VERSION = 1
_ALIGN = 64


def _aligned(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


def write_file(path: Path, header: dict[str, Any], sections: Sequence[tuple[str, np.ndarray]]) -> None:
    """Writes `header` (completed with the format, the sections' places and
    the file's size) and the sections, through a temporary file."""
    header["format"] = FORMAT_VERSION
    header["sections"] = {}
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


@contextmanager
def header_fields(path: Path) -> Iterator[None]:
    """Turns a missing or malformed header field into a DatastoreError."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DatastoreError):
            raise
        raise DatastoreError(f"{path}: the header is incomplete ({exc})") from None


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and the memory-mapped sections (at least keys and values,
    matching the header's n and dim), after checking the file's frame."""
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
    with header_fields(path):
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
    return header, arrays
