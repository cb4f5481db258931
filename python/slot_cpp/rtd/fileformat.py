"""The datastore file: magic bytes, a JSON header's length and the header,
the header's CRC-32 (4 bytes, little-endian), then each array (section) at a
64-byte aligned offset the header records, with its CRC-32 in the header.
Sections are memory-mapped when read.

Loading checks both checksums, so a flipped bit raises DatastoreError instead
of silently changing keys or values. For a very large store the payload check
(one read of the whole file) can be skipped: ``verify=False`` or the
environment variable ``SLOT_CPP_VERIFY_DATASTORE=0``; the header's checksum is
always checked. Files of format 1 (no checksums) still load, unverified."""

from __future__ import annotations

import json
import math
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .._files import atomic_write, crc32
from .errors import DatastoreError

MAGIC = b"SLOTRTD1"
FORMAT_VERSION = 2
_READABLE = (1, 2)   # format 1: no checksums
VERIFY_ENV = "SLOT_CPP_VERIFY_DATASTORE"
_ALIGN = 64


def _aligned(x: int) -> int:
    return (x + _ALIGN - 1) // _ALIGN * _ALIGN


def write_file(path: Path, header: dict[str, Any], sections: Sequence[tuple[str, np.ndarray]]) -> None:
    """Writes `header` (completed with the format, the sections' places and
    checksums and the file's size) and the sections, atomically (a temporary
    file, fsynced, renamed over `path`)."""
    header["format"] = FORMAT_VERSION
    header["sections"] = {}
    # Two passes: the header's own length decides where the data starts.
    for _ in range(2):
        blob = json.dumps(header, sort_keys=True).encode()
        offset = _aligned(len(MAGIC) + 8 + len(blob) + 4)
        for name, arr in sections:
            header["sections"][name] = {"offset": offset, "shape": list(arr.shape), "dtype": arr.dtype.str,
                                        "crc32": crc32(np.ascontiguousarray(arr).data)}
            offset = _aligned(offset + arr.nbytes)
        header["size"] = offset
    blob = json.dumps(header, sort_keys=True).encode()
    with atomic_write(path) as f:
        f.write(MAGIC)
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.write(zlib.crc32(blob).to_bytes(4, "little"))
        for name, arr in sections:
            f.seek(header["sections"][name]["offset"])
            f.write(np.ascontiguousarray(arr).data)
        f.truncate(header["size"])


@contextmanager
def header_fields(path: Path) -> Iterator[None]:
    """Turns a missing or malformed header field into a DatastoreError."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DatastoreError):
            raise
        raise DatastoreError(f"{path}: the header is incomplete ({exc})") from None


def verify_default() -> bool:
    """Whether loading checks the payload's checksums (SLOT_CPP_VERIFY_DATASTORE, default on)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def read_file(path: Path, verify: bool | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The header and the memory-mapped sections (at least keys and values,
    matching the header's n and dim), after checking the file's frame, the
    header's checksum and (unless `verify` is False) each section's."""
    if verify is None:
        verify = verify_default()
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
            stored_crc = f.read(4)
    except OSError as exc:
        raise DatastoreError(f"cannot read {path}: {exc}") from None
    try:
        header = json.loads(blob.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise DatastoreError(f"{path}: the header is corrupt") from None
    if not isinstance(header, dict) or header.get("format") not in _READABLE:
        raise DatastoreError(f"{path}: unsupported datastore format {header.get('format') if isinstance(header, dict) else '?'}")
    checked = header["format"] >= 2
    if checked and (len(stored_crc) != 4 or int.from_bytes(stored_crc, "little") != zlib.crc32(blob)):
        raise DatastoreError(f"{path}: the header's checksum does not match (corrupt file)")
    if header.get("size") != size:
        raise DatastoreError(f"{path} is {size} bytes but its header says {header.get('size')} (truncated?)")
    arrays: dict[str, np.ndarray] = {}
    with header_fields(path):
        for name, sec in header["sections"].items():
            shape = tuple(int(x) for x in sec["shape"])
            dtype = np.dtype(sec["dtype"])
            if dtype.kind not in "fiu" or any(x < 0 for x in shape):
                raise DatastoreError(f"{path}: section {name} has an invalid type or shape")
            end = int(sec["offset"]) + math.prod(shape) * dtype.itemsize
            if int(sec["offset"]) % _ALIGN or end > size:
                raise DatastoreError(f"{path}: section {name} lies outside the file")
            arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=int(sec["offset"]), shape=shape)
            if checked and verify and crc32(arrays[name].data) != int(sec["crc32"]):
                raise DatastoreError(f"{path}: section {name} does not match its checksum (corrupt file)")
        keys, values = arrays["keys"], arrays["values"]
        if keys.shape != (header["n"], header["dim"]) or values.shape != (header["n"],):
            raise DatastoreError(f"{path}: the key and value sections do not match the header")
    return header, arrays
