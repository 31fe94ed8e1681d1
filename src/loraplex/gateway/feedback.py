"""Users' ratings of answers, stored against the exact adapter version that produced them, and
turned back into training data.

The conversation of a rated answer comes from the server's recent-responses memory (or the
request log when text logging is on), so feedback works without logging every prompt: only the
conversations someone rated are kept. `export` writes them in a format `loraplex train` reads;
a down-rated answer with a correction becomes an example of the correction, one without a
correction has nothing to teach and is skipped (and counted).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import UserError


@dataclass(frozen=True)
class Answered:
    """What the server remembers of a recent response, for feedback on it."""

    key: str | None
    served: str
    messages: list[dict[str, str]]
    answers: tuple[str, ...]


class RecentResponses:
    """The last `capacity` responses by id (memory only)."""

    def __init__(self, capacity: int = 10_000):
        self.capacity = capacity
        self._items: OrderedDict[str, Answered] = OrderedDict()

    def put(self, response_id: str, item: Answered) -> None:
        self._items[response_id] = item
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Answered | None:
        return self._items.get(response_id)


def record(
    con: sqlite3.Connection,
    response_id: str,
    item: Answered,
    choice: int,
    rating: str,
    comment: str | None,
    correction: str | None,
) -> int:
    cur = con.execute(
        "INSERT INTO feedback (response_id, time, key, adapter, rating, comment, correction, messages, response)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            response_id,
            time.time(),
            item.key,
            item.served,
            rating,
            comment,
            correction,
            json.dumps(item.messages, ensure_ascii=False),
            item.answers[choice],
        ),
    )
    return int(cur.lastrowid or 0)


def _where(adapter: str, rating: str | None) -> tuple[str, list[Any]]:
    name, _, version = adapter.partition("@")
    escaped = name.replace("_", "\\_").replace("%", "\\%")
    clause, args = ("adapter = ?", [adapter]) if version else ("adapter LIKE ? ESCAPE '\\'", [f"{escaped}@v%"])
    if not version:
        clause = f"({clause} OR adapter = ?)"
        args.append(name)  # the base model is stored under its id
    if rating:
        clause += " AND rating = ?"
        args.append(rating)
    return clause, args


def export(
    con: sqlite3.Connection, adapter: str, out: Path, rating: str | None = None, fmt: str = "messages"
) -> dict[str, int]:
    """Write `adapter`'s rated conversations as training data; counts of written and skipped records."""
    if fmt not in ("messages", "sharegpt"):
        raise UserError(f"--format {fmt!r}: use messages or sharegpt")
    clause, args = _where(adapter, rating)
    rows = con.execute(f"SELECT * FROM feedback WHERE {clause} ORDER BY id", args).fetchall()
    written = skipped = 0
    lines = []
    for r in rows:
        answer = r["correction"] or (r["response"] if r["rating"] == "up" else None)
        if not answer:
            skipped += 1  # down, no correction: nothing to learn from
            continue
        messages = [*json.loads(r["messages"]), {"role": "assistant", "content": answer}]
        if fmt == "messages":
            record_: dict[str, Any] = {"messages": messages}
        else:
            names = {"system": "system", "user": "human", "assistant": "gpt"}
            record_ = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
        lines.append(json.dumps(record_, ensure_ascii=False))
        written += 1
    if not rows:
        raise UserError(f"no feedback for {adapter!r}" + (f" rated {rating!r}" if rating else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(out)
    return {"written": written, "skipped": skipped}


def stats(con: sqlite3.Connection, adapter: str | None = None) -> list[dict[str, Any]]:
    clause, args = _where(adapter, None) if adapter else ("1", [])
    rows = con.execute(
        f"""SELECT adapter, COUNT(*) AS ratings, SUM(rating = 'up') AS up, SUM(rating = 'down') AS down,
                   SUM(correction IS NOT NULL AND correction != '') AS corrected, MAX(time) AS last
            FROM feedback WHERE {clause} GROUP BY adapter ORDER BY adapter""",
        args,
    ).fetchall()
    return [{**dict(r), "up_ratio": (r["up"] / r["ratings"]) if r["ratings"] else None} for r in rows]
