"""Slow and too many clients: what uvicorn's HTTP protocol lacks against them.

uvicorn times out a keep-alive connection only while it is idle between requests; a client that
sends part of a request's headers and then nothing ("slow loris") holds its connection, and a file
descriptor, forever. Enough of them and the process reaches its open-file limit: `accept` fails,
`/health` stops answering and every failure logs a traceback. `GuardedH11` closes a connection
whose request headers are not complete `header_timeout` seconds after the connection opened or
its last response ended, and closes new connections beyond `max_connections` at once, so the
process stays under its file limit. Each condition is logged once a minute with a count, not once
per connection.

Slow request *bodies* are bounded where bodies are read (`server.BodyLimit`). This module does
not rate-limit clients (the gateway does, per key).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


class Throttled:
    """One warning per condition per `every` seconds, saying how many times it happened."""

    def __init__(self, every: float = 60.0):
        self.every = every
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warn(self, condition: str, message: str) -> None:
        self._count[condition] = self._count.get(condition, 0) + 1
        now = time.monotonic()
        if now - self._last.get(condition, -self.every) >= self.every:
            log.warning("%s (%d times in the last minute or since start)", message, self._count[condition])
            self._last[condition], self._count[condition] = now, 0


def file_limit() -> int:
    """Raise this process's open-file limit to its hard limit; returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


def default_max_connections() -> int:
    """Connections to keep open at most: the file limit less room for the model, database, logs."""
    return max(16, min(file_limit() - 256, 8192))


def guarded_protocol(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header deadline and a connection cap (pass as `Config(http=...)`)."""
    warnings = Throttled()

    class GuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                warnings.warn(
                    "connections",
                    f"closed new connections: {max_connections} are open (serve --max-connections)",
                )
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _headers_too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                warnings.warn(
                    "headers",
                    f"closed connections that sent no whole request headers within {header_timeout:g} s "
                    "(serve --header-timeout)",
                )
                self.transport.abort()

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request's headers arrived: its body and answer may take long
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's headers get the same deadline

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedH11
