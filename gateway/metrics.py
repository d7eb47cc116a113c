"""Prometheus metrics of the gateway, all in one registry with the drpo_ prefix.

With several worker processes, prometheus_client's multiprocess mode is on:
PROMETHEUS_MULTIPROC_DIR is set before the workers import prometheus_client,
each worker writes its values to files there, and a scrape merges the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from gateway.instruction import PromptVersion

if TYPE_CHECKING:
    from gateway.store.base import Canary

# LLM requests range from milliseconds (a cached short answer) to minutes (a
# long generation on a CPU), so the buckets run up to ten minutes.
LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
)  # fmt: skip
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5,
)  # fmt: skip
OTHER_MODEL = "other"
NO_PROMPT = "none"
# prometheus_client reads this variable itself when it is imported.
MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


class ModelLabels:
    """Mapping of model names onto a bounded set of label values.

    Names configured or listed by the upstream at start-up keep their own value,
    up to `limit` of them. Every other name becomes "other", so a client sending
    random model names cannot grow the number of time series.
    """

    def __init__(self, known: Iterable[str] = (), limit: int = 32) -> None:
        self._limit = limit
        self._known: set[str] = set()
        self.add(known)

    def add(self, names: Iterable[str]) -> None:
        for name in names:
            if len(self._known) >= self._limit:
                return
            self._known.add(name)

    def __call__(self, model: str | None) -> str:
        return model if model in self._known else OTHER_MODEL


class PromptInfoCollector(Collector):
    """Collector of the prompt series, which it builds anew at each scrape.

    `active` and `canaries` are the last snapshot that ActivePrompts passed to
    the listeners. They are not Gauges because in multiprocess mode a Gauge
    writes its series to files, which `clear()` does not empty, so a replaced
    version would stay in the output.
    """

    def __init__(self) -> None:
        self.active: Mapping[str, PromptVersion] = {}
        self.canaries: Mapping[str, Canary] = {}
        self.generation = -1

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        info, share, generation = self._families()
        for model, version in self.active.items():
            info.add_metric([model, version.version], 1.0)
        for model, canary in self.canaries.items():
            share.add_metric([model, canary.version], canary.share)
        generation.add_metric([], float(self.generation))
        yield from (info, share, generation)

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        info = GaugeMetricFamily(
            "drpo_active_prompt_info",
            "Active prompt version per model pointer; '*' is the default.",
            labels=["model", "version"],
        )
        share = GaugeMetricFamily(
            "drpo_canary_prompt_share",
            "Fraction of clients served the canary version, per model pointer; "
            "'*' is the default.",
            labels=["model", "version"],
        )
        generation = GaugeMetricFamily(
            "drpo_prompt_store_generation",
            "Generation of the prompt store last loaded by the gateway.",
        )
        return info, share, generation


class GatewayMetrics:
    """Every metric the gateway exports.

    Multiprocess mode is on when PROMETHEUS_MULTIPROC_DIR is set, which
    `drpo-gateway serve --workers N` does for N > 1.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_VARIABLE) or None
        r = self.registry
        self.requests = Counter(
            "drpo_requests",
            "Requests handled, by route, model, status class and prompt version.",
            ["route", "model", "status_class", "prompt_version"],
            registry=r,
        )
        self.request_duration = Histogram(
            "drpo_request_duration_seconds",
            "Time from receiving a request to sending its last byte.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "drpo_time_to_first_token_seconds",
            "Time from receiving a streaming request to its first content chunk.",
            ["route", "model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "drpo_gateway_overhead_seconds",
            "Time the gateway itself adds to a request, excluding the upstream.",
            ["route"],
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "drpo_upstream_errors",
            "Failed upstream calls, by kind.",
            ["kind"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "drpo_prompt_tokens",
            "Prompt tokens reported by the upstream, injected ones included.",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "drpo_completion_tokens",
            "Completion tokens reported by the upstream.",
            ["model"],
            registry=r,
        )
        self.injected_tokens = Counter(
            "drpo_injected_tokens",
            "Tokens of the alignment instruction added to prompts.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "drpo_requests_in_flight",
            "Requests being handled now.",
            ["route"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.prompt_info = PromptInfoCollector()
        r.register(self.prompt_info)

        self.samples_stored = Counter(
            "drpo_samples_stored",
            "Traffic samples written to the sample store.",
            registry=r,
        )
        self.samples_dropped = Counter(
            "drpo_samples_dropped",
            "Traffic samples not stored, by reason: queue_full, client_cap, "
            "store_error or opted_out.",
            ["reason"],
            registry=r,
        )
        self.samples_redacted = Counter(
            "drpo_samples_redacted",
            "Personal data items replaced in stored samples, by kind.",
            ["kind"],
            registry=r,
        )

    def set_active_versions(self, active: Mapping[str, PromptVersion]) -> None:
        """Replace the active-version info series with the current pointers."""
        self.prompt_info.active = dict(active)

    def set_canaries(self, canaries: Mapping[str, Canary]) -> None:
        """Replace the canary share series with the running canaries."""
        self.prompt_info.canaries = dict(canaries)

    def set_store_generation(self, generation: int) -> None:
        """Set the generation that drpo_prompt_store_generation reports."""
        self.prompt_info.generation = generation

    def exposition(self) -> bytes:
        """Render every metric in the Prometheus text format.

        In multiprocess mode the counters, histograms and the in-flight gauge
        come from the files of every worker, and the prompt series from this
        worker's own snapshot.
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self.prompt_info)
        return generate_latest(registry)

    def record_usage(self, model: str, usage: object) -> None:
        """Count the tokens of an upstream `usage` object, when it is well formed."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            self.prompt_tokens.labels(model=model).inc(prompt)
        if isinstance(completion, int) and completion >= 0:
            self.completion_tokens.labels(model=model).inc(completion)


def status_class(status: int) -> str:
    return f"{status // 100}xx"
