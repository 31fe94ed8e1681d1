"""Training started from the web page: each job is a `loraplex train` process, then a
`loraplex eval --report` of what it registered, run in the background and tracked in server.db.

The job's files live in `$LORAPLEX_HOME/jobs/<id>/` (the uploaded data, config.yaml, the log,
the eval report); progress is read from the training run's own metrics.jsonl, so the page can be
closed and reopened at any time. A server restart marks jobs whose process is gone as
`interrupted`; starting the same job again resumes from its last checkpoint (the run directory
is keyed by config + data, see train/sft_lora.py). This module does not train: it launches the
CLI, which is exactly what a user would run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from loraplex.api.schemas import JsonFloat, JsonInt, MaybeFloat
from loraplex.config import default_epochs
from loraplex.data.formats import parse_file
from loraplex.errors import Unprocessable, UserError
from loraplex.gateway.db import Database
from loraplex.paths import NAME_PATTERN, check_name, home
from loraplex.threads import ENV as THREADS_ENV
from loraplex.threads import cores

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt")
JOB_ID = r"^[0-9a-f]{32}$"  # uuid4().hex


def _job_dir(job_id: str) -> Path:
    if not re.fullmatch(JOB_ID[1:-1], job_id):  # fullmatch: '$' would let a trailing newline in
        raise UserError(f"invalid job id {job_id!r}")
    return home() / "jobs" / job_id


class TrainSettings(BaseModel):
    """What the training form sends, checked here once (the config's own limits, as a schema)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, json_schema_extra={"pattern": NAME_PATTERN})  # check_name enforces it
    base: str | None = Field(None, max_length=4096, description="an embedded id, a model directory or a .gguf file")
    description: str = Field("", max_length=2000)
    epochs: MaybeFloat = Field(None, gt=0, le=1000, description="unset: the recipe's default")
    learning_rate: JsonFloat = Field(1e-3, gt=0, le=1)
    rank: JsonInt = Field(16, ge=1, le=1024)
    eval_ratio: JsonFloat = Field(0.1, ge=0, lt=1)
    max_seq_length: JsonInt = Field(1024, ge=16, le=131072)
    batch_size: JsonInt = Field(4, ge=1, le=1024)


def decode_upload(filename: str, content_b64: str) -> tuple[str, bytes]:
    """A safe file name (only its extension is kept from the user's) and the bytes."""
    ext = "." + filename.rsplit(".", 1)[1].lower() if "." in filename else ""  # ".jsonl" too
    if ext not in EXTENSIONS:
        raise UserError(f"{filename!r}: upload a data file ending in {', '.join(EXTENSIONS)}")
    try:
        raw = base64.b64decode(content_b64, validate=True)
    except (binascii.Error, ValueError):
        raise UserError("content_b64 is not valid base64") from None
    if not raw.strip():
        raise Unprocessable(f"{filename!r} is empty")
    return f"data{ext}", raw


def validate(path: Path, shown_as: str) -> dict[str, Any]:
    """Records, detected format and every per-record error (sources shown with the upload's name).
    A file that cannot be read at all (not UTF-8, not one format) is an Unprocessable upload."""
    try:
        result = parse_file(path)
    except UserError as e:
        raise Unprocessable(str(e).replace(str(path), shown_as)) from None
    errors = [
        {"source": e.source.replace(str(path), shown_as), "reason": e.reason, "field": e.field} for e in result.errors
    ]
    return {"records": len(result.conversations), "format": result.format, "errors": errors}


class Jobs:
    def __init__(self, db: Database, default_base: str, serving_threads: int = 0):
        self.db = db
        self.default_base = default_base  # the served base: what a new version must fit
        # A job trains on the cores the engine does not use, at a lower priority, so that answering
        # stays fast while it runs (bench/contention.py: TTFT and the job's speed, side by side).
        self.job_threads = max(1, cores() - serving_threads)
        # Only this host's jobs: with a shared database, another host's pids mean nothing here.
        running = db.all(
            "SELECT id, pid FROM jobs WHERE status IN ('queued', 'training', 'evaluating')"
            " AND (host IS NULL OR host = :host)",
            {"host": socket.gethostname()},
        )
        for row in running:
            if not _alive(row["pid"]):
                self._set(row["id"], status="interrupted", error="the server stopped while this job ran")

    def _set(self, job_id: str, **fields: Any) -> None:
        cols = ", ".join(f"{k} = :{k}" for k in fields)  # keys are this module's own column names
        self.db.run(f"UPDATE jobs SET {cols} WHERE id = :job_id", {**fields, "job_id": job_id})

    def check_upload(self, filename: str, content_b64: str) -> dict[str, Any]:
        """Validate an upload without starting anything (the page shows the errors per record)."""
        name, raw = decode_upload(filename, content_b64)
        scratch = home() / "jobs" / "uploads"
        scratch.mkdir(parents=True, exist_ok=True)
        path = scratch / f"{uuid.uuid4().hex}-{name}"
        try:
            path.write_bytes(raw)
            return validate(path, filename)
        finally:
            path.unlink(missing_ok=True)

    def start(self, key: str, filename: str, content_b64: str, settings: TrainSettings) -> dict[str, Any]:
        from loraplex.config import load_config
        from loraplex.files import sha256_file
        from loraplex.models.load import resolve_base
        from loraplex.train.data import run_dir_of

        name = check_name(settings.name)
        base = resolve_base(settings.base or self.default_base)  # before anything is written
        data_name, raw = decode_upload(filename, content_b64)
        job_id = uuid.uuid4().hex
        d = _job_dir(job_id)
        d.mkdir(parents=True)
        data = d / data_name
        data.write_bytes(raw)
        checked = validate(data, filename)
        if checked["errors"]:
            listed = "; ".join(f"{e['source']}: {e['reason']}" for e in checked["errors"][:10])
            raise Unprocessable(f"{len(checked['errors'])} invalid record(s), nothing started: {listed}")
        cfg = load_config(
            extra={
                "name": name,
                "base": settings.base or self.default_base,
                "description": settings.description,
                "data": {
                    "path": str(data),
                    "eval_ratio": settings.eval_ratio,
                    "max_seq_length": settings.max_seq_length,
                },
                "lora": {"rank": settings.rank},  # alpha follows (2 x rank), as `loraplex train --rank`
                # epochs unset: the recipe's default (16, or 4 with retrieval), as `loraplex train`
                "train": {
                    "epochs": settings.epochs,
                    "learning_rate": settings.learning_rate,
                    "batch_size": settings.batch_size,
                },
            }
        )
        run_dir = run_dir_of(cfg, sha256_file(data), base)
        (d / "config.yaml").write_text(
            f"# loraplex train {d / 'config.yaml'}\n" + yaml.safe_dump(cfg.model_dump(mode="json"), allow_unicode=True)
        )
        self.db.run(
            "INSERT INTO jobs (id, key, name, status, config, run_dir, created, host)"
            " VALUES (:id, :key, :name, 'queued', :config, :run_dir, :created, :host)",
            {
                "id": job_id,
                "key": key,
                "name": name,
                "config": json.dumps(cfg.model_dump(mode="json")),
                "run_dir": str(run_dir),
                "created": time.time(),
                "host": socket.gethostname(),
            },
        )
        threading.Thread(target=self._work, args=(job_id, name), daemon=True, name=f"job-{job_id[:8]}").start()
        return self.get(job_id)

    def _work(self, job_id: str, name: str) -> None:
        d = _job_dir(job_id)
        # Wide lines: rich wraps at 80 columns when not on a terminal, which would split the
        # "N steps," and "-> name@vN" lines this module reads back.
        env = {**os.environ, "LORAPLEX_HOME": str(home()), "COLUMNS": "400", THREADS_ENV: str(self.job_threads)}
        nice = ["nice", "-n", "10"] if shutil.which("nice") else []
        with open(d / "train.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [*nice, sys.executable, "-m", "loraplex.cli", "train", str(d / "config.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C to the server does not kill the training
            )
            self._set(job_id, status="training", pid=proc.pid)
            code = proc.wait()
        text = (d / "train.log").read_text(encoding="utf-8", errors="replace")
        found = re.findall(r"-> (\S+@v\d+)", text)
        if code != 0 or not found:
            error = text.strip().splitlines()[-1] if text.strip() else f"exit code {code}"
            self._set(job_id, status="failed", error=error[-500:], finished=time.time())
            return
        adapter = found[-1]
        self._set(job_id, status="evaluating", adapter=adapter)
        with open(d / "eval.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [
                    *nice,
                    sys.executable,
                    "-m",
                    "loraplex.cli",
                    "eval",
                    "--adapter",
                    adapter,
                    "--report",
                    str(d / "report"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            self._set(job_id, pid=proc.pid)
            code = proc.wait()
        # A failed eval (no held-out split, say) does not undo a finished training: it is noted.
        note = None if code == 0 else (d / "eval.log").read_text(encoding="utf-8", errors="replace")[-300:]
        self._set(job_id, status="done", finished=time.time(), error=note)

    def list(self, key: str | None) -> list[dict[str, Any]]:
        where, args = ("WHERE key = :key", {"key": key}) if key is not None else ("", {})
        rows = self.db.all(f"SELECT id FROM jobs {where} ORDER BY created DESC LIMIT 50", args)
        return [self.get(r["id"]) for r in rows]

    def get(self, job_id: str) -> dict[str, Any]:
        row = self.db.one("SELECT * FROM jobs WHERE id = :id", {"id": job_id})
        if row is None:
            raise KeyError(job_id)
        job = {k: v for k, v in dict(row).items() if k not in ("config", "pid", "host")}
        cfg = json.loads(row["config"])
        retrieval = cfg.get("retrieval", {})
        job["settings"] = {
            "epochs": cfg["train"]["epochs"]
            or default_epochs(retrieval.get("enabled", True), retrieval.get("noisy_copies", 0)),
            "learning_rate": cfg["train"]["learning_rate"],
            "rank": cfg["lora"]["rank"],
            "base": cfg["base"],
        }
        points, evals, total = [], [], None
        metrics = Path(row["run_dir"]) / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # the line being written right now
                if "loss" in rec:
                    points.append([rec["step"], rec["loss"]])
                if "eval_loss" in rec:
                    evals.append([rec["step"], rec["eval_loss"]])
        log = _job_dir(job_id) / "train.log"
        if log.is_file():
            m = re.search(r"(\d+) steps,", log.read_text(encoding="utf-8", errors="replace"))
            total = int(m.group(1)) if m else None
        job.update(
            loss=points,
            eval_loss=evals,
            step=points[-1][0] if points else 0,
            total_steps=total,
            report=(_job_dir(job_id) / "report" / "index.html").is_file(),
        )
        return job

    def report(self, job_id: str) -> Path:
        path = _job_dir(job_id) / "report" / "index.html"
        if not path.is_file():
            raise KeyError(job_id)
        return path


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
