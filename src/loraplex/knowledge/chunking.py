"""Text -> overlapping chunks of about `size` characters, cut at sentence ends where possible.

Sentences end at Chinese or Latin punctuation (。！？；.!?;) or a blank line; sentences are packed
into chunks up to `size` characters, and each chunk starts with the last sentences of the one
before, up to `overlap` characters, so a fact that straddles a boundary is whole in one chunk. A
sentence longer than `size` is cut by characters. Written here rather than taken from a framework
(LangChain's splitters would pull in that framework for twenty lines); it does not segment words
(store.py does, with jieba).
"""

from __future__ import annotations

import re

SENTENCE_END = re.compile(r"(?<=[。！？；!?;])|(?<=\.)(?=\s)|\n\s*\n")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def chunk(text: str, size: int = 500, overlap: int = 100) -> list[str]:
    if size < 20 or not 0 <= overlap < size:
        raise ValueError(f"chunk size {size} / overlap {overlap}: need size >= 20 and 0 <= overlap < size")
    pieces: list[str] = []
    for s in sentences(text):
        pieces += [s[i : i + size] for i in range(0, len(s), size)]
    chunks: list[str] = []
    current: list[str] = []
    for p in pieces:
        if current and sum(len(x) + 1 for x in current) + len(p) > size:
            chunks.append(_join(current))
            tail: list[str] = []  # the overlap: last sentences of this chunk, up to `overlap` characters
            for x in reversed(current):
                if sum(len(t) + 1 for t in tail) + len(x) > overlap:
                    break
                tail.insert(0, x)
            current = tail
        current.append(p)
    if current:
        chunks.append(_join(current))
    return chunks


def _join(parts: list[str]) -> str:
    """Sentences back into text: no space between CJK sentences, one between Latin ones."""
    out = parts[0]
    for p in parts[1:]:
        out += ("" if _cjk(out[-1]) or _cjk(p[0]) else " ") + p
    return out


def _cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"
