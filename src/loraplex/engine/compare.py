"""Base vs. adapter answers to the same questions, side by side (`loraplex compare`, quickstart)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loraplex.data.formats import parse_file
from loraplex.engine.local import LocalModel
from loraplex.errors import UserError


def questions_from_file(path: Path) -> list[tuple[str, str | None]]:
    """(question, reference answer) for every record: its last user turn and its answer."""
    result = parse_file(path)
    if result.errors:
        raise UserError("\n".join(str(e) for e in result.errors[:20]))
    out: list[tuple[str, str | None]] = []
    for conv in result.conversations:
        user = [m["content"] for m in conv.messages if m["role"] == "user"][-1]
        out.append((user, conv.messages[-1]["content"]))
    return out


def compare_answers(
    adapter: str,
    questions: list[str],
    questions_file: Path | None = None,
    max_new_tokens: int = 128,
    model: LocalModel | None = None,
) -> list[dict[str, Any]]:
    asked: list[tuple[str, str | None]] = [(q, None) for q in questions]
    if questions_file is not None:
        asked += questions_from_file(questions_file)
    if not asked:
        raise UserError("no questions: pass them as arguments or with --questions FILE")
    lm = model or LocalModel(adapter=adapter)
    rows = []
    for q, ref in asked:
        messages = [{"role": "user", "content": q}]
        rows.append(
            {
                "question": q,
                "reference": ref,
                "base": lm.answer(messages, max_new_tokens, use_adapter=False),
                "adapter": lm.answer(messages, max_new_tokens),
                "adapter_id": lm.adapter.id if lm.adapter else None,
            }
        )
    return rows


def print_comparison(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table("question", "base", rows[0]["adapter_id"] or "adapter", show_lines=True)
    if any(r["reference"] for r in rows):
        table.add_column("reference")
    for r in rows:
        cells = [r["question"], r["base"], r["adapter"]]
        if r["reference"] is not None:
            cells.append(r["reference"])
        table.add_row(*cells)
    console.print(table)


def exact_recall(lm: LocalModel, pairs: list[tuple[str, str]], max_new_tokens: int = 96) -> float:
    """Fraction of questions whose greedy answer reproduces the reference exactly (whitespace-trimmed)."""
    hits = sum(lm.answer([{"role": "user", "content": q}], max_new_tokens) == a.strip() for q, a in pairs)
    return hits / max(len(pairs), 1)
