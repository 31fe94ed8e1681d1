"""The OpenAI-compatible HTTP API, assembled: one FastAPI app, its error handlers, and `run`.

The routes live by topic, each parsing its body, making one call and shaping JSON:
completions.py (POST /v1/chat/completions and /v1/completions, JSON or SSE), models.py
(GET /v1/models), admin.py (feedback, adapter load/unload/reload with vLLM's route names, aliases,
usage, keys, audit), and web/routes.py (the web app). Here: GET /health, /ready and /metrics
(Prometheus), the OpenAPI document, and the handlers that turn every failure into OpenAI's error
shape {"error": {message, type, param, code}} (errors.py) and every completion request into one
log row, also those refused before a route ran.

Keys, access, limits, the request log, metrics, upstream routes and output filters live in
gateway/. This module does not batch, sample or load weights (see engine/).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from loraplex.adapters import names, registry
from loraplex.api import admin as admin_routes
from loraplex.api import completions, embeddings, models, responses, tokenize
from loraplex.api.body import BodyLimit, UnicodeRoute
from loraplex.api.errors import APIError, translate
from loraplex.api.schemas import ERRORS, model_pattern
from loraplex.assistants import retrieval
from loraplex.assistants import store as assistants
from loraplex.engine.protocol import EngineClient
from loraplex.errors import UpstreamError, UserError
from loraplex.gateway.gate import Call, Gateway, Overloaded
from loraplex.gateway.keys import AuthError, Key
from loraplex.gateway.limits import RateLimited
from loraplex.web import routes as web_routes

log = logging.getLogger(__name__)
UNSUPPORTED = {
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "audio": "audio output is not supported by this server",
    "modalities": "only text output is supported by this server",
    "prediction": "predicted outputs are not supported by this server",
}
# routes whose every request leaves a log row (endpoint, id prefix)
LOGGED_PATHS = {
    "/v1/chat/completions": ("chat", "chatcmpl"),
    "/v1/completions": ("completions", "cmpl"),
    "/v1/embeddings": ("embeddings", "emb"),
    "/v1/responses": ("responses", "resp"),
}


def _one_value_per_query_key(request: Request) -> None:
    """No route takes a list in its query string, so a repeated key (`?limit=5&limit=9`, which FastAPI
    would read as its last value) is a 400 naming it, like any other invalid parameter."""
    seen: set[str] = set()
    for name, _ in request.query_params.multi_items():
        if name in seen:
            raise APIError(400, f"query parameter {name!r} is given more than once", param=name, code="invalid_request")
        seen.add(name)


def _close_call(request: Request, status: int, code: str | None) -> None:
    """Every completion or embedding request leaves one log row: also those refused before the route ran."""
    call: Call | None = getattr(request.state, "call", None)
    gateway: Gateway | None = getattr(request.app.state, "gateway", None)
    if call is None and gateway is not None and request.url.path in LOGGED_PATHS:
        call = request.state.call = gateway.call(*LOGGED_PATHS[request.url.path])
    if call is not None:
        call.close(status, code or str(status))


def create_app(engine: EngineClient, gateway: Gateway | None = None, body_timeout: float = 10.0) -> FastAPI:
    gw = gateway or Gateway(engine=engine)
    searcher = retrieval.Searcher()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # jieba, its dictionary and IDF table (knowledge/lexicon.py) and the spelling tables: before the
        # first question, not during it (~2 s the first time on a machine, while the tables are built).
        # Only when something will be searched: they hold ~30 MiB (an adapter trained with retrieval
        # while the server runs loads them at its first question).
        # tests/test_api.py checks both cases.
        bases = assistants.knowledge_bases()
        if bases or registry.any_knowledge():
            await asyncio.to_thread(searcher.warm, bases)
        yield
        await asyncio.to_thread(engine.close, 5.0)  # finish in-flight work, abort what is left
        await gw.aclose()  # after the engine: the last streams' log rows are written too
        searcher.close()

    app = FastAPI(
        title="loraplex", lifespan=lifespan, responses=ERRORS, dependencies=[Depends(_one_value_per_query_key)]
    )
    app.router.route_class = UnicodeRoute  # every route added below: JSON bodies must be Unicode

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this server's base model among the names `model` may be."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
        bodies = schema["components"]["schemas"]
        for body in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
            bodies[body]["properties"]["model"]["pattern"] = model_pattern(base_names)
        for body in ("TokenizeText", "TokenizeChat", "DetokenizeRequest"):
            bodies[body]["properties"]["model"]["pattern"] = model_pattern(base_names)
        prompt = bodies["CompletionRequest"]["properties"]["prompt"]["anyOf"]
        token_ids = [
            prompt[2]["items"],
            prompt[3]["items"]["items"],
            bodies["DetokenizeRequest"]["properties"]["tokens"]["items"],
        ]
        for ids in token_ids:  # token ids (one prompt, a batch of them, or to detokenize): in the vocabulary
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
    base_names = names.base_names(engine.base.id)

    def principal(request: Request) -> Key | None:
        if request.url.path in LOGGED_PATHS:
            request.state.call = gw.call(*LOGGED_PATHS[request.url.path])
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
        return APIError(400, message, param=param, code="invalid_request").response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        _close_call(request, exc.status, exc.code)
        return exc.response()

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
        return APIError(
            exc.status_code,
            message,
            "invalid_request_error" if exc.status_code < 500 else "server_error",
            getattr(exc, "param", None),
            headers=dict(exc.headers or {}),  # a 405's Allow
        ).response()

    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        e = translate(exc)
        _close_call(request, e.status, e.code)
        if e.status >= 500 and e.status != 503:  # a fault, not a refusal (overload, shutdown): logged
            call: Call | None = getattr(request.state, "call", None)
            rid = call.id if call is not None else f"req-{secrets.token_hex(8)}"
            log.error(
                "%s %s -> %d, request %s: %s", request.method, request.url.path, e.status, rid, e.message, exc_info=exc
            )
            e.headers = {**(e.headers or {}), "X-Request-Id": rid}
        return e.response()

    # the gateway's refusals are answers, not crashes: handled here, never logged as tracebacks
    for refusal in (AuthError, RateLimited, Overloaded, UpstreamError, UserError):  # db.Unavailable too
        app.add_exception_handler(refusal, _crash)
    app.add_exception_handler(Exception, _crash)

    web_routes.add_routes(app, gw, engine, principal, admin)  # the web app at /, conversations, dashboard, training

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.closing:
            return APIError(503, "shutting down", "server_error").response()
        return JSONResponse({"status": "ready", "model": engine.base.id})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(key: Key | None = Depends(admin)) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(gw.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    serving = completions.Serving(engine, gw, allowed, searcher)
    completions.add_routes(app, serving, principal)
    responses.add_routes(app, serving, principal)
    embeddings.add_routes(app, gw, principal, allowed)
    models.add_routes(app, engine, gw, principal, allowed)
    tokenize.add_routes(app, engine, principal, allowed)
    admin_routes.add_routes(app, engine, gw, principal, admin)
    return app


def run(
    engine: EngineClient,
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


def _methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route serves at the request's path. Starlette's 405 names only the first
    route's methods, and a path here may have one route per method (GET, PUT, DELETE)."""
    scope = {"type": "http", "path": request.url.path, "method": request.method, "root_path": ""}
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route) and route.methods and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)
