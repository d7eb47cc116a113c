"""The sidecar: lease, trigger loop, resumed plans and one cycle over all models.

A cycle reads one window of samples and, per model, either reviews the
model's running canary or searches from its active version. Every run
writes one report. While another sidecar holds the lease, this one waits
on standby.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from gateway.errors import ConfigurationError, GatewayError
from gateway.modes import ModeResolver
from gateway.prompting import load_default_instruction
from gateway.sampling.store import SampleStore
from gateway.settings import Settings
from gateway.store import PromptStore
from gateway.store.base import DEFAULT_MODEL_KEY, Canary
from gateway.store.factory import open_prompt_store, open_sample_store
from gateway.upstream import UpstreamTarget
from optimizer.client import Endpoint
from optimizer.errors import OptimizerError
from optimizer.roles import RoleSet
from optimizer.run import cache_name, keyed_endpoint
from optimizer.seeds import load_safety_queries, load_seed_examples
from optimizer.sidecar.cycle import CycleContext, find_run_version, run_search_cycle
from optimizer.sidecar.lease import LeaseKeeper, new_owner_id
from optimizer.sidecar.metrics import SidecarMetrics
from optimizer.sidecar.plans import CyclePlan, PlanStore, TriggerState
from optimizer.sidecar.records import (
    RunReport,
    new_run_id,
    report_file,
    write_report,
)
from optimizer.sidecar.review import run_review_cycle
from optimizer.sidecar.trigger import count_new_samples, due_reason, newest_time
from optimizer.sidecar.window import Window, build_window, split_queries

logger = logging.getLogger(__name__)

# Errors a run records as failed. Anything else is a bug: it is logged with
# its traceback and recorded as failed too, so one model cannot stop the loop.
EXPECTED_ERRORS = (OptimizerError, ConfigurationError, GatewayError, ValueError)

CYCLE_RETRY_SECONDS = 60.0
"""Maximum wait after a cycle that failed as a whole, e.g. on a locked store."""


class Sidecar:
    """The optimizer sidecar of one gateway data directory.

    `target` is where the target model is called, the gateway's own
    upstream. `store` and `samples` default to the stores that the
    settings choose (disk under `settings.data_dir`, or Redis), and
    `metrics` to a new registry.
    """

    def __init__(
        self,
        settings: Settings,
        target: UpstreamTarget,
        *,
        store: PromptStore | None = None,
        samples: SampleStore | None = None,
        metrics: SidecarMetrics | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.options = settings.optimizer
        self.target = target
        self.store = store or open_prompt_store(settings)
        self.samples = samples or open_sample_store(settings)
        self.metrics = metrics or SidecarMetrics(max_models=settings.metrics_max_models)
        self.lease = LeaseKeeper(
            self.store, owner or new_owner_id(), self.options.lease_ttl
        )
        self.state_dir = settings.data_dir / "sidecar"
        self.runs_dir = settings.data_dir / "runs" / "sidecar"
        self.plans = PlanStore(self.state_dir)
        self.activity = "starting"
        self._modes = ModeResolver(settings, target.default_mode)
        self._safety_set = tuple(load_safety_queries())[: self.options.safety_queries]
        self._seed_examples = (
            tuple(load_seed_examples()) if self.options.stage1_rounds else ()
        )
        self._helpers: tuple[Endpoint | None, Endpoint | None] | None = None
        self._trigger = TriggerState.load(self.state_dir)
        self._cycle: asyncio.Task[list[RunReport]] | None = None
        self._stop = asyncio.Event()
        seeded = self.store.ensure_seeded(load_default_instruction())
        if seeded is not None:
            logger.info(
                "Prompt store was empty; stored the built-in %s", seeded.version
            )

    async def run_once(self, trigger: str = "once") -> list[RunReport]:
        """Take the lease, run one cycle now and release the lease.

        Returns one report per run; a single skipped report when another
        sidecar holds the lease.
        """
        if not self._hold_lease():
            return [self._skip_for_lease(trigger)]
        try:
            return await self._run_cycle_task(trigger)
        finally:
            await self._release_lease()

    async def run_forever(self) -> None:
        """Run cycles whenever they are due, until `stop` is called."""
        logger.info(
            "Optimizer sidecar started as %s: every %.0f s or %d new samples",
            self.lease.owner,
            self.options.interval,
            self.options.min_new_samples,
        )
        try:
            while not self._stop.is_set():
                pause = self.options.check_interval
                try:
                    if self._hold_lease():
                        reason = await self.due()
                        if reason is not None:
                            await self._run_cycle_task(reason)
                except EXPECTED_ERRORS as error:
                    pause = min(self.options.interval, CYCLE_RETRY_SECONDS)
                    logger.error(
                        "The cycle failed, retrying in %.1f s: %s", pause, error
                    )
                await self._sleep(pause)
        finally:
            await self._release_lease()
            logger.info("Optimizer sidecar stopped")

    def stop(self, why: str) -> None:
        """Stop the loop and abandon the current cycle, whose plan is kept."""
        logger.info(
            "Stopping (%s) while %s; a cycle in progress keeps its plan, and the "
            "next start resumes it from the cache",
            why,
            self.activity,
        )
        self._stop.set()
        if self._cycle is not None:
            self._cycle.cancel()

    async def due(self, now: datetime | None = None) -> str | None:
        """Return why a cycle is due now, or None.

        The trigger state is read from disk each time, because another
        sidecar may have run cycles while this one was on standby.
        """
        self._trigger = TriggerState.load(self.state_dir)
        new = await asyncio.to_thread(
            count_new_samples,
            self.samples,
            self._trigger.newest_sample_at,
            self.options.min_new_samples,
        )
        return due_reason(
            self._trigger,
            now or datetime.now(UTC),
            new,
            interval=self.options.interval,
            min_new_samples=self.options.min_new_samples,
        )

    async def run_cycle(self, trigger: str) -> list[RunReport]:
        """Resume pending plans, then run every model of a new window once.

        The caller must hold the lease.
        """
        logger.info("Cycle started (%s)", trigger)
        reports = await self._resume(trigger)
        self.activity = "reading the sample window"
        samples = await asyncio.to_thread(self.samples.recent, self.options.window)
        window = build_window(
            samples,
            client_cap=self.options.client_cap,
            max_chars=self.options.max_query_chars,
            models=self.options.models,
        )
        self.metrics.record_window(window.facts.kept, window.facts.dropped_total)
        canaries = self.store.canaries()
        done = {report.model for report in reports}
        models = [m for m in self._models(window, canaries) if m not in done]
        self.metrics.add_models(models)
        for model in models:
            reports.append(await self._run_model(model, window, canaries, trigger))
        if not reports:
            reports.append(self._skip_empty_window(window, trigger))

        newest = newest_time(samples) or self._trigger.newest_sample_at
        self._trigger = TriggerState(datetime.now(UTC), newest)
        self._trigger.save(self.state_dir)
        self.activity = "waiting for the next cycle"
        return reports

    def close(self) -> None:
        """Close the sample and prompt stores, also ones passed in."""
        self.samples.close()
        self.store.close()

    @property
    def stopped(self) -> bool:
        """Whether `stop` was called."""
        return self._stop.is_set()

    async def _run_cycle_task(self, trigger: str) -> list[RunReport]:
        """Run a cycle in a task of its own, so that `stop` can cancel it alone.

        Returns no reports when `stop` cancelled the cycle.
        """
        self._cycle = asyncio.create_task(self.run_cycle(trigger))
        try:
            return await self._cycle
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.stopped and current is not None and not current.cancelling():
                return []
            raise
        finally:
            self._cycle = None

    async def _run_model(
        self,
        model: str,
        window: Window,
        canaries: Mapping[str, Canary],
        trigger: str,
    ) -> RunReport:
        report = RunReport(new_run_id(), model, trigger)
        plan: CyclePlan | None = None
        try:
            context = await self._context(model)
            canary = canaries.get(model)
            if canary is not None:
                samples = await asyncio.to_thread(
                    self.samples.recent, self.options.window, canary.started_at
                )
                await run_review_cycle(canary, model, samples, context, report)
            else:
                plan = self._plan(model, window, report)
                if plan is not None:
                    await run_search_cycle(plan, context, report)
        except EXPECTED_ERRORS as error:
            report.finish("failed", str(error))
        except Exception as error:
            logger.exception("Run %s for %r failed unexpectedly", report.run_id, model)
            report.finish("failed", f"unexpected error: {error!r}")
        return self._record(report, plan)

    def _plan(self, model: str, window: Window, report: RunReport) -> CyclePlan | None:
        """Return the plan of a search for `model`, or None after finishing `report`."""
        queries = window.queries.get(model, ())
        search, heldout = split_queries(queries, self.options.heldout_fraction)
        report.window = {
            **window.facts.to_dict(),
            "model_queries": len(queries),
            "search": len(search),
            "heldout": len(heldout),
        }
        minimum = self.options.min_queries
        if len(queries) < minimum or len(search) < 2 or not heldout:
            report.finish(
                "skipped",
                f"the window has {len(queries)} usable queries for {model!r} "
                f"({len(search)} search, {len(heldout)} held-out), fewer than the "
                f"{minimum} needed (at least 2 search and 1 held-out)",
            )
            return None
        starting = self.store.active_version(model)
        if starting is None:
            report.finish("failed", f"no version is active for {model!r}")
            return None
        report.starting_version = starting
        return CyclePlan(
            run_id=report.run_id,
            model=model,
            starting_version=starting,
            pointer=self.store.active_pointers().get(model),
            search=search,
            heldout=heldout,
            seed=self.options.seed,
            created_at=report.started_at,
            window=report.window,
        )

    async def _resume(self, trigger: str) -> list[RunReport]:
        """Finish every pending plan left by a stopped or killed sidecar."""
        reports = []
        for plan in self.plans.load_all():
            self.activity = f"resuming run {plan.run_id} for {plan.model!r}"
            self.metrics.add_models([plan.model])
            logger.info("Resuming run %s for %r from its plan", plan.run_id, plan.model)
            report = RunReport(plan.run_id, plan.model, trigger, resumed=True)
            report.window = plan.window
            report.starting_version = plan.starting_version
            try:
                await self._resume_plan(plan, report)
            except EXPECTED_ERRORS as error:
                report.finish("failed", str(error))
            except Exception as error:
                logger.exception("Resumed run %s failed unexpectedly", plan.run_id)
                report.finish("failed", f"unexpected error: {error!r}")
            reports.append(self._record(report, plan))
        return reports

    async def _resume_plan(self, plan: CyclePlan, report: RunReport) -> None:
        created = find_run_version(self.store, plan.run_id)
        served = self.store.active_version(plan.model)
        canary = self.store.canaries().get(plan.model)
        if created is not None and served == created.version:
            report.published_version = created.version
            report.finish(
                "published", f"{created.version} was activated before the restart"
            )
        elif (
            created is not None
            and canary is not None
            and canary.version == created.version
        ):
            report.published_version = created.version
            report.finish(
                "canary", f"{created.version} was put on canary before the restart"
            )
        elif served != plan.starting_version:
            report.finish(
                "skipped",
                f"the plan started from {plan.starting_version}, but {plan.model!r} "
                f"is now served {served!r}",
            )
        else:
            await run_search_cycle(plan, await self._context(plan.model), report)

    def _record(self, report: RunReport, plan: CyclePlan | None) -> RunReport:
        if report.finished_at is None:
            report.finish("failed", "the run ended without an outcome")
        path = write_report(self.runs_dir, report)
        if plan is not None:
            self.plans.delete(plan)
        self.metrics.record_run(report)
        log = logger.warning if report.outcome == "failed" else logger.info
        log(
            "Run %s for %s: %s (%s); %s; %d calls, %d cache hits, %.1f s; report %s",
            report.run_id,
            report.model or "all models",
            report.outcome,
            report.reason,
            _scores_text(report),
            report.calls,
            report.cache_hits,
            report.seconds,
            path,
        )
        return report

    def _skip_for_lease(self, trigger: str) -> RunReport:
        holder = self.store.lease(self.lease.name)
        who = (
            f"{holder.owner} until {holder.expires_at.isoformat()}"
            if holder
            else "another sidecar"
        )
        report = RunReport(new_run_id(), None, trigger)
        report.finish("skipped", f"lease held by {who}")
        return self._record(report, None)

    def _skip_empty_window(self, window: Window, trigger: str) -> RunReport:
        report = RunReport(new_run_id(), None, trigger)
        report.window = window.facts.to_dict()
        report.finish(
            "skipped",
            f"no model has usable queries among the {window.facts.samples_read} "
            "samples of the window",
        )
        return self._record(report, None)

    def _models(self, window: Window, canaries: Mapping[str, Canary]) -> list[str]:
        """Return the models of this cycle: the window's and those with a canary.

        NOTE: the sidecar does not review a canary of the default pointer,
        which only a person can start. A model on the default pointer is
        still searched meanwhile, and publishing gives it its own pointer,
        which takes it out of that canary.
        """
        models = list(window.queries)
        canary_models = [key for key in canaries if key != DEFAULT_MODEL_KEY]
        wanted = self.options.models
        for model in [*wanted, *canary_models]:
            if model not in models and (not wanted or model in wanted):
                models.append(model)
        return models

    async def _context(self, model: str) -> CycleContext:
        return CycleContext(
            options=self.options,
            store=self.store,
            roles=await self._roles(model),
            mode=self._modes(model),
            cache_dir=self.settings.data_dir / "optimizer-cache",
            lease=self.lease,
            plans=self.plans,
            safety_set=self._safety_set,
            seed_examples=self._seed_examples,
            report_path=self._report_path,
            status=self._set_activity,
        )

    async def _roles(self, model: str) -> RoleSet:
        target = Endpoint(
            self.target.base_url,
            model,
            self.target.api_key,
            cache_name=cache_name(self.settings, model),
        )
        helpers, judge = await self._helper_endpoints()
        roles = RoleSet.single(target)
        if helpers is not None:
            roles = roles.with_helpers(helpers)
        if judge is not None:
            roles = replace(roles, judge=judge)
        return roles

    async def _helper_endpoints(self) -> tuple[Endpoint | None, Endpoint | None]:
        """Resolve the helper and judge endpoints once, listing models if needed."""
        if self._helpers is None:
            options = self.options
            helpers = judge = None
            if options.helpers:
                helpers = await keyed_endpoint(
                    options.helpers, options.helpers_model, "DRPO_HELPERS_API_KEY"
                )
            if options.judge:
                judge = await keyed_endpoint(
                    options.judge, options.judge_model, "DRPO_JUDGE_API_KEY"
                )
            self._helpers = (helpers, judge)
        return self._helpers

    def _report_path(self, report: RunReport, outcome: str) -> Path:
        return report_file(self.runs_dir, report, outcome)

    def _set_activity(self, activity: str) -> None:
        self.activity = activity

    def _hold_lease(self) -> bool:
        held = self.lease.held or self.lease.try_acquire()
        if held:
            self.lease.start_renewing()
        self.metrics.lease_held.set(1 if held else 0)
        return held

    async def _release_lease(self) -> None:
        await self.lease.release()
        self.metrics.lease_held.set(0)

    async def _sleep(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except TimeoutError:
            pass


def _scores_text(report: RunReport) -> str:
    # The outcome's reason already has the mean scores, so this names how many
    # answers the judge scored, which says how far to trust them.
    if report.gate is not None:
        candidate, active = report.gate.candidate, report.gate.active
        return (
            f"scored answers: held-out {candidate.heldout_scored} and "
            f"{active.heldout_scored}, safety {candidate.safety_scored} and "
            f"{active.safety_scored} (candidate and active)"
        )
    if report.canary is not None:
        canary, control = report.canary.canary, report.canary.control
        return f"scored answers: {canary.scored} canary and {control.scored} control"
    return "no scores"
