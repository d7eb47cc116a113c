"""Traffic sampling: what lands in the sample store, and what never does."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.sampling import DiskSampleStore, Sample, SampledChoice
from gateway.settings import InjectionMode
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    USAGE,
    FakeUpstream,
    Scripted,
    chat_body,
    chat_events,
    completion_body,
    completion_events,
    sse,
    wait_until,
)

SYSTEM = "Answer in one sentence."
EXAMPLES = [("What is 2 + 2?", "4.")]
USER = {"role": "user", "content": "Why is the sky blue?"}
STORED = "drpo_samples_stored_total"
DROPPED = "drpo_samples_dropped_total"


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    running = start_gateway(sample_rate=1.0)
    running.activate(SYSTEM, EXAMPLES)
    return running


def chat(
    gateway: RunningGateway, headers: dict[str, str] | None = None, **fields: Any
) -> httpx.Response:
    body = {"model": "fake-model", "messages": [USER], **fields}
    return httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=10
    )


def raw_stream(gateway: RunningGateway, path: str, body: dict[str, Any]) -> bytes:
    with httpx.stream(
        "POST", gateway.url + path, json={**body, "stream": True}, timeout=10
    ) as response:
        assert response.status_code == 200
        return response.read()


def sample_store(gateway: RunningGateway) -> Any:
    return gateway.app.state.gateway.parts.sampler.store


def make_sample(client: str = "client-a", text: str = "hi", **fields: Any) -> Sample:
    values: dict[str, Any] = {
        "time": datetime.now(UTC),
        "route": "chat_completions",
        "client": client,
        "prompt_version": "v1",
        "messages": [{"role": "user", "content": text}],
        "choices": [SampledChoice(text="answer", finish_reason="stop")],
        "latency_seconds": 0.01,
        "status": 200,
        "outcome": "ok",
        "redacted": True,
        **fields,
    }
    return Sample(**values)


def test_chat_request_stored_with_fields(gateway: RunningGateway) -> None:
    started = datetime.now(UTC)
    response = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], max_tokens=50
    )

    [sample] = gateway.stored_samples(1)

    assert response.choices[0].message.content == "Hello world"
    assert sample.route == "chat_completions"
    assert sample.messages == [USER]
    assert sample.prompt is None
    assert sample.answer == "Hello world"
    assert sample.model == "fake-model"
    assert sample.prompt_version == "v2"
    assert sample.usage == USAGE
    assert sample.status == 200
    assert sample.finish_reason == "stop"
    assert sample.outcome == "ok"
    assert sample.complete
    assert not sample.stream
    assert sample.redacted
    assert 0 < sample.latency_seconds < 10
    assert started - timedelta(seconds=1) <= sample.time <= datetime.now(UTC)


def test_chat_stream_stored_as_received(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering", " of light."])
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    stream = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], stream=True
    )
    received = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    [sample] = gateway.stored_samples(1)

    assert sample.answer == received
    assert sample.answer == "Rayleigh scattering of light."
    assert sample.stream
    assert sample.messages == [USER]
    assert sample.usage == USAGE
    assert sample.finish_reason == "stop"
    assert sample.outcome == "ok"


def test_tool_calls_stored_from_body(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    body = chat_body("")
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    fake_upstream.queue("/chat/completions", Scripted(body=body))

    chat(gateway)
    [sample] = gateway.stored_samples(1)

    assert sample.choices[0].tool_calls == [call]
    assert sample.answer == ""
    assert sample.finish_reason == "tool_calls"


def test_tool_calls_assembled_from_stream(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    fragments = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Oslo"}'}},
    ]
    events = [
        sse({**base, "choices": [{"index": 0, "delta": {"tool_calls": [fragment]}}]})
        for fragment in fragments
    ]
    events.append(
        sse(
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
            }
        )
    )
    events.append(sse("[DONE]"))
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    raw_stream(gateway, "/v1/chat/completions", {"model": "m", "messages": [USER]})
    [sample] = gateway.stored_samples(1)

    assert sample.choices[0].tool_calls == [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "f", "arguments": '{"city": "Oslo"}'},
        }
    ]
    assert sample.finish_reason == "tool_calls"


def test_base_mode_requests_stored(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE, sample_rate=1.0)
    fake_upstream.queue(
        "/completions",
        Scripted(body=completion_body("Blue light scatters.\n<END>\n# Query:\nx")),
        Scripted(events=completion_events(["Short", " waves.", "\n<END>"])),
    )
    client = gateway.client()

    client.chat.completions.create(model="fake-model", messages=[USER])
    stream = client.chat.completions.create(
        model="fake-model", messages=[USER], stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    plain, streaming = gateway.stored_samples(2)

    assert plain.answer == "Blue light scatters."
    assert plain.messages == [USER]
    assert not plain.stream
    assert plain.outcome == "ok"
    assert streaming.answer == streamed
    assert streaming.answer == "Short waves."
    assert streaming.stream
    assert streaming.messages == [USER]
    assert streaming.finish_reason == "stop"


def test_completions_stored_with_prompt(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue(
        "/completions",
        Scripted(body=completion_body("upon a time")),
        Scripted(events=completion_events(["there", " was"], finish_reason="length")),
    )
    client = gateway.client()

    client.completions.create(model="fake-model", prompt="Once")
    stream = client.completions.create(model="fake-model", prompt="Once", stream=True)
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    plain, streaming = gateway.stored_samples(2)

    assert plain.route == "completions"
    assert plain.prompt == "Once"
    assert plain.messages is None
    assert plain.answer == "upon a time"
    assert plain.prompt_version == "none"
    assert plain.outcome == "ok"
    assert streaming.answer == streamed
    assert streaming.answer == "there was"
    assert streaming.outcome == "truncated"


def test_truncated_answer_marked_truncated(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    body = chat_body("Rayleigh scat")
    body["choices"][0]["finish_reason"] = "length"
    fake_upstream.queue("/chat/completions", Scripted(body=body))

    chat(gateway, max_tokens=3)
    [sample] = gateway.stored_samples(1)

    assert sample.outcome == "truncated"
    assert not sample.complete
    assert sample.finish_reason == "length"


def test_midstream_failure_marked_failed(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering", " of", " light."])
    fake_upstream.queue("/chat/completions", Scripted(events=events, drop_after=2))

    received = raw_stream(
        gateway, "/v1/chat/completions", {"model": "m", "messages": [USER]}
    )
    [sample] = gateway.stored_samples(1)

    assert b"stream_interrupted" in received
    assert sample.outcome == "failed"
    assert not sample.complete
    assert sample.status == 502
    assert sample.answer == "Rayleigh"


def test_error_event_marked_failed(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh"], usage=False)[:2]
    events += [sse({"error": {"message": "out of memory"}}), sse("[DONE]")]
    fake_upstream.queue("/chat/completions", Scripted(events=events))

    raw_stream(gateway, "/v1/chat/completions", {"model": "m", "messages": [USER]})
    [sample] = gateway.stored_samples(1)

    assert sample.outcome == "failed"
    assert sample.status == 200


def test_upstream_error_marked_failed(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue(
        "/chat/completions",
        Scripted(status=500, body={"error": {"message": "engine crashed"}}),
    )

    response = chat(gateway)
    [sample] = gateway.stored_samples(1)

    assert response.status_code == sample.status
    assert sample.outcome == "failed"
    assert sample.choices == []


def test_client_disconnect_marked_disconnected(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["one", " two", " three", " four", " five"])
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.2))
    body = {"model": "m", "messages": [USER], "stream": True}

    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json=body, timeout=10
    ) as response:
        next(response.iter_bytes())
    [sample] = gateway.stored_samples(1)

    assert sample.outcome == "disconnected"
    assert sample.status == 499
    assert not sample.complete


def test_sample_rate_zero_stores_nothing(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = start_gateway(sample_rate=0.0)

    response = chat(gateway)

    assert response.status_code == 200
    assert gateway.app.state.gateway.parts.sampler is None
    assert not (tmp_path / "data" / "samples").exists()


def test_seeded_rate_samples_same_requests(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(sample_rate=0.5, sample_seed=7)
    draws = random.Random(7)
    expected = [index for index in range(12) if draws.random() < 0.5]

    for index in range(12):
        chat(gateway, messages=[{"role": "user", "content": f"question {index}"}])
    samples = gateway.stored_samples(len(expected))

    contents = [sample.messages[0]["content"] for sample in samples if sample.messages]
    assert contents == [f"question {index}" for index in expected]


def test_opted_out_request_not_stored(gateway: RunningGateway) -> None:
    private = [{"role": "user", "content": "private"}]
    chat(gateway, headers={"X-DRPO-Sample": "OFF"}, messages=private)
    chat(gateway, headers={"x-drpo-sample": "Off"}, messages=private)
    chat(gateway, messages=[{"role": "user", "content": "public"}])

    [sample] = gateway.stored_samples(1)

    assert sample.messages == [{"role": "user", "content": "public"}]
    assert sample_store(gateway).count() == 1
    assert gateway.metric(DROPPED, reason="opted_out") == 2


def test_headers_never_stored(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    key = "client-key-Zq81"
    gateway = start_gateway(sample_rate=1.0, sample_redaction=False, api_keys=[key])
    gateway.activate(SYSTEM)
    headers = {
        "Authorization": f"Bearer {key}",
        "x-drpo-prompt": "v1",
        "x-trace-marker": "trace-value-77",
    }

    response = chat(gateway, headers=headers)
    [sample] = gateway.stored_samples(1)
    raw = b"".join(
        path.read_bytes()
        for path in (tmp_path / "data" / "samples").rglob("*")
        if path.is_file()
    )

    assert response.status_code == 200
    assert sample.prompt_version == "v1"
    assert sample.client == hashlib.sha256(f"key:{key}".encode()).hexdigest()[:16]
    assert key.encode() not in raw
    assert b"trace-value-77" not in raw
    assert b"x-drpo-prompt" not in raw.lower()
    assert b"authorization" not in raw.lower()
    assert b"Why is the sky blue?" in raw


def test_client_cap_limits_one_client(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(sample_rate=1.0, sample_client_cap=2)

    for _ in range(4):
        chat(gateway, headers={"Authorization": "Bearer key-a"})
    chat(gateway, headers={"Authorization": "Bearer key-b"})
    gateway.wait_for_metric(STORED, 3)
    gateway.wait_for_metric(DROPPED, 2, reason="client_cap")
    store = sample_store(gateway)
    clients = [sample.client for sample in store.recent(10)]

    assert store.count() == 3
    assert store.count_for(clients[0]) == 2
    assert store.count_for(clients[-1]) == 1
    assert clients[0] != clients[-1]


def test_keyless_client_identified_by_ip(gateway: RunningGateway) -> None:
    chat(gateway)
    [sample] = gateway.stored_samples(1)

    assert sample.client == hashlib.sha256(b"ip:127.0.0.1").hexdigest()[:16]


def test_store_bound_evicts_oldest(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(sample_rate=1.0, sample_max_count=3)

    for index in range(5):
        chat(gateway, messages=[{"role": "user", "content": f"question {index}"}])
    gateway.wait_for_metric(STORED, 5)
    store = sample_store(gateway)
    samples = store.recent(10)

    assert store.count() == 3
    assert [s.messages[0]["content"] for s in samples if s.messages] == [
        "question 2",
        "question 3",
        "question 4",
    ]
    assert store.count_for(samples[0].client) == 3


class RaisingStore:
    def __init__(self) -> None:
        self.calls = 0

    def add(self, sample: Sample) -> None:
        self.calls += 1
        raise OSError("disk full")

    def recent(self, limit: int, since: datetime | None = None) -> list[Sample]:
        return []

    def count(self) -> int:
        return 0

    def count_for(self, client: str) -> int:
        return 0

    def close(self) -> None:
        pass


def test_store_error_keeps_requests_ok(gateway: RunningGateway) -> None:
    sampler = gateway.app.state.gateway.parts.sampler
    sampler.store.close()
    sampler.store = RaisingStore()

    statuses = [chat(gateway).status_code for _ in range(3)]
    gateway.wait_for_metric(DROPPED, 3, reason="store_error")

    assert statuses == [200, 200, 200]
    assert sampler.store.calls == 3
    assert gateway.metric(STORED) == 0


class BlockingStore(RaisingStore):
    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.added: list[Sample] = []

    def add(self, sample: Sample) -> None:
        self.release.wait(10)
        self.added.append(sample)


def test_full_queue_drops_sample(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(sample_rate=1.0, sample_queue_size=1)
    sampler = gateway.app.state.gateway.parts.sampler
    sampler.store.close()
    blocking = BlockingStore()
    sampler.store = blocking

    started = time.monotonic()
    statuses = [chat(gateway).status_code for _ in range(4)]
    elapsed = time.monotonic() - started
    blocking.release.set()
    gateway.wait_for_metric(DROPPED, 2, reason="queue_full")

    assert statuses == [200, 200, 200, 200]
    assert elapsed < 5
    assert wait_until(lambda: len(blocking.added) == 2)
    assert gateway.metric(DROPPED, reason="queue_full") == 2


def test_recent_returns_newest_last(tmp_path: Path) -> None:
    store = DiskSampleStore(tmp_path / "samples", max_count=10)
    for index in range(4):
        store.add(make_sample(text=f"q{index}"))

    texts = [s.messages[0]["content"] for s in store.recent(2) if s.messages]

    assert texts == ["q2", "q3"]
    store.close()


def test_recent_since_skips_older_samples(tmp_path: Path) -> None:
    store = DiskSampleStore(tmp_path / "samples")
    now = datetime.now(UTC)
    store.add(make_sample(text="old", time=now - timedelta(hours=2)))
    store.add(make_sample(text="new", time=now))

    recent = store.recent(10, since=now - timedelta(hours=1))
    naive = store.recent(10, since=(now - timedelta(hours=1)).replace(tzinfo=None))

    assert [s.messages[0]["content"] for s in recent if s.messages] == ["new"]
    assert naive == recent
    store.close()


def test_eviction_updates_client_counts(tmp_path: Path) -> None:
    store = DiskSampleStore(tmp_path / "samples", max_count=2)
    store.add(make_sample(client="a"))
    store.add(make_sample(client="b"))
    store.add(make_sample(client="b"))

    assert store.count() == 2
    assert store.count_for("a") == 0
    assert store.count_for("b") == 2
    store.close()


def test_store_shared_by_two_instances(tmp_path: Path) -> None:
    writer = DiskSampleStore(tmp_path / "samples")
    reader = DiskSampleStore(tmp_path / "samples")
    writer.add(make_sample(text="shared"))

    [sample] = reader.recent(1)

    assert sample.messages == [{"role": "user", "content": "shared"}]
    writer.close()
    reader.close()


def test_stored_json_carries_complete_flag() -> None:
    sample = make_sample(outcome="truncated")

    dumped = sample.model_dump()

    assert dumped["complete"] is False
    assert Sample.model_validate_json(sample.model_dump_json()) == sample
