"""Activating a new prompt version while requests are in flight."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from gateway.prompting import load_default_instruction
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    FakeUpstream,
    Scripted,
    chat_body,
    chat_events,
    wait_until,
)

USER = {"role": "user", "content": "Why is the sky blue?"}
NEW_SYSTEM = "Answer like a pirate."


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


def ask(gateway: RunningGateway) -> Any:
    return gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER]
    )


def swap_and_wait(gateway: RunningGateway) -> list[str]:
    """Activate a new version and poll until a request uses it, within 1 s.

    Returns the version header of every polling request.
    """
    version = gateway.store.create(NEW_SYSTEM, [])
    gateway.store.activate(version.version)
    activated_at = time.monotonic()
    seen: list[str] = []
    while version.version not in seen:
        assert time.monotonic() - activated_at < 1.0, "new version not served in 1 s"
        seen.append(ask(gateway).headers["x-drpo-prompt-version"])
    return seen


def system_text(request_body: dict[str, Any]) -> str:
    content: str = request_body["messages"][0]["content"]
    return content


def test_new_requests_use_new_version(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    assert ask(gateway).headers["x-drpo-prompt-version"] == "v1"

    seen = swap_and_wait(gateway)

    last = fake_upstream.requests_to("/chat/completions")[-1].json
    assert set(seen) <= {"v1", "v2"}
    assert system_text(last) == NEW_SYSTEM


def test_in_flight_requests_finish_on_old_version(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    slow_reply = Scripted(body=chat_body("Hello world"), delay=1.5)
    fake_upstream.queue("/chat/completions", *[slow_reply] * 3)
    with ThreadPoolExecutor(max_workers=3) as pool:
        slow = [pool.submit(ask, gateway) for _ in range(3)]
        assert wait_until(lambda: fake_upstream.in_flight == 3)

        swap_and_wait(gateway)
        still_running = [not future.done() for future in slow]
        replies = [future.result(timeout=10) for future in slow]

    builtin = load_default_instruction().system_prompt.strip()
    slow_bodies = [
        item.json for item in fake_upstream.requests_to("/chat/completions")[:3]
    ]
    assert all(still_running)
    assert [reply.headers["x-drpo-prompt-version"] for reply in replies] == ["v1"] * 3
    assert [system_text(body) for body in slow_bodies] == [builtin] * 3
    assert all(
        reply.parse().choices[0].message.content == "Hello world" for reply in replies
    )


def test_stream_started_before_swap_finishes_on_old(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    pieces = ["Arr", " the", " sky", " be", " blue."]
    events = chat_events(pieces)
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.15))
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER], stream=True
    )
    chunks = iter(raw.parse())
    first = next(chunks)

    swap_and_wait(gateway)
    completed_at_swap = fake_upstream.completed_streams
    rest = list(chunks)

    text = "".join(
        c.choices[0].delta.content or "" for c in [first, *rest] if c.choices
    )
    builtin = load_default_instruction().system_prompt.strip()
    stream_body = fake_upstream.requests_to("/chat/completions")[0].json
    assert completed_at_swap == 0
    assert raw.headers["x-drpo-prompt-version"] == "v1"
    assert system_text(stream_body) == builtin
    assert text == "".join(pieces)


def test_metrics_split_requests_by_version(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    ask(gateway)

    seen = ["v1", *swap_and_wait(gateway)]

    for version in ("v1", "v2"):
        count = gateway.metric("drpo_requests_total", prompt_version=version)
        assert count == seen.count(version), version
