"""Crash-safe writing of the files slot_cpp produces.

A whole file (datastore, reward head, delta, adapter, a record file written
at once) goes to a temporary file in the same directory, is flushed and
fsynced, and then renamed over the target: a process killed at any point
leaves either the old file or the complete new one (and at worst a stray
temporary ``.<name>.<pid>.tmp``). Record files that grow by appending
(``eval gsm8k``, ``lmcor make-data``) are opened with :func:`open_append`,
which drops a last line that an interruption cut off, so the next run redoes
that record instead of gluing the next one onto it.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

_CHUNK = 1 << 24


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # a platform without directory handles
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: PathLike) -> Path:
    """The temporary file an atomic write of ``path`` goes through."""
    p = Path(path)
    return p.with_name(f".{p.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path for a writer that takes a file name; when the block
    ends without an error, the file there is fsynced and renamed to ``path``."""
    target = Path(path)
    tmp = temporary_path(target)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(target.parent)


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """An open temporary file; renamed to ``path`` (after flush and fsync)
    when the block ends without an error, removed otherwise."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_write writes a new file: mode 'w' or 'wb'")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def drop_cut_line(path: PathLike) -> int:
    """Truncates a text file after its last newline (the rest is a line an
    interruption cut off); returns the number of bytes dropped."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(p, "rb+") as f:
        pos = size
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos - step + nl + 1
                break
            pos -= step
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
        return size - keep


def read_jsonl(path: PathLike, what: str = "", *, limit: Optional[int] = None) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each non-blank line of a JSONL file (the one
    JSONL reader of the package); a line that is not JSON raises ValueError
    naming the file and line (and ``what`` to do about it). With ``limit``,
    stops after that many values."""
    if limit is not None and limit <= 0:
        return
    count = 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg}){what}") from None
            yield line_no, value
            count += 1
            if limit is not None and count >= limit:
                return


def open_append(path: PathLike) -> IO[str]:
    """Opens a JSONL record file for appending, after dropping a cut-off last line."""
    drop_cut_line(path)
    return open(path, "a", encoding="utf-8")


def sync(f: IO) -> None:
    """Flushes a file and its data to the disk."""
    f.flush()
    os.fsync(f.fileno())


def crc32(data: "memoryview | bytes") -> int:
    """CRC-32 of a buffer, in chunks (a memory-mapped section is read once)."""
    view = memoryview(data).cast("B")
    crc = 0
    for start in range(0, len(view), _CHUNK):
        crc = zlib.crc32(view[start:start + _CHUNK], crc)
    return crc


# ---- checksummed JSONL records ------------------------------------------------
_CRC_PREFIX = '{"crc32": '


def record_line(record: dict) -> str:
    """A JSONL line of ``record`` led by the CRC-32 of its JSON text."""
    body = json.dumps(record)
    return _CRC_PREFIX + str(zlib.crc32(body.encode())) + ", " + body[1:] + "\n" if body != "{}" else \
        _CRC_PREFIX + str(zlib.crc32(body.encode())) + "}\n"


def parse_record_line(line: str) -> tuple[object, bool]:
    """(record, checked) of a line; raises ValueError when its checksum does
    not match. A line without the checksum (files of older versions) is
    returned unchecked."""
    value = json.loads(line)
    if not line.lstrip().startswith(_CRC_PREFIX):
        return value, False
    if not isinstance(value, dict) or not isinstance(value.get("crc32"), int):
        raise ValueError("the record's checksum is malformed")
    crc = value.pop("crc32")
    if zlib.crc32(json.dumps(value).encode()) != crc:
        raise ValueError("the record does not match its checksum")
    return value, True


def read_records(path: PathLike) -> list[dict]:
    """The records of a JSONL record file. A last line without its newline
    (cut off by an interruption) is left out, to be redone; any other line
    that is not a JSON object or does not match its checksum raises
    ValueError naming it (a damaged file). Lines without a checksum (files
    of older versions) are read unchecked, unless others in the file have one."""
    records: list[dict] = []
    any_checked = any_unchecked = False
    file = Path(path)
    if not file.exists():
        return records
    with file.open("rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    for line_no, raw in enumerate(lines, start=1):
        cut = line_no == len(lines)  # after the last newline: complete only if empty
        try:
            line = raw.decode("utf-8").strip()
            if not line:
                continue
            record, checked = parse_record_line(line)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            if cut:
                break
            why = "not valid JSON" if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError)) else str(exc)
            raise ValueError(f"{path}:{line_no}: a damaged record ({why}); remove that line to redo it") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: a record must be a JSON object")
        any_checked |= checked
        any_unchecked |= not checked
        if any_checked and any_unchecked:
            raise ValueError(f"{path}:{line_no}: a damaged record (its checksum is missing)")
        records.append(record)
    return records
