"""The server's embedded state: one SQLite file ($LORAPLEX_HOME/server.db) for keys, the request
log, feedback, the admin audit trail, and the web UI's conversations and training jobs.

The schema is versioned with SQLite's `user_version`; `connect` applies every migration newer than
the file's version, in order, in one transaction each, so an old file upgrades in place and a new
file is built by the same steps. WAL mode lets the CLI read while the server writes.
This module knows tables, not policies (see keys.py, log.py, feedback.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from loraplex import paths

MIGRATIONS: list[str] = [
    # 1: keys, request log, feedback, audit (statements split on ";": none inside comments)
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
]


def default_path() -> Path:
    return paths.home() / "server.db"


def connect(path: Path | None = None) -> sqlite3.Connection:
    """Open (creating and migrating as needed) the server database."""
    path = path or default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    con.row_factory = sqlite3.Row
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, no fsync per log row
    con.execute("PRAGMA busy_timeout=30000")
    version = con.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        raise RuntimeError(f"{path} has schema version {version}; this loraplex knows up to {len(MIGRATIONS)}")
    for i in range(version, len(MIGRATIONS)):
        con.execute("BEGIN IMMEDIATE")
        try:
            if con.execute("PRAGMA user_version").fetchone()[0] == i:  # another process may have won
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        con.execute(statement)
                con.execute(f"PRAGMA user_version = {i + 1}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return con
