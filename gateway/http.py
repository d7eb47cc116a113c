"""HTTP adaptation: request ids, body limits, client keys, errors, responses."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    AuthenticationError,
    GatewayError,
    PayloadTooLargeError,
)
from gateway.service.context import Reply, StreamReply
from gateway.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def request_id(request: Request) -> str:
    """Return the caller's request id, cleaned and capped, or a new one."""
    supplied = request.headers.get(REQUEST_ID_HEADER, "")
    cleaned = _REQUEST_ID_UNSAFE.sub("", supplied)[:64]
    return cleaned or uuid.uuid4().hex


def check_api_key(request: Request, settings: Settings) -> None:
    """Raise AuthenticationError unless the request carries a configured key."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "Missing API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
    supplied = token.strip().encode()
    for key in settings.api_keys:
        if hmac.compare_digest(supplied, key.get_secret_value().encode()):
            return
    raise AuthenticationError(
        "Invalid API key. Use one of the keys in DRPO_API_KEYS.",
        code="invalid_api_key",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """Read the whole body, raising PayloadTooLargeError past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"The request body is {size} bytes or more; the limit is {limit} bytes "
        "(DRPO_MAX_BODY_BYTES).",
        code="request_too_large",
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it if the client disconnects first.

    Cancelling the work closes its upstream request, so the model stops
    generating an answer nobody will read.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientDisconnected


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def error_response(error: GatewayError) -> Response:
    """Turn a gateway error into its HTTP response."""
    return JSONResponse(error.to_body(), status_code=error.status_code)


def internal_error_response() -> Response:
    body: dict[str, Any] = {
        "error": {
            "message": "The gateway failed to handle the request. This is a bug; "
            "the gateway log has the details.",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    return JSONResponse(body, status_code=500)


class ReplyStreamingResponse(StreamingResponse):
    """A streaming response that releases its upstream however it ends."""

    def __init__(self, reply: StreamReply, on_done: Callable[[], None]) -> None:
        super().__init__(
            reply.body,
            status_code=reply.status,
            headers=reply.headers,
            media_type=reply.media_type,
        )
        self._reply = reply
        self._on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._reply.close is not None:
                await self._reply.close()
            self._on_done()


def to_response(reply: Reply | StreamReply, on_done: Callable[[], None]) -> Response:
    if isinstance(reply, StreamReply):
        return ReplyStreamingResponse(reply, on_done)
    on_done()
    return Response(
        reply.body,
        status_code=reply.status,
        headers=reply.headers,
        media_type=reply.media_type,
    )
