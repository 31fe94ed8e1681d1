"""POST /v1/embeddings: vectors from the built-in multilingual sentence encoder, in OpenAI's shape.

The model is `multilingual` (knowledge/embedder.py: the encoder knowledge bases and retrieval
already use, 512 dimensions, Chinese and English in one space), so a client can embed its own
documents the way loraplex searches them. A key uses it when its scope names it, as any model
(`loraplex keys create --adapters 'hr*,multilingual'`; admin and unscoped keys may), and each
request leaves a log row and takes its tokens from the key's limits, as a completion does.

Token-id input (`[[...]]`, what LangChain's `OpenAIEmbeddings` sends by default after counting
with tiktoken) is refused with the setting that turns it off: the ids of another tokenizer mean
nothing to this encoder. This module does not store or search vectors (knowledge/).
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from functools import cache
from typing import Any

from fastapi import Depends, FastAPI, Request

from loraplex.adapters.names import ModelNotFound, not_found
from loraplex.api.errors import APIError
from loraplex.api.schemas import MAX_EMBEDDING_INPUTS, EmbeddingRequest
from loraplex.gateway.gate import Gateway
from loraplex.gateway.keys import Key
from loraplex.knowledge import embedder

MODEL = embedder.BUILTIN


@cache
def _encoder() -> embedder.Multilingual:
    return embedder.Multilingual()


def add_routes(
    app: FastAPI, gw: Gateway, principal: Callable[..., Key | None], allowed: Callable[[Key | None, str], bool]
) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request, req: EmbeddingRequest, key: Key | None = Depends(principal)) -> Any:
        call = request.state.call
        call.model = req.model
        if req.model != MODEL or not allowed(call.key, MODEL):
            # outside the key's scope the encoder reads as missing, like every model, and goes unnamed
            hint = f"; the embedding model here is {MODEL!r}" if allowed(call.key, MODEL) else ""
            raise ModelNotFound(not_found(req.model) + hint)
        given = [req.input] if isinstance(req.input, str) else req.input
        texts = [t for t in given if isinstance(t, str)]
        if not texts or len(texts) != len(given):
            raise APIError(
                400,
                "input must be text: this encoder has its own tokenizer, so token ids from another one "
                "(LangChain's OpenAIEmbeddings sends them unless check_embedding_ctx_length=False) mean nothing to it",
                param="input",
            )
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise APIError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request", param="input")
        if (bad := next((i for i, t in enumerate(texts) if not t), None)) is not None:
            raise APIError(400, f"input[{bad}] is empty", param="input")
        enc = _encoder()
        if req.dimensions is not None and req.dimensions != enc.dim:
            raise APIError(
                400,
                f"{MODEL} has {enc.dim} dimensions; dimensions={req.dimensions} cannot be served",
                param="dimensions",
            )
        call.served = MODEL
        gw.reserve(call, 1)
        call.prompt_tokens = await asyncio.to_thread(enc.count_tokens, texts)
        if call.key is not None:
            admit = gw.limiter.admit
            call.usage = (
                await asyncio.to_thread(admit, call.key, call.prompt_tokens)
                if gw.limiter.blocking
                else admit(call.key, call.prompt_tokens)
            )
        vectors = await asyncio.to_thread(enc.embed, texts)
        call.close(200)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens}
        return {"object": "list", "data": data, "model": MODEL, "usage": usage}
