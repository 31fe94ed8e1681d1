"""OpenAI response pieces shared by the completion routes: usage and the two logprobs shapes.

Pure functions of the engine's tokenizer and numbers; no route, request or streaming logic here.
"""

from __future__ import annotations

from typing import Any

from loraplex.engine.protocol import EngineClient
from loraplex.engine.sampling import TokenLogprob


def usage(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:  # OpenAI's field for prompt caching; absent (as in vLLM by default) when nothing was cached
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def token_text(engine: EngineClient, t: int, as_ids: bool) -> str:
    return f"token_id:{t}" if as_ids else str(engine.tokenizer.decode([t]))


def logprobs_json(engine: EngineClient, items: tuple[TokenLogprob, ...], as_ids: bool = False) -> Any:
    """Chat's logprobs: one entry per answer token, with its top alternatives."""

    def entry(t: int, lp: float) -> dict[str, Any]:
        text = token_text(engine, t, as_ids)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    content = [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]} for x in items]
    return {"content": content}


def text_logprobs(
    engine: EngineClient, tokens: list[tuple[int, TokenLogprob | None]], as_ids: bool = False, offset: int = 0
) -> Any:
    """/v1/completions' logprobs: parallel lists over the text's tokens; an echoed prompt's first
    token has none (nothing predicts it). `text_offset`: where each token starts in the choice's text."""
    pieces = [token_text(engine, t, False) for t, _ in tokens]
    texts = [token_text(engine, t, True) for t, _ in tokens] if as_ids else pieces
    starts = []
    for piece in pieces:  # offsets into the text itself, also when tokens are named by id
        starts.append(offset)
        offset += len(piece)
    return {
        "tokens": texts,
        "token_logprobs": [None if x is None else x.logprob for _, x in tokens],
        "top_logprobs": [
            None if x is None else {token_text(engine, t, as_ids): v for t, v in x.top} for _, x in tokens
        ],
        "text_offset": starts,
    }
