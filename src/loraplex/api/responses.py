"""POST /v1/responses and GET /v1/responses/{id}: OpenAI's Responses API over the chat machinery.

A request becomes a chat completion: `instructions` a system message, `input` messages,
`function_call` items assistant tool calls and `function_call_output` items tool messages, after
the conversation of `previous_response_id` (kept in the server's database, per key, when the
earlier response was stored: `store`, default true). Tools, `tool_choice` and `text.format` are
the chat API's (flattened), so constrained calls and JSON output work the same. The chat answer
is re-shaped into a Response (`message` and `function_call` output items); a stream's chat chunks
into Response events (`response.created` … `response.output_text.delta` …
`response.function_call_arguments.done` … `response.completed`).

Not here: built-in tools (web search, files), background mode, reasoning items, conversations objects.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from loraplex.api import completions
from loraplex.api.errors import APIError
from loraplex.api.schemas import ChatCompletionRequest, JsonObjectFormat
from loraplex.api.schemas_responses import (
    FunctionCallItem,
    FunctionCallOutput,
    InputMessage,
    ResponsesRequest,
    TextJsonSchema,
)
from loraplex.gateway.gate import Gateway
from loraplex.gateway.keys import Key


def add_routes(app: FastAPI, s: completions.Serving, principal: Callable[..., Key | None]) -> None:
    gw = s.gw

    @app.post("/v1/responses", responses=completions.STREAMED)
    async def create(request: Request, req: ResponsesRequest, key: Key | None = Depends(principal)) -> Any:
        call = request.state.call
        owner = key.name if key is not None else ""
        history: list[dict[str, Any]] = []
        if req.previous_response_id:
            row = await asyncio.to_thread(_load, gw, req.previous_response_id, owner)
            history = json.loads(row["messages"])
        messages = history + _messages(req)
        chat = _chat_request(req, messages)
        answer = await completions.chat_completion(s, call, chat, request.receive)
        context = _Context(req, call.id, messages, owner, gw)
        if isinstance(answer, EventSourceResponse):
            return EventSourceResponse(_events(answer.body_iterator, context), sep="\n", ping=15)
        if isinstance(answer, JSONResponse):
            answer = json.loads(bytes(answer.body))
        if not isinstance(answer, dict):
            return answer  # a client that left (499)
        return await context.finish(answer["choices"][0], answer["usage"])

    @app.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str, key: Key | None = Depends(principal)) -> Any:
        row = await asyncio.to_thread(_load, gw, response_id, key.name if key is not None else "")
        return json.loads(row["body"])


def _load(gw: Gateway, response_id: str, owner: str) -> Any:
    row = gw.db.one("SELECT * FROM responses WHERE id = :id AND key = :key", {"id": response_id, "key": owner})
    if row is None:  # another key's response reads as missing
        raise APIError(
            404, f"No response found with id '{response_id}'.", param="previous_response_id", code="not_found"
        )
    return row


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's own turns as chat messages (instructions first: they are not carried over)."""
    out: list[dict[str, Any]] = []
    if req.instructions:
        out.append({"role": "system", "content": req.instructions})
    items = [InputMessage(role="user", content=req.input)] if isinstance(req.input, str) else req.input
    for item in items:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)  # one turn's calls stay one assistant message
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    body: dict[str, Any] = {
        "model": req.model,
        "messages": [{k: v for k, v in m.items() if v is not None or k == "content"} for m in messages],
        "stream": req.stream,
        "temperature": req.temperature,
        "top_p": req.top_p,
    }
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools
        ]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = (
            choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
        )
    if req.parallel_tool_calls is not None:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    fmt = req.text.format if req.text else None
    if isinstance(fmt, JsonObjectFormat):
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, TextJsonSchema):
        spec = fmt.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValueError as e:  # what the chat API refuses that the Responses schema let through
        raise APIError(422, f"this request cannot be answered: {e}", code="unprocessable") from None


class _Context:
    """What turning a chat answer into a Response needs, and storing it."""

    def __init__(self, req: ResponsesRequest, rid: str, messages: list[dict[str, Any]], owner: str, gw: Gateway):
        self.req, self.id, self.messages, self.owner, self.gw = req, rid, messages, owner, gw
        self.created = int(time.time())

    def response(self, output: list[dict[str, Any]], usage: dict[str, int] | None, status: str) -> dict[str, Any]:
        r = self.req
        body: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": r.model,
            "output": output,
            "instructions": r.instructions,
            "previous_response_id": r.previous_response_id,
            "tools": [t.model_dump(exclude_none=True) for t in r.tools or []],
            "tool_choice": r.tool_choice
            if isinstance(r.tool_choice, str) or r.tool_choice is None
            else r.tool_choice.model_dump(),
            "parallel_tool_calls": r.parallel_tool_calls is not False,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "max_output_tokens": r.max_output_tokens,
            "store": r.store,
            "metadata": r.metadata or {},
            "text": {
                "format": r.text.format.model_dump(by_alias=True, exclude_none=True)
                if r.text and r.text.format
                else {"type": "text"}
            },
            "error": None,
            "incomplete_details": None,
        }
        if body["tool_choice"] is None:
            body["tool_choice"] = "auto"
        if usage is not None:
            body["usage"] = {
                "input_tokens": usage["prompt_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"],
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            }
        return body

    async def finish(
        self, choice: dict[str, Any], usage: dict[str, int], output: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The Response for a whole chat choice (`output`: its items as already streamed); stored
        with its conversation when `store`."""
        message = choice["message"]
        if output is None:
            output = _output(message.get("content"), message.get("tool_calls") or [])
        status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
        body = self.response(output, usage, status)
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.req.store:
            turn = {"role": "assistant", "content": message.get("content")}
            if message.get("tool_calls"):
                turn["tool_calls"] = message["tool_calls"]
            await asyncio.to_thread(self._store, [*self.messages, turn], body)
        return body

    def _store(self, messages: list[dict[str, Any]], body: dict[str, Any]) -> None:
        self.gw.db.run(
            "INSERT INTO responses (id, key, model, messages, body, created) "
            "VALUES (:id, :key, :model, :messages, :body, :created)",
            {
                "id": self.id,
                "key": self.owner,
                "model": self.req.model,
                "messages": json.dumps(messages, ensure_ascii=False),
                "body": json.dumps(body, ensure_ascii=False),
                "created": time.time(),
            },
        )


def _output(content: str | None, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if content:
        out.append(_message_item(f"msg_{uuid.uuid4().hex[:24]}", content, "completed"))
    for c in calls:
        out.append(_call_item(c, "completed"))
    return out


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [part]}


def _call_item(c: dict[str, Any], status: str) -> dict[str, Any]:
    f = c["function"]
    return {
        "type": "function_call",
        "id": f"fc_{c['id'].removeprefix('call_')}",
        "call_id": c["id"],
        "name": f["name"],
        "arguments": f["arguments"],
        "status": status,
    }


async def _events(chunks: AsyncIterable[Any], ctx: _Context) -> AsyncIterator[dict[str, str]]:
    """The chat stream's chunks as Response events; the stored conversation gets the whole answer."""
    seq = 0

    def event(kind: str, **data: Any) -> dict[str, str]:
        nonlocal seq
        seq += 1
        return {
            "event": kind,
            "data": json.dumps({"type": kind, "sequence_number": seq - 1, **data}, ensure_ascii=False),
        }

    yield event("response.created", response=ctx.response([], None, "in_progress"))
    yield event("response.in_progress", response=ctx.response([], None, "in_progress"))
    msg_id = f"msg_{uuid.uuid4().hex[:24]}"
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    usage: dict[str, int] | None = None
    finish: str | None = None
    async for chunk in chunks:
        data = chunk.get("data", "")
        if data == "[DONE]":
            break
        body = json.loads(data)
        if "error" in body:  # the chat stream failed midway: so does the response
            err = body["error"]
            yield event("error", code=err.get("code"), message=err.get("message"), param=err.get("param"))
            failed = ctx.response([], None, "failed")
            failed["error"] = {"code": err.get("code") or "server_error", "message": err.get("message")}
            yield event("response.failed", response=failed)
            return
        usage = body.get("usage") or usage
        for choice in body.get("choices") or []:
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                if not text:
                    yield event(
                        "response.output_item.added",
                        output_index=0,
                        item=_message_item(msg_id, "", "in_progress") | {"content": []},
                    )
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    yield event(
                        "response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part
                    )
                text.append(piece)
                yield event(
                    "response.output_text.delta",
                    item_id=msg_id,
                    output_index=0,
                    content_index=0,
                    delta=piece,
                    logprobs=[],
                )
            calls.extend(delta.get("tool_calls") or [])
            finish = choice.get("finish_reason") or finish
    output: list[dict[str, Any]] = []
    if text:
        whole = "".join(text)
        part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
        yield event(
            "response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=whole, logprobs=[]
        )
        yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
        item = _message_item(msg_id, whole, "completed")
        yield event("response.output_item.done", output_index=0, item=item)
        output.append(item)
    for c in calls:
        index = len(output)
        item = _call_item({k: v for k, v in c.items() if k != "index"}, "completed")
        yield event(
            "response.output_item.added", output_index=index, item=item | {"arguments": "", "status": "in_progress"}
        )
        yield event(
            "response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=item["arguments"]
        )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            name=item["name"],
            arguments=item["arguments"],
        )
        yield event("response.output_item.done", output_index=index, item=item)
        output.append(item)
    message = {
        "content": "".join(text) or None,
        "tool_calls": [{k: v for k, v in c.items() if k != "index"} for c in calls] or None,
    }
    usage = usage or {"prompt_tokens": 0, "completion_tokens": 0}
    final = await ctx.finish({"message": message, "finish_reason": finish}, usage, output)
    yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed", response=final)
