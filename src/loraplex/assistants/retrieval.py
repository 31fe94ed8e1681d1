"""An assistant's prompt for one request: its system prompt, and the passages its knowledge base
finds for the question, numbered so the answer can cite them.

    messages -> [system: assistant prompt (+ the client's own system text)]
                ... earlier turns unchanged ...
                [user: reference passages [1] [2] ..., instructions, the question]

The passages go into the last user turn, just before the question, rather than into the system
prompt: small models follow what is close to the question. A question for which no passage
reaches the assistant's `min_relevance` is answered without retrieval, or with the assistant's
refusal ("I don't know") when it is set to refuse, or by the base model without the assistant's
adapters when it is set to `base` (what an adapter trained on its own Q&A does, assistants/faq.py:
off-topic questions get the base model's answer, with nothing of the training data in it; a
question whose best passage is about its organisation but not its topic, `min_topic`, is refused). With
`refuse` and `base` the prompt also tells the model to say so when the passages lack the answer.
The templates follow the question's language (Chinese or not), or the first passage's
(`language: passages`, what adapters trained with retrieval use).

Passages that would crowd the answer out of the model's context are dropped, lowest-ranked first.
Knowledge bases stay open between requests (one SQLite connection each, behind a lock; SQLite in
WAL mode sees a re-ingest at once). This module does not generate text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from loraplex.assistants.store import Assistant
from loraplex.errors import UserError
from loraplex.knowledge.relevance import CJK
from loraplex.knowledge.store import Hit, KnowledgeBase

log = logging.getLogger(__name__)
REFUSAL = {
    "zh": "抱歉，知识库中没有与这个问题相关的内容，我不知道答案。",
    "en": "I don't know: nothing in my knowledge base answers this question.",
}
INSTRUCTIONS = {
    "zh": ("请根据下面的参考资料回答问题，并用 [1] 这样的编号注明出处。", "如果参考资料中没有答案，请直接说不知道。"),
    "en": (
        "Answer the question using the reference passages below, and cite the passages you use like [1].",
        "If the passages do not contain the answer, say that you don't know.",
    ),
}
HEADINGS = {"zh": ("参考资料：", "问题："), "en": ("Reference passages:", "Question:")}


@dataclass(frozen=True)
class Source:
    """One passage given to the model, as returned to the client (`sources` in the response)."""

    index: int  # the [n] the answer cites
    document: str  # the file's name
    chunk: int  # which chunk of that file
    text: str
    score: float  # BM25 (0: found by vectors alone)
    relevance: float
    similarity: float | None  # cosine, when the knowledge base has vectors

    def json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prepared:
    messages: list[dict[str, str]]
    sources: list[Source]
    refusal: str | None = None  # set: answer this instead of running the model
    question: str = ""
    base_only: bool = False  # set: nothing relevant was found; the base model answers, without adapters


def language(text: str) -> str:
    return "zh" if CJK.search(text) else "en"


class Searcher:
    """Open knowledge bases, shared by every request (and thread) of a server."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[Searchable, threading.Lock]] = {}
        self._lock = threading.Lock()

    def search(
        self,
        base: str,
        question: str,
        k: int,
        min_relevance: float,
        min_similarity: float | None = None,
        min_topic: float | None = None,
    ) -> list[Hit]:
        with self._lock:
            entry = self._open.get(base)
            if entry is None:
                entry = self._open[base] = (_open(base), threading.Lock())
        kb, lock = entry
        with lock:
            return kb.search(question, k, min_relevance, min_similarity, min_topic)

    def warm(self, bases: list[str]) -> None:
        """Open these knowledge bases and load the word segmenter, IDF table and spelling tables now."""
        from loraplex.knowledge.relevance import weight
        from loraplex.knowledge.spelling import english_words, readings
        from loraplex.knowledge.store import words

        weight("预热")
        words("预热 warm up")  # jieba's dictionary
        english_words(), readings()  # an adapter's typo correction: ~0.2 s and ~15 MB
        for base in bases:
            try:
                self.search(base, "预热 warm up", 1, 1.0)
            except UserError as e:  # a missing base is reported to the requests that need it
                log.warning("knowledge base %s: %s", base, e)

    def close(self) -> None:
        with self._lock:
            for kb, _ in self._open.values():
                kb.close()
            self._open.clear()


class Searchable(Protocol):
    """What a request searches: a knowledge base, or an adapter version's own Q&A (faq.Index)."""

    def search(
        self, query: str, k: int, min_relevance: float, min_similarity: float | None, min_topic: float | None = None
    ) -> list[Hit]:
        """`min_topic`: the threshold the caller will compare the first hit's `Hit.topic` with, so a
        search may skip work that cannot change that comparison (faq.Index); None: compute it all."""
        ...

    def close(self) -> None: ...


def _open(base: str) -> Searchable:
    """A knowledge base by name, or an adapter version's own Q&A (`NAME@vN`, assistants/faq.py)."""
    if "@" not in base:
        return KnowledgeBase(base, shared=True)
    from loraplex.adapters import registry
    from loraplex.assistants import faq

    ref = registry.resolve(base)
    if not (ref.path / faq.FILE).is_file():
        raise UserError(f"adapter {ref.id} was trained without retrieval: it has no knowledge of its own")
    settings = ref.manifest().get("retrieval")
    offtopic = isinstance(settings, dict) and bool(settings.get("offtopic"))  # versions trained before: no
    refusing = isinstance(settings, dict) and settings.get("refuse_below") is not None  # and before this
    english = isinstance(settings, dict) and bool(settings.get("english"))  # and before the English encoder
    spelling = isinstance(settings, dict) and bool(settings.get("spelling"))  # and before typo correction
    bilingual = isinstance(settings, dict) and bool(settings.get("bilingual"))  # and before translation
    english_topic = isinstance(settings, dict) and bool(settings.get("english_topic"))  # and before this
    english_gate = isinstance(settings, dict) and bool(settings.get("english_gate"))  # and before this
    return faq.Index(
        faq.read(ref.path / faq.FILE),
        offtopic=offtopic,
        named=refusing,
        english=english,
        spelling=spelling,
        bilingual=bilingual,
        english_topic=english_topic,
        english_gate=english_gate,
    )


def prepare(
    assistant: Assistant,
    messages: list[dict[str, str]],
    searcher: Searcher,
    retrieval: bool = True,
    fits: Callable[[list[dict[str, str]]], bool] | None = None,
) -> Prepared:
    """The messages the model sees for `messages` sent to `assistant`, and the sources used.

    `fits(messages)` says whether a prompt leaves room for the answer in the model's context; the
    lowest-ranked passages are dropped until it does. `retrieval=False` skips the knowledge base
    (for evaluating what retrieval adds)."""
    msgs = [dict(m) for m in messages]
    if assistant.system_prompt:
        if msgs and msgs[0]["role"] == "system":
            # the assistant's prompt first; the client's own system text is kept, after it
            msgs[0]["content"] = f"{assistant.system_prompt}\n\n{msgs[0]['content']}".strip()
        else:
            msgs.insert(0, {"role": "system", "content": assistant.system_prompt})
    kn = assistant.knowledge
    last = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i]["role"] == "user"), None)
    if kn is None or not retrieval or last is None:
        return Prepared(msgs, [])
    question = msgs[last]["content"]
    hits = searcher.search(kn.base, question, kn.top_k, kn.min_relevance, kn.min_similarity, kn.min_topic)
    lang = language(question)
    if not hits:
        if kn.when_nothing_found == "refuse":
            return Prepared(msgs, [], kn.refusal or REFUSAL[lang], question)
        if kn.when_nothing_found == "base":
            # the client's messages as they came: the assistant's prompt belongs to its adapters
            return Prepared([dict(m) for m in messages], [], None, question, base_only=True)
        return Prepared(msgs, [], None, question)
    if kn.min_topic is not None and hits[0].topic is not None and hits[0].topic < kn.min_topic:
        # found only by the organisation's name: the answer is not in the knowledge (faq.py)
        return Prepared(msgs, [], kn.refusal or REFUSAL[lang], question)
    sources = [
        Source(
            i,
            Path(h.source).name,
            h.ord,
            h.text,
            round(h.score, 4),
            round(h.relevance, 4),
            None if h.similarity is None else round(h.similarity, 4),
        )
        for i, h in enumerate(hits, 1)
    ]
    while sources:
        with_passages = [
            *msgs[:last],
            {**msgs[last], "content": render(question, sources, kn.when_nothing_found != "answer", kn.language)},
            *msgs[last + 1 :],
        ]
        if fits is None or fits(with_passages):
            return Prepared(with_passages, sources, None, question)
        sources = sources[:-1]
    return Prepared(msgs, [], None, question)  # not even one passage fits: answer without them


def render(
    question: str, sources: list[Source], dont_know: bool, lang_of: Literal["question", "passages"] = "question"
) -> str:
    """The last user turn: instructions, the passages, the question. `lang_of`: "question" or
    "passages", whose language (Chinese or not) the instructions and headings are in."""
    lang = language(sources[0].text if lang_of == "passages" and sources else question)
    cite, unknown = INSTRUCTIONS[lang]
    passages, asked = HEADINGS[lang]
    lines = [cite + (" " + unknown if dont_know else ""), "", passages]
    lines += [f"[{s.index}] ({s.document}) {s.text}" for s in sources]
    lines += ["", f"{asked}{question}" if lang == "zh" else f"{asked} {question}"]
    return "\n".join(lines)
