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
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters import names
from loraplex.errors import UserError
from loraplex.gateway.db import Database


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
    db: Database,
    response_id: str,
    item: Answered,
    choice: int,
    rating: str,
    comment: str | None,
    correction: str | None,
) -> int:
    row = db.one(
        "INSERT INTO feedback (response_id, time, key, adapter, rating, comment, correction, messages, response)"
        " VALUES (:response_id, :time, :key, :adapter, :rating, :comment, :correction, :messages, :response)"
        " RETURNING id",
        {
            "response_id": response_id,
            "time": time.time(),
            "key": item.key,
            "adapter": item.served,
            "rating": rating,
            "comment": comment,
            "correction": correction,
            "messages": json.dumps(item.messages, ensure_ascii=False),
            "response": item.answers[choice],
        },
    )
    assert row is not None  # RETURNING gives the inserted row
    return int(row["id"])


def _where(adapter: str, rating: str | None) -> tuple[str, dict[str, Any]]:
    name, version = names.split_ref(adapter)  # may be the base model's id
    escaped = name.replace("_", "\\_").replace("%", "\\%")
    if version:
        clause, args = "adapter = :adapter", {"adapter": adapter}
    else:  # every version, and the base model, which is stored under its id
        clause = "(adapter LIKE :versions ESCAPE '\\' OR adapter = :name)"
        args = {"versions": f"{escaped}@v%", "name": name}
    if rating:
        clause += " AND rating = :rating"
        args["rating"] = rating
    return clause, args


def export(db: Database, adapter: str, out: Path, rating: str | None = None, fmt: str = "messages") -> dict[str, int]:
    """Write `adapter`'s rated conversations as training data; counts of written and skipped records."""
    if fmt not in ("messages", "sharegpt"):
        raise UserError(f"--format {fmt!r}: use messages or sharegpt")
    clause, args = _where(adapter, rating)
    rows = db.all(f"SELECT * FROM feedback WHERE {clause} ORDER BY id", args)
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


def stats(db: Database, adapter: str | None = None) -> list[dict[str, Any]]:
    clause, args = _where(adapter, None) if adapter else ("1 = 1", {})
    rows = db.all(
        f"""SELECT adapter, COUNT(*) AS ratings,
                   SUM(CASE WHEN rating = 'up' THEN 1 ELSE 0 END) AS up,
                   SUM(CASE WHEN rating = 'down' THEN 1 ELSE 0 END) AS down,
                   SUM(CASE WHEN correction IS NOT NULL AND correction != '' THEN 1 ELSE 0 END) AS corrected,
                   MAX(time) AS last
            FROM feedback WHERE {clause} GROUP BY adapter ORDER BY adapter""",
        args,
    )
    return [{**dict(r), "up_ratio": (r["up"] / r["ratings"]) if r["ratings"] else None} for r in rows]
