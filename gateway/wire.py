"""Wire models: validation of OpenAI request bodies and the shape of errors.

The models check the fields the gateway reads or changes. Every other field is
kept (`extra="allow"`), because the gateway forwards the client's body, not a
re-serialized model of it.
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from gateway.errors import InvalidRequestError


class _Permissive(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Permissive):
    """One part of a message's content list: text, image_url, input_audio, ..."""

    type: str = Field(min_length=1)
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a part of type 'text' needs a string field 'text'")
        return self


class ChatMessage(_Permissive):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # The list comes first so that pydantic reports the error of a bad part
    # (messages[0].content[1].text) before the mismatch with `str`.
    content: list[ContentPart] | str | None = None


# The largest token count llama.cpp and vLLM accept (a signed 32-bit int).
MAX_TOKEN_COUNT = 2**31 - 1


class StreamOptions(_Permissive):
    include_usage: StrictBool | None = None


class ResponseFormat(_Permissive):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and not self.json_schema:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class _SamplingFields(_Permissive):
    model: str = Field(min_length=1)
    stream: StrictBool | None = None
    n: int | None = Field(None, ge=1, le=128)
    stop: str | list[str] | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream_options: StreamOptions | None = None
    seed: int | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body, raising InvalidRequestError when it is not one."""
    if not raw:
        raise InvalidRequestError(
            "The request body is empty; send a JSON object.", code="invalid_json"
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise InvalidRequestError(
            f"The request body is not valid JSON: {error}.", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, not {type(body).__name__}.",
            code="invalid_json",
        )
    return body


def validate(model: type[_Permissive], body: dict[str, Any]) -> Any:
    """Validate `body` against `model` and name the first invalid field."""
    try:
        return model.model_validate(body)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        param = format_param(first["loc"])
        if first["type"] == "missing":
            raise InvalidRequestError(
                f"Missing required field '{param}'.", param=param, code="missing_field"
            ) from None
        raise InvalidRequestError(
            f"Invalid value for '{param}': {first['msg']} "
            f"(got {_short_repr(first.get('input'))}).",
            param=param,
            code="invalid_value",
        ) from None


def format_param(location: tuple[int | str, ...]) -> str:
    """Format a pydantic error location as OpenAI does: messages[0].content."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in {"str", "list[dict[str,any]]", "none"} or "[" in part:
            # Union members pydantic appends to the location; not field names.
            continue
        else:
            text += f".{part}" if text else part
    return text or "body"


def _short_repr(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
