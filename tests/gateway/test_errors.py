"""Error responses: bad input, upstream failures and disconnects, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import InjectionMode
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    FakeUpstream,
    Scripted,
    closed_port,
    sse,
    wait_until,
)

USER = {"role": "user", "content": "Why is the sky blue?"}
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


def error_of(response: httpx.Response) -> dict[str, Any]:
    """Return the error object of an OpenAI error body, checking its exact shape."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    error: dict[str, Any] = body["error"]
    return error


def post_chat(gateway: RunningGateway, **request: Any) -> httpx.Response:
    return httpx.post(gateway.url + "/v1/chat/completions", timeout=10, **request)


@pytest.mark.parametrize(
    "content", [b"{bad", b"", b"\xff\xfe", b'{"model": "fake-model",'], ids=repr
)
def test_invalid_json_returns_400(gateway: RunningGateway, content: bytes) -> None:
    response = post_chat(gateway, content=content)

    error = error_of(response)
    assert response.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("content", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_non_object_json_returns_400(gateway: RunningGateway, content: bytes) -> None:
    response = post_chat(gateway, content=content)

    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [USER]}, "model"),
        ({"model": "fake-model"}, "messages"),
        ({"model": "fake-model", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ],
)
def test_missing_field_named_in_param(
    gateway: RunningGateway, body: dict[str, Any], param: str
) -> None:
    response = post_chat(gateway, json=body)

    error = error_of(response)
    assert response.status_code == 400
    assert error["param"] == param
    assert error["code"] == "missing_field"


@pytest.mark.parametrize(
    ("changes", "param"),
    [
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [USER, {"role": "user", "content": [7]}]},
            "messages[1].content[0]",
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": "hi"}, "messages"),
        ({"model": 5}, "model"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": [1]}, "stop"),
        (
            {"stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "messages[0].content[0].text",
        ),
        (
            {"messages": [{"role": "user", "content": [{"text": "hi"}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_wrong_type_named_in_param(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    changes: dict[str, Any],
    param: str,
) -> None:
    body = {"model": "fake-model", "messages": [USER], **changes}

    response = post_chat(gateway, json=body)

    error = error_of(response)
    assert response.status_code == 400
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.requests_to("/chat/completions") == []


def test_empty_messages_returns_400(gateway: RunningGateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=[])

    assert error_of(caught.value.response)["param"] == "messages"


def test_body_over_limit_returns_413(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(max_body_bytes=2048)
    messages: Any = [{"role": "user", "content": "x" * 4096}]

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=messages)

    assert caught.value.status_code == 413
    assert error_of(caught.value.response)["code"] == "request_too_large"


def test_chunked_body_over_limit_returns_413(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(max_body_bytes=2048)

    def body() -> Iterator[bytes]:
        yield b'{"model": "fake-model", "messages": [{"role": "user", "content": "'
        for _ in range(8):
            yield b"x" * 512
        yield b'"}]}'

    response = post_chat(gateway, content=body())

    assert response.status_code == 413
    assert error_of(response)["code"] == "request_too_large"


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/nope"), ("POST", "/v2/chat/completions")]
)
def test_unknown_route_returns_404(
    gateway: RunningGateway, method: str, path: str
) -> None:
    response = httpx.request(method, gateway.url + path)

    error = error_of(response)
    assert response.status_code == 404
    assert error["type"] == "not_found_error"
    assert path in error["message"]


def test_refused_upstream_returns_502(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/v1")

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=[USER])

    error = error_of(caught.value.response)
    assert caught.value.status_code == 502
    assert error["code"] == "upstream_unreachable"
    assert "DRPO_UPSTREAM" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_500_returns_502_with_message(
    gateway: RunningGateway, fake_upstream: FakeUpstream, stream: bool
) -> None:
    reply = Scripted(status=500, body={"error": {"message": "CUDA out of memory"}})
    fake_upstream.queue("/chat/completions", reply)

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=stream
        )

    error = error_of(caught.value.response)
    assert caught.value.status_code == 502
    assert error["type"] == "upstream_error"
    assert "HTTP 500" in error["message"]
    assert "CUDA out of memory" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_slow_upstream_returns_504(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, stream: bool
) -> None:
    gateway = start_gateway(upstream_read_timeout=0.3)
    fake_upstream.queue("/chat/completions", Scripted(delay=2.0))

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=stream
        )

    error = error_of(caught.value.response)
    assert caught.value.status_code == 504
    assert error["code"] == "upstream_timeout"
    assert "DRPO_UPSTREAM_READ_TIMEOUT" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_400_passed_through(
    gateway: RunningGateway, fake_upstream: FakeUpstream, stream: bool
) -> None:
    body = {
        "error": {
            "message": "This model's maximum context length is 2048 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    fake_upstream.queue("/chat/completions", Scripted(status=400, body=body))

    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=stream
        )

    assert caught.value.status_code == 400
    assert caught.value.response.json() == body


@pytest.mark.parametrize(
    "raw", [b"<html>Bad Gateway</html>", b"[1, 2, 3]", b""], ids=repr
)
def test_garbage_upstream_body_returns_502(
    gateway: RunningGateway, fake_upstream: FakeUpstream, raw: bytes
) -> None:
    fake_upstream.queue(
        "/chat/completions", Scripted(raw=raw, content_type="text/html")
    )

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=[USER])

    assert caught.value.status_code == 502
    assert error_of(caught.value.response)["code"] == "invalid_response"


@pytest.mark.parametrize(
    "body",
    [
        {"choices": "none"},
        {"choices": [1]},
        {"choices": [{"index": 0, "text": 5}]},
    ],
)
def test_base_mode_garbage_returns_502(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, body: dict[str, Any]
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE)
    fake_upstream.queue("/completions", Scripted(body=body))

    with pytest.raises(openai.APIStatusError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=[USER])

    assert caught.value.status_code == 502
    assert error_of(caught.value.response)["code"] == "invalid_response"


def test_client_disconnect_cancels_upstream(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue("/chat/completions", Scripted(delay=5.0))

    with pytest.raises(openai.APITimeoutError):
        gateway.client(timeout=0.3).chat.completions.create(
            model="fake-model", messages=[USER]
        )

    assert wait_until(lambda: fake_upstream.cancelled == 1, timeout=3)
    assert fake_upstream.in_flight == 0


def test_base_mode_garbage_stream_ends_with_error(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE)
    events = [sse({"id": "cmpl-1", "choices": "none"}), sse("[DONE]")]
    fake_upstream.queue("/completions", Scripted(events=events))

    stream = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)

    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "invalid_response"


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b'{"id": "chatcmpl-1", "choices": []}', "application/json"),
        (b"<html>", "text/html"),
    ],
)
def test_stream_without_events_returns_502(
    gateway: RunningGateway, fake_upstream: FakeUpstream, raw: bytes, content_type: str
) -> None:
    fake_upstream.queue(
        "/chat/completions", Scripted(raw=raw, content_type=content_type)
    )

    with pytest.raises(openai.APIStatusError) as caught:
        list(
            gateway.client().chat.completions.create(
                model="fake-model", messages=[USER], stream=True
            )
        )

    error = error_of(caught.value.response)
    assert caught.value.status_code == 502
    assert error["code"] == "invalid_response"
    assert content_type in error["message"]
