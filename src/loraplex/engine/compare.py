"""Base vs. adapter answers to the same questions, side by side (`loraplex compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loraplex.data.formats import parse_file
from loraplex.engine.local import LocalModel
from loraplex.engine.quant import Requested
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
    engine: Any = None,
    quantize: Requested = "none",
) -> list[dict[str, Any]]:
    """Greedy answers of the base and of `adapter` to each question, from the serving engine (all
    questions batched), each with the prompt `loraplex serve` builds for it: a version trained
    with retrieval answers from passages of its own Q&A."""
    import asyncio

    from loraplex.adapters import registry
    from loraplex.eval.run import EvalExample, answer_all, served_prompts

    asked: list[tuple[str, str | None]] = [(q, None) for q in questions]
    if questions_file is not None:
        asked += questions_from_file(questions_file)
    if not asked:
        raise UserError("no questions: pass them as arguments or with --questions FILE")
    ref = registry.resolve(adapter)
    examples = [EvalExample("", [{"role": "user", "content": q}], "", ()) for q, _ in asked]
    own = engine is None
    if engine is None:
        from loraplex.engine.engine import Engine
        from loraplex.models.load import resolve_base

        base_ref = resolve_base(ref.manifest().get("base_model", {}).get("id"))
        engine = Engine(base_ref, max_loaded_adapters=2, quantize=quantize)
    try:
        jobs = [served_prompts("", examples), served_prompts(ref.id, examples)]
        base, tuned = asyncio.run(answer_all(engine, jobs, max_new_tokens))
    finally:
        if own:
            engine.close()
    return [
        {"question": q, "reference": r, "base": b["text"], "adapter": a["text"], "adapter_id": ref.id}
        for (q, r), b, a in zip(asked, base, tuned, strict=True)
    ]


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
