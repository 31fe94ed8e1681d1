"""How much of a question a passage covers: the threshold behind "answer without retrieval".

BM25 scores rank passages for one query but cannot be compared across queries or knowledge bases
(they grow with query length and shrink with corpus size), so a fixed BM25 cut-off would mean
something different for every question. Relevance here is the share of the question's informative
words that the passage contains, each word weighted by its inverse document frequency:

    relevance = sum(idf(w) for w in question if w in passage) / sum(idf(w) for w in question)

in [0, 1]. The IDFs are jieba's, estimated on a large Chinese corpus (shipped with jieba), because a
knowledge base of a few documents has no usable statistics of its own; words jieba does not know
(English words, names, codes) get its median IDF, and function words (the, 的, 吗...) weigh nothing.
A Chinese word counts as present when the passage contains it as a substring (假 in 假期), since
segmentation of a question and of a passage need not cut the same way; other words must match
whole words.

This module does not rank passages (store.py does, with BM25).
"""

from __future__ import annotations

import re
from functools import lru_cache

from loraplex.knowledge import lexicon
from loraplex.knowledge.lexicon import Table

CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
# English function and question words (jieba's own list has 31 of them), and Chinese ones: words
# that say nothing about what is being asked ("how many", "get", 多久: a general question that
# shares only these with a FAQ passage is not about it).
_ENGLISH = """a about all am an and any are as at be been but by can could did do does for from had has have he
her him his how i if in into is it its me my no not of on one or our please she should so tell than that the their
them then there these they this those to us was we were what when where which who whom why will with would you your
many much often get gets got give gives"""
_CHINESE = """的 了 是 吗 呢 吧 啊 么 在 和 与 及 或 有 我 你 他 她 它 们 我们 你们 请 请问 一下 什么 怎么 怎样 如何
哪 哪里 多少 几 为什么 能 可以 要 会 这 那 这个 那个 是不是 有没有 多长 多久 几个 需要"""
STOP = frozenset(_ENGLISH.split()) | frozenset(_CHINESE.split())


def _idf() -> tuple[Table, float]:
    """jieba's IDF table (`jieba/analyse/idf.txt`) and its median, as jieba.analyse's TF-IDF reads
    them, held compactly (lexicon.py). Why not `jieba.analyse.default_tfidf`: importing
    `jieba.analyse` also loads its part-of-speech tagger's tables, which this never uses: ~95 MiB of
    a server's resident memory (tests/test_knowledge.py checks the two tables are the same)."""
    t = lexicon.tables()
    return t.idf, t.median_idf


@lru_cache(maxsize=8192)  # a trie lookup costs ~1 us; a search weighs the same words for every passage
def weight(word: str) -> float:
    if word in STOP:
        return 0.0
    if word.isdigit() and len(word) <= 2:
        return 1.0  # a day or a count: some evidence, not a topic
    freq, median = _idf()
    return float(freq.get(word, median))  # type: ignore[arg-type]  # median is a float


def relevance(question_words: list[str], passage_text: str, passage_words: set[str]) -> float:
    """The IDF-weighted share of `question_words` found in the passage (0 when none weighs anything)."""
    text = passage_text.lower()
    total = got = 0.0
    for w in dict.fromkeys(question_words):
        wt = weight(w)
        total += wt
        if w in passage_words or (CJK.search(w) and w in text):
            got += wt
    return got / total if total > 0 else 0.0
