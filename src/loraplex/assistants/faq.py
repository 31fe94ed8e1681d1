"""An adapter's own knowledge: its training Q&A, searched when it answers, and the retrieval-augmented
training examples that teach it to answer from what is found (SFT + RAG).

    train:  records -> one passage per question/answer pair (knowledge.jsonl, stored with the version)
            each record -> its question (+ noisy copies, teacher paraphrases when asked for)
                           + the passages the search finds for it, its own among them -> the answer
                           + only the others (retrieval.refusals, off by default) -> "I don't know"
    serve:  question -> its typos corrected towards the Q&A's words (knowledge/spelling.py)
            -> passages found in the version's knowledge.jsonl -> the same prompt
            found, but only about the same organisation (retrieval.refuse_below) -> "I don't know"
            nothing relevant found -> the base model answers, without the adapter

Why: a FAQ has one phrasing per answer, and a small model fine-tuned on it learns that phrasing,
not the fact; a user who words the question differently gets a wrong answer (quickstart, plain
SFT: 5/20 held-out paraphrases). Finding the passage by meaning and copying the answer out of it
does not depend on the phrasing the adapter saw (bench/generalization.py measures both). A question
the FAQ cannot answer ("Does Northwind Robotics provide free lunch?") is close to every passage that
names the same organisation; with the FAQ's names taken out of both, it is far from all of them, and
it is answered "I don't know" rather than from the closest passage (`Hit.topic`). What it does not
do: tell a passage that answers from one on the same topic that does not (docs/generalization.md).

The prompt is the assistants' own (retrieval.render), so `hr@v2` behaves like an assistant whose
knowledge base is its training data. The passages are found by meaning, not by words: the built-in
multilingual sentence encoder (knowledge/embedder.py) embeds each question, and each question
with its answer, when the version is first used (about 1 ms a passage), and a request's question is
compared with both (the mean of the two cosines). On bench/data/faq_large's unseen phrasings that
finds the right passage first for 86%, where BM25 over words found 47%; it also carries a
question in Chinese to an answer written in English. A passage is used when its similarity
reaches `retrieval.min_similarity` (general questions stay below about 0.5 on both benchmark
sets, FAQ paraphrases that name the organisation above it), when the question is closer to it than
to any built-in off-topic question (offtopic.txt: a question that does not name the organisation,
as its own staff ask, often stays under 0.5), or when it contains every informative word of the
question.

This module does not train (train/sft_lora.py) or generate.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np

from loraplex.adapters import registry
from loraplex.assistants.retrieval import REFUSAL, Source, language, render
from loraplex.assistants.store import AdapterPart, Assistant, Knowledge
from loraplex.data.formats import Conversation
from loraplex.errors import UserError
from loraplex.knowledge.bilingual import Bridge, mixed
from loraplex.knowledge.embedder import Multilingual
from loraplex.knowledge.embedder import english as english_encoder
from loraplex.knowledge.relevance import CJK, relevance
from loraplex.knowledge.spelling import Speller, homophones, readings
from loraplex.knowledge.store import Hit, words
from loraplex.threads import cores

FILE = "knowledge.jsonl"
LATIN_WORD = re.compile(r"[A-Za-z][\w&-]*")
CJK_RUN = re.compile(r"[\u3400-\u9fff]+")
MIN_SIMILARITY = 0.5  # versions trained before the setting existed
DOCUMENT = "faq"  # the name the passages are cited by: "[1] (faq) ..."
# The prompt's instructions are in the passage's language, not the question's: every wording of a
# question that finds a passage then shares one prompt prefix, which the prefix cache keeps (a
# Chinese question about an English answer re-prefilled it: +22 ms to the first token on
# faq_large, against +12 ms on the sample). Versions trained before this keep "question".
LANGUAGE: Literal["question", "passages"] = "passages"


@dataclass(frozen=True)
class Pair:
    question: str
    answer: str
    source: str  # "path:line" of the record

    @property
    def passage(self) -> tuple[str, str]:
        """What the prompt shows (the answer) and what it is found by (question and answer). The
        question is left out of the prompt on purpose: shown verbatim, it taught the adapter to
        answer only when the user's words match the FAQ's (a string match), and to refuse
        paraphrases (bench/generalization.py: 55% unseen with it)."""
        return self.answer, f"{self.question} {self.answer}"


def pairs_of(conversations: list[Conversation]) -> list[Pair]:
    """The single-turn question/answer records (a system message may precede them); multi-turn
    dialogues and records with tools are not passages."""
    out = []
    for c in conversations:
        if c.tooled is not None:  # a tool call is not an answer to look up
            continue
        turns = [m for m in c.messages if m["role"] != "system"]
        if len(turns) == 2 and turns[0]["role"] == "user" and turns[1]["role"] == "assistant":
            out.append(Pair(turns[0]["content"].strip(), turns[1]["content"].strip(), c.source))
    return out


def write(path: Path, pairs: list[Pair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps({"question": p.question, "answer": p.answer, "source": p.source}, ensure_ascii=False))
            f.write("\n")


def read(path: Path) -> list[Pair]:
    pairs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            rec = json.loads(line)
            pairs.append(Pair(str(rec["question"]), str(rec["answer"]), str(rec.get("source", ""))))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path}:{i}: not a knowledge record ({e})") from None
    return pairs


class Index:
    """A version's Q&A, searched by meaning (module docstring); safe to share between threads.

    `named`: a question that names one of the organisations the FAQ is about (`TOPIC_SHARE`) and
    finds nothing gets its closest passage anyway, so that `Hit.topic` can tell it apart (such a
    question is about the organisation, and the base model knows nothing of it). Why: 2 of the
    sample's 10 unanswerable questions ("明澜科技的创始人是谁？") found nothing, and the base model
    made up an answer.

    `offtopic`: also use a passage whose similarity is under `min_similarity` when the question is
    still closer to it than to every built-in off-topic question (offtopic.txt), the
    similarity then also measured with the FAQ's shared names taken out (`shared_terms`). Why: the
    fixed threshold was set on questions that name the organisation, as the FAQ does; an employee
    asking an assistant trained on one company's FAQ rarely does. With the name left out, 38% of
    faq_large's unseen phrasings found their passage among their own organisation's ten pairs;
    with this rule 80%, while of 500 general questions (50 asked of each of those ten FAQs) 2
    passed instead of 0 (docs/generalization.md).

    `english`: a question written in English letters re-orders its `RERANK` best passages that are
    too (`english_letters`) by the mean of the multilingual similarity and an English-only encoder's
    (knowledge/embedder.py `english`, the same mean over question and question + answer). Only
    the order changes: which passages may be used, and `Hit.similarity` and `topic`, stay the
    multilingual encoder's, so every threshold keeps its meaning. Why: the multilingual encoder
    ranks the right passage first for 79% of faq_large's 125 unseen phrasings written without
    Chinese, against 91% of the others; with the second opinion 86% (docs/generalization.md).

    `spelling`: a question's typos are corrected towards the pairs' own words before anything else
    (knowledge/spelling.py: "brekfast" -> "breakfast", "早參" -> 早餐); the search, the gates and
    `Hit.topic` all read the corrected question. Why: a misspelt word is another word to the
    encoders; on faq_large's unseen phrasings 268 -> 272 of 300 found first, 22 -> 18 refused.

    `bilingual`: a question that mixes Chinese and English is also searched with its other-language
    words translated into the language of the pairs it asks about (those of the organisation it
    names, or all of them), towards the pairs' own words (knowledge/bilingual.py: "云杉酒店的
    check-out time 是几点？" + 退房), and ranked by the mean of both similarities; `Hit.topic` is
    the mean of both too, the gates read the question as asked. Why: the encoders read a mixed
    question by its words' own language ("check-out time" in a Chinese question found check-in).

    `english_topic`: for a question in English letters, `Hit.topic` of a pair in English letters is
    the larger of both encoders' (the English one's with the names taken out as well). Why: a
    colloquial English question with the name taken out ("when can I visit?") is too little for
    the multilingual encoder: 18 of faq_large's 300 unseen phrasings were refused, 14 with the
    second opinion, and the same unanswerable questions (docs/generalization.md).

    `english_gate` (with `offtopic`): a question in English letters also passes the off-topic gate
    for a pair in English letters that the English encoder finds closer to it, with the FAQ's
    shared names taken out of the pair, than to every built-in off-topic question in English
    letters. Why: asked of one company's assistant without its name, "what time can I eat
    breakfast?" was closer to "What is a healthy breakfast?" than to the hotel's breakfast pair for
    the multilingual encoder, and the base model answered it; of faq_large's ten one-organisation
    FAQs, 27 of 300 unseen phrasings without the name went to the base model, 15 with this gate,
    and none more of 500 general questions (docs/generalization.md)."""

    def __init__(
        self,
        pairs: list[Pair],
        offtopic: bool = False,
        named: bool = False,
        english: bool = False,
        spelling: bool = False,
        bilingual: bool = False,
        english_topic: bool = False,
        english_gate: bool = False,
    ):
        self.pairs = pairs
        self._speller = Speller([p.passage[1] for p in pairs]) if spelling and pairs else None
        self._named = named
        self._embedder = Multilingual()
        vectors = self._embedder.embed([p.question for p in pairs] + [p.passage[1] for p in pairs])
        self._questions, self._both = vectors[: len(pairs)], vectors[len(pairs) :]
        self._english = english_encoder() if english and pairs else None
        self._latin = np.array([english_letters(p.passage[1]) for p in pairs], bool)
        if self._english is not None:  # the English-only vectors, zero for the pairs it does not rank
            latin = [p for p, ok in zip(pairs, self._latin, strict=True) if ok]
            en = self._english.embed([p.question for p in latin] + [p.passage[1] for p in latin])
            self._en_questions = np.zeros((len(pairs), en.shape[1]), np.float32)
            self._en_both = np.zeros_like(self._en_questions)
            self._en_questions[self._latin], self._en_both[self._latin] = en[: len(latin)], en[len(latin) :]
        self._bridge = Bridge([p.passage[1] for p in pairs]) if bilingual and pairs else None
        self._words = [set(words(p.passage[1])) for p in pairs]
        self._offtopic: np.ndarray | None = None
        self._bare: tuple[np.ndarray, np.ndarray] | None = None
        # every organisation a FAQ names, for `Hit.topic`; fewer pairs each than the gate's names
        self._names = shared_terms(pairs, TOPIC_SHARE) if pairs else []
        self._topic = self._without(self._names)
        self._en_topic: tuple[np.ndarray, np.ndarray] | None = None
        if english_topic and self._english is not None and self._names:  # as _en_questions, names out
            self._en_topic = self._en_without(self._names)
        self._en_gate: tuple[np.ndarray, np.ndarray] | None = None
        if offtopic and pairs:
            self._offtopic = offtopic_vectors()
            names = shared_terms(pairs)
            self._bare = self._topic if names == self._names else self._without(names)
            if english_gate and self._english is not None:  # as _en_topic, with the gate's names out
                if not names:
                    self._en_gate = (self._en_questions, self._en_both)
                elif names == self._names and self._en_topic is not None:
                    self._en_gate = self._en_topic
                else:
                    self._en_gate = self._en_without(names)
                english_offtopic_vectors()  # at load, not in the first request

    def _without(self, names: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
        """The pairs' question and question + answer vectors with `names` taken out (None: no names)."""
        if not names:
            return None
        bare = self._embedder.embed(
            [without(p.question, names) for p in self.pairs] + [without(p.passage[1], names) for p in self.pairs]
        )
        return bare[: len(self.pairs)], bare[len(self.pairs) :]

    def _en_without(self, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """As `_without`, with the English encoder, for the pairs in English letters (zero elsewhere)."""
        assert self._english is not None
        latin = [p for p, ok in zip(self.pairs, self._latin, strict=True) if ok]
        en = self._english.embed(
            [without(p.question, names) for p in latin] + [without(p.passage[1], names) for p in latin]
        )
        out = (np.zeros_like(self._en_questions), np.zeros_like(self._en_questions))
        out[0][self._latin], out[1][self._latin] = en[: len(latin)], en[len(latin) :]
        return out

    def search(
        self,
        query: str,
        k: int,
        min_relevance: float = 1.0,
        min_similarity: float | None = None,
        min_topic: float | None = None,
    ) -> list[Hit]:
        """The k passages most similar to `query`, best first, that reach `min_similarity`, or are
        closer to it than any off-topic question (with `offtopic`), or cover `min_relevance` of its
        informative words (knowledge/relevance.py). Similarity is the mean cosine of the query with
        the pair's question and with question + answer (the question alone matches a short
        rewording best, the pair a question worded like the answer; the mean ranked the right pair
        first for 86% of faq_large's unseen phrasings, the larger of the two for 83%). Each hit's
        `topic` is the same similarity with every organisation the FAQ names (`TOPIC_SHARE`) taken
        out of the query and the pair: what `retrieval.refuse_below` is compared with.

        `min_topic` (the caller's refusal threshold): the English encoder's second opinion on
        `topic` (`english_topic`) is asked only where it can change the decision, when the first
        hit's multilingual `topic` is under it; the other hits' `topic` is then the multilingual
        one's. Why: embedding the question without the names is a third of the English encoder's
        time, the longest step of an English question's search (23.8 -> 19.1 ms held to AVX2)."""
        if not self.pairs:
            return []
        if self._speller is not None:
            query = self._speller.fix(query)
        # the question without the organisations' names (for `topic`)
        bare_query = without(query, self._names) if self._topic is not None else query
        # started first: it runs beside the multilingual one; the question without the names with it
        # where the second opinion on `topic` is always asked (no `min_topic`), else only if needed
        ahead = bare_query if min_topic is None and self._en_topic is not None and bare_query != query else None
        english = self._english_vector(query, ahead)
        translated = self._translated(query)
        # every text in one call (2.8 ms instead of 4.2 on one core for two); each only once
        texts = list(
            dict.fromkeys([query, bare_query] + ([translated, without(translated, self._names)] if translated else []))
        )
        vectors = dict(zip(texts, self._embedder.embed(texts), strict=True))
        q, bare = vectors[query], vectors[bare_query]
        sims = (self._questions @ q + self._both @ q) / 2
        rank = sims  # what orders the passages; the gates below read `sims`, the question as asked
        if translated:
            t = vectors[translated]
            rank = (sims + (self._questions @ t + self._both @ t) / 2) / 2
        near = sims
        if self._bare is not None:  # the names taken out count only for the gate, never the ranking
            near = np.maximum(sims, (self._bare[0] @ q + self._bare[1] @ q) / 2)
        offtopic = float((self._offtopic @ q).max()) if self._offtopic is not None else None
        en_near, en_offtopic = self._english_gate(english)
        terms = list(dict.fromkeys(words(query)))
        found: list[tuple[int, float]] = []
        for i in self._order(rank, english):
            sim, p = float(sims[i]), self.pairs[i]
            rel = relevance(terms, p.passage[1], self._words[i])
            similar = min_similarity is not None and (
                sim >= min_similarity
                or (offtopic is not None and float(near[i]) > offtopic)
                or (en_near is not None and float(en_near[i]) > en_offtopic)
            )
            if similar or rel >= min_relevance:
                found.append((int(i), rel))
                if len(found) == k:
                    break
        if not found and self._named and self._names:
            asked = query.casefold()
            if any(name.casefold() in asked for name in self._names):
                found = [(int(np.argmax(rank)), 0.0)]  # about the organisation: its closest passage
        topic = sims
        if found and self._topic is not None:
            topic = (self._topic[0] @ bare + self._topic[1] @ bare) / 2
            if translated:
                t = vectors[without(translated, self._names)]
                topic = (topic + (self._topic[0] @ t + self._topic[1] @ t) / 2) / 2
            undecided = min_topic is None or float(topic[found[0][0]]) < min_topic  # what the second opinion can change
            if self._en_topic is not None and english is not None and undecided:
                # the question without the names (or as asked: none in it)
                assert self._english is not None  # `english` is its vector
                vectors_en = english.result()
                v = vectors_en[-1] if ahead or bare_query == query else self._english.embed([bare_query])[0]
                topic = np.where(
                    self._latin, np.maximum(topic, (self._en_topic[0] @ v + self._en_topic[1] @ v) / 2), topic
                )
        return [
            Hit(i, DOCUMENT, i, self.pairs[i].answer, 0.0, rel, float(sims[i]), float(topic[i])) for i, rel in found
        ]

    def _english_gate(self, english: Future[np.ndarray] | None) -> tuple[np.ndarray | None, float]:
        """For `english_gate`: the English encoder's similarity of the question as asked to each pair
        in English letters with the FAQ's shared names taken out (-inf for the others), and to the
        closest built-in off-topic question in English letters; (None, inf) where it does not apply."""
        if self._en_gate is None or english is None:
            return None, float("inf")
        v = english.result()[0]
        near = np.where(self._latin, (self._en_gate[0] @ v + self._en_gate[1] @ v) / 2, -np.inf)
        return near, float((english_offtopic_vectors() @ v).max())

    def _translated(self, query: str) -> str | None:
        """`query` with its words in the other language translated (class docstring, `bilingual`),
        or None: not mixed, or nothing to add. The language is that of the pairs of the
        organisations the question names, or of all pairs when it names none."""
        if self._bridge is None or not mixed(query):
            return None
        asked = query.casefold()
        named = [n for n in self._names if n.casefold() in asked]
        about = [i for i, p in enumerate(self.pairs) if any(n.casefold() in p.passage[1].casefold() for n in named)]
        chinese = [not self._latin[i] for i in (about or range(len(self.pairs)))]
        within = [self.pairs[i].passage[1] for i in about] if about else None
        into = "zh" if sum(chinese) * 2 > len(chinese) else "en"
        added = self._bridge.translate(without(query, self._names), into, within)
        return f"{query} {' '.join(added)}" if added else None

    def _english_vector(self, query: str, bare: str | None) -> Future[np.ndarray] | None:
        """The English encoder's vectors of a question in English letters, and of it without the
        names (`bare`, for `english_topic`) when given, computed on another thread where this
        process may use two cores or more; None where it does not rank.

        Why a thread: after a decode step of the server's model has pushed both encoders out of
        the CPU caches, the multilingual one takes ~5 ms and the English one ~8 ms on one core of
        a 2-core Xeon; side by side, an English question's search costs the longer of the two.
        Both release the GIL in their matrix products. The vector is the same either way."""
        encoder = self._english
        if encoder is None or not english_letters(query) or self._latin.sum() < 2:
            return None
        texts = [query] if bare is None else [query, bare]
        future: Future[np.ndarray] = Future()
        if cores() < 2:
            future.set_result(encoder.embed(texts))
            return future
        return _side().submit(encoder.embed, texts)

    def _order(self, sims: np.ndarray, english: Future[np.ndarray] | None) -> np.ndarray:
        """Pair indices best first: by `sims`, the first `RERANK` re-ordered with the English
        encoder's vector (`_english_vector`) for a question in English letters (class docstring)."""
        order = np.argsort(-sims, kind="stable")
        if english is None:
            return order
        v = english.result()[0]
        head = order[:RERANK]
        latin = head[self._latin[head]]
        if len(latin) < 2:
            return order
        score = sims.copy()
        score[latin] = (sims[latin] + (self._en_questions[latin] @ v + self._en_both[latin] @ v) / 2) / 2
        return np.concatenate([head[np.argsort(-score[head], kind="stable")], order[RERANK:]])

    def close(self) -> None:
        """Nothing to release (the knowledge bases' interface: retrieval.Searcher closes what it opened)."""


@cache
def _side() -> ThreadPoolExecutor:
    """The thread that computes English vectors beside the multilingual search (Index._english_vector)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-english")


# a forked child has the executor but not its thread: it starts one of its own when it searches
os.register_at_fork(after_in_child=_side.cache_clear)


RERANK = 8  # passages the English encoder re-orders (faq_large: the right one is in the multilingual top 8 for all 300)
OFFTOPIC = Path(__file__).with_name("offtopic.txt")


def english_letters(text: str) -> bool:
    """No letter outside ASCII: no Chinese, and none of the accented letters of French, German or
    Spanish, which the English-only encoder reads badly (punctuation such as ’ or € is fine)."""
    return not any(ord(c) > 127 and c.isalpha() for c in text)


NAME_SHARE = 0.3  # of the pairs whose question and answer both hold a term, for it to be a shared name
# the same for `Hit.topic`: a FAQ of ten organisations names each in a tenth of its pairs (faq_large),
# and a name found in 5% of them (and 3) is all ten of them there, and only them
TOPIC_SHARE = 0.05


@cache
def offtopic_vectors() -> np.ndarray:
    """The built-in off-topic questions (offtopic.txt), embedded once per process (~0.3 s)."""
    return Multilingual().embed(offtopic_questions())


def offtopic_questions() -> list[str]:
    """offtopic.txt's questions, without its comments and blank lines."""
    lines = [line.strip() for line in OFFTOPIC.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@cache
def english_offtopic_vectors() -> np.ndarray:
    """The built-in off-topic questions in English letters, embedded once per process by the English
    encoder (~0.5 s; only built where `english_gate` is on, so the encoder is there)."""
    encoder = english_encoder()
    assert encoder is not None
    return encoder.embed([q for q in offtopic_questions() if english_letters(q)])


def shared_terms(pairs: list[Pair], share: float = NAME_SHARE) -> list[str]:
    """What many pairs repeat in both question and answer: the organisation's or product's name
    ("Brightwave", "明澜科技"), longest first. Candidates are runs of capitalised words (not a lone
    first word: "What", "How") and Chinese runs of 2-8 characters; a term counts when the question
    and the answer of at least `share` of the pairs (and 3) hold it. A term inside a longer one that
    is as frequent is dropped. A FAQ of many organisations, each in a few pairs, has none."""
    counts: Counter[str] = Counter()
    for p in pairs:
        found: set[str] = set()
        latin = LATIN_WORD.findall(p.question)
        for n in range(1, 5):
            for i in range(len(latin) - n + 1):
                run = latin[i : i + n]
                if all(w[0].isupper() for w in run) and not (n == 1 and p.question.startswith(run[0])):
                    found.add(" ".join(run))
        for run in CJK_RUN.findall(p.question):
            for n in range(2, min(8, len(run)) + 1):
                found.update(run[i : i + n] for i in range(len(run) - n + 1))
        counts.update(t for t in found if t in p.answer)
    need = max(3.0, share * len(pairs))
    kept = [t for t, c in counts.items() if c >= need]
    kept = [t for t in kept if not any(t != u and t in u and counts[u] >= counts[t] for u in kept)]
    return sorted(kept, key=len, reverse=True)


def without(text: str, names: list[str]) -> str:
    """`text` with each of `names` (longest first) and its possessive taken out."""
    for name in names:
        text = re.sub(re.escape(name) + r"(?:'s|’s)?(?:\s*的)?", " ", text)
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- serving side


def assistant(model: str) -> Assistant | None:
    """What a request for `model` (NAME, NAME@vN or NAME@ALIAS) runs when that version was trained
    with retrieval: its adapter, searching its own Q&A, the base model when nothing relevant is
    found. None for anything else (other versions, compositions, weights, the base, unknown names:
    those are served, or refused, as before)."""
    if any(c in model for c in "+: ") or not model:
        return None
    try:
        ref = registry.resolve(model)
        settings = ref.manifest().get("retrieval")
    except (UserError, OSError, ValueError):
        return None
    if not isinstance(settings, dict) or not settings.get("enabled") or not (ref.path / FILE).is_file():
        return None
    return Assistant(
        name=ref.name,
        adapters=[AdapterPart(ref=ref.id)],
        knowledge=Knowledge(
            base=ref.id,
            top_k=settings.get("top_k", 2),
            min_relevance=1.0,
            min_similarity=settings.get("min_similarity", MIN_SIMILARITY),
            when_nothing_found="base",
            min_topic=settings.get("refuse_below"),  # versions trained before it: never refuse
            language=settings.get("language", "question"),
        ),
    )


# ----------------------------------------------------------------------------- training side


def noisy(question: str, rng: random.Random) -> str:
    """The question as a hurried user types it: a typo or two, a dropped word, no capitals or
    final punctuation. Model-free, so it never invents a fact. A Chinese typo is a character read
    the same way (a pinyin keyboard's slip: 挂失 -> 挂矢), as the users' are: with only dropped and
    swapped characters, the adapter still repeated such questions instead of answering them."""
    cjk = bool(CJK.search(question))
    text = question.rstrip("?？!！.。 ")
    units: list[str] = list(text) if cjk else text.split()
    for _ in range(rng.randint(1, 2)):
        if len(units) < 4:
            break
        i = rng.randrange(len(units))
        kind = rng.choice(("drop", "swap", "typo"))
        if kind == "drop":
            del units[i]
        elif kind == "swap" and i + 1 < len(units):
            units[i], units[i + 1] = units[i + 1], units[i]
        elif cjk:
            sound = readings().get(units[i], ("",))[0]
            others = [c for c in homophones().get(sound, ()) if c != units[i]]
            if others:
                units[i] = rng.choice(others)
        elif len(units[i]) > 3:
            w = units[i]
            j = rng.randrange(1, len(w) - 1)
            units[i] = w[:j] + w[j + 1] + w[j] + w[j + 2 :]  # two letters swapped
    out = ("" if cjk else " ").join(units)
    return out.lower() if rng.random() < 0.5 else out


def augment(
    conversations: list[Conversation],
    pairs: list[Pair],
    top_k: int,
    min_similarity: float,
    noisy_copies: int,
    refusals: float,
    seed: int,
    reworded: dict[str, list[str]] | None = None,
    english: bool = False,
    spelling: bool = False,
    bilingual: bool = False,
) -> tuple[list[Conversation], dict[str, int]]:
    """Training conversations with passages in the prompt (see the module docstring), and counts of
    what was made. `reworded` holds teacher paraphrases by record source (data/paraphrase.py), each
    trained like a noisy copy. Multi-turn conversations pass through unchanged. `english`,
    `spelling`, `bilingual`: as Index."""
    kb = Index(pairs, english=english, spelling=spelling, bilingual=bilingual)
    if kb._bridge is not None:  # its tables cached now, so that serving's first mixed question needs no dictionary
        kb._bridge.ready()
    rng = random.Random(seed)
    by_source = {p.source: i for i, p in enumerate(pairs)}
    out: list[Conversation] = []
    counts = {"answer_examples": 0, "noisy_questions": 0, "refusal_examples": 0, "gold_not_found": 0}
    for conv in conversations:
        i = by_source.get(conv.source)
        if i is None:
            out.append(conv)
            continue
        system = [m for m in conv.messages if m["role"] == "system"]
        gold = pairs[i]
        variants = [gold.question] + [noisy(gold.question, rng) for _ in range(noisy_copies)]
        variants += (reworded or {}).get(conv.source, [])
        counts["noisy_questions"] += noisy_copies
        for q in variants:
            found = [h.ord for h in kb.search(q, top_k + 1, 1.0, min_similarity)]
            # the passages serving would show for this wording, in the search's order; the right
            # one replaces the last when the search misses it (the adapter cannot answer what it
            # is not shown). Not shuffled: with the right passage at a random place, the 135M
            # adapter answered 63% of faq_large's unseen phrasings instead of 83% in 4 epochs; it
            # learns to answer from the best match, which the encoder ranks first 84% of the time.
            shown = found[:top_k]
            if i not in shown:
                counts["gold_not_found"] += 1
                shown = [*shown[: top_k - 1], i]
            prompt = render(q, _sources(pairs, shown), True, LANGUAGE)
            out.append(_conv(conv, system, prompt, gold.answer, "answer"))
            counts["answer_examples"] += 1
            others = [o for o in found if pairs[o].answer != gold.answer][:top_k]  # not a duplicate
            if others and rng.random() < refusals:
                # only the others: the answer is not there, and the adapter must say so
                prompt = render(q, _sources(pairs, others), True, LANGUAGE)
                out.append(_conv(conv, system, prompt, REFUSAL[language(q)], "refusal"))
                counts["refusal_examples"] += 1
    return out, counts


def as_served(
    conversations: list[Conversation],
    pairs: list[Pair],
    top_k: int,
    min_similarity: float,
    offtopic: bool = True,
    english: bool = False,
    spelling: bool = False,
    bilingual: bool = False,
) -> list[Conversation]:
    """Eval conversations with the prompt serving would give their question: the passages found in
    `pairs` (the training Q&A), or the question as it is when none is found. No pairs: unchanged."""
    if not pairs:
        return conversations
    # the English gate as serving has it: train records it with the English encoder (train/parts.py)
    kb = Index(pairs, offtopic=offtopic, english=english, spelling=spelling, bilingual=bilingual, english_gate=english)
    out = []
    for conv in conversations:
        turns = [m for m in conv.messages if m["role"] != "system"]
        hits = kb.search(turns[0]["content"], top_k, 1.0, min_similarity) if len(turns) == 2 else []
        if not hits:
            out.append(conv)
            continue
        messages = [dict(m) for m in conv.messages]
        user = next(m for m in messages if m["role"] == "user")
        user["content"] = render(user["content"], _sources(pairs, [h.ord for h in hits]), True, LANGUAGE)
        out.append(Conversation(messages, conv.source, conv.keywords))
    return out


def reworded(conversations: list[Conversation], paraphrases: dict[str, list[str]]) -> list[Conversation]:
    """Plain SFT with paraphrases: each record, then a copy per rewording of its question."""
    out = []
    for conv in conversations:
        out.append(conv)
        for q in paraphrases.get(conv.source, []):
            messages = [dict(m) for m in conv.messages]
            next(m for m in messages if m["role"] == "user")["content"] = q
            out.append(Conversation(messages, f"{conv.source} (paraphrase)", conv.keywords))
    return out


def _sources(pairs: list[Pair], ords: list[int]) -> list[Source]:
    return [Source(n, DOCUMENT, o, pairs[o].answer, 0.0, 0.0, None) for n, o in enumerate(ords, 1)]


def _conv(conv: Conversation, system: list[dict[str, str]], prompt: str, answer: str, kind: str) -> Conversation:
    messages = [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return Conversation(messages, f"{conv.source} ({kind})", conv.keywords if kind == "answer" else ())
