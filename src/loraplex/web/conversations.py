"""The web UI's conversations, stored per API key in server.db (a key never sees another's).

A conversation is saved whole after every exchange (the browser owns its shape: a list of
{role, content} plus the response id and rating of each answer), so a reload, a restart or
another browser with the same key finds it again. This module does not talk HTTP (web/routes.py).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from loraplex.errors import UserError
from loraplex.gateway.db import Database

ID_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
MAX_MESSAGES = 1000


def check_id(cid: str) -> str:
    if not ID_RE.fullmatch(cid):
        raise UserError(f"invalid conversation id {cid!r}: 8-64 letters, digits or '-'")
    return cid


def listing(db: Database, key: str) -> list[dict[str, Any]]:
    rows = db.all(
        "SELECT id, title, model, updated FROM conversations WHERE key = :key ORDER BY updated DESC LIMIT 500",
        {"key": key},
    )
    return [dict(r) for r in rows]


def get(db: Database, key: str, cid: str) -> dict[str, Any] | None:
    row = db.one(
        "SELECT id, title, model, messages, created, updated FROM conversations WHERE id = :id AND key = :key",
        {"id": check_id(cid), "key": key},
    )
    if row is None:
        return None
    return {**dict(row), "messages": json.loads(row["messages"])}


def save(db: Database, key: str, cid: str, title: str, model: str, messages: list[dict[str, Any]]) -> bool:
    """Create or replace; False when the id belongs to another key (which is not told apart from
    a missing one to the caller's client)."""
    if len(messages) > MAX_MESSAGES:
        raise UserError(f"a conversation holds at most {MAX_MESSAGES} messages; start a new one")
    now = time.time()
    # One statement: the update happens only when the row is this key's, so there is no window
    # between checking the owner and writing.
    changed = db.run(
        "INSERT INTO conversations (id, key, title, model, messages, created, updated)"
        " VALUES (:id, :key, :title, :model, :messages, :now, :now)"
        " ON CONFLICT (id) DO UPDATE SET title = excluded.title, model = excluded.model,"
        " messages = excluded.messages, updated = excluded.updated WHERE conversations.key = excluded.key",
        {
            "id": check_id(cid),
            "key": key,
            "title": title[:200],
            "model": model[:200],
            "messages": json.dumps(messages, ensure_ascii=False),
            "now": now,
        },
    )
    return changed > 0


def delete(db: Database, key: str, cid: str) -> bool:
    return db.run("DELETE FROM conversations WHERE id = :id AND key = :key", {"id": check_id(cid), "key": key}) > 0
