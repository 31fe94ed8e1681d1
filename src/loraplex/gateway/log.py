"""The request log and the admin audit trail, and the usage summaries built from them.

Every request the API answers (success or error) becomes one row. Rows are written by one
background thread in small transactions, so the event loop never waits on the disk; `close()`
drains the queue, so a clean shutdown loses no row. Prompt and response text are stored only when
the operator asks (`serve --log-text`).
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraplex.gateway import db


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
    def __init__(self, path: Path | None = None):
        self.path = path or db.default_path()
        # rows, a flush marker (set once everything before it is committed), or None to stop
        self._q: queue.SimpleQueue[RequestRow | threading.Event | None] = queue.SimpleQueue()
        self._con = db.connect(self.path)
        self._lock = threading.Lock()  # audit writes come from request threads
        self.written = 0
        self._thread = threading.Thread(target=self._writer, name="loraplex-request-log", daemon=True)
        self._thread.start()

    def write(self, row: RequestRow) -> None:
        self._q.put(row)

    def _writer(self) -> None:
        con = db.connect(self.path)
        cols = list(RequestRow.__dataclass_fields__)
        sql = f"INSERT OR REPLACE INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
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
            if rows:
                con.execute("BEGIN")
                con.executemany(sql, [tuple(asdict(r).values()) for r in rows])
                con.execute("COMMIT")
                self.written += len(rows)
            for marker in batch:
                if isinstance(marker, threading.Event):
                    marker.set()
        con.close()

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every row written so far is in the database."""
        marker = threading.Event()
        self._q.put(marker)
        marker.wait(timeout)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    def audit(self, key: str | None, action: str, target: str | None, detail: Any, status: int) -> None:
        with self._lock:
            self._con.execute(
                "INSERT INTO audit (time, key, action, target, detail, status) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), key, action, target, json.dumps(detail, ensure_ascii=False), status),
            )

    def lookup(self, response_id: str) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._con.execute(
                "SELECT * FROM requests WHERE id = ?", (response_id,)
            ).fetchone()
            return row


def summary(con: sqlite3.Connection, since: float | None = None, by: str = "adapter") -> list[dict[str, Any]]:
    """Requests, errors, tokens and latency per adapter (served name@vN) or per key since `since`."""
    column = {"adapter": "COALESCE(served, model, '-')", "key": "COALESCE(key, '-')"}[by]
    rows = con.execute(
        f"""SELECT {column} AS name, COUNT(*) AS requests,
                   SUM(status >= 400) AS errors,
                   SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,
                   AVG(CASE WHEN status < 400 THEN ttft_ms END) AS avg_ttft_ms,
                   AVG(CASE WHEN status < 400 THEN latency_ms END) AS avg_latency_ms,
                   MAX(time) AS last
            FROM requests WHERE time >= ? GROUP BY name ORDER BY requests DESC""",
        (since or 0.0,),
    ).fetchall()
    return [dict(r) for r in rows]


def audit_rows(con: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    rows = con.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
    return [dict(r) for r in rows]
