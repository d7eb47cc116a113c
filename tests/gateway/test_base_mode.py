"""Chat completions served by a base model through the upstream's /v1/completions."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from gateway.settings import InjectionMode
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    USAGE,
    FakeUpstream,
    Scripted,
    completion_body,
    completion_events,
    sse,
)

SYSTEM = "Answer in one sentence."
EXAMPLES = [("What is 2 + 2?", "4."), ("Name a primary colour.", "Red.")]
PREFIX = (
    "# Instructions\n\nAnswer in one sentence.\n\n"
    "# Query:\nWhat is 2 + 2?\n\n# Answer:\n<START>\n4.\n<END>\n\n"
    "# Query:\nName a primary colour.\n\n# Answer:\n<START>\nRed.\n<END>\n\n"
)
USER = {"role": "user", "content": "Why is the sky blue?"}

# Upstream texts that run on past the answer, and the answer the client gets.
RUN_ON_TEXTS = [
    ("Blue light scatters most.\n<END>\n\n# Query:\nWhy is grass green?", True),
    ("Blue light scatters most.\n\n# Query:\nWhy is grass green?", True),
    ("Blue light scatters most.<END>", True),
    ("Blue light scatters most.\nQuery: Why is grass green?", True),
    ("Blue light scatters most.", False),
]
ANSWER = "Blue light scatters most."


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    running = start_gateway(default_mode=InjectionMode.BASE)
    running.activate(SYSTEM, EXAMPLES)
    return running


def completion_sent(fake: FakeUpstream) -> dict[str, Any]:
    body: dict[str, Any] = fake.requests_to("/completions")[-1].json
    return body


def stream_text(chunks: list[Any]) -> str:
    return "".join(
        choice.delta.content or "" for chunk in chunks for choice in chunk.choices
    )


def test_prompt_renders_instruction_and_query(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    gateway.client().chat.completions.create(model="fake-model", messages=[USER])

    sent = completion_sent(fake_upstream)
    expected = PREFIX + "# Query:\nWhy is the sky blue?\n\n# Answer:\n<START>\n"
    assert fake_upstream.requests_to("/chat/completions") == []
    assert sent["prompt"] == expected
    assert sent["prompt"].endswith("<START>\n")
    assert "messages" not in sent


def test_stop_strings_start_with_end_marker(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], stop=["STOP"]
    )

    stop = completion_sent(fake_upstream)["stop"]
    assert stop[0] == "<END>"
    assert "\n# Query:" in stop
    assert "\n# Answer:" in stop
    assert "STOP" in stop


def test_max_tokens_maps_to_completion_field(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], max_completion_tokens=40
    )

    assert completion_sent(fake_upstream)["max_tokens"] == 40


def test_response_is_plain_chat_completion(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue("/completions", Scripted(body=completion_body(ANSWER)))

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER]
    )

    response = raw.parse()
    assert response.object == "chat.completion"
    assert response.id.startswith("chatcmpl-")
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == ANSWER
    assert response.choices[0].finish_reason == "stop"
    assert raw.headers["x-drpo-prompt-version"] == "v2"


@pytest.mark.parametrize(("text", "cut"), RUN_ON_TEXTS)
def test_run_on_answer_cut_cleanly(
    gateway: RunningGateway, fake_upstream: FakeUpstream, text: str, cut: bool
) -> None:
    body = completion_body(text, finish_reason="length" if cut else "stop")
    fake_upstream.queue("/completions", Scripted(body=body))

    response = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER]
    )

    assert response.choices[0].message.content == ANSWER
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "pieces",
    [
        ["Blue light", " scatters most.", "\n<E", "ND>\n\n# Query:\nWhy?"],
        ["Blue light scatters most.\n", "\n#", " Que", "ry:", "\nWhy?"],
        ["  Blue light scatters", " most.\nQu", "ery: Why?", " More text."],
        ["Blue", " light", " scatters", " most.", "<", "END", ">"],
    ],
)
def test_stream_cuts_run_on_at_chunk_boundaries(
    gateway: RunningGateway, fake_upstream: FakeUpstream, pieces: list[str]
) -> None:
    events = completion_events(pieces, finish_reason="length")
    fake_upstream.queue("/completions", Scripted(events=events, event_delay=0.005))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True
        )
    )

    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert stream_text(chunks) == ANSWER
    assert finish_reasons[-1] == "stop"
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)


def test_stream_survives_split_sse_bytes(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    stream = b"".join(
        completion_events(["Blue light", " scatters", " most.", "\n<END>"])
    )
    fragments = [stream[start : start + 7] for start in range(0, len(stream), 7)]
    fake_upstream.queue("/completions", Scripted(events=fragments, event_delay=0.001))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True
        )
    )

    assert stream_text(chunks) == ANSWER


def test_stream_starts_with_assistant_role(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True
        )
    )

    assert chunks[0].choices[0].delta.role == "assistant"
    assert stream_text(chunks) == "Hello world"


def test_multi_turn_renders_every_turn(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    messages = [
        {"role": "user", "content": "Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "And at sunset?"},
    ]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)

    expected = PREFIX + (
        "# Query:\nWhy is the sky blue?\n\n"
        "# Answer:\n<START>\nRayleigh scattering.\n<END>\n\n"
        "# Query:\nAnd at sunset?\n\n# Answer:\n<START>\n"
    )
    assert completion_sent(fake_upstream)["prompt"] == expected


def test_client_system_message_joins_instructions(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    messages = [{"role": "system", "content": "Reply in French."}, USER]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)

    prompt = completion_sent(fake_upstream)["prompt"]
    assert prompt.startswith(
        "# Instructions\n\nAnswer in one sentence.\n\nReply in French.\n\n# Query:"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_tools_rejected_naming_param(
    gateway: RunningGateway, fake_upstream: FakeUpstream, stream: bool
) -> None:
    tools: Any = [
        {"type": "function", "function": {"name": "lookup", "parameters": {}}}
    ]

    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], tools=tools, stream=stream
        )

    error = caught.value.response.json()["error"]
    assert error["param"] == "tools"
    assert error["type"] == "invalid_request_error"
    assert fake_upstream.requests_to("/completions") == []


def test_tool_message_rejected_naming_param(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    messages = [USER, {"role": "tool", "tool_call_id": "c1", "content": "42"}]

    with pytest.raises(openai.BadRequestError) as caught:
        gateway.client().chat.completions.create(model="fake-model", messages=messages)

    assert caught.value.response.json()["error"]["param"] == "messages[1].role"


def test_usage_passed_through(gateway: RunningGateway) -> None:
    response = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER]
    )

    assert response.usage is not None
    assert response.usage.model_dump(exclude_none=True) == USAGE


def test_stream_usage_from_upstream(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = completion_events(["Blue light", " scatters most."])
    fake_upstream.queue("/completions", Scripted(events=events, event_delay=0.01))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model",
            messages=[USER],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage_chunks = [chunk for chunk in chunks if chunk.usage is not None]
    assert completion_sent(fake_upstream)["stream_options"] == {"include_usage": True}
    assert len(usage_chunks) == 1
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.model_dump(exclude_none=True) == USAGE


def test_stream_usage_counted_after_early_cut(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    # "Query:" at a line start is no stop string, so the upstream keeps
    # generating and the gateway closes the stream before any usage arrives.
    pieces = ["Blue", " light", "\nQuery", ":", " more", " text"]
    events = completion_events(pieces, finish_reason="length")
    fake_upstream.queue("/completions", Scripted(events=events, event_delay=0.01))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model",
            messages=[USER],
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
    assert stream_text(chunks) == "Blue light"
    assert len(usage) == 1
    assert usage[0].completion_tokens == 4
    assert usage[0].prompt_tokens > 0


def test_stream_usage_hidden_unless_requested(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model", messages=[USER], stream=True
        )
    )

    assert completion_sent(fake_upstream)["stream_options"] == {"include_usage": True}
    assert [chunk for chunk in chunks if chunk.usage is not None] == []


def logprob_entry(token: str, value: float, top: dict[str, float]) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": value,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": name, "logprob": number, "bytes": list(name.encode())}
            for name, number in top.items()
        ],
    }


def test_logprobs_converted_to_chat_shape(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    body = completion_body("Blue sky.\nQuery: next")
    body["choices"][0]["logprobs"] = {
        "tokens": ["Blue", " sky", ".", "\nQuery", ":", " next"],
        "token_logprobs": [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6],
        "top_logprobs": [
            {"Blue": -0.1, "Red": -2.5},
            {" sky": -0.2, " sea": -1.5},
            {".": -0.3, "!": -3.0},
            {"\nQuery": -0.4},
            {":": -0.5},
            {" next": -0.6},
        ],
        "text_offset": [900, 904, 908, 909, 915, 916],
    }
    fake_upstream.queue("/completions", Scripted(body=body))

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER], logprobs=True, top_logprobs=1
    )

    choice = raw.http_response.json()["choices"][0]
    assert completion_sent(fake_upstream)["logprobs"] == 1
    assert "top_logprobs" not in completion_sent(fake_upstream)
    assert choice["message"]["content"] == "Blue sky."
    assert choice["logprobs"] == {
        "content": [
            logprob_entry("Blue", -0.1, {"Blue": -0.1}),
            logprob_entry(" sky", -0.2, {" sky": -0.2}),
            logprob_entry(".", -0.3, {".": -0.3}),
        ]
    }


def test_stream_logprobs_converted_to_chat_shape(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = completion_events(["Blue", " sky"])
    for position, (token, value) in enumerate([("Blue", -0.1), (" sky", -0.2)]):
        choice = {
            "index": 0,
            "text": token,
            "logprobs": {
                "tokens": [token],
                "token_logprobs": [value],
                "top_logprobs": [{token: value, "Red": -4.0}],
            },
            "finish_reason": None,
        }
        events[position] = sse({"id": "cmpl-fake", "choices": [choice]})
    fake_upstream.queue("/completions", Scripted(events=events))

    chunks = list(
        gateway.client().chat.completions.create(
            model="fake-model",
            messages=[USER],
            stream=True,
            logprobs=True,
            top_logprobs=1,
        )
    )

    tokens = [
        entry.model_dump()
        for chunk in chunks
        for choice in chunk.choices
        if choice.logprobs is not None and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    assert tokens == [
        logprob_entry("Blue", -0.1, {"Blue": -0.1}),
        logprob_entry(" sky", -0.2, {" sky": -0.2}),
    ]
