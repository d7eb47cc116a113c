"""Every other /v1/* route, forwarded to the upstream unchanged."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping

from gateway.service.components import Components
from gateway.service.context import RequestContext, StreamReply
from gateway.upstream import (
    DROPPED_RESPONSE_HEADERS,
    check_status,
    forwarded_headers,
    upstream_errors,
)


async def forward(
    parts: Components,
    method: str,
    path: str,
    query: Mapping[str, str],
    raw: bytes,
    headers: Mapping[str, str],
    ctx: RequestContext,
) -> StreamReply:
    """Send the request on as it came and relay the response as it arrives."""
    stack = contextlib.AsyncExitStack()
    ctx.mark_upstream_start()
    try:
        response = await stack.enter_async_context(
            parts.upstream.stream(
                method,
                path,
                content=raw or None,
                headers=forwarded_headers(headers),
                params=query,
            )
        )
        if response.status_code >= 400:
            # Error bodies are small; reading one lets the client get the
            # upstream's message in the OpenAI error shape.
            with upstream_errors(parts.upstream.target.base_url):
                error_body = await response.aread()
            check_status(response, error_body)
    except BaseException:
        await stack.aclose()
        raise
    ctx.status = response.status_code

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.aiter_bytes():
                yield chunk
        finally:
            ctx.mark_upstream_end()
            await stack.aclose()

    reply_headers = {
        name: value
        for name, value in response.headers.items()
        if name.lower() not in DROPPED_RESPONSE_HEADERS
    }
    media_type = response.headers.get("content-type", "application/octet-stream")
    reply_headers.pop("content-type", None)
    return StreamReply(
        body(),
        headers=reply_headers,
        status=response.status_code,
        media_type=media_type,
        close=stack.aclose,
    )
