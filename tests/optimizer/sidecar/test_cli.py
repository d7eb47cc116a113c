"""`drpo-gateway optimizer` in a subprocess: --once, SIGKILL and resume, SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from gateway.store import DiskPromptStore
from tests.fakes.upstream import closed_port, wait_until
from tests.optimizer.fake_models import FAKE_MODEL, FakeModels, FakeReply
from tests.optimizer.sidecar.scripted import (
    SMALL_OPTIONS,
    feature_judge,
    feature_models,
    make_sidecar,
    question_samples,
    read_reports,
    sidecar_settings,
    store_samples,
)

REPO = Path(__file__).resolve().parents[3]


def write_config(path: Path, **options: Any) -> Path:
    path.write_text(yaml.safe_dump({"optimizer": {**SMALL_OPTIONS, **options}}))
    return path


def start(
    fake_url: str, data_dir: Path, config: Path, *flags: str
) -> subprocess.Popen[str]:
    command = [
        sys.executable, "-m", "gateway", "optimizer", "--upstream", fake_url,
        "--data-dir", str(data_dir), "--config", str(config), *flags,
    ]  # fmt: skip
    return subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def slow_judge(body: dict[str, Any]) -> Any:
    reply = feature_judge(body)
    assert isinstance(reply, dict)
    return FakeReply(body=reply, delay=0.05)


async def test_kill_and_resume_from_plan(tmp_path: Path) -> None:
    data_dir, fresh_dir = tmp_path / "data", tmp_path / "fresh"
    config = write_config(tmp_path / "config.yaml")
    with feature_models() as fake:
        fake.judge = slow_judge
        store_samples(sidecar_settings(fake, data_dir), question_samples())
        shutil.copytree(data_dir, fresh_dir)

        fresh = make_sidecar(sidecar_settings(fake, fresh_dir))
        await fresh.run_once()
        fresh.close()
        fresh_calls = len(fake.calls)

        first = start(fake.base_url, data_dir, config, "--once")
        killed_at = fresh_calls + 40
        assert wait_until(lambda: len(fake.calls) >= killed_at, timeout=30)
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
        store = DiskPromptStore(data_dir / "prompts")
        versions_after_kill = [v.version for v in store.list_versions()]
        active_after_kill = store.active_version(FAKE_MODEL)
        store.close()
        plans_after_kill = list((data_dir / "sidecar").glob("pending-*.json"))

        before_resume = len(fake.calls)
        second = start(fake.base_url, data_dir, config, "--once")
        output, errors = second.communicate(timeout=60)
        resume_calls = len(fake.calls) - before_resume

    store = DiskPromptStore(data_dir / "prompts")
    (report,) = read_reports(data_dir)
    assert versions_after_kill == ["v1"]
    assert active_after_kill == "v1"
    assert len(plans_after_kill) == 1
    assert second.returncode == 0, errors
    assert "published v2" in output
    assert report["resumed"] is True
    assert report["outcome"] == "published"
    assert report["cache_hits"] > 0
    assert resume_calls < fresh_calls
    assert [v.version for v in store.list_versions()] == ["v1", "v2"]
    assert store.active_version(FAKE_MODEL) == "v2"
    store.close()


def test_sigterm_stops_loop_cleanly(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", interval=3600)
    with feature_models() as fake:
        fake.judge = slow_judge
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
        process = start(fake.base_url, tmp_path, config)
        assert wait_until(lambda: len(fake.calls_for("judge")) >= 3, timeout=30)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=20)

    assert process.returncode == 0, errors
    assert "Stopping (SIGTERM) while searching for model 'fake-model'" in errors
    assert "Optimizer sidecar stopped" in errors
    assert list((tmp_path / "sidecar").glob("pending-*.json"))
    assert DiskPromptStore(tmp_path / "prompts").lease("optimizer") is None


def test_failed_run_exits_with_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml")
    with FakeModels() as fake:
        store_samples(sidecar_settings(fake, tmp_path), question_samples())
    process = start(f"http://127.0.0.1:{closed_port()}/v1", tmp_path, config, "--once")
    output, errors = process.communicate(timeout=60)

    error_lines = [line for line in errors.splitlines() if line.startswith("Error:")]
    assert process.returncode == 1
    assert len(error_lines) == 1
    assert "connection failed" in error_lines[0]
    assert "fake-model: failed" in output


def test_invalid_setting_exits_with_error(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", margin=-5)
    process = start("http://127.0.0.1:9/v1", tmp_path, config, "--once")
    _, errors = process.communicate(timeout=30)

    assert process.returncode == 1
    assert errors.startswith("Error: Invalid settings: DRPO_OPTIMIZER__MARGIN")
    assert "Traceback" not in errors
