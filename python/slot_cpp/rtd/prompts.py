"""The multiple-choice prompt format: options labelled A, B, ..., answered by one label token."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from .._model import Model
from .errors import DatastoreError

CHOICE_LABELS = ("A", "B", "C", "D", "E", "F", "G", "H", "I", "J")
DEFAULT_CHOICE_TEMPLATE = "{shots}Question: {question}\n{options}Answer:"
"""The multiple-choice prompt: keys are taken at its last token ("Answer:")."""


class RowFormat(Protocol):
    """How a datastore reads its rows (a :class:`~slot_cpp.rtd.Datastore` is
    one): its mode, "choice" or "generation", and a choice datastore's
    prompt. Building keys needs no more of the datastore."""

    @property
    def mode(self) -> str: ...

    def choice_prompt(self, question: str, choices: Sequence[str]) -> str: ...


def format_choice_prompt(question: str, choices: Sequence[str], shots: Sequence[Mapping[str, Any]] = (),
                         template: str = DEFAULT_CHOICE_TEMPLATE) -> str:
    """The multiple-choice prompt: optional solved examples, the question, the
    options as "A. ...", and "Answer:"; the answer is one label token (" A")."""
    if len(choices) < 2 or len(choices) > len(CHOICE_LABELS):
        raise ValueError(f"a question needs 2 to {len(CHOICE_LABELS)} choices, got {len(choices)}")

    def options(cs: Sequence[str]) -> str:
        return "".join(f"{CHOICE_LABELS[i]}. {c}\n" for i, c in enumerate(cs))

    solved = "".join(
        template.format(shots="", question=s["question"], options=options(s["choices"]))
        + f" {CHOICE_LABELS[answer_index(s)]}\n\n" for s in shots)
    return template.format(shots=solved, question=question, options=options(choices))


def answer_index(row: Mapping[str, Any]) -> int:
    answer = row["answer"]
    n = len(row["choices"])
    if isinstance(answer, str):
        answer = answer.strip()
        if answer in CHOICE_LABELS[:n]:
            return CHOICE_LABELS.index(answer)
        if answer.isdigit():
            answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, (int, np.integer)) or not 0 <= int(answer) < n:
        raise ValueError(f"answer {row['answer']!r} is not a choice index or label among {n} choices")
    return int(answer)


def _label_tokens(model: Model, n: int) -> list[int]:
    out = []
    for label in CHOICE_LABELS[:n]:
        toks = model.tokenize(" " + label, add_special=False, parse_special=False)
        if len(toks) != 1:
            raise DatastoreError(f"the label ' {label}' is {len(toks)} tokens for this model; labels must be one token")
        out.append(toks[0])
    return out
