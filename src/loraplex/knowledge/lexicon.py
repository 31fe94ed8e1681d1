"""jieba's two word tables, held compactly: its dictionary (word -> frequency, with every word's
prefixes at 0: what its segmenter reads) and its IDF table (word -> inverse document frequency:
what knowledge/relevance.py weighs a question's words with).

jieba keeps them as Python dicts of ~500k and ~350k strings: 63 and 41 MiB of resident memory in
every process that segments a question, a fifth of an int4 server at rest. Here each is a
marisa-trie (a succinct trie, 1-3 MB, mapped from a file, so its pages are shared and reclaimable)
that numbers the words, and an array of their values: ~5 MB in all. The same words with the same
values: jieba segments exactly as with its own dict (tests/test_knowledge.py compares both tables
entry by entry and a segmentation), at ~1.3x its lookup time (~50 us more a question).

Built once per jieba installation from jieba's own files (~2 s, jieba's prefix-dict code) and kept
under `$LORAPLEX_HOME/cache/`; a process then maps the files. This module does not segment (jieba
does, store.py calls it) and does not change a word's value.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from loraplex.files import package_file, write_dir
from loraplex.paths import home

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the files' layout changes: older caches are then rebuilt, not misread


@dataclass(frozen=True)
class Table:
    """A read-only str -> number map: the trie numbers each word 0..n-1, `values` holds its value.
    The part of `dict`'s interface jieba's segmenter and relevance.py use."""

    trie: object  # marisa_trie.Trie (untyped package)
    values: array.array[Any]  # 'Q' frequencies or 'd' IDFs

    def __contains__(self, word: object) -> bool:
        return word in self.trie  # type: ignore[operator]

    def __getitem__(self, word: str) -> int | float:
        return self.values[self.trie[word]]  # type: ignore[index]

    def get(self, word: str, default: int | float | None = None) -> int | float | None:
        i = self.trie.get(word)  # type: ignore[attr-defined]
        return default if i is None else self.values[i]

    def __len__(self) -> int:
        return len(self.values)


def _sources() -> dict[str, Path]:
    return {"dict": package_file("jieba", "dict.txt"), "idf": package_file("jieba", "analyse/idf.txt")}


def cache_dir() -> Path:
    """Where the tables of this jieba installation are kept: keyed by the source files' paths, sizes
    and modification times (a reinstalled or edited jieba gets new tables)."""
    stamp = [FORMAT] + [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in _sources().values()]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]
    return home() / "cache" / f"jieba-tables-{key}"


@dataclass(frozen=True)
class Tables:
    freq: Table
    total: int
    idf: Table
    median_idf: float


def _build() -> tuple[dict[str, tuple[Any, array.array[Any]]], dict[str, float]]:
    """The two tables from jieba's files: (name -> (trie, values)), and the numbers beside them."""
    import marisa_trie
    from jieba import Tokenizer

    sources = _sources()
    with open(sources["dict"], "rb") as f:
        freq, total = Tokenizer.gen_pfdict(f)  # jieba's own prefix dict: the words and their prefixes
    idf: dict[str, float] = {}
    for line in sources["idf"].read_text(encoding="utf-8").splitlines():
        word, number = line.strip().split(" ")  # as jieba.analyse's IDFLoader reads the file
        idf[word] = float(number)

    def numbered(table: dict[str, Any], code: str) -> tuple[Any, array.array[Any]]:
        trie = marisa_trie.Trie(table.keys())
        values = array.array(code, bytes(array.array(code).itemsize * len(trie)))
        for w, v in table.items():
            values[trie[w]] = v
        return trie, values

    built = {"freq": numbered(freq, "Q"), "idf": numbered(idf, "d")}
    return built, {"total": total, "median_idf": sorted(idf.values())[len(idf) // 2]}


def _save(out: Path, built: dict[str, tuple[Any, array.array[Any]]], meta: dict[str, float]) -> None:
    """Write the tables into `out` atomically (a half-written cache is never read)."""

    def write(tmp: Path) -> None:
        for name, (trie, values) in built.items():
            trie.save(str(tmp / f"{name}.marisa"))
            (tmp / f"{name}.values").write_bytes(values.tobytes())
        (tmp / "meta.json").write_text(json.dumps(meta))

    write_dir(out, write)


def _read(out: Path, name: str, code: str) -> Table:
    import marisa_trie

    trie = marisa_trie.Trie()
    trie.mmap(str(out / f"{name}.marisa"))
    values = array.array(code)
    values.frombytes((out / f"{name}.values").read_bytes())
    if len(values) != len(trie):
        raise OSError(f"{out} is damaged ({name}: {len(trie)} words, {len(values)} values)")
    return Table(trie, values)


@cache
def tables() -> Tables:
    """jieba's prefix dict (word -> frequency, prefixes -> 0) with the frequencies' total, and its
    IDF table with its median (jieba.analyse's `idf_freq` and `median_idf`): read from the cache,
    built into it the first time (~2 s), or held in memory where it cannot be written or read."""
    out = cache_dir()
    built = None
    try:
        if not (out / "meta.json").is_file():
            built, meta = _build()
            _save(out, built, meta)
        saved = json.loads((out / "meta.json").read_text())
        return Tables(_read(out, "freq", "Q"), int(saved["total"]), _read(out, "idf", "d"), float(saved["median_idf"]))
    except (OSError, ValueError, KeyError) as e:  # unwritable or damaged: this process builds its own
        log.warning("jieba's tables are held in memory (%s: %s); delete it if it is damaged", out, e)
        if built is None:
            built, meta = _build()
        return Tables(Table(*built["freq"]), int(meta["total"]), Table(*built["idf"]), meta["median_idf"])


_segmenter_lock = threading.Lock()


def use_with_jieba() -> None:
    """Make jieba's default segmenter read `tables().freq` instead of loading its own dict (which
    it would also write to a cache file in /tmp). Call before the first jieba.cut."""
    import jieba

    with _segmenter_lock:
        if jieba.dt.initialized:
            return
        t = tables()
        with jieba.dt.lock:
            jieba.dt.FREQ, jieba.dt.total = t.freq, t.total
            jieba.dt.initialized = True
