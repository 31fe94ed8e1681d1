"""Data checks before training: personal-data detection and redaction, duplicates, length stats.

Phone numbers are found with `phonenumbers` (Google's libphonenumber: Chinese mobile and landline
numbers and international ones); Chinese resident ID numbers and bank card numbers are found by a
digit-run pattern and confirmed with `python-stdnum`'s checksum validators (ISO 7064 for IDs, Luhn
for cards), so an order number or a timestamp is not redacted by accident.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import phonenumbers
from stdnum import luhn
from stdnum.cn import ric

from loraplex.data.formats import Conversation

PLACEHOLDERS = {"id_card": "[ID_CARD]", "bank_card": "[BANK_CARD]", "phone": "[PHONE]", "email": "[EMAIL]"}

# Pragmatic e-mail pattern (RFC 5322 allows more, but nobody writes those in Q&A data).
EMAIL_RE = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
ID_RE = re.compile(r"(?<![0-9])[1-9][0-9]{16}[0-9Xx](?![0-9A-Za-z])")
# 13-19 digits, optionally grouped by single spaces or dashes (as cards are printed).
CARD_RE = re.compile(r"(?<![0-9])[0-9](?:[ -]?[0-9]){12,18}(?![0-9])")


@dataclass
class Redaction:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def find_personal_data(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans of personal data in `text`."""
    spans: list[tuple[int, int, str]] = []

    def free(s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b, _ in spans)

    for m in EMAIL_RE.finditer(text):
        spans.append((m.start(), m.end(), "email"))
    for m in ID_RE.finditer(text):
        if ric.is_valid(m.group()) and free(m.start(), m.end()):
            spans.append((m.start(), m.end(), "id_card"))
    for m in CARD_RE.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if luhn.is_valid(digits) and free(m.start(), m.end()):
            spans.append((m.start(), m.end(), "bank_card"))
    for pm in phonenumbers.PhoneNumberMatcher(text, "CN", leniency=phonenumbers.Leniency.VALID):
        if free(pm.start, pm.end):
            spans.append((pm.start, pm.end, "phone"))
    return sorted(spans)


def redact(text: str) -> Redaction:
    """Replace personal data with typed placeholders such as `[PHONE]`; count what was replaced."""
    spans = find_personal_data(text)
    out, last, counts = [], 0, Counter[str]()
    for s, e, kind in spans:
        out.append(text[last:s])
        out.append(PLACEHOLDERS[kind])
        counts[kind] += 1
        last = e
    out.append(text[last:])
    return Redaction("".join(out), counts)


def redact_conversations(conversations: list[Conversation]) -> tuple[list[Conversation], Counter[str]]:
    total: Counter[str] = Counter()
    out = []
    for conv in conversations:
        messages = []
        for m in conv.messages:
            r = redact(m["content"])
            total.update(r.counts)
            messages.append({"role": m["role"], "content": r.text})
        tooled = None
        if conv.tooled is not None:
            tooled = replace(
                conv.tooled,
                messages=[{**m, "content": redact(m["content"]).text} for m in conv.tooled.messages],
            )
        out.append(Conversation(messages, conv.source, tooled=tooled))
    return out, total


@dataclass
class CheckReport:
    """What `loraplex data check` prints (also returned as JSON)."""

    file: str
    format: str
    records: int
    turns: int
    errors: list[str]
    duplicates: list[list[str]]  # groups of sources with identical conversations
    personal_data: dict[str, int]
    personal_data_examples: list[str]
    token_stats: dict[str, float]
    truncated: list[str]
    max_seq_length: int

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "ok": self.ok}


def find_duplicates(conversations: list[Conversation]) -> list[list[str]]:
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for conv in conversations:
        key = tuple((m["role"], m["content"].strip()) for m in conv.messages)
        groups.setdefault(key, []).append(conv.source)
    return [sources for sources in groups.values() if len(sources) > 1]


def length_stats(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def pct(p: float) -> float:
        return float(ordered[min(len(ordered) - 1, int(p * len(ordered)))])

    return {
        "min": float(ordered[0]),
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": float(ordered[-1]),
        "total": float(sum(ordered)),
    }
