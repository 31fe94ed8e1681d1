"""OpenAI's error shape for every failure the server answers, and the one place that decides which
status each kind of failure gets (`translate`). Routes raise `APIError` or let a library's own
exception through; the app's handlers (api/server.py) render both with `APIError.response`.

This module does not log, meter or decide whether a failure is a fault (server.py's handlers do).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from loraplex.adapters.names import InvalidModelName, ModelNotFound
from loraplex.engine.protocol import EngineClosed, PromptTooLong
from loraplex.errors import Conflict, NotFound, Unprocessable, UpstreamError, UserError
from loraplex.gateway import db
from loraplex.gateway.gate import Overloaded
from loraplex.gateway.keys import AuthError
from loraplex.gateway.limits import RateLimited


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: the JSON body, and what a stream sends when it fails midway."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def translate(e: BaseException) -> APIError:
    """The status, type and code an exception is answered with (a 500 for anything unknown)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ModelNotFound):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, NotFound):  # a version, alias or job that does not exist (admin routes)
        return APIError(404, str(e), code="not_found")
    if isinstance(e, Conflict):
        return APIError(409, str(e), code="conflict")
    if isinstance(e, Unprocessable):
        return APIError(422, str(e), code="unprocessable")
    if isinstance(e, InvalidModelName):
        return APIError(400, str(e), param="model", code="invalid_model")
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), type_="server_error", code="shutting_down")
    if isinstance(e, AuthError):
        return APIError(401, e.message, code=e.code)
    if isinstance(e, RateLimited):
        return APIError(
            429,
            e.message,
            "rate_limit_error",
            code=f"rate_limit_{e.limit}",
            headers={"Retry-After": str(e.retry_after)},
        )
    if isinstance(e, Overloaded):
        return APIError(503, e.message, "server_error", code="overloaded", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, UpstreamError):
        return APIError(
            e.status, e.message, "server_error" if e.status >= 500 else "invalid_request_error", code=e.code
        )
    if isinstance(e, db.Unavailable):
        return APIError(503, str(e), "server_error", code="database_unavailable", headers={"Retry-After": "5"})
    if isinstance(e, UserError | ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {e}", type_="server_error")
