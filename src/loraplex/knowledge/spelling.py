"""Typos in a question, corrected towards the words of the text it is searched in, before the search.

    English: a word of 4+ letters that is in neither an English dictionary nor the text
             -> the text's closest word, 1 edit away (2 for words of 6+ letters): "brekfast" -> "breakfast"
    Chinese: a character that makes a word with neither neighbour (jieba's dictionary, the text's words)
             -> the one character of the text read the same (pinyin, tones ignored) whose
                substitution completes one of the text's words: "早參时间" -> "早餐时间"

Why: the sentence encoders read a misspelt word as another word ("trackng", "退芳" for 退房), and
what a user types in a hurry is mostly that. Chinese is typed by pinyin, so a Chinese typo is nearly
always a character read like the intended one. On bench/data/faq_large's 300 unseen phrasings the
right passage was then found first for 272 instead of 268, and 18 instead of 22 were refused; the
corrections changed none of the general or unanswerable questions of any benchmark set, and none of
the 500 general questions of the single-organisation set (docs/generalization.md).

What it does not do: correct a word into one the text does not contain (no general spell checker:
that turned real words the FAQ lacks into FAQ words, "show up" -> "how up"), correct words of 3
letters or fewer, correct a question that is mostly not English words (French, a product code), or
correct a Chinese typo that is not read like the intended character ("时问" for 时间). The corrected
text is only searched with; the prompt keeps the user's words.

The English dictionary and the SymSpell edit-distance search come from symspellpy (its bundled
82,765-word frequency list); the readings from pypinyin's character table, read as a file: importing
pypinyin also loads its 2.5 MB phrase dictionary (~55 MB of memory), which single characters do not
need.
"""

from __future__ import annotations

import json
import re
import sys
import unicodedata
from collections.abc import Container
from functools import cache
from typing import cast

from loraplex.files import package_file

LATIN = re.compile(r"[A-Za-z]+")
CJK = re.compile(r"[\u3400-\u9fff]")
MIN_LETTERS = 4  # shorter words have too many neighbours one edit away ("fe": fee, few, for...)


@cache
def english_words() -> Container[str]:
    """symspellpy's English frequency list (82,765 lower-case words, ~60 ms once per process), as a
    marisa-trie: ~1 MB where a frozenset of the words held ~7 MB."""
    import marisa_trie

    with open(package_file("symspellpy", "frequency_dictionary_en_82_765.txt"), encoding="utf-8") as f:
        return cast(Container[str], marisa_trie.Trie(line.split(" ", 1)[0] for line in f if line.strip()))


@cache
def readings() -> dict[str, tuple[str, ...]]:
    """Each Chinese character's pinyin readings without tones, the most common first (pypinyin's
    table; ~400 distinct readings, each held once: `sys.intern`)."""
    table = json.loads(package_file("pypinyin", "pinyin_dict.json").read_text(encoding="utf-8"))
    out = {}
    for code, sounds in table.items():
        plain = (sys.intern(_toneless(s)) for s in sounds.split(","))
        out[chr(int(code))] = tuple(dict.fromkeys(plain))
    return out


@cache
def homophones() -> dict[str, tuple[str, ...]]:
    """Each toneless reading's common characters, those read that way first: GB2312's first level,
    the 3,755 characters in everyday use (a pinyin keyboard offers them first), found with Python's
    own codec rather than a list. What a slip on a pinyin keyboard turns a character into
    (assistants/faq.py `noisy`)."""
    out: dict[str, list[str]] = {}
    for c, sounds in readings().items():
        try:
            code = c.encode("gb2312")
        except UnicodeEncodeError:
            continue
        if len(code) == 2 and 0xB0 <= code[0] <= 0xD7 and sounds:  # rows 16-55: level 1
            out.setdefault(sounds[0], []).append(c)  # by its usual reading (弟 is di, not tui)
    return {sound: tuple(chars) for sound, chars in out.items()}


def _toneless(sound: str) -> str:
    """ "lǜ" -> "lv" (as typed: ü is v on a pinyin keyboard), "cān" -> "can"."""
    decomposed = unicodedata.normalize("NFD", sound).replace("u\u0308", "v")
    return "".join(c for c in decomposed if not unicodedata.combining(c))


class Speller:
    """Corrects questions towards `texts` (e.g. a FAQ's questions and answers); built once per text,
    ~1 ms per 100 passages, then ~0.05 ms a question. Safe to share between threads (read-only)."""

    def __init__(self, texts: list[str]):
        from symspellpy import SymSpell

        from loraplex.knowledge.store import words

        counts: dict[str, int] = {}
        for t in texts:
            for w in LATIN.findall(t.lower()):
                counts[w] = counts.get(w, 0) + 1
        self._latin = frozenset(counts)
        self._symspell = SymSpell(max_dictionary_edit_distance=2)
        for w, n in counts.items():
            self._symspell.create_dictionary_entry(w, n)
        # the text's Chinese words (jieba, whole and their parts), by character, and its adjacent
        # character pairs: what a corrected character must complete, and what needs no correcting
        self._words: dict[str, set[str]] = {}
        self._pairs: set[str] = set()
        for t in texts:
            for w in words(t):
                if len(w) >= 2 and all(CJK.match(c) for c in w):
                    for c in w:
                        self._words.setdefault(c, set()).add(w)
            self._pairs.update(t[i : i + 2] for i in range(len(t) - 1) if CJK.match(t[i]) and CJK.match(t[i + 1]))
        self._by_sound: dict[str, set[str]] = {}
        if self._words:
            table = readings()
            for c in self._words:
                for sound in table.get(c, ()):
                    self._by_sound.setdefault(sound, set()).add(c)

    def fix(self, question: str) -> str:
        """`question` with its typos corrected (module docstring); unchanged when it has none."""
        question = self._fix_latin(question)
        if self._by_sound and CJK.search(question):
            question = self._fix_chinese(question)
        return question

    def _fix_latin(self, question: str) -> str:
        from symspellpy import Verbosity

        found = LATIN.findall(question)
        dictionary = english_words()
        known = [w.lower() in dictionary or w.lower() in self._latin for w in found]
        if not found or sum(known) * 2 < len(found):  # mostly not English words: leave it
            return question

        def fix(m: re.Match[str]) -> str:
            word = m.group(0)
            low = word.lower()
            if len(low) < MIN_LETTERS or low in dictionary or low in self._latin:
                return word
            best = self._symspell.lookup(low, Verbosity.CLOSEST, max_edit_distance=1 if len(low) < 6 else 2)
            if not best:
                return word
            term: str = best[0].term
            return term.upper() if word.isupper() else term[0].upper() + term[1:] if word[0].isupper() else term

        return LATIN.sub(fix, question)

    def _fix_chinese(self, question: str) -> str:
        from loraplex.knowledge.lexicon import tables

        known = tables().freq  # jieba's dictionary
        table = readings()
        chars = list(question)
        for i, c in enumerate(chars):
            if not CJK.match(c):
                continue
            left = chars[i - 1] + c if i > 0 and CJK.match(chars[i - 1]) else ""
            right = c + chars[i + 1] if i + 1 < len(chars) and CJK.match(chars[i + 1]) else ""
            if not (left or right) or any(w in self._pairs or known.get(w, 0) for w in (left, right) if w):
                continue  # a word with a neighbour (or alone): not a typo
            sound = table.get(c, ("",))[0]  # the reading the user most likely typed
            fits = {d for d in self._by_sound.get(sound, ()) if self._completes(chars, i, d)}
            if len(fits) == 1:
                chars[i] = fits.pop()
        return "".join(chars)

    def _completes(self, chars: list[str], i: int, d: str) -> bool:
        """Whether `d` at position i makes one of the text's Chinese words there."""
        text = "".join(chars[:i]) + d + "".join(chars[i + 1 :])
        for w in self._words[d]:
            start = text.find(w, max(0, i - len(w) + 1))
            if start != -1 and start <= i:
                return True
        return False
