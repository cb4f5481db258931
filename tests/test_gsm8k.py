"""GSM8K answer extraction and statistics (no model needed)."""

from __future__ import annotations

import json

import pytest

from slot_cpp import gsm8k


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("She has 12 apples.", "12"),
        ("First 3 + 4 = 7, then 7 * 2 = 14.\n#### 14\nQuestion: next", "14"),
        ("The total is $1,234.", "1234"),
        ("It costs $18.50 in all", "18.5"),
        ("The temperature drops to -5 degrees", "-5"),
        ("<think>48 / 2 = 24, 48 + 24 = 72</think><answer>72</answer>", "72"),
        ("<think>so 10</think><answer> 3,000 </answer> and 7", "3000"),
        ("<answer>40", "40"),
        ("the answer is 5.", "5"),
        ("no numbers here", None),
        ("12 eggs, so 12.0", "12"),
    ],
)
def test_extract_answer(completion, expected):
    assert gsm8k.extract_answer(completion) == expected


def test_reference_and_correctness():
    assert gsm8k.parse_reference("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k.parse_reference("#### 1,000") == "1000"
    assert gsm8k.parse_reference("no marker") is None
    assert gsm8k.is_correct("7", "7") and gsm8k.is_correct("7.0", "7")
    assert not gsm8k.is_correct(None, "7") and not gsm8k.is_correct("8", "7")


def test_load_problems_rejects_bad_records(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="not a GSM8K record"):
        gsm8k.load_problems(bad)


def test_statistics():
    lo, hi = gsm8k.wilson_interval(50, 100)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    assert gsm8k.mcnemar_p(0, 0) == 1.0
    assert gsm8k.mcnemar_p(10, 0) < 0.01
    records = [
        {"index": 0, "setting": "a", "correct": False}, {"index": 0, "setting": "b", "correct": True},
        {"index": 1, "setting": "a", "correct": True}, {"index": 1, "setting": "b", "correct": True},
    ]
    rows = gsm8k.summarise(records, ["a", "b"], "accuracy")
    assert rows[0]["accuracy"] == 0.5 and rows[1]["accuracy"] == 1.0
    assert rows[1]["fixed"] == 1 and rows[1]["broken"] == 0
