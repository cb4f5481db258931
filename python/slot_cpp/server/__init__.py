"""An OpenAI-compatible HTTP server with SLOT, RTD and QAlign as request options.

``slot-cpp serve --model PATH`` (the ``[server]`` extra: FastAPI and uvicorn)
serves ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(streamed as server-sent events or not), ``GET /health`` and ``GET /metrics``
(Prometheus text). Concurrent requests decode together on the model's
sequences: each request is one generate call on the shared :class:`Model`,
whose token loop batches every live sequence (continuous batching).

The test-time methods are request-body extensions, reachable with the
official client's ``extra_body``::

    client.chat.completions.create(model=..., messages=...,
        extra_body={"slot": {"steps": 5, "lr": 0.01}})

- ``"slot": {"steps", "lr", "loss_on", "kl_budget"}``: SLOT on the prompt
  before generating; ``"lr": "auto"`` picks the step size per prompt by a
  KL trust region of ``kl_budget`` nats per loss position.
- ``"rtd": {"datastore", "k", "temperature", "lambda"}``: a datastore the
  server was started with (``--rtd NAME=PATH``), by name.
- ``"qalign": {"steps", "beta", "reward"}``: QAlign under a reward the server
  was started with (``--reward NAME=head:PATH`` or ``NAME=judge``); with
  ``"slot"`` and/or ``"rtd"`` beside it, they shape the chain's proposal.
- ``"lmcor": {"corrector", "k", "temperature"}``: the served model makes k
  candidates (greedy + k - 1 samples), and a corrector the server was
  started with (``--corrector NAME=MODEL.gguf[,ADAPTER.gguf]``) writes the
  answer from them and the input (the last user message, or the prompt).

Responses carry what was applied under ``"slot_cpp"``: SLOT's loss per step
and delta norm, RTD's settings, QAlign's acceptance rate and final reward,
LMCor's candidates.

The package: ``protocol`` (request bodies, response shapes), ``errors``,
``metrics``, ``state`` (the configuration and what the routes share),
``serving`` (one pipeline for the whole and the streamed response),
``routes`` (the endpoints, on one APIRouter) and ``app`` (the application,
start-up, :func:`serve`).
"""

from __future__ import annotations

try:
    import anyio  # noqa: F401
    import fastapi  # noqa: F401
    import pydantic  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("slot_cpp.server needs the server extra: pip install 'slot_cpp[server]'") from exc

from .app import create_app, serve
from .state import ServerConfig, parse_named_paths

__all__ = [
    "ServerConfig",
    "create_app",
    "parse_named_paths",
    "serve",
]
