"""The command line, run as a user would (a subprocess) on the real model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROMPT, restore_sigint


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


DATA = __import__("pathlib").Path(__file__).parent / "data" / "gsm8k_tiny.jsonl"


def test_eval_gsm8k_resumes_after_interruption(gemma_path, tmp_path):
    import signal
    import time

    out = tmp_path / "eval.jsonl"
    args = ["eval", "gsm8k", "--data", str(DATA), "--model", str(gemma_path), "--steps", "0,2", "--lr", "0.05",
            "--max-tokens", "48", "--output", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "slot_cpp", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=restore_sigint)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    first = out.read_text().splitlines()
    assert 2 <= len(first) < 8

    done = _run(*args)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stderr
    lines = out.read_text().splitlines()
    assert lines[: len(first)] == first  # earlier records kept, not redone
    records = [json.loads(x) for x in lines]
    assert sorted((r["index"], r["setting"]) for r in records) == sorted(
        (i, s) for i in range(4) for s in ("steps=0,lr=0.05", "steps=2,lr=0.05"))
    assert "| steps=2,lr=0.05 | 4 |" in done.stdout and "McNemar" in done.stdout
    for r in records:
        assert r["prediction"] is None or isinstance(r["prediction"], str)
        assert isinstance(r["correct"], bool) and r["reference"]


def test_eval_gsm8k_nll_metric(gemma_path, tmp_path):
    out = tmp_path / "nll.jsonl"
    proc = _run("eval", "gsm8k", "--data", str(DATA), "--model", str(gemma_path), "--metric", "nll",
                "--steps", "0,3", "--lr", "0.01", "--limit", "2", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(records) == 4 and all(r["nll"] > 0 for r in records)
    base = {r["index"]: r["nll"] for r in records if r["steps"] == 0}
    slot = {r["index"]: r["nll"] for r in records if r["steps"] == 3}
    assert base.keys() == slot.keys() and base != slot  # delta does change the solution's likelihood
    assert "NLL/token" in proc.stdout


def test_explain_lists_token_shifts_and_plots(gemma_path, tmp_path):
    png = tmp_path / "explain.png"
    proc = _run("explain", PROMPT, "--model", str(gemma_path), "--steps", "3", "--top", "5", "--json",
                "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["losses"]) == 3 and report["delta_norm"] > 0
    assert len(report["raised"]) == 5 and len(report["lowered"]) == 5
    assert report["raised"][0]["logit_change"] > 0 > report["lowered"][0]["logit_change"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_explain_shows_the_auto_calibration(gemma_path, tmp_path):
    png = tmp_path / "auto.png"
    proc = _run("explain", PROMPT, "--model", str(gemma_path), "--steps", "5", "--lr", "auto", "--top", "3",
                "--json", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    ladder = [(c["lr"], c["kl"]) for c in report["calibration"]]
    assert [lr for lr, _ in ladder] == pytest.approx([0.003 * 2.0 ** e for e in range(-4, 5)])
    # The chosen step size lies between the rungs whose KL brackets the budget.
    budget = report["kl_budget"]
    above = next(i for i, (_, kl) in enumerate(ladder) if kl > budget)
    assert ladder[above - 1][0] < report["lr"] < ladder[above][0] and len(report["losses"]) == 5
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_info_reports_model_and_build(gemma_path):
    proc = _run("info", "--model", str(gemma_path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["model"]["architecture"] == "gemma3" and data["model"]["n_vocab"] == 262144
    assert data["model"]["tied_embeddings"] is True and data["model"]["slot_supported"] is True
    assert "0.3.36" in data["build"]["llama_cpp"] and any("CPU" in d for d in data["build"]["devices"])


def test_chat_reads_turns_from_stdin(gemma_path):
    proc = _run("chat", "--model", str(gemma_path), "--chat-template", "gemma", "--steps", "1",
                "--max-tokens", "8", stdin="Hello!\nWhat is 2 + 2?\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[slot] loss per step") == 2


def test_eval_gsm8k_parallel_writes_the_same_records(gemma_path, tmp_path):
    common = ["eval", "gsm8k", "--data", str(DATA), "--model", str(gemma_path), "--steps", "0,2", "--lr", "0.05",
              "--max-tokens", "40"]
    serial, batched = tmp_path / "serial.jsonl", tmp_path / "batched.jsonl"
    one = _run(*common, "--output", str(serial))
    three = _run(*common, "--output", str(batched), "--parallel", "3")
    assert one.returncode == 0 and three.returncode == 0, three.stderr

    def records(path):
        return {(r["index"], r["setting"]): r for r in map(json.loads, path.read_text().splitlines())}

    a, b = records(serial), records(batched)
    assert sorted(a) == sorted(b) and len(b) == 8
    # The batch's cells sit elsewhere in the shared KV cache, so attention
    # sums round differently: losses agree within 0.4% here, completions unless
    # a near-tie resolves the other way (5 of 8; a mix-up of problems gives none).
    for k in a:
        np.testing.assert_allclose(a[k]["losses"], b[k]["losses"], rtol=2e-2)
    assert sum(a[k]["completion"] == b[k]["completion"] for k in a) >= 4
    assert "| steps=2,lr=0.05 | 4 |" in three.stdout and "McNemar" in three.stdout
    assert _run(*common, "--output", str(tmp_path / "x.jsonl"), "--parallel", "0").returncode == 2


def test_qalign_command_and_reward_head(gemma_path, gemma, tmp_path):
    easy = tmp_path / "easy.jsonl"
    easy.write_text("".join(json.dumps({"question": f"What is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
                            + "\n" for a, b in [(2, 3), (4, 4), (1, 6), (5, 2), (3, 3), (7, 1)]))
    head = tmp_path / "head.npz"
    trained = _run("qalign-head", "--data", str(easy), "--model", str(gemma_path), "--samples", "4",
                   "--max-tokens", "32", "--out", str(head))
    assert trained.returncode == 0, trained.stderr
    assert head.exists() and "reward head on 24 answers" in trained.stderr
    # On the real GSM8K problems a 270M model gets nothing right: a clear error.
    hard = _run("qalign-head", "--data", str(DATA), "--model", str(gemma_path), "--samples", "2",
                "--max-tokens", "24", "--out", str(tmp_path / "none.npz"))
    assert hard.returncode == 2 and "needs both" in hard.stderr
    scored = _run("qalign", "Question: What is 2 + 5?\nAnswer:", "--model", str(gemma_path), "--reward",
                  f"head:{head}", "--steps", "3", "--max-tokens", "16", "--json")
    assert scored.returncode == 0, scored.stderr
    assert len(json.loads(scored.stdout)["chains"][0]) == 4
    proc = _run("qalign", "Question: What is 6 + 7?\nAnswer:", "--model", str(gemma_path), "--reward",
                "contains:13", "--steps", "6", "--max-tokens", "12", "--stop", "\n", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    chain = out["chains"][0]
    assert len(chain) == 7 and 0.0 <= out["accept_rate"] <= 1.0
    assert all(s["reward"] == float("13" in s["text"]) for s in chain)
    assert "qalign [" in proc.stderr and "accept" in proc.stderr  # the progress line
    # SLOT and RTD shape the proposal: at lambda = 1 every token comes from the datastore's values.
    rows = tmp_path / "facts.jsonl"
    fact = {"prompt": "Question: What is 6 + 7?\nAnswer:", "completion": " 13, or thirteen."}
    rows.write_text(json.dumps(fact) + "\n")
    values = set(gemma.tokenize(fact["prompt"] + fact["completion"])[len(gemma.tokenize(fact["prompt"])):])
    store = tmp_path / "facts.slotrtd"
    assert _run("rtd", "build", "--data", str(rows), "--out", str(store), "--model", str(gemma_path)).returncode == 0
    shaped = _run("qalign", "Question: What is 6 + 7?\nAnswer:", "--model", str(gemma_path), "--reward", "contains:13",
                  "--steps", "4", "--max-tokens", "6", "--slot-steps", "2", "--rtd", str(store), "--rtd-lambda", "1",
                  "--rtd-k", "2", "--json")
    assert shaped.returncode == 0, shaped.stderr
    out = json.loads(shaped.stdout)
    assert len(out["slot"]["losses"]) == 2 and out["rtd"]["lam"] == 1.0
    assert all(set(s["tokens"]) <= values for s in out["chains"][0])
    bad = _run("qalign", "hi", "--model", str(gemma_path), "--reward", "telepathy")
    assert bad.returncode == 2 and "--reward must be" in bad.stderr


def test_eval_gsm8k_methods_at_one_budget(gemma_path, tmp_path):
    out = tmp_path / "methods.jsonl"
    args = ["eval", "gsm8k", "--data", str(DATA), "--model", str(gemma_path), "--limit", "2", "--method",
            "greedy,mv,bon,wmv,qalign", "--budget", "64", "--max-tokens", "32", "--reward", "contains:####",
            "--output", str(out)]
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["index"], r["setting"]) for r in records) == sorted(
        (i, s) for i in range(2) for s in ("greedy", "mv@64", "bon@64", "wmv@64", "qalign@64"))
    for r in records:
        if r["method"] != "greedy":  # each sampling method stops at the answer that reaches the budget
            assert 64 <= r["generated_tokens"] < 64 + 32 + 1
    assert "| qalign@64 | 2 |" in proc.stdout and "McNemar" in proc.stdout
    again = _run(*args)
    assert "resuming: 10 records" in again.stderr and len(out.read_text().splitlines()) == 10
    bad = _run("eval", "gsm8k", "--data", str(DATA), "--model", str(gemma_path), "--method", "bon")
    assert bad.returncode == 2 and "--budget" in bad.stderr
