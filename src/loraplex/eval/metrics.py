"""Per-answer text metrics: exact / normalised match, required keywords, ROUGE-L, BLEU, length.

ROUGE-L comes from `rouge-score` and BLEU from `sacrebleu`, both fed sacrebleu's Chinese tokeniser
(`zh`: every CJK character is a token, Latin words and numbers stay whole, punctuation split off).
rouge-score's own tokeniser keeps only [a-z0-9] and so scores "员工每年有15天带薪年假" against
"员工每年有15天年假" as a perfect match (only "15" survives); character-level tokens are the
convention for Chinese ROUGE/BLEU.

This module scores strings; it does not generate answers or read files (see eval/run.py).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import regex

_PUNCT = regex.compile(r"[\p{P}\p{S}\s]+")


@lru_cache(maxsize=1)
def _zh() -> Any:
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()


def tokens(text: str) -> list[str]:
    """Lower-cased tokens: one per CJK character, whole Latin words and numbers, punctuation apart."""
    return list(_zh()(text.lower()).split())


class _Tokenizer:
    """The object rouge-score asks for (anything with `tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return tokens(text)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_Tokenizer())


def normalise(text: str) -> str:
    """NFKC (full-width to half-width), lower case, no punctuation or whitespace: "15 天。" == "15天"."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


def rouge_l(answer: str, reference: str) -> float:
    return float(_rouge().score(reference, answer)["rougeL"].fmeasure)


def bleu(answer: str, reference: str) -> float:
    """Sentence BLEU (0-100) with exponential smoothing, sacrebleu's default for single sentences."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(answer, [reference], tokenize="zh").score)


def corpus_bleu(answers: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(answers, [references], tokenize="zh").score)


def keyword_recall(answer: str, keywords: list[str]) -> float | None:
    """Share of required keywords found in the answer (normalised both sides); None without keywords."""
    if not keywords:
        return None
    got = normalise(answer)
    return sum(normalise(k) in got for k in keywords) / len(keywords)


@dataclass(frozen=True)
class Scores:
    exact: float
    normalised: float
    keywords: float | None
    rouge_l: float
    bleu: float
    length: int  # characters
    stopped: bool  # ended at end-of-turn (or a stop string), not cut at max_tokens

    @property
    def score(self) -> float:
        """The one number per answer that versions are compared on: keyword recall where the data
        names keywords (what the answer must contain), otherwise ROUGE-L F1; both 0..1."""
        return self.keywords if self.keywords is not None else self.rouge_l


def score(answer: str, reference: str, keywords: list[str], stopped: bool) -> Scores:
    return Scores(
        exact=float(answer.strip() == reference.strip()),
        normalised=float(normalise(answer) == normalise(reference)),
        keywords=keyword_recall(answer, keywords),
        rouge_l=rouge_l(answer, reference),
        bleu=bleu(answer, reference),
        length=len(answer),
        stopped=stopped,
    )
