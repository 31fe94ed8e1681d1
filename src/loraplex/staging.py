"""Temporary files and directories that become store entries by one rename, and the cleanup of
those a killed process left behind.

Everything that writes into the adapter store or an export directory writes under a staging name
first and renames it into place when it is complete, so a kill never leaves a half-written entry
under a real name. What a kill does leave is the staging entry itself. Its name carries the host
and process that made it (`.tmp-HOST-PID-LABEL-xxxx`), so a later command removes exactly those
whose process is gone, and never one that another process on this host, or another host sharing
the directory, is still writing.

This module does not decide what is complete or repair indexes; `adapters.registry.sync` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_NAME = re.compile(r"^\.tmp-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<label>[a-z]+)-")


def _prefix(label: str) -> str:
    return f".tmp-{_HOST}-{os.getpid()}-{label}-"


def new_dir(parent: Path, label: str) -> Path:
    """An empty staging directory in `parent` (same file system, so the final rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=_prefix(label), dir=parent))


def new_file(parent: Path, label: str, suffix: str = "") -> tuple[int, Path]:
    """An open staging file in `parent`: (fd, path)."""
    fd, path = tempfile.mkstemp(prefix=_prefix(label), suffix=suffix, dir=parent)
    return fd, Path(path)


def _gone(pid: int) -> bool:
    """Whether process `pid` of this host has ended (a zombie has: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def clear_leftovers(parent: Path) -> list[str]:
    """Remove the staging entries in `parent` whose process on this host has ended, and say so in a
    warning each. Returns the messages."""
    said: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return said
    for e in entries:
        m = _NAME.match(e.name)
        if not m or m["host"] != _HOST or not _gone(int(m["pid"])):
            continue
        if e.is_dir(follow_symlinks=False):
            shutil.rmtree(e.path, ignore_errors=True)
        else:
            Path(e.path).unlink(missing_ok=True)
        said.append(
            f"removed {e.path}: an unfinished {m['label']} left by process {m['pid']}, which ended before "
            "finishing it (killed or crashed); it was never in use"
        )
        log.warning(said[-1])
    return said
