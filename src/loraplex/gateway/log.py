"""The request log and the admin audit trail, and the usage summaries built from them.

Every request the API answers (success or error) becomes one row. Rows are written by one
background thread in small transactions, so the event loop never waits on the disk; `close()`
drains the queue, so a clean shutdown loses no row. While the database is unreachable (a
PostgreSQL restart) the writer keeps its rows and retries, so an outage delays rows, not loses
them, up to `max_pending` rows held in memory; past that, new rows are dropped and counted
(`loraplex_request_log_dropped_total`), because a long outage must not grow the server until
it is killed. Prompt and response text are stored only when the operator asks (`serve --log-text`).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.engine import RowMapping

from loraplex.gateway.db import Database, Unavailable

_log = logging.getLogger(__name__)
MAX_PENDING = 100_000  # rows held while the database is down: ~40 MiB without --log-text (measured)


@dataclass
class RequestRow:
    id: str
    time: float
    key: str | None
    model: str | None
    served: str | None
    endpoint: str
    status: int
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    finish_reason: str | None = None
    prompt: str | None = None
    response: str | None = None


class RequestLog:
    def __init__(self, db: Database, max_pending: int = MAX_PENDING, dropped: Any = None):
        """`dropped`: a Prometheus counter to count dropped rows in (optional)."""
        self.db = db
        # rows, a flush marker (set once everything before it is committed), or None to stop
        self._q: queue.SimpleQueue[RequestRow | threading.Event | None] = queue.SimpleQueue()
        self.written = 0
        self.max_pending = max_pending
        self.pending = 0  # rows queued or being retried
        self.dropped = 0
        self._dropped_counter = dropped
        self._count = threading.Lock()
        self._thread = threading.Thread(target=self._writer, name="loraplex-request-log", daemon=True)
        self._thread.start()

    def write(self, row: RequestRow) -> None:
        with self._count:
            if self.pending >= self.max_pending:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 10_000 == 0:
                    _log.error(
                        "request log: %d rows wait for the database (the most it holds); %d dropped so far",
                        self.pending,
                        self.dropped,
                    )
                if self._dropped_counter is not None:
                    self._dropped_counter.inc()
                return
            self.pending += 1
        self._q.put(row)

    def _writer(self) -> None:
        cols = list(RequestRow.__dataclass_fields__)
        sql = (
            f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
            f" ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in cols[1:])}"
        )
        done = False
        while not done:
            batch = [self._q.get()]
            while len(batch) < 256:
                try:
                    batch.append(self._q.get(timeout=0.05))
                except queue.Empty:
                    break
            rows = [r for r in batch if isinstance(r, RequestRow)]
            done = None in batch
            delay, held = 0.5, len(rows)
            while rows:
                try:
                    self.db.run_many(sql, [asdict(r) for r in rows])
                except Unavailable as e:
                    _log.warning("request log: %s; retrying %d rows in %.0f s", e, len(rows), delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                except Exception:  # a bug, not an outage: say so, and keep logging later requests
                    _log.exception("request log: %d rows could not be written", len(rows))
                    break
                self.written += len(rows)
                rows = []
            with self._count:
                self.pending -= held
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every row written so far is in the database."""
        marker = threading.Event()
        self._q.put(marker)
        marker.wait(timeout)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def audit(self, key: str | None, action: str, target: str | None, detail: Any, status: int) -> None:
        self.db.run(
            "INSERT INTO audit (time, key, action, target, detail, status)"
            " VALUES (:time, :key, :action, :target, :detail, :status)",
            {
                "time": time.time(),
                "key": key,
                "action": action,
                "target": target,
                "detail": json.dumps(detail, ensure_ascii=False),
                "status": status,
            },
        )

    def lookup(self, response_id: str) -> RowMapping | None:
        return self.db.one("SELECT * FROM requests WHERE id = :id", {"id": response_id})


def summary(db: Database, since: float | None = None, by: str = "adapter") -> list[dict[str, Any]]:
    """Requests, errors, tokens and latency per adapter (served name@vN) or per key since `since`."""
    column = {"adapter": "COALESCE(served, model, '-')", "key": "COALESCE(key, '-')"}[by]
    rows = db.all(
        f"""SELECT {column} AS name, COUNT(*) AS requests,
                   SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,
                   SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
                   AVG(CASE WHEN status < 400 THEN ttft_ms END) AS avg_ttft_ms,
                   AVG(CASE WHEN status < 400 THEN latency_ms END) AS avg_latency_ms,
                   MAX(time) AS last
            FROM requests WHERE time >= :since GROUP BY name ORDER BY requests DESC""",
        {"since": since or 0.0},
    )
    return [dict(r) for r in rows]


def audit_rows(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    rows = db.all("SELECT * FROM audit ORDER BY id DESC LIMIT :limit", {"limit": limit})
    return [dict(r) for r in rows]
