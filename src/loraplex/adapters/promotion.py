"""Promotion: move an alias (`hr@prod`) to a version only when its evaluation allows it.

The gate compares the candidate's stored `loraplex eval` results with the version the alias points
to now, on the same data; `--force` overrides and the override is kept in the audit trail
(`registry.promotions`). This module does not run evaluations (eval/) or write the store itself:
it moves the alias with `registry.tag` and logs through `registry.log_promotion`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.adapters import registry
from loraplex.errors import UserError


def evals(ref: registry.AdapterRef) -> list[dict[str, Any]]:
    """Every stored evaluation of one version, oldest first."""
    d = ref.path / "evals"
    out = []
    for p in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            out.append(dict(json.loads(p.read_text(encoding="utf-8"))))
        except (OSError, ValueError):
            continue  # a damaged result file is skipped, not fatal: the others still count
    return out


def _latest_eval(ref: registry.AdapterRef, data_sha256: str | None = None) -> dict[str, Any] | None:
    found = [e for e in evals(ref) if data_sha256 is None or e.get("data", {}).get("sha256") == data_sha256]
    return found[-1] if found else None


@dataclass(frozen=True)
class Promotion:
    target: registry.AdapterRef
    alias: str
    previous: int | None  # the version the alias pointed to before
    forced: bool
    problems: tuple[str, ...]  # what the gate found (overridden when forced)


def promote(
    ref: str,
    alias: str = registry.DEFAULT_ALIAS,
    require_eval: bool = False,
    min_score: float | None = None,
    force: bool = False,
    max_general_drop: float | None = None,
) -> Promotion:
    """Move NAME@ALIAS to `ref` only if its evaluation allows it; `force` overrides and is audited.

    The gate: with `require_eval` (or `min_score`) the version must have an eval; its score must reach
    `min_score`; and it must not score below the version the alias points to now, compared on the
    same eval data (an eval with that version as baseline, or both versions' evals on the same
    file by sha256). A current version that cannot be compared: refused when evals are required,
    allowed otherwise. With `max_general_drop`, the eval must also hold a general-ability check
    (`eval --general`) where no task's score fell by more than that below the baseline's."""
    registry.check_alias(alias)
    target = registry.resolve(ref)
    mine = _latest_eval(target)
    current = registry.aliases_of(target.name).get(alias)
    problems: list[str] = []
    if mine is None and (require_eval or min_score is not None):
        problems.append(f"{target.id} has no evaluation; run `loraplex eval --adapter {target.id} --data FILE`")
    if mine is not None and min_score is not None and (mine["score"] or 0.0) < min_score:
        problems.append(f"{target.id} scores {mine['score']:.3f}, below --min-score {min_score}")
    if max_general_drop is not None:
        general = (mine or {}).get("general") or {}
        drops = [(t, r["delta"]) for t, r in general.get("tasks", {}).items() if "delta" in r]
        worst = min(drops, key=lambda x: x[1], default=None)
        if worst is None:
            problems.append(
                f"{target.id} has no general-ability check; run `loraplex eval --adapter {target.id} --general TASKS`"
            )
        elif worst[1] < -max_general_drop:
            row = general["tasks"][worst[0]]
            problems.append(
                f"{target.id} lost {-worst[1]:.3f} {row['metric']} on {worst[0]} ({row['baseline']:.3f} -> "
                f"{row['adapter']:.3f}), more than --max-general-drop {max_general_drop}"
            )
    if mine is not None and current is not None and current != target.version:
        now = registry.AdapterRef(target.name, current, registry.store_root() / target.name / f"v{current}")
        # Best evidence: an eval of this version run with the current one as its baseline (same
        # questions, same run); else the current version's own eval on the same data (same sha256).
        head_to_head = [e for e in evals(target) if e.get("baseline") == now.id]
        if head_to_head:
            mine = head_to_head[-1]
            theirs_score = mine["summary"]["baseline"]["score"]
        else:
            theirs = _latest_eval(now, mine["data"]["sha256"])
            theirs_score = theirs["score"] if theirs else None
        if theirs_score is not None and (mine["score"] or 0.0) < theirs_score:
            problems.append(
                f"{target.id} scores {mine['score']:.3f}, worse than {now.id} ({theirs_score:.3f}), which "
                f"{target.name}@{alias} points to now, on the same data ({Path(mine['data']['path']).name})"
            )
        elif theirs_score is None and require_eval:
            problems.append(
                f"{now.id} ({target.name}@{alias} now) has no evaluation on the same data to compare with; "
                f"run `loraplex eval --adapter {target.id} --baseline {now.id} --data {mine['data']['path']}`"
            )
    if problems and not force:
        raise UserError(
            f"not promoting {target.id} to {target.name}@{alias}:\n  "
            + "\n  ".join(problems)
            + "\n(pass --force to override; the override is recorded)"
        )
    registry.tag(target.id, alias)
    registry.log_promotion(target, alias, current, mine["score"] if mine else None, problems, _user())
    return Promotion(target, alias, current, bool(problems), tuple(problems))


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
