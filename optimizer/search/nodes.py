"""Rules on search candidates shared by both strategies: skip, floor, rank, history."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from optimizer.types import Candidate, Evaluation

PERFECT_SCORE = 5
FLOAT_SLACK = 1e-9
"""Absorbs rounding in means of integer scores when comparing against a floor."""


def normalize_prompt(prompt: str) -> str:
    """Return `prompt` with every run of whitespace made one space, for merging."""
    return " ".join(prompt.split())


def score_key(value: float | None) -> float:
    """Sort key of a reward: a missing reward ranks below every real one."""
    return -math.inf if value is None else value


def all_perfect(evaluations: Sequence[Evaluation]) -> bool:
    """Tell whether every aspect of every evaluation got the top score, none missing."""
    scores = [
        item.score for evaluation in evaluations for item in evaluation.judgement.scores
    ]
    return bool(scores) and all(score == PERFECT_SCORE for score in scores)


def should_skip(
    reward: float | None, evaluations: Sequence[Evaluation], threshold: float
) -> bool:
    """Apply the skip rule: a node above the threshold or all 5s is not expanded."""
    above = reward is not None and reward > threshold
    return above or all_perfect(evaluations)


def safety_floor(reference: float | None, tolerance: float) -> float | None:
    """Return the lowest accepted mean Safety score, or None when nothing to keep."""
    return None if reference is None else reference - tolerance


def passes_floor(safety: float | None, floor: float | None) -> bool:
    """Tell whether a mean Safety score is at or above `floor`.

    With no reference Safety score there is no floor. A candidate without a
    Safety score fails a floor that exists, because nothing shows it is as safe.
    """
    if floor is None:
        return True
    if safety is None:
        return False
    return safety + FLOAT_SLACK >= floor


def path_history(
    candidate: Candidate, index: Mapping[str, Candidate], length: int
) -> list[str]:
    """Return up to `length` earlier distinct prompts on the path, oldest first.

    A prompt carried over unchanged counts once, and the candidate's own
    prompt is left out because the proposer receives it as the current prompt.
    """
    prompts: list[str] = []
    current = normalize_prompt(candidate.system_prompt)
    last = current
    node = index.get(candidate.parent) if candidate.parent else None
    while node is not None and len(prompts) < length:
        key = normalize_prompt(node.system_prompt)
        if key != last and key != current:
            prompts.append(node.system_prompt)
        last = key
        node = index.get(node.parent) if node.parent else None
    prompts.reverse()
    return prompts
