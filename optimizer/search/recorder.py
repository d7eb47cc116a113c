"""Collects what a search scores and decides, and freezes it into a SearchResult."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from optimizer.search.nodes import should_skip
from optimizer.search.queries import QuerySplit
from optimizer.search.result import (
    FinalChoice,
    LevelRecord,
    MergeEvent,
    SafetyRejection,
    SearchResult,
    SkipEvent,
)
from optimizer.search.settings import SearchSettings
from optimizer.types import Candidate, Query

logger = logging.getLogger(__name__)


@dataclass
class DepthBudget:
    """The number of levels to run, which the skip rule may raise once per level."""

    limit: int
    max_extra: int
    extra: int = 0

    def extend(self) -> bool:
        """Add one level unless the extra levels are used up; tell whether it did."""
        if self.extra >= self.max_extra:
            return False
        self.extra += 1
        self.limit += 1
        return True


@dataclass
class SearchRecorder:
    """Mutable log of one search run; ids are assigned here in creation order."""

    settings: SearchSettings
    initial_prompt: str
    split: QuerySplit | None = None
    candidates: list[Candidate] = field(default_factory=list)
    levels: list[LevelRecord] = field(default_factory=list)
    skips: list[SkipEvent] = field(default_factory=list)
    merges: list[MergeEvent] = field(default_factory=list)
    rejections: list[SafetyRejection] = field(default_factory=list)
    heldout: list[Candidate] = field(default_factory=list)
    _next_id: int = 0

    def new_id(self, prefix: str = "c") -> str:
        """Return the next candidate id, such as ``c0007``."""
        identifier = f"{prefix}{self._next_id:04d}"
        self._next_id += 1
        return identifier

    def add_candidates(self, candidates: Sequence[Candidate]) -> None:
        self.candidates.extend(candidates)

    def candidate_index(self) -> dict[str, Candidate]:
        return {candidate.id: candidate for candidate in self.candidates}

    def add_level(
        self,
        depth: int,
        batch: Sequence[Query],
        scored: Sequence[Candidate],
        beam: Sequence[Candidate],
        scores: Sequence[float | None],
        extended: bool,
    ) -> None:
        """Record one finished level and log its best selection score."""
        self.levels.append(
            LevelRecord(
                depth=depth,
                query_ids=tuple(query.id for query in batch),
                candidate_ids=tuple(candidate.id for candidate in scored),
                beam_ids=tuple(candidate.id for candidate in beam),
                beam_scores=tuple(scores),
                extended=extended,
            )
        )
        logger.info(
            "Search level %d: %d candidates on %d queries, best %s score %s.",
            depth,
            len(scored),
            len(batch),
            beam[0].id if beam else None,
            scores[0] if scores else None,
        )

    def freeze(self, final: FinalChoice) -> SearchResult:
        """Return the frozen result of the run with the chosen prompt."""
        if self.split is None:
            raise RuntimeError("The query split must be recorded before freezing.")
        return SearchResult(
            settings=self.settings,
            initial_prompt=self.initial_prompt,
            split=self.split,
            candidates=tuple(self.candidates),
            levels=tuple(self.levels),
            skips=tuple(self.skips),
            merges=tuple(self.merges),
            rejections=tuple(self.rejections),
            heldout=tuple(self.heldout),
            final=final,
        )


def apply_skip_rule(
    recorder: SearchRecorder,
    depth: int,
    nodes: Sequence[Candidate],
    budget: DepthBudget,
    threshold: float,
) -> tuple[list[Candidate], bool]:
    """Return the nodes to expand and whether a skip added a level.

    A node whose last reward is above `threshold`, or all 5s, is kept unchanged.
    Any skip adds one level, at most one per level and at most
    `budget.max_extra` in total.
    """
    expand: list[Candidate] = []
    extended = False
    for node in nodes:
        if not should_skip(node.reward, node.evaluations, threshold):
            expand.append(node)
            continue
        extends_now = not extended and budget.extend()
        extended = extended or extends_now
        recorder.skips.append(SkipEvent(depth, node.id, node.reward, extends_now))
    return expand, extended
