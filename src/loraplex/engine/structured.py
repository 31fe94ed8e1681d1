"""Structured output: OpenAI's `response_format` (json_object, json_schema) and vLLM's
`structured_outputs` (json, regex, choice, Lark grammar) as a token mask per row.

Built on llguidance, the grammar engine behind vLLM's `guidance` backend and Microsoft's guidance
(a Rust library, a few MB, no dependencies; xgrammar needs triton, 1 GB on disk, for CPU serving
that uses none of it). A JSON schema compiles to a grammar in milliseconds; each decode step a
row's matcher says which tokens may come next (~0.1 ms on this CPU) and consumes the one sampled.
Once the JSON is complete only EOS is allowed, so a row ends with "stop".

`grammar_of` runs at the edge (the API checks a request's format before admitting it): a schema
that cannot be enforced is a 422 there, before any stream opens. JSON is compact (`", "` and `": "` between items,
no other whitespace): a small model given free whitespace can pad with newlines until max_tokens.
This module does not sample or pick tokens (sampling.py), and does not parse tool calls.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import torch

from loraplex.errors import Unprocessable, UserError

# compact JSON: the separators a model has seen most
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_tokenizers: dict[int, Any] = {}
_lock = threading.Lock()


def grammar_of(response_format: str) -> str | None:
    """OpenAI's response_format (JSON text) -> an llguidance grammar (None: plain text); Unprocessable
    (a 422) naming what cannot be enforced. `strict` schemas must use only keywords it enforces;
    others have the rest ignored (as OpenAI's non-strict mode treats them: a hint)."""
    import llguidance

    spec = json.loads(response_format)
    kind = spec.get("type", "text")
    if kind == "text":
        return None
    if kind in ("lark", "regex"):  # tool calls (api/tools.py), vLLM's structured_outputs (api/schemas.py)
        if kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(spec["lark"])
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(spec["regex"])
        error = llguidance.LLMatcher.validate_grammar(grammar)
        if error and not error.startswith("WARNING"):
            if spec.get("param") == "structured_outputs":
                raise Unprocessable(f"structured_outputs: this {kind} cannot be enforced ({error})")
            raise Unprocessable(f"tools: the functions' parameters cannot be enforced ({error})")
        return str(grammar)
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        strict = True
    elif kind == "json_schema":
        schema = spec["json_schema"].get("schema") or {"type": "object"}
        strict = bool(spec["json_schema"].get("strict"))
    else:
        raise UserError(f"response_format type {kind!r} is not supported: use text, json_object or json_schema")
    options = {**_JSON_OPTIONS, "lenient": not strict}
    field = spec.get("param", "response_format")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
    except (ValueError, TypeError, RuntimeError) as e:
        raise Unprocessable(f"{field}: this JSON schema cannot be enforced ({e})") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise Unprocessable(f"{field}: this JSON schema cannot be enforced ({error})")
    return grammar


def _ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    """llguidance's view of the tokenizer (~0.6 s to build, so once per tokenizer)."""
    import llguidance.hf

    with _lock:
        key = id(tokenizer)
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        return _tokenizers[key]


class Constraint:
    """One request's grammar state: `allowed()` before each token, `advance(token)` after it."""

    def __init__(self, matcher: Any, vocab_size: int):
        self._matcher = matcher
        self._vocab = vocab_size

    def allowed(self) -> torch.Tensor:
        """[vocab] bool: the tokens the grammar allows next."""
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return torch.from_numpy(np.unpackbits(words, bitorder="little")[: self._vocab].astype(bool))

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise UserError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The output is complete: nothing but EOS may follow."""
        return bool(self._matcher.is_stopped())


def constraint_for(response_format: str | None, tokenizer: Any, vocab_size: int) -> Constraint | None:
    """A fresh Constraint for a request (response_format as JSON text), or None for plain text."""
    grammar = grammar_of(response_format) if response_format else None
    if grammar is None:
        return None
    import llguidance

    matcher = llguidance.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    if matcher.is_error():
        raise Unprocessable(f"response_format: this JSON schema cannot be enforced ({matcher.get_error()})")
    return Constraint(matcher, vocab_size)
