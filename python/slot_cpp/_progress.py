"""A progress bar on stderr for long work (tqdm when installed), or nothing."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, label: str, enabled: bool, *, unit: str = "row", initial: int = 0) -> None:
        self._bar: Any = None
        if not enabled:
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:  # pragma: no cover - tqdm is in the test and lmcor extras
            return
        self._bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, initial=initial, leave=False)

    def update(self, n: int, **postfix: Any) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(refresh=False, **postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
