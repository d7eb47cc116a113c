"""Fixtures shared by the test suite: a fake upstream and a gateway in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.instruction import Example, PromptVersion
from gateway.sampling import Sample
from gateway.settings import InjectionMode, Settings, load_settings
from gateway.upstream import UpstreamTarget
from tests.fakes.upstream import FakeUpstream, ServerThread, wait_until

# uvicorn takes over 0.1 s to shut down, so test servers are only asked to
# stop when their test ends, and joined once at the end of the session.
_STOPPING: list[ServerThread] = []


@pytest.fixture(scope="session", autouse=True)
def join_stopped_servers() -> Iterator[None]:
    yield
    for server in _STOPPING:
        server.join()


def stop_later(server: ServerThread) -> None:
    server.request_stop()
    _STOPPING.append(server)


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    fake.server = ServerThread(fake.app())
    fake.port = fake.server.start()
    yield fake
    stop_later(fake.server)


class RunningGateway:
    def __init__(self, app: Any, settings: Settings) -> None:
        self.settings = settings
        self.thread = ServerThread(app)
        self.port = self.thread.start()
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options: Any) -> openai.OpenAI:
        options.setdefault("api_key", "unused")
        options.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + "/v1", **options)

    @property
    def store(self) -> Any:
        return self.app.state.gateway.store

    def activate(
        self, system_prompt: str, examples: Sequence[tuple[str, str]] = ()
    ) -> PromptVersion:
        """Create and activate a default version; wait until the gateway serves it."""
        version: PromptVersion = self.store.create(
            system_prompt, [Example(query=q, answer=a) for q, a in examples]
        )
        self.store.activate(version.version)
        prompts = self.app.state.gateway.parts.prompts

        def served() -> bool:
            active = prompts.active.get("*")
            return active is not None and active.version == version.version

        if not wait_until(served):
            raise AssertionError(f"the gateway never loaded {version.version}")
        return version

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """Scrape /metrics and return the labels and value of each `name` sample."""
        text = httpx.get(self.url + "/metrics").text
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name
        ]

    def wait_for_requests(self, count: int) -> None:
        """Wait until `count` requests are recorded.

        A stream's metrics are recorded after its last byte is sent, so a
        client can finish reading before they are.
        """
        if not wait_until(lambda: self.metric("drpo_requests_total") >= count):
            raise AssertionError(f"the gateway never recorded {count} requests")

    def metric(self, name: str, **labels: str) -> float:
        """Return the sum of the `name` samples whose labels include `labels`."""
        return sum(
            value
            for sample_labels, value in self.samples(name)
            if all(sample_labels.get(key) == want for key, want in labels.items())
        )

    def stored_samples(self, count: int) -> list[Sample]:
        """Wait for `count` stored samples and return them, oldest first.

        Samples are written by a background task after the response is sent.
        """
        store = self.app.state.gateway.parts.sampler.store
        if not wait_until(lambda: store.count() >= count):
            raise AssertionError(
                f"the sample store holds {store.count()} samples, not {count}"
            )
        samples: list[Sample] = store.recent(count + 100)
        return samples

    def wait_for_metric(self, name: str, value: float, **labels: str) -> None:
        """Wait until the sum of the `name` samples with `labels` reaches `value`."""
        if not wait_until(lambda: self.metric(name, **labels) >= value):
            raise AssertionError(
                f"{name} {labels} is {self.metric(name, **labels)}, not {value}"
            )

    def stop(self) -> None:
        self.thread.stop()


GatewayFactory = Callable[..., RunningGateway]


@pytest.fixture
def start_gateway(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> Iterator[GatewayFactory]:
    """Start a gateway in front of the fake upstream; options become settings."""
    started: list[RunningGateway] = []

    def start(
        default_mode: InjectionMode = InjectionMode.CHAT,
        upstream_url: str | None = None,
        **options: Any,
    ) -> RunningGateway:
        options.setdefault("data_dir", tmp_path / "data")
        options.setdefault("store_poll_interval", 0.05)
        url = upstream_url or fake_upstream.base_url
        settings = load_settings(upstream=url, **options)
        app = create_app(settings, UpstreamTarget(url, "upstream-secret", default_mode))
        gateway = RunningGateway(app, settings)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        stop_later(gateway.thread)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """Start a real redis-server without persistence for one test.

    Fails the test when redis-server is missing (see `tests.services`).
    """
    from tests.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "redis")
    yield server
    server.stop()
