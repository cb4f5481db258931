"""Errors in OpenAI's shape, and the one mapping from what serving raises to them.

A whole response raises the mapped :class:`ApiError` (answered with its
status); a stream has already sent its 200, so it sends the same error as
an event instead. Both get it from :func:`error_from`.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .. import _core

logger = logging.getLogger("slot_cpp.server")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def event(self) -> dict[str, Any]:
        """The error as a stream's last event: a stream's status is already
        200, so the status travels in the body."""
        body = self.body()
        body["error"]["status"] = self.status
        return body


class RequestCancelled(Exception):
    """Raised inside a method's own loop (QAlign's steps) when the client has gone."""


def overloaded(message: str, retry_after: int) -> ApiError:
    """503 with Retry-After: the official clients retry it."""
    return ApiError(503, message, type="server_overloaded", code="overloaded",
                    headers={"Retry-After": str(retry_after)})


def error_from(exc: BaseException, *, retry_after: int) -> Optional[ApiError]:
    """The error to answer for an exception raised while serving a request;
    None when the request was cancelled (its client is gone: nobody to answer)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (_core.GenerationCancelled, RequestCancelled)):
        return None
    if isinstance(exc, _core.QueueFullError):
        return overloaded(str(exc), retry_after)
    cause = exc.__cause__
    while cause is not None:
        # A method's own call into the model found the queue full (QAlign's
        # reward scoring its candidates): the server is overloaded, not broken.
        if isinstance(cause, _core.QueueFullError):
            return overloaded(str(exc), retry_after)
        cause = cause.__cause__
    if isinstance(exc, _core.ContextLengthError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, (TypeError, ValueError)):
        return ApiError(400, str(exc))
    # A bug or an engine failure: the client gets its name, the log the traceback.
    logger.error("internal error while serving a request", exc_info=exc)
    return internal_error(exc)


def internal_error(exc: BaseException) -> ApiError:
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")


def validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    """A one-line message and the offending parameter for a body that does
    not match its model (pydantic reports a list; OpenAI answers one)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown field {param!r}", param
    if kind == "json_invalid":
        return "the request body is not valid JSON", None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # an option's own check
    return f"{param or 'body'}: {message}", param
