"""Per-request bookkeeping and the results the service returns to the routers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.metrics import NO_PROMPT, GatewayMetrics, status_class

if TYPE_CHECKING:
    from gateway.sampling.capture import SampleCapture


@dataclass
class Reply:
    """A complete response body."""

    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    media_type: str = "application/json"


@dataclass
class StreamReply:
    """A response whose body is produced while the upstream sends it."""

    body: AsyncIterator[bytes]
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    media_type: str = "text/event-stream"
    close: Callable[[], Awaitable[None]] | None = None


@dataclass
class RequestContext:
    """Record of one request, filled in as it goes and counted once at the end."""

    route: str
    request_id: str
    received_at: float = field(default_factory=time.perf_counter)
    model: str = "other"
    prompt_version: str = NO_PROMPT
    status: int = 200
    upstream_started_at: float | None = None
    upstream_finished_at: float | None = None
    first_token_at: float | None = None
    processing_seconds: float = 0.0
    usage: dict[str, Any] | None = None
    upstream: str = ""
    recorded: bool = False
    peer: tuple[str, int] | None = None
    """The client's (host, port), as the ASGI server reports it."""
    sample: SampleCapture | None = None
    """Set when the request was chosen for traffic sampling."""

    def mark_upstream_start(self) -> None:
        self.upstream_started_at = time.perf_counter()

    def mark_upstream_end(self) -> None:
        self.upstream_finished_at = time.perf_counter()

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def keep_response(self, body: bytes) -> None:
        """Keep a complete response body for the request's sample, if it has one."""
        if self.sample is not None:
            self.sample.response = body

    def overhead_seconds(self, finished_at: float) -> float:
        """Return the time spent in the gateway rather than waiting on the upstream."""
        if self.upstream_started_at is None:
            return finished_at - self.received_at
        before = self.upstream_started_at - self.received_at
        after = 0.0
        if self.upstream_finished_at is not None:
            after = max(0.0, finished_at - self.upstream_finished_at)
        return before + after + self.processing_seconds

    def record(self, metrics: GatewayMetrics) -> float:
        """Record the request's metrics once; return its duration in seconds."""
        finished_at = time.perf_counter()
        duration = finished_at - self.received_at
        if self.recorded:
            return duration
        self.recorded = True
        metrics.requests.labels(
            route=self.route,
            model=self.model,
            status_class=status_class(self.status),
            prompt_version=self.prompt_version,
        ).inc()
        metrics.request_duration.labels(route=self.route, model=self.model).observe(
            duration
        )
        metrics.overhead.labels(route=self.route).observe(
            self.overhead_seconds(finished_at)
        )
        if self.first_token_at is not None:
            metrics.time_to_first_token.labels(
                route=self.route, model=self.model
            ).observe(self.first_token_at - self.received_at)
        if self.usage is not None:
            metrics.record_usage(self.model, self.usage)
        return duration
