"""The `loraplex` command: a table of subcommands whose typed signatures are the options.

One module per command group (train, adapters, chat, serve, keys, assistants); each command parses
its arguments and calls the package that does the work.
"""

from __future__ import annotations

import sys

# isort: off
# in the order `loraplex --help` lists them; importing a module registers its commands
from loraplex.cli import train, chat, serve, adapters, keys, assistants  # noqa: F401

# isort: on
from loraplex.cli.app import app, err
from loraplex.errors import UserError

__all__ = ["app", "main"]


def main() -> None:
    from loraplex._quiet import quiet

    quiet()
    try:
        app()
    except UserError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        sys.exit(2)
