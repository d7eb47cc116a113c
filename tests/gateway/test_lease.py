"""Leases in DiskPromptStore: one holder at a time, across threads and processes."""

from __future__ import annotations

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

import diskcache
import pytest

import gateway
from gateway.store import DiskPromptStore, Lease, StoreError

REPOSITORY_ROOT = Path(gateway.__file__).resolve().parents[1]
NAME = "optimizer"
LONG_TTL = 60.0
SHORT_TTL = 0.3


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "prompts"


@pytest.fixture
def store(store_dir: Path) -> Iterator[DiskPromptStore]:
    with DiskPromptStore(store_dir) as opened:
        yield opened


def test_free_lease_granted_to_owner(store: DiskPromptStore) -> None:
    before = datetime.now(UTC)

    lease = store.acquire_lease(NAME, "sidecar-a", LONG_TTL)

    assert lease is not None
    assert lease.name == NAME
    assert lease.owner == "sidecar-a"
    assert lease.expires_at >= before + timedelta(seconds=LONG_TTL)
    assert lease.expires_at.tzinfo is not None
    assert store.lease(NAME) == lease


def test_second_owner_rejected_while_held(store: DiskPromptStore) -> None:
    held = store.acquire_lease(NAME, "sidecar-a", LONG_TTL)

    rejected = store.acquire_lease(NAME, "sidecar-b", LONG_TTL)

    assert rejected is None
    assert store.lease(NAME) == held


def test_second_owner_granted_after_expiry(store: DiskPromptStore) -> None:
    store.acquire_lease(NAME, "sidecar-a", SHORT_TTL)
    time.sleep(SHORT_TTL + 0.1)

    expired = store.lease(NAME)
    taken = store.acquire_lease(NAME, "sidecar-b", LONG_TTL)

    assert expired is None
    assert taken is not None
    assert taken.owner == "sidecar-b"
    assert store.acquire_lease(NAME, "sidecar-a", LONG_TTL) is None


def test_owner_renewal_extends_expiry(store: DiskPromptStore) -> None:
    first = store.acquire_lease(NAME, "sidecar-a", SHORT_TTL)
    renewed = store.acquire_lease(NAME, "sidecar-a", LONG_TTL)
    time.sleep(SHORT_TTL + 0.1)

    rejected = store.acquire_lease(NAME, "sidecar-b", LONG_TTL)

    assert first is not None
    assert renewed is not None
    assert renewed.expires_at > first.expires_at
    assert rejected is None
    assert store.lease(NAME) == renewed


def test_release_frees_lease(store: DiskPromptStore) -> None:
    store.acquire_lease(NAME, "sidecar-a", LONG_TTL)

    store.release_lease(NAME, "sidecar-a")
    taken = store.acquire_lease(NAME, "sidecar-b", LONG_TTL)

    assert taken is not None
    assert taken.owner == "sidecar-b"


def test_release_by_other_owner_keeps_lease(store: DiskPromptStore) -> None:
    held = store.acquire_lease(NAME, "sidecar-a", LONG_TTL)

    store.release_lease(NAME, "sidecar-b")
    store.release_lease("unknown-lease", "sidecar-a")

    assert store.lease(NAME) == held
    assert store.lease("unknown-lease") is None


def test_leases_are_independent_by_name(store: DiskPromptStore) -> None:
    first = store.acquire_lease("optimizer", "sidecar-a", LONG_TTL)
    second = store.acquire_lease("canary-judge", "sidecar-b", LONG_TTL)

    assert first is not None
    assert second is not None


def test_lease_changes_keep_generation(store: DiskPromptStore) -> None:
    store.create("one", [])
    generation = store.generation()

    store.acquire_lease(NAME, "sidecar-a", LONG_TTL)
    store.acquire_lease(NAME, "sidecar-a", LONG_TTL)
    store.acquire_lease(NAME, "sidecar-b", LONG_TTL)
    store.release_lease(NAME, "sidecar-a")

    assert store.generation() == generation


def test_lease_seen_by_other_store_object(store_dir: Path) -> None:
    with DiskPromptStore(store_dir) as first, DiskPromptStore(store_dir) as second:
        held = first.acquire_lease(NAME, "sidecar-a", LONG_TTL)

        seen = second.lease(NAME)
        rejected = second.acquire_lease(NAME, "sidecar-b", LONG_TTL)

    assert seen == held
    assert rejected is None


@pytest.mark.parametrize("ttl", [0.0, -1.0, math.nan, math.inf])
def test_invalid_ttl_raises(store: DiskPromptStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        store.acquire_lease(NAME, "sidecar-a", ttl)

    assert store.lease(NAME) is None


@pytest.mark.parametrize(("name", "owner"), [("", "sidecar-a"), (NAME, "")])
def test_empty_name_or_owner_raises(
    store: DiskPromptStore, name: str, owner: str
) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        store.acquire_lease(name, owner, LONG_TTL)


def test_corrupt_lease_raises_store_error(store: DiskPromptStore) -> None:
    with diskcache.Cache(str(store.directory)) as raw:
        raw.set(f"lease:{NAME}", "{not json")

    with pytest.raises(StoreError, match="lease 'optimizer'"):
        store.lease(NAME)


def test_lease_is_frozen() -> None:
    lease = Lease(name=NAME, owner="sidecar-a", expires_at=datetime.now(UTC))

    with pytest.raises(ValueError):
        lease.owner = "sidecar-b"


# Races


def test_threads_racing_get_one_lease(store_dir: Path) -> None:
    rounds = 30
    stores = [DiskPromptStore(store_dir) for _ in range(2)]
    barrier = threading.Barrier(len(stores))
    winners: list[list[str]] = [[] for _ in range(rounds)]

    def race(store: DiskPromptStore, owner: str) -> None:
        for index in range(rounds):
            barrier.wait(timeout=30)
            if store.acquire_lease(f"race-{index}", owner, LONG_TTL) is not None:
                winners[index].append(owner)

    threads = [
        threading.Thread(target=race, args=(store, f"thread-{number}"))
        for number, store in enumerate(stores)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for store in stores:
        store.close()

    assert all(len(names) == 1 for names in winners), winners


RACE_SCRIPT = """
    import sys, time
    from pathlib import Path
    from gateway.store import DiskPromptStore

    store = DiskPromptStore(Path(sys.argv[1]))
    go_file, owner, rounds = Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    while not go_file.exists():
        time.sleep(0.005)
    for index in range(rounds):
        # Expired leases are raced for too: lease "stale-N" starts out held
        # by an owner whose expiry has passed.
        for name in (f"fresh-{index}", f"stale-{index}"):
            if store.acquire_lease(name, owner, 60.0) is not None:
                print(name)
"""


def test_processes_racing_get_one_lease(store_dir: Path, tmp_path: Path) -> None:
    rounds = 15
    with DiskPromptStore(store_dir) as store:
        for index in range(rounds):
            store.acquire_lease(f"stale-{index}", "crashed-sidecar", 0.01)
    go_file = tmp_path / "go"
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(RACE_SCRIPT),
                str(store_dir),
                str(go_file),
                f"process-{number}",
                str(rounds),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
        )
        for number in range(4)
    ]
    time.sleep(1.0)  # lets every process open the store before the race
    go_file.touch()
    outputs = [process.communicate(timeout=120) for process in processes]

    won = [line for stdout, _ in outputs for line in stdout.split()]
    expected = [
        f"{kind}-{index}" for kind in ("fresh", "stale") for index in range(rounds)
    ]
    assert all(process.returncode == 0 for process in processes), outputs
    assert sorted(won) == sorted(expected)
