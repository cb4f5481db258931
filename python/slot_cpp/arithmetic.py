"""Arithmetic word problems of graded difficulty, generated from a seed, in
GSM8K's format (``question``; ``answer``: a short worked solution ending in
``#### N``), so that the GSM8K harness (``slot-cpp eval gsm8k``, the reward
head's trainer, ``benchmarks/qalign_curves.py``) runs on them unchanged.

Small models solve almost none of GSM8K; these levels span what they can do,
from one-digit sums to two-step word problems, so that a test-time method has
room to help. Each problem's answer is computed, not written: the worked
solution is built from the same numbers as the question.

    rows = arithmetic.generate("two-step", 500, seed=0)
    parts = arithmetic.split(rows, {"train": 200, "val": 100, "test": 200})
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Mapping, Union

from ._files import atomic_write

__all__ = ["LEVELS", "generate", "split", "write_jsonl"]

Row = dict[str, str]

_NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Max", "Nora",
          "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe")
_THINGS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pens", "cards", "stamps", "cookies",
           "beads", "toy cars")
_CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("crate", "crates"), ("basket", "baskets"))
# (larger unit, smaller unit, how many of the smaller in one of the larger)
_UNITS = (("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7),
          ("meters", "centimeters", 100), ("kilograms", "grams", 1000), ("dozens", "eggs", 12),
          ("feet", "inches", 12), ("years", "months", 12))


def _row(question: str, steps: str, answer: int) -> Row:
    return {"question": question, "answer": f"{steps}\n#### {answer}"}


def _add(rng: random.Random) -> Row:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return _row(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b)


def _add_sub(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if rng.random() < 0.5:
        return _row(f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", a + b)
    a, b = max(a, b), min(a, b)
    return _row(f"What is {a} - {b}?", f"{a} - {b} = {a - b}.", a - b)


def _mul(rng: random.Random) -> Row:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return _row(f"What is {a} * {b}?", f"{a} * {b} = {a * b}.", a * b)


def _one_step(rng: random.Random) -> Row:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        return _row(f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?",
                    f"{a} + {b} = {a + b}.", a + b)
    a, b = max(a, b) + 1, min(a, b)
    return _row(f"{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?",
                f"{a} - {b} = {a - b}.", a - b)


def _groups(rng: random.Random) -> Row:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    one, many = rng.choice(_CONTAINERS)
    per, count = rng.randint(2, 12), rng.randint(2, 9)
    return _row(f"Each {one} holds {per} {thing}. {name} has {count} {many}. How many {thing} is that?",
                f"{count} * {per} = {count * per}.", count * per)


def _units(rng: random.Random) -> Row:
    big, small, factor = rng.choice(_UNITS)
    n = rng.randint(2, 30)
    return _row(f"How many {small} are in {n} {big}?", f"{n} * {factor} = {n * factor}.", n * factor)


def _two_step(rng: random.Random) -> Row:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a, b = rng.randint(5, 30), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return _row(f"{name} has {a} {thing}, buys {b} more and then gives {c} to a friend. "
                f"How many {thing} does {name} have now?",
                f"{a} + {b} = {a + b}. {a + b} - {c} = {a + b - c}.", a + b - c)


def _groups_plus(rng: random.Random) -> Row:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    one, many = rng.choice(_CONTAINERS)
    per, count, extra = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 20)
    total = count * per + extra
    return _row(f"{name} has {count} {many} with {per} {thing} in each {one}, and {extra} loose {thing}. "
                f"How many {thing} does {name} have in all?",
                f"{count} * {per} = {count * per}. {count * per} + {extra} = {total}.", total)


LEVELS: Mapping[str, tuple[str, Callable[[random.Random], Row]]] = {
    "add": ("one-digit addition: What is 7 + 5?", _add),
    "add-sub": ("two-digit addition or subtraction: What is 47 - 18?", _add_sub),
    "mul": ("one-digit multiplication: What is 7 * 8?", _mul),
    "one-step": ("a one-step word problem (add or take away)", _one_step),
    "groups": ("equal groups: Each box holds 6 pens. Ava has 4 boxes. How many pens is that?", _groups),
    "units": ("a unit conversion: How many minutes are in 4 hours?", _units),
    "two-step": ("a two-step word problem: add, then take away", _two_step),
    "groups-plus": ("a two-step word problem: equal groups, then add", _groups_plus),
}
"""Level name -> (what it asks, its generator), roughly from easiest to hardest."""


def generate(level: Union[str, list[str]], count: int, seed: int = 0) -> list[Row]:
    """``count`` distinct problems of a level (or of several, drawn in turn),
    the same for the same seed. Raises ValueError for an unknown level or
    more problems than the level has."""
    levels = [level] if isinstance(level, str) else list(level)
    unknown = [name for name in levels if name not in LEVELS]
    if not levels or unknown:
        raise ValueError(f"unknown level(s) {unknown or levels!r}; choose from {', '.join(LEVELS)}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an int >= 1, got {count!r}")
    rng = random.Random(f"slot_cpp.arithmetic:{seed}:{','.join(levels)}")
    rows: list[Row] = []
    seen: set[str] = set()
    tries = 0
    while len(rows) < count:
        tries += 1
        if tries > 50 * count + 1000:
            raise ValueError(f"level(s) {', '.join(levels)} have fewer than {count} distinct problems")
        row = LEVELS[levels[len(rows) % len(levels)]][1](rng)
        if row["question"] not in seen:
            seen.add(row["question"])
            rows.append(row)
    return rows


def split(rows: list[Row], sizes: Mapping[str, int]) -> dict[str, list[Row]]:
    """Consecutive, disjoint parts of ``rows`` (distinct questions, as
    :func:`generate` makes them), in the order of ``sizes``."""
    if sum(sizes.values()) > len(rows):
        raise ValueError(f"the parts need {sum(sizes.values())} rows; there are {len(rows)}")
    parts, start = {}, 0
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size of {name!r} must be an int >= 0, got {size!r}")
        parts[name] = rows[start:start + size]
        start += size
    return parts


def write_jsonl(rows: list[Row], path: Union[str, Path]) -> str:
    """Writes rows as GSM8K-format JSONL (atomically); returns the path."""
    with atomic_write(path, "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return str(path)
