"""A scripted OpenAI-compatible upstream on loopback that records what it received.

Each test queues replies; a request with nothing queued gets a default reply
built from its body. The server is a real HTTP server (uvicorn in a thread), so
the gateway talks to it over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Scripted:
    """One reply: a JSON body, an SSE stream, an error status, a delay or a drop."""

    status: int = 200
    body: Any = None
    raw: bytes | None = None
    events: list[bytes] | None = None
    delay: float = 0.0
    event_delay: float = 0.0
    drop_after: int | None = None
    content_type: str = "application/json"


@dataclass
class FakeUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    replies: dict[str, deque[Scripted]] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    completed_streams: int = 0
    server: ServerThread | None = None
    sent_at: list[float] = field(default_factory=list)
    """time.monotonic() of every stream event written, across all streams."""

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def queue(self, path: str, *replies: Scripted) -> None:
        self.replies.setdefault(path, deque()).extend(replies)

    def requests_to(self, path: str) -> list[Received]:
        return [item for item in self.received if item.path == path]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route(
                    "/v1/{path:path}", self._handle, methods=["GET", "POST", "DELETE"]
                ),
                Route("/health", lambda request: JSONResponse({"status": "ok"})),
                Route("/tokenize", self._tokenize, methods=["POST"]),
            ]
        )

    async def _tokenize(self, request: Request) -> Response:
        body = await request.json()
        text = body.get("content") or body.get("prompt") or ""
        return JSONResponse({"tokens": list(range(len(text.split())))})

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        path = "/" + request.path_params["path"]
        self.received.append(
            Received(request.method, path, dict(request.headers), body)
        )
        queued = self.replies.get(path)
        reply = queued.popleft() if queued else self._default(path, body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            connected = not reply.delay or await _sleep_while_connected(
                request, reply.delay
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            self.in_flight -= 1
            raise
        if not connected:
            self.cancelled += 1
            self.in_flight -= 1
            return Response(status_code=499)
        if reply.events is None:
            self.in_flight -= 1
            if reply.raw is not None:
                return Response(reply.raw, reply.status, media_type=reply.content_type)
            return JSONResponse(reply.body, reply.status)
        return StreamingResponse(self._stream(reply), media_type="text/event-stream")

    async def _stream(self, reply: Scripted) -> Any:
        assert reply.events is not None
        try:
            for position, event in enumerate(reply.events):
                if reply.drop_after is not None and position >= reply.drop_after:
                    raise ConnectionAbortedError("scripted drop")
                if reply.event_delay:
                    await asyncio.sleep(reply.event_delay)
                self.sent_at.append(time.monotonic())
                yield event
            self.completed_streams += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    def _default(self, path: str, body: bytes) -> Scripted:
        if path == "/models":
            return Scripted(
                body={
                    "object": "list",
                    "data": [{"id": "fake-model", "object": "model"}],
                }
            )
        request = json.loads(body) if body else {}
        if path == "/chat/completions":
            if request.get("stream"):
                return Scripted(events=chat_events(["Hello", " world"], usage=True))
            return Scripted(body=chat_body("Hello world"))
        if path == "/completions":
            if request.get("stream"):
                return Scripted(events=completion_events(["Hello", " world", "<END>"]))
            return Scripted(body=completion_body("Hello world"))
        return Scripted(status=404, body={"error": {"message": f"no route {path}"}})


async def _sleep_while_connected(request: Request, seconds: float) -> bool:
    """Sleep `seconds`; return False as soon as the client disconnects.

    uvicorn does not cancel a handler whose client left, so the fake watches
    for the disconnect message itself to count cancelled requests.
    """
    sleeper = asyncio.ensure_future(asyncio.sleep(seconds))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    done, pending = await asyncio.wait(
        {sleeper, watcher}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    return sleeper in done


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def closed_port() -> int:
    """Return a loopback port that nothing listens on (it was free a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `condition` every 10 ms until it is true or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def sse(payload: Any) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


def chat_body(text: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": usage or USAGE,
    }


def chat_events(pieces: list[str], usage: bool = True) -> list[bytes]:
    base = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fake-model",
    }
    events = [
        sse(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
        )
    ]
    for piece in pieces:
        events.append(
            sse(
                {
                    **base,
                    "choices": [
                        {"index": 0, "delta": {"content": piece}, "finish_reason": None}
                    ],
                }
            )
        )
    events.append(
        sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    )
    if usage:
        events.append(sse({**base, "choices": [], "usage": USAGE}))
    events.append(sse("[DONE]"))
    return events


def completion_body(text: str, finish_reason: str = "stop") -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fake-model",
        "choices": [
            {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        ],
        "usage": USAGE,
    }


def completion_events(
    pieces: list[str], usage: bool = True, finish_reason: str = "stop"
) -> list[bytes]:
    base = {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fake-model",
    }
    events = [
        sse({**base, "choices": [{"index": 0, "text": piece, "finish_reason": None}]})
        for piece in pieces
    ]
    events.append(
        sse(
            {
                **base,
                "choices": [{"index": 0, "text": "", "finish_reason": finish_reason}],
            }
        )
    )
    if usage:
        events.append(sse({**base, "choices": [], "usage": USAGE}))
    events.append(sse("[DONE]"))
    return events


class ServerThread:
    """Run an ASGI app under uvicorn in a background thread on a free port."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.config = uvicorn.Config(
            app, host=host, port=0, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> int:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    def request_stop(self) -> None:
        """Ask the server to shut down without waiting; several stop in parallel."""
        self.server.should_exit = True

    def join(self) -> None:
        self.thread.join(timeout=15)

    def stop(self) -> None:
        self.request_stop()
        self.join()
