"""The store contract on both backends, and what only RedisPromptStore does.

Each `store` and `samples` test runs twice: on the disk backend and on a real
redis-server started for the test. Both stores are opened through the
factory, as the gateway, the CLI and the sidecar open them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import gateway
import gateway.prompting
from gateway.errors import ConfigurationError, PromptVersionNotFoundError
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.prompts_cli import prompts_app
from gateway.sampling import Sample, SampledChoice, SampleStore
from gateway.sampling.redis_store import RedisSampleStore
from gateway.settings import Settings, load_settings
from gateway.store import (
    ActivationConflictError,
    ActivePrompts,
    PromptStore,
    StoreError,
)
from gateway.store.factory import (
    check_stores,
    open_prompt_store,
    open_sample_store,
)
from gateway.store.redis import RedisPromptStore
from gateway.store.redis_client import redact_url
from tests.redis_server import RedisServer, free_port, start_redis_server

REPOSITORY_ROOT = Path(gateway.__file__).resolve().parents[1]
EXAMPLE = Example(query="What is 2 + 2?", answer="2 + 2 is 4.")
SEED = Instruction(system_prompt="Answer helpfully and honestly.", examples=(EXAMPLE,))
LEASE = "optimizer"
LONG_TTL = 60.0
SHORT_TTL = 0.3
PASSWORD = "s3cret-Passw0rd"


@pytest.fixture(params=["disk", "redis"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings of the disk backend, or of the redis backend on a new server."""
    options: dict[str, Any] = {"data_dir": tmp_path / "data", "sample_max_count": 3}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        options |= {"store_backend": "redis", "redis_url": server.url}
    return load_settings(upstream="http://127.0.0.1:9/v1", **options)


@pytest.fixture
def store(backend_settings: Settings) -> Iterator[PromptStore]:
    opened = open_prompt_store(backend_settings)
    yield opened
    opened.close()


@pytest.fixture
def samples(backend_settings: Settings) -> Iterator[SampleStore]:
    opened = open_sample_store(backend_settings)
    yield opened
    opened.close()


def make_sample(client: str = "client-a", text: str = "hi", **fields: Any) -> Sample:
    values: dict[str, Any] = {
        "time": datetime.now(UTC),
        "route": "chat_completions",
        "client": client,
        "prompt_version": "v1",
        "messages": [{"role": "user", "content": text}],
        "choices": [SampledChoice(text="answer", finish_reason="stop")],
        "latency_seconds": 0.01,
        "status": 200,
        "outcome": "ok",
        "redacted": True,
        **fields,
    }
    return Sample(**values)


def texts_of(found: list[Sample]) -> list[str]:
    return [sample.messages[0]["content"] for sample in found if sample.messages]


def backend_environment(settings: Settings) -> dict[str, str]:
    """Return the environment that makes a new process open the same stores."""
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("DRPO_")
    }
    environment["PYTHONPATH"] = str(REPOSITORY_ROOT)
    environment["DRPO_DATA_DIR"] = str(settings.data_dir)
    environment["DRPO_STORE_BACKEND"] = settings.store_backend
    if settings.redis_url is not None:
        environment["DRPO_REDIS_URL"] = settings.redis_url.get_secret_value()
    return environment


def start_python(code: str, environment: dict[str, str], *args: str) -> Any:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


def version_of(record: PromptVersion | None) -> str | None:
    return None if record is None else record.version


# Versions


def test_create_allocates_sequential_ids(store: PromptStore) -> None:
    first = store.create("one", [EXAMPLE])
    second = store.create("two", [], parent=first.version)

    assert first.version == "v1"
    assert second.version == "v2"
    assert second.parent == "v1"


def test_get_returns_stored_record(store: PromptStore) -> None:
    created = store.create(
        "prompt é",
        [EXAMPLE],
        source="drpo",
        scores={"reward": 4.123456789012345},
        metadata={"beam": [1, 2], "note": "é"},
    )

    fetched = store.get("v1")

    assert fetched == created
    assert fetched.scores == {"reward": 4.123456789012345}
    assert fetched.metadata == {"beam": [1, 2], "note": "é"}


def test_get_unknown_version_raises_not_found(store: PromptStore) -> None:
    with pytest.raises(PromptVersionNotFoundError) as caught:
        store.get("v9")

    assert caught.value.version == "v9"


def test_create_unknown_parent_writes_nothing(store: PromptStore) -> None:
    with pytest.raises(PromptVersionNotFoundError) as caught:
        store.create("orphan", [], parent="v7")

    assert caught.value.param == "parent"
    assert store.list_versions() == []
    assert store.generation() == 0


def test_create_invalid_input_writes_nothing(store: PromptStore) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.create("prompt", [], scores={"reward": math.nan})
    with pytest.raises(ValueError):
        store.create("prompt", [], metadata={"object": object()})

    assert store.list_versions() == []
    assert store.create("next", []).version == "v1"


def test_list_versions_oldest_first(store: PromptStore) -> None:
    for text in ("a", "b", "c"):
        store.create(text, [])

    versions = store.list_versions()

    assert [record.version for record in versions] == ["v1", "v2", "v3"]
    assert [record.system_prompt for record in versions] == ["a", "b", "c"]


def test_second_store_object_sees_changes(backend_settings: Settings) -> None:
    first = open_prompt_store(backend_settings)
    first.create("kept", [EXAMPLE])
    first.activate("v1")
    first.close()

    second = open_prompt_store(backend_settings)
    try:
        assert second.get("v1").system_prompt == "kept"
        assert second.active_version() == "v1"
        assert second.create("next", []).version == "v2"
    finally:
        second.close()


CREATE_SCRIPT = """
    import sys
    from gateway.settings import load_settings
    from gateway.store.factory import open_prompt_store

    store = open_prompt_store(load_settings(upstream="http://127.0.0.1:9/v1"))
    print("ready", flush=True)
    sys.stdin.readline()
    for index in range(int(sys.argv[1])):
        print(store.create(f"{sys.argv[2]}-{index}", []).version)
    store.close()
"""


def test_four_processes_creating_get_unique_ids(
    backend_settings: Settings, store: PromptStore
) -> None:
    environment = backend_environment(backend_settings)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(CREATE_SCRIPT), "12", f"w{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for n in range(4)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    outputs = [process.communicate("go\n", timeout=120) for process in processes]

    ids = [line for stdout, _ in outputs for line in stdout.split()]
    assert all(process.returncode == 0 for process in processes), outputs
    assert sorted(ids) == sorted(f"v{number}" for number in range(1, 49))
    assert len(store.list_versions()) == 48
    assert store.generation() == 48


# Pointers, history and generation


def test_active_version_falls_back_to_default(store: PromptStore) -> None:
    store.create("default", [])
    store.create("gemma", [])

    store.activate("v1")
    store.activate("v2", model="gemma-3-270m")

    assert store.active_version() == "v1"
    assert store.active_version("gemma-3-270m") == "v2"
    assert store.active_version("llama") == "v1"
    assert store.active_pointers() == {"*": "v1", "gemma-3-270m": "v2"}


def test_active_version_none_when_empty(store: PromptStore) -> None:
    assert store.active_version() is None
    assert store.active_version("gemma") is None
    assert store.active_pointers() == {}


def test_activate_unknown_version_changes_nothing(store: PromptStore) -> None:
    store.create("one", [])
    store.activate("v1")
    generation = store.generation()

    with pytest.raises(PromptVersionNotFoundError):
        store.activate("v5")

    assert store.active_pointers() == {"*": "v1"}
    assert store.generation() == generation
    assert len(store.history()) == 1


def test_activate_reserved_model_name_raises(store: PromptStore) -> None:
    store.create("one", [])

    with pytest.raises(ValueError, match="reserved"):
        store.activate("v1", model="*")

    assert store.active_pointers() == {}


def test_history_records_previous_versions(store: PromptStore) -> None:
    for text in ("a", "b", "c"):
        store.create(text, [])
    store.activate("v1")
    store.activate("v2")
    store.activate("v3", model="gemma")

    default_events = store.history()
    gemma_events = store.history("gemma")

    assert [(e.version, e.previous) for e in default_events] == [
        ("v1", None),
        ("v2", "v1"),
    ]
    assert [(e.version, e.previous) for e in gemma_events] == [("v3", None)]
    assert all(event.model is None for event in default_events)
    assert gemma_events[0].model == "gemma"
    assert default_events[0].at <= default_events[1].at
    assert store.history("*") == default_events


def test_activate_same_version_records_nothing(store: PromptStore) -> None:
    store.create("a", [])
    store.activate("v1")
    generation = store.generation()

    store.activate("v1")

    assert len(store.history()) == 1
    assert store.generation() == generation


def test_generation_increases_on_every_change(store: PromptStore) -> None:
    generations = [store.generation()]
    store.create("a", [])
    generations.append(store.generation())
    store.create("b", [])
    generations.append(store.generation())
    store.activate("v1")
    generations.append(store.generation())
    store.set_canary("v2", 0.1)
    generations.append(store.generation())
    store.clear_canary()
    generations.append(store.generation())

    assert generations[0] == 0
    assert generations == sorted(set(generations))


def test_rollback_through_prompts_cli(
    backend_settings: Settings, store: PromptStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in backend_environment(backend_settings).items():
        if name.startswith("DRPO_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(gateway.prompting, "load_default_instruction", lambda: SEED)
    runner = CliRunner()
    store.ensure_seeded(SEED)
    store.create("second", [])

    activated = runner.invoke(prompts_app, ["activate", "v2"])
    after_activate = store.active_version()
    rolled_back = runner.invoke(prompts_app, ["rollback"])
    after_rollback = store.active_version()
    rolled_forward = runner.invoke(prompts_app, ["rollback"])

    assert activated.exit_code == 0, activated.output
    assert after_activate == "v2"
    assert rolled_back.exit_code == 0, rolled_back.output
    assert after_rollback == "v1"
    assert rolled_forward.exit_code == 0, rolled_forward.output
    assert store.active_version() == "v2"
    assert [event.version for event in store.history()] == ["v1", "v2", "v1", "v2"]


# Compare-and-set activation


def test_activate_expected_match_changes_pointer(store: PromptStore) -> None:
    store.create("a", [])
    store.create("b", [])
    store.activate("v1")

    store.activate("v2", expected="v1")

    assert store.active_version() == "v2"


def test_activate_expected_mismatch_changes_nothing(store: PromptStore) -> None:
    for text in ("a", "b", "c"):
        store.create(text, [])
    store.activate("v2")
    generation = store.generation()

    with pytest.raises(ActivationConflictError) as caught:
        store.activate("v3", expected="v1")

    assert caught.value.found == "v2"
    assert caught.value.expected == "v1"
    assert store.active_version() == "v2"
    assert store.generation() == generation
    assert len(store.history()) == 1


def test_activate_expected_none_means_unset(store: PromptStore) -> None:
    store.create("a", [])
    store.activate("v1")

    store.activate("v1", model="gemma", expected=None)
    with pytest.raises(ActivationConflictError):
        store.activate("v1", model="llama", expected="v1")

    assert store.active_pointers() == {"*": "v1", "gemma": "v1"}


def test_racing_compare_and_set_has_one_winner(backend_settings: Settings) -> None:
    rounds = 10
    stores = [open_prompt_store(backend_settings) for _ in range(2)]
    stores[0].create("base", [])
    stores[0].activate("v1")
    for _ in range(2 * rounds):
        stores[0].create("candidate", [])
    barrier = threading.Barrier(2)
    wins: list[list[int]] = [[] for _ in range(rounds)]

    def publish(index: int, store: PromptStore) -> None:
        for round_index in range(rounds):
            barrier.wait(timeout=30)
            expected = store.active_version()
            barrier.wait(timeout=30)
            candidate = f"v{2 + 2 * round_index + index}"
            try:
                store.activate(candidate, expected=expected)
            except ActivationConflictError:
                continue
            wins[round_index].append(index)

    threads = [
        threading.Thread(target=publish, args=(index, store))
        for index, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    history = stores[0].history()
    for opened in stores:
        opened.close()

    assert all(len(winners) == 1 for winners in wins), wins
    assert len(history) == rounds + 1


# Seeding


def test_ensure_seeded_creates_builtin_default(store: PromptStore) -> None:
    seeded = store.ensure_seeded(SEED)

    assert seeded is not None
    assert seeded.version == "v1"
    assert seeded.source == "builtin"
    assert seeded.instruction == SEED
    assert store.active_pointers() == {"*": "v1"}
    assert store.generation() > 0


def test_ensure_seeded_skips_non_empty_store(store: PromptStore) -> None:
    store.create("mine", [])

    assert store.ensure_seeded(SEED) is None
    assert len(store.list_versions()) == 1
    assert store.active_pointers() == {}


SEED_SCRIPT = """
    import sys
    from gateway.instruction import Instruction
    from gateway.settings import load_settings
    from gateway.store.factory import open_prompt_store

    store = open_prompt_store(load_settings(upstream="http://127.0.0.1:9/v1"))
    print("ready", flush=True)
    sys.stdin.readline()
    seeded = store.ensure_seeded(Instruction(system_prompt="seed"))
    print(seeded.version if seeded else "none")
    store.close()
"""


def test_concurrent_seeding_creates_one_version(
    backend_settings: Settings, store: PromptStore
) -> None:
    environment = backend_environment(backend_settings)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(SEED_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
        )
        for _ in range(4)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    outputs = [process.communicate("go\n", timeout=120) for process in processes]

    results = sorted(stdout.strip() for stdout, _ in outputs)
    assert all(process.returncode == 0 for process in processes), outputs
    assert results == ["none"] * 3 + ["v1"]
    assert [record.version for record in store.list_versions()] == ["v1"]
    assert store.active_pointers() == {"*": "v1"}


# Canaries


def test_set_canary_stores_canary(store: PromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")

    canary = store.set_canary("v2", 0.1)
    gemma = store.set_canary("v2", 0.3, model="gemma")

    assert canary.version == "v2"
    assert canary.share == 0.1
    assert canary.model is None
    assert store.canaries() == {"*": canary, "gemma": gemma}


@pytest.mark.parametrize("share", [0.0, 1.0, -0.5, math.nan])
def test_set_canary_invalid_share_raises(store: PromptStore, share: float) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")

    with pytest.raises(ValueError, match="strictly between 0"):
        store.set_canary("v2", share)

    assert store.canaries() == {}


def test_set_canary_active_version_raises(store: PromptStore) -> None:
    store.create("base", [])
    store.create("gemma", [])
    store.activate("v1")
    store.activate("v2", model="gemma")

    with pytest.raises(ValueError, match="already active"):
        store.set_canary("v1", 0.1, model="llama")
    with pytest.raises(ValueError, match="already active"):
        store.set_canary("v2", 0.1, model="gemma")
    with pytest.raises(PromptVersionNotFoundError):
        store.set_canary("v9", 0.1)

    assert store.canaries() == {}


def test_set_canary_same_version_keeps_start(store: PromptStore) -> None:
    for text in ("base", "candidate", "other"):
        store.create(text, [])
    store.activate("v1")

    first = store.set_canary("v2", 0.1)
    grown = store.set_canary("v2", 0.5)
    replaced = store.set_canary("v3", 0.2)

    assert grown.started_at == first.started_at
    assert grown.share == 0.5
    assert replaced.started_at > first.started_at
    assert store.canaries() == {"*": replaced}


def test_clear_canary_returns_ended_canary(store: PromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")
    canary = store.set_canary("v2", 0.1)
    generation = store.generation()

    ended = store.clear_canary()
    again = store.clear_canary()

    assert ended == canary
    assert again is None
    assert store.canaries() == {}
    assert store.generation() == generation + 1


def test_promoting_canary_ends_it(store: PromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")
    store.set_canary("v2", 0.1)
    store.set_canary("v2", 0.3, model="gemma")
    generation = store.generation()

    store.activate("v2", expected="v1")

    assert store.active_version() == "v2"
    assert list(store.canaries()) == ["gemma"]
    assert store.generation() == generation + 1
    assert store.history()[-1].previous == "v1"


def test_conflicting_activation_keeps_canary(store: PromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")
    canary = store.set_canary("v2", 0.1)

    with pytest.raises(ActivationConflictError):
        store.activate("v2", expected="v7")

    assert store.canaries() == {"*": canary}
    assert store.active_version() == "v1"


# Leases


def test_free_lease_granted_to_owner(store: PromptStore) -> None:
    before = datetime.now(UTC)

    lease = store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)

    assert lease is not None
    assert lease.owner == "sidecar-a"
    assert lease.expires_at >= before + timedelta(seconds=LONG_TTL)
    assert store.lease(LEASE) == lease


def test_second_owner_waits_for_expiry(store: PromptStore) -> None:
    store.acquire_lease(LEASE, "sidecar-a", SHORT_TTL)

    rejected = store.acquire_lease(LEASE, "sidecar-b", LONG_TTL)
    time.sleep(SHORT_TTL + 0.1)
    expired = store.lease(LEASE)
    taken = store.acquire_lease(LEASE, "sidecar-b", LONG_TTL)

    assert rejected is None
    assert expired is None
    assert taken is not None
    assert taken.owner == "sidecar-b"
    assert store.acquire_lease(LEASE, "sidecar-a", LONG_TTL) is None


def test_owner_renewal_extends_expiry(store: PromptStore) -> None:
    first = store.acquire_lease(LEASE, "sidecar-a", SHORT_TTL)
    renewed = store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)
    time.sleep(SHORT_TTL + 0.1)

    rejected = store.acquire_lease(LEASE, "sidecar-b", LONG_TTL)

    assert first is not None
    assert renewed is not None
    assert renewed.expires_at > first.expires_at
    assert rejected is None
    assert store.lease(LEASE) == renewed


def test_release_only_by_holder(store: PromptStore) -> None:
    held = store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)

    store.release_lease(LEASE, "sidecar-b")
    kept = store.lease(LEASE)
    store.release_lease(LEASE, "sidecar-a")
    taken = store.acquire_lease(LEASE, "sidecar-b", LONG_TTL)

    assert kept == held
    assert taken is not None
    assert taken.owner == "sidecar-b"


def test_lease_changes_keep_generation(store: PromptStore) -> None:
    store.create("one", [])
    generation = store.generation()

    store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)
    store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)
    store.acquire_lease(LEASE, "sidecar-b", LONG_TTL)
    store.release_lease(LEASE, "sidecar-a")

    assert store.generation() == generation


@pytest.mark.parametrize("ttl", [0.0, -1.0, math.nan, math.inf])
def test_invalid_ttl_raises(store: PromptStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        store.acquire_lease(LEASE, "sidecar-a", ttl)

    assert store.lease(LEASE) is None


def test_two_owners_racing_get_one_lease(backend_settings: Settings) -> None:
    rounds = 20
    stores = [open_prompt_store(backend_settings) for _ in range(2)]
    barrier = threading.Barrier(len(stores))
    winners: list[list[str]] = [[] for _ in range(rounds)]

    def race(store: PromptStore, owner: str) -> None:
        for index in range(rounds):
            barrier.wait(timeout=30)
            if store.acquire_lease(f"race-{index}", owner, LONG_TTL) is not None:
                winners[index].append(owner)

    threads = [
        threading.Thread(target=race, args=(store, f"owner-{number}"))
        for number, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for opened in stores:
        opened.close()

    assert all(len(names) == 1 for names in winners), winners


# Samples


def test_recent_returns_newest_last(samples: SampleStore) -> None:
    for index in range(3):
        samples.add(make_sample(text=f"q{index}"))

    assert texts_of(samples.recent(2)) == ["q1", "q2"]
    assert texts_of(samples.recent(10)) == ["q0", "q1", "q2"]
    assert samples.recent(0) == []


def test_recent_since_skips_older_samples(samples: SampleStore) -> None:
    now = datetime.now(UTC)
    samples.add(make_sample(text="old", time=now - timedelta(hours=2)))
    samples.add(make_sample(text="new", time=now))

    recent = samples.recent(10, since=now - timedelta(hours=1))
    naive = samples.recent(10, since=(now - timedelta(hours=1)).replace(tzinfo=None))

    assert texts_of(recent) == ["new"]
    assert naive == recent


def test_bound_evicts_oldest_samples(samples: SampleStore) -> None:
    # backend_settings bounds the sample store to 3 samples.
    for index in range(5):
        samples.add(make_sample(text=f"q{index}"))

    assert samples.count() == 3
    assert texts_of(samples.recent(10)) == ["q2", "q3", "q4"]


def test_eviction_keeps_client_counts(samples: SampleStore) -> None:
    for client in ("a", "b", "b", "c"):
        samples.add(make_sample(client=client))

    assert samples.count() == 3
    assert samples.count_for("a") == 0
    assert samples.count_for("b") == 2
    assert samples.count_for("c") == 1
    assert samples.count_for("unknown") == 0


def test_samples_shared_by_two_instances(backend_settings: Settings) -> None:
    writer = open_sample_store(backend_settings)
    reader = open_sample_store(backend_settings)
    writer.add(make_sample(text="shared"))

    found = reader.recent(1)

    assert texts_of(found) == ["shared"]
    writer.close()
    reader.close()


# Redis only: settings, URLs and errors


def test_redis_backend_without_url_names_both() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(upstream="http://127.0.0.1:9/v1", store_backend="redis")

    assert "DRPO_STORE_BACKEND" in str(caught.value)
    assert "DRPO_REDIS_URL" in str(caught.value)


def test_invalid_redis_url_hides_password() -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(
            upstream="http://127.0.0.1:9/v1", redis_url=f"http://:{PASSWORD}@host/0"
        )

    assert "redis://" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_settings_repr_hides_redis_password() -> None:
    settings = load_settings(
        upstream="http://127.0.0.1:9/v1",
        store_backend="redis",
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:6379/0",
    )

    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"redis://:{PASSWORD}@host:6379/0", "redis://:***@host:6379/0"),
        (f"rediss://user:{PASSWORD}@host/1", "rediss://user:***@host/1"),
        (
            f"unix:///run/redis.sock?password={PASSWORD}",
            "unix:///run/redis.sock?password=***",
        ),
    ],
)
def test_redact_url_hides_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_unreachable_server_raises_clear_store_error() -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"

    with pytest.raises(StoreError) as caught:
        RedisPromptStore(url)
    with pytest.raises(StoreError) as caught_samples:
        RedisSampleStore(url)

    message = str(caught.value)
    assert "redis://:***@127.0.0.1" in message
    assert "DRPO_REDIS_URL" in message
    assert "reachable" in message
    assert PASSWORD not in message
    assert PASSWORD not in str(caught_samples.value)


def test_check_stores_rejects_unreachable_redis(tmp_path: Path) -> None:
    settings = load_settings(
        upstream="http://127.0.0.1:9/v1",
        data_dir=tmp_path / "data",
        store_backend="redis",
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0",
    )

    with pytest.raises(StoreError) as caught:
        check_stores(settings)

    assert "prompt store" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_check_stores_writes_nothing(redis_server: RedisServer) -> None:
    settings = load_settings(
        upstream="http://127.0.0.1:9/v1",
        store_backend="redis",
        redis_url=redis_server.url,
        sample_rate=0.5,
    )

    check_stores(settings)

    with redis_server.client() as raw:
        assert raw.keys("*") == []


def test_wrong_password_raises_store_error(tmp_path: Path) -> None:
    server = start_redis_server(tmp_path / "redis", password=PASSWORD)
    wrong = f"redis://:not-{PASSWORD}x@127.0.0.1:{server.port}/0"
    try:
        with pytest.raises(StoreError) as caught:
            RedisPromptStore(wrong)
        with RedisPromptStore(server.url) as store:
            right = repr(store)
    finally:
        server.stop()

    assert f"not-{PASSWORD}x" not in str(caught.value)
    assert "password" in str(caught.value)
    assert PASSWORD not in right


def test_corrupt_redis_record_raises_store_error(redis_server: RedisServer) -> None:
    with RedisPromptStore(redis_server.url) as store:
        store.create("fine", [])
        with redis_server.client() as raw:
            raw.hset("drpo:versions", "v1", "{not json")
            raw.hset("drpo:canaries", "*", '{"version": 3}')

        with pytest.raises(StoreError, match="'v1'") as caught:
            store.get("v1")
        with pytest.raises(StoreError, match="canary"):
            store.canaries()

    assert "corrupt" in str(caught.value)


def test_prefixes_keep_stores_apart(redis_server: RedisServer) -> None:
    with (
        RedisPromptStore(redis_server.url, prefix="blue") as blue,
        RedisPromptStore(redis_server.url, prefix="green") as green,
    ):
        blue.create("blue", [])

        assert green.list_versions() == []
        assert green.generation() == 0
        assert blue.generation() == 1


# Redis only: change notifications


def test_changes_publish_new_generation(redis_server: RedisServer) -> None:
    with redis_server.client() as raw, RedisPromptStore(redis_server.url) as store:
        pubsub = raw.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe("drpo:changes")
        pubsub.get_message(timeout=1.0)
        store.create("a", [])
        store.create("b", [])
        store.activate("v1")
        store.acquire_lease(LEASE, "sidecar-a", LONG_TTL)
        store.set_canary("v2", 0.5)
        messages = []
        while (message := pubsub.get_message(timeout=0.5)) is not None:
            messages.append(message["data"])
        pubsub.close()

    assert messages == ["1", "2", "3", "4"]


async def test_push_reloads_without_waiting_for_poll(
    redis_server: RedisServer,
) -> None:
    store = RedisPromptStore(redis_server.url)
    store.ensure_seeded(SEED)
    store.create("candidate", [])

    # A 60 s poll interval leaves only the push to deliver the change in time.
    async with ActivePrompts(store, poll_interval=60.0) as prompts:
        activated_at = time.monotonic()
        await asyncio.to_thread(store.activate, "v2")
        await wait_for(lambda: version_of(prompts.resolve("gemma")) == "v2", 5.0)
        served_after = time.monotonic() - activated_at
    store.close()

    assert served_after < 1.0


async def test_push_survives_redis_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    server = start_redis_server(tmp_path / "redis", persistent=True)
    store = RedisPromptStore(server.url)
    store.ensure_seeded(SEED)
    store.create("after restart", [])
    try:
        async with ActivePrompts(store, poll_interval=60.0) as prompts:
            listener: Any = prompts._subscription
            await wait_for(listener.subscribed.is_set)
            await asyncio.to_thread(server.stop)
            await wait_for(lambda: "Lost the subscription" in caplog.text)
            await asyncio.to_thread(server.start)
            await wait_for(listener.subscribed.is_set)

            activated_at = time.monotonic()
            await asyncio.to_thread(store.activate, "v2")
            await wait_for(lambda: version_of(prompts.resolve("x")) == "v2", 5.0)
            served_after = time.monotonic() - activated_at
            task = prompts._task
            polling = task is not None and not task.done()
    finally:
        store.close()
        server.stop()

    assert served_after < 1.0
    assert polling
    assert "Subscribed again" in caplog.text


async def test_polling_continues_while_redis_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.store")
    server = start_redis_server(tmp_path / "redis", persistent=True)
    store = RedisPromptStore(server.url)
    store.ensure_seeded(SEED)
    store.create("after outage", [])
    try:
        async with ActivePrompts(store, poll_interval=0.05, push=False) as prompts:
            await asyncio.to_thread(server.stop)
            await wait_for(lambda: "poll failed" in caplog.text)
            served_meanwhile = version_of(prompts.resolve("gemma"))
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(store.activate, "v2")
            await wait_for(lambda: version_of(prompts.resolve("gemma")) == "v2")
            subscription = prompts._subscription
    finally:
        store.close()
        server.stop()

    assert served_meanwhile == "v1"
    assert subscription is None
    assert "recovered after" in caplog.text


# Redis only: the sample store under concurrent writers


def test_concurrent_adds_keep_counts_consistent(redis_server: RedisServer) -> None:
    writers = [RedisSampleStore(redis_server.url, max_count=25) for _ in range(4)]
    clients = ["a", "b", "c"]

    def write(store: RedisSampleStore, number: int) -> None:
        for index in range(40):
            store.add(make_sample(client=clients[(number + index) % 3]))

    threads = [
        threading.Thread(target=write, args=(store, number))
        for number, store in enumerate(writers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    reader = writers[0]
    count = reader.count()
    stored_clients = [sample.client for sample in reader.recent(100)]
    counts = {client: reader.count_for(client) for client in clients}
    for store in writers:
        store.close()

    assert count == 25
    assert len(stored_clients) == 25
    assert counts == {client: stored_clients.count(client) for client in clients}


def test_sample_store_error_names_redis(redis_server: RedisServer) -> None:
    store = RedisSampleStore(redis_server.url)
    redis_server.stop()

    with pytest.raises(StoreError) as caught:
        store.add(make_sample())

    assert "sample store" in str(caught.value)
    assert "DRPO_REDIS_URL" in str(caught.value)
    store.close()


async def test_emptied_store_keeps_loaded_versions(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisPromptStore(redis_server.url)
    store.ensure_seeded(SEED)
    store.create("candidate", [])
    store.activate("v2")

    async with ActivePrompts(store, poll_interval=0.05) as prompts:
        with redis_server.client() as raw:
            raw.flushall()
        await wait_for(lambda: "has no active versions any more" in caplog.text)
        kept = version_of(prompts.resolve("gemma"))
        store.ensure_seeded(SEED)
        await wait_for(lambda: version_of(prompts.resolve("gemma")) == "v1", 5.0)
    store.close()

    assert kept == "v2"
