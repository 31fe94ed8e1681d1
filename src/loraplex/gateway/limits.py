"""Per-key rate limits: requests and tokens per minute over a sliding 60 s window.

A request counts at admission with its prompt tokens; its completion tokens are added when it
ends. `RateLimiter` keeps the window in memory, for one front door; `SharedRateLimiter` keeps it in
the PostgreSQL database that front doors on several hosts share, so a key's limits hold across all
of them (a per-key advisory lock makes check-and-count atomic). Both decide with `check`, so they
agree on every sequence (tested). This module does not know HTTP: `RateLimited` carries the
seconds after which a retry can pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import sqlalchemy as sa

from loraplex.database import Database
from loraplex.gateway.keys import Key

_log = logging.getLogger(__name__)

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

    def add(self, tokens: int) -> None:
        self.tokens += tokens


def check(key: Key, prompt_tokens: int, window: Sequence[Usage], now: float) -> None:
    """Raise RateLimited if one more request of `prompt_tokens` would break `key`'s limits, given
    the usage already in its window (oldest first)."""
    if key.rpm is not None and len(window) >= key.rpm:
        wait = window[len(window) - key.rpm].time + WINDOW - now
        raise RateLimited(f"rate limit of {key.rpm} requests per minute reached for key {key.name!r}", wait, "requests")
    if key.tpm is not None:
        if prompt_tokens > key.tpm:
            raise RateLimited(
                f"this request's {prompt_tokens} prompt tokens exceed key {key.name!r}'s limit of {key.tpm} "
                "tokens per minute",
                WINDOW,
                "tokens",
            )
        used = sum(u.tokens for u in window)
        if used + prompt_tokens > key.tpm:
            # wait until enough of the oldest usage leaves the window
            freed, wait = 0, WINDOW
            for u in window:
                freed += u.tokens
                if used - freed + prompt_tokens <= key.tpm:
                    wait = u.time + WINDOW - now
                    break
            raise RateLimited(
                f"rate limit of {key.tpm} tokens per minute reached for key {key.name!r} ({used} used)",
                wait,
                "tokens",
            )


class RateLimiter:
    """The window in memory: limits hold per process. Called from the event loop only (no lock)."""

    blocking = False

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
        check(key, prompt_tokens, q, now)
        usage = Usage(now, prompt_tokens)
        q.append(usage)
        return usage

    def close(self) -> None:
        pass


class SharedUsage(Usage):
    """A request's row in the shared window; completion tokens reach it through the limiter's writer."""

    __slots__ = ("id", "limiter")

    def __init__(self, t: float, tokens: int, row_id: int, limiter: SharedRateLimiter):
        super().__init__(t, tokens)
        self.id, self.limiter = row_id, limiter

    def add(self, tokens: int) -> None:
        super().add(tokens)
        if tokens:
            self.limiter.updates.put((self.id, tokens))


class SharedRateLimiter:
    """The window in the shared database (`rate_events`), for front doors on several hosts.

    Times are wall-clock (`time.time()`), the only clock hosts share. Admission is one transaction
    under a per-key advisory lock: drop the key's expired rows, read the rest, `check`, insert.
    Completion tokens are added by a background thread, so a request's end never waits on the
    database; a window may briefly lag a just-finished request's tokens."""

    blocking = True  # admit() waits on the database: call it from a worker thread

    def __init__(self, db: Database):
        if db.dialect != "postgresql":
            raise ValueError("SharedRateLimiter needs PostgreSQL (advisory locks)")
        self.db = db
        # (row id, tokens to add), a flush marker, or None to stop
        self.updates: queue.SimpleQueue[tuple[int, int] | threading.Event | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="loraplex-rate-limits", daemon=True)
        self._thread.start()

    def admit(self, key: Key, prompt_tokens: int, now: float | None = None) -> Usage | None:
        if key.rpm is None and key.tpm is None:
            return None
        now = time.time() if now is None else now
        params = {"key": key.name, "now": now, "cutoff": now - WINDOW, "tokens": prompt_tokens}
        with self.db.transaction() as tx:
            tx.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), params)
            # Drop the key's expired rows and total the rest in one round trip; the rows themselves
            # are read only to word a refusal (its Retry-After), which `check` then raises.
            count, used = tx.execute(
                sa.text(
                    "WITH gone AS (DELETE FROM rate_events WHERE key = :key AND time <= :cutoff)"
                    " SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM rate_events WHERE key = :key AND time > :cutoff"
                ),
                params,
            ).one()
            if (key.rpm is not None and count >= key.rpm) or (key.tpm is not None and used + prompt_tokens > key.tpm):
                rows = tx.execute(
                    sa.text(
                        "SELECT time, tokens FROM rate_events WHERE key = :key AND time > :cutoff ORDER BY time, id"
                    ),
                    params,
                )
                check(key, prompt_tokens, [Usage(t, n) for t, n in rows], now)
            row_id = tx.execute(
                sa.text("INSERT INTO rate_events (key, time, tokens) VALUES (:key, :now, :tokens) RETURNING id"),
                params,
            ).scalar_one()
        return SharedUsage(now, prompt_tokens, int(row_id), self)

    def _writer(self) -> None:
        done = False
        while not done:
            batch = [self.updates.get()]
            while True:
                try:
                    batch.append(self.updates.get_nowait())
                except queue.Empty:
                    break
            done = None in batch
            rows = [{"id": item[0], "tokens": item[1]} for item in batch if isinstance(item, tuple)]
            if rows:
                try:
                    self.db.run_many("UPDATE rate_events SET tokens = tokens + :tokens WHERE id = :id", rows)
                except Exception as e:  # limits are best effort: an outage must not stop the writer
                    _log.warning("rate limits: %d token counts not recorded (%s)", len(rows), e)
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every completion-token count added so far is in the database."""
        marker = threading.Event()
        self.updates.put(marker)
        marker.wait(timeout)

    def close(self) -> None:
        self.updates.put(None)
        self._thread.join(timeout=10)
