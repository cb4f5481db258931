"""The arithmetic task generator: every answer recomputed from its question,
the same seed gives the same data, splits are disjoint; the CLI writes files
the GSM8K harness reads."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from slot_cpp import arithmetic, gsm8k

_PER = {("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24, ("weeks", "days"): 7,
        ("meters", "centimeters"): 100, ("kilograms", "grams"): 1000, ("dozens", "eggs"): 12,
        ("feet", "inches"): 12, ("years", "months"): 12}


def recompute(level: str, question: str) -> int:
    """The answer, from the question's words alone (not the generator's code)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if level in ("add", "add-sub", "mul"):
        a, op, b = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question).groups()
        return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    if level == "one-step":
        return n[0] + n[1] if "more" in question else n[0] - n[1]
    if level == "groups":
        return n[0] * n[1]
    if level == "units":
        small, count, big = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\?", question).groups()
        return int(count) * _PER[(big, small)]
    if level == "two-step":
        return n[0] + n[1] - n[2]
    if level == "groups-plus":
        return n[0] * n[1] + n[2]
    raise AssertionError(level)


@pytest.mark.parametrize("level", list(arithmetic.LEVELS))
def test_every_answer_is_recomputed_from_its_question(level):
    rows = arithmetic.generate(level, 60, seed=3)
    assert len({r["question"] for r in rows}) == 60
    for row in rows:
        reference = gsm8k.parse_reference(row["answer"])
        assert reference == str(recompute(level, row["question"])), row
        assert int(reference) >= 0
        # each worked step holds, and the last one gives the answer
        steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", row["answer"])
        assert steps, row
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), row
        assert steps[-1][3] == reference


def test_a_recomputation_that_ignores_a_step_is_refused():
    # the check above is not vacuous: dropping the second step is caught
    row = arithmetic.generate("two-step", 1, seed=0)[0]
    n = [int(x) for x in re.findall(r"\d+", row["question"])]
    assert gsm8k.parse_reference(row["answer"]) != str(n[0] + n[1])


def test_same_seed_same_data_and_disjoint_splits():
    a = arithmetic.generate(["one-step", "two-step"], 300, seed=1)
    assert a == arithmetic.generate(["one-step", "two-step"], 300, seed=1)
    assert a != arithmetic.generate(["one-step", "two-step"], 300, seed=2)
    # levels are drawn in turn
    assert all(("gives" in r["question"]) == ("buys" in r["question"] or "away" in r["question"])
               for r in a)
    parts = arithmetic.split(a, {"train": 100, "val": 50, "test": 150})
    assert [len(p) for p in parts.values()] == [100, 50, 150]
    questions = [{r["question"] for r in p} for p in parts.values()]
    assert not (questions[0] & questions[1] or questions[0] & questions[2] or questions[1] & questions[2])
    with pytest.raises(ValueError, match="need 301 rows"):
        arithmetic.split(a, {"train": 301})


def test_bad_levels_and_counts_raise():
    with pytest.raises(ValueError, match="unknown level"):
        arithmetic.generate("calculus", 5)
    with pytest.raises(ValueError, match="fewer than 82 distinct"):
        arithmetic.generate("add", 82)  # 9 x 9 sums
    with pytest.raises(ValueError, match="count"):
        arithmetic.generate("add", 0)


def test_cli_writes_splits_the_harness_reads(tmp_path):
    out = tmp_path / "task"
    cmd = [sys.executable, "-m", "slot_cpp", "eval", "make-arithmetic", "--level", "groups,units",
           "--split", "train=20,val=10,test=30", "--seed", "4", "--output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    problems = {name: gsm8k.load_problems(out / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert [len(p) for p in problems.values()] == [20, 10, 30]
    rows = arithmetic.generate(["groups", "units"], 60, seed=4)
    assert [p.question for p in problems["test"]] == [r["question"] for r in rows[30:]]
    meta = json.loads((out / "task.json").read_text())
    assert meta["levels"] == ["groups", "units"] and meta["seed"] == 4
    bad = subprocess.run([*cmd[:5], "--level", "calculus", "--output", str(tmp_path / "x")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "calculus" in bad.stderr
