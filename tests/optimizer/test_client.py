"""ModelClient against the scripted fake server: cache, limits, budget, errors."""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import diskcache
import pytest

from optimizer.client import (
    Budget,
    BudgetExceededError,
    Endpoint,
    ModelCallError,
    ModelClient,
    request_key,
)
from optimizer.errors import OptimizerError
from tests.optimizer.fake_models import FakeModels, FakeReply, chat_reply

PATH = "/chat/completions"


def body(text: str = "Hello") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0}


@pytest.fixture
def fake() -> Iterator[FakeModels]:
    with FakeModels() as models:
        yield models


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ModelClient]:
    model_client = ModelClient(tmp_path / "cache", concurrency=4, retry_delay=0)
    yield model_client
    await model_client.aclose()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_identical_call_is_cache_hit(
    fake: FakeModels, client: ModelClient
) -> None:
    first = await client.complete("judge", fake.endpoint(), PATH, body())
    second = await client.complete("judge", fake.endpoint(), PATH, body())

    assert len(fake.calls) == 1
    assert second == first
    assert client.usage["judge"].calls == 1
    assert client.usage["judge"].cache_hits == 1


async def test_cache_survives_new_client(fake: FakeModels, tmp_path: Path) -> None:
    async with ModelClient(tmp_path / "cache", concurrency=2) as first:
        await first.complete("target", fake.endpoint(), PATH, body())
    async with ModelClient(tmp_path / "cache", concurrency=2) as second:
        await second.complete("target", fake.endpoint(), PATH, body())

        assert len(fake.calls) == 1
        assert second.usage["target"].cache_hits == 1
        assert second.usage["target"].calls == 0


async def test_different_body_misses_cache(
    fake: FakeModels, client: ModelClient
) -> None:
    await client.complete("judge", fake.endpoint(), PATH, body("one"))
    await client.complete("judge", fake.endpoint(), PATH, body("two"))

    assert len(fake.calls) == 2


async def test_other_model_misses_cache(fake: FakeModels, client: ModelClient) -> None:
    await client.complete("judge", fake.endpoint("model-a"), PATH, body())
    await client.complete("judge", fake.endpoint("model-b"), PATH, body())

    assert [call.body["model"] for call in fake.calls] == ["model-a", "model-b"]


async def test_api_key_sent_but_not_cached(
    fake: FakeModels, client: ModelClient
) -> None:
    await client.complete("judge", fake.endpoint(api_key="key-a"), PATH, body())
    await client.complete("judge", fake.endpoint(api_key="key-b"), PATH, body())

    assert len(fake.calls) == 1
    assert fake.calls[0].headers["authorization"] == "Bearer key-a"


def test_request_key_ignores_api_key() -> None:
    plain = Endpoint("http://127.0.0.1:1/v1", "m")
    keyed = Endpoint("http://127.0.0.1:1/v1", "m", api_key="secret")

    assert request_key(plain, PATH, body()) == request_key(keyed, PATH, body())


async def test_cache_name_survives_port_change(
    fake: FakeModels, client: ModelClient
) -> None:
    first = Endpoint(fake.base_url, "m", cache_name="embedded:model-sha")
    moved = Endpoint("http://127.0.0.1:1/v1", "m", cache_name="embedded:model-sha")

    await client.complete("target", first, PATH, body())
    await client.complete("target", moved, PATH, body())

    assert len(fake.calls) == 1
    assert client.usage["target"].cache_hits == 1


def test_request_key_ignores_key_order() -> None:
    endpoint = Endpoint("http://127.0.0.1:1/v1", "m")
    forward = {"a": 1, "b": {"c": 2, "d": 3}}
    backward = {"b": {"d": 3, "c": 2}, "a": 1}

    assert request_key(endpoint, PATH, forward) == request_key(endpoint, PATH, backward)


def test_endpoint_hides_api_key_in_repr() -> None:
    endpoint = Endpoint("http://127.0.0.1:1/v1/", "m", api_key="secret")

    assert "secret" not in repr(endpoint)
    assert endpoint.base_url == "http://127.0.0.1:1/v1"


def test_endpoint_without_scheme_rejected() -> None:
    with pytest.raises(OptimizerError, match=re.escape("127.0.0.1:1/v1")):
        Endpoint("127.0.0.1:1/v1", "m")


async def test_concurrency_limit_respected(fake: FakeModels, tmp_path: Path) -> None:
    fake.delay = 0.1
    async with ModelClient(tmp_path / "cache", concurrency=3) as limited:
        await asyncio.gather(
            *(
                limited.complete("target", fake.endpoint(), PATH, body(str(index)))
                for index in range(20)
            )
        )

    assert len(fake.calls) == 20
    assert fake.max_in_flight == 3


async def test_identical_concurrent_calls_sent_once(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.delay = 0.1
    await asyncio.gather(
        *(client.complete("judge", fake.endpoint(), PATH, body()) for _ in range(5))
    )

    assert len(fake.calls) == 1
    assert client.usage["judge"].cache_hits == 4


async def test_call_budget_raises_before_call(fake: FakeModels, tmp_path: Path) -> None:
    budget = Budget(max_calls=2)
    async with ModelClient(tmp_path / "cache", 2, budget=budget) as limited:
        await limited.complete("judge", fake.endpoint(), PATH, body("one"))
        await limited.complete("judge", fake.endpoint(), PATH, body("two"))
        with pytest.raises(BudgetExceededError, match="2 upstream calls"):
            await limited.complete("judge", fake.endpoint(), PATH, body("three"))

        assert len(fake.calls) == 2
        # Cache hits are free, so a spent budget still replays them.
        await limited.complete("judge", fake.endpoint(), PATH, body("one"))
        assert len(fake.calls) == 2


async def test_token_budget_raises_once_spent(fake: FakeModels, tmp_path: Path) -> None:
    # Each fake reply reports 11 prompt and 2 completion tokens.
    budget = Budget(max_tokens=13)
    async with ModelClient(tmp_path / "cache", 2, budget=budget) as limited:
        await limited.complete("judge", fake.endpoint(), PATH, body("one"))
        with pytest.raises(BudgetExceededError, match="13 tokens"):
            await limited.complete("judge", fake.endpoint(), PATH, body("two"))

    assert len(fake.calls) == 1


async def test_usage_records_tokens_per_role(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: chat_reply(
        "ok", {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    )
    await client.complete("target", fake.endpoint(), PATH, body("one"))
    await client.complete("target", fake.endpoint(), PATH, body("one"))
    await client.complete("judge", fake.endpoint(), PATH, body("two"))

    target = client.usage["target"]
    assert (target.calls, target.cache_hits) == (1, 1)
    assert target.prompt_tokens == 30
    assert target.completion_tokens == 7
    assert client.usage["judge"].calls == 1


async def test_server_error_retried_then_raises(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.judge = fake.target = lambda request: FakeReply(
        503, {"error": {"message": "overloaded"}}
    )
    endpoint = fake.endpoint("judge-model")

    with pytest.raises(ModelCallError) as raised:
        await client.complete("judge", endpoint, PATH, body())

    assert len(fake.calls) == 3
    assert raised.value.status == 503
    message = str(raised.value)
    assert endpoint.base_url in message
    assert "'judge-model'" in message
    assert "HTTP 503" in message
    assert "overloaded" in message


async def test_rate_limit_retried_until_success(
    fake: FakeModels, client: ModelClient
) -> None:
    replies = iter([FakeReply(429, {"error": {"message": "slow down"}})])
    fake.target = lambda request: next(replies, chat_reply("ok"))

    response = await client.complete("target", fake.endpoint(), PATH, body())

    assert len(fake.calls) == 2
    assert response["choices"][0]["message"]["content"] == "ok"


async def test_client_error_raises_at_once(
    fake: FakeModels, client: ModelClient
) -> None:
    fake.target = lambda request: FakeReply(400, {"error": {"message": "bad field"}})

    with pytest.raises(ModelCallError, match="HTTP 400: bad field") as raised:
        await client.complete("target", fake.endpoint(), PATH, body())

    assert len(fake.calls) == 1
    assert raised.value.status == 400


async def test_not_found_names_url_hint(fake: FakeModels, client: ModelClient) -> None:
    fake.target = lambda request: FakeReply(404, {"error": {"message": "no route"}})

    with pytest.raises(ModelCallError, match="usually ends with /v1"):
        await client.complete("target", fake.endpoint(), "/v1/completions", body())


async def test_connection_failure_raises_after_retries(
    client: ModelClient,
) -> None:
    endpoint = Endpoint(f"http://127.0.0.1:{closed_port()}/v1", "m")

    with pytest.raises(ModelCallError, match="connection failed") as raised:
        await client.complete("target", endpoint, PATH, body())

    assert raised.value.status is None
    assert client.usage["target"].calls == 3


async def test_timeout_retried_then_raises(fake: FakeModels, tmp_path: Path) -> None:
    fake.delay = 1.0
    async with ModelClient(tmp_path / "c", 4, timeout=0.2, retry_delay=0) as slow:
        with pytest.raises(ModelCallError, match="timed out"):
            await slow.complete("target", fake.endpoint(), PATH, body())

    assert len(fake.calls) == 3


async def test_non_json_reply_raises(fake: FakeModels, client: ModelClient) -> None:
    fake.target = lambda request: FakeReply(200, ["not", "an", "object"])

    with pytest.raises(ModelCallError, match="without a JSON object"):
        await client.complete("target", fake.endpoint(), PATH, body())


@pytest.mark.parametrize(
    "reply",
    [
        {"error": {"message": "context too long"}},
        {"id": "x", "object": "chat.completion", "choices": []},
    ],
)
async def test_unusable_response_not_cached(
    fake: FakeModels, client: ModelClient, reply: dict[str, Any]
) -> None:
    fake.target = lambda request: reply

    returned = await client.complete("target", fake.endpoint(), PATH, body())
    await client.complete("target", fake.endpoint(), PATH, body())

    assert returned == reply
    assert len(fake.calls) == 2


async def test_cache_error_fails_open(
    fake: FakeModels, client: ModelClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_get(self: diskcache.Cache, key: str, *args: Any, **kw: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(diskcache.Cache, "get", broken_get)

    first = await client.complete("judge", fake.endpoint(), PATH, body())
    await client.complete("judge", fake.endpoint(), PATH, body())

    assert first["choices"][0]["message"]["content"] == "A fake answer."
    assert client.cache_errors == 2
    assert len(fake.calls) == 2


async def test_no_cache_dir_caches_in_memory(fake: FakeModels) -> None:
    async with ModelClient(None, concurrency=2) as memory_only:
        await memory_only.complete("judge", fake.endpoint(), PATH, body())
        await memory_only.complete("judge", fake.endpoint(), PATH, body())

        assert memory_only.usage["judge"].cache_hits == 1
    assert len(fake.calls) == 1


async def test_model_field_set_from_endpoint(
    fake: FakeModels, client: ModelClient
) -> None:
    request = {**body(), "model": "ignored"}

    await client.complete("judge", fake.endpoint("served"), PATH, request)

    assert fake.calls[0].body["model"] == "served"


def test_zero_concurrency_rejected() -> None:
    with pytest.raises(OptimizerError, match="at least 1, got 0"):
        ModelClient(None, concurrency=0)


async def test_calls_opt_out_of_gateway_injection(
    fake: FakeModels, client: ModelClient
) -> None:
    await client.complete("judge", fake.endpoint(), PATH, body())

    headers = fake.calls[0].headers
    assert headers["x-drpo-prompt"] == "off"
    assert headers["x-drpo-sample"] == "off"
