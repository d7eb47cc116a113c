"""A tiny DRPO run on the real embedded model, published and then served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.test_embedded import embedded_gateway_process

pytestmark = pytest.mark.embedded


def _drpo(*arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DRPO_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


# Minutes on two busy cores: a 270M model plays every role, one call at a time.
@pytest.mark.timeout(1200)
def test_tiny_run_publishes_served_version(tmp_path: Path) -> None:
    report = tmp_path / "report.json"

    run = _drpo(
        "optimize", "--data-dir", str(tmp_path), "--max-queries", "4",
        "--depth", "1", "--max-extra-depth", "0", "--beam-size", "1",
        "--n-actions", "1", "--batch-size", "1", "--heldout-size", "1",
        "--stage1-rounds", "1", "--max-examples", "2",
        "--helper-max-tokens", "256", "--judge-rationale-chars", "160",
        "--report", str(report),
        "--publish", "--activate",
        timeout=1500,
    )  # fmt: skip

    assert run.returncode == 0, run.stderr[-3000:]
    assert "Prompt version v2 published and activated" in run.stdout
    record = json.loads(report.read_text())
    assert record["final"]["system_prompt"]
    assert report.with_suffix(".txt").read_text().strip()
    listed = _drpo("prompts", "list", "--json", "--data-dir", str(tmp_path), timeout=60)
    versions = {item["version"]: item for item in json.loads(listed.stdout)}
    assert versions["v2"]["source"] == "optimizer"
    assert versions["v2"]["parent"] == "v1"
    with embedded_gateway_process(tmp_path) as client:
        reply = client.chat.completions.with_raw_response.create(
            model="gemma-3-270m",
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=16,
        )
    assert reply.headers["x-drpo-prompt-version"] == "v2"
