"""The OpenAI-compatible HTTP API: thin routes that parse, call `Engine.generate`, and shape JSON.

Routes: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (both stream with SSE,
ending `data: [DONE]`), POST /v1/feedback, POST /v1/load_lora_adapter and /v1/unload_lora_adapter
(vLLM's names), the admin routes under /admin, GET /metrics (Prometheus), GET /health and /ready.
Every error is OpenAI's shape: {"error": {message, type, param, code}}.

Keys, access, limits, the request log, metrics, upstream routes and output filters live in
gateway/; a route asks the `Gateway` and records into the request's `Call`. An assistant
(assistants/) is a model name too: its system prompt, defaults and retrieved passages shape the
messages before they reach the engine, and its sources come back in the message (`sources`) and in
the first chunk of a stream.

Streaming uses sse-starlette, which also notices a client that disconnects and cancels the
response; the engine then frees that row at once (engine.generate's `finally`).
This module does not batch, sample or load weights (see engine/).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from loraplex.adapters import registry
from loraplex.api.body import UnicodeRoute
from loraplex.api.errors import APIError, error_response, translate
from loraplex.api.schemas import (
    ERRORS,
    AliasRequest,
    ChatCompletionRequest,
    CompletionRequest,
    FeedbackRequest,
    LoadAdapterRequest,
    UnloadAdapterRequest,
    model_pattern,
)
from loraplex.assistants import faq, retrieval
from loraplex.assistants import store as assistants
from loraplex.engine.adapter_cache import ModelNotFound, not_found
from loraplex.engine.engine import Delta, Engine
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.remote import RemoteEngine
from loraplex.engine.sampling import SamplingParams, TokenLogprob
from loraplex.errors import UserError
from loraplex.gateway import feedback, upstream
from loraplex.gateway.gate import Call, Gateway, Overloaded
from loraplex.gateway.keys import AuthError, Key
from loraplex.gateway.limits import RateLimited
from loraplex.gateway.log import audit_rows, summary
from loraplex.web.routes import add_routes

log = logging.getLogger(__name__)
AnyEngine = Engine | RemoteEngine  # the built-in engine, or vLLM over HTTP (serve --engine vllm)
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


class BodyTooLarge(StarletteHTTPException):
    def __init__(self) -> None:
        super().__init__(413, f"request body larger than {MAX_BODY} bytes")


class BodyLimit:
    """Refuse request bodies over MAX_BODY (413): by their Content-Length before reading them, and
    by the bytes received so far for chunked bodies, which have none.

    Plain ASGI rather than `@app.middleware("http")`, whose wrapper re-buffers every streamed
    chunk (a measurable cost per token at SSE rates). Why not Starlette's RequestBodyLimitMiddleware
    (FastAPI's `max_body_size`): it answers some oversize bodies in plain text, not OpenAI's JSON."""

    def __init__(self, app: Any, chunk_timeout: float = 10.0):
        self.app = app
        self.chunk_timeout = chunk_timeout  # seconds a body may pause between chunks (`serve --header-timeout`)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        size = dict(scope.get("headers") or []).get(b"content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY):
            await error_response(413, f"request body larger than {MAX_BODY} bytes")(scope, receive, send)
            return
        received, complete = 0, False

        async def counted() -> Any:
            nonlocal received, complete
            if complete:  # afterwards the only message is the disconnect, which may take as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.chunk_timeout)
            except TimeoutError:  # FastAPI re-raises HTTPExceptions from reading the body
                raise StarletteHTTPException(408, f"no request body data for {self.chunk_timeout:g} s") from None
            received += len(message.get("body", b""))
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            if received > MAX_BODY:
                raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


COMPLETION_PATHS = {"/v1/chat/completions": ("chat", "chatcmpl"), "/v1/completions": ("completions", "cmpl")}


def _close_call(request: Request, status: int, code: str | None) -> None:
    """Every completion request leaves one log row: also those refused before the route ran."""
    call: Call | None = getattr(request.state, "call", None)
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if call is None and gateway is not None and request.url.path in COMPLETION_PATHS:
        call = request.state.call = gateway.call(*COMPLETION_PATHS[request.url.path])
    if call is not None:
        call.close(status, code or str(status))


def create_app(engine: AnyEngine, gateway: Gateway | None = None, body_timeout: float = 10.0) -> FastAPI:
    gw = gateway or Gateway(engine=engine)
    searcher = retrieval.Searcher()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # jieba's dictionary and IDF table take ~2 s to load: before the first question, not during it
        await asyncio.to_thread(searcher.warm, _knowledge_bases())
        yield
        await asyncio.to_thread(engine.close, 5.0)  # finish in-flight work, abort what is left
        await gw.aclose()  # after the engine: the last streams' log rows are written too
        searcher.close()

    app = FastAPI(title="loraplex", lifespan=lifespan, responses=ERRORS)
    app.router.route_class = UnicodeRoute  # every route added below: JSON bodies must be Unicode

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this server's base model among the names `model` may be."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
        bodies = schema["components"]["schemas"]
        for body in ("ChatCompletionRequest", "CompletionRequest"):
            bodies[body]["properties"]["model"]["pattern"] = model_pattern(base_names)
        ids = bodies["CompletionRequest"]["properties"]["prompt"]["anyOf"][2]["items"]  # prompt as token ids
        ids.update(minimum=0, maximum=engine.vocab_size - 1)
        # errors are JSON on every route; FastAPI gives them the route's type (/metrics: text/plain)
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if not status.startswith("2") and content and "application/json" not in content:
                    response["content"] = {"application/json": next(iter(content.values()))}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.gateway = gw
    app.add_middleware(BodyLimit, chunk_timeout=body_timeout)
    created = int(time.time())
    base_names = (engine.base.id, "base", "default")

    def principal(request: Request) -> Key | None:
        if request.url.path in COMPLETION_PATHS:
            request.state.call = gw.call(*COMPLETION_PATHS[request.url.path])
        key = gw.authenticate(request.headers.get("authorization"))
        if key is not None and getattr(request.state, "call", None) is not None:
            request.state.call.key = key
        return key

    def admin(request: Request) -> Key | None:
        key = principal(request)
        if key is not None and not key.admin:
            gw.log.audit(key.name, f"{request.method} {request.url.path}", None, None, 403)
            raise APIError(403, "this route needs an admin key", "permission_error", code="admin_required")
        return key

    def allowed(key: Key | None, model: str) -> bool:
        return key is None or key.allows(model, base_names)

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
        _close_call(request, 400, "invalid_request")
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _close_call(request, exc.status, exc.code)
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
            exc.headers = {"Allow": ", ".join(_methods(app, request))}
        elif exc.status_code == 400 and "parsing the body" in str(exc.detail):
            message = "the request body could not be read: it must be UTF-8 JSON"
        else:
            message = str(exc.detail)
        _close_call(request, exc.status_code, None)
        return error_response(
            exc.status_code,
            message,
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            getattr(exc, "param", None),
            headers=dict(exc.headers or {}),  # a 405's Allow
        )

    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        e = translate(exc)
        _close_call(request, e.status, e.code)
        headers = e.headers
        if e.status >= 500 and e.status != 503:  # a fault, not a refusal (overload, shutdown): logged
            call: Call | None = getattr(request.state, "call", None)
            rid = call.id if call is not None else f"req-{secrets.token_hex(8)}"
            log.error(
                "%s %s -> %d, request %s: %s", request.method, request.url.path, e.status, rid, e.message, exc_info=exc
            )
            headers = {**(headers or {}), "X-Request-Id": rid}
        return error_response(e.status, e.message, e.type, e.param, e.code, headers)

    # the gateway's refusals are answers, not crashes: handled here, never logged as tracebacks
    for refusal in (AuthError, RateLimited, Overloaded, upstream.UpstreamError, UserError):  # db.Unavailable too
        app.add_exception_handler(refusal, _crash)
    app.add_exception_handler(Exception, _crash)

    add_routes(app, gw, engine, principal, admin)  # the web app at /, conversations, dashboard, training

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine._closing:
            return error_response(503, "shutting down", "server_error")
        return JSONResponse({"status": "ready", "model": engine.base.id})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(key: Key | None = Depends(admin)) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(key: Key | None = Depends(principal)) -> dict[str, Any]:
        data = await asyncio.to_thread(_model_list, engine, created, gw)
        return {"object": "list", "data": [m for m in data if allowed(key, m["id"])]}

    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat(request: Request, req: ChatCompletionRequest, key: Key | None = Depends(principal)) -> Any:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        top = req.top_logprobs if req.logprobs else None
        if req.logprobs and top is None:
            top = 0
        call = request.state.call
        call.prompt = messages
        limit = req.max_completion_tokens or req.max_tokens
        return await _complete(engine, gw, call, req, messages, limit, top, True, allowed, searcher, request.receive)

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(request: Request, req: CompletionRequest, key: Key | None = Depends(principal)) -> Any:
        if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], str):
            if len(req.prompt) != 1:
                raise APIError(400, "this server takes one prompt per request", param="prompt")
            prompt: Any = req.prompt[0]
        else:
            prompt = req.prompt
        call = request.state.call
        call.prompt = prompt
        return await _complete(
            engine, gw, call, req, prompt, req.max_tokens, req.logprobs, False, allowed, searcher, request.receive
        )

    @app.post("/v1/feedback")
    async def give_feedback(req: FeedbackRequest, key: Key | None = Depends(principal)) -> dict[str, Any]:
        item = gw.recent.get(req.id)
        if item is None:
            row = await asyncio.to_thread(gw.log.lookup, req.id)
            if row is not None and row["response"] and row["status"] < 400:
                prompt = json.loads(row["prompt"])
                messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
                item = feedback.Answered(row["key"], row["served"], messages, tuple(json.loads(row["response"])))
        # another key's response is as unknown as a missing one
        if item is None or (key is not None and item.key != key.name):
            raise APIError(404, f"no recent response with id {req.id!r}", param="id", code="response_not_found")
        if req.choice >= len(item.answers):
            raise APIError(400, f"choice {req.choice}: the response has {len(item.answers)}", param="choice")
        fid = await asyncio.to_thread(
            feedback.record, gw.db, req.id, item, req.choice, req.rating, req.comment, req.correction
        )
        return {"id": fid, "object": "feedback", "response_id": req.id, "model": item.served, "rating": req.rating}

    async def audited(key: Key | None, action: str, target: str, detail: Any, work: Any) -> Any:
        status = 200
        try:
            return await asyncio.to_thread(work)
        except Exception as e:  # noqa: BLE001
            err = translate(e)
            status = err.status
            raise err from None
        finally:
            await asyncio.to_thread(gw.log.audit, key.name if key else None, action, target, detail, status)

    @app.post("/v1/load_lora_adapter")
    @app.post("/admin/adapters/load")
    async def load_adapter(req: LoadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> str:
            if req.lora_path is not None:
                stored = registry.resolve(_one_adapter_version(engine, req.lora_name)).path
                if Path(req.lora_path).resolve() != stored.resolve():
                    raise APIError(
                        422,
                        f"lora_path {req.lora_path!r} is not the store's directory of {req.lora_name!r}: this "
                        "server loads adapters by name from its store",
                        param="lora_path",
                    )
            return engine.load_adapter(req.lora_name, req.pin)

        loaded = await audited(key, "load", req.lora_name, {"pin": req.pin}, work)
        return {"loaded": loaded, "pinned": req.pin}

    @app.post("/v1/unload_lora_adapter")
    @app.post("/admin/adapters/unload")
    async def unload_adapter(req: UnloadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> list[str]:
            return engine.unload_adapter(_one_adapter(engine, req.lora_name))

        return {"unloaded": await audited(key, "unload", req.lora_name, None, work)}

    @app.post("/admin/adapters/reload")
    async def reload_adapter(req: LoadAdapterRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        """Drop every loaded version of the adapter and load what its name resolves to now."""

        def work() -> dict[str, Any]:
            name = _one_adapter(engine, req.lora_name)
            return {"unloaded": engine.unload_adapter(name), "loaded": engine.load_adapter(req.lora_name, req.pin)}

        return await audited(key, "reload", req.lora_name, {"pin": req.pin}, work)

    @app.post("/admin/aliases")
    async def move_alias(req: AliasRequest, key: Key | None = Depends(admin)) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            if req.rollback:
                old, new = registry.rollback(req.name, req.alias)
                return {"alias": f"{req.name}@{req.alias}", "from": f"{req.name}@v{old}", "to": f"{req.name}@v{new}"}
            if req.version is None:
                raise UserError("give a version to point the alias at, or rollback: true")
            ref = registry.tag(f"{req.name}@v{req.version}", req.alias)
            return {"alias": f"{req.name}@{req.alias}", "to": ref.id}

        detail = {"version": req.version, "rollback": req.rollback}
        return await audited(key, "alias", f"{req.name}@{req.alias}", detail, work)

    @app.get("/admin/usage")
    async def usage(
        by: Literal["adapter", "key"] = "adapter", since: float | None = None, key: Key | None = Depends(admin)
    ) -> Any:
        await asyncio.to_thread(gw.log.flush)
        rows = await asyncio.to_thread(summary, gw.db, since, by)
        await asyncio.to_thread(gw.log.audit, key.name if key else None, "usage", by, {"since": since}, 200)
        return {"object": "list", "by": by, "data": rows}

    @app.get("/admin/keys")
    async def key_list(key: Key | None = Depends(admin)) -> Any:
        from loraplex.gateway import keys as key_store

        await asyncio.to_thread(gw.log.flush)
        use = {r["name"]: r for r in await asyncio.to_thread(summary, gw.db, None, "key")}
        data = [
            {
                "name": k.name,
                "models": list(k.models),
                "admin": k.admin,
                "rpm": k.rpm,
                "tpm": k.tpm,
                "expires": k.expires,
                "revoked": k.revoked,
                "usage": use.get(k.name),
            }
            for k in await asyncio.to_thread(key_store.list_keys, gw.db)
        ]
        await asyncio.to_thread(gw.log.audit, key.name if key else None, "keys", None, None, 200)
        return {"object": "list", "data": data}

    @app.get("/admin/audit")
    async def audit(limit: int = 100, key: Key | None = Depends(admin)) -> Any:
        return {"object": "list", "data": await asyncio.to_thread(audit_rows, gw.db, min(max(limit, 1), 10_000))}

    return app


def _model_list(engine: AnyEngine, created: int, gw: Gateway) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = [
        {
            "id": engine.base.id,
            "object": "model",
            "created": created,
            "owned_by": "loraplex",
            "max_model_len": engine.max_model_len,
        }
    ]
    for up in gw.config.upstreams:  # exact names only: a pattern names no model a client could pick
        for name in up.models:
            if not any(c in name for c in "*?["):
                data.append({"id": name, "object": "model", "created": created, "owned_by": up.base_url})
    shadowed = set()
    for name in assistants.names():
        try:
            found = assistants.find(name)
            if found is None:
                continue
            engine.adapters.resolve(found.model)  # its adapters must be servable here
        except UserError as e:
            log.warning("assistant %s not listed: %s", name, e)
            continue
        shadowed.add(name)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": int(_ts(found.created_at)) if found.created_at else created,
                "owned_by": "loraplex",
                "parent": engine.base.id,
                "kind": "assistant",
                "display_name": found.display_name or name,
                "description": found.description,
                "adapters": found.model,
                "knowledge": found.knowledge.base if found.knowledge else None,
                "defaults": found.sampling.model_dump(exclude_none=True),
            }
        )
    all_aliases = registry.all_aliases()
    for name, versions in registry.list_names():
        if name in shadowed:
            continue  # an assistant of the same name answers to it
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
            "kind": "adapter",
        }
        data.append(entry)
        # each alias is a model of its own, so chat UIs can offer `legal@prod` in their model menu
        for a, v in sorted(aliases.items()):
            data.append({**entry, "id": f"{name}@{a}", "root": f"{name}@v{v}", "version": v})
    return data


def _knowledge_bases() -> list[str]:
    bases = set()
    for name in assistants.names():
        try:
            found = assistants.find(name)
        except UserError:
            continue  # reported when it is used
        if found is not None and found.knowledge is not None:
            bases.add(found.knowledge.base)
    return sorted(bases)


def _assistant(model: str) -> assistants.Assistant | None:
    try:
        return assistants.find(model)
    except UserError as e:  # a hand-edited file with a mistake: the operator's to fix, not the client's
        raise _misconfigured(model, e) from None


def _misconfigured(model: str, e: Exception) -> APIError:
    return APIError(500, f"assistant {model!r} cannot answer: {e}", "server_error", code="assistant_misconfigured")


def _apply_defaults(
    req: ChatCompletionRequest | CompletionRequest, assistant: assistants.Assistant, max_tokens: int | None
) -> int | None:
    """The assistant's sampling defaults, for what the request left unset."""
    given = req.model_fields_set
    s = assistant.sampling
    if s.temperature is not None and "temperature" not in given:
        req.temperature = s.temperature
    if s.top_p is not None and "top_p" not in given:
        req.top_p = s.top_p
    return max_tokens if max_tokens is not None else s.max_tokens


async def _fixed_answer(engine: AnyEngine, text: str, prompt_tokens: int) -> AsyncIterator[Delta]:
    ids = tuple(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    yield Delta(text, ids, (), "stop", prompt_tokens, len(ids))


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
            stop=tuple(req.stop or ()),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            logprobs=top_logprobs,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _complete(
    engine: AnyEngine,
    gw: Gateway,
    call: Call,
    req: ChatCompletionRequest | CompletionRequest,
    prompt: Any,
    max_tokens: int | None,
    top_logprobs: int | None,
    chat: bool,
    allowed: Any,
    searcher: retrieval.Searcher,
    receive: Any,
) -> Any:
    call.model = req.model
    if not allowed(call.key, req.model):
        # the answer a missing model gets: a key learns nothing about hidden ones
        raise APIError(404, not_found(req.model), param="model", code="model_not_found")
    assistant = await asyncio.to_thread(_assistant, req.model)
    # an adapter trained with retrieval answers from its own Q&A, as an assistant would
    own_knowledge = assistant is None and chat and (assistant := await asyncio.to_thread(faq.assistant, req.model))
    prepared: retrieval.Prepared | None = None
    headers: dict[str, str] = {}
    if assistant is not None:
        if not chat:
            raise APIError(400, f"{req.model!r} is an assistant: use /v1/chat/completions", param="model")
        max_tokens = _apply_defaults(req, assistant, max_tokens)
        # room for the answer: what the request asks for, else a quarter of the context (at most 256)
        reserve = max_tokens or min(256, engine.max_model_len // 4)

        fitted: list[Any] = [None, None]  # the last prompt measured and its ids, so it is not encoded twice

        def fits(msgs: list[dict[str, str]]) -> bool:
            fitted[:] = [msgs, engine.encode(msgs)]
            return len(fitted[1]) + reserve <= engine.max_model_len

        try:
            t_retrieval = time.perf_counter()
            prepared = await asyncio.to_thread(retrieval.prepare, assistant, prompt, searcher, True, fits)
            if assistant.knowledge is not None:
                took = time.perf_counter() - t_retrieval
                gw.metrics.retrieval.labels(req.model).observe(took)
                # for clients and benchmarks: what retrieval added to this request, before any token
                headers["X-Retrieval-Ms"] = f"{took * 1e3:.2f}"

        except UserError as e:
            raise _misconfigured(req.model, e) from None
        prompt = prepared.messages
    elif not chat and max_tokens is None:
        max_tokens = 16  # OpenAI's default for /v1/completions
    filt = gw.output_filter(req.model)
    if filt and top_logprobs is not None:
        raise APIError(400, f"logprobs are not available for {req.model!r}: its output is filtered", param="logprobs")
    up = gw.config.upstream_for(req.model) if assistant is None else None
    gw.reserve(call, req.n)
    if up is not None:
        return await _proxy(gw, call, req, up, chat, filt)
    try:
        if assistant is None:
            adapter = await asyncio.to_thread(engine.adapters.resolve, req.model)
            served = adapter.key or engine.base.id
        else:
            try:
                adapter = await asyncio.to_thread(engine.adapters.resolve, assistant.model)
            except UserError as e:
                if own_knowledge:
                    raise  # the client's model name, answered like any adapter's (below)
                raise _misconfigured(req.model, e) from None
            served = adapter.key if own_knowledge else assistant.name
            if prepared is not None and prepared.base_only:
                adapter = AdapterRequest()  # nothing relevant found: off-topic for these adapters
        if prepared is not None and prepared.messages is fitted[0]:
            prompt_ids = fitted[1]
        else:
            prompt_ids = await asyncio.to_thread(engine.encode, prompt)
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        if any(not 0 <= t < engine.vocab_size for t in prompt_ids):
            raise APIError(400, "prompt token ids must be within the vocabulary", param="prompt")
        engine.check_length(len(prompt_ids), max_tokens)
    except Exception as e:  # noqa: BLE001
        raise translate(e) from None
    call.served = served
    call.prompt_tokens = len(prompt_ids)
    if call.key is not None:
        if gw.limiter.blocking:  # a database round trip: off the event loop
            call.usage = await asyncio.to_thread(gw.limiter.admit, call.key, len(prompt_ids))
        else:
            call.usage = gw.limiter.admit(call.key, len(prompt_ids))

    kind = "chat.completion" if chat else "text_completion"
    rid = call.id
    created = int(time.time())
    sources = None
    if prepared is not None and assistant is not None and assistant.knowledge is not None:
        sources = [x.json() for x in prepared.sources]
    if prepared is not None and prepared.refusal is not None:
        # nothing relevant in the knowledge base and the assistant refuses to guess: no model run
        refusal = prepared.refusal
        streams = [_fixed_answer(engine, refusal, len(prompt_ids)) for _ in range(req.n)]
    else:
        streams = [
            engine.generate(prompt_ids, _params(req, top_logprobs, i), adapter, max_tokens) for i in range(req.n)
        ]

    if not req.stream:
        # A client that leaves stops its generation, as a stream's does (sse-starlette watches
        # those): the next ASGI message after the body is the disconnect.
        answers = asyncio.gather(*[_collect(s, call) for s in streams])
        gone = asyncio.create_task(_disconnected(receive))
        either: set[asyncio.Future[Any]] = {answers, gone}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if not answers.done():
            answers.cancel()  # each stream's `finally` frees its row in the engine
            await asyncio.gather(answers, return_exceptions=True)
            call.close(499, "client_disconnected")
            return Response(status_code=499)
        gone.cancel()
        try:
            results = answers.result()
        except Exception as e:  # noqa: BLE001
            raise translate(e) from None
        choices = []
        texts = [filt.apply(r[0]) if filt else r[0] for r in results]
        for i, (text, (_, finish, logprobs, _)) in enumerate(zip(texts, results, strict=True)):
            lp = (
                _logprobs_json(engine, logprobs, chat, req.return_tokens_as_token_ids)
                if top_logprobs is not None
                else None
            )
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if sources is not None:
                    message["sources"] = sources
                choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
            else:
                choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        call.completion_tokens = sum(r[3] for r in results)
        call.finish_reason = results[0][1]
        call.answers = texts
        call.close(200)
        body = {
            "id": rid,
            "object": kind,
            "created": created,
            "model": served,
            "choices": choices,
            "usage": _usage(len(prompt_ids), call.completion_tokens),
            "system_fingerprint": f"loraplex-{engine.base.id}",
        }
        return JSONResponse(body, headers=headers) if headers else body

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    itl = gw.metrics.itl.labels(served)

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

        status: int = 499  # unless the stream ends otherwise
        code: str | None = "client_disconnected"
        texts: list[list[str]] = [[] for _ in range(req.n)]
        filters = [filt.stream() for _ in range(req.n)] if filt else None
        try:
            if chat:
                for i in range(req.n):
                    opening: dict[str, Any] = {"role": "assistant", "content": ""}
                    if sources is not None:
                        opening["sources"] = sources
                    first = {"index": i, "delta": opening, "logprobs": None, "finish_reason": None}
                    yield {"data": chunk([first])}
            tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
            completion_tokens, open_streams = 0, req.n
            last = time.perf_counter()
            try:
                while open_streams:
                    i, item = await queue.get()
                    if item is None:
                        open_streams -= 1
                        continue
                    if isinstance(item, BaseException):
                        e = translate(item)
                        status, code = e.status, e.code or str(e.status)
                        if status >= 500 and status != 503:
                            log.error("stream %s failed with %d: %s", rid, status, e.message, exc_info=item)
                        yield {
                            "data": json.dumps(
                                {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
                            )
                        }
                        return
                    now = time.perf_counter()
                    if call.t_first is None:
                        call.first_token()
                    elif item.token_ids:
                        itl.observe((now - last) / len(item.token_ids))
                    last = now
                    text = item.text
                    if filters is not None:
                        text = filters[i].feed(text) + (filters[i].finish() if item.finish_reason else "")
                    texts[i].append(text)
                    lp = (
                        _logprobs_json(engine, item.logprobs, chat, req.return_tokens_as_token_ids)
                        if top_logprobs is not None
                        else None
                    )
                    if chat:
                        delta = {"content": text} if text else {}
                        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": item.finish_reason}
                    else:
                        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": item.finish_reason}
                    if item.finish_reason is not None:
                        completion_tokens += item.completion_tokens
                        call.finish_reason = call.finish_reason or item.finish_reason
                    call.completion_tokens = completion_tokens
                    yield {"data": chunk([choice])}
                if include_usage:
                    yield {"data": chunk([], _usage(len(prompt_ids), completion_tokens))}
                yield {"data": "[DONE]"}
                status, code = 200, None
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            call.answers = ["".join(t) for t in texts]
            call.close(status, code)

    return EventSourceResponse(events(), sep="\n", ping=15, headers=headers)


async def _proxy(
    gw: Gateway, call: Call, req: ChatCompletionRequest | CompletionRequest, up: Any, chat: bool, filt: Any
) -> Any:
    """Answer from an upstream endpoint (gateway/upstream.py), metered like the engine's answers."""
    path = "/chat/completions" if chat else "/completions"
    body = req.model_dump(exclude_unset=True)
    out = upstream.Outcome()
    call.served = f"{req.model}@{up.base_url}"
    if not req.stream:
        data = await upstream.complete(gw.http, up, path, body, filt, out, call.id)
        call.t_first = out.first_token
        call.prompt_tokens, call.completion_tokens = out.prompt_tokens, out.completion_tokens
        call.finish_reason = out.finish_reason
        call.answers = ["".join(out.texts.get(i, [])) for i in range(req.n)]
        call.close(200)
        return data
    chunks = upstream.stream(gw.http, up, path, body, filt, out, call.id)
    first = await anext(chunks)  # an upstream refusal is still an HTTP error here, not a broken stream

    async def events() -> AsyncIterator[dict[str, str]]:
        status: int = 499
        code: str | None = "client_disconnected"
        try:
            yield {"data": first}
            async for payload in chunks:
                yield {"data": payload}
            status, code = 200, None
        except upstream.UpstreamError as e:
            status, code = e.status, e.code
            yield {"data": json.dumps({"error": {"message": e.message, "type": "server_error", "code": e.code}})}
        finally:
            call.t_first = out.first_token
            call.prompt_tokens, call.completion_tokens = out.prompt_tokens, out.completion_tokens
            call.finish_reason = out.finish_reason
            call.answers = ["".join(out.texts.get(i, [])) for i in range(req.n)]
            call.close(status, code)

    return EventSourceResponse(events(), sep="\n", ping=15)


def run(
    engine: AnyEngine,
    host: str,
    port: int,
    shutdown_timeout: float,
    gateway: Gateway | None = None,
    header_timeout: float = 10.0,
    max_connections: int | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully: stop accepting connections and new
    requests (503 `shutting_down`, /ready 503), let in-flight requests finish for up to
    `shutdown_timeout` s, end the ones still running with an OpenAI error (a 503, or an error event
    in a stream), and exit. Slow and surplus clients are cut off (guard.py, `BodyLimit`)."""
    import uvicorn
    from sse_starlette.sse import AppStatus

    from loraplex.api import guard

    # sse-starlette would cut every open stream at the first signal; we drain them instead.
    AppStatus.disable_automatic_graceful_drain()

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(engine, gateway, body_timeout=header_timeout),
        host=host,
        port=port,
        log_level="warning",
        # uvicorn's own deadline comes after ours, so aborted streams still get their error event out
        timeout_graceful_shutdown=int(shutdown_timeout) + 5,
        http=guard.guarded_protocol(header_timeout, max_connections or guard.default_max_connections()),
    )
    DrainingServer(config).run()


async def _collect(stream: AsyncIterator[Delta], call: Call) -> tuple[str, str | None, list[TokenLogprob], int]:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    finish: str | None = None
    n_tokens = 0
    async for d in stream:
        call.first_token()
        parts.append(d.text)
        logprobs.extend(d.logprobs)
        finish = d.finish_reason
        call.completion_tokens += d.completion_tokens - n_tokens  # what is metered if the client leaves
        n_tokens = d.completion_tokens
    return "".join(parts), finish, logprobs, n_tokens


# a completion is JSON, or server-sent events with `stream: true`
STREAMED: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}


def _methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path. Starlette's 405 names only the first
    route's methods, and a path here may have one route per method (GET, PUT, DELETE)."""
    scope = {"type": "http", "path": request.url.path, "method": request.method, "root_path": ""}
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _one_adapter_version(engine: AnyEngine, lora_name: str) -> str:
    """The adapter version (`NAME@vN`) a load/unload/reload request names, read by the parser
    requests use (a malformed name is a 400, a missing one a 404): `hr@../../x` must not act on `hr`."""
    parts = engine.adapters.resolve(lora_name).parts
    if not parts:  # `base`, `default`: no adapter has that name
        raise ModelNotFound(not_found(lora_name))
    if len(parts) != 1:
        raise APIError(
            400, f"lora_name {lora_name!r}: name one adapter (not the base or a composition)", param="lora_name"
        )
    return parts[0][0]


def _one_adapter(engine: AnyEngine, lora_name: str) -> str:
    """The adapter name (every version of it) an unload/reload request acts on."""
    return _one_adapter_version(engine, lora_name).split("@")[0]


async def _disconnected(receive: Any) -> None:
    """Return when the client has closed the connection (call after the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _logprobs_json(
    engine: AnyEngine, items: tuple[TokenLogprob, ...] | list[TokenLogprob], chat: bool, as_ids: bool = False
) -> Any:
    tok = engine.tokenizer
    real = list(items)

    def text(t: int) -> str:
        return f"token_id:{t}" if as_ids else str(tok.decode([t]))

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
