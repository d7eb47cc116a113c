"""The window of a cycle: recent samples turned into queries per model, and the split.

Samples arrive redacted from the gateway. A sample becomes a query when its
answer is complete and its conversation ends with a user message (for
/v1/completions: when its prompt is a string). Queries are deduplicated by
their normalised text, capped per client and grouped by model. Ids and the
search/held-out split are hashes of the text, so the same window gives the
same queries, and a query never moves between the two sets across cycles.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.sampling.store import Sample
from optimizer.sidecar.canary import query_text
from optimizer.types import Query, QueryKind

SAMPLED_CATEGORY = "sampled"

DropReason = Literal[
    "incomplete", "no_query", "too_long", "no_model", "other_model", "duplicate",
    "client_cap",
]  # fmt: skip


@dataclass(frozen=True)
class WindowFacts:
    """Counts of what a window read, kept and dropped, for the run report."""

    samples_read: int
    kept: int
    dropped: Mapping[DropReason, int] = field(default_factory=dict)
    capped_clients: int = 0
    """Clients that had samples dropped by the per-client cap."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples_read": self.samples_read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "capped_clients": self.capped_clients,
        }

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


@dataclass(frozen=True)
class Window:
    """The queries of one window per model, oldest first, and its facts."""

    queries: Mapping[str, tuple[Query, ...]]
    facts: WindowFacts


def build_window(
    samples: Sequence[Sample],
    *,
    client_cap: int,
    max_chars: int,
    models: Iterable[str] = (),
) -> Window:
    """Turn `samples` (oldest first) into deduplicated queries per model.

    The newest copy of a duplicate is the one kept, and the per-client cap
    keeps each client's newest queries. An empty `models` keeps every model.
    """
    wanted = frozenset(models)
    dropped: Counter[DropReason] = Counter()
    per_client: Counter[str] = Counter()
    capped: set[str] = set()
    seen: set[tuple[str, str]] = set()
    kept: list[tuple[str, Query]] = []

    for sample in reversed(samples):
        text, reason = _usable_text(sample, wanted, max_chars)
        if reason is not None:
            dropped[reason] += 1
            continue
        assert text is not None and sample.model is not None
        key = (sample.model, normalize(text))
        if key in seen:
            dropped["duplicate"] += 1
            continue
        if per_client[sample.client] >= client_cap:
            dropped["client_cap"] += 1
            capped.add(sample.client)
            continue
        seen.add(key)
        per_client[sample.client] += 1
        kept.append((sample.model, sampled_query(text)))

    grouped: dict[str, list[Query]] = {}
    for model, query in reversed(kept):
        grouped.setdefault(model, []).append(query)
    facts = WindowFacts(
        samples_read=len(samples),
        kept=len(kept),
        dropped=dict(dropped),
        capped_clients=len(capped),
    )
    return Window({model: tuple(items) for model, items in grouped.items()}, facts)


def normalize(text: str) -> str:
    """Return `text` case-folded with every run of whitespace made one space."""
    return " ".join(text.casefold().split())


def sampled_query(text: str) -> Query:
    """Return the query of a sampled `text`, with an id hashed from its normal form."""
    digest = hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()
    return Query(f"w-{digest[:16]}", text, SAMPLED_CATEGORY, QueryKind.GENERAL)


def is_heldout(query_id: str, fraction: float) -> bool:
    """Return whether `query_id` belongs to the held-out set, by a hash of the id.

    About `fraction` of all ids are held out, and an id is always in the
    same set, whatever window it appears in.
    """
    digest = hashlib.sha256(f"split:{query_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_queries(
    queries: Sequence[Query], heldout_fraction: float
) -> tuple[tuple[Query, ...], tuple[Query, ...]]:
    """Return the search and held-out queries of `queries`, in their order."""
    search = tuple(q for q in queries if not is_heldout(q.id, heldout_fraction))
    heldout = tuple(q for q in queries if is_heldout(q.id, heldout_fraction))
    return search, heldout


def _usable_text(
    sample: Sample, wanted: frozenset[str], max_chars: int
) -> tuple[str | None, DropReason | None]:
    if not sample.complete:
        return None, "incomplete"
    if not sample.model:
        return None, "no_model"
    if wanted and sample.model not in wanted:
        return None, "other_model"
    text = query_text(sample)
    if not text:
        return None, "no_query"
    if len(text) > max_chars:
        return None, "too_long"
    return text, None
