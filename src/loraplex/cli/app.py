"""The `loraplex` command's Typer apps (the top level and one per group), consoles, and the small
parsers several groups share. The commands live in the modules next to this one."""

from __future__ import annotations

import typer
from rich.console import Console

from loraplex.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The `loraplex` command: a table of subcommands whose typed signatures are the options.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect training data without training.")
adapters_app = typer.Typer(no_args_is_help=True, help="List and inspect adapters in the local store.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys for `loraplex serve`: who may use which models.")
feedback_app = typer.Typer(no_args_is_help=True, help="Users' ratings of answers, as statistics or training data.")
knowledge_app = typer.Typer(no_args_is_help=True, help="Knowledge bases: documents indexed for retrieval (BM25).")
assistants_app = typer.Typer(
    no_args_is_help=True, help="Assistants: adapters + system prompt + knowledge base, served as models."
)
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.add_typer(feedback_app, name="feedback")
app.add_typer(knowledge_app, name="knowledge")
app.add_typer(assistants_app, name="assistants")
out = Console()
err = Console(stderr=True)


def parse_since(value: str | None) -> float | None:
    """`1h`, `7d`, `2w` ago, or a date / date-time."""
    import time

    from loraplex import times

    if value is None:
        return None
    seconds = times.duration(value)
    if seconds is not None:
        return time.time() - seconds
    try:
        return times.moment(value)
    except ValueError:
        raise UserError(f"--since {value!r}: use a duration (30m, 24h, 7d, 2w) or a date (2026-11-01)") from None


def when(t: float | None) -> str:
    from datetime import datetime

    return "" if t is None else datetime.fromtimestamp(t).isoformat(sep=" ", timespec="minutes")
