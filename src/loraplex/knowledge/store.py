"""A knowledge base on disk: documents, their chunks and a BM25 keyword index in one SQLite file.

`$LORAPLEX_HOME/knowledge/NAME/index.db`. Text is segmented into words by jieba in search mode
(so 带薪年假 is indexed as 带薪, 年假 and 带薪年假), lower-cased, and indexed by SQLite's FTS5, whose
`bm25()` ranks the matches: a real segmenter and a real BM25, both well-kept, neither written here.
Each file is replaced in one transaction (its old chunks go and its new ones come together), so an
interrupted or failed ingest never leaves a file half-indexed; a file whose bytes did not change
is skipped.

Each hit also carries a relevance in [0, 1] (relevance.py), comparable across questions, which
assistants use to decide whether anything relevant was found at all.

With an embedder (`knowledge add --embedder multilingual`, the built-in one, or `--embedder DIR`, a
model on this machine: embedder.py), every chunk
also gets a unit vector, stored in the same file and written in the same transaction as its text,
and search fuses the BM25 ranking with the vectors' (brute-force cosine over all chunks in memory:
10,000 x 512 floats is 20 MB and one matrix-vector product).

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

import numpy as np

from loraplex.errors import UserError
from loraplex.knowledge import lexicon
from loraplex.knowledge.chunking import chunk
from loraplex.knowledge.embedder import TextEmbedder, load
from loraplex.knowledge.readers import MAX_BYTES, SUPPORTED, read_document
from loraplex.knowledge.relevance import relevance, weight
from loraplex.paths import check_name, home

SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    chunks INTEGER NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL REFERENCES docs(id), ord INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(words, tokenize = 'unicode61 remove_diacritics 0');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vocab USING fts5vocab(chunks_fts, 'row');
CREATE TABLE IF NOT EXISTS vectors (chunk_id INTEGER PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009): 1 / (60 + rank)
CANDIDATES = 30  # each ranking's top results that enter the fusion
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
        lexicon.use_with_jieba()  # its dictionary as a trie: ~60 MiB less memory, the same words
        _jieba_ready = True
    return [w for w in jieba.cut_for_search(text.lower()) if WORDLIKE.search(w)]


@dataclass(frozen=True)
class Hit:
    chunk_id: int
    source: str
    ord: int
    text: str
    score: float  # BM25, higher is better; comparable only within one query (0: found by vectors only)
    relevance: float  # share of the query's informative words in this chunk, 0-1 (relevance.py)
    similarity: float | None = None  # cosine similarity to the query, with an embedder
    # the similarity with the names the knowledge repeats taken out of both (assistants/faq.py):
    # how close the question is to what the passage is about, not to whom it is about
    topic: float | None = None


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
        self.db.execute("PRAGMA cache_size = -65536")  # 64 MB of pages: a 10,000-chunk index stays in memory
        self._setup()

    def _setup(self) -> None:
        self.db.executescript(SCHEMA)
        self._embedder: TextEmbedder | None = None
        self._matrix: tuple[int, np.ndarray, np.ndarray] | None = None  # (version, ids, vectors)
        self._version = 0  # bumped by this connection's writes; other writers show in data_version
        self._n: tuple[int, int] | None = None  # (version, chunks)

    # ------------------------------------------------------------------ dense vectors

    @property
    def embedder_path(self) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'embedder'").fetchone()
        return row[0] if row else None

    def embedder(self) -> TextEmbedder | None:
        """The base's embedding model, loaded on first use; None for a keyword-only base."""
        path = self.embedder_path
        if path is None:
            return None
        if self._embedder is None or str(self._embedder.path) != path:
            self._embedder = load(path)
        return self._embedder

    def set_embedder(self, path: str | Path | None, progress: Callable[[int, int], None] | None = None) -> int:
        """Use (or with None, stop using) an embedding model; embeds every chunk that has no vector
        from it yet, in one transaction per batch of files. Returns the chunks embedded."""
        if path is None:
            with self.db:
                self.db.execute("DELETE FROM meta WHERE key IN ('embedder', 'embedder_fingerprint')")
                self.db.execute("DELETE FROM vectors")
            self._version += 1
            return 0
        emb = load(path)
        with self.db:
            if self.db.execute("SELECT value FROM meta WHERE key = 'embedder_fingerprint'").fetchone() != (
                emb.fingerprint,
            ):
                self.db.execute("DELETE FROM vectors")  # another model's vectors mean nothing to this one
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder', ?)", (str(emb.path),))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('embedder_fingerprint', ?)", (emb.fingerprint,))
        self._embedder = emb
        todo = self.db.execute(
            "SELECT id, text FROM chunks WHERE id NOT IN (SELECT chunk_id FROM vectors) ORDER BY id"
        ).fetchall()
        for i in range(0, len(todo), 256):
            part = todo[i : i + 256]
            vecs = emb.embed([t for _, t in part])
            with self.db:
                self.db.executemany(
                    "INSERT OR REPLACE INTO vectors VALUES (?, ?)",
                    [(cid, v.tobytes()) for (cid, _), v in zip(part, vecs, strict=True)],
                )
            if progress:
                progress(min(i + 256, len(todo)), len(todo))
        self._version += 1
        return len(todo)

    def _vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(chunk ids, unit vectors) of the whole base, kept in memory until the base changes."""
        version = self._version * 1_000_003 + self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._matrix is None or self._matrix[0] != version:
            rows = self.db.execute("SELECT chunk_id, v FROM vectors ORDER BY chunk_id").fetchall()
            dim = self._embedder.dim if self._embedder else 0
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            mat = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1 if rows else dim)
            self._matrix = (version, ids, mat)
        return self._matrix[1], self._matrix[2]

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
            emb = self.embedder()
            vecs = emb.embed(pieces) if emb is not None and pieces else None  # before the transaction: slow
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
                if vecs is not None:
                    self.db.execute("INSERT INTO vectors VALUES (?, ?)", (cid, vecs[i].tobytes()))
        self._version += 1
        return FileResult(key, "replaced" if old else "added", len(rows))

    def _delete_doc(self, doc_id: int) -> None:
        self.db.execute("DELETE FROM chunks_fts WHERE rowid IN (SELECT id FROM chunks WHERE doc_id = ?)", (doc_id,))
        self.db.execute("DELETE FROM vectors WHERE chunk_id IN (SELECT id FROM chunks WHERE doc_id = ?)", (doc_id,))
        self._version += 1
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
        vectors = self.db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0]
        return {
            "name": self.name,
            "documents": docs,
            "chunks": chunks,
            "vectors": vectors,
            "embedder": self.embedder_path,
        }

    def search(
        self,
        query: str,
        k: int = 5,
        min_relevance: float = 0.0,
        min_similarity: float | None = None,
        min_topic: float | None = None,
    ) -> list[Hit]:
        """The k best chunks for `query`. Keyword-only bases rank by BM25 over the query's words (any
        word may match); with an embedder, BM25's and the vectors' top candidates are fused by
        reciprocal rank (score = sum over both rankings of 1 / (60 + rank)).

        A chunk is kept if its relevance reaches `min_relevance`, or (with vectors) its cosine
        similarity reaches `min_similarity`. `min_topic` is not used: a knowledge base's hits have
        no `topic` (retrieval.Searchable)."""
        terms = list(dict.fromkeys(words(query)))
        emb = self.embedder()
        lexical = self._bm25(terms, k if emb is None else CANDIDATES)
        if emb is None:
            hits = [
                Hit(cid, path, o, text, score, relevance(terms, text, ws)) for cid, path, o, text, ws, score in lexical
            ]
            return [h for h in hits if h.relevance >= min_relevance]
        ids, mat = self._vectors()
        qv = emb.embed([query])[0]
        sims = mat @ qv if len(ids) else np.zeros(0, np.float32)
        dense = np.argsort(-sims, kind="stable")[:CANDIDATES]
        fused: dict[int, float] = {}
        for rank, row in enumerate(lexical, 1):
            fused[row[0]] = fused.get(row[0], 0.0) + 1.0 / (RRF_K + rank)
        for rank, j in enumerate(dense, 1):
            cid = int(ids[j])
            fused[cid] = fused.get(cid, 0.0) + 1.0 / (RRF_K + rank)
        sim_of = {int(ids[j]): float(sims[j]) for j in dense}
        bm25_of = {row[0]: row[5] for row in lexical}
        order = sorted(fused, key=lambda c: -fused[c])
        hits = []
        for cid in order:
            path, o, text, ws = self._chunk(cid)
            sim = sim_of.get(cid)
            if sim is None:  # found by BM25 alone: its similarity all the same, if it has a vector
                pos = int(np.searchsorted(ids, cid))
                sim = float(mat[pos] @ qv) if pos < len(ids) and ids[pos] == cid else 0.0
            h = Hit(cid, path, o, text, bm25_of.get(cid, 0.0), relevance(terms, text, ws), sim)
            if h.relevance >= min_relevance or (min_similarity is not None and sim >= min_similarity):
                hits.append(h)
            if len(hits) == k:
                break
        return hits

    def _bm25(self, terms: list[str], k: int) -> list[tuple[int, str, int, str, set[str], float]]:
        terms = self._selective(terms)
        if not terms:
            return []
        match = " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)
        rows = self.db.execute(
            "SELECT c.id, d.path, c.ord, c.text, chunks_fts.words, bm25(chunks_fts) AS r FROM chunks_fts "
            "JOIN chunks c ON c.id = chunks_fts.rowid JOIN docs d ON d.id = c.doc_id "
            "WHERE chunks_fts MATCH ? ORDER BY r LIMIT ?",
            (match, k),
        ).fetchall()
        return [(cid, path, o, text, set(ws.split()), -r) for cid, path, o, text, ws, r in rows]

    def _selective(self, terms: list[str]) -> list[str]:
        """The terms worth matching. FTS5 scores every chunk that matches any term, and that is what a
        search costs; a term in more than half of the chunks has a BM25 weight of zero (FTS5 clamps
        its negative IDF) and function words (relevance.STOP) say nothing, yet either can match
        nearly every chunk. So they are left out, unless nothing else is left (then the rarest one
        that occurs is kept). Ranking among the chunks that remain is unchanged."""
        if not terms:
            return []
        marks = ",".join("?" * len(terms))
        df = dict(self.db.execute(f"SELECT term, doc FROM chunks_vocab WHERE term IN ({marks})", terms).fetchall())
        n = self._count()
        keep = [t for t in terms if weight(t) > 0 and 0 < df.get(t, 1) * 2 <= n]
        if keep:
            return keep
        present = [t for t in terms if df.get(t, 1) > 0]
        return [min(present, key=lambda t: df.get(t, 1))] if present else []

    def _count(self) -> int:
        version = self._version * 1_000_003 + self.db.execute("PRAGMA data_version").fetchone()[0]
        if self._n is None or self._n[0] != version:
            self._n = (version, self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0])
        return self._n[1]

    def _chunk(self, cid: int) -> tuple[str, int, str, set[str]]:
        path, o, text, ws = self.db.execute(
            "SELECT d.path, c.ord, c.text, f.words FROM chunks c JOIN docs d ON d.id = c.doc_id "
            "JOIN chunks_fts f ON f.rowid = c.id WHERE c.id = ?",
            (cid,),
        ).fetchone()
        return path, o, text, set(ws.split())


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
