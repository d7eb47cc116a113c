"""Per-event handlers for streamed responses.

A relay sees each complete upstream SSE event and returns the bytes to send to
the client for it. Chat-mode events are forwarded unchanged, except the usage
chunk, which the gateway always requests and passes on only to clients that
asked for it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from gateway.prompting import AnswerTrimmer
from gateway.service.base_mode import ChatChunkConverter, completion_choices
from gateway.service.context import RequestContext
from gateway.service.sse import DONE, DONE_EVENT, encode_event, event_data


class Relay(Protocol):
    @property
    def done(self) -> bool:
        """Whether every answer is complete, so the upstream can be closed."""

    def on_event(self, event: bytes) -> list[bytes]: ...

    async def on_end(self) -> list[bytes]: ...


def decode_payload(event: bytes) -> dict[str, Any] | None:
    data = event_data(event)
    if data is None or data == DONE:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None


def _has_output(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    part = choice.get("delta") or {}
    if isinstance(part, dict):
        return bool(part.get("content") or part.get("tool_calls"))
    return bool(choice.get("text"))


class PassthroughRelay:
    """Forward OpenAI stream events as sent, keeping a copy of usage and timing."""

    done = False

    def __init__(self, ctx: RequestContext, client_wants_usage: bool) -> None:
        self._ctx = ctx
        self._client_wants_usage = client_wants_usage

    def on_event(self, event: bytes) -> list[bytes]:
        payload = decode_payload(event)
        if payload is None:
            return [event]
        choices = payload.get("choices")
        if not isinstance(choices, list):
            choices = []
        if self._ctx.first_token_at is None and any(_has_output(c) for c in choices):
            self._ctx.mark_first_token()
        if self._ctx.sample is not None:
            self._ctx.sample.add_chunk(payload)
        if "usage" not in payload or self._client_wants_usage:
            if payload.get("usage"):
                self._ctx.usage = payload["usage"]
            return [event]
        usage = payload.pop("usage")
        if usage:
            self._ctx.usage = usage
            if not choices:
                return []
        return [encode_event(payload)]

    async def on_end(self) -> list[bytes]:
        return []


class BaseChatRelay:
    """Turn a completion stream into chat completion chunks, trimming framing."""

    def __init__(
        self,
        ctx: RequestContext,
        n: int,
        top_logprobs: int | None,
        client_wants_usage: bool,
        count_prompt_tokens: Callable[[], Awaitable[int | None]],
        prefill: str = "",
    ) -> None:
        self._ctx = ctx
        self._converter = ChatChunkConverter(n, top_logprobs, prefill)
        self._client_wants_usage = client_wants_usage
        self._count_prompt_tokens = count_prompt_tokens
        self._completion_tokens = 0

    @property
    def done(self) -> bool:
        return self._converter.upstream_still_generating

    def on_event(self, event: bytes) -> list[bytes]:
        payload = decode_payload(event)
        if payload is None:
            return []
        if "error" in payload:
            if self._ctx.sample is not None:
                self._ctx.sample.failed = True
            return [event]
        self._completion_tokens += sum(
            1 for choice in completion_choices(payload) if choice.get("text")
        )
        chunks = self._converter.convert(payload)
        if self._converter.content_seen:
            self._ctx.mark_first_token()
        self._keep(chunks)
        return [encode_event(chunk) for chunk in chunks]

    async def on_end(self) -> list[bytes]:
        closing = self._converter.finish()
        self._keep(closing)
        events = [encode_event(chunk) for chunk in closing]
        usage = self._converter.usage or await self._counted_usage()
        if usage is not None:
            self._ctx.usage = usage
        if self._client_wants_usage and usage is not None:
            events.append(encode_event(self._converter.usage_chunk(usage)))
        events.append(DONE_EVENT)
        return events

    def _keep(self, chunks: list[dict[str, Any]]) -> None:
        if self._ctx.sample is not None:
            for chunk in chunks:
                self._ctx.sample.add_chunk(chunk)

    async def _counted_usage(self) -> dict[str, Any] | None:
        # The gateway closes the upstream stream itself once every answer hit a
        # framing marker that is not a stop string, so the upstream never sends
        # usage. vLLM and llama-server stream one token per event, so counting
        # text events gives the completion tokens; the prompt is tokenized.
        if not self._completion_tokens:
            return None
        prompt_tokens = await self._count_prompt_tokens() or 0
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self._completion_tokens,
            "total_tokens": prompt_tokens + self._completion_tokens,
        }


class TrimmedCompletionRelay:
    """Trim DRPO framing from a /v1/completions stream of a wrapped prompt."""

    def __init__(self, ctx: RequestContext, n: int, client_wants_usage: bool) -> None:
        self._ctx = ctx
        self._n = n
        self._client_wants_usage = client_wants_usage
        self._trimmers: dict[int, AnswerTrimmer] = {}
        self._finished: set[int] = set()
        self._cut_early: set[int] = set()
        self._last: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        # Choices the upstream finished itself are followed by its usage event
        # and [DONE], so the stream is closed early only after a cut.
        return len(self._finished) >= self._n and bool(self._cut_early)

    def on_event(self, event: bytes) -> list[bytes]:
        payload = decode_payload(event)
        if payload is None:
            return []
        if "error" in payload and self._ctx.sample is not None:
            self._ctx.sample.failed = True
        if payload.get("usage"):
            self._ctx.usage = payload["usage"]
        self._last = {
            key: payload.get(key) for key in ("id", "object", "created", "model")
        }
        events = []
        for position, choice in enumerate(completion_choices(payload)):
            index = choice.get("index", position)
            if index in self._finished:
                continue
            trimmer = self._trimmers.setdefault(index, AnswerTrimmer())
            text = trimmer.feed(choice.get("text") or "")
            finish_reason = choice.get("finish_reason")
            if trimmer.stopped or finish_reason:
                text += trimmer.finish()
                self._finished.add(index)
                if trimmer.stopped and not finish_reason:
                    self._cut_early.add(index)
                finish_reason = "stop" if trimmer.stopped else finish_reason
            if text:
                self._ctx.mark_first_token()
            if text or finish_reason:
                events.append(self._event(index, text, finish_reason))
        if payload.get("usage") and self._client_wants_usage and not events:
            events.append(
                encode_event({**self._last, "choices": [], "usage": payload["usage"]})
            )
        return events

    async def on_end(self) -> list[bytes]:
        events = []
        for index in range(self._n):
            if index not in self._finished:
                trimmer = self._trimmers.setdefault(index, AnswerTrimmer())
                events.append(self._event(index, trimmer.finish(), "stop"))
                self._finished.add(index)
        events.append(DONE_EVENT)
        return events

    def _event(self, index: int, text: str, finish_reason: str | None) -> bytes:
        choice = {
            "index": index,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if self._ctx.sample is not None:
            self._ctx.sample.add_choices([choice])
        return encode_event({**self._last, "choices": [choice]})
