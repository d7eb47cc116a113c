"""Client API keys: checked on every /v1 route and kept out of logs and the upstream."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import FakeUpstream

CLIENT_KEY = "k1-client-3f9a7c"
WRONG_KEY = "k2-wrong-8d1e05"
USER = {"role": "user", "content": "Why is the sky blue?"}


@pytest.fixture
def gateway(start_gateway: GatewayFactory) -> RunningGateway:
    return start_gateway(api_keys=[CLIENT_KEY])


def assert_invalid_key(response: httpx.Response) -> None:
    body = response.json()
    assert response.status_code == 401
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    "headers",
    [{}, {"authorization": "Bearer"}, {"authorization": f"Basic {CLIENT_KEY}"}],
    ids=["none", "empty", "basic"],
)
def test_missing_key_returns_401(
    gateway: RunningGateway, fake_upstream: FakeUpstream, headers: dict[str, str]
) -> None:
    body = {"model": "fake-model", "messages": [USER]}

    response = httpx.post(
        gateway.url + "/v1/chat/completions", json=body, headers=headers
    )

    assert_invalid_key(response)
    assert fake_upstream.requests_to("/chat/completions") == []


def test_wrong_key_returns_401(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        gateway.client(api_key=WRONG_KEY).chat.completions.create(
            model="fake-model", messages=[USER]
        )

    assert_invalid_key(caught.value.response)
    assert fake_upstream.requests_to("/chat/completions") == []


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/embeddings"])
def test_every_v1_route_checks_key(gateway: RunningGateway, path: str) -> None:
    response = httpx.post(
        gateway.url + path,
        json={"model": "fake-model", "prompt": "hi", "input": "hi"},
        headers={"authorization": f"Bearer {WRONG_KEY}"},
    )

    assert_invalid_key(response)


def test_right_key_returns_200(gateway: RunningGateway) -> None:
    client = gateway.client(api_key=CLIENT_KEY)

    response = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER]
    )

    assert response.http_response.status_code == 200
    assert response.parse().choices[0].message.content == "Hello world"


def test_keys_never_logged(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    right = gateway.client(api_key=CLIENT_KEY)
    right.chat.completions.create(model="fake-model", messages=[USER])
    list(
        right.chat.completions.create(model="fake-model", messages=[USER], stream=True)
    )
    right.models.list()
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key=WRONG_KEY).models.list()

    logged = "\n".join(
        [record.getMessage() for record in caplog.records] + [caplog.text]
    )
    assert "request_id=" in logged
    assert CLIENT_KEY not in logged
    assert WRONG_KEY not in logged


def test_upstream_gets_its_own_key(
    gateway: RunningGateway, fake_upstream: FakeUpstream
) -> None:
    client = gateway.client(
        api_key=CLIENT_KEY,
        default_headers={"x-api-key": CLIENT_KEY, "api-key": CLIENT_KEY},
    )
    client.chat.completions.create(model="fake-model", messages=[USER])
    list(
        client.chat.completions.create(model="fake-model", messages=[USER], stream=True)
    )
    client.completions.create(model="fake-model", prompt="Once upon")
    client.models.list()

    paths = [item.path for item in fake_upstream.received]
    assert paths.count("/models") == 2
    for item in fake_upstream.received:
        assert item.headers["authorization"] == "Bearer upstream-secret", item.path
        assert CLIENT_KEY not in str(item.headers), item.path
        assert CLIENT_KEY.encode() not in item.body, item.path
