"""The legacy /v1/completions route: passed through, or wrapped when configured."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    USAGE,
    FakeUpstream,
    Scripted,
    completion_body,
    completion_events,
)

SYSTEM = "Answer in one sentence."
EXAMPLES = [("What is 2 + 2?", "4.")]
WRAPPED_PROMPT = (
    "# Instructions\n\nAnswer in one sentence.\n\n"
    "# Query:\nWhat is 2 + 2?\n\n# Answer:\n<START>\n4.\n<END>\n\n"
    "# Query:\nTell me a story.\n\n# Answer:\n<START>\n"
)
RUN_ON = "Once upon a time.\n<END>\n\n# Query:\nAnother one?"


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


@pytest.fixture
def wrapping(start_gateway: GatewayFactory) -> RunningGateway:
    running = start_gateway(wrap_completions=True)
    running.activate(SYSTEM, EXAMPLES)
    return running


def prompt_sent(fake: FakeUpstream) -> Any:
    return fake.requests_to("/completions")[-1].json["prompt"]


@pytest.mark.parametrize(
    "prompt",
    ["Once upon a time", ["first prompt", "second prompt"], [101, 202, 303]],
    ids=["text", "list", "tokens"],
)
def test_prompt_passed_through_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream, prompt: Any
) -> None:
    body = completion_body(RUN_ON)
    fake_upstream.queue("/completions", Scripted(body=body))

    raw = gateway.client().completions.with_raw_response.create(
        model="fake-model", prompt=prompt, stop=["\n\n"]
    )

    sent = fake_upstream.requests_to("/completions")[-1].json
    assert sent["prompt"] == prompt
    assert sent["stop"] == ["\n\n"]
    assert raw.http_response.json() == body
    assert "x-drpo-prompt-version" not in raw.headers


def test_stream_passed_through_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = completion_events(["Once", " upon", "\n<END>\n# Query:"])
    fake_upstream.queue("/completions", Scripted(events=events))
    body = {"model": "fake-model", "prompt": "Once upon a time", "stream": True}

    with httpx.stream(
        "POST", gateway.url + "/v1/completions", json=body, timeout=10
    ) as response:
        received = response.read()

    sent = fake_upstream.requests_to("/completions")[-1].json
    expected = b"".join(event for event in events if b'"usage"' not in event)
    assert sent["prompt"] == "Once upon a time"
    assert sent["stream_options"] == {"include_usage": True}
    assert received == expected


def test_stream_usage_forwarded_when_requested(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    chunks = list(
        gateway.client().completions.create(
            model="fake-model",
            prompt="Once upon a time",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert len(usage) == 1
    assert usage[0].model_dump(exclude_none=True) == USAGE


def test_wrapped_prompt_and_trimmed_output(
    wrapping: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue("/completions", Scripted(body=completion_body(RUN_ON)))

    raw = wrapping.client().completions.with_raw_response.create(
        model="fake-model", prompt="Tell me a story.", stop=["THE END"]
    )

    sent = fake_upstream.requests_to("/completions")[-1].json
    choice = raw.parse().choices[0]
    assert sent["prompt"] == WRAPPED_PROMPT
    assert sent["stop"][0] == "<END>"
    assert "THE END" in sent["stop"]
    assert choice.text == "Once upon a time."
    assert choice.finish_reason == "stop"
    assert raw.headers["x-drpo-prompt-version"] == "v2"


@pytest.mark.parametrize(
    "pieces",
    [
        ["Once upon", " a time.", "\n<E", "ND>\n\n# Query:\nAnother?"],
        ["  Once upon a time.", "\nQuer", "y: more", " text"],
    ],
)
def test_wrapped_stream_trimmed(
    wrapping: RunningGateway, fake_upstream: FakeUpstream, pieces: list[str]
) -> None:
    events = completion_events(pieces, finish_reason="length")
    fake_upstream.queue("/completions", Scripted(events=events, event_delay=0.005))

    chunks = list(
        wrapping.client().completions.create(
            model="fake-model", prompt="Tell me a story.", stream=True
        )
    )

    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert prompt_sent(fake_upstream) == WRAPPED_PROMPT
    assert text == "Once upon a time."
    assert finish_reasons[-1] == "stop"


def test_wrapped_stream_forwards_upstream_usage(
    wrapping: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = completion_events(["Once upon", " a time."])
    fake_upstream.queue("/completions", Scripted(events=events, event_delay=0.01))

    chunks = list(
        wrapping.client().completions.create(
            model="fake-model",
            prompt="Tell me a story.",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    wrapping.wait_for_requests(1)
    assert len(usage) == 1
    assert usage[0].model_dump(exclude_none=True) == USAGE
    assert wrapping.metric("drpo_completion_tokens_total", model="fake-model") == 2


def test_wrapped_prompt_off_passes_through(
    wrapping: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    raw = wrapping.client().completions.with_raw_response.create(
        model="fake-model",
        prompt="Tell me a story.",
        extra_headers={"x-drpo-prompt": "off"},
    )

    assert prompt_sent(fake_upstream) == "Tell me a story."
    assert raw.headers["x-drpo-prompt-version"] == "off"


def test_wrapped_prompt_list_rejected(
    wrapping: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        wrapping.client().completions.create(model="fake-model", prompt=["one", "two"])

    assert caught.value.response.json()["error"]["param"] == "prompt"
    assert fake_upstream.requests_to("/completions") == []


def test_missing_prompt_returns_400(gateway: RunningGateway) -> None:
    response = httpx.post(
        gateway.url + "/v1/completions", json={"model": "fake-model"}, timeout=10
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
