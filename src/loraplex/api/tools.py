"""Tool calling in OpenAI's shape, over the model's own chat template.

A request's `tools` reach the prompt one of two ways:
  * a template that renders tools itself (Qwen2.5, Llama-3.1, Hermes: its text mentions `tools`)
    gets them as `apply_chat_template(..., tools=...)`, with assistant `tool_calls` and `tool`
    messages as Hugging Face's chat format has them;
  * any other template (SmolLM2's) gets the Hermes convention Qwen2.5 uses, written into the
    messages (data/hermes.py, which training data with tool calls goes through too): the tools'
    signatures in the system message, each call as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    in the assistant's text, each result as `<tool_response>...</tool_response>` in a user turn.
How the model writes a call is read off its template (`call_format`): a Qwen2.5 or Hermes template
writes `<tool_call>` blocks, Llama-3.1's one bare JSON object with `parameters`. The answer is parsed
back: `<tool_call>` blocks (or an answer that is one bare JSON call) become `tool_calls`, the rest
stays `content`. With `tool_choice` `required` or a named function, decoding is constrained (a Lark
grammar for llguidance, engine/structured.py) to one call in the template's format, or several
with `parallel_tool_calls` where the format has more than one, whose arguments follow each
function's JSON schema: a small model returns valid calls. `auto` leaves the model free and parses what it wrote,
as vLLM's `auto` does; `none` leaves the tools out of the prompt.

This module does not run tools (the client does).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from loraplex.api.schemas import (
    AssistantMessage,
    ChatCompletionRequest,
    Message,
    NamedToolChoice,
    ToolCall,
    ToolMessage,
)
from loraplex.data import hermes
from loraplex.data.hermes import OPEN, native
from loraplex.data.tokenize import render

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
# compact JSON inside a constrained call, the separators the model has seen most (as structured.py)
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class CallFormat:
    """How a model writes a call: `<tool_call>` blocks, any number per turn (Hermes, Qwen2.5), or
    the whole answer one bare JSON object (Llama-3.1); `key` names the arguments."""

    tagged: bool
    key: str  # "arguments" or "parameters"


HERMES = CallFormat(True, "arguments")


@dataclass(frozen=True)
class ToolPlan:
    """The tools a request offers the model and how it must use them."""

    tools: tuple[dict[str, Any], ...]  # OpenAI `function` objects
    choice: str  # "auto", "required", or the one function's name
    parallel: bool
    format: CallFormat = HERMES

    @property
    def forced(self) -> bool:
        return self.choice != "auto"


def plan(req: ChatCompletionRequest, tokenizer: Any = None) -> ToolPlan | None:
    """None when no tool may be called (no tools, or tool_choice "none"). The calls' format is the
    tokenizer's template's (`call_format`; Hermes without a tokenizer)."""
    if not req.tools or req.tool_choice == "none":
        return None
    choice = req.tool_choice
    name = choice.function.name if isinstance(choice, NamedToolChoice) else (choice or "auto")
    functions = tuple(t.function.model_dump(exclude_none=True) for t in req.tools)
    fmt = call_format(tokenizer) if tokenizer is not None else HERMES
    # a bare-JSON format has one call per turn (Llama-3.1's template refuses more)
    return ToolPlan(functions, name, req.parallel_tool_calls is not False and fmt.tagged, fmt)


_PROBE = re.compile(r'(<tool_call>\s*)?\{\s*"name":\s*"lp_probe",\s*"(\w+)":\s*\{\s*"lp_arg"')
_FORMATS: dict[str, CallFormat] = {}


def call_format(tokenizer: Any) -> CallFormat:
    """The format the template writes an assistant's call in, found by rendering one (templates
    differ: Qwen2.5 `<tool_call>{"name", "arguments"}</tool_call>`, Llama-3.1 a bare `{"name",
    "parameters"}`); a model is constrained and parsed in the format it was trained on. Hermes for
    a template without tools (they go into the messages as Hermes) or one whose calls do not look
    like either."""
    if not native(tokenizer):
        return HERMES
    template = str(tokenizer.chat_template)
    if template not in _FORMATS:
        probe = [
            {"role": "user", "content": "?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "id": "call_0", "function": {"name": "lp_probe", "arguments": {"lp_arg": 1}}}
                ],
            },
        ]
        tool = {"type": "function", "function": {"name": "lp_probe", "parameters": {"type": "object"}}}
        try:
            text = str(tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False))
        except Exception:  # noqa: BLE001 - a template that cannot render the probe: the default format
            text = ""
        m = _PROBE.search(text)
        _FORMATS[template] = CallFormat(m.group(1) is not None, m.group(2)) if m else HERMES
    return _FORMATS[template]


def messages_for(tokenizer: Any, messages: list[Message], p: ToolPlan | None) -> tuple[list[dict[str, Any]], Any]:
    """The messages (and the `tools` argument) to render with the chat template."""
    if p is None and not any(_calls(m) or m.role == "tool" for m in messages):
        return [{"role": _role(m), "content": m.text()} for m in messages], None
    if native(tokenizer):
        out: list[dict[str, Any]] = []
        for m in messages:
            d: dict[str, Any] = {"role": _role(m), "content": m.text()}
            if _calls(m):
                d["tool_calls"] = [{"type": "function", "id": c.id, "function": _function(c)} for c in _calls(m)]
            if isinstance(m, ToolMessage):
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        tools = [{"type": "function", "function": f} for f in p.tools] if p else None
        return out, tools
    dicts = [
        {"role": _role(m), "content": m.text(), "tool_calls": [c.model_dump() for c in _calls(m)]} for m in messages
    ]
    return hermes.to_plain(dicts, p.tools if p else None), None


def by_template(tokenizer: Any, messages: list[Message], p: ToolPlan | None) -> bool:
    """The chat template renders this conversation's tools and calls itself (`encode`)."""
    return native(tokenizer) and (p is not None or any(_calls(m) or m.role == "tool" for m in messages))


def encode(tokenizer: Any, messages: list[dict[str, Any]], functions: list[dict[str, Any]] | None) -> list[int]:
    """Token ids of messages rendered by a template with tool support, ready for the answer."""
    text = render(tokenizer, messages, add_generation_prompt=True, tools=functions)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _calls(m: Message) -> list[ToolCall]:
    return (m.tool_calls or []) if isinstance(m, AssistantMessage) else []


def _role(m: Message) -> str:
    return "system" if m.role == "developer" else m.role


def _function(c: ToolCall) -> dict[str, Any]:
    return {"name": c.function.name, "arguments": hermes.arguments(c.function.arguments)}


def grammar(p: ToolPlan) -> str | None:
    """A Lark grammar (llguidance) for `required` / a named function, in the plan's call format;
    None for `auto`."""
    if not p.forced:
        return None
    key = p.format.key
    funcs = [f for f in p.tools if p.choice in ("required", f["name"])]
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: _closed(f.get("parameters") or {"type": "object"})},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in funcs
    ]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    body = json.dumps({**schema, "x-guidance": {**_COMPACT, "lenient": True}})
    if not p.format.tagged:
        return f"start: body\nbody: %json {body}"
    repeat = ' ("\\n" call)*' if p.parallel else ""
    return f'start: call{repeat}\ncall: "{OPEN}\\n" body "\\n</tool_call>"\nbody: %json {body}'


def _closed(parameters: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters with no keys beyond the declared ones unless it says otherwise: a
    client can only use what it declared, and a small model left free adds keys until max_tokens."""
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: list[dict[str, Any]]  # OpenAI tool_calls


def parse(text: str, p: ToolPlan) -> Parsed:
    """The model's text -> content and tool calls. A block that is not a call (bad JSON, an unknown
    function) stays in the content, so nothing the model wrote is lost."""
    known = {f["name"] for f in p.tools}
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    pos = 0
    for m in _CALL.finditer(text):
        call = _call(m.group(1), known)
        if call is None:
            continue
        kept.append(text[pos : m.start()])
        pos = m.end()
        calls.append(call)
    kept.append(text[pos:])
    content = "".join(kept).strip()
    # a small model may repeat a call word for word: one turn's identical calls are one call
    unique: dict[tuple[str, str], dict[str, Any]] = {}
    for c in calls:
        unique.setdefault((c["function"]["name"], c["function"]["arguments"]), c)
    calls = list(unique.values())
    if not calls and text.lstrip().startswith("{"):  # Llama-3.1 writes a call as the bare JSON answer
        bare = _call(text.strip(), known)
        if bare is not None:
            calls, content = [bare], ""
    if not p.parallel:
        calls = calls[:1]
    return Parsed(content or None, calls)


def _call(body: str, known: set[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("name") not in known:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    return {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {
            "name": data["name"],
            "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
        },
    }


class ToolStream:
    """Streaming with tools: text is passed on until it may be the start of a call; from there it
    is held, and `finish` parses it (content and calls come in the last chunks)."""

    def __init__(self, p: ToolPlan):
        self.plan = p
        self.held = ""
        self.sent = ""

    def feed(self, text: str) -> str:
        self.held += text
        if self.plan.forced:
            return ""  # constrained: the whole answer is calls
        if not self.plan.format.tagged and not self.sent and self.held.lstrip()[:1] in ("", "{"):
            return ""  # a bare-JSON format: an answer that opens with "{" may be the call
        start = self.held.find(OPEN)
        if start == -1:  # keep what could be the beginning of "<tool_call>"
            start = next((i for i in range(len(self.held)) if OPEN.startswith(self.held[i:])), len(self.held))
        out, self.held = self.held[:start], self.held[start:]
        if not self.sent and out.strip() == "" and self.held:
            self.held, out = out + self.held, ""  # leading whitespace before a call is not content
        self.sent += out
        return out

    def finish(self) -> Parsed:
        parsed = parse(self.held, self.plan)
        return parsed
