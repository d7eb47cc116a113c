"""`drpo-gateway serve --workers 2` in a subprocess: metrics, reloads, shutdown."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.engines import pick_free_port
from gateway.errors import ConfigurationError
from gateway.settings import InjectionMode, load_settings
from gateway.store import DiskPromptStore
from gateway.upstream import UpstreamTarget
from gateway.workers import (
    WORKER_CONFIG_VARIABLE,
    read_worker_config,
    write_worker_config,
)
from tests.conftest import stop_later
from tests.fakes.upstream import FakeUpstream, Scripted, ServerThread, wait_until

STAND_IN = Path(__file__).parent / "stand_ins" / "openai_server.py"
REPOSITORY_ROOT = Path(__file__).parents[2]
REQUEST_COUNT = 40
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi?"}]}


@dataclass
class GatewayProcess:
    """A `drpo-gateway serve` process, its log, data directory and TMPDIR."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    data_dir: Path
    temp_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        found = re.findall(r"Started server process \[(\d+)\]", self.log())
        return [int(pid) for pid in found]

    def run_dirs(self) -> list[Path]:
        return sorted(self.temp_dir.glob("drpo-gateway-*"))

    def scrape(self) -> dict[str, Metric]:
        """GET /metrics on a new connection and return its families by name."""
        response = httpx.get(self.url + "/metrics", timeout=10)
        response.raise_for_status()
        families = text_string_to_metric_families(response.text)
        return {family.name: family for family in families}

    def terminate(self) -> int:
        """Send SIGTERM and return the exit status."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def interrupt(self) -> int:
        """Send SIGINT to the process group, as Ctrl-C does, and wait for the exit."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(timeout=60)


def start_gateway_process(
    tmp_path: Path, *arguments: str, environment: dict[str, str] | None = None
) -> GatewayProcess:
    """Start `drpo-gateway serve --workers 2` and wait until /ready returns 200."""
    port = pick_free_port()
    temp_dir = tmp_path / "tmp"
    temp_dir.mkdir(exist_ok=True)
    log_path = tmp_path / "serve.log"

    command = [
        sys.executable, "-m", "gateway", "serve", "--workers", "2",
        "--port", str(port), "--data-dir", str(tmp_path / "data"), *arguments,
    ]  # fmt: skip
    inherited = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("DRPO_") and name != "PROMETHEUS_MULTIPROC_DIR"
    }
    env = {
        **inherited,
        "TMPDIR": str(temp_dir),
        "PYTHONPATH": str(REPOSITORY_ROOT),
        "DRPO_STORE_POLL_INTERVAL": "0.05",
        "DRPO_SAMPLE_RATE": "0",
        **(environment or {}),
    }

    with log_path.open("wb") as log:
        # A session of its own gives the gateway and its workers a process
        # group, which the Ctrl-C test signals as a terminal would.
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    gateway = GatewayProcess(process, url, log_path, tmp_path / "data", temp_dir)
    wait_ready(gateway)
    return gateway


def wait_ready(gateway: GatewayProcess) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            pytest.fail(f"drpo-gateway serve exited:\n{gateway.log()[-3000:]}")
        started = gateway.log().count("Application startup complete")
        if started == 2 and _is_ready(gateway.url):
            return
        time.sleep(0.2)
    gateway.process.kill()
    pytest.fail(f"drpo-gateway serve was not ready in 60 s:\n{gateway.log()[-3000:]}")


def _is_ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def is_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rpartition(")")[2].split()[0] not in ("Z", "X")


def sample_sum(families: dict[str, Metric], family: str, sample: str) -> float:
    found = families.get(family)
    if found is None:
        return 0.0
    return sum(item.value for item in found.samples if item.name == sample)


def merge_files(paths: list[Path]) -> list[Metric]:
    """Return the families that prometheus_client reads from these value files."""
    files = [str(path) for path in paths]
    metrics: list[Metric] = MultiProcessCollector.merge(files)  # type: ignore[no-untyped-call]
    return metrics


def requests_per_worker(metrics_dir: Path) -> dict[int, float]:
    """Return drpo_requests_total of each worker, read from its own counter file."""
    counts: dict[int, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        families = merge_files([path])
        counts[pid] = sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "drpo_requests_total"
        )
    return counts


def send_chats(gateway: GatewayProcess, count: int) -> list[int]:
    """Send `count` chat requests, each on a new connection, and return the statuses."""
    return [
        httpx.post(
            gateway.url + "/v1/chat/completions", json=CHAT, timeout=30
        ).status_code
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def module_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.server = ServerThread(fake.app())
    fake.port = fake.server.start()
    yield fake
    stop_later(fake.server)


@pytest.fixture(scope="module")
def two_workers(
    tmp_path_factory: pytest.TempPathFactory, module_upstream: FakeUpstream
) -> Iterator[GatewayProcess]:
    """One gateway with two workers that has served REQUEST_COUNT chat requests."""
    tmp_path = tmp_path_factory.mktemp("workers")
    gateway = start_gateway_process(tmp_path, "--upstream", module_upstream.base_url)
    statuses = send_chats(gateway, REQUEST_COUNT)
    assert statuses == [200] * REQUEST_COUNT
    yield gateway
    if gateway.process.poll() is None:
        gateway.terminate()


def test_every_scrape_counts_all_requests(two_workers: GatewayProcess) -> None:
    for _ in range(10):
        families = two_workers.scrape()

        requests = sample_sum(families, "drpo_requests", "drpo_requests_total")
        durations = sample_sum(
            families,
            "drpo_request_duration_seconds",
            "drpo_request_duration_seconds_count",
        )
        overheads = sample_sum(
            families,
            "drpo_gateway_overhead_seconds",
            "drpo_gateway_overhead_seconds_count",
        )
        assert requests == REQUEST_COUNT
        assert durations == REQUEST_COUNT
        assert overheads == REQUEST_COUNT


def test_both_workers_answered_requests(two_workers: GatewayProcess) -> None:
    (run_dir,) = two_workers.run_dirs()

    counts = requests_per_worker(run_dir / "metrics")

    assert sorted(counts) == sorted(two_workers.worker_pids())
    assert all(count > 0 for count in counts.values()), counts
    assert sum(counts.values()) == REQUEST_COUNT


def test_in_flight_gauge_sums_live_workers(two_workers: GatewayProcess) -> None:
    families = two_workers.scrape()

    in_flight = families["drpo_requests_in_flight"]

    assert in_flight.type == "gauge"
    assert {sample.labels.get("pid") for sample in in_flight.samples} == {None}
    assert sum(sample.value for sample in in_flight.samples) == 0


def test_activation_leaves_one_info_series(two_workers: GatewayProcess) -> None:
    store = DiskPromptStore(two_workers.data_dir / "prompts")
    version = store.create("Answer in one word.", [])
    store.activate(version.version)
    store.close()
    expected = [({"model": "*", "version": version.version}, 1.0)]

    def info(families: dict[str, Metric]) -> list[tuple[dict[str, str], float]]:
        family = families["drpo_active_prompt_info"]
        return [(sample.labels, sample.value) for sample in family.samples]

    assert wait_until(lambda: info(two_workers.scrape()) == expected)
    # Each worker polls the store every 0.05 s; 0.5 s lets both reload.
    time.sleep(0.5)
    answers = [info(two_workers.scrape()) for _ in range(20)]

    assert answers == [expected] * 20
    (run_dir,) = two_workers.run_dirs()
    files = sorted((run_dir / "metrics").glob("*.db"))
    names = {family.name for family in merge_files(files)}
    assert "drpo_active_prompt_info" not in names
    assert "drpo_prompt_store_generation" not in names


@pytest.mark.parametrize("interrupt", ["sigterm", "ctrl_c"])
def test_stop_ends_workers_engine_and_files(tmp_path: Path, interrupt: str) -> None:
    record = tmp_path / "engine.json"
    wrapper = tmp_path / "vllm"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" "$@"\n')
    wrapper.chmod(0o755)
    gateway = start_gateway_process(
        tmp_path,
        "--engine", "vllm", "--model", "stand-in",
        environment={
            "DRPO_ENGINE_EXECUTABLE": str(wrapper),
            "STAND_IN_RECORD": str(record),
        },
    )  # fmt: skip
    engine_pid = int(re.findall(r'"pid": (\d+)', record.read_text())[0])
    workers = gateway.worker_pids()
    models = [httpx.get(gateway.url + "/v1/models").json() for _ in range(4)]
    run_dirs = gateway.run_dirs()

    status = gateway.terminate() if interrupt == "sigterm" else gateway.interrupt()

    assert status == 0, gateway.log()[-3000:]
    assert gateway.log().count("Started vllm") == 1
    assert all(body["data"][0]["id"] == "stand-in" for body in models)
    assert len(run_dirs) == 1
    assert gateway.run_dirs() == []
    assert not is_running(engine_pid)
    assert not any(is_running(pid) for pid in workers)


def test_user_multiproc_dir_is_kept(tmp_path: Path) -> None:
    fake = FakeUpstream()
    fake.server = ServerThread(fake.app())
    fake.port = fake.server.start()
    metrics_dir = tmp_path / "prometheus"
    gateway = start_gateway_process(
        tmp_path,
        "--upstream", fake.base_url,
        environment={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )  # fmt: skip
    send_chats(gateway, 4)
    families = gateway.scrape()

    status = gateway.terminate()
    stop_later(fake.server)

    assert status == 0
    assert sample_sum(families, "drpo_requests", "drpo_requests_total") == 4
    assert sorted(metrics_dir.glob("counter_*.db")) != []
    # Workers that exited are marked dead, which removes their live gauges.
    assert sorted(metrics_dir.glob("gauge_live*.db")) == []
    assert gateway.run_dirs() == []


def test_killed_worker_in_flight_removed(tmp_path: Path) -> None:
    fake = FakeUpstream()
    fake.server = ServerThread(fake.app())
    fake.port = fake.server.start()
    gateway = start_gateway_process(tmp_path, "--upstream", fake.base_url)
    fake.queue("/chat/completions", Scripted(delay=30.0))
    slow = threading.Thread(target=_post_ignoring_errors, args=(gateway.url,))
    slow.start()

    def in_flight() -> float:
        families = gateway.scrape()
        return sample_sum(
            families, "drpo_requests_in_flight", "drpo_requests_in_flight"
        )

    assert wait_until(lambda: in_flight() == 1)
    (run_dir,) = gateway.run_dirs()
    busy = _busy_worker(run_dir / "metrics")
    os.kill(busy, signal.SIGKILL)
    restarted = wait_until(lambda: len(gateway.worker_pids()) == 3, timeout=30)
    after = in_flight()

    status = gateway.terminate()
    slow.join(timeout=30)
    stop_later(fake.server)

    assert restarted, gateway.log()[-3000:]
    assert after == 0
    assert not (run_dir / "metrics" / f"gauge_livesum_{busy}.db").exists()
    assert status == 0


def _post_ignoring_errors(url: str) -> None:
    try:
        httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=60)
    except httpx.HTTPError:
        pass


def _busy_worker(metrics_dir: Path) -> int:
    """Return the pid whose live gauge file records a request in flight."""
    for path in metrics_dir.glob("gauge_livesum_*.db"):
        families = merge_files([path])
        values = [sample.value for family in families for sample in family.samples]
        if sum(values) > 0:
            return int(path.stem.rpartition("_")[2])
    raise AssertionError(f"no worker in {metrics_dir} has a request in flight")


def test_worker_startup_failure_exits_nonzero(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "gateway", "serve", "--workers", "2",
        "--port", str(pick_free_port()), "--data-dir", str(tmp_path / "data"),
        "--upstream", "http://127.0.0.1:9/v1",
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DRPO_")},
        "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(REPOSITORY_ROOT),
        # Only the workers check this combination, when the app starts.
        "DRPO_EXAMPLE_SELECTION": "embeddings",
    }

    result = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=120
    )

    assert result.returncode == 1
    assert "A gateway worker failed to start" in result.stderr
    assert "DRPO_EMBEDDING_MODEL" in result.stderr
    assert sorted(tmp_path.glob("drpo-gateway-*")) == []


def test_worker_config_keeps_secrets(tmp_path: Path) -> None:
    settings = load_settings(
        upstream="http://127.0.0.1:9/v1",
        api_keys=["client-key"],
        upstream_api_key="upstream-key",
        data_dir=tmp_path / "data",
        workers=3,
    )
    target = UpstreamTarget(
        "http://127.0.0.1:9/v1",
        "upstream-key",
        InjectionMode.BASE,
        "http://127.0.0.1:9/health",
        ("served",),
    )
    path = tmp_path / "worker.json"

    write_worker_config(path, settings, target)
    read_settings, read_target = read_worker_config(path)

    assert read_settings == settings
    assert read_settings.api_keys[0].get_secret_value() == "client-key"
    assert read_target == target
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_worker_config_invalid_raises(tmp_path: Path) -> None:
    path = tmp_path / "worker.json"
    path.write_text(
        '{"settings": {"port": -1, "api_keys": ["client-key"]}, "target": {}}'
    )

    with pytest.raises(ConfigurationError) as caught:
        read_worker_config(path)

    assert "invalid settings port" in str(caught.value)
    assert "client-key" not in str(caught.value)


def test_worker_config_unset_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_CONFIG_VARIABLE, raising=False)

    with pytest.raises(ConfigurationError) as caught:
        read_worker_config()

    assert "drpo-gateway serve --workers N" in str(caught.value)
