"""File fuzzing in a crash-catching harness.

Mutants of a real file (made with hypothesis from a fixed seed) are opened one
after another in a child process (`python fuzzing.py KIND ...`), so that a
segfault, an abort or a hang shows up as a finding that names the mutant
file instead of killing the test run. Each mutant must either load and give
the original's content ("same"), or raise the file kind's documented
exception ("refused"); kinds whose format carries checksums must never load
with other content ("different"). Records may also lose a last line cut off
(the "prefix" the next run redoes).

The budget is SLOT_CPP_FUZZ_EXAMPLES mutants per file kind (default 20).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

EXAMPLES = int(os.environ.get("SLOT_CPP_FUZZ_EXAMPLES", "20"))
SEED = int(os.environ.get("SLOT_CPP_FUZZ_SEED", "29"))
HERE = Path(__file__).resolve().parent

# File kinds whose format has checksums: a loaded mutant must give the original's content.
CHECKED = {"datastore", "reward", "records"}


# ---- mutations (parent side) ------------------------------------------------------
def mutation_strategy(header_bytes: int, float_bytes: int = 4):
    """A hypothesis strategy of mutation lists: bit flips (anywhere or in the
    header), truncation, huge 32/64-bit counts written into the header,
    inserted bytes (misalignment), NaN/inf written over the payload."""
    from hypothesis import strategies as st

    frac = st.floats(0.0, 1.0, allow_nan=False)
    flip = st.tuples(st.just("flip"), st.one_of(frac, st.integers(0, header_bytes - 1)), st.integers(0, 7))
    trunc = st.tuples(st.just("truncate"), frac)
    huge = st.tuples(st.just("huge"), st.integers(0, header_bytes - 1),
                     st.sampled_from([2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**64 - 1]),
                     st.sampled_from([4, 8]), st.booleans())
    shift = st.tuples(st.just("shift"), frac, st.integers(1, 63))
    nan = st.tuples(st.just("nan"), frac, st.sampled_from(["nan", "inf", "-inf"]), st.just(float_bytes))
    digit = st.tuples(st.just("digit"), frac, st.integers(1, 9))
    one = st.one_of(flip, trunc, huge, shift, nan, digit)
    return st.lists(one, min_size=1, max_size=4)


def _pos(p: Any, n: int) -> int:
    return min(int(p * n), max(n - 1, 0)) if isinstance(p, float) else min(p, max(n - 1, 0))


def apply_mutations(data: bytes, ops: list, payload_start: int = 0) -> bytes:
    blob = bytearray(data)
    for op in ops:
        if not blob:
            break
        kind = op[0]
        if kind == "flip":
            blob[_pos(op[1], len(blob))] ^= 1 << op[2]
        elif kind == "truncate":
            blob = blob[:_pos(op[1], len(blob))]
        elif kind == "huge":
            _, pos, value, width, aligned = op
            pos = _pos(pos, len(blob))
            if aligned:
                pos -= pos % width
            raw = (value % 2**(8 * width)).to_bytes(width, "little")
            blob[pos:pos + width] = raw[:len(blob) - pos]
        elif kind == "digit":   # the next ASCII digit becomes another (a plausible silent change)
            pos = _pos(op[1], len(blob))
            while pos < len(blob) and not 0x30 <= blob[pos] <= 0x39:
                pos += 1
            if pos < len(blob):
                blob[pos] = 0x30 + (blob[pos] - 0x30 + op[2]) % 10
        elif kind == "shift":
            pos = _pos(op[1], len(blob))
            blob[pos:pos] = bytes(op[2])
        elif kind == "nan":
            _, p, which, width = op
            start = min(payload_start, len(blob) - 1)
            pos = start + _pos(p, len(blob) - start)
            pos -= (pos - start) % width
            value = float(which)
            raw = struct.pack("<e" if width == 2 else "<f", value)
            blob[pos:pos + width] = raw[:len(blob) - pos]
    return bytes(blob)


def make_mutants(original: Path, out_dir: Path, n: int = EXAMPLES, seed: int = SEED, *, header_bytes: int = 512,
                 payload_start: int = 0, float_bytes: int = 4) -> list[Path]:
    """`n` mutant copies of `original` in `out_dir`, drawn by hypothesis from `seed`."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    data = original.read_bytes()
    blobs: list[bytes] = []

    @settings(max_examples=3 * n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(mutation_strategy(min(header_bytes, len(data)), float_bytes))
    def collect(ops: list) -> None:
        if len(blobs) >= n:
            return
        mutant = apply_mutations(data, ops, payload_start)
        if mutant != data and mutant not in blobs:
            blobs.append(mutant)

    collect()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, blob in enumerate(blobs[:n]):
        p = out_dir / f"mutant{i:04d}{original.suffix}"
        p.write_bytes(blob)
        paths.append(p)
    return paths


@dataclasses.dataclass
class Report:
    outcomes: dict[str, int]
    failures: list[tuple[str, str, str]]   # (what, mutant file, detail)

    def describe(self) -> str:
        return "\n".join(f"{what}: {path}: {detail}" for what, path, detail in self.failures)


def run_harness(kind: str, original: Path, mutants: list[Path], *, model: Optional[Path] = None,
                plant: Optional[str] = None, per_file_timeout: float = 20.0) -> Report:
    """Opens each mutant in a child process; a child that dies or hangs is
    reported with the mutant it was on, and a new child takes the rest."""
    outcomes: dict[str, int] = {}
    failures: list[tuple[str, str, str]] = []
    env = dict(os.environ)
    env.pop("FUZZ_PLANT", None)
    if plant:
        env["FUZZ_PLANT"] = plant
    start = 0
    while start < len(mutants):
        listing = original.parent / f".{kind}-mutants.json"
        listing.write_text(json.dumps([str(p) for p in mutants[start:]]))
        cmd = [sys.executable, str(HERE / "fuzzing.py"), kind, str(original), str(listing),
               str(model or ""), str(per_file_timeout)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=per_file_timeout * (len(mutants) - start) + 120)
        done = set()
        current: Optional[int] = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            if "begin" in msg:
                current = start + msg["begin"]
                continue
            i = start + msg["index"]
            done.add(i)
            outcomes[msg["outcome"]] = outcomes.get(msg["outcome"], 0) + 1
            if msg["outcome"] == "different" and kind in CHECKED:
                failures.append(("loaded with other content", str(mutants[i]), msg.get("detail", "")))
            if msg["outcome"] == "error":
                failures.append(("undocumented exception", str(mutants[i]), msg.get("detail", "")))
        if proc.returncode == 0:
            break
        if current is None or current in done:
            raise RuntimeError(f"the fuzzing child failed outside a mutant (rc {proc.returncode}): "
                               f"{proc.stderr[-2000:]}")
        hang = "Timeout (" in proc.stderr
        what = "hang" if hang else f"crash (rc {proc.returncode})"
        outcomes[what.split()[0]] = outcomes.get(what.split()[0], 0) + 1
        failures.append((what, str(mutants[current]), _cause(proc.stderr)))
        start = current + 1
    return Report(outcomes, failures)


def _cause(stderr: str) -> str:
    """The lines of a dead child's stderr that say why (an assertion, a fatal error)."""
    keys = ("GGML_ASSERT", "Fatal Python error", "Timeout (", "Segmentation", "Aborted", "error:")
    lines = [ln for ln in stderr.splitlines() if any(k in ln for k in keys)]
    return "\n".join(lines[:5]) or stderr[:600]


# ---- child side ------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        if hasattr(p, "tobytes"):
            import numpy as np

            p = np.ascontiguousarray(p)
            h.update(p.dtype.str.encode() + str(p.shape).encode() + p.tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _open(kind: str, path: str, model_path: str, cache: dict) -> Any:
    """The content of a file of `kind` (a digest or a value to compare)."""
    import slot_cpp

    if kind == "datastore":
        from slot_cpp.rtd import Datastore

        s = Datastore.load(path)
        return _digest(s.mode, s.heads, s.fingerprint, s.params, s.defaults, s.keys, s.values,
                       s.centroids if s.centroids is not None else 0,
                       s.list_offsets if s.list_offsets is not None else 0)
    if kind == "reward":
        from slot_cpp.qalign import LinearReward

        if "model" not in cache:
            cache["model"] = slot_cpp.Model(model_path, n_ctx=128, n_threads=1)
        head = LinearReward.load(path, cache["model"])
        return _digest(head.weight, head.bias)
    if kind == "records":
        from slot_cpp import gsm8k

        return gsm8k.read_records(Path(path))
    if kind == "model":
        with slot_cpp.Model(path, n_ctx=64, n_threads=1) as m:
            return m.generate("hello there", max_tokens=3, ignore_eos=True, cache_prompt=False).tokens
    if kind == "adapter":
        with slot_cpp.Model(model_path, n_ctx=64, n_threads=1, lora=path) as m:
            return m.generate("hello there", max_tokens=3, ignore_eos=True, cache_prompt=False).tokens
    raise SystemExit(f"unknown kind {kind}")


def _documented(kind: str) -> tuple[type, ...]:
    import slot_cpp

    if kind == "datastore":
        from slot_cpp.rtd import DatastoreError

        return (DatastoreError,)
    if kind in ("reward", "records"):
        return (ValueError,)
    return (slot_cpp.SlotError, ValueError)


def _plant(plant: str) -> None:
    """Defects planted in the child to show that the harness catches them."""
    if plant == "no-datastore-checksum":
        os.environ["SLOT_CPP_VERIFY_DATASTORE"] = "0"
    elif plant == "no-zip-crc":
        import zipfile

        zipfile.ZipExtFile._update_crc = lambda self, newdata: None  # type: ignore[method-assign]
    elif plant == "no-record-checksum":
        from slot_cpp import _files

        def unchecked(line: str) -> tuple[object, bool]:
            value = json.loads(line)
            if isinstance(value, dict) and "crc32" in value:
                value.pop("crc32")
                return value, True
            return value, False

        _files.parse_record_line = unchecked  # type: ignore[assignment]


def _child(argv: list[str]) -> int:
    import ctypes
    import faulthandler
    import time

    kind, original, listing, model_path, timeout = argv[0], argv[1], argv[2], argv[3], float(argv[4])
    plant = os.environ.get("FUZZ_PLANT", "")
    _plant(plant)
    cache: dict = {}
    expected = _open(kind, original, model_path, cache)
    documented = _documented(kind)
    for i, path in enumerate(json.loads(Path(listing).read_text())):
        print(json.dumps({"begin": i}), flush=True)
        faulthandler.dump_traceback_later(timeout, exit=True)
        if plant == "hang":
            time.sleep(10 * timeout)   # a planted hang
        try:
            got = _open(kind, path, model_path, cache)
        except documented as exc:
            if plant == "crash":
                ctypes.string_at(0)   # a planted segfault where the loader refused the file
            outcome, detail = "refused", f"{type(exc).__name__}: {exc}"[:300]
        except Exception as exc:  # noqa: BLE001 - reported as a finding
            outcome, detail = "error", f"{type(exc).__name__}: {exc}"[:300]
        else:
            if got == expected:
                outcome, detail = "same", ""
            elif kind == "records" and isinstance(got, list) and got == expected[:len(got)]:
                outcome, detail = "prefix", f"{len(got)} of {len(expected)} records"
            else:
                outcome, detail = "different", "loaded with other content"
        faulthandler.cancel_dump_traceback_later()
        print(json.dumps({"index": i, "outcome": outcome, "detail": detail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
