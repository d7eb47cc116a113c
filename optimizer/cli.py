"""`drpo-gateway optimize`: run DRPO against OpenAI-compatible endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer

from gateway.errors import ConfigurationError
from gateway.modes import ModeResolver
from gateway.settings import Settings, load_settings
from gateway.store.factory import open_prompt_store
from optimizer.cli_options import (
    HelpersModelOption,
    HelpersOption,
    JudgeModelOption,
    JudgeOption,
    ModeOption,
    UpstreamOption,
)
from optimizer.client import Budget, Endpoint, ModelClient
from optimizer.errors import OptimizerError
from optimizer.run import (
    RunOutcome,
    RunSettings,
    cache_name,
    first_model,
    fit_search_to_queries,
    projected_calls,
    publish,
    resolve_roles,
    run_optimization,
)
from optimizer.search import SearchSettings
from optimizer.seeds import load_queries, load_seed_examples
from optimizer.types import Query, SeedExample

logger = logging.getLogger(__name__)

Option = typer.Option


def optimize(
    config: Annotated[
        Path | None,
        Option(
            "--config", envvar="DRPO_CONFIG", help="YAML file with gateway settings."
        ),
    ] = None,
    upstream: UpstreamOption = None,
    model: Annotated[
        str | None,
        Option(help="Target model name. Default: the first the target lists."),
    ] = None,
    mode: ModeOption = None,
    data_dir: Annotated[
        Path | None,
        Option(help="Gateway data directory: prompt store, cache, reports."),
    ] = None,
    helpers: HelpersOption = None,
    helpers_model: HelpersModelOption = None,
    judge: JudgeOption = None,
    judge_model: JudgeModelOption = None,
    seeds: Annotated[
        Path | None,
        Option(help="Query file (JSONL or a JSON list). Default: the shipped seeds."),
    ] = None,
    seed_answers: Annotated[
        Path | None, Option(help="Seed (query, answer) pairs for stage 1.")
    ] = None,
    max_queries: Annotated[
        int | None, Option(min=2, help="Use only this many queries, drawn with --seed.")
    ] = None,
    strategy: Annotated[
        str,
        Option(
            help="improved (batched, held-out choice) or faithful (one query "
            "per level)."
        ),
    ] = "improved",
    beam_size: Annotated[
        int, Option(min=1, help="Candidates kept per search level.")
    ] = 2,
    n_actions: Annotated[int, Option(min=1, help="New prompts per expanded node.")] = 3,
    depth: Annotated[
        int, Option(min=0, help="Search levels (20 in the DRPO paper).")
    ] = 3,
    max_extra_depth: Annotated[
        int, Option(min=0, help="Levels the skip rule may add.")
    ] = 2,
    batch_size: Annotated[
        int, Option(min=1, help="Queries per candidate (improved).")
    ] = 4,
    heldout_size: Annotated[
        int, Option(min=1, help="Held-out queries for the final choice.")
    ] = 6,
    stage1_rounds: Annotated[
        int,
        Option(
            min=0, help="Rewrite rounds per seed example; 0 keeps the active examples."
        ),
    ] = 0,
    max_examples: Annotated[
        int, Option(min=1, help="Seed examples refined by stage 1.")
    ] = 6,
    seed: Annotated[int, Option(help="Seed of the one random generator.")] = 0,
    concurrency: Annotated[
        int, Option(min=1, help="Model calls in flight at once, all roles together.")
    ] = 4,
    max_calls: Annotated[
        int | None,
        Option(min=1, help="Stop before making more upstream calls than this."),
    ] = None,
    max_tokens: Annotated[
        int | None,
        Option(
            min=1,
            help="Stop once this many tokens are spent. Checked before each call, "
            "so calls already in flight can go past it.",
        ),
    ] = None,
    helper_max_tokens: Annotated[
        int | None,
        Option(
            min=16,
            help="Cap on the output tokens of selector, judge and optimizer calls "
            "(defaults 512, 1024 and 2048). Lower it for a small, slow model.",
        ),
    ] = None,
    judge_rationale_chars: Annotated[
        int | None,
        Option(
            min=16,
            help="Cap on each judge rationale, enforced by the reply schema "
            "(llama.cpp and vLLM; OpenAI's strict mode rejects it). Keeps a small "
            "judge from running out of tokens before its scores.",
        ),
    ] = None,
    force: Annotated[
        bool, Option(help="Start even if the projected calls exceed --max-calls.")
    ] = False,
    report: Annotated[
        Path | None,
        Option(help="Report JSON path. Default: <data dir>/runs/<time>.json."),
    ] = None,
    price_per_million: Annotated[
        float, Option(min=0, help="Price of 1M tokens, for the cost estimate.")
    ] = 0.0,
    publish_version: Annotated[
        bool,
        Option(
            "--publish/--no-publish", help="Store the result as a new prompt version."
        ),
    ] = False,
    activate: Annotated[
        bool, Option(help="Also activate the published version.")
    ] = False,
    prompt_model: Annotated[
        str | None,
        Option(help="Pointer to start from and activate; default pointer without it."),
    ] = None,
) -> None:
    """Search for a better alignment instruction with DRPO and optionally publish it."""
    from gateway.cli import stop_on_sigterm
    from gateway.logs import configure_logging

    if strategy not in ("improved", "faithful"):
        _fail(f"--strategy must be improved or faithful, got {strategy!r}.")
    try:
        settings = load_settings(
            config, upstream=upstream, model=model, mode=mode, data_dir=data_dir
        )
        search = SearchSettings(
            strategy=_strategy(strategy), beam_size=beam_size, n_actions=n_actions,
            depth=depth, max_extra_depth=max_extra_depth, batch_size=batch_size,
            heldout_size=heldout_size, seed=seed,
        )  # fmt: skip
        queries = load_queries(seeds)
        examples = load_seed_examples(seed_answers)
    except (ConfigurationError, OptimizerError) as error:
        _fail(str(error))
    configure_logging(settings.log_level)
    stop_on_sigterm()
    if max_queries is not None and max_queries < len(queries):
        import random

        queries = random.Random(seed).sample(queries, max_queries)
        search = fit_search_to_queries(search, max_queries)
    plan = _Plan(
        settings=settings, search=search, queries=queries, examples=examples,
        helpers=(helpers, helpers_model), judge=(judge, judge_model),
        stage1_rounds=stage1_rounds, max_examples=max_examples, concurrency=concurrency,
        budget=Budget(max_calls=max_calls, max_tokens=max_tokens), force=force,
        helper_max_tokens=helper_max_tokens,
        judge_rationale_chars=judge_rationale_chars,
        report=report or settings.data_dir / "runs" / f"{_stamp()}.json",
        price=price_per_million, publish=publish_version or activate,
        activate=activate, prompt_model=prompt_model,
    )  # fmt: skip
    try:
        asyncio.run(plan.run())
    except KeyboardInterrupt:
        typer.echo(
            "Interrupted. Every finished model call is cached: rerun the same "
            "command to resume without paying for them again.",
            err=True,
        )
        raise typer.Exit(130) from None
    except (ConfigurationError, OptimizerError) as error:
        _fail(str(error))


class _Plan:
    def __init__(self, **fields: object) -> None:
        self.__dict__.update(fields)

    settings: Settings
    search: SearchSettings
    queries: list[Query]
    examples: list[SeedExample]
    helpers: tuple[str | None, str | None]
    judge: tuple[str | None, str | None]
    stage1_rounds: int
    max_examples: int
    concurrency: int
    budget: Budget
    helper_max_tokens: int | None
    judge_rationale_chars: int | None
    force: bool
    report: Path
    price: float
    publish: bool
    activate: bool
    prompt_model: str | None

    async def run(self) -> None:
        from gateway.cli import upstream_target
        from gateway.prompting import load_default_instruction

        store = open_prompt_store(self.settings)
        store.ensure_seeded(load_default_instruction())
        active_name = store.active_version(self.prompt_model)
        parent = store.get(active_name) if active_name else None
        initial = parent.instruction if parent else load_default_instruction()

        async with upstream_target(self.settings) as target:
            model = self.settings.model or await first_model(
                target.base_url, target.api_key
            )
            target_endpoint = Endpoint(
                target.base_url,
                model,
                target.api_key,
                cache_name=cache_name(self.settings, model),
            )
            roles = await resolve_roles(target_endpoint, self.helpers, self.judge)
            run_settings = RunSettings(
                roles=roles,
                mode=ModeResolver(self.settings, target.default_mode)(model),
                search=self.search,
                stage1_rounds=self.stage1_rounds,
                max_examples=self.max_examples,
                concurrency=self.concurrency,
                cache_dir=self.settings.data_dir / "optimizer-cache",
                budget=self.budget,
                helper_max_tokens=self.helper_max_tokens,
                judge_rationale_chars=self.judge_rationale_chars,
                price_per_million_tokens=self.price,
            )
            self._check_projection(run_settings)
            started = datetime.now(UTC)
            client = ModelClient(run_settings.cache_dir, self.concurrency, self.budget)
            try:
                with _progress(client, self._projected_total(run_settings)):
                    outcome = await run_optimization(
                        run_settings, initial, self.queries, self.examples, client
                    )
            finally:
                await _cancel_other_tasks()
                await client.aclose()
        self._write_report(outcome, self._run_facts(run_settings, started))
        if (
            self.publish
            and parent is not None
            and outcome.instruction == parent.instruction
        ):
            typer.echo(
                f"The result is the same instruction as {parent.version}, the "
                "version it started from; nothing was published."
            )
        elif self.publish:
            version = publish(
                store, outcome, parent, self.report, self.prompt_model, self.activate
            )
            state = "published and activated" if self.activate else "published"
            typer.echo(
                f"Prompt version {version.version} {state} (parent {version.parent})."
            )
        store.close()

    def _run_facts(self, settings: RunSettings, started: datetime) -> dict[str, Any]:
        """Return the run facts the record lacks: roles, mode, start and duration."""
        finished = datetime.now(UTC)
        roles = {
            name: {"base_url": endpoint.base_url, "model": endpoint.model}
            for name, endpoint in vars(settings.roles).items()
        }
        return {
            "started_at": started.isoformat(),
            "seconds": round((finished - started).total_seconds(), 3),
            "roles": roles,
            "mode": settings.mode.value,
            "queries": len(self.queries),
            "stage1_rounds": settings.stage1_rounds,
            "concurrency": settings.concurrency,
        }

    def _projected_total(self, settings: RunSettings) -> int:
        example_count = (
            min(self.max_examples, len(self.examples)) if self.stage1_rounds else 0
        )
        return sum(projected_calls(settings, len(self.queries), example_count).values())

    def _check_projection(self, settings: RunSettings) -> None:
        example_count = (
            min(self.max_examples, len(self.examples)) if self.stage1_rounds else 0
        )
        parts = projected_calls(settings, len(self.queries), example_count)
        total = sum(parts.values())
        typer.echo(
            f"Projected model calls: at most {total} (stage 1 {parts['stage1']}, "
            f"search {parts['search']}, held-out {parts['heldout']}); "
            "cached calls are free."
        )
        limit = self.budget.max_calls
        if limit is not None and total > limit and not self.force:
            raise OptimizerError(
                f"The projected {total} calls exceed --max-calls {limit}. Lower "
                "--depth, --batch-size or --n-actions, raise --max-calls, or pass "
                "--force to start anyway (cache hits do not count)."
            )

    def _write_report(self, outcome: RunOutcome, run: dict[str, Any]) -> None:
        self.report.parent.mkdir(parents=True, exist_ok=True)
        report = {"run": run, **outcome.record.to_dict()}
        self.report.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        summary = outcome.record.summary()
        self.report.with_suffix(".txt").write_text(summary)
        typer.echo(summary)
        typer.echo(
            f"Report: {self.report} (summary: {self.report.with_suffix('.txt')})"
        )


async def _cancel_other_tasks() -> None:
    """Cancel the run's remaining calls, so none is sent on a closed client.

    On Ctrl-C the run's own task is cancelled first, while concurrent calls
    it started are still pending.
    """
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


@contextlib.contextmanager
def _progress(client: ModelClient, projected: int) -> Iterator[None]:
    """Show calls against the projection: a rich bar on a terminal, else log lines."""
    task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
        _report_progress(client, projected, sys.stderr.isatty())
    )
    try:
        yield
    finally:
        task.cancel()


async def _report_progress(
    client: ModelClient, projected: int, interactive: bool
) -> None:
    def counts() -> tuple[int, int]:
        usage = client.usage.values()
        return sum(u.calls for u in usage), sum(u.cache_hits for u in usage)

    if interactive:
        from rich.progress import Progress

        with Progress(transient=True) as progress:
            bar = progress.add_task("model calls", total=projected)
            while True:
                calls, hits = counts()
                progress.update(
                    bar,
                    completed=calls + hits,
                    description=f"calls {calls}, cache hits {hits}",
                )
                await asyncio.sleep(0.5)
    started = time.monotonic()
    while True:
        await asyncio.sleep(10)
        calls, hits = counts()
        logger.info(
            "Progress: %d calls, %d cache hits of at most %d, %.0f s",
            calls, hits, projected, time.monotonic() - started,
        )  # fmt: skip


def _strategy(value: str) -> Literal["improved", "faithful"]:
    return "faithful" if value == "faithful" else "improved"


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)
