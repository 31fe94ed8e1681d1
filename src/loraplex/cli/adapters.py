"""`adapters ...` (the store: list, show, versions, tag, rollback, describe, rm, export/import,
promote) and `export` (merged weights, GGUF).

Each command parses its options and calls the package that does the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from loraplex.cli.app import (
    adapters_app,
    app,
    err,
    out,
)
from loraplex.errors import UserError


@adapters_app.command("list")
def adapters_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Adapters in the store: versions, aliases, base, rank, size, created, eval score."""
    from loraplex.adapters import registry

    rows = registry.catalog()
    if as_json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))  # plain: rich highlighting costs ~0.5 s per 1,000 rows
        return
    if not rows:
        out.print(f"no adapters yet in {registry.store_root()}; train one with `loraplex train`")
        return
    table = Table("name", "versions", "aliases", "base", "rank", "size", "created", "eval", "description")
    for r in rows:
        table.add_row(
            r["name"],
            ", ".join(r["versions"]),
            ", ".join(f"{a}→{v}" for a, v in r["aliases"].items()),
            r["base"] or "-",
            str(r["rank"] or "-"),
            f"{(r['bytes'] or 0) / 1e6:.1f} MB",
            r["created_at"] or "-",
            f"{r['eval_score']:.3f}" if r["eval_score"] is not None else "-",
            r["description"],
        )
    out.print(table)


@adapters_app.command("show")
def adapters_show(ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS")]) -> None:
    """The full manifest of one adapter version, its aliases, and whether its files check out."""
    from loraplex.adapters import registry

    target = registry.resolve(ref)
    manifest = target.manifest()
    manifest["aliases"] = [a for a, v in registry.aliases_of(target.name).items() if v == target.version]
    try:
        registry.verify(target)
        manifest["integrity"] = "ok"
    except UserError as e:
        manifest["integrity"] = str(e)
    out.print_json(json.dumps(manifest, ensure_ascii=False))


@adapters_app.command("versions")
def adapters_versions(name: Annotated[str, typer.Argument(help="adapter name")]) -> None:
    """Every version of one adapter, newest last, with the aliases pointing at each."""
    from loraplex.adapters import registry

    target = registry.resolve(name)
    aliases = registry.aliases_of(target.name)
    table = Table("version", "aliases", "created", "train loss", "eval", "description")
    for v in registry.versions(target.name):
        m = registry.resolve(f"{target.name}@v{v}").manifest()
        loss = m.get("train_loss")
        table.add_row(
            f"{target.name}@v{v}",
            ", ".join(a for a, av in aliases.items() if av == v),
            m.get("created_at", "-"),
            f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            f"{m['eval']['score']:.3f}" if (m.get("eval") or {}).get("score") is not None else "-",
            m.get("description", ""),
        )
    out.print(table)


@adapters_app.command("tag")
def adapters_tag(
    ref: Annotated[str, typer.Argument(help="NAME@vN (or NAME@ALIAS) to point the alias at")],
    alias: Annotated[str, typer.Argument(help="e.g. prod, staging")],
) -> None:
    """Point NAME@ALIAS at a version (moving it if it pointed elsewhere); servers see it at once."""
    from loraplex.adapters import registry

    target = registry.tag(ref, alias)
    out.print(f"{target.name}@{alias} → {target.id}")


@adapters_app.command("rollback")
def adapters_rollback(
    name: Annotated[str, typer.Argument(help="adapter name")],
    alias: Annotated[str, typer.Option(help="the alias to move back")] = "prod",
) -> None:
    """Move an alias back to the version it pointed to before its last move."""
    from loraplex.adapters import registry

    old, new = registry.rollback(name, alias)
    out.print(f"{name}@{alias}: v{old} → v{new}")


@adapters_app.command("describe")
def adapters_describe(
    ref: Annotated[str, typer.Argument(help="NAME@vN")],
    description: Annotated[str | None, typer.Option(help="what the adapter is for")] = None,
    owner: Annotated[str | None, typer.Option(help="who answers for it")] = None,
) -> None:
    """Edit a version's description and owner (its weights never change)."""
    from loraplex.adapters import registry

    if description is None and owner is None:
        raise UserError("give --description and/or --owner")
    out.print(f"updated {registry.describe(ref, description, owner).id}")


@adapters_app.command("rm")
def adapters_rm(
    ref: Annotated[str, typer.Argument(help="NAME@vN")],
    force: Annotated[bool, typer.Option(help="also delete it when an alias points to it")] = False,
) -> None:
    """Delete one version (refused while an alias points to it, unless --force)."""
    from loraplex.adapters import registry

    out.print(f"deleted {registry.remove(ref, force).id}")


@adapters_app.command("export")
def adapters_export(
    ref: Annotated[str, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS")],
    out_file: Annotated[Path, typer.Option("--out", help="the .tar file to write")],
) -> None:
    """Write one version (manifest + weights, checksummed) to a tar file for another store."""
    from loraplex.adapters.archive import export_tar

    target = export_tar(ref, out_file)
    out.print(f"exported {target.id} to {out_file} ({out_file.stat().st_size / 1e6:.1f} MB)")


@adapters_app.command("import")
def adapters_import(path: Annotated[Path, typer.Argument(help="a .tar written by `adapters export`")]) -> None:
    """Add the version in a tar file to this store (checksums verified; re-importing is a no-op)."""
    from loraplex.adapters.archive import import_tar

    target, new = import_tar(path)
    out.print(f"imported {target.id}" if new else f"{target.id} is already in the store (identical)")


@app.command("export")
def export_cmd(
    refs: Annotated[list[str] | None, typer.Argument(help="NAME, NAME@vN or NAME@ALIAS (vllm: several)")] = None,
    fmt: Annotated[str, typer.Option("--format", help="peft, merged, gguf, ollama or vllm")] = "peft",
    out_dir: Annotated[Path, typer.Option("--out", help="a new (or empty) directory")] = Path("export"),
    alias: Annotated[str | None, typer.Option(help="vllm: every adapter that has this alias, e.g. prod")] = None,
    merged: Annotated[bool, typer.Option(help="gguf: also write the base with the adapter merged in (f32)")] = False,
) -> None:
    """Export an adapter for another runtime: PEFT, merged HF model, GGUF LoRA, Ollama or vLLM."""
    from loraplex.adapters import registry
    from loraplex.export.formats import export

    names = list(refs or [])
    if alias:
        registry.check_alias(alias)
        names += [f"{r['name']}@{alias}" for r in registry.catalog() if alias in r["aliases"]]
    if not names:
        raise UserError("name an adapter to export (or --alias for every adapter with that alias)")
    out.print(export(names, fmt, out_dir, merged))


@adapters_app.command("promote")
def adapters_promote(
    ref: Annotated[str, typer.Argument(help="NAME@vN to promote")],
    alias: Annotated[str, typer.Option(help="The alias to move, e.g. prod.")] = "prod",
    require_eval: Annotated[
        bool, typer.Option(help="Refuse without an eval (and without one for the current).")
    ] = False,
    min_score: Annotated[float | None, typer.Option(help="Refuse below this eval score (0-1).")] = None,
    max_general_drop: Annotated[
        float | None,
        typer.Option(help="Refuse if an `eval --general` task scores more than this below the baseline (e.g. 0.02)."),
    ] = None,
    force: Annotated[bool, typer.Option(help="Move the alias whatever the gate says (recorded).")] = False,
) -> None:
    """Move an alias to a version only if its eval is at least as good as the current one's."""
    from loraplex.adapters import promotion

    p = promotion.promote(ref, alias, require_eval, min_score, force, max_general_drop)
    was = f" (was v{p.previous})" if p.previous is not None else ""
    out.print(f"{p.target.name}@{alias} → {p.target.id}{was}")
    if p.forced:
        err.print("[yellow]forced[/] past: " + "; ".join(p.problems), highlight=False)
