"""Parsers on valid and invalid inputs, with property tests for the text formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loraplex.data.formats import FormatOptions, parse_file, render_dialogue
from loraplex.errors import UserError


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_alpaca_jsonl_with_input_system_history(tmp_path: Path) -> None:
    rec = {
        "instruction": "总结",
        "input": "合同第三条",
        "output": "甲方付款。",
        "system": "你是律师",
        "history": [["你好", "您好！"]],
    }
    r = parse_file(write(tmp_path, "a.jsonl", json.dumps(rec, ensure_ascii=False) + "\n"))
    assert r.format == "alpaca" and not r.errors
    assert r.conversations[0].messages == [
        {"role": "system", "content": "你是律师"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "您好！"},
        {"role": "user", "content": "总结\n\n合同第三条"},
        {"role": "assistant", "content": "甲方付款。"},
    ]


def test_alpaca_json_array_reports_line_of_each_bad_record(tmp_path: Path) -> None:
    text = '[\n  {"instruction": "q1", "output": "a1"},\n  {"instruction": "q2", "output": ""},\n  {"instruction": "q3"}\n]\n'
    r = parse_file(write(tmp_path, "a.json", text))
    assert len(r.conversations) == 1
    assert [(e.source.rsplit(":", 1)[1], e.field) for e in r.errors] == [("3", "output"), ("4", "output")]
    assert "empty" in r.errors[0].reason and "missing" in r.errors[1].reason


def test_messages_multiturn_and_errors(tmp_path: Path) -> None:
    good = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": [{"type": "text", "text": "u2"}]},
            {"role": "assistant", "content": "a2"},
        ]
    }
    bad_role = {"messages": [{"role": "customer", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    lines = [json.dumps(good), "{not json", json.dumps(bad_role), json.dumps(no_answer)]
    r = parse_file(write(tmp_path, "m.jsonl", "\n".join(lines) + "\n"))
    assert r.format == "messages"
    assert len(r.conversations) == 1 and len(r.conversations[0].messages) == 5
    assert r.conversations[0].messages[3]["content"] == "u2"
    by_line = {e.source.rsplit(":", 1)[1]: e for e in r.errors}
    assert set(by_line) == {"2", "3", "4"}
    assert "malformed JSON" in by_line["2"].reason
    assert by_line["3"].field == "messages[0].role" and "customer" in by_line["3"].reason
    assert "assistant" in by_line["4"].reason


def test_sharegpt(tmp_path: Path) -> None:
    rec = {"system": "sys", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    bad = {"conversations": [{"from": "martian", "value": "q"}, {"from": "gpt", "value": "a"}]}
    r = parse_file(write(tmp_path, "s.jsonl", json.dumps(rec) + "\n" + json.dumps(bad) + "\n"))
    assert r.format == "sharegpt"
    assert r.conversations[0].messages[0] == {"role": "system", "content": "sys"}
    assert r.errors[0].field == "conversations[0].from"


def test_csv_tsv_columns_and_quoted_newlines(tmp_path: Path) -> None:
    text = '问题,答案\n"年假几天？","15天\n（试用期后）"\n空答案,\n'
    r = parse_file(write(tmp_path, "qa.csv", text))
    assert r.conversations[0].messages[1]["content"] == "15天\n（试用期后）"
    assert r.errors[0].source.endswith(":4") and r.errors[0].field == "答案"
    t = parse_file(
        write(tmp_path, "qa.tsv", "Q\tA\nhello\tworld\n"), FormatOptions(question_column="Q", answer_column="A")
    )
    assert t.conversations[0].messages[0]["content"] == "hello"
    with pytest.raises(UserError, match="cannot find the question column"):
        parse_file(write(tmp_path, "x.csv", "foo,bar\n1,2\n"))


def test_dialogue_text_roles_and_colons(tmp_path: Path) -> None:
    text = "用户：合同可以口头约定吗？\n律师: 可以，但建议书面。\n第二行补充。\n\n用户：违约金多少？\n律师：不超过损失的30%。\n"
    r = parse_file(write(tmp_path, "d.txt", text))
    assert not r.errors and len(r.conversations) == 2
    assert r.conversations[0].messages[1] == {"role": "assistant", "content": "可以，但建议书面。\n第二行补充。"}
    assert r.conversations[1].source.endswith(":5")
    configured = parse_file(
        write(tmp_path, "e.txt", "客户：hi\n法务：hello\n"),
        FormatOptions(user_names=("客户",), assistant_names=("律师",)),
    )
    assert "法务" in configured.errors[0].reason


def test_non_utf8_file_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "gbk.jsonl"
    p.write_bytes(json.dumps({"instruction": "年假", "output": "十五天"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(UserError, match=r"gbk.jsonl:1: not valid UTF-8.*GB18030"):
        parse_file(p)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"instruction": "q", "output": "a"}).encode())
    assert len(parse_file(p).conversations) == 1


# ---- property tests: text formats round-trip whatever the content

safe_text = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="\r\n\x85"),
        min_size=1,
        max_size=40,
    )
    .map(str.strip)
    .filter(lambda s: bool(s) and not s.startswith(("用户", "助手", "系统")))
)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    turns = draw(st.integers(1, 3))
    msgs = []
    for _ in range(turns):
        msgs += [{"role": "user", "content": draw(safe_text)}, {"role": "assistant", "content": draw(safe_text)}]
    return msgs


@settings(max_examples=60, deadline=None)
@given(st.lists(conversations(), min_size=1, max_size=4))
def test_dialogue_round_trip(tmp_path_factory: pytest.TempPathFactory, convs: list[list[dict[str, str]]]) -> None:
    # A line that itself looks like "name: text" would be a new turn: that is the format's rule.
    for c in convs:
        for m in c:
            if any(ch in m["content"][:33] for ch in ":："):
                return
    p = tmp_path_factory.mktemp("dlg") / "d.txt"
    p.write_text(render_dialogue(convs), encoding="utf-8")
    r = parse_file(p)
    assert not r.errors
    assert [c.messages for c in r.conversations] == convs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(safe_text, safe_text), min_size=1, max_size=10))
def test_csv_round_trip(tmp_path_factory: pytest.TempPathFactory, pairs: list[tuple[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["question", "answer"])
    w.writerows(pairs)
    p = tmp_path_factory.mktemp("csv") / "qa.csv"
    p.write_text(buf.getvalue(), encoding="utf-8")
    r = parse_file(p)
    assert not r.errors
    assert [(c.messages[0]["content"], c.messages[1]["content"]) for c in r.conversations] == pairs


LEAVE_TOOL = {
    "name": "get_leave_days",
    "description": "Days of annual leave left",
    "parameters": {"type": "object", "properties": {"employee": {"type": "string"}}, "required": ["employee"]},
}


def test_tool_calls_in_training_data_read_as_the_server_renders_them(tmp_path: Path) -> None:
    """OpenAI's fine-tuning records with `tools`, assistant `tool_calls` and `tool` results, and
    LLaMA-Factory's sharegpt `function_call` / `observation` turns with `tools` as JSON text, become
    the same text turns the server writes for that conversation (data/hermes.py): an adapter learns
    the calls it is later asked for."""
    from loraplex.api import tools
    from loraplex.api.schemas import ChatCompletionRequest

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_leave_days", "arguments": '{"employee": "王芳"}'},
    }
    openai_record = {
        "tools": [{"type": "function", "function": LEAVE_TOOL}],
        "messages": [
            {"role": "user", "content": "王芳还有几天年假？"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"days": 7}'},
            {"role": "assistant", "content": "王芳还有 7 天年假。"},
        ],
    }
    sharegpt_record = {
        "tools": json.dumps([LEAVE_TOOL], ensure_ascii=False),
        "conversations": [
            {"from": "human", "value": "王芳还有几天年假？"},
            {
                "from": "function_call",
                "value": json.dumps({"name": "get_leave_days", "arguments": {"employee": "王芳"}}, ensure_ascii=False),
            },
            {"from": "observation", "value": '{"days": 7}'},
            {"from": "gpt", "value": "王芳还有 7 天年假。"},
        ],
    }
    got = [
        parse_file(write(tmp_path, f"{name}.jsonl", json.dumps(rec, ensure_ascii=False) + "\n"))
        .conversations[0]
        .messages
        for name, rec in (("openai", openai_record), ("sharegpt", sharegpt_record))
    ]
    req = ChatCompletionRequest(model="hr", messages=openai_record["messages"][:3], tools=openai_record["tools"])

    class NoTools:  # a chat template without tool support (SmolLM2's): the Hermes text path
        chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    served, _ = tools.messages_for(NoTools(), req.messages, tools.plan(req))
    assert got[0] == got[1] == [*served, {"role": "assistant", "content": "王芳还有 7 天年假。"}]
    assert got[0][0]["role"] == "system" and '"name": "get_leave_days"' in got[0][0]["content"]
    assert (
        got[0][2]["content"]
        == '<tool_call>\n{"name": "get_leave_days", "arguments": {"employee": "王芳"}}\n</tool_call>'
    )
    assert got[0][3] == {"role": "user", "content": '<tool_response>\n{"days": 7}\n</tool_response>'}


@pytest.mark.parametrize(
    ("template", "call"),
    [
        ("qwen2_5", '<tool_call>\n{"name": "get_leave_days", "arguments": {"employee": "王芳"}}\n</tool_call>'),
        ("llama3_1", '{"name": "get_leave_days", "parameters": {"employee": "王芳"}}'),
    ],
)
def test_tool_records_train_in_the_templates_own_format_on_a_base_with_tool_support(
    template: str, call: str, tiny_base: Path, tmp_path: Path
) -> None:
    """On a base whose chat template renders tools (Qwen2.5, Llama-3.1, as their repositories ship
    them), a record with tools is trained as that template renders it: the prompt the server sends
    for the same conversation is exactly the start of the training example, and the loss is on the
    call in the template's own format, which is what serving constrains and parses."""
    from transformers import AutoTokenizer

    from loraplex.api import tools
    from loraplex.api.schemas import ChatCompletionRequest
    from loraplex.data.tokenize import IGNORE, encode_all

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = (Path(__file__).parent / "data" / "chat_templates" / f"{template}.jinja").read_text()
    record = {
        "tools": [{"type": "function", "function": LEAVE_TOOL}],
        "messages": [
            {"role": "user", "content": "王芳还有几天年假？"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_leave_days", "arguments": '{"employee": "王芳"}'}}
                ],
            },
        ],
    }
    convs = parse_file(write(tmp_path, "t.jsonl", json.dumps(record, ensure_ascii=False) + "\n")).conversations
    [ex], stats = encode_all(tok, convs, 4096)
    assert stats.examples == 1
    req = ChatCompletionRequest(model="hr", messages=record["messages"][:1], tools=record["tools"])
    messages, functions = tools.messages_for(tok, req.messages, tools.plan(req, tok))
    served = tools.encode(tok, messages, functions)
    assert ex.input_ids[: len(served)] == served  # training saw the served prompt, token for token
    answer = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab != IGNORE])
    assert answer.startswith(call), answer
    # the same record on SmolLM2's kind of template (no tools of its own): the Hermes text, as before
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    [plain], _ = encode_all(tok, convs, 4096)
    assert "<tool_call>" in tok.decode(plain.input_ids) and '"arguments"' in tok.decode(plain.input_ids)


def test_bad_tool_calls_in_training_data_name_the_record_and_field(tmp_path: Path) -> None:
    bad = [
        {
            "messages": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
            ]
        },
        {"tools": "[not json", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "call f please"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"type": "function"}]}]},
    ]
    path = write(tmp_path, "bad.jsonl", "".join(json.dumps(r) + "\n" for r in bad))
    result = parse_file(path, FormatOptions(format="messages"))
    reasons = {e.source.rsplit(":", 1)[1]: (e.reason, e.field) for e in result.errors}
    assert "arguments is not valid JSON" in reasons["1"][0] and reasons["1"][1] == "messages[1].tool_calls[0]"
    assert "must hold a function with a name" in reasons["4"][0]
    shared = parse_file(
        write(tmp_path, "bad2.jsonl", "".join(json.dumps(r) + "\n" for r in bad[1:3])), FormatOptions(format="sharegpt")
    )
    why = [(e.reason, e.field) for e in shared.errors]
    assert why[0][1] == "tools" and "not valid JSON" in why[0][0]
    assert why[1][1] == "conversations[1].value" and "not a JSON function call" in why[1][0]
