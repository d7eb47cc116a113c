"""The publish gate: candidate against active instruction on the same queries.

Both instructions answer the held-out window queries and the shipped safety
set, scored by one evaluator, so they share the target, the aspect
selections and the judge. A safety query always gets the Safety aspect
(see `optimizer.selector.clamp_aspects`), which gives the safety score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from gateway.instruction import Instruction
from optimizer.evaluate import Evaluator, gather_all
from optimizer.types import Evaluation, Query

# Slack for float noise, so that a gain of exactly the margin passes.
_EPSILON = 1e-9


@dataclass(frozen=True)
class GateScore:
    """Scores of one instruction: mean held-out reward and mean Safety score."""

    heldout: float | None
    safety: float | None
    heldout_scored: int
    """Held-out answers with a reward; the mean is over these."""
    safety_scored: int
    """Safety-set answers with a Safety score; the mean is over these."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "heldout": self.heldout,
            "safety": self.safety,
            "heldout_scored": self.heldout_scored,
            "safety_scored": self.safety_scored,
        }


@dataclass(frozen=True)
class GateResult:
    """The gate's decision, its reason and the scores of both instructions."""

    publish: bool
    reason: str
    candidate: GateScore
    active: GateScore
    margin: float
    safety_tolerance: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "publish": self.publish,
            "reason": self.reason,
            "candidate": self.candidate.to_dict(),
            "active": self.active.to_dict(),
            "margin": self.margin,
            "safety_tolerance": self.safety_tolerance,
        }


async def run_gate(
    evaluator: Evaluator,
    candidate: Instruction,
    active: Instruction,
    heldout: Sequence[Query],
    safety_set: Sequence[Query],
    *,
    margin: float,
    safety_tolerance: float,
) -> GateResult:
    """Score `candidate` and `active` concurrently and decide whether to publish."""
    candidate_score, active_score = await gather_all(
        [
            score_instruction(evaluator, candidate, heldout, safety_set),
            score_instruction(evaluator, active, heldout, safety_set),
        ]
    )
    publish, reason = decide(candidate_score, active_score, margin, safety_tolerance)
    return GateResult(
        publish, reason, candidate_score, active_score, margin, safety_tolerance
    )


async def score_instruction(
    evaluator: Evaluator,
    instruction: Instruction,
    heldout: Sequence[Query],
    safety_set: Sequence[Query],
) -> GateScore:
    """Answer and judge the held-out and safety queries under `instruction`."""
    evaluations = await evaluator.evaluate_batch(instruction, [*heldout, *safety_set])
    return score_evaluations(evaluations[: len(heldout)], evaluations[len(heldout) :])


def score_evaluations(
    heldout: Sequence[Evaluation], safety_set: Sequence[Evaluation]
) -> GateScore:
    """Return the mean reward of `heldout` and mean Safety score of `safety_set`.

    Answers without a usable score are left out of the means; a mean over no
    scores is None.
    """
    rewards = [item.reward for item in heldout if item.reward is not None]
    safeties = [
        item.judgement.safety
        for item in safety_set
        if item.judgement.safety is not None
    ]
    return GateScore(
        heldout=fmean(rewards) if rewards else None,
        safety=fmean(safeties) if safeties else None,
        heldout_scored=len(rewards),
        safety_scored=len(safeties),
    )


def decide(
    candidate: GateScore, active: GateScore, margin: float, safety_tolerance: float
) -> tuple[bool, str]:
    """Return whether to publish `candidate`, and the reason with the numbers.

    Publish when the held-out reward gains at least `margin` and the safety
    score drops by at most `safety_tolerance`. A missing score rejects.
    """
    missing = _missing_scores(candidate, active)
    if missing:
        return False, (
            f"the judge returned no usable {' or '.join(missing)}, so the "
            "candidate cannot be compared"
        )
    assert candidate.heldout is not None and active.heldout is not None
    assert candidate.safety is not None and active.safety is not None

    problems = []
    if candidate.safety < active.safety - safety_tolerance - _EPSILON:
        problem = f"safety fell from {active.safety:.2f} to {candidate.safety:.2f}"
        if safety_tolerance:
            problem += f", more than the tolerance {safety_tolerance:g}"
        problems.append(problem)
    gain = candidate.heldout - active.heldout
    if gain < margin - _EPSILON:
        problems.append(
            f"held-out {candidate.heldout:.2f} vs {active.heldout:.2f} is below "
            f"the margin {margin:g}"
        )
    if problems:
        return False, "; ".join(problems)
    return True, (
        f"held-out {candidate.heldout:.2f} vs {active.heldout:.2f} meets the "
        f"margin {margin:g}, and safety {candidate.safety:.2f} vs "
        f"{active.safety:.2f} holds"
    )


def _missing_scores(candidate: GateScore, active: GateScore) -> list[str]:
    missing = []
    for name, score in (("candidate", candidate), ("active version", active)):
        if score.heldout is None:
            missing.append(f"held-out score for the {name}")
        if score.safety is None:
            missing.append(f"safety score for the {name}")
    return missing
