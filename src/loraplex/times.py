"""Times users type: a duration (`30m`, `12h`, `7d`, `2w`) or a date / date-time (ISO 8601).

Shared by `keys create --expires` and `usage --since` / `feedback --since`. This module does not
know what the time is for; callers say what an error should name.
"""

from __future__ import annotations

import re
from datetime import datetime

_DURATION = re.compile(r"(\d+)([mhdw])")
_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float | None:
    """Seconds in `30m` / `12h` / `7d` / `2w`; None when `text` is not a duration."""
    m = _DURATION.fullmatch(text.strip())
    return int(m.group(1)) * _SECONDS[m.group(2)] if m else None


def moment(text: str) -> float:
    """A date or date-time (local time) as a timestamp; ValueError when it is neither."""
    return datetime.fromisoformat(text.strip()).timestamp()
