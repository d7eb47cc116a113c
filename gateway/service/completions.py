"""POST /v1/completions: raw prompts pass through unless wrapping is on."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson

from gateway.errors import InvalidRequestError
from gateway.metrics import NO_PROMPT
from gateway.prompting import base_stop_strings, trim_answer
from gateway.service.base_mode import completion_choices
from gateway.service.chat import decode_response
from gateway.service.components import Components, version_header, version_label
from gateway.service.context import Reply, RequestContext, StreamReply
from gateway.service.relays import PassthroughRelay, Relay, TrimmedCompletionRelay
from gateway.service.streams import open_stream, pump
from gateway.upstream import forwarded_headers
from gateway.wire import CompletionRequest, parse_body, validate


class Completions:
    """The legacy completions endpoint."""

    def __init__(self, parts: Components) -> None:
        self._parts = parts

    async def create(
        self, raw: bytes, headers: Mapping[str, str], ctx: RequestContext
    ) -> Reply | StreamReply:
        body = parse_body(raw)
        request: CompletionRequest = validate(CompletionRequest, body)
        parts = self._parts
        ctx.model = parts.model_labels(request.model)
        parts.check_model(request.model)
        wrapped = parts.settings.wrap_completions
        version = (
            parts.resolve_prompt(request.model, headers, ctx.peer) if wrapped else None
        )
        ctx.prompt_version = version_label(version) if wrapped else NO_PROMPT
        parts.choose_sample(raw, headers, ctx, bool(request.stream))
        if version is not None:
            body = self._wrap(body, request, version.instruction)
            counter = parts.metrics.injected_tokens.labels(model=ctx.model)
            prefix = parts.builder.base_prefix(version.instruction)
            parts.injected_tokens.count(prefix, counter.inc)
        upstream_headers = forwarded_headers(headers)
        reply_headers = version_header(version) if wrapped else {}

        if request.stream:
            client_wants_usage = bool(
                request.stream_options and request.stream_options.include_usage
            )
            body["stream_options"] = {
                **(body.get("stream_options") or {}),
                "include_usage": True,
            }
            relay: Relay = (
                TrimmedCompletionRelay(ctx, request.n or 1, client_wants_usage)
                if version is not None
                else PassthroughRelay(ctx, client_wants_usage)
            )
            stream = await open_stream(
                parts.upstream,
                "/completions",
                orjson.dumps(body),
                upstream_headers,
                ctx,
            )
            deadline = (
                asyncio.get_running_loop().time()
                + parts.settings.upstream_total_timeout
            )
            events = pump(stream, relay, ctx, deadline, parts.count_upstream_error)
            return StreamReply(events, headers=reply_headers, close=stream.aclose)

        ctx.mark_upstream_start()
        content = await parts.upstream.post_json(
            "/completions", orjson.dumps(body), upstream_headers
        )
        ctx.mark_upstream_end()
        payload = decode_response(content)
        ctx.usage = payload.get("usage")
        if version is None:
            ctx.keep_response(content)
            return Reply(200, content, reply_headers)
        for choice in completion_choices(payload):
            text, cut = trim_answer(choice.get("text") or "")
            choice["text"] = text
            if cut:
                choice["finish_reason"] = "stop"
        reply_body = orjson.dumps(payload)
        ctx.keep_response(reply_body)
        return Reply(200, reply_body, reply_headers)

    def _wrap(
        self, body: dict[str, Any], request: CompletionRequest, instruction: Any
    ) -> dict[str, Any]:
        if not isinstance(request.prompt, str):
            raise InvalidRequestError(
                "With DRPO_WRAP_COMPLETIONS on, 'prompt' must be one string; "
                "send token ids or several prompts with the header "
                "'x-drpo-prompt: off'.",
                param="prompt",
            )
        messages = [{"role": "user", "content": request.prompt}]
        body["prompt"] = self._parts.builder.base_prompt(instruction, messages)
        body["stop"] = base_stop_strings(body.get("stop"))
        return body
