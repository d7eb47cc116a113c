"""deploy/prometheus/ checked by promtool, the checker Prometheus ships."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.deploy.prometheus import check_config
from tests.deploy.support import PROMETHEUS_CONFIG
from tests.services import require_binary


def test_promtool_accepts_deploy_config() -> None:
    promtool = require_binary("promtool", "prometheus")

    result = check_config(promtool, PROMETHEUS_CONFIG)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_alert_rules() -> None:
    promtool = require_binary("promtool", "prometheus")
    rule_files = yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"]
    paths = [str(PROMETHEUS_CONFIG.parent / name) for name in rule_files]

    result = subprocess.run(
        [promtool, "check", "rules", *paths], capture_output=True, text=True, timeout=60
    )

    assert paths
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_broken_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["scrape_configs"][0]["scrape_interval"] = "often"
    del config["rule_files"]
    broken = tmp_path / "prometheus.yml"
    broken.write_text(yaml.safe_dump(config))

    result = check_config(promtool, broken)

    assert result.returncode != 0
    assert '"often"' in result.stdout + result.stderr


def test_scrape_jobs_cover_gateway_sidecar_vllm() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }

    assert targets == {
        "drpo-gateway": "gateway:8000",
        "drpo-optimizer": "optimizer:9464",
        "vllm": "vllm:8000",
    }
