"""What the admin dashboard shows, read from the store, the request log and the engine.

Plain queries returning JSON-ready dicts; the page draws them. This module changes nothing
(alias moves go through the audited admin routes in api/server.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from loraplex.adapters import registry
from loraplex.gateway import feedback
from loraplex.gateway.db import Database

if TYPE_CHECKING:
    from loraplex.engine.protocol import EngineClient


def adapters(db: Database) -> list[dict[str, Any]]:
    """Every adapter with its versions (size, base, eval score, feedback) and aliases."""
    ratings = {r["adapter"]: r for r in feedback.stats(db)}
    usage = {
        r["served"]: dict(r)
        for r in db.all(
            "SELECT served, COUNT(*) AS requests, SUM(prompt_tokens + completion_tokens) AS tokens "
            "FROM requests WHERE served IS NOT NULL GROUP BY served"
        )
    }
    out = []
    for entry in registry.catalog():
        name = entry["name"]
        versions = []
        for v in entry["versions"]:
            ref = registry.resolve(f"{name}@{v}")
            m = ref.manifest()
            fb = ratings.get(ref.id)
            versions.append(
                {
                    "id": ref.id,
                    "version": ref.version,
                    "created_at": m.get("created_at"),
                    "bytes": sum(int(f.get("bytes", 0)) for f in (m.get("files") or {}).values()),
                    "base": (m.get("base_model") or {}).get("id"),
                    "eval_score": (m.get("eval") or {}).get("score"),
                    "train_loss": m.get("train_loss"),
                    "ratings": fb["ratings"] if fb else 0,
                    "up_ratio": fb["up_ratio"] if fb else None,
                    "requests": (usage.get(ref.id) or {}).get("requests", 0),
                    "tokens": (usage.get(ref.id) or {}).get("tokens", 0) or 0,
                }
            )
        out.append(
            {"name": name, "description": entry["description"], "aliases": entry["aliases"], "versions": versions}
        )
    return out


def timeline(db: Database, hours: float = 24.0, buckets: int = 48) -> dict[str, Any]:
    """Requests and tokens per adapter in equal time buckets over the last `hours`."""
    now = time.time()
    start = now - hours * 3600
    width = (now - start) / buckets
    series: dict[str, dict[str, list[int]]] = {}
    for r in db.all(
        "SELECT COALESCE(served, model, '-') AS served, time, prompt_tokens + completion_tokens AS tokens"
        " FROM requests WHERE time >= :start",
        {"start": start},
    ):
        s = series.setdefault(r["served"], {"requests": [0] * buckets, "tokens": [0] * buckets})
        i = min(int((r["time"] - start) / width), buckets - 1)
        s["requests"][i] += 1
        s["tokens"][i] += int(r["tokens"] or 0)
    return {"start": start, "width_s": width, "buckets": buckets, "series": series}


def live(db: Database, engine: EngineClient, minutes: float = 15.0) -> dict[str, Any]:
    """The engine now (loaded adapters, running rows, queue) and recent TTFT / latency per request."""
    since = time.time() - minutes * 60
    recent = [
        dict(r)
        for r in db.all(
            "SELECT time, COALESCE(served, model) AS model, ttft_ms, latency_ms, status FROM requests "
            "WHERE time >= :since ORDER BY time LIMIT 5000",
            {"since": since},
        )
    ]
    return {
        "running": engine.running(),
        "queued": engine.queue_depth(),
        "max_batch": engine.max_batch,
        "loaded": engine.adapters.describe(),
        "requests": recent,
    }
