"""Typo correction towards a FAQ's own words (knowledge/spelling.py): what it corrects, and what it
must leave alone (real words the FAQ lacks, short words, other languages, Chinese words that are
words)."""

from __future__ import annotations

import random

from loraplex.assistants.faq import noisy
from loraplex.knowledge.spelling import Speller, homophones, readings

HOTEL = [
    "What time is check-in at Coral Bay Hotel? Check-in at Coral Bay Hotel starts at 3 pm.",
    "When is breakfast served at Coral Bay Hotel? Breakfast at Coral Bay Hotel is served from 6:30 to 10:00.",
    "How do I track a Harborline Shipping parcel? Enter the tracking number on harborline.example.",
    "Does Harborline Shipping offer international shipping? Yes, to 40 countries.",
    "How long does the probation period last? The probation period is 5 months.",
]
CHINESE = [
    "云杉酒店的早餐几点开始？ 云杉酒店的早餐在一楼松风餐厅，7点到10点供应。",
    "云杉酒店可以延迟退房吗？ 云杉酒店可延迟退房到下午4点，收半天房费。",
    "云杉酒店有接机服务吗？ 云杉酒店提供接机服务，每次150元，需提前一天预约。",
    "青禾物流的试用期多长时间？ 青禾物流的试用期是三个月。",
]


def test_english_typos_become_the_faqs_words_and_keep_their_case() -> None:
    speller = Speller(HOTEL)
    assert speller.fix("Coral Bay Hotel brekfast hours?") == "Coral Bay Hotel breakfast hours?"
    assert speller.fix("Harborline Shipping internatonal?") == "Harborline Shipping international?"
    assert speller.fix("Coral Bay Hotell check in time?") == "Coral Bay Hotel check in time?"
    assert speller.fix("PROBATON length?") == "PROBATION length?"
    assert speller.fix("how long is the probaton") == "how long is the probation"


def test_real_words_short_words_and_other_languages_are_left_alone() -> None:
    speller = Speller(HOTEL)
    for question in (
        "can I just show up at Coral Bay Hotel without booking?",  # "show" is a word, not "how"
        "does the hotel have a gym?",  # a word the FAQ lacks stays what it is
        "Coral Bay Hotel wifi fe?",  # 3 letters or fewer: too many neighbours
        "quelle heure ouvre le petit déjeuner?",  # mostly not English words
        "What is Zyxwvut?",  # no FAQ word within reach
    ):
        assert speller.fix(question) == question


def test_chinese_typos_typed_by_pinyin_become_the_faqs_characters() -> None:
    speller = Speller(CHINESE)
    assert speller.fix("云杉酒店早參时间？") == "云杉酒店早餐时间？"  # 參 is read cān, like 餐
    assert speller.fix("云杉酒店延迟退芳怎么收费？") == "云杉酒店延迟退房怎么收费？"
    assert speller.fix("云杉酒店接机服物多少钱？") == "云杉酒店接机服务多少钱？"
    assert speller.fix("青禾物流试用其多长时间？") == "青禾物流试用期多长时间？"


def test_chinese_words_and_typos_of_another_sound_are_left_alone() -> None:
    speller = Speller(CHINESE)
    for question in (
        "云杉酒店的行长是谁？",  # 是 makes a word with neither neighbour, but 时 (shí, as in 时间) is no fix
        "周末能去云杉酒店吃饭吗？",  # 去 and 取 (qǔ) sound alike; 去 is a word
        "云杉酒店营业时问？",  # 问 is not read like 间: not a pinyin typo, not corrected
        "云杉酒店的 breakfast 几点？",  # English inside Chinese, spelt right
    ):
        assert speller.fix(question) == question
    assert Speller([]).fix("云杉酒店早參时间？") == "云杉酒店早參时间？"  # nothing to correct towards


def test_readings_are_pinyin_without_tones_most_common_first() -> None:
    table = readings()
    assert table["餐"][0] == "can" and table["參"][0] == "can"
    assert table["绿"][0] == "lv"  # ü is typed v
    assert len(table) > 40_000


def test_homophones_are_the_common_characters_read_that_way_first() -> None:
    table = homophones()
    assert sum(map(len, table.values())) == 3755  # GB2312 level 1, each under its usual reading
    assert "退" in table["tui"] and "推" in table["tui"] and "弟" not in table["tui"]  # 弟 is di first
    assert "失" in table["shi"] and "矢" in table["shi"] and "龘" not in table["da"]  # not a rare one


def test_noisy_chinese_copies_hold_pinyin_slips() -> None:
    """Training's noisy copies of a Chinese question (assistants/faq.py `noisy`) hold the typos users
    make on a pinyin keyboard: a character swapped for a common one read the same way, as well as
    dropped and swapped characters; the question's own characters otherwise."""
    rng = random.Random(3)
    question = "云杉酒店可以延迟退房吗？"
    slips = 0
    for _ in range(200):
        copy = noisy(question, rng)
        assert not copy.endswith("？")
        new = [c for c in copy if c not in question]
        for c in new:  # only same-reading slips bring characters the question lacks
            assert any(readings()[c][0] == readings()[o][0] for o in question if o in readings())
        slips += bool(new)
    assert 30 < slips < 170  # one kind of noise among three
