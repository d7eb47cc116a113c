"""GatewayTarget renders queries exactly as the gateway serves them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.instruction import Example, Instruction
from gateway.prompting import base_stop_strings
from gateway.prompting.builder import PromptBuilder
from gateway.settings import InjectionMode
from optimizer.client import Endpoint, ModelCallError, ModelClient
from optimizer.errors import OptimizerError
from optimizer.target import GatewayTarget
from optimizer.types import Query, QueryKind, TargetModel
from tests.conftest import GatewayFactory
from tests.fakes.upstream import FakeUpstream
from tests.optimizer.fake_models import FakeModels, FakeReply

INSTRUCTION = Instruction(
    system_prompt="You are a careful assistant.",
    examples=(Example(query="What is 2+2?", answer="2+2 is 4."),),
)
QUERY = Query("q1", "What is the capital of France?", "everyday", QueryKind.GENERAL)


@pytest.fixture
def fake() -> Iterator[FakeModels]:
    with FakeModels() as models:
        yield models


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ModelClient]:
    model_client = ModelClient(tmp_path / "cache", concurrency=4, retry_delay=0)
    yield model_client
    await model_client.aclose()


def target_for(
    client: ModelClient, fake: FakeModels, mode: InjectionMode
) -> GatewayTarget:
    return GatewayTarget(client, fake.endpoint(), mode, PromptBuilder(), max_tokens=64)


async def test_base_mode_sends_builder_prompt(
    fake: FakeModels, client: ModelClient
) -> None:
    target: TargetModel = target_for(client, fake, InjectionMode.BASE)

    await target.answer(INSTRUCTION, QUERY)

    [call] = fake.calls
    expected = PromptBuilder().base_prompt(
        INSTRUCTION, [{"role": "user", "content": QUERY.text}]
    )
    assert call.path == "/completions"
    assert call.body["prompt"] == expected
    assert call.body["stop"] == base_stop_strings(None)
    assert call.body["temperature"] == 0
    assert call.body["max_tokens"] == 64


async def test_base_mode_trims_run_on_answer(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: "  Paris is the capital.\n\n# Query:\nAnd Spain?"
    target = target_for(client, fake, InjectionMode.BASE)

    answer = await target.answer(INSTRUCTION, QUERY)

    assert answer == "Paris is the capital."


async def test_base_mode_trims_end_marker(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: "Paris.\n<END>\n"
    target = target_for(client, fake, InjectionMode.BASE)

    assert await target.answer(INSTRUCTION, QUERY) == "Paris."


async def test_chat_mode_sends_builder_messages(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: "Paris."
    target = target_for(client, fake, InjectionMode.CHAT)

    answer = await target.answer(INSTRUCTION, QUERY)

    [call] = fake.calls
    expected = PromptBuilder().chat_messages(
        INSTRUCTION, [{"role": "user", "content": QUERY.text}]
    )
    assert call.path == "/chat/completions"
    assert call.body["messages"] == expected
    assert call.body["temperature"] == 0
    assert answer == "Paris."


def test_auto_mode_rejected(fake: FakeModels) -> None:
    client = ModelClient(None, concurrency=1)

    with pytest.raises(OptimizerError, match="'auto'"):
        target_for(client, fake, InjectionMode.AUTO)


async def test_error_body_raises_model_call_error(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: FakeReply(200, {"error": {"message": "no slot"}})
    target = target_for(client, fake, InjectionMode.BASE)

    with pytest.raises(ModelCallError, match="no answer text"):
        await target.answer(INSTRUCTION, QUERY)


async def test_base_prompt_matches_gateway_upstream_request(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.BASE)
    gateway.activate(
        INSTRUCTION.system_prompt,
        [(item.query, item.answer) for item in INSTRUCTION.examples],
    )
    gateway.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": QUERY.text}]
    )
    [served] = fake_upstream.requests_to("/completions")

    async with ModelClient(tmp_path / "cache", concurrency=1) as client:
        endpoint = Endpoint(fake_upstream.base_url, "fake-model")
        target = GatewayTarget(client, endpoint, InjectionMode.BASE, PromptBuilder())
        await target.answer(INSTRUCTION, QUERY)
    optimized = fake_upstream.requests_to("/completions")[-1]

    assert optimized.json["prompt"] == served.json["prompt"]
    assert optimized.json["stop"] == served.json["stop"]


async def test_chat_messages_match_gateway_upstream_request(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(default_mode=InjectionMode.CHAT)
    gateway.activate(
        INSTRUCTION.system_prompt,
        [(item.query, item.answer) for item in INSTRUCTION.examples],
    )
    gateway.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": QUERY.text}]
    )
    [served] = fake_upstream.requests_to("/chat/completions")

    async with ModelClient(tmp_path / "cache", concurrency=1) as client:
        endpoint = Endpoint(fake_upstream.base_url, "fake-model")
        target = GatewayTarget(client, endpoint, InjectionMode.CHAT, PromptBuilder())
        await target.answer(INSTRUCTION, QUERY)
    optimized = fake_upstream.requests_to("/chat/completions")[-1]

    assert optimized.json["messages"] == served.json["messages"]
