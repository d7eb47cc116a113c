"""Prometheus metrics of the optimizer sidecar, in their own registry.

The sidecar serves them with `prometheus_client.start_http_server` on
`optimizer.metrics_host:metrics_port`, apart from the gateway's /metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from gateway.metrics import ModelLabels
from optimizer.sidecar.canary import CanaryReview
from optimizer.sidecar.records import OUTCOMES, RunReport
from optimizer.types import Usage

ROLES = ("target", "selector", "judge", "optimizer")
DECISIONS = ("promote", "rollback", "wait")

# A cycle takes seconds against a fast API and hours on a CPU-only model.
RUN_DURATION_BUCKETS = (
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0,
)  # fmt: skip


class SidecarMetrics:
    """Every metric the sidecar exports; `max_models` bounds the model labels."""

    def __init__(
        self, registry: CollectorRegistry | None = None, max_models: int = 32
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.models = ModelLabels(limit=max_models)
        r = self.registry

        self.runs = Counter(
            "drpo_optimizer_runs", "Sidecar runs, by outcome.", ["outcome"], registry=r
        )
        self.run_duration = Histogram(
            "drpo_optimizer_run_duration_seconds",
            "Time from the start of a run to its report.",
            buckets=RUN_DURATION_BUCKETS,
            registry=r,
        )

        self.calls = Counter(
            "drpo_optimizer_calls",
            "Upstream model calls sent, retries included, by role.",
            ["role"],
            registry=r,
        )
        self.cache_hits = Counter(
            "drpo_optimizer_cache_hits",
            "Model calls answered from the optimizer cache, by role.",
            ["role"],
            registry=r,
        )
        self.tokens = Counter(
            "drpo_optimizer_tokens",
            "Tokens the upstreams reported, by role and kind (prompt, completion).",
            ["role", "kind"],
            registry=r,
        )

        self.score = Gauge(
            "drpo_optimizer_score",
            "Last gate score per model: prompt candidate or active, set heldout "
            "(mean reward) or safety (mean Safety score).",
            ["model", "prompt", "set"],
            registry=r,
        )
        self.last_run = Gauge(
            "drpo_optimizer_last_run_timestamp_seconds",
            "Unix time of the last run report, by outcome.",
            ["outcome"],
            registry=r,
        )

        self.lease_held = Gauge(
            "drpo_optimizer_lease_held",
            "1 while this sidecar holds the optimizer lease, else 0.",
            registry=r,
        )
        self.canary_decisions = Counter(
            "drpo_optimizer_canary_decisions",
            "Canary reviews, by decision.",
            ["decision"],
            registry=r,
        )
        self.samples_window = Gauge(
            "drpo_optimizer_samples_window",
            "Samples of the last window, by state (kept or dropped).",
            ["state"],
            registry=r,
        )
        self._initialize_labels()

    def record_run(self, report: RunReport) -> None:
        """Count a finished run, its duration, its spending and its gate scores."""
        self.runs.labels(report.outcome).inc()
        self.run_duration.observe(report.seconds)
        finished = report.finished_at or report.started_at
        self.last_run.labels(report.outcome).set(finished.timestamp())
        self.record_usage(report.usage)
        if report.gate is not None and report.model is not None:
            model = self.models(report.model)
            for prompt, score in (
                ("candidate", report.gate.candidate),
                ("active", report.gate.active),
            ):
                for name, value in (
                    ("heldout", score.heldout),
                    ("safety", score.safety),
                ):
                    if value is not None:
                        self.score.labels(model, prompt, name).set(value)
        if report.canary is not None:
            self.record_review(report.canary)

    def record_usage(self, usage: Mapping[str, Usage]) -> None:
        for role, item in usage.items():
            self.calls.labels(role).inc(item.calls)
            self.cache_hits.labels(role).inc(item.cache_hits)
            self.tokens.labels(role, "prompt").inc(item.prompt_tokens)
            self.tokens.labels(role, "completion").inc(item.completion_tokens)

    def record_review(self, review: CanaryReview) -> None:
        self.canary_decisions.labels(review.decision).inc()

    def record_window(self, kept: int, dropped: int) -> None:
        self.samples_window.labels("kept").set(kept)
        self.samples_window.labels("dropped").set(dropped)

    def add_models(self, models: list[str]) -> None:
        """Give `models` their own label value, up to the bound."""
        self.models.add(models)

    def serve(self, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
        """Serve the registry on `host:port` in a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return server, thread

    def _initialize_labels(self) -> None:
        for outcome in OUTCOMES:
            self.runs.labels(outcome)
        for role in ROLES:
            self.calls.labels(role)
            self.cache_hits.labels(role)
            self.tokens.labels(role, "prompt")
            self.tokens.labels(role, "completion")
        for decision in DECISIONS:
            self.canary_decisions.labels(decision)
        self.record_window(0, 0)
        self.lease_held.set(0)
