"""Chat completions in chat mode: what the upstream receives and the client gets."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from gateway.prompting import load_default_instruction
from gateway.settings import SystemMessagePolicy
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import FakeUpstream, Scripted, chat_body

SYSTEM = "Answer in one sentence."
EXAMPLES = [("What is 2 + 2?", "4."), ("Name a primary colour.", "Red.")]
INJECTED = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
]
USER = {"role": "user", "content": "Why is the sky blue?"}


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    running = start_gateway()
    running.activate(SYSTEM, EXAMPLES)
    return running


def sent_messages(fake: FakeUpstream) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = fake.requests_to("/chat/completions")[-1].json[
        "messages"
    ]
    return messages


def system_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["role"] in ("system", "developer")]


def test_injection_arrives_once_in_order(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    gateway.client().chat.completions.create(model="fake-model", messages=[USER])

    assert sent_messages(fake_upstream) == [*INJECTED, USER]


def test_response_carries_upstream_answer(gateway: RunningGateway) -> None:
    response = gateway.client().chat.completions.create(
        model="fake-model", messages=[USER]
    )

    assert response.choices[0].message.content == "Hello world"


@pytest.mark.parametrize("role", ["system", "developer"])
def test_client_system_message_appended_by_default(
    gateway: RunningGateway, fake_upstream: FakeUpstream, role: str
) -> None:
    messages = [{"role": role, "content": "Reply in French."}, USER]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)

    sent = sent_messages(fake_upstream)
    assert system_messages(sent) == [
        {"role": "system", "content": f"{SYSTEM}\n\nReply in French."}
    ]
    assert sent[0]["role"] == "system"
    assert sent[1:] == [*INJECTED[1:], USER]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (SystemMessagePolicy.APPEND, f"{SYSTEM}\n\nReply in French."),
        (SystemMessagePolicy.PREPEND, f"Reply in French.\n\n{SYSTEM}"),
        (SystemMessagePolicy.REPLACE, "Reply in French."),
        (SystemMessagePolicy.DROP, SYSTEM),
    ],
)
def test_system_message_policy_merges_as_configured(
    start_gateway: GatewayFactory,
    fake_upstream: FakeUpstream,
    policy: SystemMessagePolicy,
    expected: str,
) -> None:
    gateway = start_gateway(system_message_policy=policy)
    gateway.activate(SYSTEM, EXAMPLES)
    messages = [{"role": "system", "content": "Reply in French."}, USER]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)

    sent = sent_messages(fake_upstream)
    assert system_messages(sent) == [{"role": "system", "content": expected}]
    assert sent[1:] == [*INJECTED[1:], USER]


def test_content_parts_reach_upstream(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    user_parts = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0"}},
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": user_parts},
    ]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)

    sent = sent_messages(fake_upstream)
    assert sent[0] == {"role": "system", "content": f"{SYSTEM}\n\nBe kind."}
    assert sent[-1] == {"role": "user", "content": user_parts}


def test_tool_messages_pass_through_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    conversation = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 C, rain"},
    ]

    gateway.client().chat.completions.create(model="fake-model", messages=conversation)

    assert sent_messages(fake_upstream) == [*INJECTED, *conversation]


def test_injected_conversation_not_duplicated(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    client = gateway.client()
    client.chat.completions.create(model="fake-model", messages=[USER])
    follow_up = [
        *sent_messages(fake_upstream),
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "And at sunset?"},
    ]

    client.chat.completions.create(model="fake-model", messages=follow_up)

    assert sent_messages(fake_upstream) == [
        *INJECTED,
        USER,
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "And at sunset?"},
    ]


def test_merged_system_message_not_duplicated(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    client = gateway.client()
    messages = [{"role": "system", "content": "Reply in French."}, USER]
    client.chat.completions.create(model="fake-model", messages=messages)

    client.chat.completions.create(
        model="fake-model", messages=sent_messages(fake_upstream)
    )

    sent = sent_messages(fake_upstream)
    assert system_messages(sent) == [
        {"role": "system", "content": f"{SYSTEM}\n\nReply in French."}
    ]
    assert sent[1:] == [*INJECTED[1:], USER]


def test_prompt_off_bypasses_injection(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    messages = [{"role": "system", "content": "Reply in French."}, USER]

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, extra_headers={"x-drpo-prompt": "off"}
    )

    assert sent_messages(fake_upstream) == messages
    assert raw.headers["x-drpo-prompt-version"] == "off"


def test_prompt_header_not_forwarded(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], extra_headers={"x-drpo-prompt": "v1"}
    )

    headers = fake_upstream.requests_to("/chat/completions")[-1].headers
    assert "x-drpo-prompt" not in headers


def test_pinned_version_overrides_active(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER], extra_headers={"x-drpo-prompt": "v1"}
    )

    builtin = load_default_instruction()
    sent = sent_messages(fake_upstream)
    assert raw.headers["x-drpo-prompt-version"] == "v1"
    assert sent[0] == {"role": "system", "content": builtin.system_prompt.strip()}
    assert len(sent) == 2 * len(builtin.examples) + 2
    assert sent[-1] == USER


def test_unknown_pinned_version_returns_404(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        gateway.client().chat.completions.create(
            model="fake-model",
            messages=[USER],
            extra_headers={"x-drpo-prompt": "v99"},
        )

    error = caught.value.response.json()["error"]
    assert caught.value.status_code == 404
    assert error["type"] == "not_found_error"
    assert error["param"] == "x-drpo-prompt"
    assert error["code"] == "prompt_version_not_found"
    assert "'v99'" in error["message"]
    assert fake_upstream.requests_to("/chat/completions") == []


def test_response_header_names_active_version(gateway: RunningGateway) -> None:
    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER]
    )

    assert raw.headers["x-drpo-prompt-version"] == "v2"


def test_request_fields_reach_upstream_unchanged(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fields: dict[str, Any] = {
        "n": 2,
        "stop": ["\n\n", "END"],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Current weather of a city.",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": {"type": "object"}},
        },
        "logprobs": True,
        "top_logprobs": 3,
        "seed": 7,
        "temperature": 0.2,
    }

    gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], **fields
    )

    received = fake_upstream.requests_to("/chat/completions")[-1].json
    for name, value in fields.items():
        assert received[name] == value, name


def test_tool_calls_in_response_survive(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    body = chat_body("")
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    body["choices"][0]["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [call],
    }
    body["choices"][0]["finish_reason"] = "tool_calls"
    fake_upstream.queue("/chat/completions", Scripted(body=body))

    raw = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER]
    )

    response = raw.parse()
    tool_call = response.choices[0].message.tool_calls[0]
    assert raw.http_response.json() == body
    assert response.choices[0].finish_reason == "tool_calls"
    assert tool_call.id == "call_abc"
    assert tool_call.function.arguments == '{"city": "Oslo"}'
