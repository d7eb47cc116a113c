"""Resuming a cycle from its plan after a stop or a kill, in process."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.store import DiskPromptStore
from optimizer.sidecar.plans import PlanStore
from tests.optimizer.fake_models import FAKE_MODEL, FakeReply
from tests.optimizer.sidecar.scripted import (
    feature_judge,
    feature_models,
    make_sidecar,
    question_samples,
    read_reports,
    sidecar_settings,
    store_samples,
)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler catches it."""


class KilledBeforeActivation(DiskPromptStore):
    """A store whose process dies right after the run created its version."""

    def activate(self, version: str, *args: Any, **kwargs: Any) -> None:
        if self.get(version).source == "optimizer":
            raise Killed
        super().activate(version, *args, **kwargs)


def plan_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "sidecar").glob("pending-*.json"))


async def test_kill_before_activation_reuses_version(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        dying = make_sidecar(settings, store=KilledBeforeActivation(settings.store_dir))
        with pytest.raises(Killed):
            await dying.run_once()
        dying.close()
        plans_after_kill = plan_files(tmp_path)
        versions_after_kill = [
            v.version for v in DiskPromptStore(settings.store_dir).list_versions()
        ]

        calls_before = len(fake.calls)
        sidecar = make_sidecar(settings)
        try:
            (report,) = await sidecar.run_once()
        finally:
            sidecar.close()
        calls_after = len(fake.calls)

    store = DiskPromptStore(settings.store_dir)
    assert len(plans_after_kill) == 1
    assert versions_after_kill == ["v1", "v2"]
    assert report.outcome == "published", report.reason
    assert report.resumed
    assert report.published_version == "v2"
    assert [v.version for v in store.list_versions()] == ["v1", "v2"]
    assert store.active_version(FAKE_MODEL) == "v2"
    assert calls_after == calls_before
    assert report.cache_hits > 0
    assert not plan_files(tmp_path)
    assert read_reports(tmp_path)[-1]["resumed"] is True
    store.close()


async def test_stop_keeps_plan_for_resume(tmp_path: Path) -> None:
    judged = asyncio.Event()

    with feature_models() as fake:
        loop = asyncio.get_running_loop()

        def slow_judge(body: dict[str, Any]) -> Any:
            loop.call_soon_threadsafe(judged.set)
            reply = feature_judge(body)
            assert isinstance(reply, dict)
            return FakeReply(body=reply, delay=0.05)

        fake.judge = slow_judge
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        sidecar = make_sidecar(settings)
        task = asyncio.create_task(sidecar.run_forever())
        await asyncio.wait_for(judged.wait(), 10)
        sidecar.stop("test stop")
        await asyncio.wait_for(task, 10)
        sidecar.close()
        plans = plan_files(tmp_path)
        reports_after_stop = read_reports(tmp_path)
        plan = json.loads(plans[0].read_text())

        fake.judge = feature_judge
        resumed = make_sidecar(settings)
        try:
            (report,) = await resumed.run_once()
        finally:
            resumed.close()

    assert len(plans) == 1
    assert reports_after_stop == []
    assert report.run_id == plan["run_id"]
    assert report.resumed
    assert report.outcome == "published", report.reason
    assert report.cache_hits > 0
    assert not plan_files(tmp_path)


async def test_stale_plan_is_skipped(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        dying = make_sidecar(settings, store=KilledBeforeActivation(settings.store_dir))
        with pytest.raises(Killed):
            await dying.run_once()
        dying.close()
        store = DiskPromptStore(settings.store_dir)
        manual = store.create("A manual prompt.", [], parent="v1")
        store.activate(manual.version, FAKE_MODEL)

        sidecar = make_sidecar(settings)
        try:
            reports = await sidecar.run_once()
        finally:
            sidecar.close()

    stale = reports[0]
    assert stale.resumed
    assert stale.outcome == "skipped"
    assert "is now served 'v3'" in stale.reason
    assert not PlanStore(tmp_path / "sidecar").load_all()
    assert store.active_version(FAKE_MODEL) == "v3"
    store.close()
