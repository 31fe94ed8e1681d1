"""POST /v1/chat/completions and /v1/completions: parse, admit, answer.

A route parses its body into a prompt and calls `complete`, which runs three stages:

1. `admit`: the key may use the model; an assistant (or an adapter trained with retrieval) shapes
   the messages; the name resolves to exact adapter versions, or to an upstream endpoint; the
   prompt is encoded once and must fit the context; the key's limits take its tokens.
2. the engine's streams, one per choice (`n`), or a fixed refusal when retrieval found nothing;
3. `answer_json` or `answer_stream` (SSE ending `data: [DONE]`, sse-starlette, which also notices a
   client that leaves: the engine then frees that row at once, in engine.generate's `finally`).

Every request leaves one log row through its `Call`. This module does not batch or sample
(engine/), check keys or meter (gateway/), or search knowledge (assistants/retrieval.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse

from loraplex.adapters.names import not_found
from loraplex.api import render, tools
from loraplex.api.errors import APIError, translate
from loraplex.api.schemas import ChatCompletionRequest, CompletionRequest
from loraplex.assistants import faq, retrieval
from loraplex.assistants import store as assistants
from loraplex.engine import structured
from loraplex.engine.lora import AdapterRequest
from loraplex.engine.protocol import Answer, Delta, EngineClient, collect
from loraplex.engine.sampling import SamplingParams, TokenLogprob
from loraplex.errors import UpstreamError, UserError
from loraplex.gateway import upstream
from loraplex.gateway.gate import Call, Gateway
from loraplex.gateway.keys import Key
from loraplex.gateway.policy import OutputFilter

log = logging.getLogger(__name__)
Request_ = ChatCompletionRequest | CompletionRequest

# a completion is JSON, or server-sent events with `stream: true`
STREAMED: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


@dataclass(frozen=True)
class Serving:
    """What every completion needs from the app: the engine, the gateway, the key check, retrieval."""

    engine: EngineClient
    gw: Gateway
    allowed: Callable[[Key | None, str], bool]
    searcher: retrieval.Searcher


@dataclass
class Admitted:
    """A request that passed `admit`: what the engine runs and how the answer is labelled."""

    served: str
    prompts: list[list[int]]  # one for chat; /v1/completions takes several
    adapter: AdapterRequest
    max_tokens: int | None
    filt: OutputFilter | None
    sources: list[dict[str, Any]] | None = None
    refusal: str | None = None  # retrieval found nothing and the assistant refuses: no model run
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Shape:
    """What the answer must look like: a grammar for the engine (JSON text, structured.py) and the
    tools whose calls are parsed out of it (tools.py)."""

    fmt: str | None = None
    tools: tools.ToolPlan | None = None


class Run(NamedTuple):
    """An admitted request and its streams (one per choice: stream k answers prompt k // n)."""

    call: Call
    req: Request_
    admitted: Admitted
    streams: list[AsyncIterator[Delta]]
    top_logprobs: int | None
    chat: bool
    shape: Shape


def add_routes(app: FastAPI, s: Serving, principal: Callable[..., Key | None]) -> None:
    @app.post("/v1/chat/completions", responses=STREAMED)
    async def chat(request: Request, req: ChatCompletionRequest, key: Key | None = Depends(principal)) -> Any:
        return await chat_completion(s, request.state.call, req, request.receive)

    @app.post("/v1/completions", responses=STREAMED)
    async def completions(request: Request, req: CompletionRequest, key: Key | None = Depends(principal)) -> Any:
        if (conflict := req.conflict()) is not None:
            raise APIError(422, conflict[1], param=conflict[0], code="unprocessable")
        prompts = req.prompts()
        call = request.state.call
        call.prompt = prompts[0] if len(prompts) == 1 else prompts
        shape = Shape(req.format_json())
        return await complete(s, call, req, prompts, req.max_tokens, req.logprobs, False, request.receive, shape)


async def chat_completion(s: Serving, call: Call, req: ChatCompletionRequest, receive: Any) -> Any:
    """A parsed chat request: its JSON answer, or the event stream (also what /v1/responses runs)."""
    if (conflict := req.conflict()) is not None:
        raise APIError(422, conflict[1], param=conflict[0], code="unprocessable")
    plan = tools.plan(req, s.engine.tokenizer)
    messages, functions = tools.messages_for(s.engine.tokenizer, req.messages, plan)
    top = req.top_logprobs if req.logprobs else None
    if req.logprobs and top is None:
        top = 0
    call.prompt = messages
    prompt: Any = messages
    if tools.by_template(s.engine.tokenizer, req.messages, plan):  # rendered with `tools=` here
        prompt = await asyncio.to_thread(tools.encode, s.engine.tokenizer, messages, functions)
    grammar = tools.grammar(plan) if plan else None
    fmt = json.dumps({"type": "lark", "lark": grammar, "param": "tools"}) if grammar else req.format_json()
    limit = req.max_completion_tokens or req.max_tokens
    return await complete(s, call, req, [prompt], limit, top, True, receive, Shape(fmt, plan))


async def complete(
    s: Serving,
    call: Call,
    req: Request_,
    prompts: list[Any],
    max_tokens: int | None,
    top_logprobs: int | None,
    chat: bool,
    receive: Any,
    shape: Shape,
) -> Any:
    """One completion request, parsed: admit it, run it, answer as JSON or a stream."""
    admitted = await admit(s, call, req, prompts, max_tokens, top_logprobs, chat, shape.fmt)
    if not isinstance(admitted, Admitted):
        return admitted  # an upstream's answer
    a = admitted
    if a.refusal is not None:
        streams = [_fixed_answer(s.engine, a.refusal, len(a.prompts[0])) for _ in range(req.n)]
    else:
        streams = [
            s.engine.generate(ids, _params(req, top_logprobs, i, shape.fmt), a.adapter, a.max_tokens)
            for ids in a.prompts
            for i in range(req.n)
        ]
    run = Run(call, req, a, streams, top_logprobs, chat, shape)
    return await answer_json(s.engine, run, receive) if not req.stream else answer_stream(s, run)


async def admit(
    s: Serving,
    call: Call,
    req: Request_,
    prompts: list[Any],
    max_tokens: int | None,
    top_logprobs: int | None,
    chat: bool,
    fmt: str | None = None,
) -> Admitted | Any:
    """Everything between a parsed request and the engine: an `Admitted`, or an upstream's answer."""
    engine, gw = s.engine, s.gw
    prompt = prompts[0]  # chat has one; an assistant answers chat only
    call.model = req.model
    if not s.allowed(call.key, req.model):
        # the answer a missing model gets: a key learns nothing about hidden ones
        raise APIError(404, not_found(req.model), param="model", code="model_not_found")
    assistant = await asyncio.to_thread(_assistant, req.model)
    # an adapter trained with retrieval answers from its own Q&A, as an assistant would
    own_knowledge = assistant is None and chat and (assistant := await asyncio.to_thread(faq.assistant, req.model))
    if chat and assistant and isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
        # rendered with the template's own tool support: there are no messages left to add passages to
        raise APIError(
            400, f"{req.model!r} answers from its knowledge: it does not take tools on this base yet", param="tools"
        )
    prepared: retrieval.Prepared | None = None
    headers: dict[str, str] = {}
    fitted: list[Any] = [None, None]  # the last prompt measured and its ids, so it is not encoded twice
    if assistant is not None:
        if not chat:
            raise APIError(400, f"{req.model!r} is an assistant: use /v1/chat/completions", param="model")
        max_tokens = _apply_defaults(req, assistant, max_tokens)
        # room for the answer: what the request asks for, else a quarter of the context (at most 256)
        reserve = max_tokens or min(256, engine.max_model_len // 4)

        def fits(msgs: list[dict[str, str]]) -> bool:
            fitted[:] = [msgs, engine.encode(msgs)]
            return len(fitted[1]) + reserve <= engine.max_model_len

        try:
            t_retrieval = time.perf_counter()
            prepared = await asyncio.to_thread(retrieval.prepare, assistant, prompt, s.searcher, True, fits)
            if assistant.knowledge is not None:
                took = time.perf_counter() - t_retrieval
                gw.metrics.retrieval.labels(req.model).observe(took)
                # for clients and benchmarks: what retrieval added to this request, before any token
                headers["X-Retrieval-Ms"] = f"{took * 1e3:.2f}"
        except UserError as e:
            raise _misconfigured(req.model, e) from None
        prompt = prepared.messages
        prompts = [prepared.messages]
    elif not chat and max_tokens is None:
        max_tokens = 16  # OpenAI's default for /v1/completions
    filt = gw.output_filter(req.model)
    if filt and top_logprobs is not None:
        raise APIError(400, f"logprobs are not available for {req.model!r}: its output is filtered", param="logprobs")
    up = gw.config.upstream_for(req.model) if assistant is None else None
    if fmt and up is None:
        try:  # a schema that cannot be enforced is answered now, before any stream opens
            await asyncio.to_thread(structured.grammar_of, fmt)
        except UserError as e:
            param = json.loads(fmt).get("param", "response_format")  # the field the format came from
            raise APIError(translate(e).status, str(e), param=param) from None
    answers = req.n * len(prompts)
    if answers > gw.max_pending:  # could never be admitted: not a busy server (503) but a request too large
        raise APIError(
            422,
            f"this request asks for {answers} answers ({len(prompts)} prompt(s) x n={req.n}); this server "
            f"runs at most {gw.max_pending} at once",
            param="n",
            code="unprocessable",
        )
    gw.reserve(call, answers)
    if up is not None:
        return await _proxy(gw, call, req, up, chat, filt)
    try:
        if assistant is None:
            adapter = await asyncio.to_thread(engine.adapters.resolve, req.model)
            served = adapter.key or engine.base.id
        else:
            try:
                adapter = await asyncio.to_thread(engine.adapters.resolve, assistant.spec)
            except UserError as e:
                if own_knowledge:
                    raise  # the client's model name, answered like any adapter's (below)
                raise _misconfigured(req.model, e) from None
            served = adapter.key if own_knowledge else assistant.name
            if prepared is not None and prepared.base_only:
                adapter = AdapterRequest()  # nothing relevant found: off-topic for these adapters
        if prepared is not None and prepared.messages is fitted[0]:
            encoded = [fitted[1]]
        else:
            encoded = await asyncio.to_thread(lambda: [engine.encode(p) for p in prompts])
        for i, prompt_ids in enumerate(encoded):
            where = "prompt" if len(encoded) == 1 else f"prompt[{i}]"
            if not prompt_ids:
                raise APIError(400, f"{where} is empty", param="prompt")
            if any(not 0 <= t < engine.vocab_size for t in prompt_ids):
                raise APIError(400, f"{where}: token ids must be within the vocabulary", param="prompt")
            engine.check_length(len(prompt_ids), max_tokens)
    except Exception as e:  # noqa: BLE001
        raise translate(e) from None
    call.served = served
    call.prompt_tokens = sum(len(p) for p in encoded)
    if call.key is not None:
        if gw.limiter.blocking:  # a database round trip: off the event loop
            call.usage = await asyncio.to_thread(gw.limiter.admit, call.key, call.prompt_tokens)
        else:
            call.usage = gw.limiter.admit(call.key, call.prompt_tokens)
    sources = None
    if prepared is not None and assistant is not None and assistant.knowledge is not None:
        sources = [x.json() for x in prepared.sources]
    refusal = prepared.refusal if prepared is not None else None
    return Admitted(served, encoded, adapter, max_tokens, filt, sources, refusal, headers)


async def answer_json(engine: EngineClient, run: Run, receive: Any) -> Any:
    """Collect every choice, then one JSON body. A client that leaves stops its generation, as a
    stream's does (sse-starlette watches those): the next ASGI message after the body is the disconnect."""
    call, req, a, streams, top_logprobs, chat, shape = run
    answers = asyncio.gather(*[_collect(st, call) for st in streams])
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
    texts = [a.filt.apply(r.text) if a.filt else r.text for r in results]
    as_ids = req.return_tokens_as_token_ids
    for i, (text, r) in enumerate(zip(texts, results, strict=True)):
        finish = r.finish_reason
        if chat:
            lp = render.logprobs_json(engine, r.logprobs, as_ids) if top_logprobs is not None else None
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if shape.tools is not None:
                parsed = tools.parse(text, shape.tools)
                message["content"] = parsed.content
                if parsed.calls:
                    message["tool_calls"] = parsed.calls
                    finish = "tool_calls" if finish == "stop" else finish
            if a.sources is not None:
                message["sources"] = a.sources
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
        else:
            tokens: list[tuple[int, TokenLogprob | None]] = [(x.token_id, x) for x in r.logprobs]
            if getattr(req, "echo", False):
                prompt = a.prompts[i // req.n]
                text = engine.tokenizer.decode(prompt) + text
                tokens = [*zip(prompt, r.prompt_logprobs or [None] * len(prompt), strict=True), *tokens]
            lp = render.text_logprobs(engine, tokens, as_ids) if top_logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
    call.completion_tokens = sum(r.completion_tokens for r in results)
    call.finish_reason = results[0].finish_reason
    call.answers = texts
    call.close(200)
    body = {
        "id": call.id,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": a.served,
        "choices": choices,
        "usage": render.usage(call.prompt_tokens, call.completion_tokens, call.cached_tokens),
        "system_fingerprint": f"loraplex-{engine.base.id}",
    }
    return JSONResponse(body, headers=a.headers) if a.headers else body


def answer_stream(s: Serving, run: Run) -> EventSourceResponse:
    """Server-sent events: the choices' deltas as they come, interleaved, then `[DONE]`. A failure
    after the stream opened is an error event in the stream (the status line has been sent)."""
    call, req, a, streams, top_logprobs, chat, shape = run
    engine = s.engine
    rid, created = call.id, int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunk_kind = "chat.completion.chunk" if chat else "text_completion"
    itl = s.gw.metrics.itl.labels(a.served)
    filt = a.filt

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> str:
        body: dict[str, Any] = {
            "id": rid,
            "object": chunk_kind,
            "created": created,
            "model": a.served,
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
        texts: list[list[str]] = [[] for _ in streams]
        offsets = [0] * len(streams)  # characters sent per choice: where its next logprob token starts
        echo = [bool(getattr(req, "echo", False))] * len(streams)  # the prompt goes first, once
        filters = [filt.stream() for _ in streams] if filt else None
        held = [tools.ToolStream(shape.tools) for _ in streams] if shape.tools else None
        try:
            if chat:
                for i in range(req.n):
                    opening: dict[str, Any] = {"role": "assistant", "content": ""}
                    if a.sources is not None:
                        opening["sources"] = a.sources
                    first = {"index": i, "delta": opening, "logprobs": None, "finish_reason": None}
                    yield {"data": chunk([first])}
                for source in a.sources or []:  # Open WebUI shows these as the answer's citations
                    empty = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}
                    cited = {**json.loads(chunk([empty])), "event": _source_event(source)}
                    yield {"data": json.dumps(cited, ensure_ascii=False)}
            tasks = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)]
            completion_tokens, open_streams = 0, len(streams)
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
                        yield {"data": json.dumps(e.body())}
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
                    as_ids = req.return_tokens_as_token_ids
                    finish = item.finish_reason
                    if chat:
                        lp = render.logprobs_json(engine, item.logprobs, as_ids) if top_logprobs is not None else None
                        texts[i].append(text)
                        if held is not None:  # what may be a tool call is held until the end
                            text = held[i].feed(text)
                        delta: dict[str, Any] = {"content": text} if text else {}
                        if held is not None and finish is not None:
                            parsed = held[i].finish()
                            if parsed.content:
                                delta["content"] = delta.get("content", "") + parsed.content
                            if parsed.calls:
                                delta["tool_calls"] = [{"index": k, **c} for k, c in enumerate(parsed.calls)]
                                finish = "tool_calls" if finish == "stop" else finish
                        if not delta and finish is None and held is not None:
                            continue  # held back (a possible tool call): nothing to send yet
                        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                    else:
                        tokens: list[tuple[int, TokenLogprob | None]] = [(x.token_id, x) for x in item.logprobs]
                        if echo[i]:
                            echo[i] = False
                            prompt = a.prompts[i // req.n]
                            text = engine.tokenizer.decode(prompt) + text
                            lps = item.prompt_logprobs or [None] * len(prompt)
                            tokens = [*zip(prompt, lps, strict=True), *tokens]
                        lp = (
                            render.text_logprobs(engine, tokens, as_ids, offsets[i])
                            if top_logprobs is not None
                            else None
                        )
                        offsets[i] += len(text)
                        texts[i].append(text)
                        choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": item.finish_reason}
                    if finish is not None:  # a stream's last delta holds its final counts
                        completion_tokens += item.completion_tokens
                        call.cached_tokens += item.cached_tokens
                        call.finish_reason = call.finish_reason or finish
                    call.completion_tokens = completion_tokens
                    yield {"data": chunk([choice])}
                if include_usage:
                    yield {"data": chunk([], render.usage(call.prompt_tokens, completion_tokens, call.cached_tokens))}
                yield {"data": "[DONE]"}
                status, code = 200, None
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            call.answers = ["".join(t) for t in texts]
            call.close(status, code)

    return EventSourceResponse(events(), sep="\n", ping=15, headers=a.headers)


def _source_event(source: dict[str, Any]) -> dict[str, Any]:
    """A knowledge-base passage as Open WebUI's `source` event (a chunk's `event` field, which it
    passes to its event emitter): the document's name, and the passage the citation opens."""
    name = f"[{source['index']}] {source['document']}"
    return {
        "type": "source",
        "data": {
            "source": {"name": name, "id": f"{source['document']}#{source['chunk']}"},
            "document": [source["text"]],
            "metadata": [{"source": source["document"], "name": name, "relevance": source["relevance"]}],
        },
    }


def _assistant(model: str) -> assistants.Assistant | None:
    try:
        return assistants.find(model)
    except UserError as e:  # a hand-edited file with a mistake: the operator's to fix, not the client's
        raise _misconfigured(model, e) from None


def _misconfigured(model: str, e: Exception) -> APIError:
    return APIError(500, f"assistant {model!r} cannot answer: {e}", "server_error", code="assistant_misconfigured")


def _apply_defaults(req: Request_, assistant: assistants.Assistant, max_tokens: int | None) -> int | None:
    """The assistant's sampling defaults, for what the request left unset."""
    given = req.model_fields_set
    s = assistant.sampling
    if s.temperature is not None and "temperature" not in given:
        req.temperature = s.temperature
    if s.top_p is not None and "top_p" not in given:
        req.top_p = s.top_p
    return max_tokens if max_tokens is not None else s.max_tokens


async def _fixed_answer(engine: EngineClient, text: str, prompt_tokens: int) -> AsyncIterator[Delta]:
    ids = tuple(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    yield Delta(text, ids, (), "stop", prompt_tokens, len(ids))


def _params(req: Request_, top_logprobs: int | None, index: int, fmt: str | None) -> SamplingParams:
    echo = getattr(req, "echo", False)
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
            prompt_logprobs=top_logprobs if echo else None,
            response_format=fmt,
            ignore_eos=req.ignore_eos,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None


async def _proxy(gw: Gateway, call: Call, req: Request_, up: Any, chat: bool, filt: Any) -> Any:
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
        except UpstreamError as e:
            status, code = e.status, e.code
            yield {"data": json.dumps(translate(e).body())}
        finally:
            call.t_first = out.first_token
            call.prompt_tokens, call.completion_tokens = out.prompt_tokens, out.completion_tokens
            call.finish_reason = out.finish_reason
            call.answers = ["".join(out.texts.get(i, [])) for i in range(req.n)]
            call.close(status, code)

    return EventSourceResponse(events(), sep="\n", ping=15)


async def _collect(stream: AsyncIterator[Delta], call: Call) -> Answer:
    metered = [0]

    def meter(d: Delta) -> None:
        if d.finish_reason is not None:  # a stream's last delta holds its final counts
            call.cached_tokens += d.cached_tokens
        call.first_token()
        call.completion_tokens += d.completion_tokens - metered[0]  # what is metered if the client leaves
        metered[0] = d.completion_tokens

    return await collect(stream, meter)


async def _disconnected(receive: Any) -> None:
    """Return when the client has closed the connection (call after the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass
