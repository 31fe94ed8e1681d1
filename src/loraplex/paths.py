"""Where loraplex keeps its state ($LORAPLEX_HOME) and how external names become paths.

Names are validated here, once, before they ever touch the file system.
"""

import os
import re
from pathlib import Path

from loraplex.errors import UserError

NAME = r"[a-z0-9][a-z0-9._-]{0,63}"
"""An adapter, assistant or key name (a directory name in the store), less the rule against '..'."""
NAME_RE = re.compile(rf"^{NAME}\Z")  # \Z: "$" also matches before a final newline
NAME_PATTERN = rf"^(?!.*\.\.){NAME}$"
"""NAME_RE and the '..' rule as one JSON-schema (ECMA-262) pattern, for the OpenAPI document."""


def home() -> Path:
    """The loraplex home directory: `$LORAPLEX_HOME`, else `~/.loraplex`."""
    return Path(os.environ.get("LORAPLEX_HOME") or Path.home() / ".loraplex").expanduser()


def check_name(name: str, what: str = "adapter name") -> str:
    """Return `name` if it is a safe store name, else raise a UserError saying why."""
    if not NAME_RE.match(name) or ".." in name:
        raise UserError(
            f"invalid {what} {name!r}: use 1-64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit (no '..', slashes or upper case)"
        )
    return name
