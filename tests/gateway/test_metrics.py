"""Prometheus metrics exported on /metrics."""

from __future__ import annotations

import random
import string
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.instruction import Example, Instruction
from gateway.prompting import PromptBuilder
from gateway.settings import InjectionMode
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import (
    FakeUpstream,
    Scripted,
    chat_body,
    chat_events,
    closed_port,
    wait_until,
)

USER = {"role": "user", "content": "Why is the sky blue?"}
SYSTEM = "Answer in one sentence."
EXAMPLES = [("What is 2 + 2?", "4."), ("Name a primary colour.", "Red.")]
INSTRUCTION = Instruction(
    system_prompt=SYSTEM,
    examples=tuple(Example(query=q, answer=a) for q, a in EXAMPLES),
)


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway()


def chat(gateway: RunningGateway, **fields: Any) -> Any:
    return gateway.client().chat.completions.create(
        model="fake-model", messages=[USER], **fields
    )


def fake_token_count(text: str) -> int:
    """Return the count the fake upstream's /tokenize gives: one per word."""
    return len(text.split())


def test_requests_counted_by_labels(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    chat(gateway)
    chat(gateway)
    fake_upstream.queue("/chat/completions", Scripted(status=400, body={"error": {}}))
    with pytest.raises(openai.BadRequestError):
        chat(gateway)
    gateway.client().completions.create(model="fake-model", prompt="Once upon")
    httpx.get(gateway.url + "/v1/models")
    gateway.wait_for_requests(5)

    def count(
        route: str, status: str, version: str, model: str = "fake-model"
    ) -> float:
        return gateway.metric(
            "drpo_requests_total",
            route=route,
            model=model,
            status_class=status,
            prompt_version=version,
        )

    assert count("chat_completions", "2xx", "v1") == 2
    assert count("chat_completions", "4xx", "v1") == 1
    assert count("completions", "2xx", "none") == 1
    assert count("models", "2xx", "none", model="other") == 1


def test_latency_histograms_observe_requests(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue(
        "/chat/completions", Scripted(body=chat_body("Slow."), delay=0.3)
    )

    chat(gateway)

    labels = {"route": "chat_completions", "model": "fake-model"}
    duration_sum = gateway.metric("drpo_request_duration_seconds_sum", **labels)
    overhead_sum = gateway.metric(
        "drpo_gateway_overhead_seconds_sum", route="chat_completions"
    )
    assert gateway.metric("drpo_request_duration_seconds_count", **labels) == 1
    assert duration_sum >= 0.3
    assert (
        gateway.metric("drpo_request_duration_seconds_bucket", le="0.25", **labels) == 0
    )
    assert (
        gateway.metric("drpo_request_duration_seconds_bucket", le="600.0", **labels)
        == 1
    )
    assert (
        gateway.metric("drpo_gateway_overhead_seconds_count", route="chat_completions")
        == 1
    )
    assert overhead_sum < duration_sum - 0.25


def test_time_to_first_token_on_streams(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    events = chat_events(["Rayleigh", " scattering."])
    fake_upstream.queue("/chat/completions", Scripted(events=events, event_delay=0.15))

    list(chat(gateway, stream=True))
    chat(gateway)
    gateway.wait_for_requests(2)

    labels = {"route": "chat_completions", "model": "fake-model"}
    first_token = gateway.metric("drpo_time_to_first_token_seconds_sum", **labels)
    duration = gateway.metric("drpo_request_duration_seconds_sum", **labels)
    assert gateway.metric("drpo_time_to_first_token_seconds_count", **labels) == 1
    assert first_token >= 0.3
    assert first_token < duration


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (Scripted(status=500, body={"error": {"message": "boom"}}), "upstream_status"),
        (Scripted(status=429, body={"error": {"message": "slow down"}}), "status_4xx"),
        (Scripted(raw=b"<html>", content_type="text/html"), "invalid_response"),
        (Scripted(delay=2.0), "upstream_timeout"),
        (Scripted(events=chat_events(["a", "b"]), drop_after=2), "stream_interrupted"),
    ],
    ids=["500", "429", "garbage", "timeout", "drop"],
)
def test_upstream_errors_counted_by_kind(
    start_gateway: GatewayFactory,
    fake_upstream: FakeUpstream,
    reply: Scripted,
    kind: str,
) -> None:
    gateway = start_gateway(upstream_read_timeout=0.3)
    fake_upstream.queue("/chat/completions", reply)

    with pytest.raises(openai.APIError):
        list(chat(gateway, stream=reply.events is not None))
    gateway.wait_for_requests(1)

    assert gateway.samples("drpo_upstream_errors_total") == [({"kind": kind}, 1.0)]


def test_refused_upstream_counted(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/v1")

    with pytest.raises(openai.APIStatusError):
        chat(gateway)

    assert (
        gateway.metric("drpo_upstream_errors_total", kind="upstream_unreachable") == 1
    )


@pytest.mark.parametrize("stream", [False, True])
def test_usage_tokens_counted(gateway: RunningGateway, stream: bool) -> None:
    result = chat(gateway, stream=stream)
    if stream:
        list(result)
    gateway.wait_for_requests(1)

    assert gateway.metric("drpo_prompt_tokens_total", model="fake-model") == 11
    assert gateway.metric("drpo_completion_tokens_total", model="fake-model") == 2


def test_injected_tokens_counted_per_request(gateway: RunningGateway) -> None:
    gateway.activate(SYSTEM, EXAMPLES)
    per_request = fake_token_count(PromptBuilder().injected_text(INSTRUCTION))

    for _ in range(3):
        chat(gateway)

    assert wait_until(
        lambda: (
            gateway.metric("drpo_injected_tokens_total", model="fake-model")
            == 3 * per_request
        )
    )


def test_injected_tokens_in_base_mode_count_prefix(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE)
    gateway.activate(SYSTEM, EXAMPLES)
    per_request = fake_token_count(PromptBuilder().base_prefix(INSTRUCTION))

    chat(gateway)
    chat(gateway)

    assert wait_until(
        lambda: (
            gateway.metric("drpo_injected_tokens_total", model="fake-model")
            == 2 * per_request
        )
    )


def test_no_injected_tokens_with_prompt_off(gateway: RunningGateway) -> None:
    chat(gateway, extra_headers={"x-drpo-prompt": "off"})

    assert gateway.samples("drpo_injected_tokens_total") == []


def test_active_prompt_info_follows_activation(gateway: RunningGateway) -> None:
    assert gateway.samples("drpo_active_prompt_info") == [
        ({"model": "*", "version": "v1"}, 1.0)
    ]

    gateway.activate(SYSTEM, EXAMPLES)

    assert gateway.samples("drpo_active_prompt_info") == [
        ({"model": "*", "version": "v2"}, 1.0)
    ]
    assert gateway.metric("drpo_prompt_store_generation") >= 4


def test_unknown_models_fold_into_other(gateway: RunningGateway) -> None:
    rng = random.Random(7)
    names = {
        "model-" + "".join(rng.choices(string.ascii_lowercase, k=12)) for _ in range(50)
    }
    client = gateway.client()

    for name in names:
        client.chat.completions.create(model=name, messages=[USER])
    chat(gateway)

    models = {labels["model"] for labels, _ in gateway.samples("drpo_requests_total")}
    assert len(names) == 50
    assert models == {"fake-model", "other"}
    assert gateway.metric("drpo_requests_total", model="other") == 50


def test_rejected_request_counts_no_injected_tokens(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE)
    gateway.activate(SYSTEM, EXAMPLES)
    per_request = fake_token_count(PromptBuilder().base_prefix(INSTRUCTION))
    tools: Any = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    chat(gateway)
    assert wait_until(
        lambda: gateway.metric("drpo_injected_tokens_total") == per_request
    )

    with pytest.raises(openai.BadRequestError):
        chat(gateway, tools=tools)
    chat(gateway)

    # The count is cached now, so each request records it before it returns.
    assert gateway.metric("drpo_injected_tokens_total") == 2 * per_request


def model_label_values(gateway: RunningGateway) -> dict[str, set[str]]:
    """Return the distinct `model` label values of each drpo_* family on /metrics."""
    response = httpx.get(gateway.url + "/metrics")
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if family.name.startswith("drpo_") and "model" in sample.labels:
                values.setdefault(family.name, set()).add(sample.labels["model"])
    return values


def test_thousand_model_names_stay_bounded(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    listed = [f"listed-{index}" for index in range(10)]
    fake_upstream.queue(
        "/models", Scripted(body={"data": [{"id": name} for name in listed]})
    )
    gateway = start_gateway(metrics_max_models=4)
    names = listed + [f"client-model-{index}" for index in range(990)]

    with httpx.Client(base_url=gateway.url) as client:
        statuses = {
            client.post(
                "/v1/chat/completions", json={"model": name, "messages": [USER]}
            ).status_code
            for name in names
        }
    values = model_label_values(gateway)
    body = httpx.get(gateway.url + "/metrics").content

    assert statuses == {200}
    assert len(set(names)) == 1000
    assert values["drpo_requests"] == {*listed[:4], "other"}
    for family, models in values.items():
        assert len(models) <= 4 + 1, family
    assert gateway.metric("drpo_requests_total") == 1000
    assert len(body) < 200_000


def test_unknown_pins_add_no_version_label(gateway: RunningGateway) -> None:
    chat(gateway)

    for index in range(100):
        with pytest.raises(openai.NotFoundError):
            chat(gateway, extra_headers={"x-drpo-prompt": f"v{index + 2}"})
    versions = {
        labels["prompt_version"] for labels, _ in gateway.samples("drpo_requests_total")
    }

    assert versions == {"v1", "none"}
    assert gateway.metric("drpo_requests_total", status_class="4xx") == 100
