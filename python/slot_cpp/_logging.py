"""llama.cpp's log, routed to the ``slot_cpp.llama`` logger.

Nothing is written to the process's stdout or stderr: records go through
Python's ``logging``, so applications decide where they end up.
"""

from __future__ import annotations

import atexit
import logging

from . import _core

logger = logging.getLogger("slot_cpp.llama")
# A library leaves output to the application: without its own handlers,
# nothing is printed.
logging.getLogger("slot_cpp").addHandler(logging.NullHandler())

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error.
_TO_PYTHON = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_FROM_PYTHON = [(logging.ERROR, 4), (logging.WARNING, 3), (logging.INFO, 2)]


def _ggml_level(python_level: int) -> int:
    for threshold, ggml in _FROM_PYTHON:
        if python_level >= threshold:
            return ggml
    return 1


def _sink(level: int, line: bytes) -> None:
    logger.log(_TO_PYTHON.get(level, logging.INFO), "%s", line.decode("utf-8", "replace"))


def set_llama_log_level(level: int | str) -> None:
    """Forward llama.cpp log lines at or above ``level`` (a logging level)."""
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            raise ValueError(f"unknown log level: {level!r}")
        level = resolved
    _core.set_log_level(_ggml_level(level))


def install(level: int = logging.WARNING) -> None:
    _core.set_log_sink(_sink, _ggml_level(level))
    atexit.register(_core.set_log_sink, None, 5)
