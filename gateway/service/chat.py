"""POST /v1/chat/completions: inject the instruction and forward, in either mode."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import UpstreamError
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.service.base_mode import (
    chat_response,
    completion_request,
    reject_tools,
)
from gateway.service.components import (
    EMPTY_INSTRUCTION,
    Components,
    version_header,
    version_label,
)
from gateway.service.context import Reply, RequestContext, StreamReply
from gateway.service.relays import BaseChatRelay, PassthroughRelay, Relay
from gateway.service.streams import open_stream, pump
from gateway.settings import InjectionMode
from gateway.upstream import forwarded_headers
from gateway.wire import ChatCompletionRequest, parse_body, validate


class ChatCompletions:
    """The chat completions endpoint over an upstream in chat or base mode."""

    def __init__(self, parts: Components) -> None:
        self._parts = parts

    async def create(
        self, raw: bytes, headers: Mapping[str, str], ctx: RequestContext
    ) -> Reply | StreamReply:
        body = parse_body(raw)
        request: ChatCompletionRequest = validate(ChatCompletionRequest, body)
        parts = self._parts
        ctx.model = parts.model_labels(request.model)
        parts.check_model(request.model)
        version = parts.resolve_prompt(request.model, headers, ctx.peer)
        ctx.prompt_version = version_label(version)
        parts.choose_sample(raw, headers, ctx, bool(request.stream))
        examples = await self._examples(version, body["messages"])
        instruction = version.instruction if version is not None else EMPTY_INSTRUCTION

        upstream_headers = forwarded_headers(headers)
        if parts.modes(request.model) is InjectionMode.BASE:
            return await self._base_mode(
                body, request, instruction, examples, upstream_headers, ctx, version
            )
        if version is not None:
            body["messages"] = parts.builder.chat_messages(
                instruction, body["messages"], examples
            )
            injected = parts.builder.injected_text(instruction, examples)
            self._count_injected(injected, ctx)
        return await self._chat_mode(body, request, upstream_headers, ctx, version)

    async def _examples(
        self, version: PromptVersion | None, messages: list[dict[str, Any]]
    ) -> tuple[Example, ...]:
        if version is None:
            return ()
        return await self._parts.select_examples(version, last_user_text(messages))

    def _count_injected(self, text: str, ctx: RequestContext) -> None:
        counter = self._parts.metrics.injected_tokens.labels(model=ctx.model)
        self._parts.injected_tokens.count(text, counter.inc)

    async def _chat_mode(
        self,
        body: dict[str, Any],
        request: ChatCompletionRequest,
        headers: dict[str, str],
        ctx: RequestContext,
        version: PromptVersion | None,
    ) -> Reply | StreamReply:
        if request.stream:
            client_wants_usage = _client_wants_usage(body)
            body["stream_options"] = {
                **(body.get("stream_options") or {}),
                "include_usage": True,
            }
            relay = PassthroughRelay(ctx, client_wants_usage)
            return await self._stream(
                "/chat/completions", body, relay, headers, ctx, version
            )

        ctx.mark_upstream_start()
        content = await self._parts.upstream.post_json(
            "/chat/completions", orjson.dumps(body), headers
        )
        ctx.mark_upstream_end()
        ctx.usage = decode_response(content).get("usage")
        ctx.keep_response(content)
        return Reply(200, content, version_header(version))

    async def _base_mode(
        self,
        body: dict[str, Any],
        request: ChatCompletionRequest,
        instruction: Instruction,
        examples: tuple[Example, ...],
        headers: dict[str, str],
        ctx: RequestContext,
        version: PromptVersion | None,
    ) -> Reply | StreamReply:
        reject_tools(body)
        builder = self._parts.builder
        prompt = builder.base_prompt(instruction, body["messages"], examples)
        if version is not None:
            self._count_injected(builder.base_prefix(instruction, examples), ctx)
        completion = completion_request(
            body, prompt, self._parts.settings.base_max_tokens
        )
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.stream:
            relay = BaseChatRelay(
                ctx,
                request.n or 1,
                top_logprobs,
                _client_wants_usage(body),
                lambda: self._parts.injected_tokens.tokenize(prompt),
                prefill_text(body["messages"]),
            )
            return await self._stream(
                "/completions", completion, relay, headers, ctx, version
            )

        ctx.mark_upstream_start()
        content = await self._parts.upstream.post_json(
            "/completions", orjson.dumps(completion), headers
        )
        ctx.mark_upstream_end()
        response = chat_response(
            decode_response(content), top_logprobs, prefill_text(body["messages"])
        )
        ctx.usage = response.get("usage")
        reply_body = orjson.dumps(response)
        ctx.keep_response(reply_body)
        return Reply(200, reply_body, version_header(version))

    async def _stream(
        self,
        path: str,
        body: dict[str, Any],
        relay: Relay,
        headers: dict[str, str],
        ctx: RequestContext,
        version: PromptVersion | None,
    ) -> StreamReply:
        parts = self._parts
        stream = await open_stream(
            parts.upstream, path, orjson.dumps(body), headers, ctx
        )
        deadline = (
            asyncio.get_running_loop().time() + parts.settings.upstream_total_timeout
        )
        events = pump(stream, relay, ctx, deadline, parts.count_upstream_error)
        return StreamReply(events, headers=version_header(version), close=stream.aclose)


def _client_wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def last_user_text(messages: list[dict[str, Any]]) -> str:
    """Return the text of the last user message, for example retrieval."""
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(
                part.get("text", "")
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            )
    return ""


def prefill_text(messages: list[dict[str, Any]]) -> str:
    """Return the final assistant message's text, which base mode continues."""
    if not messages or messages[-1].get("role") != "assistant":
        return ""
    content = messages[-1].get("content")
    if isinstance(content, list):
        return "\n".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return content if isinstance(content, str) else ""


def decode_response(content: bytes) -> dict[str, Any]:
    """Parse an upstream JSON response, raising UpstreamError when it is not one."""
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError:
        payload = None
    if not isinstance(payload, dict):
        raise UpstreamError(
            f"The upstream returned a body that is not a JSON object: "
            f"{content[:200].decode('utf-8', 'replace')!r}.",
            code="invalid_response",
        )
    return payload
