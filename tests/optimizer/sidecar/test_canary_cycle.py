"""Publishing through a canary: start it, then promote, roll back or wait."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from gateway.settings import Settings
from gateway.store import DiskPromptStore
from optimizer.sidecar.records import RunReport
from tests.optimizer.fake_models import FAKE_MODEL, FakeModels
from tests.optimizer.sidecar.scripted import (
    MARK,
    QUESTIONS,
    feature_models,
    make_sidecar,
    question_samples,
    sample,
    sidecar_settings,
    store_samples,
)

CANARY_OPTIONS: dict[str, Any] = {"canary_share": 0.5, "canary_min_samples": 3}


async def run_once(settings: Settings) -> RunReport:
    sidecar = make_sidecar(settings)
    try:
        (report,) = await sidecar.run_once()
    finally:
        sidecar.close()
    return report


async def start_canary(fake: FakeModels, data_dir: Path) -> Settings:
    settings = sidecar_settings(fake, data_dir, **CANARY_OPTIONS)
    store_samples(settings, question_samples())
    report = await run_once(settings)
    assert report.outcome == "canary", report.reason
    return settings


def serve_arms(settings: Settings, canary_answer: str, control_answer: str) -> None:
    """Store sampled answers of both arms, newer than the canary's start."""
    store = DiskPromptStore(settings.store_dir)
    started = store.canaries()[FAKE_MODEL].started_at
    store.close()
    samples = []
    for index, text in enumerate(QUESTIONS[:4]):
        time = started + timedelta(seconds=index + 1)
        samples.append(
            sample(text, answer=canary_answer, prompt_version="v2", time=time)
        )
        samples.append(
            sample(text, answer=control_answer, prompt_version="v1", time=time)
        )
    store_samples(settings, samples)


async def test_publish_starts_canary(tmp_path: Path) -> None:
    with feature_models() as fake:
        await start_canary(fake, tmp_path)

    store = DiskPromptStore(tmp_path / "prompts")
    canary = store.canaries()[FAKE_MODEL]
    assert canary.version == "v2"
    assert canary.share == 0.5
    assert store.active_version(FAKE_MODEL) == "v1"
    store.close()


async def test_better_canary_is_promoted(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = await start_canary(fake, tmp_path)
        serve_arms(settings, f"An answer {MARK}.", "An answer.")
        calls_before = len(fake.calls)
        report = await run_once(settings)
        review_calls = fake.calls[calls_before:]

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "promoted", report.reason
    assert report.canary is not None
    assert report.canary.canary.reward == 5
    assert report.canary.control.reward == 3
    assert store.active_version(FAKE_MODEL) == "v2"
    assert store.canaries() == {}
    # Selections of these queries are cache hits from the search.
    assert {call.role for call in review_calls} == {"judge"}
    store.close()


async def test_worse_canary_is_rolled_back(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = await start_canary(fake, tmp_path)
        serve_arms(settings, "An answer.", f"An answer {MARK}.")
        report = await run_once(settings)

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "rolled_back"
    assert "below control" in report.reason
    assert store.active_version(FAKE_MODEL) == "v1"
    assert store.canaries() == {}
    store.close()


async def test_canary_waits_for_samples(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = await start_canary(fake, tmp_path)
        calls_before = len(fake.calls)
        report = await run_once(settings)
        calls_after = len(fake.calls)

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "waiting"
    assert calls_after == calls_before
    assert store.canaries()[FAKE_MODEL].version == "v2"
    store.close()
