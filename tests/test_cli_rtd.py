"""The RTD commands of the command line (rtd build/info/tune, eval mc, --rtd),
run as a user would (a subprocess) on the real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "slot_cpp", *args], capture_output=True, text=True, timeout=600)


QUESTIONS = [
    ("What color is the sky on a clear day?", ["green", "blue", "red", "black"], 1),
    ("How many legs does a dog have?", ["four", "two", "six", "eight"], 0),
    ("Which animal says moo?", ["cat", "dog", "cow", "duck"], "C"),
    ("What is 2 + 2?", ["3", "5", "22", "4"], "D"),
    ("Which is a fruit?", ["apple", "chair", "rock", "shoe"], 0),
    ("What do bees make?", ["milk", "honey", "silk", "wool"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], "B"),
    ("What is the opposite of up?", ["left", "down", "over", "near"], 1),
    ("What do cows drink?", ["water", "oil", "ink", "paint"], 0),
    ("How many days are in a week?", ["five", "six", "ten", "seven"], 3),
    ("Which animal can fly?", ["fish", "bird", "snake", "worm"], 1),
    ("What is the opposite of hot?", ["cold", "warm", "big", "fast"], 0),
    ("What do you use to write on paper?", ["spoon", "fork", "pencil", "cup"], 2),
]


def _write(path: Path, rows: list[tuple[str, list[str], object]]) -> Path:
    path.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
    return path


def test_rtd_build_tune_info_and_eval_mc_agree_with_score_choices(gemma_path, tmp_path):
    import slot_cpp
    from slot_cpp.rtd import Datastore, score_choices

    train = _write(tmp_path / "train.jsonl", QUESTIONS[:8])
    valid = _write(tmp_path / "valid.jsonl", QUESTIONS[8:10])
    test = _write(tmp_path / "test.jsonl", QUESTIONS[10:])
    store = tmp_path / "mc.rtd"
    built = _run("rtd", "build", "--data", str(train), "--out", str(store), "--shots", "2", "--model", str(gemma_path),
                 "--json")
    assert built.returncode == 0, built.stderr
    info = json.loads(built.stdout)
    assert info["mode"] == "choice" and info["keys"] == 6 and info["shots"] == 2  # the shots are not keys
    assert "rtd build: 6 keys from 6 rows" in built.stderr and "keys/s" in built.stderr

    tuned = _run("rtd", "tune", str(store), "--data", str(valid), "--ks", "2,4", "--model", str(gemma_path), "--json")
    assert tuned.returncode == 0, tuned.stderr
    result = json.loads(tuned.stdout)
    assert result["metric"] == "accuracy" and result["k"] in (2, 4) and len(result["table"]) > 0

    shown = _run("rtd", "info", str(store), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["keys"] == 6 and info["defaults"]["k"] == result["k"] and info["defaults"]["tuned_on"] == 2
    text = _run("rtd", "info", str(store))
    assert text.returncode == 0 and "keys: 6" in text.stdout

    records = tmp_path / "records.jsonl"
    evaluated = _run("eval", "mc", "--data", str(test), "--rtd", str(store), "--model", str(gemma_path), "--json",
                     "--out", str(records))
    assert evaluated.returncode == 0, evaluated.stderr
    summary = json.loads(evaluated.stdout)
    assert summary["n"] == 4 and summary["shots"] == 2  # the datastore's own prompt format
    for key in ("plain_accuracy", "rtd_accuracy", "mcnemar_p"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["rtd"]["k"] == result["k"] and summary["fixed"] + summary["broken"] <= 4
    assert "mc [" in evaluated.stderr  # the progress line

    # The same numbers in-process, with the model opened as the command line opens it.
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    answers = [json.loads(x)["answer"] for x in records.read_text().splitlines()]
    with slot_cpp.Model(gemma_path, n_ctx=4096, n_parallel=4, seed=0) as model:
        scores = score_choices(model, rows, rtd=Datastore.load(store, model))
    assert summary["rtd_accuracy"] == np.mean([s.rtd_choice == a for s, a in zip(scores, answers)])
    assert summary["plain_accuracy"] == np.mean([s.plain_choice == a for s, a in zip(scores, answers)])
    for line, s in zip(records.read_text().splitlines(), scores):
        r = json.loads(line)
        assert r["rtd_choice"] == s.rtd_choice and r["plain_choice"] == s.plain_choice
        np.testing.assert_allclose(r["rtd_probs"], s.rtd, atol=1e-4)


def test_eval_mc_scores_slot_settings_paired_against_plain(gemma_path, tmp_path):
    import slot_cpp
    from slot_cpp.rtd import score_choices

    test = _write(tmp_path / "test.jsonl", QUESTIONS[:6])
    records = tmp_path / "records.jsonl"
    proc = _run("eval", "mc", "--data", str(test), "--steps", "0,3", "--lr", "0.05,auto", "--model", str(gemma_path),
                "--json", "--out", str(records))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    table = {row["setting"]: row for row in summary["settings"]}
    assert list(table) == ["plain", "steps=3,lr=0.05", "steps=3,lr=auto"]
    chosen = table["steps=3,lr=auto"]["lr_chosen"]
    assert 0 < chosen["min"] <= chosen["median"] <= chosen["max"] < 0.05
    assert "lr_chosen" not in table["steps=3,lr=0.05"]
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    answers = [json.loads(x)["answer"] for x in records.read_text().splitlines()]
    with slot_cpp.Model(gemma_path, n_ctx=4096, n_parallel=4, seed=0) as model:
        plain = score_choices(model, rows)
        slot = score_choices(model, rows, steps=3, lr=0.05)
        # A prompt's delta, learned by generate_with_slot, scores the options
        # as score_choices does. Each from an empty cache: one prompt alone,
        # the same batch shapes, so the same rounding.
        from slot_cpp.rtd import DEFAULT_CHOICE_TEMPLATE, _label_tokens, format_choice_prompt

        model.clear_cache()
        first = score_choices(model, rows[:1], steps=3, lr=0.05)[0]
        model.clear_cache()
        first_plain = score_choices(model, rows[:1])[0]
        model.clear_cache()

        prompt = format_choice_prompt(rows[0]["question"], rows[0]["choices"], (), DEFAULT_CHOICE_TEMPLATE)
        delta = model.generate_with_slot(prompt, steps=3, lr=0.05, max_tokens=0).delta
        alone = model.generate(prompt, max_tokens=0, delta=delta, score_tokens=_label_tokens(model, 4)).score_logprobs
    probs = np.exp(np.asarray(alone) - np.logaddexp.reduce(alone))
    np.testing.assert_allclose(first.plain, probs, atol=1e-6)
    assert np.abs(first.plain - first_plain.plain).max() > 1e-2  # the delta moved the options
    plain_ok = [s.plain_choice == a for s, a in zip(plain, answers)]
    slot_ok = [s.plain_choice == a for s, a in zip(slot, answers)]
    row = table["steps=3,lr=0.05"]
    assert row["correct"] == sum(slot_ok) and table["plain"]["correct"] == sum(plain_ok)
    assert row["fixed"] == sum(o and not p for p, o in zip(plain_ok, slot_ok))
    assert row["broken"] == sum(p and not o for p, o in zip(plain_ok, slot_ok))
    for line, s in zip(records.read_text().splitlines(), slot):
        entry = json.loads(line)["slot"]["steps=3,lr=0.05"]
        np.testing.assert_allclose(entry["probs"], s.plain, atol=1e-4)
    text = _run("eval", "mc", "--data", str(test), "--steps", "0,2", "--lr", "0.05", "--limit", "2", "--model",
                str(gemma_path))
    assert text.returncode == 0, text.stderr
    assert "| setting | n | accuracy |" in text.stdout and "| steps=2,lr=0.05 | 2 |" in text.stdout


def test_generate_with_rtd_follows_a_stored_completion(gemma_path, tmp_path):
    data = tmp_path / "gen.jsonl"
    data.write_text(json.dumps({"prompt": "The secret password is",
                                "completion": " purple elephant banana seventeen"}) + "\n"
                    + json.dumps({"prompt": "My favourite colour is", "completion": " green."}) + "\n")
    store = tmp_path / "gen.rtd"
    built = _run("rtd", "build", "--data", str(data), "--out", str(store), "--model", str(gemma_path))
    assert built.returncode == 0, built.stderr
    assert "generation keys" in built.stdout
    # lambda 1 and k 1 without the gate: every next token is the value of the
    # nearest stored state, and the states along the stored completion are the keys themselves.
    proc = _run("generate", "The secret password is", "--model", str(gemma_path), "--steps", "0", "--max-tokens",
                "4", "--rtd", str(store), "--rtd-k", "1", "--rtd-lambda", "1", "--no-rtd-gate", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == " purple elephant banana seventeen"
    bad = _run("generate", "hi", "--model", str(gemma_path), "--rtd", str(store), "--rtd-k", "99")
    assert bad.returncode == 2 and "larger than the datastore" in bad.stderr


def test_bad_rows_and_options_exit_with_a_message(tmp_path):
    # All of these fail before a model is opened.
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": 0}) + "\n\n"
                        + '{"question": "r", "choices": ["x", "y"]\n')
    proc = _run("rtd", "build", "--data", str(bad_json), "--out", str(tmp_path / "s.rtd"))
    assert proc.returncode == 2 and "bad.jsonl:3: not valid JSON" in proc.stderr
    bad_answer = _write(tmp_path / "answer.jsonl", [("q", ["x", "y"], 0), ("r", ["x", "y"], "C")])
    proc = _run("eval", "mc", "--data", str(bad_answer))
    assert proc.returncode == 2 and "answer.jsonl line 2: answer 'C'" in proc.stderr
    proc = _run("rtd", "info", str(tmp_path / "missing.rtd"))
    assert proc.returncode == 2 and "missing.rtd" in proc.stderr
    proc = _run("eval", "mc", "--data", str(bad_answer), "--rtd-k", "4")
    assert proc.returncode == 2 and "--rtd-k needs --rtd" in proc.stderr
