"""When a cycle is due: after `interval` seconds, or once enough samples arrived.

The sample store is bounded and evicts its oldest samples, so its count stops
growing once it is full. New samples are therefore counted by their time:
those newer than the newest sample the last cycle saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from gateway.sampling.store import Sample, SampleStore
from optimizer.sidecar.plans import TriggerState


def due_reason(
    state: TriggerState,
    now: datetime,
    new_samples: int,
    *,
    interval: float,
    min_new_samples: int,
) -> str | None:
    """Return why a cycle is due at `now`, or None when it is not."""
    if state.last_cycle_at is None:
        return "first cycle"
    elapsed = (now - state.last_cycle_at).total_seconds()
    if elapsed >= interval:
        return f"interval: {elapsed:.0f} s since the last cycle"
    if new_samples >= min_new_samples:
        return f"new samples: {new_samples} since the last cycle"
    return None


def count_new_samples(
    store: SampleStore, newest_seen: datetime | None, limit: int
) -> int:
    """Return how many samples are newer than `newest_seen`, at most `limit + 1`.

    With no `newest_seen` every sample is new. Only the newest `limit + 1`
    samples are read, so a check costs the same however full the store is.
    """
    samples = store.recent(limit + 1, since=newest_seen)
    return len(newer_than(samples, newest_seen))


def newer_than(samples: Sequence[Sample], moment: datetime | None) -> list[Sample]:
    if moment is None:
        return list(samples)
    return [sample for sample in samples if sample.time > moment]


def newest_time(samples: Sequence[Sample]) -> datetime | None:
    return max((sample.time for sample in samples), default=None)
