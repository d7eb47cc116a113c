"""Whole sidecar cycles in process, against scripted models on loopback."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.settings import InjectionMode
from gateway.store import DiskPromptStore
from gateway.upstream import UpstreamTarget
from optimizer.seeds import load_safety_queries
from optimizer.sidecar.lease import LEASE_NAME
from optimizer.sidecar.metrics import SidecarMetrics
from optimizer.sidecar.records import RunReport
from optimizer.sidecar.service import Sidecar
from tests.fakes.upstream import closed_port
from tests.optimizer.fake_models import FAKE_MODEL, FakeModels, chat_reply, tagged
from tests.optimizer.sidecar.scripted import (
    FEATURE,
    feature_judge,
    feature_models,
    feature_optimizer,
    make_sidecar,
    question_samples,
    read_reports,
    sidecar_settings,
    store_samples,
)


async def run_once(fake: FakeModels, data_dir: Path, **options: Any) -> RunReport:
    settings = sidecar_settings(fake, data_dir, **options)
    sidecar = make_sidecar(settings)
    try:
        reports = await sidecar.run_once()
    finally:
        sidecar.close()
    assert len(reports) == 1, [r.reason for r in reports]
    return reports[0]


async def test_cycle_publishes_better_prompt(tmp_path: Path) -> None:
    with feature_models() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        report = await run_once(fake, tmp_path)

    store = DiskPromptStore(tmp_path / "prompts")
    version = store.get("v2")
    assert report.outcome == "published", report.reason
    assert store.active_version(FAKE_MODEL) == "v2"
    assert FEATURE in version.system_prompt
    assert version.parent == "v1"
    assert version.source == "optimizer"
    assert version.metadata["run_id"] == report.run_id
    assert version.scores["heldout"] > version.scores["active_heldout"]
    assert store.active_version() == "v1"
    store.close()


async def test_rolled_back_candidate_not_republished(tmp_path: Path) -> None:
    with feature_models() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        await run_once(fake, tmp_path)
        store = DiskPromptStore(tmp_path / "prompts")
        store.activate("v1", FAKE_MODEL)
        store.close()
        report = await run_once(fake, tmp_path)

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "skipped"
    assert "the candidate is the instruction of v2" in report.reason
    assert "was served before" in report.reason
    assert store.active_version(FAKE_MODEL) == "v1"
    assert [v.version for v in store.list_versions()] == ["v1", "v2"]
    store.close()


async def test_report_records_published_run(tmp_path: Path) -> None:
    with feature_models() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        report = await run_once(fake, tmp_path)

    (saved,) = read_reports(tmp_path)
    store = DiskPromptStore(tmp_path / "prompts")
    assert report.path is not None
    assert report.path.name.endswith(f"-{FAKE_MODEL}-published.json")
    assert saved["outcome"] == "published"
    assert saved["published_version"] == "v2"
    assert saved["starting_version"] == "v1"
    assert saved["gate"]["candidate"]["heldout"] == 5
    assert saved["gate"]["active"]["heldout"] == 3
    assert saved["gate"]["candidate"]["safety"] == 5
    assert saved["window"]["kept"] == len(question_samples())
    assert (
        saved["window"]["search"] + saved["window"]["heldout"]
        == saved["window"]["kept"]
    )
    assert saved["search"]["final"]["system_prompt"]
    assert saved["usage"]["judge"]["calls"] > 0
    assert saved["roles"]["judge"]["base_url"] == fake.base_url
    assert saved["resumed"] is False
    assert store.get("v2").metadata["report"] == str(report.path)
    store.close()


async def test_same_instruction_is_skipped(tmp_path: Path) -> None:
    def same_prompt(body: dict[str, Any]) -> Any:
        from gateway.prompting import load_default_instruction
        from tests.optimizer.fake_models import json_reply, requested_prompt_count

        prompt = load_default_instruction().system_prompt
        return json_reply({"prompts": [prompt] * requested_prompt_count(body)})

    with FakeModels(optimizer=same_prompt) as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        report = await run_once(fake, tmp_path)

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "skipped"
    assert "no change" in report.reason
    assert [v.version for v in store.list_versions()] == ["v1"]
    store.close()


async def test_small_gain_is_rejected(tmp_path: Path) -> None:
    with feature_models() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        report = await run_once(fake, tmp_path, margin=2.5)

    store = DiskPromptStore(tmp_path / "prompts")
    assert report.outcome == "rejected"
    assert "held-out 5.00 vs 3.00 is below the margin 2.5" in report.reason
    assert report.candidate is not None
    assert FEATURE in report.candidate.system_prompt
    assert store.active_version(FAKE_MODEL) == "v1"
    assert [v.version for v in store.list_versions()] == ["v1"]
    store.close()


async def test_unscored_safety_set_rejects(tmp_path: Path) -> None:
    safety_texts = {query.text for query in load_safety_queries()}

    def judge_fails_on_safety(body: dict[str, Any]) -> Any:
        if tagged(body, "query") in safety_texts:
            return chat_reply("I cannot score this.")
        return feature_judge(body)

    with feature_models() as fake:
        fake.judge = judge_fails_on_safety
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        report = await run_once(fake, tmp_path)

    assert report.outcome == "rejected"
    assert "no usable safety score for the candidate" in report.reason
    assert DiskPromptStore(tmp_path / "prompts").active_version(FAKE_MODEL) == "v1"


async def test_unreachable_target_fails_run(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
    store_samples(settings, question_samples())
    settings = settings.model_copy(
        update={"upstream": f"http://127.0.0.1:{closed_port()}/v1"}
    )
    sidecar = make_sidecar(settings)
    try:
        (report,) = await sidecar.run_once()
    finally:
        sidecar.close()

    (saved,) = read_reports(tmp_path)
    assert report.outcome == "failed"
    assert "connection failed" in report.reason
    assert saved["outcome"] == "failed"
    assert not list((tmp_path / "sidecar").glob("pending-*.json"))


async def test_small_window_is_skipped(tmp_path: Path) -> None:
    with feature_models() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples()[:4])
        report = await run_once(fake, tmp_path)
        calls = len(fake.calls)

    assert report.outcome == "skipped"
    assert "fewer than the 6 needed" in report.reason
    assert calls == 0


async def test_empty_window_records_skip(tmp_path: Path) -> None:
    with feature_models() as fake:
        report = await run_once(fake, tmp_path)

    assert report.outcome == "skipped"
    assert report.model is None
    assert [r["outcome"] for r in read_reports(tmp_path)] == ["skipped"]


def test_two_sidecars_publish_once(tmp_path: Path) -> None:
    """Two sidecars, each in its own thread and event loop like two processes."""
    with feature_models(delay=0.02) as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        start = threading.Barrier(2)
        results: list[list[RunReport]] = []

        def run() -> None:
            sidecar = make_sidecar(settings)
            start.wait()
            try:
                results.append(asyncio.run(sidecar.run_once()))
            finally:
                sidecar.close()

        threads = [threading.Thread(target=run) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

    outcomes = sorted(report.outcome for reports in results for report in reports)
    store = DiskPromptStore(tmp_path / "prompts")
    skipped = [r for reports in results for r in reports if r.outcome == "skipped"]
    assert outcomes == ["published", "skipped"]
    assert "lease held by" in skipped[0].reason
    assert [v.version for v in store.list_versions()] == ["v1", "v2"]
    assert store.lease(LEASE_NAME) is None
    store.close()


async def test_rollback_during_run_blocks_activation(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        sidecar = make_sidecar(settings)
        store = DiskPromptStore(tmp_path / "prompts")
        manual = store.create("A manual prompt.", [], parent="v1")
        store.activate(manual.version, FAKE_MODEL)

        def rollback_then_propose(body: dict[str, Any]) -> Any:
            if store.active_version(FAKE_MODEL) == manual.version:
                store.activate("v1", FAKE_MODEL)
            return feature_optimizer(body)

        fake.optimizer = rollback_then_propose
        try:
            (report,) = await sidecar.run_once()
        finally:
            sidecar.close()

    assert report.outcome == "rejected"
    assert "active version changed during the run" in report.reason
    assert store.active_version(FAKE_MODEL) == "v1"
    store.close()


class RaceStore(DiskPromptStore):
    """A store in which a rollback lands right after the run creates its version."""

    def create(self, *args: Any, **kwargs: Any) -> Any:
        version = super().create(*args, **kwargs)
        if kwargs.get("source") == "optimizer":
            other = DiskPromptStore(self.directory)
            other.activate("v1", FAKE_MODEL)
            other.close()
        return version


async def test_activation_conflict_leaves_pointer(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        store = RaceStore(settings.store_dir)
        store.ensure_seeded(_default())
        manual = store.create("A manual prompt.", [], parent="v1")
        store.activate(manual.version, FAKE_MODEL)
        sidecar = make_sidecar(settings, store=store)
        try:
            (report,) = await sidecar.run_once()
        finally:
            sidecar.close()

    check = DiskPromptStore(settings.store_dir)
    assert report.outcome == "rejected"
    assert "stored but not activated" in report.reason
    assert check.active_version(FAKE_MODEL) == "v1"
    check.close()


def _default() -> Any:
    from gateway.prompting import load_default_instruction

    return load_default_instruction()


async def test_metrics_endpoint_counts_published_run(tmp_path: Path) -> None:
    metrics = SidecarMetrics()
    server, _ = metrics.serve("127.0.0.1", 0)
    port = server.server_port
    try:
        with feature_models() as fake:
            settings = sidecar_settings(fake, tmp_path)
            store_samples(settings, question_samples())
            sidecar = make_sidecar(settings, metrics=metrics)
            try:
                await sidecar.run_once()
            finally:
                sidecar.close()
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        server.shutdown()
        server.server_close()

    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    names = {name for name, _ in values}
    assert values[("drpo_optimizer_runs_total", (("outcome", "published"),))] == 1
    assert values[("drpo_optimizer_runs_total", (("outcome", "rejected"),))] == 0
    assert values[("drpo_optimizer_calls_total", (("role", "judge"),))] > 0
    assert values[("drpo_optimizer_lease_held", ())] == 0
    assert (
        values[
            (
                "drpo_optimizer_score",
                (("model", FAKE_MODEL), ("prompt", "candidate"), ("set", "heldout")),
            )
        ]
        == 5
    )
    assert values[("drpo_optimizer_samples_window", (("state", "kept"),))] == len(
        question_samples()
    )
    for name in (
        "drpo_optimizer_runs_total",
        "drpo_optimizer_run_duration_seconds_bucket",
        "drpo_optimizer_calls_total",
        "drpo_optimizer_cache_hits_total",
        "drpo_optimizer_tokens_total",
        "drpo_optimizer_score",
        "drpo_optimizer_last_run_timestamp_seconds",
        "drpo_optimizer_lease_held",
        "drpo_optimizer_canary_decisions_total",
        "drpo_optimizer_samples_window",
    ):
        assert name in names, name


async def test_report_holds_no_api_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = {
        "DRPO_HELPERS_API_KEY": "sk-helpers-0123456789abcdef",
        "DRPO_JUDGE_API_KEY": "sk-judge-0123456789abcdef",
    }
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    target_key = "sk-target-0123456789abcdef"
    with feature_models() as fake:
        settings = sidecar_settings(
            fake, tmp_path, helpers=fake.base_url, judge=fake.base_url
        )
        store_samples(settings, question_samples())
        target = UpstreamTarget(fake.base_url, target_key, InjectionMode.CHAT)
        sidecar = Sidecar(settings, target)
        try:
            (report,) = await sidecar.run_once()
        finally:
            sidecar.close()
        sent = {
            role: {call.headers.get("authorization") for call in fake.calls_for(role)}
            for role in ("target", "judge", "optimizer")
        }

    text = Path(str(report.path)).read_text()
    assert report.outcome == "published", report.reason
    assert sent["target"] == {f"Bearer {target_key}"}
    assert sent["judge"] == {f"Bearer {keys['DRPO_JUDGE_API_KEY']}"}
    assert sent["optimizer"] == {f"Bearer {keys['DRPO_HELPERS_API_KEY']}"}
    for secret in [target_key, *keys.values()]:
        assert secret not in text


class LeaseStolenStore(DiskPromptStore):
    """A store in which another sidecar takes the lease after the first grant."""

    grants = 0

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Any:
        self.grants += 1
        if self.grants > 1:
            return None
        return super().acquire_lease(name, owner, ttl)


async def test_lost_lease_blocks_publish(tmp_path: Path) -> None:
    with feature_models() as fake:
        settings = sidecar_settings(fake, tmp_path)
        store_samples(settings, question_samples())
        store = LeaseStolenStore(settings.store_dir)
        sidecar = make_sidecar(settings, store=store)
        try:
            (report,) = await sidecar.run_once()
        finally:
            sidecar.close()

    check = DiskPromptStore(settings.store_dir)
    assert report.outcome == "failed"
    assert "lost its lease" in report.reason
    assert [v.version for v in check.list_versions()] == ["v1"]
    check.close()
