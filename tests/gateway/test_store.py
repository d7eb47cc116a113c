"""Tests of the prompt store (DiskPromptStore) and its live view (ActivePrompts)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import diskcache
import pytest

import gateway
from gateway.errors import PromptVersionNotFoundError, ServiceUnavailableError
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.store import (
    ActivationConflictError,
    ActivationEvent,
    ActivePrompts,
    DiskPromptStore,
    StoreError,
)

REPOSITORY_ROOT = Path(gateway.__file__).resolve().parents[1]
EXAMPLE = Example(query="What is 2 + 2?", answer="2 + 2 is 4.")
SEED = Instruction(system_prompt="Answer helpfully and honestly.", examples=(EXAMPLE,))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "prompts"


@pytest.fixture
def store(store_dir: Path) -> Any:
    with DiskPromptStore(store_dir) as opened:
        yield opened


def run_python(code: str, *args: str, timeout: float = 60) -> str:
    """Run `code` in a new interpreter that imports this checkout; return stdout."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def start_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
    )


class FlakyStore(DiskPromptStore):
    """A real DiskPromptStore whose reads fail while `failing` is set."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.failing = False
        self.get_calls = 0

    def generation(self) -> int:
        if self.failing:
            raise StoreError("The prompt store is unavailable (simulated).")
        return super().generation()

    def get(self, version: str) -> PromptVersion:
        self.get_calls += 1
        if self.failing:
            raise StoreError("The prompt store is unavailable (simulated).")
        return super().get(version)


# DiskPromptStore: versions


def test_create_unknown_parent_raises(store: DiskPromptStore) -> None:
    with pytest.raises(PromptVersionNotFoundError) as caught:
        store.create("orphan", [], parent="v7")

    assert caught.value.param == "parent"
    assert store.list_versions() == []
    assert store.generation() == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_create_non_finite_score_raises(store: DiskPromptStore, value: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        store.create("prompt", [], scores={"reward": value})

    assert store.list_versions() == []


def test_create_unserializable_metadata_writes_nothing(
    store: DiskPromptStore,
) -> None:
    with pytest.raises(ValueError):
        store.create("prompt", [], metadata={"object": object()})

    assert store.list_versions() == []
    assert store.create("next", []).version == "v1"


def test_versions_survive_reopening(store_dir: Path) -> None:
    with DiskPromptStore(store_dir) as first:
        first.create("kept", [EXAMPLE])
        first.activate("v1")

    with DiskPromptStore(store_dir) as second:
        assert second.get("v1").system_prompt == "kept"
        assert second.active_version() == "v1"
        assert second.create("next", []).version == "v2"


def test_large_record_round_trips(store: DiskPromptStore) -> None:
    # Larger than diskcache's default 32 KiB threshold for separate value files.
    text = "x" * 200_000

    store.create(text, [])

    assert store.get("v1").system_prompt == text
    assert not any(path.suffix == ".val" for path in store.directory.rglob("*"))


# DiskPromptStore: pointers and history


def test_history_star_means_default(store: DiskPromptStore) -> None:
    store.create("a", [])
    store.activate("v1")

    assert store.history("*") == store.history()


def test_activation_event_is_frozen() -> None:
    event = ActivationEvent(
        model=None, version="v1", previous=None, at=datetime.now(UTC)
    )

    with pytest.raises(ValueError):
        event.version = "v2"  # type: ignore[misc]


# DiskPromptStore: compare-and-set activation


def test_activate_expected_ignores_default_fallback(store: DiskPromptStore) -> None:
    store.create("default", [])
    store.create("gemma", [])
    store.activate("v1")

    with pytest.raises(ActivationConflictError) as caught:
        store.activate("v2", model="gemma", expected="v1")

    assert caught.value.found is None
    assert caught.value.model == "gemma"
    assert store.active_pointers() == {"*": "v1"}


def test_activate_expected_conflict_on_same_version(store: DiskPromptStore) -> None:
    store.create("a", [])
    store.activate("v1")

    with pytest.raises(ActivationConflictError):
        store.activate("v1", expected=None)


def test_concurrent_expected_activations_one_wins(store_dir: Path) -> None:
    DiskPromptStore(store_dir).close()
    stores = [DiskPromptStore(store_dir) for _ in range(2)]
    stores[0].create("base", [])
    stores[0].activate("v1")
    rounds = 20
    barrier = threading.Barrier(len(stores))
    outcomes: list[list[str]] = [[] for _ in range(rounds)]

    def publish(store: DiskPromptStore) -> None:
        for index in range(rounds):
            candidate = store.create(f"candidate {index}", []).version
            barrier.wait(timeout=30)
            current = store.active_version()
            barrier.wait(timeout=30)
            try:
                store.activate(candidate, expected=current)
            except ActivationConflictError:
                outcomes[index].append("conflict")
            else:
                outcomes[index].append("published")

    threads = [threading.Thread(target=publish, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for opened in stores:
        opened.close()

    assert all(sorted(pair) == ["conflict", "published"] for pair in outcomes)


# DiskPromptStore: canaries


def test_model_canary_keyed_by_model(store: DiskPromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])
    store.activate("v1")

    canary = store.set_canary("v2", 0.5, model="gemma")

    assert canary.model == "gemma"
    assert store.canaries() == {"gemma": canary}


def test_set_canary_unknown_version_raises(store: DiskPromptStore) -> None:
    store.create("base", [])
    store.activate("v1")

    with pytest.raises(PromptVersionNotFoundError):
        store.set_canary("v9", 0.1)

    assert store.canaries() == {}


def test_set_canary_reserved_model_name_raises(store: DiskPromptStore) -> None:
    store.create("base", [])
    store.create("candidate", [])

    with pytest.raises(ValueError, match="reserved"):
        store.set_canary("v2", 0.1, model="*")


def test_activate_canary_version_ends_canary(store: DiskPromptStore) -> None:
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


def test_activate_other_version_keeps_canary(store: DiskPromptStore) -> None:
    for text in ("base", "candidate", "other"):
        store.create(text, [])
    store.activate("v1")
    canary = store.set_canary("v2", 0.1)

    store.activate("v3")

    assert store.canaries() == {"*": canary}


def test_canaries_survive_reopening(store_dir: Path) -> None:
    with DiskPromptStore(store_dir) as first:
        first.create("base", [])
        first.create("candidate", [])
        first.activate("v1")
        canary = first.set_canary("v2", 0.25)

    with DiskPromptStore(store_dir) as second:
        assert second.canaries() == {"*": canary}


def test_corrupt_canaries_raise_store_error(store: DiskPromptStore) -> None:
    with diskcache.Cache(str(store.directory)) as raw:
        raw.set("canaries", '{"*": {"version": 3}}')

    with pytest.raises(StoreError, match="canaries"):
        store.canaries()


# DiskPromptStore: seeding and several processes


SEED_SCRIPT = """
    import sys, time
    from pathlib import Path
    from gateway.instruction import Instruction
    from gateway.store import DiskPromptStore

    directory, go_file = Path(sys.argv[1]), Path(sys.argv[2])
    store = DiskPromptStore(directory)
    while not go_file.exists():
        time.sleep(0.005)
    seeded = store.ensure_seeded(Instruction(system_prompt="seed"))
    print(seeded.version if seeded else "none")
"""


def test_ensure_seeded_concurrent_processes_create_one(
    store_dir: Path, tmp_path: Path
) -> None:
    go_file = tmp_path / "go"
    processes = [
        start_python(SEED_SCRIPT, str(store_dir), str(go_file)) for _ in range(6)
    ]
    time.sleep(1.0)  # lets every process open the store before the race
    go_file.touch()
    outputs = [process.communicate(timeout=120) for process in processes]

    results = sorted(stdout.strip() for stdout, _ in outputs)
    assert all(process.returncode == 0 for process in processes), outputs
    assert results == ["none"] * 5 + ["v1"]
    with DiskPromptStore(store_dir) as store:
        assert [record.version for record in store.list_versions()] == ["v1"]
        assert store.active_pointers() == {"*": "v1"}


CREATE_SCRIPT = """
    import sys
    from pathlib import Path
    from gateway.store import DiskPromptStore

    store = DiskPromptStore(Path(sys.argv[1]))
    for index in range(int(sys.argv[2])):
        print(store.create(f"{sys.argv[3]}-{index}", []).version)
"""


def test_concurrent_creates_get_unique_ids(store_dir: Path) -> None:
    DiskPromptStore(store_dir).close()
    processes = [
        start_python(CREATE_SCRIPT, str(store_dir), "15", f"writer{n}")
        for n in range(3)
    ]
    outputs = [process.communicate(timeout=120) for process in processes]

    ids = [line for stdout, _ in outputs for line in stdout.split()]
    assert all(process.returncode == 0 for process in processes), outputs
    assert sorted(ids) == sorted(f"v{number}" for number in range(1, 46))
    with DiskPromptStore(store_dir) as store:
        assert len(store.list_versions()) == 45
        assert store.generation() == 45


# DiskPromptStore: damaged stores


def test_corrupt_record_raises_store_error(store: DiskPromptStore) -> None:
    store.create("fine", [])
    with diskcache.Cache(str(store.directory)) as raw:
        raw.set("version:v1", "{not json")

    with pytest.raises(StoreError) as caught:
        store.get("v1")

    assert str(store.directory) in str(caught.value)
    assert "'v1'" in str(caught.value)
    with pytest.raises(StoreError):
        store.list_versions()


def test_corrupt_pointers_raise_store_error(store: DiskPromptStore) -> None:
    with diskcache.Cache(str(store.directory)) as raw:
        raw.set("pointers", "[1, 2]")

    with pytest.raises(StoreError, match="active pointers"):
        store.active_version()


def test_corrupt_database_raises_store_error(store_dir: Path) -> None:
    store_dir.mkdir()
    (store_dir / "cache.db").write_bytes(b"this is not sqlite" * 100)

    with pytest.raises(StoreError) as caught:
        DiskPromptStore(store_dir)

    assert str(store_dir) in str(caught.value)


def test_directory_under_file_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file, not a directory")

    with pytest.raises(StoreError) as caught:
        DiskPromptStore(blocker / "prompts")

    assert str(blocker / "prompts") in str(caught.value)


# ActivePrompts


async def test_resolve_uses_model_then_default(store: DiskPromptStore) -> None:
    store.ensure_seeded(SEED)
    store.create("for gemma", [])
    store.activate("v2", model="gemma")

    async with ActivePrompts(store) as prompts:
        gemma = prompts.resolve("gemma")
        other = prompts.resolve("llama")

    assert gemma is not None
    assert gemma.version == "v2"
    assert other is not None
    assert other.version == "v1"


async def test_resolve_empty_store_returns_none(store: DiskPromptStore) -> None:
    async with ActivePrompts(store) as prompts:
        assert prompts.resolve("gemma") is None
        assert prompts.generation == 0


async def test_resolve_pinned_version_wins(store: DiskPromptStore) -> None:
    store.ensure_seeded(SEED)
    store.create("pinned", [])

    async with ActivePrompts(store) as prompts:
        pinned = prompts.resolve("gemma", pinned="v2")

    assert pinned is not None
    assert pinned.system_prompt == "pinned"


async def test_resolve_unknown_pinned_raises_with_param(
    store: DiskPromptStore,
) -> None:
    store.ensure_seeded(SEED)

    async with ActivePrompts(store) as prompts:
        with pytest.raises(PromptVersionNotFoundError) as caught:
            prompts.resolve("gemma", pinned="v42")

    assert caught.value.param == "x-drpo-prompt"
    assert caught.value.status_code == 404


async def test_resolve_caches_pinned_versions(store_dir: Path) -> None:
    store = FlakyStore(store_dir)
    store.ensure_seeded(SEED)
    store.create("pinned", [])

    async with ActivePrompts(store) as prompts:
        calls_before = store.get_calls
        first = prompts.resolve("gemma", pinned="v2")
        second = prompts.resolve("gemma", pinned="v2")
        store.failing = True
        third = prompts.resolve("gemma", pinned="v2")
        store.failing = False

    assert first is second
    assert third is first
    assert store.get_calls == calls_before + 1
    store.close()


async def test_resolve_pinned_store_failure_raises_503(store_dir: Path) -> None:
    store = FlakyStore(store_dir)
    store.ensure_seeded(SEED)

    async with ActivePrompts(store) as prompts:
        store.failing = True
        with pytest.raises(ServiceUnavailableError) as caught:
            prompts.resolve("gemma", pinned="v1000")
        store.failing = False

    assert caught.value.status_code == 503
    assert caught.value.param == "x-drpo-prompt"
    store.close()


async def test_snapshot_kept_by_reader_survives_swap(store: DiskPromptStore) -> None:
    store.ensure_seeded(SEED)
    store.create("new", [])

    async with ActivePrompts(store, poll_interval=0.01) as prompts:
        before = prompts.active
        store.activate("v2")
        await wait_for(lambda: prompts.generation == store.generation())
        after = prompts.active

    assert before["*"].version == "v1"
    assert after["*"].version == "v2"


async def test_activation_from_other_process_served_within_second(
    store: DiskPromptStore,
) -> None:
    store.ensure_seeded(SEED)
    store.create("candidate", [])
    activate_script = """
        import sys, time
        from pathlib import Path
        from gateway.store import DiskPromptStore

        store = DiskPromptStore(Path(sys.argv[1]))
        store.activate("v2", model="gemma")
        print(time.time())
    """

    async with ActivePrompts(store, poll_interval=0.2) as prompts:
        seen_at: list[float] = []

        async def watch() -> None:
            while True:
                current = prompts.resolve("gemma")
                if current is not None and current.version == "v2":
                    seen_at.append(time.time())
                    return
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            textwrap.dedent(activate_script),
            str(store.directory),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
        )
        stdout, _ = await process.communicate()
        activated_at = float(stdout.decode().strip())
        await asyncio.wait_for(watcher, timeout=30)

    assert process.returncode == 0
    assert seen_at[0] - activated_at < 1.0


async def test_poll_errors_logged_and_retried(
    store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore(store_dir)
    store.ensure_seeded(SEED)
    store.create("after outage", [])
    caplog.set_level(logging.INFO, logger="gateway.store.active")

    async with ActivePrompts(store, poll_interval=0.01) as prompts:
        store.failing = True
        await wait_for(lambda: "poll failed" in caplog.text)
        await asyncio.sleep(0.1)
        task = prompts._task
        assert task is not None
        assert not task.done()

        store.failing = False
        store.activate("v2")
        await wait_for(lambda: version_of(prompts.resolve("gemma")) == "v2")

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "simulated" in warnings[0].getMessage()
    assert "recovered after" in caplog.text
    store.close()


async def test_start_propagates_store_error(store_dir: Path) -> None:
    store = FlakyStore(store_dir)
    store.failing = True
    prompts = ActivePrompts(store)

    with pytest.raises(StoreError):
        await prompts.start()

    store.close()


async def test_listeners_get_every_reload(
    store: DiskPromptStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.ensure_seeded(SEED)
    store.create("second", [])
    received: list[dict[str, str]] = []

    def broken(_: dict[str, PromptVersion]) -> None:
        raise RuntimeError("listener bug")

    def record(versions: dict[str, PromptVersion]) -> None:
        received.append({key: value.version for key, value in versions.items()})

    prompts = ActivePrompts(store, poll_interval=0.01)
    prompts.add_listener(broken)
    prompts.add_listener(record)
    async with prompts:
        store.activate("v2", model="gemma")
        await wait_for(lambda: len(received) == 2)

    assert received == [{"*": "v1"}, {"*": "v1", "gemma": "v2"}]
    assert "listener bug" in caplog.text


async def test_stop_ends_polling_task(store: DiskPromptStore) -> None:
    prompts = ActivePrompts(store, poll_interval=0.01)
    await prompts.start()
    task = prompts._task

    await prompts.stop()

    assert task is not None
    assert task.cancelled()
    assert prompts._task is None


def test_non_positive_poll_interval_raises(store: DiskPromptStore) -> None:
    with pytest.raises(ValueError, match="poll_interval"):
        ActivePrompts(store, poll_interval=0)


def version_of(record: PromptVersion | None) -> str | None:
    return None if record is None else record.version


async def wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
