"""A scripted OpenAI-compatible server that plays every role of a DRPO run.

`FakeModels` runs a real HTTP server on loopback (uvicorn in a thread, see
`tests.fakes.upstream.ServerThread`). Each request is routed to one role by
what the optimizer sends:

- selector, judge and prompt proposals by their ``response_format`` schema
  name;
- answer rewrites (optimizer role) by their system prompt;
- everything else, /completions included, to the target.

Each role has a handler, a plain function of the request body that returns a
response body (dict), the text of a reply (str, wrapped into a chat or text
completion) or a `FakeReply` (status, body, delay). The defaults give sane
answers: two aspects per query, a score of 4 on each requested aspect, `n`
distinct prompts, and a short answer. A request with ``"stream": true`` gets
the reply's text as server-sent events, and GET /v1/models lists one model.
The server records every request and the maximum number of requests in
flight at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from optimizer.client import Endpoint
from optimizer.judge import SCORES_SCHEMA_NAME
from optimizer.proposer import PROMPTS_SCHEMA_NAME, REWRITER_SYSTEM_PROMPT
from optimizer.selector import SELECTION_SCHEMA_NAME
from tests.fakes.upstream import (
    USAGE,
    ServerThread,
    chat_body,
    chat_events,
    completion_body,
    completion_events,
)

ROLES = ("selector", "judge", "optimizer", "target")
FAKE_MODEL = "fake-model"


@dataclass
class FakeReply:
    """A reply with a chosen status, body and delay in seconds."""

    status: int = 200
    body: Any = None
    delay: float | None = None
    """Seconds to wait before replying; None means the server's default delay."""


Reply = dict[str, Any] | str | FakeReply
Handler = Callable[[dict[str, Any]], Reply]


@dataclass
class Call:
    """One request the fake received, and the role it was routed to."""

    role: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


def chat_reply(text: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return chat_body(text, usage or dict(USAGE))


def completion_reply(text: str) -> dict[str, Any]:
    return completion_body(text)


def json_reply(value: Any) -> dict[str, Any]:
    """Return a chat completion whose message content is `value` as JSON."""
    return chat_reply(json.dumps(value))


def detect_role(path: str, body: Mapping[str, Any]) -> str:
    """Return the role that sent a request, from its schema name or system prompt."""
    if path != "/chat/completions":
        return "target"
    schema_name = _schema_name(body)
    if schema_name == SELECTION_SCHEMA_NAME:
        return "selector"
    if schema_name == SCORES_SCHEMA_NAME:
        return "judge"
    if schema_name == PROMPTS_SCHEMA_NAME or is_rewrite(body):
        return "optimizer"
    return "target"


def is_rewrite(body: Mapping[str, Any]) -> bool:
    """Return whether an optimizer request is for a rewritten answer."""
    messages = body.get("messages") or []
    return bool(messages) and messages[0].get("content") == REWRITER_SYSTEM_PROMPT


def first_user_text(body: Mapping[str, Any]) -> str:
    """Return the content of the first user message (retries append after it)."""
    for message in body.get("messages") or []:
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def tagged(body: Mapping[str, Any], tag: str) -> str:
    """Return the text inside `<tag>` ... `</tag>` of the first user message."""
    match = re.search(
        rf"<{tag}>\n(.*?)\n</{tag}>", first_user_text(body), flags=re.DOTALL
    )
    return match.group(1) if match else ""


def requested_aspects(body: Mapping[str, Any]) -> list[str]:
    """Return the aspect names a judge request requests scores for (its schema enum)."""
    schema = body["response_format"]["json_schema"]["schema"]
    entry = schema["properties"]["scores"]["items"]
    return list(entry["properties"]["aspect"]["enum"])


def requested_prompt_count(body: Mapping[str, Any]) -> int:
    """Return how many prompts a proposal request requests (its schema minItems)."""
    schema = body["response_format"]["json_schema"]["schema"]
    return int(schema["properties"]["prompts"]["minItems"])


def scores_reply(scores: Mapping[str, Any], rationale: str = "Scripted.") -> Reply:
    """Return a judge reply that gives each aspect of `scores` its value."""
    entries = [
        {"aspect": aspect, "rationale": rationale, "score": score}
        for aspect, score in scores.items()
    ]
    return json_reply({"scores": entries})


def default_selector(body: dict[str, Any]) -> Reply:
    return json_reply(
        {
            "analysis": "A general request.",
            "aspects": ["Helpfulness", "Clarity"],
            "reason": "The user needs a useful and clear answer.",
        }
    )


def default_judge(body: dict[str, Any]) -> Reply:
    return scores_reply(dict.fromkeys(requested_aspects(body), 4))


def default_optimizer(body: dict[str, Any]) -> Reply:
    digest = _digest(body)
    if is_rewrite(body):
        return chat_reply(f"Rewritten answer {digest}.")
    count = requested_prompt_count(body)
    prompts = [f"Improved prompt {digest}-{index}." for index in range(count)]
    return json_reply({"prompts": prompts})


def default_target(body: dict[str, Any]) -> Reply:
    return "A fake answer."


@dataclass
class FakeModels:
    """The scripted server; start it with `with FakeModels() as fake:`."""

    selector: Handler = default_selector
    judge: Handler = default_judge
    optimizer: Handler = default_optimizer
    target: Handler = default_target
    delay: float = 0.0
    """Seconds every reply waits unless its FakeReply sets a delay."""
    stream_hold: threading.Event | None = None
    """When given, a streamed reply sends its first word, then waits for this
    event before it sends the rest."""
    calls: list[Call] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    port: int = 0
    _server: ServerThread | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def endpoint(self, model: str = FAKE_MODEL, api_key: str | None = None) -> Endpoint:
        return Endpoint(self.base_url, model, api_key)

    def calls_for(self, role: str) -> list[Call]:
        return [call for call in self.calls if call.role == role]

    def start(self) -> FakeModels:
        self._server = ServerThread(
            Starlette(
                routes=[
                    Route("/v1/models", self._models, methods=["GET"]),
                    Route("/v1/{path:path}", self._handle, methods=["POST"]),
                ]
            )
        )
        self.port = self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FakeModels:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def _handle(self, request: Request) -> Response:
        path = "/" + request.path_params["path"]
        body = json.loads(await request.body())
        role = detect_role(path, body)
        self.calls.append(Call(role, path, body, dict(request.headers)))
        handler: Handler = getattr(self, role)
        reply = _as_fake_reply(handler(body), path)

        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.delay if reply.delay is None else reply.delay
            if delay:
                await asyncio.sleep(delay)
        finally:
            self.in_flight -= 1
        if body.get("stream") and reply.status == 200:
            return StreamingResponse(
                self._stream(path, reply_text(reply.body)),
                media_type="text/event-stream",
            )
        return JSONResponse(reply.body, reply.status)

    async def _models(self, request: Request) -> Response:
        return JSONResponse(
            {"object": "list", "data": [{"id": FAKE_MODEL, "object": "model"}]}
        )

    async def _stream(self, path: str, text: str) -> AsyncIterator[bytes]:
        words = text.split(" ")
        pieces = [words[0], *(" " + word for word in words[1:])]
        if path == "/completions":
            events = completion_events(pieces)
        else:
            events = chat_events(pieces)
        # Two events go out at once (for chat: the role chunk and the first
        # word), and the rest waits for the hold.
        for event in events[:2]:
            yield event
        while self.stream_hold is not None and not self.stream_hold.is_set():
            await asyncio.sleep(0.01)
        for event in events[2:]:
            yield event


def _as_fake_reply(reply: Reply, path: str) -> FakeReply:
    if isinstance(reply, FakeReply):
        return reply
    if isinstance(reply, str):
        if path == "/completions":
            return FakeReply(body=completion_reply(reply))
        return FakeReply(body=chat_reply(reply))
    return FakeReply(body=reply)


def reply_text(body: Any) -> str:
    """Return the text of a chat or text completion body, for streaming it."""
    choice = body["choices"][0]
    message = choice.get("message")
    return str(message["content"] if message else choice["text"])


def _schema_name(body: Mapping[str, Any]) -> str | None:
    response_format = body.get("response_format")
    if not isinstance(response_format, Mapping):
        return None
    schema = response_format.get("json_schema")
    return schema.get("name") if isinstance(schema, Mapping) else None


def _digest(body: Mapping[str, Any]) -> str:
    text = json.dumps(body.get("messages"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def texts(calls: Sequence[Call]) -> list[str]:
    """Return the first user message of each call, for asserts on prompts."""
    return [first_user_text(call.body) for call in calls]
