"""Inputs a new user sent that once produced a 500 or a non-OpenAI error body."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.errors import ConfigurationError
from gateway.logs import redact
from gateway.settings import InjectionMode, load_settings
from gateway.upstream import UpstreamTarget
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import FakeUpstream, Scripted, sse, wait_until

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def _assert_openai_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    return dict(error)


def test_non_ascii_header_is_not_forwarded(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway()

    response = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers=[(b"x-custom", "ünï-☃".encode()), (b"x-plain", b"kept")],
        json=CHAT,
    )

    assert response.status_code == 200
    received = fake_upstream.requests_to("/chat/completions")[-1].headers
    assert "x-custom" not in received
    assert received["x-plain"] == "kept"


def test_upstream_404_becomes_openai_error(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.queue(
        "/nothing-here",
        Scripted(status=404, raw=b'{"message":"File Not Found","code":404}'),
    )
    gateway = start_gateway()

    response = httpx.get(gateway.url + "/v1/nothing-here")

    error = _assert_openai_error(response, 404)
    assert "File Not Found" in error["message"]
    assert error["type"] == "not_found_error"


def test_llama_cpp_error_keeps_message_and_type(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    body = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size",
            "type": "exceed_context_size_error",
        }
    }
    fake_upstream.queue("/chat/completions", Scripted(status=400, body=body))
    gateway = start_gateway()

    response = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)

    error = _assert_openai_error(response, 400)
    assert error["message"] == body["error"]["message"]
    assert error["type"] == "exceed_context_size_error"
    assert error["code"] == "400"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stream", "yes"),
        ("stream", 1),
        ("max_tokens", 10**12),
        ("max_completion_tokens", 2**31),
        ("response_format", {"type": "xml"}),
        ("response_format", {"type": "json_schema"}),
        ("logprobs", "true"),
    ],
)
def test_invalid_field_rejected_before_upstream(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, field: str, value: Any
) -> None:
    gateway = start_gateway()

    response = httpx.post(
        gateway.url + "/v1/chat/completions", json={**CHAT, field: value}
    )

    error = _assert_openai_error(response, 400)
    assert error["param"] is not None
    assert error["param"].startswith(field)
    assert fake_upstream.requests_to("/chat/completions") == []


def test_unknown_model_of_managed_engine_is_404(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    settings = load_settings(upstream=fake_upstream.base_url, data_dir=tmp_path)
    target = UpstreamTarget(
        fake_upstream.base_url, None, InjectionMode.CHAT, served_models=("fake-model",)
    )
    gateway = RunningGateway(create_app(settings, target), settings)
    try:
        wrong = httpx.post(
            gateway.url + "/v1/chat/completions", json={**CHAT, "model": "gpt-9"}
        )
        right = httpx.post(gateway.url + "/v1/chat/completions", json=CHAT)
    finally:
        gateway.stop()

    error = _assert_openai_error(wrong, 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert right.status_code == 200


def test_client_leaving_stream_is_recorded_499(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    pieces = [
        sse({"choices": [{"index": 0, "delta": {"content": f"{n} "}}]})
        for n in range(200)
    ]
    fake_upstream.queue("/chat/completions", Scripted(events=pieces, event_delay=0.02))
    gateway = start_gateway()

    with httpx.stream(
        "POST", gateway.url + "/v1/chat/completions", json={**CHAT, "stream": True}
    ) as response:
        next(response.iter_bytes())

    assert wait_until(
        lambda: gateway.metric("drpo_requests_total", status_class="4xx") == 1
    )


def test_invalid_environment_list_is_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DRPO_API_KEYS", "not-json-secret")

    with pytest.raises(ConfigurationError) as raised:
        load_settings()

    assert "api_keys" in str(raised.value)
    assert "not-json-secret" not in str(raised.value)


def test_invalid_yaml_is_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("port: [\n")

    with pytest.raises(ConfigurationError, match="not valid YAML"):
        load_settings(config)


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps({"frobnicate": 1}))

    with pytest.raises(ConfigurationError, match="unknown setting 'frobnicate'"):
        load_settings(config)


def test_unknown_log_level_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="log_level"):
        load_settings(log_level="loud")


def test_redaction_keeps_scheme_in_help_text() -> None:
    help_text = "Missing API key: send 'Authorization: Bearer <key>'."

    assert redact(help_text) == help_text
    assert "s3cr3t-token" not in redact("authorization: Bearer s3cr3t-token")
    assert "hunter2" not in redact("api_key=hunter2")
