"""slot_cpp: SLOT test-time optimisation for GGUF models on llama.cpp.

>>> import slot_cpp
>>> with slot_cpp.Model() as model:            # the embedded Gemma 3 270M
...     result = model.generate_with_slot("Q: What is 12 * 7?\\nA:", steps=5, lr=0.1)
...     print(result.text, result.losses)
"""

from __future__ import annotations

from . import _core, _logging
from ._core import (
    ContextLengthError,
    GenerationCancelled,
    ModelLoadError,
    QueueFullError,
    SlotError,
    UnsupportedModelError,
)
from ._default_model import DefaultModelUnavailable, default_model_path
from ._logging import set_llama_log_level
from ._model import (
    DEFAULT_MEMORY_BUDGET,
    Model,
    ModelClosedError,
    TextStream,
    generate_with_slot,
)
from .results import BatchStats, GenerationResult, ModelInfo, Timings

__version__: str = getattr(_core, "__version__", "0.0.0")

_logging.install()


def chat_templates() -> list[str]:
    """Names of llama.cpp's built-in chat templates (usable as ``chat_template``)."""
    return list(_core.chat_templates())


def system_info() -> str:
    """The CPU features and backends this build of llama.cpp uses."""
    return str(_core.system_info())


def backend_devices() -> list[str]:
    """The ggml devices compiled into this build (CPU, CUDA, Metal, ...)."""
    return list(_core.backend_devices())


__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "BatchStats",
    "ContextLengthError",
    "DefaultModelUnavailable",
    "GenerationCancelled",
    "GenerationResult",
    "Model",
    "ModelClosedError",
    "ModelInfo",
    "ModelLoadError",
    "QueueFullError",
    "SlotError",
    "TextStream",
    "Timings",
    "UnsupportedModelError",
    "__version__",
    "backend_devices",
    "chat_templates",
    "default_model_path",
    "generate_with_slot",
    "set_llama_log_level",
    "system_info",
]
