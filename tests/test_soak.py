"""The soak in short: benchmarks/soak_server.py against a real server process
on the tiny model for 20 seconds with 3 clients (the full soak is the
documented command in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_short_soak_has_no_5xx_no_lost_request_and_the_server_answers_after(tiny_path, tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "soak_server.py"), "--model", str(tiny_path),
                           "--clients", "3", "--duration", "20", "--window", "5", "--n-parallel", "2",
                           "--max-waiting", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    result = json.loads(out.with_suffix(".json").read_text())
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert result["5xx"] == 0 and result["lost"] == 0 and result["after"]["status"] == 200
    # Every kind of client ran, and the faults were answered as documented.
    assert set(result["by_kind"]) >= {"completion", "chat", "stream", "slot", "rtd", "qalign", "malformed"}
    assert result["by_kind"]["malformed"].keys() <= {"rejected", "overload"}
    for kind in ("completion", "slot", "rtd", "qalign"):
        assert result["by_kind"][kind].get("ok", 0) > 0, result["by_kind"]
    assert out.with_suffix(".png").stat().st_size > 1000
