"""Opening upstream streams and pumping their events through a relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import httpx

from gateway.errors import GatewayError, UpstreamError, UpstreamTimeoutError
from gateway.service.context import RequestContext
from gateway.service.relays import Relay
from gateway.service.sse import EventSplitter, encode_event
from gateway.upstream import UpstreamClient, check_status, upstream_errors

logger = logging.getLogger(__name__)

# Status recorded for a client that left before its response ended; nginx's
# convention, never sent on the wire.
CLIENT_CLOSED_REQUEST = 499


class OpenStream:
    """An upstream response whose status was 2xx, with its body still unread."""

    def __init__(self, response: httpx.Response, stack: contextlib.AsyncExitStack):
        self.response = response
        self._stack = stack

    async def aclose(self) -> None:
        await self._stack.aclose()


async def open_stream(
    upstream: UpstreamClient,
    path: str,
    content: bytes,
    headers: Mapping[str, str],
    ctx: RequestContext,
) -> OpenStream:
    """Send a streaming POST and fail with the right error before any byte is sent."""
    stack = contextlib.AsyncExitStack()
    ctx.mark_upstream_start()
    try:
        response = await stack.enter_async_context(
            upstream.stream(
                "POST",
                path,
                content=content,
                headers={**headers, "content-type": "application/json"},
            )
        )
        if response.status_code >= 400:
            with upstream_errors(upstream.target.base_url):
                body = await response.aread()
            check_status(response, body)
        await _check_event_stream(response, upstream.target.base_url)
    except BaseException:
        await stack.aclose()
        raise
    return OpenStream(response, stack)


async def _check_event_stream(response: httpx.Response, base_url: str) -> None:
    """Raise UpstreamError when a 2xx response to a stream request is not SSE.

    A server that ignores `stream` returns one JSON body, which contains no
    event and would reach the client as an empty stream. A response without a
    content type is let through.
    """
    content_type = response.headers.get("content-type")
    if content_type is None or content_type.startswith("text/event-stream"):
        return
    with upstream_errors(base_url):
        body = await response.aread()
    raise UpstreamError(
        f"The upstream at {base_url} responded to a streaming request with "
        f"content type {content_type!r} instead of text/event-stream: "
        f"{body[:200].decode('utf-8', 'replace')!r}. Check that the server "
        "supports streaming, or send the request without 'stream'.",
        code="invalid_response",
    )


async def pump(
    stream: OpenStream,
    relay: Relay,
    ctx: RequestContext,
    deadline: float,
    on_error: Callable[[GatewayError], None],
) -> AsyncIterator[bytes]:
    """Yield the relay's output for each upstream event, then its closing events.

    A failure after the first byte cannot change the HTTP status any more, so
    it ends the stream with an OpenAI error event. `deadline` is a loop time.
    """
    splitter = EventSplitter()
    chunks = stream.response.aiter_bytes().__aiter__()
    finished = False
    try:
        while not relay.done:
            chunk = await _next_chunk(chunks, deadline, stream.response)
            if chunk is None:
                break
            started = time.perf_counter()
            outputs = [
                out for event in splitter.feed(chunk) for out in relay.on_event(event)
            ]
            ctx.processing_seconds += time.perf_counter() - started
            for output in outputs:
                yield output
        ctx.mark_upstream_end()
        for output in await relay.on_end():
            yield output
        finished = True
    except GatewayError as error:
        ctx.mark_upstream_end()
        ctx.status = error.status_code
        on_error(error)
        logger.warning("Upstream stream failed: %s", error.message)
        finished = True
        yield encode_event(error.to_body())
    finally:
        if not finished:
            # The client went away (or the server is stopping) mid-stream.
            ctx.status = CLIENT_CLOSED_REQUEST
        await stream.aclose()


async def _next_chunk(
    chunks: AsyncIterator[bytes], deadline: float, response: httpx.Response
) -> bytes | None:
    base_url = f"{response.request.url.scheme}://{response.request.url.netloc.decode()}"
    try:
        async with asyncio.timeout_at(deadline):
            with upstream_errors(base_url):
                return await anext(chunks)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise UpstreamTimeoutError(
            "The upstream stream ran past the total timeout; the answer is "
            "incomplete. Raise DRPO_UPSTREAM_TOTAL_TIMEOUT for longer answers.",
            code="upstream_timeout",
        ) from None
    except UpstreamError as error:
        error.message = f"The upstream stream was interrupted: {error.message}"
        error.code = "stream_interrupted"
        raise
