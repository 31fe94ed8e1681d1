"""Tool calls as plain chat text, the Hermes convention Qwen2.5's template uses.

One writer for both sides of an adapter's life: training data with tool calls (data/formats.py)
and serving a model whose chat template has no tool support of its own (api/tools.py) turn
conversations into the same text, so an adapter learns exactly the calls it is later asked for:
  * the functions' signatures go into the system message, under HERMES_TOOLS;
  * an assistant's call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` in its text;
  * a tool's result is `<tool_response>\\n...\\n</tool_response>` in a user turn (one turn's results
    share it).
A base whose chat template renders tools itself (Qwen2.5, Llama-3.1: `native`) is given them in
the template's own form instead, in training (a record's `Tooled` form) as in serving.
This module does not parse a model's answer back into calls (api/tools.py does).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HERMES_TOOLS = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
OPEN, CLOSE = "<tool_call>", "</tool_call>"


def native(tokenizer: Any) -> bool:
    """The chat template renders tools itself (its text mentions `tools`)."""
    return "tools" in str(getattr(tokenizer, "chat_template", "") or "")


@dataclass(frozen=True)
class Tooled:
    """A record with tools as a template with tool support takes it: Hugging Face chat messages
    (assistant `tool_calls` with arguments as objects, `tool` turns) and the functions offered."""

    messages: list[dict[str, Any]]
    functions: list[dict[str, Any]]


def tooled(messages: Sequence[dict[str, Any]], functions: Sequence[dict[str, Any]] | None) -> Tooled:
    """OpenAI-style messages (as data/formats.py reads them) in Hugging Face's chat format."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            d["tool_calls"] = [
                {
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": arguments(c["function"].get("arguments", {})),
                    },
                }
                for c in m["tool_calls"]
            ]
        out.append(d)
    return Tooled(out, list(functions or []))


def arguments(value: Any) -> Any:
    """A call's arguments as an object (OpenAI sends them as JSON text; templates show JSON)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def call_text(name: str, args: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments(args)}, ensure_ascii=False)}\n{CLOSE}"


def tools_text(functions: Sequence[dict[str, Any]]) -> str:
    """The system-message block listing OpenAI `function` objects."""
    signatures = (json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return HERMES_TOOLS.format(tools="\n".join(signatures))


def to_plain(messages: Sequence[dict[str, Any]], functions: Sequence[dict[str, Any]] | None) -> list[dict[str, str]]:
    """OpenAI messages (assistant `tool_calls`, `tool` results) -> system/user/assistant text turns."""
    plain: list[dict[str, str]] = []
    for m in messages:
        role, text = m["role"], m.get("content") or ""
        calls = m.get("tool_calls") or []
        if calls:
            blocks = "\n".join(call_text(c["function"]["name"], c["function"].get("arguments", {})) for c in calls)
            text = f"{text}\n{blocks}" if text else blocks
        if role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
            if plain and plain[-1]["role"] == "user" and plain[-1]["content"].startswith("<tool_response>"):
                plain[-1]["content"] += "\n" + text
                continue
            role = "user"
        plain.append({"role": role, "content": text})
    if functions:
        listing = tools_text(functions)
        if plain and plain[0]["role"] == "system":
            plain[0]["content"] = f"{plain[0]['content']}\n\n{listing}"
        else:
            plain.insert(0, {"role": "system", "content": listing})
    return plain
