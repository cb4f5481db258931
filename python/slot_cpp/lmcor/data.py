"""Training data for a corrector: task rows read from JSONL, and the
generator's candidates for them written as JSONL (resumable)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .._files import drop_cut_line, read_jsonl, sync
from .._model import Model
from .._progress import Progress
from ..options import LmcorOptions
from ..options import check_int as _check_int
from .candidates import generate_candidates

PathLike = Union[str, "os.PathLike[str]"]


def read_rows(path: PathLike, *, limit: Optional[int] = None) -> list[dict[str, str]]:
    """``{"input", "target"}`` rows from a JSONL file, checked."""
    rows = []
    for line_no, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) \
                or not isinstance(row.get("target"), str):
            raise ValueError(f"{path}:{line_no}: a row must be an object with string 'input' and 'target'")
        rows.append({"input": row["input"], "target": row["target"]})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def make_corrector_data(
    generator: Model,
    rows: Sequence[dict[str, str]],
    out: PathLike,
    *,
    prompt: str = "{input}",
    k: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    **candidate_options: Any,
) -> int:
    """Write the generator's candidates for each row to ``out`` (JSONL of
    ``{"input", "target", "candidates"}``); returns the rows written now.

    ``k`` and ``temperature`` default to :class:`~slot_cpp.options.LmcorOptions`'.
    Row i draws with seed ``seed + i * k``, so a run stopped part-way and
    started again appends exactly what one run would have written: rows
    already in ``out`` are checked against ``rows`` and skipped.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    k = _check_int("k", LmcorOptions.k if k is None else k, 1)
    path = Path(out)
    done = 0
    drop_cut_line(path)  # a row cut off by an interruption is redone
    if path.exists():
        for line_no, rec in read_jsonl(path, "; remove that line to resume"):
            if done >= len(rows) or not isinstance(rec, dict) or rec.get("input") != rows[done]["input"] \
                    or len(rec.get("candidates") or []) != k:
                raise ValueError(f"{path}:{line_no}: does not match row {done} of the data with k={k}; these are "
                                 "another run's candidates (use another output file)")
            done += 1
    bar = Progress(len(rows), "candidates", progress, initial=done)
    written = 0
    try:
        with open(path, "a", encoding="utf-8") as f:
            for start in range(done, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                pools = generate_candidates(generator, [r["input"] for r in chunk], prompt=prompt, k=k,
                                            temperature=temperature,
                                            seeds=[seed + (start + i) * k for i in range(len(chunk))],
                                            **candidate_options)
                for r, p in zip(chunk, pools):
                    f.write(json.dumps({"input": r["input"], "target": r["target"], "candidates": p.texts},
                                       ensure_ascii=False) + "\n")
                sync(f)
                written += len(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    return written
