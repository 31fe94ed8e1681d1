"""Schemathesis hooks (loaded by `st run` through SCHEMATHESIS_HOOKS=tests.fuzz_hooks): about half
the generated requests name a model that exists on the server under test, so the fuzzing reaches
the engine, the adapter cache and the scope checks instead of stopping at "model not found".

The names come from LORAPLEX_FUZZ_MODELS (comma-separated), set by tests/test_fuzz.py. A value is
replaced only when it is valid for its field: in a negative test case (one schemathesis made
invalid on purpose) the invalid field must stay invalid."""

from __future__ import annotations

import os
import re
from typing import Any

import schemathesis
from hypothesis import strategies as st

from loraplex.api.schemas import ADAPTER_PATTERN, model_pattern
from loraplex.paths import NAME_PATTERN

NAMES = [n for n in os.environ.get("LORAPLEX_FUZZ_MODELS", "").split(",") if n]
# the top-level body fields that name a model or an adapter, with their documented patterns
FIELDS = {
    "model": re.compile(model_pattern(("base", "default", *NAMES))),
    "lora_name": re.compile(f"^{ADAPTER_PATTERN}$"),
    "name": re.compile(NAME_PATTERN),
}

FITS = {f: [n for n in NAMES if rule.search(n)] for f, rule in FIELDS.items()}  # real names valid there


@schemathesis.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not NAMES or not isinstance(body, dict):
        return st.just(body)
    valid = [f for f, rule in FIELDS.items() if isinstance(body.get(f), str) and rule.search(body[f])]
    if not valid:
        return st.just(body)
    real = {f: st.one_of(st.just(body[f]), st.sampled_from(FITS[f])) for f in valid if FITS[f]}
    return st.fixed_dictionaries(real).map(lambda chosen: {**body, **chosen})


def _text_bytes(value: Any) -> int:
    """UTF-8 bytes of every string in a request body (at most one token each with byte-level BPE)."""
    if isinstance(value, str):
        return len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, dict):
        return sum(_text_bytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_text_bytes(v) for v in value)
    return 0


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    """Keep prompts and max_tokens (/v1/responses: its input, instructions and max_output_tokens)
    within the test model's 2,048 positions. A longer one is a 400 `context_length_exceeded`, as
    OpenAI and vLLM answer it: a limit of the model, not of the schema, which cannot count tokens
    (tests/test_api.py tests that answer)."""
    responses = ctx.operation is not None and ctx.operation.path == "/v1/responses"
    if not isinstance(body, dict) or not ({"messages", "prompt"} & body.keys() or responses):
        return True
    messages = body.get("input") if responses else body.get("messages")  # `input`: a text or a list of items
    turns = len(messages) if isinstance(messages, list) else 1
    asked = [body.get(k) for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")]
    answer = max([a for a in asked if isinstance(a, int | float) and not isinstance(a, bool)] or [0])
    prompt = _text_bytes(messages) + _text_bytes(body.get("prompt")) + _text_bytes(body.get("instructions"))
    return prompt + 16 * turns + answer < 1500
