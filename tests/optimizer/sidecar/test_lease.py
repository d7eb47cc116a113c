"""The sidecar lease keeper on a real store: standby, take-over and renewal."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.store import DiskPromptStore
from optimizer.sidecar.lease import LEASE_NAME, LeaseKeeper, new_owner_id


@pytest.fixture
def store(tmp_path: Path) -> DiskPromptStore:
    return DiskPromptStore(tmp_path / "prompts")


def exited_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_standby_logs_holder_once(
    store: DiskPromptStore, caplog: pytest.LogCaptureFixture
) -> None:
    holder = LeaseKeeper(store, new_owner_id(), ttl=30)
    waiting = LeaseKeeper(store, new_owner_id(), ttl=30)
    caplog.set_level(logging.INFO, "optimizer.sidecar.lease")

    assert holder.try_acquire()
    results = [waiting.try_acquire() for _ in range(3)]

    standby = [r for r in caplog.records if "On standby" in r.getMessage()]
    assert results == [False, False, False]
    assert len(standby) == 1
    assert holder.owner in standby[0].getMessage()


def test_dead_local_holder_is_replaced(store: DiskPromptStore) -> None:
    dead = f"{socket.gethostname()}:{exited_pid()}:abcd"
    assert store.acquire_lease(LEASE_NAME, dead, 60) is not None
    keeper = LeaseKeeper(store, new_owner_id(), ttl=30)

    taken = keeper.try_acquire()

    lease = store.lease(LEASE_NAME)
    assert taken
    assert lease is not None
    assert lease.owner == keeper.owner


def test_live_holder_is_kept(store: DiskPromptStore) -> None:
    alive = f"{socket.gethostname()}:{os.getppid()}:abcd"
    assert store.acquire_lease(LEASE_NAME, alive, 60) is not None
    keeper = LeaseKeeper(store, new_owner_id(), ttl=30)

    taken = keeper.try_acquire()

    lease = store.lease(LEASE_NAME)
    assert not taken
    assert lease is not None
    assert lease.owner == alive


async def test_renewal_keeps_lease_past_ttl(store: DiskPromptStore) -> None:
    keeper = LeaseKeeper(store, new_owner_id(), ttl=0.6)
    rival = LeaseKeeper(store, new_owner_id(), ttl=0.6)
    assert keeper.try_acquire()

    keeper.start_renewing()
    await asyncio.sleep(1.5)
    rival_took_it = rival.try_acquire()
    confirmed = keeper.confirm()
    await keeper.release()

    assert not rival_took_it
    assert confirmed
    assert store.lease(LEASE_NAME) is None
    assert rival.try_acquire()
