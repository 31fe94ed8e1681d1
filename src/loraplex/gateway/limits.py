"""Per-key rate limits: requests and tokens per minute over a sliding 60 s window.

Called from the server's event loop only (one thread), so it needs no lock. A request counts at
admission with its prompt tokens; its completion tokens are added when it ends. This module does
not know HTTP: `RateLimited` carries the seconds after which a retry can pass.
"""

from __future__ import annotations

import time
from collections import deque

from loraplex.gateway.keys import Key

WINDOW = 60.0


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: float, limit: str):
        super().__init__(message)
        self.message, self.retry_after, self.limit = message, max(1, int(retry_after + 0.999)), limit


class Usage:
    """One admitted request's share of its key's window: [time, tokens]."""

    __slots__ = ("time", "tokens")

    def __init__(self, t: float, tokens: int):
        self.time, self.tokens = t, tokens


class RateLimiter:
    def __init__(self) -> None:
        self._events: dict[str, deque[Usage]] = {}

    def _window(self, key: str, now: float) -> deque[Usage]:
        q = self._events.setdefault(key, deque())
        while q and q[0].time <= now - WINDOW:
            q.popleft()
        return q

    def admit(self, key: Key, prompt_tokens: int, now: float | None = None) -> Usage | None:
        """Count a request against `key`'s limits, or raise RateLimited; None for a key without limits."""
        if key.rpm is None and key.tpm is None:
            return None
        now = time.monotonic() if now is None else now
        q = self._window(key.name, now)
        if key.rpm is not None and len(q) >= key.rpm:
            wait = q[len(q) - key.rpm].time + WINDOW - now
            raise RateLimited(
                f"rate limit of {key.rpm} requests per minute reached for key {key.name!r}", wait, "requests"
            )
        if key.tpm is not None:
            if prompt_tokens > key.tpm:
                raise RateLimited(
                    f"this request's {prompt_tokens} prompt tokens exceed key {key.name!r}'s limit of {key.tpm} "
                    "tokens per minute",
                    WINDOW,
                    "tokens",
                )
            used = sum(u.tokens for u in q)
            if used + prompt_tokens > key.tpm:
                # wait until enough of the oldest usage leaves the window
                freed, wait = 0, WINDOW
                for u in q:
                    freed += u.tokens
                    if used - freed + prompt_tokens <= key.tpm:
                        wait = u.time + WINDOW - now
                        break
                raise RateLimited(
                    f"rate limit of {key.tpm} tokens per minute reached for key {key.name!r} ({used} used)",
                    wait,
                    "tokens",
                )
        usage = Usage(now, prompt_tokens)
        q.append(usage)
        return usage
