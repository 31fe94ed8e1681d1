"""The OpenAI-compatible HTTP API: thin routes that parse, call `Engine.generate`, and shape JSON.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream with SSE,
ending `data: [DONE]`), POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names),
GET /health and /ready. Every error is OpenAI's shape: {"error": {message, type, param, code}}.

Streaming uses sse-starlette, which also notices a client that disconnects and cancels the
response; the engine then frees that row at once (engine.generate's `finally`).
This module does not batch, sample or load weights (see engine/).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.adapters import registry
from loraplex.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
)
from loraplex.engine.adapter_cache import InvalidModelName, ModelNotFound
from loraplex.engine.engine import Delta, Engine, EngineClosed, PromptTooLong
from loraplex.engine.sampling import SamplingParams, TokenLogprob
from loraplex.errors import UserError

MAX_BODY = 8 * 1024 * 1024
UNSUPPORTED = {
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
    "prediction": "predicted outputs are not supported by this server",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_response(
    status: int, message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _translate(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, ModelNotFound):
        return APIError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, InvalidModelName):
        return APIError(400, str(e), param="model", code="invalid_model")
    if isinstance(e, PromptTooLong):
        return APIError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, EngineClosed):
        return APIError(503, str(e), type_="server_error", code="shutting_down")
    if isinstance(e, UserError | ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {e}", type_="server_error")


class BodyLimit:
    """Refuse request bodies over MAX_BODY by their Content-Length (413), before reading them.

    Plain ASGI rather than `@app.middleware("http")`, whose wrapper re-buffers every streamed
    chunk (a measurable cost per token at SSE rates)."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = dict(scope.get("headers") or []).get(b"content-length")
            if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
                await error_response(413, f"request body larger than {MAX_BODY} bytes")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(engine: Engine) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close, 5.0)  # finish in-flight work, abort what is left

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.add_middleware(BodyLimit)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden" and loc:
            field = loc[-1]
            message = UNSUPPORTED.get(field, f"Unrecognized request argument supplied: {field}")
        elif err.get("type") in ("json_invalid", "json_type"):
            message = "the request body is not valid JSON"
            param = None
        else:
            message = f"{param or 'body'}: {err.get('msg', 'invalid value')}"
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message = "the request body could not be read: it must be UTF-8 JSON"
        else:
            message = str(exc.detail)
        return error_response(
            exc.status_code, message, "invalid_request_error" if exc.status_code < 500 else "server_error"
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        e = _translate(exc)
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine._closing:
            return error_response(503, "shutting down", "server_error")
        return JSONResponse({"status": "ready", "model": engine.base.id})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(_model_list, engine, created)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        top = req.top_logprobs if req.logprobs else None
        if req.logprobs and top is None:
            top = 0
        return await _complete(engine, req, messages, req.max_completion_tokens or req.max_tokens, top, chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
            if len(req.prompt) != 1:
                raise APIError(400, "this server takes one prompt per request", param="prompt")
            prompt: Any = req.prompt[0]
        else:
            prompt = req.prompt
        return await _complete(engine, req, prompt, req.max_tokens or 16, req.logprobs, chat=False)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(req: LoadAdapterRequest) -> dict[str, Any]:
        try:
            key = await asyncio.to_thread(engine.load_adapter, req.lora_name, req.pin)
        except Exception as e:  # noqa: BLE001
            raise _translate(e) from None
        return {"loaded": key, "pinned": req.pin}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(req: UnloadAdapterRequest) -> dict[str, Any]:
        name = req.lora_name.split("@")[0]
        try:
            engine.adapters.resolve(name)
        except Exception as e:  # noqa: BLE001
            raise _translate(e) from None
        return {"unloaded": await asyncio.to_thread(engine.unload_adapter, name)}

    return app


def _model_list(engine: Engine, created: int) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = [{"id": engine.base.id, "object": "model", "created": created, "owned_by": "loraplex"}]
    all_aliases = registry.all_aliases()
    for name, versions in registry.list_names():
        if engine.adapters.allowed is not None and name not in engine.adapters.allowed:
            continue
        ref = registry.AdapterRef(name, versions[-1], registry.store_root() / name / f"v{versions[-1]}")
        try:
            manifest = ref.manifest()
        except (OSError, ValueError):
            continue
        if manifest.get("base_model", {}).get("fingerprint", {}).get("architecture") not in (
            None,
            engine.base.fingerprint.get("architecture"),
        ):
            continue  # trained on another base: not servable here
        created_at = manifest.get("created_at")
        aliases = all_aliases.get(name, {})
        entry = {
            "id": name,
            "object": "model",
            "created": int(_ts(created_at)) if created_at else created,
            "owned_by": manifest.get("owner") or "loraplex",
            "parent": engine.base.id,
            "root": ref.id,
            "version": ref.version,
            "versions": [f"{name}@v{v}" for v in versions],
            "aliases": {a: f"{name}@v{v}" for a, v in aliases.items()},
            "description": manifest.get("description") or "",
        }
        data.append(entry)
        # each alias is a model of its own, so chat UIs can offer `legal@prod` in their model menu
        for a, v in sorted(aliases.items()):
            data.append({**entry, "id": f"{name}@{a}", "root": f"{name}@v{v}", "version": v})
    return data


def _ts(iso: str) -> float:
    from datetime import datetime

    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return time.time()


def _params(req: ChatCompletionRequest | CompletionRequest, top_logprobs: int | None, index: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=max(req.top_k, 0),
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            seed=None if req.seed is None else req.seed + index,
            stop=tuple(req.stop or ()),  # type: ignore[arg-type]
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logprobs=top_logprobs,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _complete(
    engine: Engine,
    req: ChatCompletionRequest | CompletionRequest,
    prompt: Any,
    max_tokens: int | None,
    top_logprobs: int | None,
    chat: bool,
) -> Any:
    try:
        adapter = await asyncio.to_thread(engine.adapters.resolve, req.model)
        served = adapter.key or engine.base.id
        prompt_ids = await asyncio.to_thread(engine.encode, prompt)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < engine.model.config.vocab_size for t in prompt_ids):
            raise APIError(400, "prompt token ids must be within the vocabulary", param="prompt")
        engine.check_length(len(prompt_ids), max_tokens)
    except Exception as e:  # noqa: BLE001
        raise _translate(e) from None

    kind = "chat.completion" if chat else "text_completion"
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    streams = [engine.generate(prompt_ids, _params(req, top_logprobs, i), adapter, max_tokens) for i in range(req.n)]

    if not req.stream:
        try:
            results = await asyncio.gather(*[_collect(s) for s in streams])
        except Exception as e:  # noqa: BLE001
            raise _translate(e) from None
        choices = []
        for i, (text, finish, logprobs, _) in enumerate(results):
            lp = _logprobs_json(engine, logprobs, chat) if top_logprobs is not None else None
            if chat:
                choices.append(
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": finish,
                    }
                )
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        usage = _usage(len(prompt_ids), sum(r[3] for r in results))
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": served,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": f"loraplex-{engine.base.id}",
        }

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": chunk_kind,
            "created": created,
            "model": served,
            "choices": choices,
            "system_fingerprint": f"loraplex-{engine.base.id}",
        }
        if include_usage:
            body["usage"] = usage
        return json.dumps(body, ensure_ascii=False)

    async def events() -> AsyncIterator[dict[str, str]]:
        queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, stream: AsyncIterator[Delta]) -> None:
            try:
                async for d in stream:
                    await queue.put((i, d))
                await queue.put((i, None))
            except Exception as e:  # noqa: BLE001 - reported in-band, the stream is already open
                await queue.put((i, e))

        if chat:
            for i in range(req.n):
                first = {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield {"data": chunk([first])}
        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        completion_tokens, open_streams = 0, req.n
        try:
            while open_streams:
                i, item = await queue.get()
                if item is None:
                    open_streams -= 1
                    continue
                if isinstance(item, BaseException):
                    e = _translate(item)
                    yield {
                        "data": json.dumps(
                            {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
                        )
                    }
                    return
                lp = _logprobs_json(engine, item.logprobs, chat) if top_logprobs is not None else None
                if chat:
                    delta = {"content": item.text} if item.text else {}
                    choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": item.finish_reason}
                else:
                    choice = {"index": i, "text": item.text, "logprobs": lp, "finish_reason": item.finish_reason}
                if item.finish_reason is not None:
                    completion_tokens += item.completion_tokens
                yield {"data": chunk([choice])}
            if include_usage:
                yield {"data": chunk([], _usage(len(prompt_ids), completion_tokens))}
            yield {"data": "[DONE]"}
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    return EventSourceResponse(events(), sep="\n", ping=15)


def run(engine: Engine, host: str, port: int, shutdown_timeout: float) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully: stop accepting connections and new
    requests (503 `shutting_down`, /ready 503), let in-flight requests finish for up to
    `shutdown_timeout` s, end the ones still running with an OpenAI error (a 503, or an error event
    in a stream), and exit."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    # sse-starlette would cut every open stream at the first signal; we drain them instead.
    AppStatus.disable_automatic_graceful_drain()

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(engine),
        host=host,
        port=port,
        log_level="warning",
        # uvicorn's own deadline comes after ours, so aborted streams still get their error event out
        timeout_graceful_shutdown=int(shutdown_timeout) + 5,
    )
    DrainingServer(config).run()


async def _collect(stream: AsyncIterator[Delta]) -> tuple[str, str | None, list[TokenLogprob], int]:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    finish: str | None = None
    n_tokens = 0
    async for d in stream:
        parts.append(d.text)
        logprobs.extend(d.logprobs)
        finish = d.finish_reason
        n_tokens = d.completion_tokens
    return "".join(parts), finish, logprobs, n_tokens


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs_json(engine: Engine, items: tuple[TokenLogprob, ...] | list[TokenLogprob], chat: bool) -> Any:
    tok = engine.tokenizer
    real = list(items)

    def text(t: int) -> str:
        return str(tok.decode([t]))

    if chat:
        return {
            "content": [
                {
                    "token": text(x.token_id),
                    "logprob": x.logprob,
                    "bytes": list(text(x.token_id).encode()),
                    "top_logprobs": [
                        {"token": text(t), "logprob": lp, "bytes": list(text(t).encode())} for t, lp in x.top
                    ],
                }
                for x in real
            ]
        }
    return {
        "tokens": [text(x.token_id) for x in real],
        "token_logprobs": [x.logprob for x in real],
        "top_logprobs": [{text(t): lp for t, lp in x.top} for x in real],
        "text_offset": [],
    }
