"""API keys: create (shown once), list, revoke, and check a request's `Authorization` header.

A key is `lp-<id>-<secret>`. The id is stored in the clear to find the row; the secret only as
sha256(salt || secret) with a random per-key salt. Why not bcrypt/argon2 as for passwords: the
secret is 256 random bits, which no dictionary or brute force reaches, and a slow hash would add
its whole cost (tens of ms) to every request; fast salted hashes are what token-based APIs use.

A key's `models` are glob patterns over model names (`legal*,hr`); a composition is allowed when
every part is, and `name@alias` / `name@vN` when `name` is. The base model is a model like any
other: named by its id (or `base`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from loraplex import times
from loraplex.adapters import names
from loraplex.errors import UserError
from loraplex.gateway.db import Database
from loraplex.paths import check_name

_TOKEN = re.compile(r"^lp-([0-9a-f]{12})-([A-Za-z0-9_-]{20,100})$")


class AuthError(Exception):
    """A request's key is missing or not valid (401)."""

    def __init__(self, message: str, code: str = "invalid_api_key"):
        super().__init__(message)
        self.message, self.code = message, code


@dataclass(frozen=True)
class Key:
    id: str
    name: str
    models: tuple[str, ...]
    admin: bool
    rpm: int | None
    tpm: int | None
    expires: float | None
    created: float
    revoked: float | None

    def allows(self, model: str, base_names: tuple[str, ...] = ()) -> bool:
        """Whether this key may use `model` (a name, `name@version`, or a `a:0.7+b` composition)."""
        return all(self._allows_name(p, base_names) for p in names.loose_names(model))

    def _allows_name(self, name: str, base_names: tuple[str, ...]) -> bool:
        # `base` and `default` are other names of the base model (base_names[0]): a scope matches
        # what a name resolves to, so `b*` does not reach the base through `base`
        canonical = base_names[0] if name in base_names else name
        return any(fnmatchcase(canonical, pat) for pat in self.models)

    @classmethod
    def from_row(cls, row: RowMapping) -> Key:
        return cls(
            id=row["id"],
            name=row["name"],
            models=tuple(p for p in row["models"].split(",") if p),
            admin=bool(row["admin"]),
            rpm=row["rpm"],
            tpm=row["tpm"],
            expires=row["expires"],
            created=row["created"],
            revoked=row["revoked"],
        )


def parse_expiry(value: str, now: float | None = None) -> float:
    """`2026-12-31` (valid through that day, local time), an ISO date-time, or a duration `30d`/`12h`/`2w`."""
    now = time.time() if now is None else now
    seconds = times.duration(value)
    if seconds is not None:
        return now + seconds
    try:
        if len(value.strip()) == 10:  # a day: valid through its end (its own length, across DST)
            return (datetime.fromisoformat(value.strip()) + timedelta(days=1)).timestamp()
        return times.moment(value)
    except ValueError:
        raise UserError(
            f"--expires {value!r}: use a date (2026-12-31), a date-time, or a duration (30d, 12h, 2w)"
        ) from None


def parse_patterns(value: str | None) -> tuple[str, ...]:
    if value is None or not value.strip():
        return ("*",)
    pats = tuple(p.strip() for p in value.split(",") if p.strip())
    for p in pats:
        if not re.fullmatch(r"[a-z0-9*?\[\]._-]{1,64}", p):
            raise UserError(f"--adapters: {p!r} is not a model name or glob pattern (a-z, 0-9, . _ - * ? [ ])")
    return pats


def _hash(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def create(
    db: Database,
    name: str,
    models: tuple[str, ...] = ("*",),
    admin: bool = False,
    rpm: int | None = None,
    tpm: int | None = None,
    expires: float | None = None,
) -> tuple[Key, str]:
    """A new key and its token (the only time the token exists outside the client)."""
    check_name(name, "key name")
    key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
    try:
        db.run(
            "INSERT INTO keys (id, name, salt, hash, models, admin, rpm, tpm, expires, created)"
            " VALUES (:id, :name, :salt, :hash, :models, :admin, :rpm, :tpm, :expires, :created)",
            {
                "id": key_id,
                "name": name,
                "salt": salt,
                "hash": _hash(salt, secret),
                "models": ",".join(models),
                "admin": int(admin),
                "rpm": rpm,
                "tpm": tpm,
                "expires": expires,
                "created": time.time(),
            },
        )
    except IntegrityError:
        raise UserError(f"a key named {name!r} exists already (revoke it or pick another name)") from None
    return get(db, name), f"lp-{key_id}-{secret}"


def get(db: Database, name: str) -> Key:
    row = db.one("SELECT * FROM keys WHERE name = :name", {"name": name})
    if row is None:
        raise UserError(f"no key named {name!r} (see `loraplex keys list`)")
    return Key.from_row(row)


def list_keys(db: Database) -> list[Key]:
    return [Key.from_row(r) for r in db.all("SELECT * FROM keys ORDER BY created")]


def any_active(db: Database) -> bool:
    return db.one("SELECT 1 FROM keys WHERE revoked IS NULL LIMIT 1") is not None


def revoke(db: Database, name: str) -> Key:
    get(db, name)  # says so when there is none
    db.run("UPDATE keys SET revoked = :now WHERE name = :name AND revoked IS NULL", {"now": time.time(), "name": name})
    return get(db, name)


def authenticate(db: Database, authorization: str | None, now: float | None = None) -> Key:
    """The key a request's `Authorization: Bearer ...` header names; AuthError if none is valid."""
    if not authorization:
        raise AuthError("missing API key: send the header 'Authorization: Bearer KEY'", "missing_api_key")
    scheme, _, token = authorization.partition(" ")
    m = _TOKEN.match(token.strip()) if scheme.lower() == "bearer" else None
    row = db.one("SELECT * FROM keys WHERE id = :id", {"id": m.group(1)}) if m else None
    if m is None or row is None or not hmac.compare_digest(_hash(bytes(row["salt"]), m.group(2)), bytes(row["hash"])):
        raise AuthError("invalid API key")
    key = Key.from_row(row)
    if key.revoked is not None:
        raise AuthError(f"API key {key.name!r} was revoked", "revoked_api_key")
    now = time.time() if now is None else now
    if key.expires is not None and now >= key.expires:
        when = datetime.fromtimestamp(key.expires).isoformat(timespec="minutes")
        raise AuthError(f"API key {key.name!r} expired at {when}", "expired_api_key")
    return key
