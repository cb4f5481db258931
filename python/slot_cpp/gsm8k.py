"""GSM8K evaluation: prompt formats, answer extraction, scoring and statistics.

Data is GSM8K-format JSONL: one object per line with ``question`` and
``answer`` (a worked solution ending in ``#### N``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from ._files import read_jsonl
from ._files import read_records as read_records  # gsm8k.read_records: the record files (eval gsm8k)

FORMATS = ("fewshot", "chat")

# Our own worked examples for the plain few-shot format.
FEWSHOT_EXAMPLES = [
    ("A shop sells pencils in packs of 6. Mia buys 4 packs and gives away 5 pencils. How many pencils "
     "does she have left?",
     "Mia buys 4 * 6 = 24 pencils. After giving away 5 she has 24 - 5 = 19 pencils.\n#### 19"),
    ("A car travels 45 miles each hour. How far does it travel in 3 hours and then another 2 hours?",
     "It travels for 3 + 2 = 5 hours, so it covers 45 * 5 = 225 miles.\n#### 225"),
    ("Leo had 120 dollars. He spent a quarter of it on books and 30 dollars on lunch. How much money "
     "does he have now?",
     "A quarter of 120 is 120 / 4 = 30 dollars. He spent 30 + 30 = 60 dollars, so he has "
     "120 - 60 = 60 dollars.\n#### 60"),
]

# The think/answer format of the SLOT authors' GSM8K script, in our own words.
THINK_ANSWER_SYSTEM = (
    "You are a careful assistant that solves math word problems. First reason step by step inside "
    "<think> </think> tags, then give only the final number inside <answer> </answer> tags."
)

FEWSHOT_STOP = ["\nQuestion:", "\n\n\n"]
CHAT_STOP = ["</answer>"]

_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Problem:
    index: int
    question: str
    answer: str      # the worked solution
    reference: str   # the number after ####


def load_problems(path: str | Path, limit: Optional[int] = None) -> list[Problem]:
    problems: list[Problem] = []
    for lineno, obj in read_jsonl(path, limit=limit):
        try:
            question, answer = obj["question"], obj["answer"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{lineno}: not a GSM8K record ({exc})") from exc
        reference = parse_reference(answer)
        if reference is None:
            raise ValueError(f"{path}:{lineno}: answer has no '#### N' line")
        problems.append(Problem(len(problems), question, answer, reference))
    return problems


def _normalise(number: str) -> Optional[str]:
    cleaned = number.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return repr(value)


def parse_reference(answer: str) -> Optional[str]:
    if "####" not in answer:
        return None
    tail = answer.split("####")[-1].strip()
    return _normalise(tail.split()[0]) if tail else None


def extract_answer(completion: str) -> Optional[str]:
    """The model's final number: inside <answer> tags or after '####' when present,
    else the last number in the completion (as the published scripts do)."""
    text = completion
    tagged = re.findall(r"<answer>(.*?)(?:</answer>|$)", text, flags=re.S)
    if tagged:
        text = tagged[-1]
    elif "####" in text:
        text = text.split("####", 1)[1]
        numbers = _NUMBER.findall(text)
        return _normalise(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def is_correct(prediction: Optional[str], reference: str) -> bool:
    if prediction is None:
        return False
    try:
        return abs(float(prediction) - float(reference)) < 1e-6
    except ValueError:
        return False


def fewshot_prompt(question: str) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEWSHOT_EXAMPLES)
    return f"{shots}Question: {question}\nAnswer:"


def chat_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": THINK_ANSWER_SYSTEM}, {"role": "user", "content": question}]


def wilson_interval(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_p(fixed: int, broken: int) -> float:
    """Exact two-sided McNemar p-value for paired right/wrong outcomes."""
    n = fixed + broken
    if n == 0:
        return 1.0
    k = min(fixed, broken)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_t(differences: Sequence[float]) -> tuple[float, float]:
    """Mean difference and its 95% half-width (normal approximation)."""
    n = len(differences)
    if n == 0:
        return (0.0, 0.0)
    mean = sum(differences) / n
    if n == 1:
        return (mean, float("inf"))
    var = sum((d - mean) ** 2 for d in differences) / (n - 1)
    return (mean, 1.959963984540054 * math.sqrt(var / n))


def setting_name(steps: int, lr: Union[float, str]) -> str:
    return f"steps={steps},lr={lr}" if isinstance(lr, str) else f"steps={steps},lr={lr:g}"


def summarise(records: Iterable[dict], settings: Sequence[str], metric: str) -> list[dict]:
    by_setting: dict[str, dict[int, dict]] = {s: {} for s in settings}
    for r in records:
        if r["setting"] in by_setting:
            by_setting[r["setting"]][r["index"]] = r
    base = settings[0]
    rows = []
    for s in settings:
        recs = by_setting[s]
        row: dict = {"setting": s, "n": len(recs)}
        if metric == "accuracy":
            correct = sum(1 for r in recs.values() if r["correct"])
            row["accuracy"] = correct / len(recs) if recs else 0.0
            row["ci95"] = wilson_interval(correct, len(recs))
            if s != base:
                common = set(recs) & set(by_setting[base])
                fixed = sum(1 for i in common if recs[i]["correct"] and not by_setting[base][i]["correct"])
                broken = sum(1 for i in common if not recs[i]["correct"] and by_setting[base][i]["correct"])
                row.update(fixed=fixed, broken=broken, p_value=mcnemar_p(fixed, broken))
        else:
            values = [r["nll"] for r in recs.values()]
            row["nll"] = sum(values) / len(values) if values else 0.0
            if s != base:
                common = sorted(set(recs) & set(by_setting[base]))
                diffs = [recs[i]["nll"] - by_setting[base][i]["nll"] for i in common]
                mean, half = paired_t(diffs)
                row.update(delta_nll=mean, delta_ci95=half, better=sum(d < 0 for d in diffs),
                           worse=sum(d > 0 for d in diffs))
        rows.append(row)
    return rows
