"""Capture of a sampled request while it runs, and the Sample built from it.

The request path only keeps references: the raw request body, the raw response
body, or the text of streamed chunks the client received. Parsing and redaction
happen in the sample writer's thread, off the request path.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from gateway.sampling.redaction import Redactor
from gateway.sampling.store import Outcome, Sample, SampledChoice
from gateway.service.streams import CLIENT_CLOSED_REQUEST

CLIENT_ID_LENGTH = 16


def client_id(headers: Mapping[str, str], peer: tuple[str, int] | None) -> str:
    """Return a truncated SHA-256 of the client's bearer key, or else of its IP.

    The raw key never leaves this function.
    """
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        source = "key:" + token
    elif peer is not None:
        source = "ip:" + peer[0]
    else:
        source = "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:CLIENT_ID_LENGTH]


def _empty_tool_call() -> dict[str, Any]:
    return {"id": None, "type": "function", "function": {"name": "", "arguments": ""}}


@dataclass
class _StreamedChoice:
    pieces: list[str] = field(default_factory=list)
    tool_calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finish_reason: str | None = None

    def add(self, choice: dict[str, Any]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str):
                self.pieces.append(content)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                self._add_tool_calls(calls)
        else:
            text = choice.get("text")
            if isinstance(text, str):
                self.pieces.append(text)
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])

    def _add_tool_calls(self, calls: list[Any]) -> None:
        # A streamed tool call arrives as fragments sharing an index: the first
        # carries its id, type and function name, the rest extend the arguments.
        for position, fragment in enumerate(calls):
            if not isinstance(fragment, dict):
                continue
            call = self.tool_calls.setdefault(
                fragment.get("index", position), _empty_tool_call()
            )
            if fragment.get("id"):
                call["id"] = fragment["id"]
            if fragment.get("type"):
                call["type"] = fragment["type"]
            function = fragment.get("function")
            if isinstance(function, dict):
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""


@dataclass
class SampleCapture:
    """One request chosen for sampling, filled in as it runs."""

    raw_request: bytes
    route: str
    client: str
    stream: bool
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    response: bytes | None = None
    failed: bool = False
    status: int = 200
    prompt_version: str = ""
    usage: dict[str, Any] | None = None
    latency_seconds: float = 0.0
    _streamed: dict[int, _StreamedChoice] = field(default_factory=dict)

    def add_chunk(self, payload: dict[str, Any]) -> None:
        """Record one streamed chunk as the client received it."""
        if "error" in payload:
            self.failed = True
            return
        choices = payload.get("choices")
        if isinstance(choices, list):
            self.add_choices(choices)

    def add_choices(self, choices: list[Any]) -> None:
        for position, choice in enumerate(choices):
            if isinstance(choice, dict):
                index = choice.get("index", position)
                self._streamed.setdefault(index, _StreamedChoice()).add(choice)

    def finish(
        self,
        status: int,
        prompt_version: str,
        usage: dict[str, Any] | None,
        latency_seconds: float,
    ) -> None:
        self.status = status
        self.prompt_version = prompt_version
        self.usage = usage
        self.latency_seconds = latency_seconds

    def choices(self) -> list[dict[str, Any]]:
        """Return the answer choices, from the stream or the response body."""
        if self.stream:
            return [
                {
                    "index": index,
                    "text": "".join(part.pieces),
                    "tool_calls": list(part.tool_calls.values()),
                    "finish_reason": part.finish_reason,
                }
                for index, part in sorted(self._streamed.items())
            ]
        return response_choices(self.response)


def response_choices(response: bytes | None) -> list[dict[str, Any]]:
    """Return the choices of a chat or text completion body."""
    payload = _load_object(response)
    choices = payload.get("choices")
    if not isinstance(choices, list):
        return []
    result = []
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        if isinstance(message, dict):
            text = message.get("content")
            tool_calls = message.get("tool_calls")
        else:
            text = choice.get("text")
            tool_calls = None
        result.append(
            {
                "index": choice.get("index", position),
                "text": text if isinstance(text, str) else "",
                "tool_calls": tool_calls if isinstance(tool_calls, list) else [],
                "finish_reason": choice.get("finish_reason"),
            }
        )
    return result


def build_sample(capture: SampleCapture, redactor: Redactor | None) -> Sample:
    """Build the Sample to store, redacting every text the client sent or got."""
    request = _load_object(capture.raw_request)
    messages = request.get("messages")
    prompt = request.get("prompt")
    choices: Any = capture.choices()
    if redactor is not None:
        messages = redactor.redact_tree(messages)
        prompt = redactor.redact_tree(prompt)
        choices = redactor.redact_tree(choices)
    parsed = [SampledChoice.model_validate(choice) for choice in choices]
    model = request.get("model")
    return Sample(
        time=capture.received_at,
        route=capture.route,
        client=capture.client,
        model=model if isinstance(model, str) else None,
        prompt_version=capture.prompt_version,
        stream=capture.stream,
        messages=messages if isinstance(messages, list) else None,
        prompt=prompt,
        choices=parsed,
        usage=capture.usage if isinstance(capture.usage, dict) else None,
        latency_seconds=capture.latency_seconds,
        status=capture.status,
        outcome=outcome_of(capture, parsed),
        redacted=redactor is not None,
    )


def outcome_of(capture: SampleCapture, choices: list[SampledChoice]) -> Outcome:
    if capture.status == CLIENT_CLOSED_REQUEST:
        return "disconnected"
    if capture.failed or capture.status >= 400:
        return "failed"
    if any(choice.finish_reason == "length" for choice in choices):
        return "truncated"
    return "ok"


def _load_object(content: bytes | None) -> dict[str, Any]:
    if not content:
        return {}
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    return payload if isinstance(payload, dict) else {}
