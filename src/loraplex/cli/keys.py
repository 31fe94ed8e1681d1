"""The gateway from the command line: `keys ...`, `usage`, `feedback ...`.

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraplex.cli.app import (
    app,
    err,
    feedback_app,
    keys_app,
    out,
    parse_since,
    when,
)
from loraplex.errors import UserError


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who the key is for (a-z, 0-9, . _ -).")],
    adapters: Annotated[
        str | None, typer.Option(help="Models the key may use: names or globs, 'legal*,hr' (default: all).")
    ] = None,
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin routes and /metrics.")] = False,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens (prompt + completion) per minute.")] = None,
    expires: Annotated[str | None, typer.Option(help="2026-12-31, a date-time, or 30d / 12h / 2w.")] = None,
) -> None:
    """Create an API key. The key is printed once; only a salted hash is stored."""
    from loraplex.gateway import db, keys

    con = db.connect()
    key, token = keys.create(
        con, name, keys.parse_patterns(adapters), admin, rpm, tpm, keys.parse_expiry(expires) if expires else None
    )
    err.print(
        f"created key [bold]{key.name}[/] for {', '.join(key.models)}{' (admin)' if key.admin else ''}; "
        "it is shown only now:"
    )
    print(token)


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Keys with their models, limits, state and use."""
    import time

    from loraplex.gateway import db, keys
    from loraplex.gateway.log import summary

    con = db.connect()
    now = time.time()
    use = {r["name"]: r for r in summary(con, None, "key")}
    rows = [
        {
            "name": k.name,
            "models": ",".join(k.models),
            "admin": k.admin,
            "rpm": k.rpm,
            "tpm": k.tpm,
            "expires": when(k.expires),
            "state": "revoked" if k.revoked else ("expired" if k.expires and k.expires < now else "active"),
            "requests": (use.get(k.name) or {}).get("requests", 0),
            "last_used": when((use.get(k.name) or {}).get("last")),
        }
        for k in keys.list_keys(con)
    ]
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("name", "models", "admin", "rpm", "tpm", "expires", "state", "requests", "last used")
    for r in rows:
        table.add_row(*(str(v) if v not in (None, False) else "" for v in r.values()))
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(name: Annotated[str, typer.Argument(help="The key's name.")]) -> None:
    """Revoke a key: its next request gets 401 (no server restart)."""
    from loraplex.gateway import db, keys

    key = keys.revoke(db.connect(), name)
    err.print(f"revoked key [bold]{key.name}[/]")


@app.command()
def usage(
    since: Annotated[str | None, typer.Option(help="24h, 7d, 2w, or a date.")] = None,
    by: Annotated[str, typer.Option(help="adapter or key")] = "adapter",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Requests, errors, tokens and latency from the server's request log."""
    from loraplex.gateway import db
    from loraplex.gateway.log import summary

    if by not in ("adapter", "key"):
        raise UserError(f"--by {by!r}: use adapter or key")
    rows = summary(db.connect(), parse_since(since), by)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table(
        by, "requests", "errors", "prompt tokens", "completion tokens", "avg TTFT ms", "avg latency ms", "last"
    )
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["requests"]),
            str(r["errors"]),
            str(r["prompt_tokens"]),
            str(r["completion_tokens"]),
            f"{r['avg_ttft_ms']:.0f}" if r["avg_ttft_ms"] is not None else "",
            f"{r['avg_latency_ms']:.0f}" if r["avg_latency_ms"] is not None else "",
            when(r["last"]),
        )
    out.print(table)


@feedback_app.command("export")
def feedback_export(
    adapter: Annotated[str, typer.Option(help="NAME (every version) or NAME@vN.")],
    out_file: Annotated[Path, typer.Option("--out", help="The data file to write (JSONL).")],
    rating: Annotated[str | None, typer.Option(help="up or down (default: both).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="messages or sharegpt")] = "messages",
) -> None:
    """Write rated conversations (corrections where given) as training data for `loraplex train`."""
    from loraplex.gateway import db, feedback

    if rating not in (None, "up", "down"):
        raise UserError(f"--rating {rating!r}: use up or down")
    counts = feedback.export(db.connect(), adapter, out_file, rating, fmt)
    err.print(
        f"wrote {counts['written']} conversations to {out_file}"
        + (f"; skipped {counts['skipped']} down-rated without a correction" if counts["skipped"] else "")
    )


@feedback_app.command("stats")
def feedback_stats(
    adapter: Annotated[str | None, typer.Option(help="NAME or NAME@vN (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ratings per adapter version: up, down, corrected."""
    from loraplex.gateway import db, feedback

    rows = feedback.stats(db.connect(), adapter)
    if as_json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    table = Table("adapter", "ratings", "up", "down", "corrected", "up ratio", "last")
    for r in rows:
        table.add_row(
            r["adapter"],
            str(r["ratings"]),
            str(r["up"]),
            str(r["down"]),
            str(r["corrected"]),
            f"{r['up_ratio']:.0%}",
            when(r["last"]),
        )
    out.print(table)
