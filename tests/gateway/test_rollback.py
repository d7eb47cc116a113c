"""`drpo-gateway prompts rollback` restores a version that a running gateway serves."""

from __future__ import annotations

import json
import time

from typer.testing import CliRunner

from gateway.cli import app
from tests.conftest import GatewayFactory, RunningGateway

CHAT = [{"role": "user", "content": "Hi"}]


def _served_version(gateway: RunningGateway) -> str:
    reply = gateway.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=CHAT
    )
    return reply.headers["x-drpo-prompt-version"]


def _rollback(gateway: RunningGateway, *options: str) -> tuple[int, str]:
    data_dir = str(gateway.settings.data_dir)
    result = CliRunner().invoke(
        app, ["prompts", "rollback", "--data-dir", data_dir, *options]
    )
    return result.exit_code, result.output


def _wait_for_version(gateway: RunningGateway, version: str) -> float:
    started = time.monotonic()
    while _served_version(gateway) != version:
        if time.monotonic() - started > 2:
            raise AssertionError(f"the gateway never served {version}")
        time.sleep(0.02)
    return time.monotonic() - started


def test_rollback_restores_previous_version(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    gateway.activate("A newer prompt.")
    assert _served_version(gateway) == "v2"

    code, output = _rollback(gateway)

    assert code == 0, output
    assert "now points at v1 (previously v2)" in output
    assert _wait_for_version(gateway, "v1") < 1.0


def test_second_rollback_returns_to_newer(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    gateway.activate("A newer prompt.")

    first, _ = _rollback(gateway)
    second, output = _rollback(gateway, "--json")

    assert first == 0
    assert second == 0
    assert json.loads(output) == {"model": None, "version": "v2", "previous": "v1"}
    assert _wait_for_version(gateway, "v2") < 1.0


def test_rollback_to_named_version(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    gateway.activate("Second prompt.")
    gateway.activate("Third prompt.")

    code, output = _rollback(gateway, "--to", "v1")

    assert code == 0, output
    assert _wait_for_version(gateway, "v1") < 1.0


def test_rollback_without_history_fails_cleanly(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway()

    code, output = _rollback(gateway, "--model", "never-activated")

    assert code == 1
    assert "no earlier version of model 'never-activated'" in output
    assert "Traceback" not in output


def test_rollback_to_unknown_version_fails(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()

    code, output = _rollback(gateway, "--to", "v99")

    assert code == 1
    assert "v99" in output


def test_new_model_pointer_rolls_back_to_default(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway()
    version = gateway.store.create("A prompt for one model.", [])
    gateway.store.activate(version.version, "fake-model")
    _wait_for_version(gateway, "v2")

    code, output = _rollback(gateway, "--model", "fake-model")

    assert code == 0, output
    assert "now points at v1 (previously v2)" in output
    assert _wait_for_version(gateway, "v1") < 1.0


def test_default_pointer_without_history_refused(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway()
    version = gateway.store.create("A prompt for one model.", [])
    gateway.store.activate(version.version, "fake-model")

    code, output = _rollback(gateway)

    assert code == 1
    assert "no earlier version of the default pointer" in output
