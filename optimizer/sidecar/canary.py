"""Review of a canary version from live sampled answers: promote, roll back or wait.

While a canary runs, a share of clients is served the canary version and the
rest the active (control) version. A review compares the judge's scores of the
answers those clients actually received, so it calls only the aspect selector
and the judge, never the target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from statistics import fmean
from typing import Any, Literal

from gateway.sampling.store import Sample
from gateway.store.base import DEFAULT_MODEL_KEY, Canary, model_key
from optimizer.evaluate import Evaluator, gather_all
from optimizer.types import Evaluation, Query, QueryKind

Decision = Literal["promote", "rollback", "wait"]

MAX_ANSWERS_PER_ARM = 100
"""Newest sampled answers judged per arm, which bounds the judge calls of a review."""

MAX_TEXT_CHARS = 8000
"""Longest query or answer judged. Longer samples are skipped, because a prompt
past the judge's context would fail every later review of the same canary."""

SAMPLED_CATEGORY = "sampled"

# Slack for float noise in the means, so that equal scores count as equal.
_EPSILON = 1e-9


@dataclass(frozen=True)
class CanarySettings:
    """Thresholds of the canary review. Scores are on the judge's 1-5 scale."""

    min_samples: int = 20
    """Scored answers needed in each arm before a promote or rollback decision."""
    margin: float = 0.0
    """Maximum by which the canary's mean reward may trail the control's."""
    safety_tolerance: float = 0.0
    """Maximum by which the canary's mean Safety score may trail the control's."""
    max_seconds: float = 86400
    """Seconds after the canary's start past which too few samples roll it back."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_samples <= MAX_ANSWERS_PER_ARM:
            raise ValueError(
                f"The canary min_samples must be from 1 to {MAX_ANSWERS_PER_ARM} "
                f"(the answers judged per arm), got {self.min_samples!r}."
            )
        if self.margin < 0 or self.safety_tolerance < 0:
            raise ValueError(
                "The canary margin and safety_tolerance must not be negative, got "
                f"{self.margin!r} and {self.safety_tolerance!r}."
            )
        if self.max_seconds <= 0:
            raise ValueError(
                f"The canary max_seconds must be positive, got {self.max_seconds!r}."
            )


@dataclass(frozen=True)
class ArmScore:
    """Judge scores of the sampled answers of one version in a canary review."""

    version: str
    samples: int
    """Usable sampled answers of this version, at most `MAX_ANSWERS_PER_ARM`."""
    reward: float | None
    """Mean reward of the scored answers, or None when none was judged or scored."""
    safety: float | None
    """Mean Safety score of the answers that have one, or None when none has."""
    scored: int = 0
    """Answers with a reward, or 0 when the review did not judge this arm."""


@dataclass(frozen=True)
class CanaryReview:
    """Outcome of one canary review, with the scores of both arms."""

    decision: Decision
    reason: str
    canary: ArmScore
    control: ArmScore

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "canary": asdict(self.canary),
            "control": asdict(self.control),
        }


@dataclass(frozen=True)
class SampledAnswer:
    """The query of one sample and the answer its client received."""

    query: Query
    answer: str
    time: datetime


async def review_canary(
    canary: Canary,
    control_version: str,
    samples: Sequence[Sample],
    evaluator: Evaluator,
    settings: CanarySettings,
    now: datetime,
) -> CanaryReview:
    """Decide from sampled answers whether to promote the canary, roll it back or wait.

    The judge runs only when both arms have `min_samples` usable answers, or
    once `max_seconds` have passed since the canary started, so a waiting
    review makes no model calls. Raises ModelCallError when the selector or
    judge endpoint fails.
    """
    if control_version == canary.version:
        raise ValueError(
            f"The control version {control_version!r} is the canary version "
            "itself. Pass the version active before the canary started."
        )
    canary_answers = arm_answers(samples, canary, canary.version)
    control_answers = arm_answers(samples, canary, control_version)
    elapsed = (_utc(now) - _utc(canary.started_at)).total_seconds()
    timed_out = elapsed > settings.max_seconds

    if not timed_out and (
        min(len(canary_answers), len(control_answers)) < settings.min_samples
    ):
        canary_arm = ArmScore(canary.version, len(canary_answers), None, None)
        control_arm = ArmScore(control_version, len(control_answers), None, None)
        reason = (
            f"Waiting for {settings.min_samples} sampled answers per arm: canary "
            f"{canary.version} has {canary_arm.samples} and control "
            f"{control_version} has {control_arm.samples}."
        )
        return CanaryReview("wait", reason, canary_arm, control_arm)

    evaluations = await gather_all(
        evaluator.judge_answer(item.query, item.answer)
        for item in [*canary_answers, *control_answers]
    )
    split = len(canary_answers)
    canary_arm = score_arm(canary.version, evaluations[:split])
    control_arm = score_arm(control_version, evaluations[split:])

    if min(canary_arm.scored, control_arm.scored) < settings.min_samples:
        return _short_review(canary_arm, control_arm, settings, elapsed, timed_out)
    decision, reason = compare_arms(canary_arm, control_arm, settings)
    return CanaryReview(decision, reason, canary_arm, control_arm)


def arm_answers(
    samples: Sequence[Sample], canary: Canary, version: str
) -> list[SampledAnswer]:
    """Return the newest usable answers served by `version` since the canary started.

    A sample is usable when it is complete, at or after `canary.started_at`,
    for the canary's model (any model for the default pointer), and has a
    query and a non-empty answer of at most `MAX_TEXT_CHARS` each.
    """
    started_at = _utc(canary.started_at)
    any_model = model_key(canary.model) == DEFAULT_MODEL_KEY
    answers: list[SampledAnswer] = []
    for sample in samples:
        if sample.prompt_version != version or not sample.complete:
            continue
        if _utc(sample.time) < started_at:
            continue
        if not any_model and sample.model != canary.model:
            continue
        answer = sampled_answer(sample)
        if answer is not None:
            answers.append(answer)
    answers.sort(key=lambda item: item.time)
    return answers[-MAX_ANSWERS_PER_ARM:]


def sampled_answer(sample: Sample) -> SampledAnswer | None:
    """Return the query and answer of `sample`, or None when either is unusable."""
    text = query_text(sample)
    answer = sample.answer.strip()
    if not text or not answer:
        return None
    if len(text) > MAX_TEXT_CHARS or len(answer) > MAX_TEXT_CHARS:
        return None
    query = Query(sampled_query_id(text), text, SAMPLED_CATEGORY, QueryKind.GENERAL)
    return SampledAnswer(query, answer, _utc(sample.time))


def query_text(sample: Sample) -> str | None:
    """Return the query a sampled answer responds to, stripped, or None.

    For a chat sample it is the last message, which must come from the user,
    because an answer to a tool result or an assistant prefill does not answer
    the user's text alone. A content list contributes its text parts, joined
    by newlines. For a text completion it is the prompt, when that is a string.
    """
    if sample.messages is not None:
        if not sample.messages:
            return None
        last = sample.messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            return None
        return _content_text(last.get("content"))
    if isinstance(sample.prompt, str):
        return sample.prompt.strip() or None
    return None


def sampled_query_id(text: str) -> str:
    """Return a query id derived from `text` alone, stable across reviews."""
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return f"sampled-{digest[:16]}"


def score_arm(version: str, evaluations: Sequence[Evaluation]) -> ArmScore:
    """Return the mean reward and mean Safety score of one arm's evaluations."""
    rewards = [item.reward for item in evaluations if item.reward is not None]
    safeties = [
        item.judgement.safety
        for item in evaluations
        if item.judgement.safety is not None
    ]
    return ArmScore(
        version=version,
        samples=len(evaluations),
        reward=fmean(rewards) if rewards else None,
        safety=fmean(safeties) if safeties else None,
        scored=len(rewards),
    )


def compare_arms(
    canary: ArmScore, control: ArmScore, settings: CanarySettings
) -> tuple[Decision, str]:
    """Decide promote or rollback from the scores of two sufficiently judged arms.

    The canary is promoted when its mean reward is within `margin` of the
    control's and its mean Safety score within `safety_tolerance`. Safety is
    compared only when both arms have a Safety score, because the selector
    picks the Safety aspect only for queries where it matters.
    """
    if canary.reward is None or control.reward is None:
        return "wait", "No answer of one arm has a judge score yet."

    problems: list[str] = []
    if canary.reward < control.reward - settings.margin - _EPSILON:
        problems.append(
            f"Canary {canary.version} reward {canary.reward:.2f} is below control "
            f"{control.version} reward {control.reward:.2f} minus the margin "
            f"{settings.margin:.2f}."
        )
    safety_problem = _safety_problem(canary, control, settings)
    if safety_problem is not None:
        problems.append(safety_problem)
    if problems:
        return "rollback", " ".join(problems)

    reason = (
        f"Canary {canary.version} reward {canary.reward:.2f} vs control "
        f"{control.version} {control.reward:.2f} over {canary.scored} and "
        f"{control.scored} scored answers is within the margin "
        f"{settings.margin:.2f}. {_safety_summary(canary, control, settings)}"
    )
    return "promote", reason


def _safety_problem(
    canary: ArmScore, control: ArmScore, settings: CanarySettings
) -> str | None:
    if canary.safety is None or control.safety is None:
        return None
    if canary.safety >= control.safety - settings.safety_tolerance - _EPSILON:
        return None
    return (
        f"Canary {canary.version} safety {canary.safety:.2f} fell below control "
        f"{control.version} safety {control.safety:.2f} minus the tolerance "
        f"{settings.safety_tolerance:.2f}."
    )


def _safety_summary(
    canary: ArmScore, control: ArmScore, settings: CanarySettings
) -> str:
    if canary.safety is None or control.safety is None:
        return "Safety was not compared, because an arm has no Safety score."
    return (
        f"Safety {canary.safety:.2f} vs {control.safety:.2f} is within the "
        f"tolerance {settings.safety_tolerance:.2f}."
    )


def _short_review(
    canary: ArmScore,
    control: ArmScore,
    settings: CanarySettings,
    elapsed: float,
    timed_out: bool,
) -> CanaryReview:
    counts = (
        f"canary {canary.version} has {canary.scored} scored answers of "
        f"{canary.samples} and control {control.version} {control.scored} of "
        f"{control.samples}, below the {settings.min_samples} needed per arm"
    )
    if timed_out:
        reason = (
            f"Rolled back for not enough traffic: after {elapsed:.0f} s (limit "
            f"{settings.max_seconds:.0f} s) {counts}."
        )
        return CanaryReview("rollback", reason, canary, control)
    return CanaryReview("wait", f"Waiting for judge scores: {counts}.", canary, control)


def _content_text(content: object) -> str | None:
    if isinstance(content, str):
        return content.strip() or None
    if not isinstance(content, list):
        return None
    parts = [
        part["text"]
        for part in content
        if isinstance(part, dict)
        and part.get("type") == "text"
        and isinstance(part.get("text"), str)
    ]
    return "\n".join(parts).strip() or None


def _utc(moment: datetime) -> datetime:
    # Naive times are UTC, as in the sample store.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
