"""Training and serving when the CPU is shared: next to a busy process, and a web-app training job
next to the server answering chats.

    python bench/contention.py [--steps 48] [--epochs 2] [--requests 30]

A. `loraplex train` (the default config, the shipped sample, --steps optimizer steps) as a user
   runs it, one process at a time:
     alone, threads measured (the default)     alone, all cores fixed (torch's default, as
     next to one busy process, measured         TRL / transformers.Trainer run)
     next to one busy process, all cores fixed  next to one busy process, one core fewer fixed
   The busy process is one pure-Python loop (a browser tab, a build, another notebook).
   Target: next to it, the default keeps >= 40% of its tokens/s alone.
B. `loraplex serve` with its web app; one client asks a short question every 0.2 s (streamed,
   greedy, 8 tokens) and time to first token is measured:
     idle server;  while a training job started from the web app's admin API trains.
   Then the same job again with no client; the job's config as a job ran before (`loraplex train`
   on all cores at normal priority) next to the same client; and `loraplex train` alone.
   Targets: TTFT p50 during the job <= 2x idle; the job keeps >= 40% of `loraplex train` alone.

Prints the CPU (lscpu model and flags), the rows, and the ratios; --json writes them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from assistant_ttft import ttft  # noqa: E402
from generalization import cpu  # noqa: E402
from loraplex.quickstart import TRAIN_FILE  # noqa: E402
from loraplex.threads import cores  # noqa: E402
from serve_throughput import ServerProcess  # noqa: E402

BUSY = "while True: pass"
QUESTIONS = ["How many days of leave do I get?", "Who approves expense claims?", "When does the office open?"]


def tok_s(log: str) -> float:
    """The closing line's tokens/s of a `loraplex train` log."""
    found = re.findall(r"([\d,]+) tok/s", log)
    if not found:
        raise RuntimeError(f"no tok/s in the training log:\n{log[-2000:]}")
    return float(found[-1].replace(",", ""))


def train(config: Path, home: Path, busy: bool) -> dict[str, Any]:
    """One `loraplex train CONFIG` run, optionally next to a busy process; its tokens/s and threads."""
    spin = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
    try:
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-m", "loraplex.cli", "train", str(config)],
            env={**os.environ, "LORAPLEX_HOME": str(home), "COLUMNS": "400"},
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
    finally:
        if spin is not None:
            spin.kill()
            spin.wait()
    if r.returncode != 0:
        raise RuntimeError(f"loraplex train failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out = r.stdout + r.stderr
    line = [x for x in out.splitlines() if "tok/s" in x][-1]
    return {"tokens_per_s": tok_s(out), "wall_s": wall, "threads": line.split(" on ", 1)[-1].split(", peak")[0]}


def config(path: Path, name: str, steps: int, threads: int | None) -> Path:
    cfg: dict[str, Any] = {"name": name, "data": {"path": str(TRAIN_FILE)}, "train": {"max_steps": steps}}
    if threads:
        cfg["train"]["threads"] = threads
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_job(url: str, name: str, epochs: float) -> str:
    body = {
        "filename": TRAIN_FILE.name,
        "content_b64": base64.b64encode(TRAIN_FILE.read_bytes()).decode(),
        "settings": {"name": name, "epochs": epochs},
    }
    r = httpx.post(url + "/ui/api/admin/train/jobs", json=body, timeout=120)
    r.raise_for_status()
    return str(r.json()["id"])


def job_status(url: str, job_id: str) -> str:
    return str(httpx.get(f"{url}/ui/api/admin/train/jobs/{job_id}", timeout=30).json()["status"])


def wait_job(url: str, job_id: str, home: Path) -> dict[str, Any]:
    while job_status(url, job_id) in ("queued", "training", "evaluating"):
        time.sleep(1)
    log = (home / "jobs" / job_id / "train.log").read_text(encoding="utf-8")
    return {"tokens_per_s": tok_s(log), "status": job_status(url, job_id)}


def chats(url: str, model: str, stop: threading.Event, limit: int) -> list[float]:
    """TTFT of one client's questions, one every 0.2 s, until `stop` or `limit` questions."""
    out: list[float] = []
    while not stop.is_set() and len(out) < limit:
        q = QUESTIONS[len(out) % len(QUESTIONS)]
        out.append(ttft(url, model, [{"role": "user", "content": q}])["ttft"])
        time.sleep(0.2)
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps of each `loraplex train` in part A")
    ap.add_argument("--epochs", type=float, default=2, help="epochs of each web-app job in part B")
    ap.add_argument("--requests", type=int, default=30, help="questions for the idle TTFT")
    ap.add_argument("--parts", default="A,B")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="lp-contention-"))
    tmp = Path(tempfile.mkdtemp(prefix="lp-contention-cfg-"))
    n = cores()
    rows: dict[str, Any] = {"cpu": cpu(), "cores": n}
    print(f"CPU: {rows['cpu']}\n")

    if "A" in args.parts:
        runs = {
            "alone, threads measured (default)": (None, False),
            f"alone, {n} threads fixed": (n, False),
            "next to a busy process, threads measured (default)": (None, True),
            f"next to a busy process, {n} threads fixed": (n, True),
            f"next to a busy process, {max(1, n - 1)} threads fixed": (max(1, n - 1), True),
        }
        a: dict[str, Any] = {}
        for i, (label, (threads, busy)) in enumerate(runs.items()):
            a[label] = train(config(tmp / f"a{i}.yaml", f"a{i}", args.steps, threads), home, busy)
            print(f"  {label}: {a[label]['tokens_per_s']:.0f} tok/s ({a[label]['threads']})", flush=True)
        solo = a["alone, threads measured (default)"]["tokens_per_s"]
        busy_default = a["next to a busy process, threads measured (default)"]["tokens_per_s"]
        rows["train"] = a
        rows["train_busy_over_alone"] = busy_default / solo
        print(f"\nA. loraplex train, {args.steps} steps, shipped sample, default config")
        print("| run | tok/s | threads | vs alone (default) |\n|---|---|---|---|")
        for label, r in a.items():
            print(f"| {label} | {r['tokens_per_s']:.0f} | {r['threads']} | {r['tokens_per_s'] / solo:.2f} |")
        print(
            f"next to a busy process the default keeps {busy_default / solo:.0%} of its speed alone (target >= 40%)\n"
        )

    if "B" in args.parts:
        server = ServerProcess(home, [])
        try:
            model = server.base_id
            ttft(server.url, model, [{"role": "user", "content": "warm up"}])
            idle = chats(server.url, model, threading.Event(), args.requests)
            job = start_job(server.url, "job-traffic", args.epochs)
            while job_status(server.url, job) == "queued":
                time.sleep(0.2)
            stop = threading.Event()
            during: list[float] = []
            client = threading.Thread(target=lambda: during.extend(chats(server.url, model, stop, 10**6)))
            client.start()
            while job_status(server.url, job) == "training":
                time.sleep(0.5)
            stop.set()
            client.join()
            traffic = wait_job(server.url, job, home)
            quiet = wait_job(server.url, start_job(server.url, "job-quiet", args.epochs), home)
            job_cfg = yaml.safe_load(next((home / "jobs").glob("*/config.yaml")).read_text())
            # before: a job was `loraplex train` on all cores at the server's priority
            job_cfg["name"], job_cfg["train"]["threads"] = "cli-all-cores", n
            (tmp / "old.yaml").write_text(yaml.safe_dump(job_cfg))
            stop = threading.Event()
            during_old: list[float] = []
            client = threading.Thread(target=lambda: during_old.extend(chats(server.url, model, stop, 10**6)))
            client.start()
            old = train(tmp / "old.yaml", home, busy=False)
            stop.set()
            client.join()
        finally:
            server.stop()
        job_cfg["name"] = "cli-alone"
        job_cfg["train"].pop("threads")
        (tmp / "cli.yaml").write_text(yaml.safe_dump(job_cfg))
        alone = train(tmp / "cli.yaml", home, busy=False)
        b = {
            "ttft_idle_p50_ms": p50(idle),
            "ttft_during_job_p50_ms": p50(during),
            "requests_during_job": len(during),
            "job_with_traffic_tok_s": traffic["tokens_per_s"],
            "job_quiet_tok_s": quiet["tokens_per_s"],
            "train_alone_tok_s": alone["tokens_per_s"],
            "before_ttft_p50_ms": p50(during_old),
            "before_tok_s": old["tokens_per_s"],
            "train_alone_threads": alone["threads"],
        }
        rows["serve_and_job"] = b
        print(f"B. loraplex serve + a web-app training job ({args.epochs:g} epochs of the shipped sample)")
        print("| measure | value |\n|---|---|")
        print(f"| TTFT p50, idle server ({len(idle)} questions) | {b['ttft_idle_p50_ms']:.0f} ms |")
        print(f"| TTFT p50, while the job trains ({len(during)} questions) | {b['ttft_during_job_p50_ms']:.0f} ms |")
        print(f"| job tok/s, with the client asking | {b['job_with_traffic_tok_s']:.0f} |")
        print(f"| job tok/s, no client | {b['job_quiet_tok_s']:.0f} |")
        print(f"| `loraplex train` alone, same config | {b['train_alone_tok_s']:.0f} ({b['train_alone_threads']}) |")
        print(
            f"| before (a job was `loraplex train` on all {n} cores at normal priority): TTFT p50 "
            f"| {b['before_ttft_p50_ms']:.0f} ms, the job {b['before_tok_s']:.0f} tok/s |"
        )
        ratio = b["ttft_during_job_p50_ms"] / b["ttft_idle_p50_ms"]
        keeps = b["job_with_traffic_tok_s"] / b["train_alone_tok_s"]
        rows["ttft_ratio"], rows["job_over_alone"] = ratio, keeps
        print(f"TTFT p50 during the job: {ratio:.2f}x idle (target <= 2x)")
        print(f"the job keeps {keeps:.0%} of `loraplex train` alone (target >= 40%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
