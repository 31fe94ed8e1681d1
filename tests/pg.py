"""A real PostgreSQL server for tests: Debian's `postgresql` package, a throw-away cluster in a
temporary directory, on a free loopback port (`.ci/run` installs the package)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise FileNotFoundError("PostgreSQL is not installed: apt-get install postgresql (the tests start their own)")


def start_or_skip() -> PostgresServer:
    """A running server, or the test is skipped saying what to install (as the browser tests do)."""
    import pytest

    try:
        return PostgresServer()
    except FileNotFoundError as e:
        pytest.skip(str(e))


class PostgresServer:
    def __init__(self) -> None:
        self.bin = _bindir()
        # Not under pytest's tmp_path: its parents are root's own (0700), which `postgres` cannot enter.
        self.root = root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.data = root / "data"
        # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user.
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(root, "postgres")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "loraplex", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args], capture_output=True, text=True, cwd=self.root
        )
        if done.returncode != 0:
            log = self.root / "log"
            raise RuntimeError(f"{tool} failed: {done.stderr}{log.read_text() if log.exists() else ''}")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://loraplex@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url(name)
