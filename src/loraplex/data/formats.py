"""Read training data files into conversations: alpaca, messages, sharegpt, CSV/TSV, dialogue text.

Every record keeps where it came from (`file:line`), and every problem is reported as a
`RecordError` with that place, the field and the reason. Parsing never stops at the first bad
record and never drops one silently: callers get all conversations and all errors, and decide.

This module knows nothing about tokenizers or chat templates (see `data/tokenize.py`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.data import hermes
from loraplex.errors import UserError

FORMATS = ("alpaca", "messages", "sharegpt", "csv", "dialogue")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "function_call": "function_call",  # LLaMA-Factory's tool turns
    "observation": "tool",
    "tool": "tool",
}
# Column names tried, in order, when a CSV/TSV does not name its columns in the config.
QUESTION_COLUMNS = ("question", "instruction", "prompt", "query", "input", "q", "问题", "提问", "问")
ANSWER_COLUMNS = ("answer", "output", "response", "completion", "a", "答案", "回答", "答")
# Speaker names recognised in dialogue text when the config does not name them.
USER_SPEAKERS = ("用户", "客户", "顾客", "问", "user", "User", "USER", "Human", "human", "Q", "Customer")
ASSISTANT_SPEAKERS = ("助手", "客服", "答", "assistant", "Assistant", "AI", "Bot", "A")
SYSTEM_SPEAKERS = ("系统", "system", "System")


@dataclass
class Conversation:
    """One training example: OpenAI-style messages plus where it came from."""

    messages: list[dict[str, str]]
    source: str  # "path:line"
    keywords: tuple[str, ...] = ()  # a record's `keywords` field: what a good answer must contain (eval)
    # a record with tools, as a template with tool support renders it (`messages` is its Hermes text)
    tooled: hermes.Tooled | None = None


@dataclass
class RecordError:
    source: str  # "path:line"
    reason: str
    field: str | None = None

    def __str__(self) -> str:
        where = f"{self.source}" + (f" [{self.field}]" if self.field else "")
        return f"{where}: {self.reason}"


@dataclass
class ParseResult:
    conversations: list[Conversation] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    format: str = ""


@dataclass(frozen=True)
class FormatOptions:
    """How to read a file. `None` fields are auto-detected."""

    format: str | None = None
    question_column: str | None = None
    answer_column: str | None = None
    system_column: str | None = None
    user_names: tuple[str, ...] = ()
    assistant_names: tuple[str, ...] = ()


class _RecordProblem(ValueError):
    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.field = field


def read_text(path: Path) -> str:
    """The file as text. UTF-8 (with or without BOM) only; other encodings are a clear error."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory, not a data file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        hint = ""
        try:
            raw.decode("gb18030")
            hint = f" It looks like GBK/GB18030; convert it with: iconv -f GB18030 -t UTF-8 {path} > out"
        except UnicodeDecodeError:
            pass
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x}).{hint}") from None


def parse_file(path: str | Path, options: FormatOptions | None = None) -> ParseResult:
    """Parse one data file into conversations and per-record errors."""
    path = Path(path)
    options = options or FormatOptions()
    text = read_text(path)
    fmt = options.format or detect_format(path, text)
    if fmt not in FORMATS:
        raise UserError(f"unknown data format {fmt!r} for {path}; choose one of {', '.join(FORMATS)}")
    result = ParseResult(format=fmt)
    if fmt == "csv":
        _parse_csv(path, text, options, result)
    elif fmt == "dialogue":
        _parse_dialogue(path, text, options, result)
    else:
        convert = {"alpaca": _from_alpaca, "messages": _from_messages, "sharegpt": _from_sharegpt}[fmt]
        for line, record in _json_records(path, text, result):
            try:
                converted = convert(record)
                messages, tooled = converted if isinstance(converted, tuple) else (converted, None)
                result.conversations.append(Conversation(messages, f"{path}:{line}", _keywords(record), tooled))
            except _RecordProblem as e:
                result.errors.append(RecordError(f"{path}:{line}", str(e), e.field))
    if not result.conversations and not result.errors:
        result.errors.append(RecordError(f"{path}:1", "no records found (empty file?)"))
    return result


def detect_format(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".txt", ".md", ".text"):
        return "dialogue"
    stripped = text.lstrip()
    first: Any = None
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
            first = records[0] if isinstance(records, list) and records else None
        except json.JSONDecodeError:
            first = None
    elif stripped.startswith("{"):
        for line in stripped.splitlines():
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    first = None
                break
    else:
        return "dialogue"
    if isinstance(first, dict):
        if "messages" in first:
            return "messages"
        if "conversations" in first:
            return "sharegpt"
        if "instruction" in first or "output" in first:
            return "alpaca"
    raise UserError(
        f"{path}: cannot tell the data format from the first record; set data.format to one of "
        f"{', '.join(FORMATS)} (alpaca needs instruction/output, messages needs messages, "
        "sharegpt needs conversations)"
    )


def _json_records(path: Path, text: str, result: ParseResult) -> Iterator[tuple[int, Any]]:
    """(line, record) for a JSON array or JSONL file; malformed lines become RecordErrors."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        # Walk the array element by element so each record knows its line number.
        decoder = json.JSONDecoder()
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text):
                result.errors.append(RecordError(f"{path}:{text.count(chr(10)) + 1}", "JSON array not closed"))
                return
            if text[pos] == "]":
                return
            line = text.count("\n", 0, pos) + 1
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                result.errors.append(RecordError(f"{path}:{e.lineno}", f"malformed JSON: {e.msg}"))
                return  # the rest of an array cannot be located reliably after a syntax error
            yield line, record
        return
    for i, line_text in enumerate(text.splitlines(), start=1):
        if not line_text.strip():
            continue
        try:
            yield i, json.loads(line_text)
        except json.JSONDecodeError as e:
            result.errors.append(RecordError(f"{path}:{i}", f"malformed JSON: {e.msg} (column {e.colno})"))


def _keywords(record: Any) -> tuple[str, ...]:
    """`keywords` as a list or one string split on , ; | (and their full-width forms, and 、)."""
    value = record.get("keywords") if isinstance(record, dict) else None
    if isinstance(value, str):
        value = re.split(r"[,;|，；、]", value)
    if not isinstance(value, list):
        return ()
    return tuple(str(k).strip() for k in value if str(k).strip())


def _text_field(record: dict[str, Any], key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise _RecordProblem(f"missing field {key!r}", key)
        return ""
    if not isinstance(value, str):
        raise _RecordProblem(f"field {key!r} must be a string, got {type(value).__name__}", key)
    if required and not value.strip():
        raise _RecordProblem(f"field {key!r} is empty", key)
    return value


def _check_dict(record: Any) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise _RecordProblem(f"record must be a JSON object, got {type(record).__name__}")
    return record


def _from_alpaca(record: Any) -> list[dict[str, str]]:
    record = _check_dict(record)
    instruction = _text_field(record, "instruction")
    extra = _text_field(record, "input", required=False)
    output = _text_field(record, "output")
    system = _text_field(record, "system", required=False)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system.strip() else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise _RecordProblem("field 'history' must be a list of [question, answer] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _RecordProblem(f"history[{i}] must be a [question, answer] pair of strings", "history")
        if not pair[1].strip():
            raise _RecordProblem(f"history[{i}] has an empty answer", "history")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _RecordProblem("only text content parts are supported", where)
            parts.append(part["text"])
        return "".join(parts)
    raise _RecordProblem(f"content must be a string, got {type(content).__name__}", where)


def _check_turns(messages: list[dict[str, str]], field_name: str) -> list[dict[str, str]]:
    if not messages:
        raise _RecordProblem("no messages", field_name)
    roles = [m["role"] for m in messages]
    if "system" in roles[1:]:
        raise _RecordProblem("a system message may only come first", field_name)
    if "assistant" not in roles:
        raise _RecordProblem("no assistant message to learn from", field_name)
    if roles[-1] != "assistant":
        raise _RecordProblem("the last message must be the assistant's answer", field_name)
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip():
            raise _RecordProblem(f"{field_name}[{i}] is an empty assistant answer", field_name)
        if m["role"] == "user" and not m["content"].strip():
            raise _RecordProblem(f"{field_name}[{i}] is an empty user message", field_name)
    return messages


def _from_messages(record: Any) -> list[dict[str, str]] | tuple[list[dict[str, str]], hermes.Tooled]:
    """OpenAI's chat fine-tuning format, tool calls included: a record's `tools` (or legacy
    `functions`), assistant `tool_calls`, `tool` results; written as text with data/hermes.py."""
    record = _check_dict(record)
    raw = record.get("messages")
    if not isinstance(raw, list):
        raise _RecordProblem("field 'messages' must be a list", "messages")
    functions = _functions(record)
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _RecordProblem(f"{where} must be an object with role and content", where)
        role = m.get("role")
        if role not in (*ROLES, "tool"):
            raise _RecordProblem(f"{where}.role {role!r} is not one of {', '.join(ROLES)}, tool", f"{where}.role")
        calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else []
        content = m.get("content")
        text = "" if content is None and calls else _content_text(content, f"{where}.content")
        messages.append({"role": role, "content": text, "tool_calls": calls})
    if not functions and not any(m["tool_calls"] or m["role"] == "tool" for m in messages):
        return _check_turns([{"role": m["role"], "content": m["content"]} for m in messages], "messages")
    return _check_turns(hermes.to_plain(messages, functions), "messages"), hermes.tooled(messages, functions)


def _functions(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A record's tools as OpenAI `function` objects: `tools` ([{"type": "function", "function":
    {...}}], or LLaMA-Factory's JSON text of bare function objects) or legacy `functions`."""
    raw = record.get("tools", record.get("functions"))
    field = "tools" if "tools" in record else "functions"
    if raw is None or raw == "":
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _RecordProblem(f"{field} is not valid JSON ({e.msg})", field) from None
    if not isinstance(raw, list):
        raise _RecordProblem(f"{field} must be a list of functions", field)
    out = []
    for i, t in enumerate(raw):
        f = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise _RecordProblem(f"{field}[{i}] must be a function with a name", f"{field}[{i}]")
        out.append(f)
    return out


def _tool_calls(raw: Any, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _RecordProblem(f"{where} must be a list", where)
    calls = []
    for i, c in enumerate(raw):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise _RecordProblem(f"{where}[{i}] must hold a function with a name", f"{where}[{i}]")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                json.loads(args)
            except json.JSONDecodeError as e:
                raise _RecordProblem(
                    f"{where}[{i}].function.arguments is not valid JSON ({e.msg})", f"{where}[{i}]"
                ) from None
        calls.append({"function": {"name": f["name"], "arguments": args}})
    return calls


def _from_sharegpt(record: Any) -> list[dict[str, str]] | tuple[list[dict[str, str]], hermes.Tooled]:
    """ShareGPT, with LLaMA-Factory's tool turns: `function_call` (the assistant's call, JSON) and
    `observation` (the tool's result), and the record's `tools` (JSON text)."""
    record = _check_dict(record)
    raw = record.get("conversations")
    if not isinstance(raw, list):
        raise _RecordProblem("field 'conversations' must be a list", "conversations")
    messages: list[dict[str, Any]] = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(raw):
        where = f"conversations[{i}]"
        if not isinstance(m, dict):
            raise _RecordProblem(f"{where} must be an object with from and value", where)
        speaker = m.get("from")
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if isinstance(speaker, str) else None
        if role is None:
            raise _RecordProblem(
                f"{where}.from {speaker!r} is not a known role ({', '.join(SHAREGPT_ROLES)})", f"{where}.from"
            )
        value = m.get("value")
        if not isinstance(value, str):
            raise _RecordProblem(f"{where}.value must be a string", f"{where}.value")
        if role == "function_call":
            call = _call_value(value, f"{where}.value")
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # parallel calls of one turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            continue
        messages.append({"role": role, "content": value})
    functions = _functions(record)
    if functions or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        plain = _check_turns(hermes.to_plain(messages, functions), "conversations")
        return plain, hermes.tooled(messages, functions)
    return _check_turns(messages, "conversations")


def _call_value(value: str, where: str) -> dict[str, Any]:
    """LLaMA-Factory's function_call value: {"name": ..., "arguments": {...}}."""
    try:
        data = json.loads(value)
    except json.JSONDecodeError as e:
        raise _RecordProblem(f"{where} is not a JSON function call ({e.msg})", where) from None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise _RecordProblem(f'{where} must be {{"name": ..., "arguments": {{...}}}}', where)
    return {"function": {"name": data["name"], "arguments": data.get("arguments", {})}}


def _pick_column(header: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str:
    if wanted:
        if wanted not in header:
            raise UserError(f"{path}:1: no column {wanted!r} for the {what}; columns are {header}")
        return wanted
    lowered = {h.strip().lower(): h for h in header}
    for c in candidates:
        if c.lower() in lowered:
            return lowered[c.lower()]
    raise UserError(
        f"{path}:1: cannot find the {what} column among {header}; name it with "
        f"data.{'question' if what == 'question' else 'answer'}_column"
    )


def _parse_csv(path: Path, text: str, options: FormatOptions, result: ParseResult) -> None:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    if path.suffix.lower() not in (".csv", ".tsv"):
        delimiter = "\t" if text.split("\n", 1)[0].count("\t") > text.split("\n", 1)[0].count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    q_col = _pick_column(header, options.question_column, QUESTION_COLUMNS, "question", path)
    a_col = _pick_column(header, options.answer_column, ANSWER_COLUMNS, "answer", path)
    s_col = options.system_column
    if s_col and s_col not in header:
        raise UserError(f"{path}:1: no column {s_col!r} for the system prompt; columns are {header}")
    index = {name: i for i, name in enumerate(header)}
    k_col = next((h for h in header if h.strip().lower() in ("keywords", "关键词")), None)
    start = reader.line_num + 1
    for row in reader:
        where = f"{path}:{start}"
        start = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            result.errors.append(RecordError(where, f"expected {len(header)} columns, found {len(row)}"))
            continue
        question, answer = row[index[q_col]], row[index[a_col]]
        if not question.strip():
            result.errors.append(RecordError(where, "empty question", q_col))
            continue
        if not answer.strip():
            result.errors.append(RecordError(where, "empty answer", a_col))
            continue
        messages = []
        if s_col and row[index[s_col]].strip():
            messages.append({"role": "system", "content": row[index[s_col]]})
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        kw = {"keywords": row[index[k_col]]} if k_col else {}
        result.conversations.append(Conversation(messages, where, _keywords(kw)))


def _split_speaker(line: str) -> tuple[str, str] | None:
    """`名字：内容` or `Name: text` -> (name, text); None when the line has no speaker prefix."""
    for i, ch in enumerate(line[:33]):
        if ch in "：:":
            name = line[:i].strip()
            if name and not any(c in name for c in "，,。.!?！？") and len(name) <= 32:
                return name, line[i + 1 :].strip()
            return None
    return None


def _parse_dialogue(path: Path, text: str, options: FormatOptions, result: ParseResult) -> None:
    """Turns prefixed by speaker names (`用户：…` / `律师：…`); conversations separated by blank lines.

    Speakers are mapped to roles by the configured names; otherwise by well-known names, and in a
    conversation with two unknown speakers the first to speak is the user. Lines without a speaker
    prefix continue the previous turn.
    """
    user_names = set(options.user_names or USER_SPEAKERS)
    assistant_names = set(options.assistant_names or ASSISTANT_SPEAKERS)
    configured = bool(options.user_names or options.assistant_names)
    block: list[tuple[int, str]] = []

    def flush() -> None:
        if block:
            _dialogue_block(path, block, user_names, assistant_names, configured, result)
            block.clear()

    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            block.append((lineno, line))
        else:
            flush()
    flush()


def _dialogue_block(
    path: Path,
    block: list[tuple[int, str]],
    user_names: set[str],
    assistant_names: set[str],
    configured: bool,
    result: ParseResult,
) -> None:
    where = f"{path}:{block[0][0]}"
    turns: list[tuple[str, str, int]] = []  # (speaker, text, line)
    for lineno, line in block:
        split = _split_speaker(line)
        if split is None:
            if not turns:
                result.errors.append(RecordError(f"{path}:{lineno}", "line has no speaker prefix like '用户：'"))
                return
            speaker, text, first = turns[-1]
            turns[-1] = (speaker, text + "\n" + line.strip(), first)
        else:
            turns.append((split[0], split[1], lineno))
    unknown: list[str] = []
    for s, _, _ in turns:
        if s not in user_names and s not in assistant_names and s not in SYSTEM_SPEAKERS and s not in unknown:
            unknown.append(s)
    role_of: dict[str, str] = {}
    if unknown:
        known_user = any(s in user_names for s, _, _ in turns)
        known_assistant = any(s in assistant_names for s, _, _ in turns)
        if configured or len(unknown) > 2 or (len(unknown) == 2 and (known_user or known_assistant)):
            result.errors.append(
                RecordError(
                    f"{path}:{turns[0][2]}",
                    f"unknown speaker(s) {', '.join(unknown)}; set data.user_names / data.assistant_names",
                )
            )
            return
        if len(unknown) == 2:
            role_of = {unknown[0]: "user", unknown[1]: "assistant"}
        else:
            role_of = {unknown[0]: "assistant" if known_user else "user"}
    messages: list[dict[str, str]] = []
    for speaker, text, _ in turns:
        if speaker in role_of:
            role = role_of[speaker]
        elif speaker in SYSTEM_SPEAKERS:
            role = "system"
        else:
            role = "user" if speaker in user_names else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    try:
        result.conversations.append(Conversation(_check_turns(messages, "dialogue"), where))
    except _RecordProblem as e:
        result.errors.append(RecordError(where, str(e)))


def render_dialogue(conversations: list[list[dict[str, str]]], user: str = "用户", assistant: str = "助手") -> str:
    """The inverse of the dialogue parser (used by tests and `data` tools)."""
    names = {"user": user, "assistant": assistant, "system": "系统"}
    blocks = []
    for messages in conversations:
        blocks.append("\n".join(f"{names[m['role']]}：{m['content']}" for m in messages))
    return "\n\n".join(blocks) + "\n"
