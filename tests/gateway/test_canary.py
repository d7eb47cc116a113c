"""Canary versions: the client split in ActivePrompts and through a real gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.instruction import Instruction, PromptVersion
from gateway.sampling.capture import client_id
from gateway.settings import InjectionMode
from gateway.store import ActivePrompts, Canary, DiskPromptStore
from gateway.store.active import canary_bucket
from tests.conftest import GatewayFactory, RunningGateway
from tests.fakes.upstream import wait_until

SEED = Instruction(system_prompt="Answer helpfully and honestly.")
USER: Any = {"role": "user", "content": "Why is the sky blue?"}
VERSION_HEADER = "x-drpo-prompt-version"
SHARE_METRIC = "drpo_canary_prompt_share"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DiskPromptStore]:
    with DiskPromptStore(tmp_path / "prompts") as opened:
        opened.ensure_seeded(SEED)
        yield opened


def client_of(key: str) -> str:
    """Return the client id the gateway derives from bearer key `key`."""
    return client_id({"authorization": f"Bearer {key}"}, None)


def keys_by_arm(
    version: str, share: float, count: int = 1
) -> tuple[list[str], list[str]]:
    """Return `count` bearer keys that land in the canary and `count` that do not."""
    canary: list[str] = []
    control: list[str] = []
    index = 0
    while len(canary) < count or len(control) < count:
        key = f"key-{index}"
        arm = canary if canary_bucket(version, client_of(key)) < share else control
        if len(arm) < count:
            arm.append(key)
        index += 1
    return canary, control


def version_of(record: PromptVersion | None) -> str | None:
    return None if record is None else record.version


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


# canary_bucket


def test_bucket_is_stable_per_client() -> None:
    first = canary_bucket("v2", "client-a")
    second = canary_bucket("v2", "client-a")

    assert first == second
    assert 0.0 <= first < 1.0


def test_bucket_differs_between_versions() -> None:
    clients = [f"client-{index}" for index in range(50)]

    v2 = [canary_bucket("v2", client) for client in clients]
    v3 = [canary_bucket("v3", client) for client in clients]

    assert v2 != v3


def test_bucket_spreads_clients_evenly() -> None:
    buckets = [canary_bucket("v2", f"client-{index}") for index in range(10_000)]
    below_tenth = sum(bucket < 0.1 for bucket in buckets) / len(buckets)
    below_half = sum(bucket < 0.5 for bucket in buckets) / len(buckets)

    assert all(0.0 <= bucket < 1.0 for bucket in buckets)
    assert 0.08 < below_tenth < 0.12
    assert 0.46 < below_half < 0.54


# ActivePrompts.resolve


async def test_resolve_splits_clients_by_bucket(store: DiskPromptStore) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.3)
    clients = [f"client-{index}" for index in range(200)]

    async with ActivePrompts(store) as prompts:
        served = {client: prompts.resolve("gemma", client=client) for client in clients}

    for client, record in served.items():
        expected = "v2" if canary_bucket("v2", client) < 0.3 else "v1"
        assert version_of(record) == expected, client


async def test_resolve_without_client_gets_active(store: DiskPromptStore) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.99)

    async with ActivePrompts(store) as prompts:
        record = prompts.resolve("gemma")

    assert version_of(record) == "v1"


async def test_pinned_version_beats_canary(store: DiskPromptStore) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.5)
    canary_client = next(
        f"c{index}" for index in range(1000) if canary_bucket("v2", f"c{index}") < 0.5
    )

    async with ActivePrompts(store) as prompts:
        unpinned = prompts.resolve("gemma", client=canary_client)
        pinned = prompts.resolve("gemma", pinned="v1", client=canary_client)

    assert version_of(unpinned) == "v2"
    assert version_of(pinned) == "v1"


async def test_default_canary_skips_models_with_own_pointer(
    store: DiskPromptStore,
) -> None:
    store.create("gemma", [])
    store.create("candidate", [])
    store.activate("v2", model="gemma")
    store.set_canary("v3", 0.5)
    clients = [f"client-{index}" for index in range(100)]

    async with ActivePrompts(store) as prompts:
        gemma = {version_of(prompts.resolve("gemma", client=c)) for c in clients}
        llama = {version_of(prompts.resolve("llama", client=c)) for c in clients}

    assert gemma == {"v2"}
    assert llama == {"v1", "v3"}


async def test_model_canary_controls_with_default(store: DiskPromptStore) -> None:
    store.create("default canary", [])
    store.create("gemma canary", [])
    store.set_canary("v2", 0.5)
    store.set_canary("v3", 0.5, model="gemma")
    clients = [f"client-{index}" for index in range(100)]

    async with ActivePrompts(store) as prompts:
        gemma = {version_of(prompts.resolve("gemma", client=c)) for c in clients}
        llama = {version_of(prompts.resolve("llama", client=c)) for c in clients}

    assert gemma == {"v1", "v3"}
    assert llama == {"v1", "v2"}


async def test_active_canaries_follow_store(store: DiskPromptStore) -> None:
    store.create("candidate", [])

    async with ActivePrompts(store, poll_interval=0.01) as prompts:
        before = dict(prompts.active_canaries)
        canary = store.set_canary("v2", 0.25)
        await wait_for(lambda: "*" in prompts.active_canaries)
        during = dict(prompts.active_canaries)
        store.clear_canary()
        await wait_for(lambda: not prompts.active_canaries)

    assert before == {}
    assert during == {"*": canary}


async def test_active_canaries_are_read_only(store: DiskPromptStore) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.25)

    async with ActivePrompts(store) as prompts:
        canaries: Any = prompts.active_canaries
        with pytest.raises(TypeError):
            canaries["*"] = None


async def test_canary_listeners_get_every_reload(store: DiskPromptStore) -> None:
    store.create("candidate", [])
    received: list[dict[str, Canary]] = []

    prompts = ActivePrompts(store, poll_interval=0.01)
    prompts.add_canary_listener(received.append)
    async with prompts:
        canary = store.set_canary("v2", 0.25, model="gemma")
        await wait_for(lambda: len(received) == 2)
        store.clear_canary(model="gemma")
        await wait_for(lambda: len(received) == 3)

    assert received == [{}, {"gemma": canary}, {}]


# Through a running gateway


def ask(client: openai.OpenAI, **headers: str) -> str:
    """Send one chat request and return the version header of the response."""
    response = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[USER], extra_headers=headers or None
    )
    version: str = response.headers[VERSION_HEADER]
    return version


def start_canary(gateway: RunningGateway, share: float) -> Canary:
    """Create v2, give it a canary of `share`, and wait until the gateway has it."""
    gateway.store.create("Answer like a pirate.", [])
    canary: Canary = gateway.store.set_canary("v2", share)
    prompts = gateway.app.state.gateway.parts.prompts
    if not wait_until(lambda: "*" in prompts.active_canaries):
        raise AssertionError("the gateway never loaded the canary")
    return canary


def test_gateway_splits_clients_consistently(start_gateway: GatewayFactory) -> None:
    keys = [f"key-{index}" for index in range(200)]
    gateway = start_gateway(api_keys=keys)
    start_canary(gateway, 0.5)
    base = gateway.client()

    first = {key: ask(base.with_options(api_key=key)) for key in keys}
    second = {key: ask(base.with_options(api_key=key)) for key in keys}

    in_canary = sum(version == "v2" for version in first.values())
    assert set(first.values()) == {"v1", "v2"}
    assert 60 <= in_canary <= 140
    assert second == first
    for key, version in first.items():
        expected = "v2" if canary_bucket("v2", client_of(key)) < 0.5 else "v1"
        assert version == expected, key


def test_gateway_pinned_header_beats_canary(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    start_canary(gateway, 0.5)
    (canary_key,), _ = keys_by_arm("v2", 0.5)
    client = gateway.client(api_key=canary_key)

    assert ask(client) == "v2"
    assert ask(client, **{"x-drpo-prompt": "v1"}) == "v1"
    assert ask(client, **{"x-drpo-prompt": "off"}) == "off"


@pytest.mark.parametrize(
    ("options", "route"),
    [
        ({}, "chat"),
        ({"default_mode": InjectionMode.BASE}, "chat"),
        ({"wrap_completions": True}, "completions"),
    ],
    ids=["chat", "base-mode", "wrapped-completions"],
)
def test_samples_record_served_canary_version(
    start_gateway: GatewayFactory, options: dict[str, Any], route: str
) -> None:
    gateway = start_gateway(sample_rate=1.0, **options)
    start_canary(gateway, 0.5)
    (canary_key,), (control_key,) = keys_by_arm("v2", 0.5)
    base = gateway.client()

    headers = {}
    for key in (canary_key, control_key):
        client = base.with_options(api_key=key)
        if route == "chat":
            headers[key] = ask(client)
        else:
            reply = client.completions.with_raw_response.create(
                model="fake-model", prompt="Once upon a time"
            )
            headers[key] = reply.headers[VERSION_HEADER]
    samples = {sample.client: sample for sample in gateway.stored_samples(2)}

    assert headers == {canary_key: "v2", control_key: "v1"}
    assert samples[client_of(canary_key)].prompt_version == "v2"
    assert samples[client_of(control_key)].prompt_version == "v1"


def test_promoting_canary_serves_everyone(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    start_canary(gateway, 0.5)
    canary_keys, control_keys = keys_by_arm("v2", 0.5, count=10)
    base = gateway.client()

    gateway.store.activate("v2")
    promoted_at = time.monotonic()
    first_control = base.with_options(api_key=control_keys[0])
    while ask(first_control) != "v2":
        assert time.monotonic() - promoted_at < 1.0, "promotion not served in 1 s"
    served = {ask(base.with_options(api_key=key)) for key in canary_keys + control_keys}

    assert gateway.store.canaries() == {}
    assert served == {"v2"}


def test_clearing_canary_restores_active_version(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway()
    start_canary(gateway, 0.5)
    canary_keys, control_keys = keys_by_arm("v2", 0.5, count=10)
    base = gateway.client()
    assert ask(base.with_options(api_key=canary_keys[0])) == "v2"

    gateway.store.clear_canary()
    cleared_at = time.monotonic()
    first_canary = base.with_options(api_key=canary_keys[0])
    while ask(first_canary) != "v1":
        assert time.monotonic() - cleared_at < 1.0, "clear not served in 1 s"
    served = {ask(base.with_options(api_key=key)) for key in canary_keys + control_keys}

    assert served == {"v1"}
    assert gateway.store.active_version() == "v1"


def test_canary_gauge_follows_store(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    before = gateway.samples(SHARE_METRIC)

    start_canary(gateway, 0.25)
    during = gateway.samples(SHARE_METRIC)
    gateway.store.clear_canary()
    cleared = wait_until(lambda: gateway.samples(SHARE_METRIC) == [])

    assert before == []
    assert during == [({"model": "*", "version": "v2"}, 0.25)]
    assert cleared
