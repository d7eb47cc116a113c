"""Gateway processes that share one Redis server: pushed activation and samples.

Every gateway here is a real `drpo-gateway serve` process on loopback, in
front of the fake upstream, with DRPO_STORE_BACKEND=redis.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import gateway
from gateway.sampling.redis_store import RedisSampleStore
from gateway.store.redis import RedisPromptStore
from tests.fakes.upstream import FakeUpstream, wait_until
from tests.redis_server import RedisServer, free_port, start_redis_server

REPOSITORY_ROOT = Path(gateway.__file__).resolve().parents[1]
VERSION_HEADER = "x-drpo-prompt-version"
NO_SAMPLE = {"x-drpo-sample": "off"}
START_TIMEOUT = 60.0
PASSWORD = "s3cret-Passw0rd"


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def chat(self, text: str = "Hello", sample: bool = False) -> httpx.Response:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
        return httpx.post(
            self.url + "/v1/chat/completions",
            json=body,
            headers=None if sample else NO_SAMPLE,
            timeout=10,
        )

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
            and all(sample.labels.get(key) == value for key, value in labels.items())
        )


def gateway_environment(redis_url: str, data_dir: Path) -> dict[str, str]:
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith("DRPO_")
    }
    return environment | {
        "PYTHONPATH": str(REPOSITORY_ROOT),
        "DRPO_STORE_BACKEND": "redis",
        "DRPO_REDIS_URL": redis_url,
        "DRPO_DATA_DIR": str(data_dir),
        "DRPO_SAMPLE_RATE": "1",
    }


def launch_gateway(
    tmp_path: Path, name: str, upstream: FakeUpstream, redis_url: str
) -> GatewayProcess:
    port = free_port()
    log = tmp_path / f"{name}.log"
    command = [
        sys.executable, "-m", "gateway", "serve",
        "--upstream", upstream.base_url, "--port", str(port),
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=gateway_environment(redis_url, tmp_path / name),
        )
    return GatewayProcess(process, port, log)


def wait_ready(gateway: GatewayProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(f"drpo-gateway serve exited:\n{gateway.output()[-3000:]}")
        try:
            if httpx.get(gateway.url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    pytest.fail(f"drpo-gateway serve was not ready:\n{gateway.output()[-3000:]}")


def stop_gateway(gateway: GatewayProcess) -> None:
    if gateway.process.poll() is not None:
        return
    gateway.process.send_signal(signal.SIGINT)
    try:
        gateway.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gateway.process.kill()
        gateway.process.wait(timeout=30)


@pytest.fixture
def start_gateways(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> Iterator[Callable[..., list[GatewayProcess]]]:
    """Start gateway processes on one Redis URL and wait until all are ready."""
    started: list[GatewayProcess] = []

    def start(redis_url: str, count: int) -> list[GatewayProcess]:
        gateways = [
            launch_gateway(
                tmp_path, f"gateway-{len(started) + n}", fake_upstream, redis_url
            )
            for n in range(count)
        ]
        started.extend(gateways)
        for running in gateways:
            wait_ready(running)
        return gateways

    yield start
    for running in started:
        stop_gateway(running)


def run_prompts_cli(redis_url: str, data_dir: Path, *args: str) -> str:
    """Run `drpo-gateway prompts ARGS` in a new process and return its stdout."""
    completed = subprocess.run(
        [sys.executable, "-m", "gateway", "prompts", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=gateway_environment(redis_url, data_dir),
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def first_time_serving(
    gateway: GatewayProcess, version: str, stop: threading.Event
) -> float | None:
    """Send requests until `gateway` serves `version`, and return that time.time()."""
    with httpx.Client(timeout=10) as client:
        body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}
        while not stop.is_set():
            response = client.post(
                gateway.url + "/v1/chat/completions", json=body, headers=NO_SAMPLE
            )
            if response.headers.get(VERSION_HEADER) == version:
                return time.time()
    return None


def test_two_gateways_switch_within_second(
    tmp_path: Path, redis_server: RedisServer, start_gateways: Any
) -> None:
    first, second = start_gateways(redis_server.url, 2)
    with RedisPromptStore(redis_server.url) as store:
        candidate = store.create("Answer like a pirate.", [], parent="v1")
    stop = threading.Event()
    seen: dict[int, float | None] = {}

    def watch(index: int, running: GatewayProcess) -> None:
        seen[index] = first_time_serving(running, candidate.version, stop)

    watchers = [
        threading.Thread(target=watch, args=(index, running))
        for index, running in enumerate((first, second))
    ]
    for watcher in watchers:
        watcher.start()
    before = [
        first.chat().headers[VERSION_HEADER],
        second.chat().headers[VERSION_HEADER],
    ]
    run_prompts_cli(redis_server.url, tmp_path / "cli", "activate", candidate.version)
    with RedisPromptStore(redis_server.url) as store:
        activated_at = store.history()[-1].at.timestamp()
    for watcher in watchers:
        watcher.join(timeout=10)
    stop.set()

    assert before == ["v1", "v1"]
    assert seen[0] is not None
    assert seen[1] is not None
    assert seen[0] - activated_at < 1.0
    assert seen[1] - activated_at < 1.0


def test_samples_from_both_gateways_share_store(
    redis_server: RedisServer, start_gateways: Any
) -> None:
    first, second = start_gateways(redis_server.url, 2)

    first_status = first.chat("sent to the first gateway", sample=True).status_code
    second_status = second.chat("sent to the second gateway", sample=True).status_code
    with RedisSampleStore(redis_server.url) as samples:
        stored = wait_until(lambda: samples.count() == 2, timeout=10)
        texts = sorted(
            sample.messages[0]["content"]
            for sample in samples.recent(10)
            if sample.messages
        )

    assert first_status == 200
    assert second_status == 200
    assert stored
    assert texts == ["sent to the first gateway", "sent to the second gateway"]


def test_redis_down_at_start_exits_1(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    closed = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"

    gateway_process = launch_gateway(tmp_path, "no-redis", fake_upstream, closed)
    try:
        gateway_process.process.wait(timeout=START_TIMEOUT)
    finally:
        stop_gateway(gateway_process)
    output = gateway_process.output()

    assert "Could not connect to the prompt store in Redis" in output
    assert "DRPO_REDIS_URL" in output
    assert PASSWORD not in output
    assert gateway_process.process.returncode == 1, output[-3000:]


def test_redis_outage_keeps_serving_and_recovers(
    tmp_path: Path, start_gateways: Any
) -> None:
    server = start_redis_server(tmp_path / "redis", persistent=True)
    try:
        [running] = start_gateways(server.url, 1)
        with RedisPromptStore(server.url) as store:
            store.create("After the outage.", [], parent="v1")
        with RedisSampleStore(server.url) as samples:
            running.chat("before the outage", sample=True)
            stored_before = wait_until(lambda: samples.count() == 1, timeout=10)

        server.stop()
        during = [running.chat("during the outage", sample=True) for _ in range(3)]
        dropped = wait_until(
            lambda: (
                running.metric("drpo_samples_dropped_total", reason="store_error") >= 3
            ),
            timeout=10,
        )

        server.start()
        with RedisPromptStore(server.url) as store:
            store.activate("v2")
            activated_at = time.monotonic()
        switched = wait_until(
            lambda: running.chat().headers.get(VERSION_HEADER) == "v2", timeout=10
        )
        switched_after = time.monotonic() - activated_at
        running.chat("after the outage", sample=True)
        with RedisSampleStore(server.url) as samples:
            stored_after = wait_until(lambda: samples.count() == 2, timeout=10)
    finally:
        server.stop()

    assert stored_before
    assert [response.status_code for response in during] == [200, 200, 200]
    assert [response.headers[VERSION_HEADER] for response in during] == ["v1"] * 3
    assert dropped
    assert switched
    assert switched_after < 1.0
    assert stored_after
