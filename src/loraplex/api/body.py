"""Request bodies whose text is not Unicode are refused at the door, naming the field.

JSON may escape one half of a UTF-16 pair on its own (`"\\ud800"`). Python decodes it into a str
that no UTF-8 encoder accepts, so the tokenizer, the database and the log line each fail on it
later, as a 500. `UnicodeRoute` checks every JSON body once, where FastAPI decodes it, and answers
400 with the path of the first such string (`messages.0.content`).

Why not a pydantic validator: the bodies of several models (and of the web app's routes, which take
plain dicts) would each need it; here it is one check for every route. Why not a regex on the raw
bytes alone: `"\\\\ud800"` (an escaped backslash) is fine text, so the bytes only tell when a
check is needed (`\\ud` appears), and the decoded value decides.

`BodyLimit` refuses bodies over MAX_BODY (413), also chunked ones, while they arrive, and a body
that stalls (408).

This module does not validate fields (schemas.py does).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException

from loraplex.api.errors import APIError

MAX_BODY = 8 * 1024 * 1024


class NotUnicode(HTTPException):
    """A 400 whose detail names the field (`param`) holding a lone surrogate."""

    def __init__(self, param: str):
        super().__init__(
            400,
            f"{param or 'body'}: half of a UTF-16 surrogate pair alone (\\ud800-\\udfff) is not Unicode",
        )
        self.param = param


def _bad_path(value: Any, path: list[str]) -> list[str] | None:
    """The path to the first string (or key) in `value` that UTF-8 cannot encode, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            if _bad_path(k, []) is not None:
                return [*path, ascii(k)[1:-1]]
            if (found := _bad_path(v, [*path, str(k)])) is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (found := _bad_path(v, [*path, str(i)])) is not None:
                return found
    return None


class _UnicodeRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            data = await super().json()
            raw = await self.body()
            if b"\\ud" in raw or b"\\uD" in raw:  # only an escape can make a surrogate: UTF-8 bytes cannot
                path = _bad_path(data, [])
                if path is not None:
                    raise NotUnicode(".".join(path))
        return self._json


class UnicodeRoute(APIRoute):
    """An APIRoute whose JSON bodies are checked to be Unicode (set as the app's `route_class`)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            return await handler(_UnicodeRequest(request.scope, request.receive))

        return checked


class BodyTooLarge(HTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body larger than {MAX_BODY} bytes")


class BodyLimit:
    """Refuse request bodies over MAX_BODY (413): by their Content-Length before reading them, and
    by the bytes received so far for chunked bodies, which have none.

    Plain ASGI rather than `@app.middleware("http")`, whose wrapper re-buffers every streamed
    chunk (a measurable cost per token at SSE rates). Why not Starlette's RequestBodyLimitMiddleware
    (FastAPI's `max_body_size`): it answers some oversize bodies in plain text, not OpenAI's JSON."""

    def __init__(self, app: Any, chunk_timeout: float = 10.0):
        self.app = app
        self.chunk_timeout = chunk_timeout  # seconds a body may pause between chunks (`serve --header-timeout`)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope.get("headers") or []).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            await APIError(413, f"request body larger than {MAX_BODY} bytes").response()(scope, receive, send)
            return
        received, complete = 0, False

        async def counted() -> Any:
            nonlocal received, complete
            if complete:  # afterwards the only message is the disconnect, which may take as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.chunk_timeout)
            except TimeoutError:  # FastAPI re-raises HTTPExceptions from reading the body
                raise HTTPException(408, f"no request body data for {self.chunk_timeout:g} s") from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > MAX_BODY:
                raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)
