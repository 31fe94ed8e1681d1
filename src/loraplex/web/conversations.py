"""The web UI's conversations, stored per API key in server.db (a key never sees another's).

A conversation is saved whole after every exchange (the browser owns its shape: a list of
{role, content} plus the response id and rating of each answer), so a reload, a restart or
another browser with the same key finds it again. This module does not talk HTTP (web/routes.py).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from typing import Any

from loraplex.errors import UserError

ID_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
MAX_MESSAGES = 1000


def check_id(cid: str) -> str:
    if not ID_RE.match(cid):
        raise UserError(f"invalid conversation id {cid!r}: 8-64 letters, digits or '-'")
    return cid


def listing(con: sqlite3.Connection, key: str) -> list[dict[str, Any]]:
    rows = con.execute(
        "SELECT id, title, model, updated FROM conversations WHERE key=? ORDER BY updated DESC LIMIT 500", (key,)
    ).fetchall()
    return [dict(r) for r in rows]


def get(con: sqlite3.Connection, key: str, cid: str) -> dict[str, Any] | None:
    row = con.execute(
        "SELECT id, title, model, messages, created, updated FROM conversations WHERE id=? AND key=?",
        (check_id(cid), key),
    ).fetchone()
    if row is None:
        return None
    return {**dict(row), "messages": json.loads(row["messages"])}


def save(con: sqlite3.Connection, key: str, cid: str, title: str, model: str, messages: list[dict[str, Any]]) -> bool:
    """Create or replace; False when the id belongs to another key (which is not told apart from
    a missing one to the caller's client)."""
    if len(messages) > MAX_MESSAGES:
        raise UserError(f"a conversation holds at most {MAX_MESSAGES} messages; start a new one")
    now = time.time()
    with con:
        owner = con.execute("SELECT key FROM conversations WHERE id=?", (check_id(cid),)).fetchone()
        if owner is not None and owner["key"] != key:
            return False
        con.execute(
            "INSERT INTO conversations (id, key, title, model, messages, created, updated) VALUES (?,?,?,?,?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET title=excluded.title, model=excluded.model, "
            "messages=excluded.messages, updated=excluded.updated",
            (cid, key, title[:200], model[:200], json.dumps(messages, ensure_ascii=False), now, now),
        )
    return True


def delete(con: sqlite3.Connection, key: str, cid: str) -> bool:
    with con:
        return con.execute("DELETE FROM conversations WHERE id=? AND key=?", (check_id(cid), key)).rowcount > 0
