"""Streamed chat completions in chat mode: events relayed as the upstream sends them."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    USAGE,
    FakeUpstream,
    Scripted,
    chat_events,
    sse,
    wait_until,
)

USER = {"role": "user", "content": "Why is the sky blue?"}
CHUNK_BASE = {
    "id": "chatcmpl-fake",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "fake-model",
}


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


def raw_stream(gateway: RunningGateway, **fields: Any) -> bytes:
    body = {"model": "fake-model", "messages": [USER], "stream": True, **fields}
    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, timeout=10
    ) as response:
        assert response.status_code == 200
        return response.read()


def is_usage_event(event: bytes) -> bool:
    data = event.removeprefix(b"data: ").strip()
    if data == b"[DONE]":
        return False
    return "usage" in json.loads(data)


def test_chunks_forwarded_byte_for_byte(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering", " of", " light."])
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    received = raw_stream(gateway)

    expected = b"".join(event for event in events if not is_usage_event(event))
    assert received == expected


def test_chunks_forwarded_with_usage_when_requested(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering."])
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    received = raw_stream(gateway, stream_options={"include_usage": True})

    assert received == b"".join(events)


def test_split_upstream_bytes_rejoined_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    stream = b"".join(chat_events(["Rayleigh", " scattering."], usage=False))
    fragments = [stream[start : start + 5] for start in range(0, len(stream), 5)]
    fake_upstream.queue(
        "/chat/completions", Scripted(events=fragments, event_delay=0.001)
    )

    assert raw_stream(gateway) == stream


def test_stream_response_headers(gateway: RunningGateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER], stream=True
    )

    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.headers["x-drpo-prompt-version"] == "v1"


def delta_event(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return sse({**CHUNK_BASE, "choices": [choice]})


def test_tool_call_deltas_survive(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    first = {
        "index": 0,
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    pieces = ['{"city"', ': "Os', 'lo"}']
    events = [
        delta_event({"role": "assistant", "tool_calls": [first]}),
        *(
            delta_event(
                {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            )
            for piece in pieces
        ),
        delta_event({}, finish_reason="tool_calls"),
        sse("[DONE]"),
    ]
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True
        )
    )

    calls = [
        call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []
    ]
    arguments = "".join(call.function.arguments or "" for call in calls)
    assert calls[0].id == "call_abc"
    assert calls[0].function.name == "get_weather"
    assert arguments == '{"city": "Oslo"}'
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_usage_chunk_forwarded_when_requested(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model",
            messages=[USER],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usage) == 1
    assert usage[0].model_dump(exclude_none=True) == USAGE


@pytest.mark.parametrize("options", [None, {"include_usage": False}])
def test_usage_requested_upstream_but_not_forwarded(
    gateway: RunningGateway,
    fake_upstream: FakeUpstream,
    options: dict[str, bool] | None,
) -> None:
    extra = {} if options is None else {"stream_options": options}

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True, **extra
        )
    )

    sent = fake_upstream.requests_to("/chat/completions")[-1].json
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    gateway.wait_for_requests(1)
    assert sent["stream_options"] == {"include_usage": True}
    assert [chunk for chunk in chunks if chunk.usage is not None] == []
    assert text == "Hello world"
    assert gateway.metric("drpo_prompt_tokens_total", model="fake-model") == 11
    assert gateway.metric("drpo_completion_tokens_total", model="fake-model") == 2


def test_stream_not_buffered_whole(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["one", " two", " three", " four"])
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.2))
    body = {"model": "fake-model", "messages": [USER], "stream": True}

    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, timeout=10
    ) as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        first_received_at = time.monotonic()
        rest = b"".join(chunks)

    last_sent_at = fake_upstream.sent_at[-1]
    assert first.startswith(b"data: ")
    assert rest.endswith(b"data: [DONE]\n\n")
    assert last_sent_at - first_received_at > 0.6


def test_mid_stream_failure_raises_api_error(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering", " of", " light."])
    fake_upstream.queue("/chat/completions", Scripted(events=events, drop_after=2))
    received: list[str] = []

    stream = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    assert received == ["", "Rayleigh"]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "stream_interrupted"
    assert caught.value.body["type"] == "upstream_error"


def test_mid_stream_failure_ends_with_error_event(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering."])
    fake_upstream.queue("/chat/completions", Scripted(events=events, drop_after=2))

    received = raw_stream(gateway)

    last = received.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    error = json.loads(last.removeprefix(b"data: "))
    assert received.startswith(events[0] + events[1])
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert b"[DONE]" not in received


def test_client_disconnect_closes_upstream_stream(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    pieces = [f" word{number}" for number in range(50)]
    events = chat_events(pieces)
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.05))
    body = {"model": "fake-model", "messages": [USER], "stream": True}

    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, timeout=10
    ) as response:
        next(response.iter_bytes())

    assert wait_until(lambda: fake_upstream.cancelled == 1, timeout=3)
    assert fake_upstream.completed_streams == 0
    assert len(fake_upstream.sent_at) < len(events)
    assert wait_until(lambda: fake_upstream.in_flight == 0, timeout=3)


def test_stalled_stream_ends_with_error(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(upstream_read_timeout=0.3)
    events = chat_events(["Rayleigh", " scattering."])
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.6))

    stream = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)

    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "stream_interrupted"
    assert "timed out" in caught.value.body["message"]
