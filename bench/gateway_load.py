"""The gateway under load and abuse: many clients for a while, valid, invalid, forbidden and
disconnecting requests mixed, with API keys on and a small queue so overload is reached.

    python bench/gateway_load.py [--clients 32] [--seconds 60] [--max-queue 8] [--quantize none,int4] [--knowledge]

`loraplex serve` (the default base, 8 random rank-16 adapters, keys required) runs as its own
process on loopback; each client loops over: a valid chat completion (streamed or not, 8-32 tokens,
a random adapter), an invalid body (400), a model outside its key (404: the server does not say
which models exist), or a stream it abandons after the first chunk. Reports, side by side in one
run: answers by status, any 5xx other than the deliberate 503 `overloaded`, requests sent vs.
rows in the request log, and the server's
resident memory at rest after warm-up and after each of several identical runs (read 8 s after
the load stops; flat means no growth from one run to the next once caches have grown) and its peak
under load. With several `--quantize` modes, each gets its own
server and the same load, one after the other, and a last table sets their memory side by side.
With `--knowledge` the 8 adapters are versions trained with retrieval (the default of `loraplex
train`): each carries the sample's Q&A, so every question is searched first (the server then holds
the sentence encoders, word segmenter and spelling tables), and the clients ask the sample's 20
held-out questions, English and Chinese, worded unlike its Q&A.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu  # noqa: E402  (lscpu model and flags: printed with the table)
from loraplex.gateway import db, keys  # noqa: E402
from loraplex.models.load import resolve_base  # noqa: E402
from loraplex.quickstart import HELDOUT_FILE  # noqa: E402
from serve_throughput import ServerProcess, make_adapters  # noqa: E402

QUESTION = "年假有多少天？How many days of leave do I get?"
# with --knowledge: the sample's held-out questions (English and Chinese, worded unlike its Q&A, of
# varied lengths), as the users of an FAQ assistant ask, so every search path runs
HELD_OUT = tuple(json.loads(line)["instruction"] for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines())
# after the load stops, before memory is read: the engine gives freed memory back once idle 2 s, and
# its KV cache shrinks once the rows have needed a quarter of it for 5 s (engine/model.py)
REST_S = 8.0


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory now (`VmRSS`) or its peak so far (`VmHWM`), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client(
    url: str,
    token: str,
    names: list[str],
    until: float,
    seed: int,
    tally: collections.Counter,
    questions: tuple[str, ...],
) -> None:
    rnd = random.Random(seed)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:
        while time.monotonic() < until:
            kind = rnd.choices(["valid", "invalid", "forbidden", "disconnect"], [60, 15, 10, 15])[0]
            user = [{"role": "user", "content": rnd.choice(questions)}]
            body = {"model": rnd.choice(names), "messages": user, "max_tokens": rnd.randint(8, 32)}
            tally["sent"] += 1
            if kind == "invalid":
                body["temperature"] = 9
            elif kind == "forbidden":
                body["model"] = "secret-hr"
            if kind == "disconnect" or (kind == "valid" and rnd.random() < 0.5):
                body["stream"] = True
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    tally[f"{kind} {r.status_code}"] += 1
                    if r.status_code == 200:
                        async for _ in r.aiter_lines():
                            if kind == "disconnect":
                                break  # closes the connection mid-stream
                continue
            r = await http.post("/v1/chat/completions", json=body)
            tally[f"{kind} {r.status_code}"] += 1
            if r.status_code == 503:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")) * rnd.random())


async def load(
    url: str, token: str, names: list[str], clients: int, seconds: float, questions: tuple[str, ...] = (QUESTION,)
) -> collections.Counter:
    tally: collections.Counter = collections.Counter()
    until = time.monotonic() + seconds
    await asyncio.gather(*[client(url, token, names, until, i, tally, questions) for i in range(clients)])
    return tally


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3, help="identical runs; memory is read after each")
    ap.add_argument(
        "--quantize", default="none", help="the server's base weights, comma-separated for several: none,int8,int4"
    )
    ap.add_argument(
        "--knowledge", action="store_true", help="adapters trained with retrieval: each searches the sample's Q&A"
    )
    args = ap.parse_args()
    modes = [m.strip() for m in args.quantize.split(",") if m.strip()]
    base = resolve_base(None)
    home = Path(tempfile.mkdtemp(prefix="lp-gateway-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        names = pool.submit(make_adapters, base, "team", "all-linear", args.knowledge).result()
    con = db.connect()
    _, token = keys.create(con, "load", models=("team*",))
    memory = {mode: load_one(home, names, token, mode, args) for mode in modes}
    adapters = "trained with retrieval (each searches 20 Q&A)" if args.knowledge else "random, no knowledge"
    print(f"\n{cpu()}\nadapters: {adapters}\n")
    if len(modes) > 1:
        print("| --quantize | RSS after warm-up | after the last run | vs none | peak under load | vs none |")
        print("|---|---|---|---|---|---|")
        for mode, (mem0, last, peak) in memory.items():
            vs = f"{last / memory['none'][1]:.0%}" if "none" in memory else "-"
            vs_peak = f"{peak / memory['none'][2]:.0%}" if "none" in memory else "-"
            print(f"| {mode} | {mem0:.0f} MB | {last:.0f} MB | {vs} | {peak:.0f} MB | {vs_peak} |")


def load_one(
    home: Path, names: list[str], token: str, mode: str, args: argparse.Namespace
) -> tuple[float, float, float]:
    """One server with `--quantize mode` under the load; prints its tables, returns its RSS (MB)
    at rest after warm-up and after the last run, and its peak."""
    server = ServerProcess(home, names, ["--max-queue", str(args.max_queue), "--quantize", mode])
    questions = HELD_OUT if args.knowledge else (QUESTION,)
    log = sqlite3.connect(home / "server.db")
    first_row = log.execute("SELECT COALESCE(MAX(rowid), 0) FROM requests").fetchone()[0]  # earlier modes' rows
    try:
        # warm-up: adapters loaded, caches grown
        warm = asyncio.run(load(server.url, token, names, 8, 10, questions))["sent"]
        time.sleep(REST_S)
        mem0 = rss_mb(server.proc.pid)
        tallies = []
        mems = []
        for _ in range(args.runs):
            tallies.append(asyncio.run(load(server.url, token, names, args.clients, args.seconds, questions)))
            time.sleep(REST_S)
            mems.append(rss_mb(server.proc.pid))
        peak = rss_mb(server.proc.pid, "VmHWM")
    finally:
        server.stop()  # SIGTERM: drains, then the log writer flushes its last rows
    rows = collections.Counter(
        f"{status}" for (status,) in log.execute("SELECT status FROM requests WHERE rowid > ?", (first_row,))
    )
    sent = sum(t["sent"] for t in tallies)
    total = sum(tallies, collections.Counter())
    print(
        f"\n--quantize {mode}: {args.clients} clients x {args.seconds:.0f} s, {args.runs} runs; "
        f"max batch 16, max queue {args.max_queue}\n"
    )
    print("| answer | count |\n|---|---|")
    for k, v in sorted(total.items()):
        if k != "sent":
            print(f"| {k} | {v} |")
    bad = {k: v for k, v in total.items() if k.split()[-1].startswith("5") and not k.endswith("503")}
    print(f"\nrequests sent (warm-up included): {sent + warm}; request-log rows: {sum(rows.values())}")
    print(f"log rows by status: {dict(sorted(rows.items()))}")
    print(f"5xx other than 503: {sum(bad.values())} {bad or ''}")
    after = ", ".join(f"run {i + 1} {m:.0f} MB" for i, m in enumerate(mems))
    print(
        f"server RSS at rest: after warm-up {mem0:.0f} MB, {after} (last - first run: {mems[-1] - mems[0]:+.0f} MB); "
        f"peak {peak:.0f} MB"
    )
    return mem0, mems[-1], peak


if __name__ == "__main__":
    main()
