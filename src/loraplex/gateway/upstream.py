"""Proxy a chat or text completion to an upstream OpenAI-compatible endpoint (policy.Upstream).

The gateway's keys, limits, metering, logs and output filters apply exactly as for the built-in
engine; this module only moves the request and the answer, and reports what it saw (tokens,
time to first token, finish reason, text) for the log. Streams are re-framed chunk by chunk (SSE
events read with httpx-sse, their JSON filtered and re-sent); the upstream is asked for usage in
the stream so it can be metered, and that chunk is passed on only if the client asked for it too.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import EventSource, SSEError

from loraplex.errors import UpstreamError
from loraplex.gateway.policy import OutputFilter, StreamFilter, Upstream


@dataclass
class Outcome:
    """What the log and metrics need from an upstream answer."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None
    finish_reason: str | None = None
    texts: dict[int, list[str]] = field(default_factory=dict)


def _headers(up: Upstream) -> dict[str, str]:
    key = up.api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _error_from(resp: httpx.Response, up: Upstream) -> UpstreamError:
    try:
        err = resp.json().get("error") or {}
        message = err.get("message") or resp.text[:500]
        code = err.get("code") or "upstream_error"
    except (ValueError, AttributeError):
        message, code = resp.text[:500], "upstream_error"
    status = resp.status_code if 400 <= resp.status_code < 500 else 502
    return UpstreamError(status, f"upstream {up.base_url}: {message}", str(code))


async def complete(
    client: httpx.AsyncClient,
    up: Upstream,
    path: str,
    body: dict[str, Any],
    filt: OutputFilter,
    out: Outcome,
    rid: str,
) -> dict[str, Any]:
    """A non-streaming completion; choices' text filtered, the id ours (feedback refers to it)."""
    body = {**body, "stream": False, **({"model": up.model} if up.model else {})}
    try:
        resp = await client.post(f"{up.base_url}{path}", json=body, headers=_headers(up), timeout=up.timeout)
    except httpx.HTTPError as e:
        raise UpstreamError(502, f"upstream {up.base_url} is unreachable: {e}", "upstream_unavailable") from None
    if resp.status_code != 200:
        raise _error_from(resp, up)
    data: dict[str, Any] = resp.json()
    data["id"] = rid
    out.first_token = time.perf_counter()
    for choice in data.get("choices", []):
        msg = choice.get("message")
        if isinstance(msg, dict) and isinstance(msg.get("content"), str):
            msg["content"] = filt.apply(msg["content"]) if filt else msg["content"]
            out.texts.setdefault(choice.get("index", 0), []).append(msg["content"])
        elif isinstance(choice.get("text"), str):
            choice["text"] = filt.apply(choice["text"]) if filt else choice["text"]
            out.texts.setdefault(choice.get("index", 0), []).append(choice["text"])
        out.finish_reason = choice.get("finish_reason") or out.finish_reason
    usage = data.get("usage") or {}
    out.prompt_tokens, out.completion_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return data


async def stream(
    client: httpx.AsyncClient,
    up: Upstream,
    path: str,
    body: dict[str, Any],
    filt: OutputFilter,
    out: Outcome,
    rid: str,
) -> AsyncIterator[str]:
    """SSE `data:` payloads for the client (JSON strings, then "[DONE]"). Raises UpstreamError before
    the first chunk if the upstream refuses."""
    client_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    if up.model:
        body["model"] = up.model
    filters: dict[int, StreamFilter] = {}
    chat = path.endswith("chat/completions")
    try:
        async with client.stream(
            "POST", f"{up.base_url}{path}", json=body, headers=_headers(up), timeout=up.timeout
        ) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise _error_from(resp, up)
            async for event in EventSource(resp).aiter_sse():
                if event.data == "[DONE]":
                    break
                chunk = json.loads(event.data)
                chunk["id"] = rid
                if chunk.get("usage"):
                    out.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    out.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                    if not chunk.get("choices") and not client_usage:
                        continue
                if not client_usage:
                    chunk.pop("usage", None)
                for choice in chunk.get("choices", []):
                    i = choice.get("index", 0)
                    holder = choice.get("delta") if chat else choice
                    text = holder.get("content" if chat else "text") if isinstance(holder, dict) else None
                    if isinstance(text, str):
                        if out.first_token is None and text:
                            out.first_token = time.perf_counter()
                        if filt:
                            f = filters.setdefault(i, filt.stream())
                            text = f.feed(text) + (f.finish() if choice.get("finish_reason") else "")
                        holder["content" if chat else "text"] = text
                        out.texts.setdefault(i, []).append(text)
                    if choice.get("finish_reason"):
                        out.finish_reason = choice["finish_reason"]
                yield json.dumps(chunk, ensure_ascii=False)
    except (httpx.HTTPError, SSEError) as e:
        raise UpstreamError(502, f"upstream {up.base_url} failed: {e}", "upstream_unavailable") from None
    yield "[DONE]"
