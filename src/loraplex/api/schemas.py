"""OpenAI request bodies, validated strictly: a parameter we do not implement is a 400 naming it.

Field names, defaults and limits follow the OpenAI API reference (temperature 0..2 default 1,
top_p default 1, n default 1, stop up to 4 strings, top_logprobs 0..20). `top_k`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos` and `return_tokens_as_token_ids` are the vLLM
extensions clients already send.
Fields OpenAI clients send that change nothing here (`user`, `metadata`, `store`, ...) are accepted.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_N = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N" (exact ids)
    logit_bias: dict[str, float] | None = None
    # accepted and ignored: they change nothing about the answer
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported; only 'text'")
        return v


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported by this server")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> None:
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> None:
        if v not in (None, 1):
            raise ValueError("best_of is not supported by this server; use n")
        return None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=512)
    pin: bool = False
    lora_path: str | None = None
    """vLLM's field: accepted only when it is the store's own directory of `lora_name` (this server
    loads adapters by name from its store, never from a path a client names)."""


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=512)


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a rating of one response (by the id the completion returned)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=10_000)
    correction: str | None = Field(None, max_length=100_000)
    choice: int = Field(0, ge=0, lt=MAX_N)


class AliasRequest(BaseModel):
    """POST /admin/aliases: point `alias` of adapter `name` at `version` (or roll it back)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    alias: str = Field(min_length=1, max_length=64)
    version: int | None = Field(None, ge=1)
    rollback: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error shape, which every error response of the server has (for the OpenAPI document)."""

    error: ErrorDetail


ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what}
    for status, what in (
        (400, "invalid request: the message names the field"),
        (401, "no key, or a key that is unknown, revoked or expired"),
        (403, "an admin route without an admin key"),
        (404, "no such route or model (or one this key may not use)"),
        (405, "method not allowed (the Allow header lists the allowed ones)"),
        (408, "the request body paused too long"),
        (413, "request body over 8 MiB"),
        (429, "rate limited (Retry-After)"),
        (500, "a fault, logged with its request id (X-Request-Id)"),
        (503, "overloaded or shutting down (Retry-After)"),
    )
}
