"""`loraplex data check`: everything worth knowing about a data file before training on it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from loraplex.data.formats import FormatOptions, parse_file
from loraplex.data.tokenize import render
from loraplex.data.validate import CheckReport, find_duplicates, find_personal_data, length_stats, redact_conversations
from loraplex.models.load import load_tokenizer, resolve_base


def check_file(
    path: Path, base: str | None, fmt: str | None, max_seq_length: int, redact: bool, console: Console
) -> CheckReport:
    result = parse_file(path, FormatOptions(format=fmt))
    tok = load_tokenizer(resolve_base(base))
    lengths, truncated = [], []
    pii: Counter[str] = Counter()
    pii_examples: list[str] = []
    for conv in result.conversations:
        n = len(tok(render(tok, conv.messages), add_special_tokens=False)["input_ids"])
        lengths.append(n)
        if n > max_seq_length:
            truncated.append(f"{conv.source} ({n} tokens)")
        for m in conv.messages:
            for _, _, kind in find_personal_data(m["content"]):
                pii[kind] += 1
                if len(pii_examples) < 20:
                    pii_examples.append(f"{conv.source}: {kind} in a {m['role']} message")
    if redact:
        redacted, counts = redact_conversations(result.conversations)
        target = path.with_name(path.stem + ".redacted.jsonl")
        with open(target, "w", encoding="utf-8") as f:
            for conv in redacted:
                f.write(json.dumps({"messages": conv.messages}, ensure_ascii=False) + "\n")
        console.print(f"wrote {target} ({sum(counts.values())} replacements: {dict(counts)})")
    return CheckReport(
        file=str(path),
        format=result.format,
        records=len(result.conversations),
        turns=sum(len(c.messages) for c in result.conversations),
        errors=[str(e) for e in result.errors],
        duplicates=find_duplicates(result.conversations),
        personal_data=dict(pii),
        personal_data_examples=pii_examples,
        token_stats=length_stats(lengths),
        truncated=truncated,
        max_seq_length=max_seq_length,
    )


def print_report(r: CheckReport, console: Console) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("file", r.file)
    table.add_row("format", r.format)
    table.add_row("valid records", str(r.records))
    table.add_row("messages", str(r.turns))
    if r.token_stats:
        s = r.token_stats
        table.add_row(
            "tokens per record",
            f"min {s['min']:.0f}  mean {s['mean']}  p50 {s['p50']:.0f}  "
            f"p95 {s['p95']:.0f}  max {s['max']:.0f}  total {s['total']:.0f}",
        )
    table.add_row(f"longer than {r.max_seq_length}", str(len(r.truncated)))
    table.add_row("duplicate groups", str(len(r.duplicates)))
    table.add_row("personal data", ", ".join(f"{k} {v}" for k, v in r.personal_data.items()) or "none found")
    table.add_row("invalid records", f"[red]{len(r.errors)}[/]" if r.errors else "0")
    console.print(table)
    for t in r.truncated[:20]:
        console.print(f"[yellow]will be truncated:[/] {t}")
    for group in r.duplicates[:20]:
        console.print(f"[yellow]duplicate:[/] {', '.join(group)}")
    for ex in r.personal_data_examples:
        console.print(f"[yellow]personal data:[/] {ex} (use --redact)")
    for e in r.errors:
        console.print(f"[red]invalid:[/] {e}", highlight=False)
