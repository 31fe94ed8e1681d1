"""The server's tables: keys, the request log, feedback, the admin audit trail, stored Responses, and the web UI's
conversations and training jobs.

They live in $LORAPLEX_HOME/server.db (SQLite), which every process on the host shares (front
doors, the CLI), or in the PostgreSQL database `LORAPLEX_DATABASE_URL` names, which front doors on
several hosts share (see loraplex/database.py). This module knows tables, not policies (see
keys.py, log.py, feedback.py).
"""

from __future__ import annotations

from pathlib import Path

from loraplex import paths
from loraplex.database import URL_ENV, Database, Unavailable, url_for

__all__ = ["MIGRATIONS", "URL_ENV", "Database", "Unavailable", "connect", "default_path"]

MIGRATIONS: list[str] = [
    # 1: keys, request log, feedback, audit (statements split on ";": none inside comments).
    # Written for SQLite; loraplex.database maps the three type names that differ on PostgreSQL.
    """
    CREATE TABLE keys (
        id TEXT PRIMARY KEY,            -- the public part of the key (lp-<id>-<secret>)
        name TEXT NOT NULL UNIQUE,
        salt BLOB NOT NULL,
        hash BLOB NOT NULL,             -- sha256(salt || secret)
        models TEXT NOT NULL,           -- comma-separated glob patterns, '*' = every model
        admin INTEGER NOT NULL DEFAULT 0,
        rpm INTEGER,
        tpm INTEGER,
        expires REAL,                   -- unix time, NULL = never
        created REAL NOT NULL,
        revoked REAL
    );
    CREATE TABLE requests (
        id TEXT PRIMARY KEY,            -- the response id the client saw (chatcmpl-...)
        time REAL NOT NULL,
        key TEXT,                       -- key name, NULL without auth
        model TEXT,                     -- what the client asked for
        served TEXT,                    -- name@vN, the base id, or upstream:NAME
        endpoint TEXT NOT NULL,
        status INTEGER NOT NULL,
        error TEXT,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        ttft_ms REAL,
        latency_ms REAL NOT NULL,
        finish_reason TEXT,
        prompt TEXT,                    -- JSON, only when the operator logs text
        response TEXT
    );
    CREATE INDEX requests_time ON requests(time);
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        response_id TEXT NOT NULL,
        time REAL NOT NULL,
        key TEXT,
        adapter TEXT NOT NULL,          -- name@vN (or the base id) that produced the response
        rating TEXT NOT NULL CHECK (rating IN ('up', 'down')),
        comment TEXT,
        correction TEXT,
        messages TEXT NOT NULL,         -- JSON conversation up to the rated answer
        response TEXT NOT NULL
    );
    CREATE INDEX feedback_adapter ON feedback(adapter);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        time REAL NOT NULL,
        key TEXT,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT,
        status INTEGER NOT NULL
    );
    """,
    # 2: the web UI's conversations, per key
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,            -- chosen by the browser (a UUID)
        key TEXT NOT NULL,              -- key name, '' without auth
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        messages TEXT NOT NULL,         -- JSON list of {role, content, id?, rating?}
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX conversations_key ON conversations(key, updated);
    """,
    # 3: training jobs started from the web page
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        key TEXT NOT NULL,              -- key name, '' without auth
        name TEXT NOT NULL,             -- the adapter being trained
        status TEXT NOT NULL,           -- queued, training, evaluating, done, failed, interrupted
        config TEXT NOT NULL,           -- JSON: the resolved training config
        run_dir TEXT NOT NULL,
        pid INTEGER,
        created REAL NOT NULL,
        finished REAL,
        adapter TEXT,                   -- name@vN once registered
        error TEXT
    );
    """,
    # 4: the host a job runs on (a front door on another host cannot see that job's process);
    # NULL for jobs started before. No SQL comment here: SQLite keeps it in the table's schema text.
    "ALTER TABLE jobs ADD COLUMN host TEXT",
    # 5: the rate-limit window front doors share on PostgreSQL (gateway/limits.py); unused on SQLite
    """
    CREATE TABLE rate_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        key TEXT NOT NULL,
        time REAL NOT NULL,             -- wall-clock unix time of admission
        tokens INTEGER NOT NULL         -- prompt tokens, then completion tokens added
    );
    CREATE INDEX rate_events_key ON rate_events(key, time);
    """,
    # 6: stored Responses API answers and their conversations, for previous_response_id (api/responses.py)
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        key TEXT NOT NULL,
        model TEXT NOT NULL,
        messages TEXT NOT NULL,
        body TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
]


def default_path() -> Path:
    return paths.home() / "server.db"


def connect(target: Path | str | None = None) -> Database:
    """Open (creating and migrating as needed) the server database: a SQLite file, a URL, or by
    default `LORAPLEX_DATABASE_URL`, else $LORAPLEX_HOME/server.db."""
    if target is None:
        target = url_for(default_path())
    elif isinstance(target, Path):
        target = f"sqlite:///{target}"
    return Database(target, MIGRATIONS, "server")
