"""The local adapter store: `$LORAPLEX_HOME/adapters/NAME/vN/` in PEFT format plus a manifest,
with an SQLite index (`adapters/index.db`) of versions, aliases and alias history.

The files are the truth for versions: a version directory is written under a temporary name and
renamed into place, so the store only ever holds complete adapters, and the index is a cache of
their manifests that `sync()` repairs from the directories (a crash between the rename and the
index write loses nothing). `sync()` runs before every registration and import and on every
listing; it also removes what killed processes left half-written, and logs what it repaired.
Aliases (`prod`, `staging`) live only in the index: they are deployment state, not part of an
adapter. With `LORAPLEX_DATABASE_URL` set (front doors on several hosts sharing the store's
directory), the index lives in that PostgreSQL database instead.
Version numbers and index writes happen under one file lock, so two trainings finishing at once
never reuse a version or corrupt the index.

Versions are immutable: weights and adapter config never change after registration (their sha256
is in the manifest and checked on load); only `description` and `owner` can be edited.

This module does not train, load or convert models; export formats live in `loraplex.export`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from loraplex import staging
from loraplex.adapters.names import VERSION_RE, split_ref
from loraplex.database import Database, url_for
from loraplex.errors import Conflict, NotFound, UserError
from loraplex.files import sha256_file
from loraplex.paths import check_name, home

log = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
MANIFEST = "manifest.json"
ADAPTER_FILES = (WEIGHTS, CONFIG)
KNOWLEDGE = "knowledge.jsonl"  # optional: the Q&A a version trained with retrieval answers from (assistants/faq.py)
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
ALIAS_PATTERN = r"^(?!v[1-9][0-9]*$)[a-z][a-z0-9_-]{0,31}$"  # both rules, for the OpenAPI document
DEFAULT_ALIAS = "prod"

# One migration; IF NOT EXISTS because index.db files from before versioned migrations have the tables.
MIGRATIONS = [
    """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, base TEXT, rank INTEGER, bytes INTEGER,
    created_at TEXT, description TEXT, owner TEXT, eval_score REAL,
    PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS alias_history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, alias TEXT NOT NULL,
    version INTEGER NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS promotions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL,
    from_version INTEGER, to_version INTEGER NOT NULL, score REAL, forced INTEGER NOT NULL,
    problems TEXT NOT NULL, by_user TEXT);
"""
]


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


def any_knowledge() -> bool:
    """Whether some version in the store carries the Q&A it answers from (`KNOWLEDGE`)."""
    root = store_root()
    return root.is_dir() and any(root.glob(f"*/v*/{KNOWLEDGE}"))


def check_alias(alias: str) -> str:
    if not _ALIAS_RE.fullmatch(alias) or VERSION_RE.fullmatch(alias):
        raise UserError(
            f"invalid alias {alias!r}: use lowercase letters, digits, '-' or '_', starting with a letter "
            "(e.g. prod, staging), and not of the form vN"
        )
    return alias


@contextmanager
def locked() -> Iterator[None]:
    root = store_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


_open: dict[str, Database] = {}  # by URL, a pool each (tests and tools switch $LORAPLEX_HOME)
_open_lock = threading.Lock()  # request threads resolve adapters concurrently


def _database() -> Database:
    root = store_root()
    url = url_for(root / "index.db")
    with _open_lock:
        if url not in _open:
            root.mkdir(parents=True, exist_ok=True)
            while len(_open) >= 4:
                _open.pop(next(iter(_open))).close()
            try:
                _open[url] = Database(url, MIGRATIONS, "adapter index")
            except exc.DBAPIError as e:
                _raise_if_damaged(e)
                raise
        return _open[url]


def _raise_if_damaged(e: exc.DBAPIError) -> None:
    """Say what to do when `e` means the SQLite index file is not a database."""
    if re.search(r"file is not a database|malformed", str(e.orig)):
        path = store_root() / "index.db"
        raise UserError(f"the adapter index {path} is damaged ({e.orig}); delete it and it is rebuilt") from e


@contextmanager
def _db() -> Iterator[Connection]:
    """One transaction on the index (on SQLite it takes the write lock at its start)."""
    try:
        with _database().transaction() as con:
            yield con
    except exc.DBAPIError as e:
        _raise_if_damaged(e)
        raise


def _q(con: Connection, sql: str, **params: Any) -> Any:  # a Result of plain tuples
    return con.execute(sa.text(sql), params)


def versions(name: str) -> list[int]:
    """Complete versions of `name` on disk (the directories are the truth, not the index)."""
    d = store_root() / check_name(name)
    if not d.is_dir():
        return []
    out = []
    for child in os.scandir(d):
        m = VERSION_RE.fullmatch(child.name)
        if m and os.path.isfile(os.path.join(child.path, MANIFEST)):
            out.append(int(m.group(1)))
    return sorted(out)


_UPSERT_VERSION = (
    "INSERT INTO versions (name, version, base, rank, bytes, created_at, description, owner, eval_score)"
    " VALUES (:name, :version, :base, :rank, :bytes, :created_at, :description, :owner, :eval_score)"
    " ON CONFLICT (name, version) DO UPDATE SET base = excluded.base, rank = excluded.rank,"
    " bytes = excluded.bytes, created_at = excluded.created_at, description = excluded.description,"
    " owner = excluded.owner, eval_score = excluded.eval_score"
)
_SET_ALIAS = (
    "INSERT INTO aliases (name, alias, version) VALUES (:name, :alias, :version)"
    " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _index_row(name: str, version: int, m: dict[str, Any]) -> dict[str, Any]:
    lora = (m.get("config") or {}).get("lora") or {}
    return {
        "name": name,
        "version": version,
        "base": (m.get("base_model") or {}).get("id"),
        "rank": lora.get("rank"),
        "bytes": sum(int(f.get("bytes", 0)) for f in (m.get("files") or {}).values()),
        "created_at": m.get("created_at"),
        "description": m.get("description") or "",
        "owner": m.get("owner") or "",
        "eval_score": (m.get("eval") or {}).get("score"),
    }


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = staging.new_file(path.parent, "manifest")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def index_version(name: str, version: int, manifest: dict[str, Any]) -> None:
    """Record a version that was just placed in the store (callers hold `locked()`)."""
    with _db() as con:
        con.execute(sa.text(_UPSERT_VERSION), _index_row(name, version, manifest))


def register(name: str, adapter_dir: Path, manifest: dict[str, Any]) -> AdapterRef:
    """Copy a PEFT adapter directory into the store as the next version of `name`."""
    check_name(name)
    for required in ADAPTER_FILES:
        if not (adapter_dir / required).is_file():
            raise UserError(f"{adapter_dir} is not a PEFT adapter directory (no {required})")
    root = store_root() / name
    root.mkdir(parents=True, exist_ok=True)
    sync()  # first repair (and report) what an earlier registration that was killed left
    tmp = staging.new_dir(root, "registration")
    try:
        present = [*ADAPTER_FILES, *([KNOWLEDGE] if (adapter_dir / KNOWLEDGE).is_file() else [])]
        for f in present:
            shutil.copy2(adapter_dir / f, tmp / f)
        files = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in present}
        with locked():
            version = (versions(name) or [0])[-1] + 1
            full = {**manifest, "name": name, "version": version, "id": f"{name}@v{version}", "files": files}
            full.setdefault("created_at", _now())
            _write_json_atomic(tmp / MANIFEST, full)
            os.rename(tmp, root / f"v{version}")
            with _db() as con:
                con.execute(sa.text(_UPSERT_VERSION), _index_row(name, version, full))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write adapter {name} to {root}: {e.strerror or e}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AdapterRef(name, version, root / f"v{version}")


def resolve(ref: str) -> AdapterRef:
    """`NAME` (latest version), `NAME@vN` or `NAME@ALIAS` -> AdapterRef; a clear error when it does not exist."""
    name, ver = split_ref(ref)
    check_name(name)
    available = versions(name)
    if not available:
        known = ", ".join(n for n, _ in list_names()) or "none yet"
        raise NotFound(f"no adapter named {name!r} in {store_root()} (adapters: {known})")
    if not ver:
        version = available[-1]
    elif m := VERSION_RE.fullmatch(ver):
        version = int(m.group(1))
        if version not in available:
            raise NotFound(f"{name} has no version v{version}; versions: {', '.join(f'v{v}' for v in available)}")
    else:
        check_alias(ver)
        pointing = aliases_of(name)
        if ver not in pointing:
            raise NotFound(
                f"{name} has no alias {ver!r} (aliases: {', '.join(sorted(pointing)) or 'none'}; "
                f"set one with `loraplex adapters tag {name}@v{available[-1]} {ver}`)"
            )
        version = pointing[ver]
        if version not in available:
            raise NotFound(f"alias {name}@{ver} points to v{version}, which is no longer in the store")
    return AdapterRef(name, version, store_root() / name / f"v{version}")


def list_names() -> list[tuple[str, list[int]]]:
    root = store_root()
    if not root.is_dir():
        return []
    out = []
    for d in sorted(os.scandir(root), key=lambda e: e.name):
        if d.is_dir() and not d.name.startswith("."):
            vs = versions(d.name)
            if vs:
                out.append((d.name, vs))
    return out


def sync() -> None:
    """Make the store agree with itself after a crash or a kill, and say what was repaired: remove
    what killed processes left half-written (staging directories, a deleted version's trash), add
    versions the index lacks, drop ones that are gone."""
    with locked():
        _clear_leftovers()
        on_disk = {(n, v) for n, vs in list_names() for v in vs}
        with _db() as con:
            indexed = {(n, v) for n, v in _q(con, "SELECT name, version FROM versions")}
            for name, version in sorted(on_disk - indexed):
                try:
                    m = AdapterRef(name, version, store_root() / name / f"v{version}").manifest()
                except (OSError, ValueError):
                    continue  # a damaged manifest is reported by `show`/`verify`, not hidden by listing
                con.execute(sa.text(_UPSERT_VERSION), _index_row(name, version, m))
                log.warning(
                    f"indexed {name}@v{version}: it was complete in the store but missing from the index "
                    "(a registration or import stopped right after placing it, or it was copied in by hand)"
                )
            for name, version in indexed - on_disk:
                log.warning(f"dropped {name}@v{version} from the index: its directory is no longer in the store")
                _q(con, "DELETE FROM versions WHERE name = :name AND version = :version", name=name, version=version)
                _q(con, "DELETE FROM aliases WHERE name = :name AND version = :version", name=name, version=version)


def _clear_leftovers() -> None:
    """What killed processes left in the store (callers hold `locked()`, which `remove` holds
    throughout, so a `.trash-` directory found here is never one being deleted right now)."""
    root = store_root()
    if not root.is_dir():
        return
    staging.clear_leftovers(root)
    for d in os.scandir(root):
        if not d.is_dir() or d.name.startswith("."):
            continue
        staging.clear_leftovers(Path(d.path))
        for v in os.scandir(d.path):
            if v.name.startswith(".trash-"):
                shutil.rmtree(v.path, ignore_errors=True)
                log.warning(f"finished deleting {d.name}@{v.name.removeprefix('.trash-')}, which was interrupted")
            elif VERSION_RE.fullmatch(v.name) and v.is_dir():
                staging.clear_leftovers(Path(v.path))


def catalog() -> list[dict[str, Any]]:
    """One row per adapter name for `adapters list`: versions, aliases, and the latest version's facts."""
    sync()
    with _database().connect() as con:
        rows = _q(
            con,
            "SELECT name, version, base, rank, bytes, created_at, description, owner, eval_score "
            "FROM versions ORDER BY name, version",
        ).fetchall()
    aliases = {n: {a: f"v{v}" for a, v in by.items()} for n, by in all_aliases().items()}
    out: dict[str, dict[str, Any]] = {}
    for name, version, base, rank, size, created, desc, owner, score in rows:
        out[name] = {
            "name": name,
            "versions": [*out.get(name, {}).get("versions", []), f"v{version}"],
            "latest": f"{name}@v{version}",
            "aliases": aliases.get(name, {}),
            "base": base,
            "rank": rank,
            "bytes": size,
            "created_at": created,
            "description": desc,
            "owner": owner,
            "eval_score": score,
        }
    return list(out.values())


def all_aliases() -> dict[str, dict[str, int]]:
    """{name: {alias: version}} for the whole store, in one query (the API lists models with it)."""
    out: dict[str, dict[str, int]] = {}
    with _database().connect() as con:
        for name, alias, version in _q(con, "SELECT name, alias, version FROM aliases ORDER BY name, alias"):
            out.setdefault(name, {})[alias] = int(version)
    return out


def aliases_of(name: str) -> dict[str, int]:
    with _database().connect() as con:
        return {a: int(v) for a, v in _q(con, "SELECT alias, version FROM aliases WHERE name = :name", name=name)}


def tag(ref: str, alias: str) -> AdapterRef:
    """Point `NAME@ALIAS` at the version `ref` names (moving it if it pointed elsewhere)."""
    check_alias(alias)
    target = resolve(ref)
    with locked(), _db() as con:
        _q(con, _SET_ALIAS, name=target.name, alias=alias, version=target.version)
        _q(
            con,
            "INSERT INTO alias_history (name, alias, version, at) VALUES (:name, :alias, :version, :at)",
            name=target.name,
            alias=alias,
            version=target.version,
            at=_now(),
        )
    return target


def rollback(name: str, alias: str = DEFAULT_ALIAS) -> tuple[int, int]:
    """Move `NAME@ALIAS` back to the version it pointed to before its last move; (from, to)."""
    check_name(name)
    check_alias(alias)
    with locked(), _db() as con:
        history = _q(
            con,
            "SELECT id, version FROM alias_history WHERE name = :name AND alias = :alias ORDER BY id",
            name=name,
            alias=alias,
        ).fetchall()
        if not history:
            raise NotFound(f"{name} has no alias {alias!r} to roll back")
        if len(history) < 2:
            raise Conflict(f"{name}@{alias} has pointed only to v{history[-1][1]}: there is no earlier version")
        (last_id, current), (_, previous) = history[-1], history[-2]
        if previous not in versions(name):
            raise Conflict(f"{name}@{alias} would go back to v{previous}, which is no longer in the store")
        _q(con, "DELETE FROM alias_history WHERE id = :id", id=last_id)  # history is a stack: tag pushes
        _q(con, _SET_ALIAS, name=name, alias=alias, version=previous)
    return current, previous


def describe(ref: str, description: str | None = None, owner: str | None = None) -> AdapterRef:
    """Edit the mutable metadata of one version (its weights and config never change)."""
    target = resolve(ref)
    with locked():
        m = target.manifest()
        if description is not None:
            m["description"] = description
        if owner is not None:
            m["owner"] = owner
        _write_json_atomic(target.path / MANIFEST, m)
        with _db() as con:
            con.execute(sa.text(_UPSERT_VERSION), _index_row(target.name, target.version, m))
    return target


def remove(ref: str, force: bool = False) -> AdapterRef:
    """Delete one version; refused while an alias points to it unless `force` (which drops the alias)."""
    name, ver = split_ref(ref)
    if not VERSION_RE.fullmatch(ver):
        raise UserError(f"name the exact version to delete, e.g. {name}@v1 (versions are never deleted by alias)")
    target = resolve(ref)
    with locked():
        pointing = [a for a, v in aliases_of(target.name).items() if v == target.version]
        if pointing and not force:
            raise UserError(
                f"{target.id} is what {', '.join(f'{target.name}@{a}' for a in pointing)} points to; "
                "move the alias first (`loraplex adapters tag`/`rollback`) or pass --force"
            )
        trash = target.path.with_name(f".trash-v{target.version}")
        shutil.rmtree(trash, ignore_errors=True)  # one a killed `rm` left (we hold the lock)
        os.rename(target.path, trash)  # gone from the store in one step; the rest is cleanup
        with _db() as con:
            for table in ("versions", "aliases"):
                _q(
                    con,
                    f"DELETE FROM {table} WHERE name = :name AND version = :version",
                    name=target.name,
                    version=target.version,
                )
        shutil.rmtree(trash, ignore_errors=True)
    return target


def verify(ref: AdapterRef) -> None:
    """Refuse a tampered or truncated adapter: every file must match the manifest's sha256."""
    try:
        manifest = ref.manifest()
    except (OSError, ValueError) as e:
        raise UserError(f"adapter {ref.id}: cannot read {ref.path / MANIFEST}: {e}") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) - {KNOWLEDGE} != set(ADAPTER_FILES):
        raise UserError(f"adapter {ref.id}: its manifest does not list checksums for {', '.join(ADAPTER_FILES)}")
    for fname, info in files.items():
        path = ref.path / fname
        if not path.is_file():
            raise UserError(f"adapter {ref.id}: {fname} is missing from {ref.path}")
        if path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            raise UserError(f"adapter {ref.id}: {fname} does not match its manifest checksum (tampered or truncated)")


# ----------------------------------------------------------------------------- evaluations and promotion
# An evaluation's full result lives in `vN/evals/<time>.json` (the files stay the truth, as for
# versions); the version's manifest carries the latest one's headline under `eval`, which is what
# `adapters list/show` and the index's eval_score read.


def record_eval(ref: AdapterRef, result: dict[str, Any]) -> Path:
    """Store one `loraplex eval` result with the version it scored; returns the file written."""
    with locked():
        d = ref.path / "evals"
        d.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = d / f"{stamp}.json"
        _write_json_atomic(path, result)
        m = ref.manifest()
        m["eval"] = {
            "score": result["score"],
            "baseline": result["baseline"],
            "baseline_score": result["summary"]["baseline"]["score"],
            "data_sha256": result["data"]["sha256"],
            "examples": result["data"]["examples"],
            "at": result["created_at"],
            "file": str(path.relative_to(ref.path)),
        }
        _write_json_atomic(ref.path / MANIFEST, m)
        with _db() as con:
            con.execute(sa.text(_UPSERT_VERSION), _index_row(ref.name, ref.version, m))
    return path


def log_promotion(
    target: AdapterRef, alias: str, previous: int | None, score: float | None, problems: list[str], user: str
) -> None:
    """One row of the `adapters promote` audit trail (forced when `problems` were overridden)."""
    with locked(), _db() as con:
        _q(
            con,
            "INSERT INTO promotions (at, name, alias, from_version, to_version, score, forced, problems, by_user) "
            "VALUES (:at, :name, :alias, :from_version, :to_version, :score, :forced, :problems, :by_user)",
            at=_now(),
            name=target.name,
            alias=alias,
            from_version=previous,
            to_version=target.version,
            score=score,
            forced=int(bool(problems)),
            problems=json.dumps(problems, ensure_ascii=False),
            by_user=user,
        )


def promotions(name: str) -> list[dict[str, Any]]:
    """The audit trail of `adapters promote` for one adapter, oldest first."""
    with _database().connect() as con:
        rows = _q(
            con,
            "SELECT at, alias, from_version, to_version, score, forced, problems, by_user FROM promotions "
            "WHERE name = :name ORDER BY id",
            name=check_name(name),
        ).fetchall()
    keys = ("at", "alias", "from_version", "to_version", "score", "forced", "problems", "by_user")
    return [{**dict(zip(keys, r, strict=True)), "forced": bool(r[5]), "problems": json.loads(r[6])} for r in rows]
