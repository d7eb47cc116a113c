"""Settings of the stage-2 beam search over system prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from optimizer.errors import SearchError

Strategy = Literal["improved", "faithful"]


@dataclass(frozen=True)
class SearchSettings:
    """Beam shape, scoring batches and selection rules of the stage-2 search."""

    strategy: Strategy = "improved"
    beam_size: int = 2
    n_actions: int = 3
    """New system prompts requested from the proposer per expanded node."""
    depth: int = 20
    """Levels below the root before any extension."""
    max_extra_depth: int = 10
    """Maximum levels added in total by the skip rule, at most one per level."""
    skip_threshold: float = 4.5
    """A node whose last reward is above this, or all 5s, is kept unchanged."""
    batch_size: int = 6
    """Improved strategy: queries every candidate of a level is scored on."""
    batch_mix: tuple[float, float, float] = (0.5, 0.3, 0.2)
    """Improved strategy: shares of general, hard and safety queries in a batch."""
    heldout_size: int = 12
    """Improved strategy: queries kept out of the search to choose the final prompt."""
    final_candidates: int = 3
    """Improved strategy: best distinct prompts re-scored on the held-out queries."""
    safety_tolerance: float = 0.0
    """Maximum drop of mean Safety score below the reference that is still accepted."""
    history_length: int = 3
    """Earlier prompts on the path shown to the proposer."""
    seed: int = 0
    """Seed of the one random generator, recorded with the result."""

    def __post_init__(self) -> None:
        check_at_least("beam_size", self.beam_size, 1)
        check_at_least("n_actions", self.n_actions, 1)
        check_at_least("depth", self.depth, 0)
        check_at_least("max_extra_depth", self.max_extra_depth, 0)
        check_at_least("batch_size", self.batch_size, 1)
        check_at_least("heldout_size", self.heldout_size, 1)
        check_at_least("final_candidates", self.final_candidates, 1)
        check_at_least("history_length", self.history_length, 0)
        check_at_least("safety_tolerance", self.safety_tolerance, 0)
        if self.strategy not in ("improved", "faithful"):
            raise SearchError(
                f"strategy must be 'improved' or 'faithful', got {self.strategy!r}."
            )
        if len(self.batch_mix) != 3 or min(self.batch_mix) < 0:
            raise SearchError(
                "batch_mix must be three shares of 0 or more (general, hard, "
                f"safety), got {self.batch_mix!r}."
            )
        if sum(self.batch_mix) <= 0:
            raise SearchError(
                f"batch_mix must have at least one positive share, got "
                f"{self.batch_mix!r}."
            )


def check_at_least(name: str, value: float, minimum: float) -> None:
    """Raise SearchError naming the setting when `value` is below `minimum`."""
    if value < minimum:
        raise SearchError(f"{name} must be {minimum} or more, got {value!r}.")
