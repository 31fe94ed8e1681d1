"""Many tenants on one `loraplex serve` for minutes: does anything leak, get lost or cross over?

    python bench/soak.py [--minutes 10] [--clients 32]

`loraplex serve` on the embedded SmolLM2 (its own process, as users run it, 8 adapter slots) with
12 random rank-16 adapters, a0-a7 and b0-b3, and two keys, team-a (`a*`) and team-b (`b*`).
32 clients, half on each key, send for `--minutes` a mix of:

    valid       a chat to one of the key's adapters, streamed or not, 16 tokens        (50%)
    malformed   bad JSON, a wrong type, a lone UTF-16 surrogate, a chunked 9 MB body    (15%)
    abandoned   a 200-token answer the client stops reading after 0.2 s                 (10%)
    long        a prompt of ~1,500 tokens, 8 tokens back                                (10%)
    tiny top_p  top_p 5e-324 at temperature 1 (once a 500 for the whole batch)          (10%)
    foreign     the other team's adapter (must be a 404, as a missing one)               (5%)

and counts: valid requests that did not get 200 (a failure one tenant caused another), 5xx of any
kind, request-log rows against completion requests sent (every one leaves a row, also refused
and abandoned ones), and the server's RSS every 5 s (flat after the first quarter = no leak).
Prints the CPU (lscpu model and flags) and one table; --json writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from generalization import cpu  # noqa: E402
from serve_throughput import ServerProcess, make_adapters  # noqa: E402

KINDS = {"valid": 50, "malformed": 15, "abandoned": 10, "long": 10, "tiny_top_p": 10, "foreign": 5}
LONG = "Please summarise our travel policy in detail. " * 170  # ~1,500 tokens
QUESTIONS = ["How many days of leave do I get?", "Who approves expense claims?", "明澜科技的年假有多少天？"]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def client(
    i: int, url: str, key: str, mine: list[str], theirs: list[str], until: float, out: collections.Counter
) -> None:
    rng = random.Random(i)
    auth = {"Authorization": f"Bearer {key}"}
    chat = f"{url}/v1/chat/completions"
    kinds, weights = list(KINDS), list(KINDS.values())
    async with httpx.AsyncClient(timeout=120, headers=auth) as http:
        while time.time() < until:
            kind = rng.choices(kinds, weights)[0]
            msgs = [{"role": "user", "content": rng.choice(QUESTIONS)}]
            body: dict[str, Any] = {"model": rng.choice(mine), "messages": msgs, "max_tokens": 16}
            out[f"{kind} sent"] += 1
            try:
                if kind == "valid":
                    if rng.random() < 0.5:
                        async with http.stream("POST", chat, json={**body, "stream": True}) as r:
                            text = "".join([line async for line in r.aiter_lines()])
                            ok = r.status_code == 200 and "[DONE]" in text and '"error"' not in text
                    else:
                        r = await http.post(chat, json=body)
                        ok = r.status_code == 200
                    out["valid ok" if ok else "valid FAILED"] += 1
                    continue
                if kind == "malformed":
                    choice = rng.randrange(4)
                    if choice == 0:
                        r = await http.post(
                            chat, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}
                        )
                    elif choice == 1:
                        r = await http.post(chat, json={**body, "messages": "hi"})
                    elif choice == 2:
                        lone = {**body, "messages": [{"role": "user", "content": "LONE"}]}
                        raw = json.dumps(lone).replace("LONE", "\\ud800 hi")  # a JSON encoder would refuse it
                        r = await http.post(chat, content=raw.encode(), headers={"content-type": "application/json"})
                    else:

                        async def big() -> Any:
                            for _ in range(9):
                                yield b"a" * (1 << 20)

                        r = await http.post(chat, content=big(), headers={"content-type": "application/json"})
                    expected = r.status_code in (400, 413)
                elif kind == "abandoned":
                    try:
                        await http.post(
                            chat,
                            json={**body, "max_tokens": 200, "ignore_eos": True},
                            timeout=httpx.Timeout(30, read=0.2),
                        )
                    except httpx.ReadTimeout:
                        out["abandoned left"] += 1
                    continue
                elif kind == "long":
                    r = await http.post(
                        chat, json={**body, "messages": [{"role": "user", "content": LONG}], "max_tokens": 8}
                    )
                    expected = r.status_code == 200
                elif kind == "tiny_top_p":
                    r = await http.post(chat, json={**body, "top_p": 5e-324, "temperature": 1})
                    expected = r.status_code == 200
                else:
                    r = await http.post(chat, json={**body, "model": rng.choice(theirs)})
                    expected = r.status_code == 404
                out[f"{kind} {'as expected' if expected else 'UNEXPECTED ' + str(r.status_code)}"] += 1
                if r.status_code >= 500:
                    out["5xx"] += 1
            except httpx.HTTPError as e:
                out[f"{kind} transport error {type(e).__name__}"] += 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from loraplex.adapters import registry
    from loraplex.gateway import keys
    from loraplex.models.load import resolve_base

    home = Path(tempfile.mkdtemp(prefix="loraplex-soak-"))
    os.environ["LORAPLEX_HOME"] = str(home)
    base = resolve_base(None)
    team_a = make_adapters(base, "a", "all-linear")
    team_b = [n.replace("a", "b", 1) for n in team_a[:4]]
    for old, new in zip(team_a, team_b, strict=False):  # four more, for team b
        ref = registry.resolve(old)
        registry.register(new, ref.path, ref.manifest())
    from loraplex.gateway import db

    con = db.connect()
    key_a = keys.create(con, "team-a", ("a*",))[1]
    key_b = keys.create(con, "team-b", ("b*",))[1]
    srv = ServerProcess(home, [], ["--max-batch", "16", "--max-loaded-adapters", "8"])
    out: collections.Counter = collections.Counter()
    samples: list[tuple[float, int]] = []
    t0 = time.time()
    until = t0 + args.minutes * 60

    async def run() -> None:
        async def watch() -> None:
            while time.time() < until:
                samples.append((time.time() - t0, rss(srv.proc.pid)))
                await asyncio.sleep(5)

        half = args.clients // 2
        await asyncio.gather(
            watch(),
            *[client(i, srv.url, key_a, team_a, team_b, until, out) for i in range(half)],
            *[client(half + i, srv.url, key_b, team_b, team_a, until, out) for i in range(args.clients - half)],
        )

    asyncio.run(run())
    alive = httpx.get(f"{srv.url}/health", timeout=30).status_code == 200
    srv.stop()  # SIGTERM: the request log is flushed on the way out
    with sqlite3.connect(home / "server.db") as con:
        rows = con.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        by_status = dict(con.execute("SELECT status, COUNT(*) FROM requests GROUP BY status").fetchall())
    sent = sum(v for k, v in out.items() if k.endswith(" sent"))
    after = [b for t, b in samples if t >= args.minutes * 60 / 4]
    print(cpu())
    print(f"\n{args.clients} clients, {args.minutes:g} min, SmolLM2-135M + 12 rank-16 adapters, two keys\n")
    print("| figure | value |\n|---|---|")
    for k in sorted(out):
        print(f"| {k} | {out[k]} |")
    print(f"| requests sent (completion routes) | {sent} |")
    print(f"| request-log rows | {rows} ({', '.join(f'{s}: {n}' for s, n in sorted(by_status.items()))}) |")
    print(f"| lost log rows | {sent - rows} |")
    print(f"| cross-tenant failures (valid requests not 200) | {out['valid FAILED']} |")
    print(f"| 5xx | {out['5xx']} |")
    if after:
        print(
            f"| RSS after warm-up (first quarter): min / median / max | {min(after) / 2**20:.0f} / "
            f"{statistics.median(after) / 2**20:.0f} / {max(after) / 2**20:.0f} MiB |"
        )
        print(f"| RSS: last sample vs first after warm-up | {after[-1] / after[0]:.3f}x |")
    print(f"| /health afterwards | {'200' if alive else 'FAILED'} |")
    if args.json:
        args.json.write_text(json.dumps({"counts": out, "sent": sent, "rows": rows, "rss": samples}, indent=2))


if __name__ == "__main__":
    main()
