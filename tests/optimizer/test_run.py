"""Whole optimization runs over loopback against scripted models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gateway.cli import app
from gateway.settings import InjectionMode
from gateway.store import DiskPromptStore
from optimizer.client import ModelClient
from optimizer.roles import RoleSet
from optimizer.run import RunSettings, run_optimization
from optimizer.search import SearchSettings
from optimizer.seeds import load_queries, load_seed_examples
from optimizer.types import Query
from tests.optimizer.fake_models import (
    FakeModels,
    Reply,
    completion_reply,
    json_reply,
    requested_aspects,
    requested_prompt_count,
    scores_reply,
    tagged,
)

FEATURE = "CITE SOURCES"
MARK = "[sourced]"
SMALL_SEARCH = SearchSettings(
    beam_size=2, n_actions=2, depth=2, max_extra_depth=0, batch_size=3, heldout_size=3
)


def feature_target(body: dict[str, Any]) -> Reply:
    """Answer with a mark only when the rendered prompt carries the feature."""
    prompt = body.get("prompt") or json.dumps(body.get("messages"))
    return completion_reply(f"An answer {MARK}." if FEATURE in prompt else "An answer.")


def feature_judge(body: dict[str, Any]) -> Reply:
    score = 5 if MARK in tagged(body, "answer") else 3
    return scores_reply(dict.fromkeys(requested_aspects(body), score))


def feature_optimizer(body: dict[str, Any]) -> Reply:
    count = requested_prompt_count(body)
    prompts = [f"Be helpful, variant {index}." for index in range(count - 1)]
    return json_reply({"prompts": [*prompts, f"Be helpful and {FEATURE}."]})


def _queries(count: int = 24) -> list[Query]:
    return load_queries()[:count]


async def _run(fake: FakeModels, cache_dir: Path, concurrency: int = 4) -> Any:
    settings = RunSettings(
        roles=RoleSet.single(fake.endpoint()),
        mode=InjectionMode.BASE,
        search=SMALL_SEARCH,
        concurrency=concurrency,
        cache_dir=cache_dir,
    )
    from gateway.prompting import load_default_instruction

    client = ModelClient(cache_dir, concurrency)
    try:
        return await run_optimization(
            settings, load_default_instruction(), _queries(), [], client
        ), client.usage
    finally:
        await client.aclose()


async def test_run_finds_preferred_feature(tmp_path: Path) -> None:
    with FakeModels(
        target=feature_target, judge=feature_judge, optimizer=feature_optimizer
    ) as fake:
        outcome, _ = await _run(fake, tmp_path / "cache")

    assert FEATURE in outcome.instruction.system_prompt
    assert outcome.record.search.final.reward == 5


async def test_rerun_same_seed_makes_no_calls(tmp_path: Path) -> None:
    with FakeModels(
        target=feature_target, judge=feature_judge, optimizer=feature_optimizer
    ) as fake:
        first, _ = await _run(fake, tmp_path / "cache")
        calls_after_first = len(fake.calls)
        second, usage = await _run(fake, tmp_path / "cache")

    assert calls_after_first > 0
    assert len(fake.calls) == calls_after_first
    assert sum(item.calls for item in usage.values()) == 0
    assert sum(item.cache_hits for item in usage.values()) > 0
    assert second.instruction == first.instruction


async def test_run_respects_concurrency_limit(tmp_path: Path) -> None:
    with FakeModels(
        target=feature_target,
        judge=feature_judge,
        optimizer=feature_optimizer,
        delay=0.02,
    ) as fake:
        await _run(fake, tmp_path / "cache", concurrency=3)

    assert fake.max_in_flight == 3


def _optimize(fake: FakeModels, data_dir: Path, mode: str, *options: str) -> Any:
    """Run `drpo-gateway optimize` against `fake` with `options` added."""
    common = [
        "optimize", "--upstream", fake.base_url, "--model", "fake-model",
        "--mode", mode, "--data-dir", str(data_dir),
    ]  # fmt: skip
    return CliRunner().invoke(app, [*common, *options])


def test_optimize_command_publishes_version(tmp_path: Path) -> None:
    with FakeModels(
        target=feature_target, judge=feature_judge, optimizer=feature_optimizer
    ) as fake:
        result = _optimize(
            fake,
            tmp_path,
            "base",
            "--max-queries",
            "20",
            "--depth",
            "2",
            "--max-extra-depth",
            "0",
            "--n-actions",
            "2",
            "--batch-size",
            "3",
            "--heldout-size",
            "3",
            "--publish",
            "--activate",
            "--report",
            str(tmp_path / "run.json"),
        )

    assert result.exit_code == 0, result.output
    assert "Projected model calls" in result.output
    store = DiskPromptStore(tmp_path / "prompts")
    version = store.get("v2")
    assert FEATURE in version.system_prompt
    assert version.parent == "v1"
    assert version.source == "optimizer"
    assert store.active_version() == "v2"
    report = json.loads((tmp_path / "run.json").read_text())
    assert report["final"]["system_prompt"]
    assert report["run"]["roles"]["judge"] == {
        "base_url": fake.base_url,
        "model": "fake-model",
    }
    assert report["run"]["mode"] == "base"
    store.close()


def test_optimize_rejects_projection_over_budget(tmp_path: Path) -> None:
    with FakeModels() as fake:
        result = _optimize(fake, tmp_path, "base", "--max-calls", "5")
        calls = len(fake.calls)

    assert result.exit_code == 1
    assert "exceed --max-calls 5" in result.output
    assert calls == 0


@pytest.mark.parametrize("strategy", ["improved", "faithful"])
def test_optimize_strategy_runs(tmp_path: Path, strategy: str) -> None:
    with FakeModels() as fake:
        result = _optimize(
            fake,
            tmp_path,
            "chat",
            "--max-queries",
            "20",
            "--depth",
            "1",
            "--strategy",
            strategy,
            "--stage1-rounds",
            "1",
            "--max-examples",
            "3",
        )

    assert result.exit_code == 0, result.output
    assert list((tmp_path / "runs").glob("*.json"))


def test_seed_examples_load_for_stage1() -> None:
    assert len(load_seed_examples()) >= 6


def test_unchanged_result_is_not_published(tmp_path: Path) -> None:
    with FakeModels() as fake:
        result = _optimize(
            fake, tmp_path, "base", "--max-queries", "12", "--depth", "1",
            "--publish", "--activate",
        )  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "nothing was published" in result.output
    store = DiskPromptStore(tmp_path / "prompts")
    assert [version.version for version in store.list_versions()] == ["v1"]
    store.close()
