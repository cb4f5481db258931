"""Crash-safe writes: each writer runs in a child process rewriting its file
over and over, and is killed with SIGKILL at a random moment; the file must
then hold the old or the complete new content (records: every complete
record, the cut-off one dropped and redone), never a damaged file that loads.
SLOT_CPP_KILLS sets the kills per writer (default 3)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slot_files import read_version

HERE = Path(__file__).resolve().parent
KILLS = int(os.environ.get("SLOT_CPP_KILLS", "3"))


def _kill_at_random(kind: str, path: Path, model: str, rng: random.Random) -> int:
    """Starts the writer, waits for its first complete file, kills it after a
    random delay; returns the last version it reported complete."""
    proc = subprocess.Popen([sys.executable, str(HERE / "slot_files.py"), kind, str(path), model],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("wrote"), proc.stderr.read() if proc.stderr else ""
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    lines = [first] + out.splitlines()
    return int(lines[-1].split()[1])


@pytest.mark.parametrize("kind", ["datastore", "reward", "delta", "adapter"])
def test_killed_whole_file_writer_leaves_the_old_or_the_new_file(tmp_path, tiny_model, tiny_path, kind):
    rng = random.Random(29)
    suffix = {"datastore": ".rtd", "reward": ".npz", "delta": ".npy", "adapter": ".gguf"}[kind]
    path = tmp_path / f"file{suffix}"
    for _ in range(KILLS):
        path.unlink(missing_ok=True)
        reported = _kill_at_random(kind, path, str(tiny_path) if kind in ("reward", "adapter") else "", rng)
        version = read_version(kind, path, tiny_model)      # raises if damaged or mixed
        assert version in (reported, reported + 1), (version, reported)
    # The stray temporary files of killed writers never take the file's name.
    assert {p.name for p in tmp_path.iterdir()} - {path.name} <= {
        p.name for p in tmp_path.iterdir() if p.name.startswith(f".{path.name}.") and p.name.endswith(".tmp")}


def test_killed_record_writer_leaves_complete_records_and_resumes(tmp_path):
    rng = random.Random(29)
    path = tmp_path / "records.jsonl"
    seen = 0
    for _ in range(KILLS):
        _kill_at_random("records", path, "", rng)
        indices = read_version("records", path, None)      # a cut-off last line is left out
        assert indices == list(range(len(indices))), "records lost or duplicated"
        assert len(indices) >= seen
        seen = len(indices)
    assert seen > 0
    size = path.stat().st_size
    if not path.read_bytes().endswith(b"\n"):
        # The next run drops the cut-off line and appends after the last complete record.
        from slot_files import write_version
        write_version("records", path, 0, None)
        assert path.stat().st_size != size
    indices = read_version("records", path, None)
    assert indices == list(range(len(indices))) and len(indices) >= seen


def test_killed_make_data_resumes_to_the_same_file(tmp_path, tiny_model, tiny_path):
    # lmcor make-data appends a row's candidates at a time: killed at random
    # and rerun, it must write what one uninterrupted run writes: every row
    # once, in order, whole. (The candidates' text may differ in rounding:
    # a resumed run batches and caches its prompts differently.)
    from slot_cpp import lmcor

    rows = [{"input": f"sentence number {i} is here", "target": f"row {i}"} for i in range(16)]
    whole = tmp_path / "whole.jsonl"
    lmcor.make_corrector_data(tiny_model, rows, whole, k=2, batch_size=4, max_tokens=6)
    data = tmp_path / "rows.jsonl"
    import json
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "resumed.jsonl"
    script = (f"import slot_cpp; from slot_cpp import lmcor\n"
              f"rows = lmcor.read_rows({str(data)!r})\n"
              f"with slot_cpp.Model({str(tiny_path)!r}, n_ctx=512, n_threads=2) as m:\n"
              f"    print('wrote 0', flush=True)\n"
              f"    lmcor.make_corrector_data(m, rows, {str(out)!r}, k=2, batch_size=4, max_tokens=6)\n")
    rng = random.Random(29)
    for _ in range(2):
        with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None and proc.stdout.readline().startswith("wrote")
            time.sleep(rng.uniform(0.05, 0.5))
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    lmcor.make_corrector_data(tiny_model, rows, out, k=2, batch_size=4, max_tokens=6)
    resumed = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [(r["input"], r["target"], len(r["candidates"])) for r in resumed] == \
        [(r["input"], r["target"], len(r["candidates"])) for r in expected]
    assert out.read_text().endswith("\n")
