"""A real Prometheus for tests: its config, its process and its HTTP API."""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.deploy.support import PROMETHEUS_CONFIG

SCRAPE_INTERVAL = "1s"


def deploy_job_names() -> list[str]:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    return [job["job_name"] for job in config["scrape_configs"]]


def render_test_config(targets: Mapping[str, str], path: Path) -> Path:
    """Write the deploy config with loopback `targets` per job and 1 s scrapes.

    Jobs, metrics paths and rule files stay those of the deploy config, rule
    files as absolute paths. Raises KeyError when a deploy job has no target.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {
        "scrape_interval": SCRAPE_INTERVAL,
        "scrape_timeout": SCRAPE_INTERVAL,
        "evaluation_interval": SCRAPE_INTERVAL,
    }
    config["rule_files"] = [
        str((PROMETHEUS_CONFIG.parent / rule_file).resolve())
        for rule_file in config.get("rule_files", [])
    ]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def check_config(promtool: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, "check", "config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


class PrometheusServer:
    """A prometheus process on 127.0.0.1:`port` with its storage under `directory`."""

    def __init__(self, binary: str, config: Path, directory: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = directory / "prometheus.log"
        directory.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log()}")
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"prometheus was not ready in {timeout} s: {self.log()}")

    def query(self, expression: str) -> dict[str, Any]:
        """Evaluate `expression` now; return the API's JSON body, errors included."""
        response = httpx.get(
            self.url + "/api/v1/query", params={"query": expression}, timeout=10
        )
        body: dict[str, Any] = response.json()
        return body

    def wait_for(self, expression: str, timeout: float = 30.0) -> list[Any]:
        """Wait until `expression` returns a sample with a finite value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.query(expression).get("data", {})
            if finite_values(data):
                return list(data["result"])
            time.sleep(0.25)
        raise AssertionError(f"{expression!r} returned no data in {timeout} s")

    def rules(self) -> list[dict[str, Any]]:
        response = httpx.get(self.url + "/api/v1/rules", timeout=10)
        groups = response.json()["data"]["groups"]
        return [rule for group in groups for rule in group["rules"]]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def finite_values(data: Mapping[str, Any]) -> list[float]:
    """Return the finite values in the `data` of an instant query's response."""
    if data.get("resultType") == "scalar":
        raw_values = [data["result"][1]]
    else:
        raw_values = [sample["value"][1] for sample in data.get("result", [])]
    values = [float(raw) for raw in raw_values]
    return [value for value in values if math.isfinite(value)]
