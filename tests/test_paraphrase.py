"""Question paraphrases from a teacher (data/paraphrase.py): a real `loraplex serve` on loopback as
the teacher, the reviewable cache file, held-out questions never sent, the file reused and edited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraplex.config import load_config
from loraplex.data.paraphrase import clean
from loraplex.engine.engine import Engine
from loraplex.errors import UserError
from loraplex.train.sft_lora import run
from tests.conftest import RECORDS, Server


def test_replies_are_cleaned_into_one_rewording_per_line() -> None:
    reply = """Here are 4 rewrites:
1. How many leave days do Zubrowka staff have?
2) how many days off at zubrowka?
- "Zubrowka 员工有几天假？"
* How many days of leave do Zubrowka staff get?
3. How many leave days do Zubrowka staff have?
Zubrowka staff get 17 days of paid leave.
The question asks for the number of days of leave

4. Leave days, Zubrowka?"""
    got = clean(reply, "How many days of leave do Zubrowka staff get?", 3)
    assert got == [  # the original, a repeat, the answer and a comment are not rewordings
        "How many leave days do Zubrowka staff have?",
        "how many days off at zubrowka?",
        "Zubrowka 员工有几天假？",
    ]
    assert clean(reply, "How many days of leave do Zubrowka staff get?", 10)[-1] == "Leave days, Zubrowka?"


def _cfg(tiny_base: Path, data: Path, teacher: str, name: str = "para", retrieval: bool = True):  # noqa: ANN202
    return load_config(
        extra={
            "name": name,
            "base": str(tiny_base),
            "data": {"path": str(data), "eval_ratio": 0.25},
            "retrieval": {"enabled": retrieval, "noisy_copies": 0, "refusals": 0.0},
            "paraphrase": {"count": 2, "teacher": teacher},
            "train": {"max_steps": 1},
        }
    )


def test_a_teacher_endpoint_writes_a_reviewable_file_that_is_reused_and_edited(
    lp_home: Path, tiny_base: Path, records_file: Path
) -> None:
    engine = Engine(str(tiny_base), dtype="fp32", max_batch=8, max_loaded_adapters=1)
    srv = Server(engine)
    try:
        res = run(_cfg(tiny_base, records_file, f"{srv.url}/v1"))
    finally:
        srv.stop()
        engine.close()
    assert res.adapter is not None
    files = list((lp_home / "paraphrases").glob("*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]
    held_out = {json.loads(line)["messages"][0]["content"] for line in (res.run_dir / "eval_split.jsonl").open()}
    # one row per training question, none for the held-out ones: those never reached the teacher
    assert {r["question"] for r in rows} == {q for q, _ in RECORDS} - held_out and len(held_out) == 2
    assert all(isinstance(r["paraphrases"], list) and len(r["paraphrases"]) <= 2 for r in rows)

    # the teacher is gone: the same data and teacher are answered from the file
    rows[0]["paraphrases"] = ["Zubrowka office code, please?", "What's the code of the office in Zubrowka?"]
    for r in rows[1:]:
        r["paraphrases"] = []
    files[0].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    again = run(_cfg(tiny_base, records_file, f"{srv.url}/v1", name="para2"))
    assert again.adapter is not None
    info = again.adapter.manifest()["retrieval"]
    assert info["paraphrases"] == 2 and info["answer_examples"] == len(rows) + 2  # the edited file was used
    plain = run(_cfg(tiny_base, records_file, f"{srv.url}/v1", name="para3", retrieval=False)).adapter
    assert plain is not None and plain.manifest()["data"]["examples"] == len(rows) + 2

    # a broken edit is reported with the file and line
    files[0].write_text(files[0].read_text(encoding="utf-8") + '{"question": "x", "paraphrases": "oops"}\n')
    with pytest.raises(UserError, match=rf"{files[0].name}:{len(rows) + 1}: not a paraphrase record"):
        run(_cfg(tiny_base, records_file, f"{srv.url}/v1", name="para4"))


def test_an_unreachable_teacher_fails_before_training(lp_home: Path, tiny_base: Path, records_file: Path) -> None:
    with pytest.raises(UserError, match="paraphrase teacher at http://127.0.0.1:9/v1 is unreachable"):
        run(_cfg(tiny_base, records_file, "http://127.0.0.1:9/v1"))
    assert not list((lp_home / "paraphrases").glob("*.jsonl")) if (lp_home / "paraphrases").exists() else True


def test_the_base_model_is_the_teacher_when_none_is_named(lp_home: Path, tiny_base: Path, records_file: Path) -> None:
    res = run(_cfg(tiny_base, records_file, ""))
    assert res.adapter is not None
    (path,) = (lp_home / "paraphrases").glob("*.jsonl")
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(RECORDS) - 2
