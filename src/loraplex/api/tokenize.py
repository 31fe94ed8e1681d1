"""POST /tokenize, POST /detokenize, GET /tokenizer_info: the base model's tokenizer, as vLLM serves it.

Clients that count or build token-id prompts use these instead of a local copy of the tokenizer:
lm-evaluation-harness's `local-completions` detects them (`tokenizer_backend=remote`) and then needs
no Hugging Face tokenizer path for an adapter name. Every adapter shares the base's tokenizer, so
`model`, when given, is only checked against the key's scope. Nothing here is logged or metered:
no model runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI

from loraplex.adapters.names import ModelNotFound, not_found
from loraplex.api.errors import APIError
from loraplex.api.schemas import DetokenizeRequest, TokenizeChat, TokenizeText
from loraplex.assistants import store as assistants
from loraplex.data.tokenize import render
from loraplex.engine.protocol import EngineClient
from loraplex.gateway.keys import Key


def add_routes(
    app: FastAPI,
    engine: EngineClient,
    principal: Callable[..., Key | None],
    allowed: Callable[[Key | None, str], bool],
) -> None:
    async def check(key: Key | None, model: str | None) -> None:
        """A `model` must exist and be the key's to use (a hidden one reads as missing)."""
        if model is None:
            return
        if not model.strip():
            raise APIError(400, "model is empty: leave it out for the base model's tokenizer", param="model")
        if not allowed(key, model):
            raise ModelNotFound(not_found(model))
        if await asyncio.to_thread(assistants.find, model) is None:
            await asyncio.to_thread(engine.adapters.resolve, model)  # ModelNotFound, InvalidModelName

    @app.post("/tokenize")
    async def tokenize(req: TokenizeText | TokenizeChat, key: Key | None = Depends(principal)) -> dict[str, Any]:
        await check(key, req.model)
        tok = engine.tokenizer

        def run() -> list[int]:
            if isinstance(req, TokenizeChat):
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                text = render(tok, messages, add_generation_prompt=req.add_generation_prompt)
                return list(tok(text, add_special_tokens=False)["input_ids"])
            return list(tok(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])

        ids = await asyncio.to_thread(run)
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest, key: Key | None = Depends(principal)) -> dict[str, Any]:
        await check(key, req.model)
        if (bad := next((i for i, t in enumerate(req.tokens) if not 0 <= t < engine.vocab_size), None)) is not None:
            raise APIError(400, f"tokens[{bad}] is not a token id of this model", param="tokens")
        return {"prompt": await asyncio.to_thread(engine.tokenizer.decode, req.tokens)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(key: Key | None = Depends(principal)) -> dict[str, Any]:
        tok = engine.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "eos_token": tok.eos_token,
            "bos_token": tok.bos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": tok.chat_template,
            "model_max_length": engine.max_model_len,
            "vocab_size": engine.vocab_size,
        }
