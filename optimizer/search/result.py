"""The frozen outcome of a stage-2 search and the events recorded on the way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from optimizer.search.queries import QuerySplit
from optimizer.search.settings import SearchSettings
from optimizer.types import Candidate


@dataclass(frozen=True)
class SkipEvent:
    """A node kept unchanged by the skip rule instead of being expanded."""

    depth: int
    """Level at which the node was not expanded."""
    candidate_id: str
    reward: float | None
    """The node's last reward, which was above the skip threshold or all 5s."""
    extended: bool
    """True when this skip added one level to the search."""


@dataclass(frozen=True)
class MergeEvent:
    """A proposed prompt identical to a candidate of its level after whitespace."""

    depth: int
    proposed_by: str
    """Id of the node whose expansion proposed the duplicate."""
    merged_into: str
    """Id of the candidate already scored with that prompt."""


@dataclass(frozen=True)
class SafetyRejection:
    """A candidate dropped because its mean Safety score fell below the floor."""

    depth: int
    candidate_id: str
    safety: float | None
    floor: float
    """The reference mean Safety score minus the tolerance."""
    heldout: bool = False
    """True for a rejection in the held-out final choice, where the reference is
    the initial prompt and `depth` is the number of search levels."""


@dataclass(frozen=True)
class LevelRecord:
    """One level of the search: its queries, what was scored and what was kept."""

    depth: int
    query_ids: tuple[str, ...]
    candidate_ids: tuple[str, ...]
    """Candidates scored at this level, carried-over parents first."""
    beam_ids: tuple[str, ...]
    """Candidates kept for the next level, best first."""
    beam_scores: tuple[float | None, ...]
    """Selection score of each kept candidate: the batch reward (improved) or
    the mean step reward along its path (faithful)."""
    extended: bool = False


@dataclass(frozen=True)
class FinalChoice:
    """The deployed system prompt and the evidence for choosing it."""

    candidate_id: str
    """The search candidate whose prompt was chosen."""
    system_prompt: str
    reason: str
    reward: float | None
    """Held-out reward (improved) or mean step reward on the best path (faithful)."""


@dataclass(frozen=True)
class SearchResult:
    """Everything a stage-2 search scored and decided, in the order it happened."""

    settings: SearchSettings
    initial_prompt: str
    split: QuerySplit
    candidates: tuple[Candidate, ...]
    levels: tuple[LevelRecord, ...]
    skips: tuple[SkipEvent, ...]
    merges: tuple[MergeEvent, ...]
    rejections: tuple[SafetyRejection, ...]
    heldout: tuple[Candidate, ...]
    """Re-scorings on the held-out queries; each one's parent is the search
    candidate whose prompt it scored. Empty for the faithful strategy."""
    final: FinalChoice

    def candidate(self, candidate_id: str) -> Candidate:
        """Return the search or held-out candidate with id `candidate_id`."""
        for item in self.all_candidates():
            if item.id == candidate_id:
                return item
        raise KeyError(candidate_id)

    def all_candidates(self) -> Iterator[Candidate]:
        """Yield the search candidates, then the held-out re-scorings."""
        yield from self.candidates
        yield from self.heldout

    @property
    def extra_depth(self) -> int:
        """Levels the skip rule added beyond `settings.depth`."""
        return sum(1 for level in self.levels if level.extended)
