"""The local adapter store: `$LORAPLEX_HOME/adapters/NAME/vN/` in PEFT format plus a manifest.

A version directory is written under a temporary name and renamed into place, so the store only
ever holds complete adapters; version numbers are allocated under a file lock, so two trainings
finishing at once never reuse one. Versions are immutable once written.

This module does not train or load models; aliases, tags and export come with the registry issue.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.errors import UserError
from loraplex.paths import check_name, home

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")


@dataclass(frozen=True)
class AdapterRef:
    """An immutable handle on one stored adapter version."""

    name: str
    version: int
    path: Path

    @property
    def id(self) -> str:
        return f"{self.name}@v{self.version}"

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.path / MANIFEST).read_text(encoding="utf-8")))


def store_root() -> Path:
    return home() / "adapters"


@contextmanager
def _locked() -> Iterator[None]:
    root = store_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def versions(name: str) -> list[int]:
    d = store_root() / check_name(name)
    if not d.is_dir():
        return []
    out = []
    for child in d.iterdir():
        m = _VERSION_RE.match(child.name)
        if m and (child / MANIFEST).is_file():
            out.append(int(m.group(1)))
    return sorted(out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register(name: str, adapter_dir: Path, manifest: dict[str, Any]) -> AdapterRef:
    """Copy a PEFT adapter directory into the store as the next version of `name`."""
    check_name(name)
    for required in (WEIGHTS, CONFIG):
        if not (adapter_dir / required).is_file():
            raise UserError(f"{adapter_dir} is not a PEFT adapter directory (no {required})")
    root = store_root() / name
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for f in (WEIGHTS, CONFIG):
            shutil.copy2(adapter_dir / f, tmp / f)
        files = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in (WEIGHTS, CONFIG)}
        with _locked():
            version = (versions(name) or [0])[-1] + 1
            full = {**manifest, "name": name, "version": version, "id": f"{name}@v{version}", "files": files}
            with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
                json.dump(full, f, indent=2, ensure_ascii=False)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, root / f"v{version}")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write adapter {name} to {root}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AdapterRef(name, version, root / f"v{version}")


def resolve(ref: str) -> AdapterRef:
    """`NAME` (latest version) or `NAME@vN` -> AdapterRef; a clear error when it does not exist."""
    name, _, ver = ref.partition("@")
    check_name(name)
    available = versions(name)
    if not available:
        known = ", ".join(n for n, _ in list_names()) or "none yet"
        raise UserError(f"no adapter named {name!r} in {store_root()} (adapters: {known})")
    if not ver:
        version = available[-1]
    else:
        m = _VERSION_RE.match(ver)
        if not m:
            raise UserError(f"invalid version {ver!r} in {ref!r}; use NAME@vN, e.g. {name}@v{available[-1]}")
        version = int(m.group(1))
        if version not in available:
            raise UserError(f"{name} has no version v{version}; versions: {', '.join(f'v{v}' for v in available)}")
    return AdapterRef(name, version, store_root() / name / f"v{version}")


def list_names() -> list[tuple[str, list[int]]]:
    root = store_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            vs = versions(d.name)
            if vs:
                out.append((d.name, vs))
    return out


def verify(ref: AdapterRef) -> None:
    """Refuse a tampered or truncated adapter: every file must match the manifest's sha256."""
    manifest = ref.manifest()
    for fname, info in manifest.get("files", {}).items():
        path = ref.path / fname
        if not path.is_file() or sha256_file(path) != info["sha256"]:
            raise UserError(f"adapter {ref.id}: {fname} does not match its manifest checksum (tampered or truncated)")
