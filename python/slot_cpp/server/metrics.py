"""The counters behind ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

import threading
import time
from typing import Iterable

from .._model import Model


class Metrics:
    """Counters exposed at /metrics (Prometheus text format)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.methods = {"slot": 0, "rtd": 0, "qalign": 0, "lmcor": 0}
        self.in_flight = 0
        self.recent: list[tuple[float, int]] = []  # (time, completion tokens) of the last minute

    def record(self, endpoint: str, status: int) -> None:
        with self.lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def used(self, methods: Iterable[str]) -> None:
        """Counts a request's test-time methods (slot, rtd, qalign, lmcor)."""
        with self.lock:
            for method in methods:
                self.methods[method] += 1

    def tokens(self, prompt: int, completion: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.recent.append((now, completion))
            self.recent = [(t, c) for t, c in self.recent if now - t <= 60.0]

    def render(self, model: Model) -> str:
        stats = model.stats()
        now = time.monotonic()
        with self.lock:
            recent = sum(c for t, c in self.recent if now - t <= 60.0)
            window = min(60.0, max(now - self.started, 1e-9))
            lines = [
                "# HELP slot_cpp_requests_total HTTP requests by endpoint and status.",
                "# TYPE slot_cpp_requests_total counter",
            ]
            for (endpoint, status), count in sorted(self.requests.items()):
                lines.append(f'slot_cpp_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}')
            lines += [
                "# HELP slot_cpp_prompt_tokens_total Prompt tokens of completed requests.",
                "# TYPE slot_cpp_prompt_tokens_total counter",
                f"slot_cpp_prompt_tokens_total {self.prompt_tokens}",
                "# HELP slot_cpp_completion_tokens_total Generated tokens of completed requests.",
                "# TYPE slot_cpp_completion_tokens_total counter",
                f"slot_cpp_completion_tokens_total {self.completion_tokens}",
                "# HELP slot_cpp_tokens_per_second Generated tokens per second over the last minute.",
                "# TYPE slot_cpp_tokens_per_second gauge",
                f"slot_cpp_tokens_per_second {recent / window:.3f}",
                "# HELP slot_cpp_requests_in_flight Requests being served now.",
                "# TYPE slot_cpp_requests_in_flight gauge",
                f"slot_cpp_requests_in_flight {self.in_flight}",
                "# HELP slot_cpp_method_requests_total Requests that used a test-time method.",
                "# TYPE slot_cpp_method_requests_total counter",
            ]
            for method, count in sorted(self.methods.items()):
                lines.append(f'slot_cpp_method_requests_total{{method="{method}"}} {count}')
        lines += [
            "# HELP slot_cpp_queue_depth Generate calls waiting for a free sequence.",
            "# TYPE slot_cpp_queue_depth gauge",
            f"slot_cpp_queue_depth {stats.waiting_requests}",
            "# HELP slot_cpp_live_sequences Sequences decoding now.",
            "# TYPE slot_cpp_live_sequences gauge",
            f"slot_cpp_live_sequences {stats.live_sequences}",
            "# HELP slot_cpp_engine_generated_tokens_total Tokens the engine sampled (all calls).",
            "# TYPE slot_cpp_engine_generated_tokens_total counter",
            f"slot_cpp_engine_generated_tokens_total {stats.generated_tokens}",
            "# HELP slot_cpp_engine_cached_prompt_tokens_total Prompt tokens reused from the prompt cache.",
            "# TYPE slot_cpp_engine_cached_prompt_tokens_total counter",
            f"slot_cpp_engine_cached_prompt_tokens_total {stats.cached_tokens}",
        ]
        return "\n".join(lines) + "\n"
