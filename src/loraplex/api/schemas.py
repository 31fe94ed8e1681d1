"""OpenAI request bodies, validated strictly: a parameter we do not implement is a 400 naming it.

Field names, defaults and limits follow the OpenAI API reference (temperature 0..2 default 1,
top_p default 1, n default 1, stop up to 4 strings, top_logprobs 0..20). `top_k`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos` and `return_tokens_as_token_ids` are the vLLM
extensions clients already send.
Fields OpenAI clients send that change nothing here (`user`, `metadata`, `store`, ...) are accepted.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator

from loraplex.adapters.names import BASE_ALIASES
from loraplex.adapters.registry import ALIAS_PATTERN
from loraplex.paths import NAME, NAME_PATTERN

MAX_N = 16
MAX_PROMPTS = 128  # prompts in one /v1/completions request (lm-eval sends its batch_size)


def _number(v: Any) -> Any:
    """JSON Schema's integer and number: `true` is not 1 and "1" is not 1 (pydantic's lax mode
    takes both), while 4.0 is the integer 4."""
    if isinstance(v, bool | str | bytes):
        raise ValueError("Input should be a number")
    return v


JsonInt = Annotated[int, BeforeValidator(_number)]
JsonFloat = Annotated[float, BeforeValidator(_number)]
# Optional ones wrap the union: `JsonInt | None` would drop a Field's bounds from the JSON schema
MaybeInt = Annotated[int | None, BeforeValidator(_number)]
MaybeFloat = Annotated[float | None, BeforeValidator(_number)]
JsonBool = StrictBool  # `0` is not false

# What `model` may be, for the OpenAPI document (adapters/names.py parses
# it): the base, an adapter NAME[@vN|@ALIAS][:WEIGHT] with |WEIGHT| <= 10, or adapters joined
# by '+'. The '..' rule applies per adapter. The server also trims spaces, which is not shown.
_WEIGHT = r"-?(?:10(?:\.0+)?|[0-9](?:\.[0-9]+)?)"
ADAPTER_PATTERN = rf"(?![^+]*\.\.){NAME}(?:@{NAME})?(?::{_WEIGHT})?"


def model_pattern(base_ids: tuple[str, ...] = BASE_ALIASES) -> str:
    """The `model` field's pattern on a server whose base answers to `base_ids`."""
    bases = "|".join(re.escape(b) for b in base_ids)
    return rf"^(?:{bases}|{ADAPTER_PATTERN}(?:\+{ADAPTER_PATTERN})*)$"


def documented(**schema: Any) -> dict[str, Any]:
    """JSON-schema keywords for the OpenAPI document only: the field's validator enforces them,
    with a message that says what to send instead (pydantic's own would say "Input should be 1")."""
    return {"json_schema_extra": schema}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: JsonBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class _Turn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class SystemMessage(_Turn):
    role: Literal["system"]


class DeveloperMessage(_Turn):
    """OpenAI's newer name for a system message; read as one. A class of its own, as in OpenAI's
    schema: with two roles mapped to one class, schemathesis read the discriminator as allowing only
    one of them, and called a valid developer message a schema violation."""

    role: Literal["developer"]


class UserMessage(_Turn):
    role: Literal["user"]


class AssistantMessage(_Turn):
    """An earlier answer: text, tool calls, or both (no content is an empty answer)."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None  # type: ignore[assignment]
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)


class ToolMessage(_Turn):
    """A tool's result, answering one of the calls before it."""

    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1, max_length=128)


Message = Annotated[
    SystemMessage | DeveloperMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, **documented(pattern=model_pattern()))
    stream: JsonBool = False
    stream_options: StreamOptions | None = None
    n: JsonInt = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(
        None,
        **documented(
            anyOf=[
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
                {"type": "null"},
            ]
        ),
    )
    max_tokens: MaybeInt = Field(None, ge=1)
    temperature: JsonFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: JsonInt = Field(0, ge=-1)
    repetition_penalty: JsonFloat = Field(1.0, gt=0.0, le=10.0)
    presence_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: JsonFloat = Field(0.0, ge=-2.0, le=2.0)
    # documented as +-2^62: a JSON number near 2^63 may round past int64 on the way in
    seed: MaybeInt = Field(None, ge=-(2**63), lt=2**63, **documented(minimum=-(2**62), maximum=2**62))
    stop_token_ids: list[JsonInt] | None = None
    ignore_eos: JsonBool = False
    return_tokens_as_token_ids: JsonBool = False  # vLLM's: logprobs name tokens "token_id:N" (exact ids)
    logit_bias: dict[str, JsonFloat] | None = Field(None, **documented(maxProperties=0))
    # json_object / json_schema: decoding is constrained to it (engine/structured.py); on
    # /v1/completions too, as vLLM takes it
    response_format: ResponseFormat | None = None
    # vLLM's extension for the same (its clients send it in extra_body; the front door sends it to vLLM)
    structured_outputs: StructuredOutputs | None = None
    # accepted and ignored: they change nothing about the answer
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: JsonBool | None = None
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

    def format_json(self) -> str | None:
        """The response format as the engine takes it (JSON text), None for plain text."""
        if self.structured_outputs is not None:
            return self.structured_outputs.format_json()
        f = self.response_format
        return None if f is None or isinstance(f, TextFormat) else f.model_dump_json(by_alias=True, exclude_none=True)

    def _format_conflict(self) -> tuple[str, str] | None:
        if self.structured_outputs is None:
            return None
        if self.response_format is not None and not isinstance(self.response_format, TextFormat):
            return "structured_outputs", "use either response_format or structured_outputs in one request"
        given = self.structured_outputs.model_dump(exclude_none=True)
        if len(given) != 1:
            return "structured_outputs", "structured_outputs takes exactly one of json, regex, choice, grammar"
        if (why := self.structured_outputs.unusable()) is not None:
            return "structured_outputs.json", why
        return None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return None


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: JsonBool | None = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its replacement for `guided_json` / `guided_regex` /
    `guided_choice` / `guided_grammar`): exactly one of a JSON schema, a regular expression, a list
    of choices, or a grammar in llguidance's Lark syntax (what vLLM's `guidance` backend takes)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = Field(None, min_length=1, max_length=10_000)
    choice: list[str] | None = Field(None, min_length=1, max_length=1024)
    grammar: str | None = Field(None, min_length=1, max_length=100_000)

    def format_json(self) -> str:
        """The engine's format (engine/structured.py `grammar_of`), as JSON text."""
        if self.json_ is not None:
            schema = json.loads(self.json_) if isinstance(self.json_, str) else self.json_
            spec = {"name": "structured_outputs", "schema": schema}
            return json.dumps({"type": "json_schema", "json_schema": spec, "param": "structured_outputs"})
        if self.grammar is not None:
            return json.dumps({"type": "lark", "lark": self.grammar, "param": "structured_outputs"})
        regex = self.regex if self.regex is not None else "|".join(re.escape(c) for c in self.choice or [])
        return json.dumps({"type": "regex", "regex": regex, "param": "structured_outputs"})

    def unusable(self) -> str | None:
        """Why `json` given as text cannot be enforced (not JSON, or not a schema object). A 422
        like an uncompilable regex or grammar, not a schema error: any string is schema-valid."""
        if not isinstance(self.json_, str):
            return None
        try:
            parsed = json.loads(self.json_)
        except ValueError as e:
            return f"structured_outputs.json is not JSON: {e}"
        return None if isinstance(parsed, dict) else "structured_outputs.json must be a JSON schema object"


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: JsonBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: MaybeInt = Field(None, ge=1)
    logprobs: JsonBool = False
    top_logprobs: MaybeInt = Field(None, ge=0, le=20)
    # the model's chat template renders them; `required` or a named function constrains decoding
    # to a valid call (api/tools.py)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: JsonBool | None = None

    def conflict(self) -> tuple[str, str] | None:
        """(field, why) when valid fields contradict each other: a 422, not a schema error."""
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            return "tools", "tools: function names must be unique"
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            return "tool_choice", f"tool_choice names {choice.function.name!r}, which is not in tools"
        if choice == "required" and not names:
            return "tool_choice", "tool_choice 'required' needs tools"
        if (fmt := self._format_conflict()) is not None:
            return fmt
        json_out = self.response_format is not None and not isinstance(self.response_format, TextFormat)
        if names and (json_out or self.structured_outputs is not None) and choice not in (None, "none"):
            field = "response_format" if json_out else "structured_outputs"
            return field, f"use either tools or {field} in one request"
        return None


class CompletionRequest(_Common):
    """`prompt`: a string, token ids, or a list of either (one answer per prompt and `n`, choice
    index prompt * n + i, as OpenAI and vLLM number them). `echo` returns each prompt before its
    answer, with the prompt's logprobs when `logprobs` is set; `max_tokens: 0` then only scores the
    prompt: what lm-eval's loglikelihood (multiple-choice) requests send."""

    prompt: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(
        min_length=1,
        **documented(
            anyOf=[
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": MAX_PROMPTS},
                {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                    "minItems": 1,
                    "maxItems": MAX_PROMPTS,
                },
            ]
        ),
    )
    max_tokens: MaybeInt = Field(None, ge=0)
    logprobs: MaybeInt = Field(None, ge=0, le=5)
    echo: JsonBool = False
    suffix: str | None = Field(None, **documented(maxLength=0))
    best_of: MaybeInt = Field(None, **documented(enum=[1, None]))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(not p for p in v):
                raise ValueError("every prompt must be non-empty")
        return v

    def conflict(self) -> tuple[str, str] | None:
        """(field, why) when valid fields contradict each other: a 422, not a schema error."""
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens 0 needs echo: true (the prompt's logprobs are the answer)"
        return self._format_conflict()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per answer group."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)  # type: ignore[arg-type]

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


_OPTIONAL_MODEL = Field(None, min_length=1, max_length=512, **documented(pattern=model_pattern()))


class TokenizeText(BaseModel):
    """POST /tokenize with a text, as vLLM takes it."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = _OPTIONAL_MODEL
    prompt: str
    add_special_tokens: JsonBool = True
    return_token_strs: JsonBool = False


class TokenizeChat(BaseModel):
    """POST /tokenize with chat messages, rendered with the chat template as for a completion."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = _OPTIONAL_MODEL
    messages: list[Message] = Field(min_length=1, max_length=1024)
    add_generation_prompt: JsonBool = True
    return_token_strs: JsonBool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = _OPTIONAL_MODEL
    tokens: list[JsonInt] = Field(max_length=2**20)


_LORA_NAME = Field(min_length=1, max_length=512, **documented(pattern=f"^{ADAPTER_PATTERN}$"))
_ADAPTER = re.compile(ADAPTER_PATTERN)


def _lora_name(v: str) -> str:
    """The documented pattern, enforced here: pydantic's regex engine has no lookahead. A name
    the pattern refuses (blank, padded) would otherwise reach `names.parse`, which reads a blank
    name as the base model."""
    if not _ADAPTER.fullmatch(v):
        raise ValueError(f"lora_name {v!r} is not an adapter name: use NAME, NAME@vN or NAME@ALIAS")
    return v


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings (api/embeddings.py). Token-id input is refused there, with the reason."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512)
    input: str | list[str] | list[JsonInt] | list[list[JsonInt]] = Field(
        **documented(
            anyOf=[
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 2048},
            ]
        ),
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: MaybeInt = Field(None, ge=1)
    user: str | None = None


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, AfterValidator(_lora_name)] = _LORA_NAME
    pin: JsonBool = False
    lora_path: str | None = None
    """vLLM's field: accepted only when it is the store's own directory of `lora_name` (this server
    loads adapters by name from its store, never from a path a client names)."""


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: Annotated[str, AfterValidator(_lora_name)] = _LORA_NAME


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a rating of one response (by the id the completion returned)."""

    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=128)
    rating: Literal["up", "down"]
    comment: str | None = Field(None, max_length=10_000)
    correction: str | None = Field(None, max_length=100_000)
    choice: JsonInt = Field(0, ge=0, lt=MAX_N)


class AliasRequest(BaseModel):
    """POST /admin/aliases: point `alias` of adapter `name` at `version` (or roll it back)."""

    # either a version to point at or `rollback: true`
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "anyOf": [
                {"required": ["version"], "properties": {"version": {"type": "integer"}}},
                {"required": ["rollback"], "properties": {"rollback": {"const": True}}},
            ]
        },
    )
    name: str = Field(min_length=1, max_length=64, **documented(pattern=NAME_PATTERN))
    alias: str = Field(min_length=1, max_length=64, **documented(pattern=ALIAS_PATTERN))
    version: MaybeInt = Field(None, ge=1)
    rollback: JsonBool = False


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
        (409, "the current state refuses it (an alias with no earlier version to roll back to)"),
        (413, "request body over 8 MiB"),
        (422, "well-formed, but what it carries cannot be used (an uploaded data file's invalid records)"),
        (429, "rate limited (Retry-After)"),
        (500, "a fault, logged with its request id (X-Request-Id)"),
        (503, "overloaded or shutting down (Retry-After)"),
    )
}
