"""A knowledge base on disk: documents, their chunks and a BM25 keyword index in one SQLite file.

`$LORAPLEX_HOME/knowledge/NAME/index.db`. Text is segmented into words by jieba in search mode
(so 带薪年假 is indexed as 带薪, 年假 and 带薪年假), lower-cased, and indexed by SQLite's FTS5, whose
`bm25()` ranks the matches: a real segmenter and a real BM25, both well-kept, neither written here.
Each file is replaced in one transaction (its old chunks go and its new ones come together), so an
interrupted or failed ingest never leaves a file half-indexed; a file whose bytes did not change
is skipped.

Each hit also carries a relevance in [0, 1] (relevance.py), comparable across questions, which
assistants use to decide whether anything relevant was found at all.

This module does not put passages into prompts (assistants/retrieval.py does).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from loraplex.errors import UserError
from loraplex.knowledge.chunking import chunk
from loraplex.knowledge.readers import MAX_BYTES, SUPPORTED, read_document
from loraplex.knowledge.relevance import relevance
from loraplex.paths import check_name, home

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    chunks INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES docs(id), ord INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(words, tokenize = 'unicode61 remove_diacritics 0');
"""
WORDLIKE = re.compile(r"\w")


def root() -> Path:
    return home() / "knowledge"


def names() -> list[str]:
    return sorted(p.name for p in root().glob("*") if (p / "index.db").is_file()) if root().is_dir() else []


_jieba_ready = False


def words(text: str) -> list[str]:
    """The index's words for `text`: jieba's search-mode segmentation, lower case, punctuation dropped."""
    global _jieba_ready
    import jieba

    if not _jieba_ready:
        jieba.setLogLevel(logging.WARNING)  # it logs its dictionary load at INFO on first use
        _jieba_ready = True
    return [w for w in jieba.cut_for_search(text.lower()) if WORDLIKE.search(w)]


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    source: str
    ord: int
    text: str
    score: float  # BM25, higher is better; comparable only within one query
    relevance: float  # share of the query's informative words in this chunk, 0-1 (relevance.py)


@dataclass(frozen=True)
class FileResult:
    path: str
    status: str  # added | replaced | unchanged | error
    chunks: int = 0
    message: str = ""


class KnowledgeBase:
    def __init__(self, name: str, create: bool = False, shared: bool = False):
        """Open (or with `create`, make) a knowledge base; `shared` allows use from several threads,
        which the caller then serialises."""
        self.name = check_name(name, "knowledge base name")
        self.dir = root() / self.name
        if not (self.dir / "index.db").is_file():
            if not create:
                have = ", ".join(names()) or "none yet"
                raise UserError(f"no knowledge base {name!r} (have: {have}); create it with `loraplex knowledge add`")
            self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / "index.db", timeout=30, check_same_thread=not shared)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------------ writing

    def add(
        self,
        paths: Iterable[Path],
        size: int = 500,
        overlap: int = 100,
        max_bytes: int = MAX_BYTES,
        progress: Callable[[Path], None] | None = None,
    ) -> list[FileResult]:
        """Ingest files and directories (recursively, files of supported types). A file that fails
        is reported and the rest go on; each file's chunks are replaced in one transaction."""
        results = []
        for path in expand(paths):
            if progress:
                progress(path)
            results.append(self._add_file(path, size, overlap, max_bytes))
        return results

    def _add_file(self, path: Path, size: int, overlap: int, max_bytes: int) -> FileResult:
        key = str(path.resolve())
        try:
            raw = path.read_bytes() if path.stat().st_size <= max_bytes else b""
            digest = hashlib.sha256(raw).hexdigest()
            old = self.db.execute("SELECT id, sha256, chunks FROM docs WHERE path = ?", (key,)).fetchone()
            if old and old[1] == digest:
                return FileResult(key, "unchanged", old[2])
            pieces = chunk(read_document(path, max_bytes), size, overlap)
            rows = [(text, " ".join(words(text))) for text in pieces]
        except UserError as e:
            return FileResult(key, "error", message=str(e))
        except OSError as e:
            return FileResult(key, "error", message=f"{path}: cannot read: {e.strerror}")
        with self.db:  # one transaction: the old chunks go and the new ones come together, or neither
            if old:
                self._delete_doc(old[0])
            cur = self.db.execute(
                "INSERT INTO docs (path, sha256, bytes, chunks, added_at) VALUES (?, ?, ?, ?, ?)",
                (key, digest, len(raw), len(rows), time.time()),
            )
            doc_id = cur.lastrowid
            for i, (text, ws) in enumerate(rows):
                cid = self.db.execute(
                    "INSERT INTO chunks (doc_id, ord, text) VALUES (?, ?, ?)", (doc_id, i, text)
                ).lastrowid
                self.db.execute("INSERT INTO chunks_fts (rowid, words) VALUES (?, ?)", (cid, ws))
        return FileResult(key, "replaced" if old else "added", len(rows))

    def _delete_doc(self, doc_id: int) -> None:
        self.db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc_id = ?)", (doc_id,))
        self.db.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        self.db.execute("DELETE FROM docs WHERE id = ?", (doc_id,))

    def remove(self, paths: Iterable[Path]) -> list[str]:
        """Remove documents by path (a directory removes every document under it); the removed paths."""
        removed = []
        with self.db:
            for path in paths:
                key = str(path.resolve())
                rows = self.db.execute(
                    "SELECT id, path FROM docs WHERE path = ? OR path LIKE ? ESCAPE '\\'",
                    (key, _like_prefix(key.rstrip("/") + "/")),
                ).fetchall()
                if not rows:
                    raise UserError(f"{path}: not in knowledge base {self.name!r}")
                for doc_id, p in rows:
                    self._delete_doc(doc_id)
                    removed.append(p)
        return removed

    def drop(self) -> None:
        self.close()
        shutil.rmtree(self.dir)

    # ------------------------------------------------------------------ reading

    def documents(self) -> list[dict]:
        rows = self.db.execute("SELECT path, chunks, bytes, added_at FROM docs ORDER BY path").fetchall()
        return [{"path": p, "chunks": c, "bytes": b, "added_at": t} for p, c, b, t in rows]

    def stats(self) -> dict:
        docs, chunks = self.db.execute("SELECT COUNT(*), COALESCE(SUM(chunks), 0) FROM docs").fetchone()
        return {"name": self.name, "documents": docs, "chunks": chunks}

    def search(self, query: str, k: int = 5, min_relevance: float = 0.0) -> list[Hit]:
        """The k best chunks for `query` by BM25 over its words (any word may match), leaving out
        those whose relevance is below `min_relevance`."""
        terms = list(dict.fromkeys(words(query)))
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self.db.execute(
            "SELECT c.id, d.path, c.ord, c.text, chunks_fts.words, bm25(chunks_fts) AS r FROM chunks_fts "
            "JOIN chunks c ON c.id = chunks_fts.rowid JOIN docs d ON d.id = c.doc_id "
            "WHERE chunks_fts MATCH ? ORDER BY r LIMIT ?",
            (match, k),
        ).fetchall()
        hits = [
            Hit(cid, path, ord_, text, -r, relevance(terms, text, set(ws.split())))
            for cid, path, ord_, text, ws, r in rows
        ]
        return [h for h in hits if h.relevance >= min_relevance]


def expand(paths: Iterable[Path]) -> list[Path]:
    """Files as given, and the supported files under directories (hidden ones skipped), sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in SUPPORTED
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return out


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
