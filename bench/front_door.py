"""What the `serve --engine vllm` front door costs: the same requests straight to the engine vs. through it.

    python bench/front_door.py [--tokens 64] [--clients 8] [--reps 3] [--json out.json]

No GPU and no vLLM here, so the engine is a second `loraplex serve` process (SmolLM2-135M, the
default base, 8 random rank-16 adapters), which speaks the same token-id /v1/completions and
runtime LoRA API the front door uses with vLLM. The front door is `loraplex serve --engine vllm
--engine-url ENGINE` in its own process, as a user runs it. Both paths get the same streamed,
greedy requests (`ignore_eos`, exactly --tokens tokens, one adapter per client), alternated --reps
times so drift hits both alike; each row is its median run. Rows:

  1. one client at a time: time to first token p50 and the time it adds;
  2. --clients clients at once on --clients adapters: tokens/s and the ratio door / direct.

On this 2-core machine the front door and the engine share the CPU (with vLLM it would run on
the host's CPU while the GPU computes), so the added time is an upper bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from loraplex.data.formats import parse_file  # noqa: E402
from loraplex.models.load import resolve_base  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402
from serve_throughput import N_ADAPTERS, Clients, ServerProcess, make_adapters  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, default=N_ADAPTERS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = resolve_base(None)
    home = Path(tempfile.mkdtemp(prefix="lp-door-bench-"))
    (home / "models").symlink_to(base.path.parent)
    os.environ["LORAPLEX_HOME"] = str(home)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        names = pool.submit(make_adapters, base, "door", "all-linear").result()
    prompts = [
        [m["content"] for m in c.messages if m["role"] == "user"][-1] for c in parse_file(TRAIN_FILE).conversations
    ]
    engine = ServerProcess(home, names)
    door_home = Path(tempfile.mkdtemp(prefix="lp-door-front-"))
    (door_home / "models").symlink_to(base.path.parent)
    (door_home / "adapters").symlink_to(home / "adapters")
    door = ServerProcess(door_home, names, ["--engine", "vllm", "--engine-url", f"{engine.url}/v1", "--no-auth"])
    direct, front = Clients(engine.url, prompts, args.tokens), Clients(door.url, prompts, args.tokens)
    models = [names[i % len(names)] for i in range(args.clients)]

    async def run() -> dict[str, Any]:
        await direct.sequential(models[:2])  # warm: adapters loaded on both paths, connections open
        await front.sequential(models[:2])
        seq: dict[str, list[dict[str, Any]]] = {"direct": [], "door": []}
        conc: dict[str, list[dict[str, Any]]] = {"direct": [], "door": []}
        for _ in range(args.reps):
            seq["direct"].append(await direct.sequential(models))
            seq["door"].append(await front.sequential(models))
            conc["direct"].append(await direct.concurrent(models))
            conc["door"].append(await front.concurrent(models))
        return {"sequential": seq, "concurrent": conc}

    try:
        res = asyncio.run(run())
    finally:
        door.stop()
        engine.stop()

    def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
        return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]

    ttft = {k: statistics.median(t for r in v for t in r["ttft"]) * 1e3 for k, v in res["sequential"].items()}
    tps = {k: median_run(v)["tokens_per_s"] for k, v in res["concurrent"].items()}
    rows = [
        ("1 client: TTFT p50, direct", f"{ttft['direct']:.1f} ms"),
        ("1 client: TTFT p50, through the front door", f"{ttft['door']:.1f} ms"),
        ("time the front door adds to the first token", f"{ttft['door'] - ttft['direct']:+.1f} ms"),
        (f"{args.clients} clients: tokens/s, direct", f"{tps['direct']:.1f}"),
        (f"{args.clients} clients: tokens/s, through the front door", f"{tps['door']:.1f}"),
        ("throughput ratio door / direct", f"{tps['door'] / tps['direct']:.3f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nfront door vs engine ({args.tokens} tokens per request, median of {args.reps})")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps({"ttft_ms": ttft, "tokens_per_s": tps}, indent=2))


if __name__ == "__main__":
    main()
