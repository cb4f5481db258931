"""A datastore's keys from rows: each row's tokens, the positions whose
hidden states become keys, and the values that followed them."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .. import probes
from .._model import Model
from .._progress import Progress
from .errors import DatastoreError
from .prompts import RowFormat, _label_tokens, answer_index


def row_keys(store: RowFormat, model: Model, row: Mapping[str, Any]) -> tuple[list[int], tuple[int, int], list[int]]:
    """A row's tokens, the span of positions whose states are its keys, and their values."""
    if store.mode == "choice":
        prompt = store.choice_prompt(row["question"], row["choices"])
        toks = model.tokenize(prompt)
        label = _label_tokens(model, len(row["choices"]))[answer_index(row)]
        return toks, (len(toks) - 1, len(toks)), [label]
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise TypeError("prompt and completion must be strings")
    p = model.tokenize(prompt)
    c = model.tokenize(completion, add_special=False, parse_special=False)
    if not p or not c:
        raise ValueError("prompt and completion must not be empty")
    toks = p + c
    # The state at position t predicts token t + 1.
    return toks, (len(p) - 1, len(toks) - 1), c


def tokenize_rows(store: RowFormat, model: Model, rows: Sequence[Mapping[str, Any]]
                  ) -> tuple[list[list[int]], list[tuple[int, int]], list[list[int]]]:
    """Every row's tokens, key span and values, checked before any is evaluated."""
    token_rows, spans, values = [], [], []
    for i, row in enumerate(rows):
        try:
            toks, span, vals = row_keys(store, model, row)
        except (KeyError, TypeError, ValueError) as exc:
            raise DatastoreError(f"row {i}: {exc}") from None
        if len(toks) > model.n_ctx:
            raise DatastoreError(f"row {i} has {len(toks)} tokens; the context holds {model.n_ctx}")
        token_rows.append(toks)
        spans.append(span)
        values.append(vals)
    return token_rows, spans, values


def hidden_keys(model: Model, token_rows: Sequence[list[int]], spans: Sequence[tuple[int, int]], *,
                progress: bool, rows_per_call: int) -> list[np.ndarray]:
    """The keys (float16) of the rows' spans, evaluated `rows_per_call` rows at a time."""
    parts = []
    bar = Progress(len(token_rows), "rtd build", progress)
    added = 0
    try:
        for a in range(0, len(token_rows), rows_per_call):
            b = min(len(token_rows), a + rows_per_call)
            h = probes.hidden_states(model, token_rows[a:b], spans[a:b])
            if not np.all(np.isfinite(h)):
                raise DatastoreError("the model produced non-finite hidden states")
            parts.append(h.astype(np.float16))
            added += h.shape[0]
            bar.update(b - a, keys=added)
    finally:
        bar.close()
    return parts
