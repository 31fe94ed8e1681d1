"""What the server database costs per request: SQLite (the default) vs. PostgreSQL, side by side.

    python bench/database.py [--rows 20000] [--seconds 10] [--url postgresql://...]

Without --url it starts a throw-away PostgreSQL server on loopback (Debian's `postgresql`, as the
tests do). For each backend, in one run:
  * key check: `keys.authenticate` (one indexed SELECT), the database work on every API request;
  * request log: rows/s through `RequestLog` (one background writer, batched transactions);
  * usage summary: `loraplex usage` over all those rows;
  * rate-limit admission for a key with limits: in memory with SQLite (per process), the shared
    window in the database with PostgreSQL (across front doors);
  * over HTTP: a real server (the default base, keys on) answering authenticated `GET /v1/models`
    from 8 concurrent clients, requests/s: the whole per-request cost a client sees.
Loopback PostgreSQL is the best case; over a network add the round trip to each key check.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loraplex.gateway import db, keys  # noqa: E402
from loraplex.gateway.log import RequestLog, RequestRow, summary  # noqa: E402


def key_checks(database: db.Database, token: str, n: int = 2000) -> float:
    """Median microseconds per authenticate() over batches."""
    per = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            keys.authenticate(database, f"Bearer {token}")
        per.append((time.perf_counter() - t) / (n // 5) * 1e6)
    return statistics.median(per)


def admissions(database: db.Database, n: int = 1000) -> float:
    """Median microseconds per admit() + completion tokens, for a key whose limits never bind."""
    from loraplex.gateway.limits import RateLimiter, SharedRateLimiter

    limiter = SharedRateLimiter(database) if database.dialect == "postgresql" else RateLimiter()
    key = keys.Key(
        id="x", name="limited", models=("*",), admin=False, rpm=10**9, tpm=10**12, expires=None, created=0, revoked=None
    )
    per = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n // 5):
            usage = limiter.admit(key, 40)
            assert usage is not None
            usage.add(20)
        per.append((time.perf_counter() - t) / (n // 5) * 1e6)
    limiter.close()
    return statistics.median(per)


def log_rows(database: db.Database, rows: int) -> float:
    log = RequestLog(database)
    t = time.perf_counter()
    now = time.time()
    for i in range(rows):
        log.write(
            RequestRow(
                id=f"chatcmpl-{i}",
                time=now + i * 1e-3,
                key="bench",
                model="legal",
                served=f"legal@v{i % 4 + 1}",
                endpoint="/v1/chat/completions",
                status=200,
                prompt_tokens=40,
                completion_tokens=i % 64,
                ttft_ms=20.0,
                latency_ms=300.0,
            )
        )
    log.flush(600)
    elapsed = time.perf_counter() - t
    log.close()
    return rows / elapsed


def summary_ms(database: db.Database) -> float:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        summary(database, None, "adapter")
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


async def _hammer(url: str, token: str, seconds: float, clients: int = 8) -> float:
    done = 0
    until = time.monotonic() + seconds

    async def one() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
            while time.monotonic() < until:
                r = await http.get("/v1/models")
                assert r.status_code == 200, r.text
                done += 1

    await asyncio.gather(*[one() for _ in range(clients)])
    return done / seconds


def http_rate(database_url: str, token: str, seconds: float) -> float:
    import threading

    import uvicorn

    from loraplex.api.server import create_app
    from loraplex.engine.engine import Engine
    from loraplex.gateway.gate import Gateway

    engine = Engine(None, max_batch=4)
    app = create_app(engine, Gateway(engine=engine, database=database_url))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        asyncio.run(_hammer(f"http://127.0.0.1:{port}", token, 2))  # warm-up
        return asyncio.run(_hammer(f"http://127.0.0.1:{port}", token, seconds))
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--url", help="an existing, empty PostgreSQL database (default: start one)")
    args = ap.parse_args()
    from loraplex.models.load import resolve_base

    base = resolve_base(None)
    home = Path(tempfile.mkdtemp(prefix="lp-db-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    pg = None
    if args.url is None:
        from tests.pg import PostgresServer

        pg = PostgresServer()
        args.url = pg.new_database()
    results: dict[str, dict[str, float]] = {}
    try:
        for name, url in (("SQLite", f"sqlite:///{home / 'server.db'}"), ("PostgreSQL", args.url)):
            database = db.connect(url)
            _, token = keys.create(database, "bench")
            results[name] = {
                "key check, µs": key_checks(database, token),
                "rate-limit admission, µs": admissions(database),
                "request log, rows/s": log_rows(database, args.rows),
                f"usage summary over {args.rows:,} rows, ms": summary_ms(database),
                "authenticated GET /v1/models, req/s (8 clients)": http_rate(url, token, args.seconds),
            }
            database.close()
    finally:
        if pg is not None:
            pg.remove()
    print(f"SQLite file vs PostgreSQL ({'started here, loopback' if pg else 'given by --url'})\n")
    print("| | SQLite | PostgreSQL | PostgreSQL / SQLite |\n|---|---|---|---|")
    for metric in results["SQLite"]:
        a, b = results["SQLite"][metric], results["PostgreSQL"][metric]
        print(f"| {metric} | {a:,.1f} | {b:,.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
