"""Request bodies of OpenAI's Responses API (POST /v1/responses, api/responses.py), validated as
strictly as the chat bodies in schemas.py, whose pieces (function names, JSON schema specs, the
model pattern) they share.

This module holds shapes only: turning a Responses request into a chat completion is
api/responses.py's job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.api.schemas import (
    FUNCTION_NAME,
    JsonBool,
    JsonFloat,
    JsonObjectFormat,
    JsonSchemaSpec,
    MaybeInt,
    TextFormat,
    documented,
    model_pattern,
)


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(BaseModel):
    """A Responses API input message (`type` may be left out)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=128)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=128)
    output: str
    id: str | None = None
    status: str | None = None


class ResponsesFunction(BaseModel):
    """A Responses API function tool: the chat API's `function` object, flattened."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: JsonBool | None = None


class ResponsesNamedTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextJsonSchema(JsonSchemaSpec):
    """`text.format` of type json_schema: the chat API's json_schema object, flattened."""

    type: Literal["json_schema"]


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Annotated[TextFormat | JsonObjectFormat | TextJsonSchema, Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses (api/responses.py): answered by the chat completion machinery."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=512, **documented(pattern=model_pattern()))
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[InputMessage | FunctionCallItem | FunctionCallOutput], Field(min_length=1, max_length=4096)]
    )
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=128)
    tools: list[ResponsesFunction] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: JsonBool | None = None
    text: TextConfig | None = None
    stream: JsonBool = False
    store: JsonBool = True
    max_output_tokens: MaybeInt = Field(None, ge=1)
    temperature: JsonFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: JsonFloat = Field(1.0, gt=0.0, le=1.0)
    # accepted and ignored: they change nothing about the answer
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    include: list[str] | None = None
    service_tier: str | None = None
