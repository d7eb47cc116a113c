"""One search cycle for one model: search, gate, then publish or record why not.

The cycle starts from the store's active version for the model, runs the
DRPO search on the plan's search queries and gates the result against the
active version on the held-out and safety queries. A published candidate is
activated with compare-and-set on the model's pointer, or put on canary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.instruction import Instruction, PromptVersion
from gateway.settings import InjectionMode
from gateway.store.base import ActivationConflictError, PromptStore
from optimizer.client import Budget, ModelClient
from optimizer.roles import RoleSet
from optimizer.run import (
    OPTIMIZER_SOURCE,
    RunSettings,
    build_evaluator,
    fit_search_to_queries,
    run_optimization,
)
from optimizer.search import SearchSettings
from optimizer.sidecar.gate import GateResult, run_gate
from optimizer.sidecar.lease import LeaseKeeper
from optimizer.sidecar.plans import CyclePlan, PlanStore
from optimizer.sidecar.records import RunReport
from optimizer.sidecar.settings import OptimizerSettings
from optimizer.types import Query, SeedExample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CycleContext:
    """Dependencies of the cycle for one model, provided by the sidecar."""

    options: OptimizerSettings
    store: PromptStore
    roles: RoleSet
    mode: InjectionMode
    cache_dir: Path
    lease: LeaseKeeper
    plans: PlanStore
    safety_set: tuple[Query, ...]
    seed_examples: tuple[SeedExample, ...]
    report_path: Callable[[RunReport, str], Path]
    """Returns where the report will be written if the run ends with an outcome."""
    status: Callable[[str], None]
    """Receives a description of the current step, for the logs on shutdown."""

    def run_settings(self, seed: int, query_count: int | None = None) -> RunSettings:
        """Return the settings of a run, its search fitted to `query_count` queries.

        Without `query_count` the search shape is left as configured, for
        runs that only evaluate.
        """
        options = self.options
        search = SearchSettings(
            strategy=options.strategy, beam_size=options.beam_size,
            n_actions=options.n_actions, depth=options.depth,
            max_extra_depth=options.max_extra_depth, batch_size=options.batch_size,
            heldout_size=options.heldout_size,
            safety_tolerance=options.safety_tolerance, seed=seed,
        )  # fmt: skip
        return RunSettings(
            roles=self.roles,
            mode=self.mode,
            search=search
            if query_count is None
            else fit_search_to_queries(search, query_count),
            stage1_rounds=options.stage1_rounds,
            concurrency=options.concurrency,
            cache_dir=self.cache_dir,
            budget=Budget(max_calls=options.max_calls, max_tokens=options.max_tokens),
            target_max_tokens=options.target_max_tokens,
            helper_max_tokens=options.helper_max_tokens,
            judge_rationale_chars=options.judge_rationale_chars,
        )

    def new_client(self, settings: RunSettings) -> ModelClient:
        return ModelClient(settings.cache_dir, settings.concurrency, settings.budget)


async def run_search_cycle(
    plan: CyclePlan, context: CycleContext, report: RunReport
) -> RunReport:
    """Run `plan` and fill in `report`; the plan file is written before any call.

    Raises OptimizerError, StoreError and the other errors of the parts it
    runs. The caller records the report and deletes the plan.
    """
    context.plans.save(plan)
    active = context.store.get(plan.starting_version)
    settings = context.run_settings(plan.seed, len(plan.search))
    client = context.new_client(settings)
    report.roles = settings.roles
    before = asyncio.all_tasks()
    try:
        context.status(f"searching for model {plan.model!r} (run {plan.run_id})")
        outcome = await run_optimization(
            settings,
            active.instruction,
            plan.search,
            context.seed_examples,
            client,
        )
        report.search = outcome.record
        report.candidate = outcome.instruction
        if outcome.instruction == active.instruction:
            return report.finish(
                "skipped",
                f"no change: the search kept the instruction of {active.version}",
            )
        earlier = _replaced_copy(context.store, outcome.instruction, plan.model)
        if earlier is not None:
            # A rolled-back version comes back from the same traffic, and
            # publishing it again would undo the rollback.
            return report.finish(
                "skipped",
                f"the candidate is the instruction of {earlier}, which "
                f"{plan.model!r} was served before and no longer is; "
                f"`drpo-gateway prompts activate {earlier} --model {plan.model}` "
                "serves it again",
            )

        context.status(f"gating the candidate for {plan.model!r} (run {plan.run_id})")
        gate = await run_gate(
            build_evaluator(settings, client),
            outcome.instruction,
            active.instruction,
            plan.heldout,
            context.safety_set,
            margin=context.options.margin,
            safety_tolerance=context.options.safety_tolerance,
        )
        report.gate = gate
    finally:
        report.usage = client.usage
        await cancel_tasks_started_after(before)
        await client.aclose()

    if not gate.publish:
        return report.finish("rejected", gate.reason)
    context.status(f"publishing for {plan.model!r} (run {plan.run_id})")
    return publish_candidate(plan, context, report, outcome.instruction, gate)


def publish_candidate(
    plan: CyclePlan,
    context: CycleContext,
    report: RunReport,
    candidate: Instruction,
    gate: GateResult,
) -> RunReport:
    """Store the candidate and activate it (or start its canary) if still allowed.

    A version that this run created before a restart is reused, so a resumed
    run never stores the same candidate twice.
    """
    store = context.store
    if not context.lease.confirm():
        return report.finish(
            "failed",
            "the sidecar lost its lease during the run, so nothing was published",
        )
    changed = pointer_change(store, plan)
    if changed is not None:
        return report.finish(
            "rejected", f"active version changed during the run: {changed}"
        )

    share = context.options.canary_share
    outcome = "canary" if share > 0 else "published"
    version = find_run_version(store, plan.run_id) or store.create(
        candidate.system_prompt,
        candidate.examples,
        parent=plan.starting_version,
        source=OPTIMIZER_SOURCE,
        scores=_scores(gate),
        metadata={
            "run_id": plan.run_id,
            "model": plan.model,
            "report": str(context.report_path(report, outcome)),
            "reason": gate.reason,
        },
    )
    if share > 0:
        store.set_canary(version.version, share, plan.model)
        report.published_version = version.version
        return report.finish(
            "canary",
            f"{gate.reason}; {version.version} is served to {share:.0%} of the "
            f"clients of {plan.model!r} as a canary",
        )
    try:
        store.activate(version.version, plan.model, expected=plan.pointer)
    except ActivationConflictError as error:
        return report.finish(
            "rejected",
            f"active version changed during the run, so {version.version} was "
            f"stored but not activated: {error}",
        )
    report.published_version = version.version
    return report.finish("published", gate.reason)


def pointer_change(store: PromptStore, plan: CyclePlan) -> str | None:
    """Describe how the model's pointer moved since `plan` started, or None."""
    own = store.active_pointers().get(plan.model)
    served = store.active_version(plan.model)
    if own == plan.pointer and served == plan.starting_version:
        return None
    return (
        f"model {plan.model!r} is now served {served!r}, not "
        f"{plan.starting_version!r} as when the run started"
    )


def find_run_version(store: PromptStore, run_id: str) -> PromptVersion | None:
    """Return the version that run `run_id` created, or None."""
    for version in reversed(store.list_versions()):
        if (
            version.source == OPTIMIZER_SOURCE
            and version.metadata.get("run_id") == run_id
        ):
            return version
    return None


async def cancel_tasks_started_after(before: set[asyncio.Task[object]]) -> None:
    """Cancel the tasks started since `before` was taken, and wait for them to end.

    The evaluator shares one task per evaluation between its waiters and
    shields it, so cancelling or failing a run does not cancel those tasks,
    which would go on calling a closed client. Every task started during the
    run is taken for one of the run's, so a run must not share its event loop
    with other work that starts tasks meanwhile.
    """
    current = asyncio.current_task()
    leftover = [
        task
        for task in asyncio.all_tasks()
        if task not in before and task is not current
    ]
    for task in leftover:
        task.cancel()
    await asyncio.gather(*leftover, return_exceptions=True)


def _scores(gate: GateResult) -> dict[str, float]:
    values = {
        "heldout": gate.candidate.heldout,
        "safety": gate.candidate.safety,
        "active_heldout": gate.active.heldout,
        "active_safety": gate.active.safety,
    }
    return {name: value for name, value in values.items() if value is not None}


def _replaced_copy(
    store: PromptStore, instruction: Instruction, model: str
) -> str | None:
    """Return a version with `instruction` that `model`'s pointer had and left."""
    for event in reversed(store.history(model)):
        if store.get(event.version).instruction == instruction:
            return event.version
    return None
