"""A progress bar on stderr for long work: tqdm's (when installed), or a plain
line with an ETA, or nothing."""

from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    """``enabled`` False: nothing is shown. By default tqdm's bar (nothing
    without tqdm). ``plain``: a bar of our own, ``LABEL [###.....] done/total
    ETA 1m05s note``, redrawn in place on a terminal and written a line per
    update elsewhere (logs, pipes), so that it shows without tqdm too."""

    def __init__(self, total: int, label: str, enabled: bool, *, unit: str = "row", initial: int = 0,
                 plain: bool = False) -> None:
        self._bar: Any = None
        self._plain = enabled and plain
        self.total, self.label, self.done, self._initial = total, label, initial, initial
        self._start = time.monotonic()
        self._tty = sys.stderr.isatty()
        if not enabled or plain:
            return
        try:
            from tqdm import tqdm  # type: ignore[import-untyped]
        except ImportError:  # pragma: no cover - tqdm is in the test and lmcor extras
            return
        self._bar = tqdm(total=total, desc=label, unit=unit, file=sys.stderr, initial=initial, leave=False)

    def update(self, n: int = 1, note: str = "", **postfix: Any) -> None:
        """``n`` more done; ``note`` (and ``postfix``, shown as key=value) describe the latest."""
        self.done += n
        if self._plain:
            self._draw(" ".join(([note] if note else []) + [f"{k}={v}" for k, v in postfix.items()]))
        elif self._bar is not None:
            self._bar.update(n)
            if note:
                self._bar.set_postfix_str(note, refresh=False)
            if postfix:
                self._bar.set_postfix(refresh=False, **postfix)

    def _draw(self, note: str) -> None:
        elapsed = time.monotonic() - self._start
        since = self.done - self._initial
        eta = elapsed / since * (self.total - self.done) if since else 0.0
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"ETA {int(eta // 60)}m{int(eta % 60):02d}s {note}")
        sys.stderr.write(("\r" + line) if self._tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain and self._tty:
            sys.stderr.write("\n")
