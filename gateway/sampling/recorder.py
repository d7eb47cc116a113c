"""The sampling decision and the background writer that fills the sample store.

A request costs one `random()` draw unless it is chosen. A chosen request is
queued when it finishes, and one task writes the queue to the store in a
thread. A full queue, a client over its cap and a failing store drop the
sample and count it. None of them delays or fails the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Mapping

from gateway.metrics import GatewayMetrics
from gateway.sampling.capture import SampleCapture, build_sample, client_id
from gateway.sampling.redaction import Redactor
from gateway.sampling.store import SampleStore
from gateway.settings import Settings
from gateway.store.base import StoreError

logger = logging.getLogger(__name__)

SAMPLE_HEADER = "x-drpo-sample"
SAMPLE_OFF = "off"
ERROR_LOG_INTERVAL = 60.0
STOP_TIMEOUT = 5.0


class SampleRecorder:
    """The sampling decision, the bounded write queue and its writer task."""

    def __init__(
        self, store: SampleStore, settings: Settings, metrics: GatewayMetrics
    ) -> None:
        self.store = store
        self._rate = settings.sample_rate
        self._random = random.Random(settings.sample_seed).random
        self._client_cap = settings.sample_client_cap
        self._kinds = tuple(settings.sample_redact) if settings.sample_redaction else ()
        self._metrics = metrics
        self._queue: asyncio.Queue[SampleCapture] = asyncio.Queue(
            settings.sample_queue_size
        )
        self._writer: asyncio.Task[None] | None = None
        self._errors = _ThrottledErrorLog(ERROR_LOG_INTERVAL)

    def choose(
        self,
        raw_request: bytes,
        headers: Mapping[str, str],
        route: str,
        peer: tuple[str, int] | None,
        stream: bool,
    ) -> SampleCapture | None:
        """Decide whether to sample a request, and return its capture when chosen."""
        if self._random() >= self._rate:
            return None
        if headers.get(SAMPLE_HEADER, "").strip().lower() == SAMPLE_OFF:
            self._dropped("opted_out")
            return None
        return SampleCapture(raw_request, route, client_id(headers, peer), stream)

    def submit(self, capture: SampleCapture) -> None:
        """Queue a finished request's capture, dropping it when the queue is full."""
        try:
            self._queue.put_nowait(capture)
        except asyncio.QueueFull:
            self._dropped("queue_full")

    def start(self) -> None:
        """Start the writer task in the running event loop."""
        self._writer = asyncio.create_task(self._drain(), name="drpo-sample-writer")

    async def stop(self) -> None:
        """Write what is queued, for at most STOP_TIMEOUT seconds, then stop."""
        if self._writer is None:
            return
        try:
            await asyncio.wait_for(self._queue.join(), STOP_TIMEOUT)
        except TimeoutError:
            logger.warning(
                "Stopped the sample writer with %d samples still queued",
                self._queue.qsize(),
            )
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        self._writer = None

    async def _drain(self) -> None:
        while True:
            capture = await self._queue.get()
            try:
                await asyncio.to_thread(self._write, capture)
            # The writer must outlive any failure of the store or of one
            # sample's content, so every error is counted and logged here.
            except Exception as error:
                self._dropped("store_error")
                self._errors.log(error)
            finally:
                self._queue.task_done()

    def _write(self, capture: SampleCapture) -> None:
        """Store one sample. Runs in a worker thread."""
        if self.store.count_for(capture.client) >= self._client_cap:
            self._dropped("client_cap")
            return
        redactor = Redactor(self._kinds) if self._kinds else None
        # NOTE: redaction holds the GIL for an estimated 0.25 ms per KB of text
        # (2 KB texts timed on a 2-core development machine), so the event
        # loop can wait that long for each sample written.
        sample = build_sample(capture, redactor)
        self.store.add(sample)

        self._metrics.samples_stored.inc()
        if redactor is not None:
            for kind, count in redactor.counts.items():
                self._metrics.samples_redacted.labels(kind=kind.value).inc(count)

    def _dropped(self, reason: str) -> None:
        self._metrics.samples_dropped.labels(reason=reason).inc()


class _ThrottledErrorLog:
    """Warning log of store errors, at most one line per `interval` seconds."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last_logged: float | None = None
        self._suppressed = 0

    def log(self, error: Exception) -> None:
        now = time.monotonic()
        if self._last_logged is not None and now - self._last_logged < self._interval:
            self._suppressed += 1
            return
        # Other errors, such as a validation error, may quote request text.
        detail = (
            str(error)
            if isinstance(error, StoreError | OSError)
            else "details withheld because they may quote request text"
        )
        logger.warning(
            "Could not store a traffic sample (%d more errors since the last "
            "report): %s: %s",
            self._suppressed,
            type(error).__name__,
            detail,
        )
        self._last_logged = now
        self._suppressed = 0
