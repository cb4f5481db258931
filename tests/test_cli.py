"""The command line, run as a user would (a subprocess) on the real model."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PROMPT


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slot_cpp", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_generate_prints_answer_and_loss_per_step(gemma_path):
    proc = _run("generate", PROMPT, "--model", str(gemma_path), "--steps", "3", "--max-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "loss per step:" in proc.stderr
    losses = [float(x) for x in proc.stderr.split("loss per step:")[1].split("|")[0].split()]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_generate_json_from_stdin(gemma_path):
    proc = _run("generate", "--model", str(gemma_path), "--steps", "2", "--max-tokens", "6", "--json",
                stdin=PROMPT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) >= {"text", "tokens", "finish_reason", "losses", "timings", "delta_norm", "steps_done"}
    assert len(out["losses"]) == out["steps_done"] == 2 and out["delta_norm"] > 0
    assert len(out["tokens"]) <= 6


def test_bad_arguments_exit_with_a_message(tmp_path):
    proc = _run("generate", "hi", "--model", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = _run("generate", "hi", "--steps", "-3", "--model", str(tmp_path / "missing.gguf"))
    assert proc.returncode == 2
