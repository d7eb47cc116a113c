"""When a cycle is due, and the loop that starts cycles on its own."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.sampling import DiskSampleStore, Sample
from gateway.store import StoreError
from optimizer.sidecar.plans import TriggerState
from optimizer.sidecar.trigger import count_new_samples, due_reason
from tests.optimizer.sidecar.scripted import (
    feature_models,
    make_sidecar,
    question_samples,
    read_reports,
    sample,
    sidecar_settings,
    store_samples,
)

NOW = datetime(2025, 1, 1, 12, tzinfo=UTC)


def due(state: TriggerState, new_samples: int = 0) -> str | None:
    return due_reason(state, NOW, new_samples, interval=600, min_new_samples=50)


def test_first_cycle_is_due() -> None:
    assert due(TriggerState()) == "first cycle"


def test_interval_starts_cycle() -> None:
    state = TriggerState(last_cycle_at=NOW - timedelta(seconds=601))

    reason = due(state)

    assert reason is not None
    assert reason.startswith("interval")


def test_new_samples_start_cycle() -> None:
    state = TriggerState(last_cycle_at=NOW - timedelta(seconds=10))

    reason = due(state, new_samples=50)

    assert reason == "new samples: 50 since the last cycle"


def test_quiet_period_is_not_due() -> None:
    state = TriggerState(last_cycle_at=NOW - timedelta(seconds=10))

    assert due(state, new_samples=49) is None


def test_new_samples_counted_past_bound(tmp_path: Path) -> None:
    """A full store keeps its count, but new samples are still seen by time."""
    store = DiskSampleStore(tmp_path, max_count=5)
    for index in range(5):
        store.add(sample(f"Old {index}?", time=NOW + timedelta(seconds=index)))
    newest_seen = NOW + timedelta(seconds=4)
    for index in range(3):
        store.add(sample(f"New {index}?", time=NOW + timedelta(seconds=10 + index)))

    counted = count_new_samples(store, newest_seen, limit=50)
    capped = count_new_samples(store, newest_seen, limit=2)

    assert store.count() == 5
    assert counted == 3
    assert capped == 3
    store.close()


def test_trigger_state_survives_restart(tmp_path: Path) -> None:
    state = TriggerState(last_cycle_at=NOW, newest_sample_at=NOW - timedelta(1))

    state.save(tmp_path)

    assert TriggerState.load(tmp_path) == state
    assert TriggerState.load(tmp_path / "missing") == TriggerState()


async def test_loop_runs_on_interval_and_samples(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(
            fake, tmp_path, interval=0.4, min_new_samples=3, min_queries=100
        )
        sidecar = make_sidecar(settings)
        loop = asyncio.create_task(sidecar.run_forever())
        try:
            await _wait_for_reports(tmp_path, 1)
            store_samples(settings, question_samples()[:3])
            await _wait_for_reports(tmp_path, 2, timeout=0.3)
            await _wait_for_reports(tmp_path, 3)
        finally:
            sidecar.stop("test finished")
            await asyncio.wait_for(loop, 5)
            sidecar.close()

    triggers = [report["trigger"] for report in read_reports(tmp_path)]
    assert triggers[0] == "first cycle"
    assert triggers[1] == "new samples: 3 since the last cycle"
    assert triggers[2].startswith("interval")


async def _wait_for_reports(data_dir: Path, count: int, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(read_reports(data_dir)) < count:
        assert asyncio.get_running_loop().time() < deadline, (
            f"fewer than {count} reports after {timeout} s"
        )
        await asyncio.sleep(0.02)


class FailingOnceSamples(DiskSampleStore):
    """A sample store whose first read fails, as when another process locks it."""

    failed = False

    def recent(self, limit: int, since: datetime | None = None) -> list[Sample]:
        if not self.failed:
            self.failed = True
            raise StoreError("The sample store is locked.")
        return super().recent(limit, since)


async def test_loop_survives_failed_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path, interval=0.2)
        samples = FailingOnceSamples(settings.sample_dir)
        sidecar = make_sidecar(settings, samples=samples)
        loop = asyncio.create_task(sidecar.run_forever())
        try:
            await _wait_for_reports(tmp_path, 1)
        finally:
            sidecar.stop("test finished")
            await asyncio.wait_for(loop, 5)
            sidecar.close()

    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert samples.failed
    assert errors == [
        "The cycle failed, retrying in 0.2 s: The sample store is locked."
    ]
