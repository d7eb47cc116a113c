"""Query order, the search/held-out split and the fixed-mix scoring batches.

Every draw uses the search's one seeded random generator, in a fixed order,
so a seeded rerun uses the same queries in the same order.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from optimizer.errors import SearchError
from optimizer.types import Query, QueryKind

KINDS = (QueryKind.GENERAL, QueryKind.HARD, QueryKind.SAFETY)
"""Query kinds in the order of `SearchSettings.batch_mix`."""


@dataclass(frozen=True)
class QuerySplit:
    """The shuffled query order and the ids of the search and held-out queries."""

    order: tuple[str, ...]
    search: tuple[str, ...]
    heldout: tuple[str, ...]


def check_unique_ids(queries: Sequence[Query]) -> None:
    """Raise SearchError when `queries` is empty or two queries share an id."""
    if not queries:
        raise SearchError("The search needs at least one query, got none.")
    seen: set[str] = set()
    for query in queries:
        if query.id in seen:
            raise SearchError(
                f"Query id {query.id!r} occurs twice. Give every query its own id."
            )
        seen.add(query.id)


def shuffled(queries: Sequence[Query], rng: random.Random) -> list[Query]:
    """Return a copy of `queries` in an order drawn from `rng`."""
    order = list(queries)
    rng.shuffle(order)
    return order


def allocate(
    total: int, weights: Sequence[float], capacities: Sequence[int]
) -> list[int]:
    """Split `total` into counts per kind by `weights`, none above its capacity.

    Shares are rounded by largest remainder, with ties going to the earlier
    kind. The share of a kind that runs out of queries goes to the others in
    proportion to their weights, so the result sums to `total` unless all kinds
    with a positive weight together have fewer queries.
    """
    kinds = range(len(weights))
    counts = [0] * len(weights)
    remaining = min(total, sum(capacities[i] for i in kinds if weights[i] > 0))
    while remaining > 0:
        open_kinds = [i for i in kinds if weights[i] > 0 and counts[i] < capacities[i]]
        shares = largest_remainder(remaining, [weights[i] for i in open_kinds])
        for index, share in zip(open_kinds, shares, strict=True):
            taken = min(share, capacities[index] - counts[index])
            counts[index] += taken
            remaining -= taken
    return counts


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split `total` in proportion to `weights` into integers that sum to it."""
    weight_sum = sum(weights)
    exact = [total * weight / weight_sum for weight in weights]
    counts = [math.floor(value) for value in exact]
    by_remainder = sorted(
        range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i)
    )
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return counts


def by_kind(queries: Sequence[Query]) -> dict[QueryKind, list[Query]]:
    """Group `queries` by kind, keeping their order."""
    groups: dict[QueryKind, list[Query]] = {kind: [] for kind in KINDS}
    for query in queries:
        groups[query.kind].append(query)
    return groups


def split_queries(
    queries: Sequence[Query],
    heldout_size: int,
    mix: Sequence[float],
    rng: random.Random,
) -> tuple[list[Query], list[Query], QuerySplit]:
    """Shuffle `queries` with `rng` and hold out `heldout_size` of them by `mix`.

    Returns the search queries, the held-out queries and the recorded split.
    The held-out queries of each kind are the first of that kind in the
    shuffled order.
    """
    order = shuffled(queries, rng)
    groups = by_kind(order)
    counts = allocate(heldout_size, mix, [len(groups[kind]) for kind in KINDS])
    heldout_ids = {
        query.id
        for kind, count in zip(KINDS, counts, strict=True)
        for query in groups[kind][:count]
    }
    heldout = [query for query in order if query.id in heldout_ids]
    search = [query for query in order if query.id not in heldout_ids]
    split = QuerySplit(
        order=tuple(query.id for query in order),
        search=tuple(query.id for query in search),
        heldout=tuple(query.id for query in heldout),
    )
    return search, heldout, split


class BatchSampler:
    """Draw fixed-mix batches of distinct queries, cycling through each kind.

    Each kind's queries are used in a shuffled order before any repeats, and
    the order is reshuffled with the search's generator each time it runs out.
    """

    def __init__(
        self,
        queries: Sequence[Query],
        size: int,
        mix: Sequence[float],
        rng: random.Random,
    ) -> None:
        self._rng = rng
        self._pools: Mapping[QueryKind, list[Query]] = by_kind(queries)
        self._queues: dict[QueryKind, deque[Query]] = {kind: deque() for kind in KINDS}
        capacities = [len(self._pools[kind]) for kind in KINDS]
        counts = allocate(size, mix, capacities)
        self.counts = dict(zip(KINDS, counts, strict=True))

    def draw(self) -> tuple[Query, ...]:
        """Return the next batch: general queries, then hard, then safety."""
        batch: list[Query] = []
        for kind in KINDS:
            batch.extend(self._take(kind, self.counts[kind]))
        return tuple(batch)

    def _take(self, kind: QueryKind, count: int) -> list[Query]:
        taken: list[Query] = []
        queue = self._queues[kind]
        while len(taken) < count:
            if not queue:
                queue.extend(shuffled(self._pools[kind], self._rng))
            query = queue.popleft()
            if query in taken:
                # Only right after a reshuffle: use it in a later batch instead.
                queue.append(query)
                continue
            taken.append(query)
        return taken
