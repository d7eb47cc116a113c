"""A cycle that reviews a running canary instead of searching, and applies the decision.

Promote activates the canary version with compare-and-set on the model's
pointer (which ends the canary in the same store transaction), rollback
clears the canary, and wait changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime

from gateway.sampling.store import Sample
from gateway.store.base import ActivationConflictError, Canary
from optimizer.run import build_evaluator
from optimizer.sidecar.canary import CanarySettings, review_canary
from optimizer.sidecar.cycle import CycleContext, cancel_tasks_started_after
from optimizer.sidecar.records import RunReport


def canary_settings(context: CycleContext) -> CanarySettings:
    options = context.options
    return CanarySettings(
        min_samples=options.canary_min_samples,
        margin=options.canary_margin,
        safety_tolerance=options.safety_tolerance,
        max_seconds=options.canary_max_seconds,
    )


async def run_review_cycle(
    canary: Canary,
    model: str,
    samples: Sequence[Sample],
    context: CycleContext,
    report: RunReport,
) -> RunReport:
    """Review `canary` of `model` from `samples` and fill in `report`."""
    store = context.store
    control = store.active_version(model)
    pointer = store.active_pointers().get(model)
    report.starting_version = control
    if control is None or control == canary.version:
        return report.finish(
            "failed",
            f"the canary {canary.version} of {model!r} has no control version to "
            f"compare with (active: {control!r}); end it with `drpo-gateway "
            "prompts canary --stop`",
        )

    settings = context.run_settings(seed=0)
    client = context.new_client(settings)
    before = asyncio.all_tasks()
    try:
        context.status(f"reviewing canary {canary.version} of {model!r}")
        review = await review_canary(
            canary,
            control,
            samples,
            build_evaluator(settings, client),
            canary_settings(context),
            datetime.now(UTC),
        )
    finally:
        report.usage = client.usage
        await cancel_tasks_started_after(before)
        await client.aclose()
    report.canary = review

    if review.decision == "wait":
        return report.finish("waiting", review.reason)
    if not context.lease.confirm():
        return report.finish(
            "failed",
            f"the sidecar lost its lease during the review, so the {review.decision} "
            f"of canary {canary.version} was not applied",
        )
    if review.decision == "rollback":
        store.clear_canary(model)
        return report.finish("rolled_back", review.reason)
    return promote(canary, model, control, pointer, context, report)


def promote(
    canary: Canary,
    model: str,
    control: str,
    pointer: str | None,
    context: CycleContext,
    report: RunReport,
) -> RunReport:
    """Activate the canary version unless the pointer moved since the review began."""
    store = context.store
    served = store.active_version(model)
    if served != control:
        return report.finish(
            "rejected",
            f"active version changed during the review: {model!r} is now served "
            f"{served!r}, not {control!r}, so canary {canary.version} was not promoted",
        )
    try:
        store.activate(canary.version, model, expected=pointer)
    except ActivationConflictError as error:
        return report.finish(
            "rejected",
            f"active version changed during the review, so canary "
            f"{canary.version} was not promoted: {error}",
        )
    report.published_version = canary.version
    assert report.canary is not None
    return report.finish("promoted", report.canary.reason)
