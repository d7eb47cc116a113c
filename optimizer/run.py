"""One optimization run end to end: stage 1, stage 2, the record, publishing."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from gateway.instruction import Example, Instruction, PromptVersion
from gateway.prompting import PromptBuilder
from gateway.settings import Engine, InjectionMode, Settings
from gateway.store import PromptStore
from optimizer.client import Budget, Endpoint, ModelClient
from optimizer.errors import OptimizerError
from optimizer.evaluate import Evaluator
from optimizer.judge import LLMJudge
from optimizer.proposer import LLMProposer
from optimizer.record import RunRecord
from optimizer.roles import RoleSet
from optimizer.search import BeamSearch, SearchSettings
from optimizer.selector import LLMAspectSelector
from optimizer.stage1 import ExampleOptimizer, ExampleResult
from optimizer.target import GatewayTarget
from optimizer.types import Query, QueryKind, SeedExample

logger = logging.getLogger(__name__)

OPTIMIZER_SOURCE = "optimizer"


@dataclass(frozen=True)
class RunSettings:
    """Settings of one run: roles, mode, search shape, stage 1 and budget."""

    roles: RoleSet
    mode: InjectionMode
    search: SearchSettings = field(default_factory=SearchSettings)
    stage1_rounds: int = 0
    """Critique-and-rewrite rounds per seed example; 0 keeps the current examples."""
    max_examples: int = 6
    """Seed examples refined by stage 1 and injected, safety ones included."""
    concurrency: int = 8
    cache_dir: Path | None = None
    budget: Budget = field(default_factory=Budget)
    target_max_tokens: int = 256
    helper_max_tokens: int | None = None
    judge_rationale_chars: int | None = None
    """Cap on each judge rationale, enforced by the reply schema."""
    """Cap on the output tokens of the selector, judge and optimizer calls."""
    price_per_million_tokens: float = 0.0


@dataclass(frozen=True)
class RunOutcome:
    record: RunRecord
    instruction: Instruction
    """The optimized instruction: the chosen system prompt and the examples."""


def choose_seed_examples(seeds: Sequence[SeedExample], count: int) -> list[SeedExample]:
    """Pick `count` seed examples, about a third of them safety refusals.

    Measured on the embedded Gemma 3 270M base model, three refusal examples
    out of six made it refuse 58% of harmless requests, so refusals are kept
    to a minority of the examples.
    """
    safety = [seed for seed in seeds if seed.query.kind is QueryKind.SAFETY]
    others = [seed for seed in seeds if seed.query.kind is not QueryKind.SAFETY]
    safety_count = min(len(safety), max(1, count // 3)) if count > 1 else 0
    chosen = others[: count - safety_count] + safety[:safety_count]
    return chosen[:count]


def projected_calls(
    settings: RunSettings, query_count: int, example_count: int
) -> dict[str, int]:
    """Return the most upstream calls each part of a run can make, by part.

    Cache hits are not counted as calls, so a resumed run makes fewer.
    """
    search = settings.search
    levels = search.depth + search.max_extra_depth
    stage1 = example_count * (2 + 2 * settings.stage1_rounds)
    if search.strategy == "faithful":
        per_level = search.beam_size * (1 + 2 * search.n_actions) + 1
        return {"stage1": stage1, "search": 3 + levels * per_level, "heldout": 0}
    batch = min(search.batch_size, query_count)
    candidates = search.beam_size * (search.n_actions + 1)
    per_level = search.beam_size + candidates * batch * 2 + batch
    heldout = min(search.heldout_size, query_count)
    return {
        "stage1": stage1,
        "search": 3 * batch + levels * per_level,
        "heldout": (search.final_candidates + 1) * heldout * 2 + heldout,
    }


async def run_optimization(
    settings: RunSettings,
    initial: Instruction,
    queries: Sequence[Query],
    seed_examples: Sequence[SeedExample],
    client: ModelClient,
) -> RunOutcome:
    """Refine the examples (stage 1), search the system prompt (stage 2), record."""
    evaluator = build_evaluator(settings, client)
    proposer = LLMProposer(
        client,
        settings.roles.optimizer,
        max_tokens=_capped(2048, settings.helper_max_tokens),
    )

    stage1: list[ExampleResult] = []
    examples: tuple[Example, ...] = initial.examples
    if settings.stage1_rounds > 0 and seed_examples:
        chosen = choose_seed_examples(seed_examples, settings.max_examples)
        logger.info("Stage 1: refining %d seed examples", len(chosen))
        stage1 = await ExampleOptimizer(
            evaluator, proposer, settings.stage1_rounds
        ).run(chosen)
        examples = tuple(result.example for result in stage1)

    logger.info(
        "Stage 2: %s beam search, beam %d, %d actions, depth %d, %d queries",
        settings.search.strategy,
        settings.search.beam_size,
        settings.search.n_actions,
        settings.search.depth,
        len(queries),
    )
    search = BeamSearch(
        evaluator,
        proposer,
        settings.search,
        examples,
        random.Random(settings.search.seed),
    )
    result = await search.run(initial.system_prompt, queries)
    record = RunRecord(
        search=result,
        examples=tuple(stage1),
        usage=client.usage,
        price_per_million_tokens=settings.price_per_million_tokens,
    )
    instruction = Instruction(
        system_prompt=result.final.system_prompt, examples=examples
    )
    return RunOutcome(record, instruction)


def build_evaluator(settings: RunSettings, client: ModelClient) -> Evaluator:
    """Return the evaluator of a run: its target, aspect selector and judge."""
    roles = settings.roles
    return Evaluator(
        GatewayTarget(
            client,
            roles.target,
            settings.mode,
            PromptBuilder(),
            max_tokens=settings.target_max_tokens,
        ),
        LLMAspectSelector(
            client, roles.selector, max_tokens=_capped(512, settings.helper_max_tokens)
        ),
        LLMJudge(
            client,
            roles.judge,
            max_tokens=_capped(1024, settings.helper_max_tokens),
            rationale_chars=settings.judge_rationale_chars,
        ),
    )


def fit_search_to_queries(search: SearchSettings, count: int) -> SearchSettings:
    """Shrink the held-out share and batch of `search` to fit `count` queries.

    At most a third of the queries is held out, at least one, and the batch
    takes at most the rest, as the improved search needs both.
    """
    heldout = max(1, min(search.heldout_size, count // 3))
    return replace(
        search, heldout_size=heldout, batch_size=min(search.batch_size, count - heldout)
    )


def publish(
    store: PromptStore,
    outcome: RunOutcome,
    parent: PromptVersion | None,
    report_path: Path | None,
    activate_for: str | None,
    activate: bool,
) -> PromptVersion:
    """Store the optimized instruction as a new version, and activate it if asked."""
    record = outcome.record
    final = record.search.final
    scores: dict[str, float] = {}
    if final.reward is not None:
        scores["reward"] = final.reward
    initial_reward = _initial_heldout_reward(record)
    if initial_reward is not None:
        scores["initial_reward"] = initial_reward
    metadata: dict[str, Any] = {
        "strategy": record.search.settings.strategy,
        "seed": record.search.settings.seed,
        "reason": final.reason,
        "report": str(report_path) if report_path else None,
        "calls": record.total_usage.calls,
    }
    version = store.create(
        outcome.instruction.system_prompt,
        outcome.instruction.examples,
        parent=parent.version if parent is not None else None,
        source=OPTIMIZER_SOURCE,
        scores=scores,
        metadata=metadata,
    )
    if activate:
        store.activate(version.version, activate_for)
    return version


async def resolve_roles(
    target: Endpoint,
    helpers: tuple[str | None, str | None] = (None, None),
    judge: tuple[str | None, str | None] = (None, None),
) -> RoleSet:
    """Return the roles of a run: `target` everywhere, then helpers, then the judge.

    `helpers` and `judge` are (base URL, model) pairs; a URL of None keeps the
    role on `target`, and a model of None takes the first the server lists.
    Their API keys come from DRPO_HELPERS_API_KEY and DRPO_JUDGE_API_KEY.
    """
    roles = RoleSet.single(target)
    url, model = helpers
    if url:
        roles = roles.with_helpers(
            await keyed_endpoint(url, model, "DRPO_HELPERS_API_KEY")
        )
    url, model = judge
    if url:
        roles = replace(
            roles, judge=await keyed_endpoint(url, model, "DRPO_JUDGE_API_KEY")
        )
    return roles


async def keyed_endpoint(url: str, model: str | None, key_variable: str) -> Endpoint:
    """Return the endpoint at `url` with its key from the variable `key_variable`."""
    key = os.environ.get(key_variable) or None
    url = url.rstrip("/")
    return Endpoint(url, model or await first_model(url, key), key)


async def first_model(base_url: str, api_key: str | None) -> str:
    """Return the first model that `base_url`/models lists.

    Raises OptimizerError when the server cannot be reached or lists none.
    """
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(base_url + "/models", headers=headers)
            response.raise_for_status()
            return str(response.json()["data"][0]["id"])
    except httpx.TransportError as error:
        raise OptimizerError(
            f"Could not connect to {base_url}: {error}. Check that the server is "
            "running and that the URL, with http:// and the /v1 prefix, is right."
        ) from None
    except httpx.HTTPStatusError as error:
        raise OptimizerError(
            f"{base_url}/models returned HTTP {error.response.status_code}. Check "
            "that the URL is the API base, which usually ends with /v1, or pass "
            "the model name with --model (or --helpers-model / --judge-model)."
        ) from None
    except (KeyError, IndexError, ValueError) as error:
        raise OptimizerError(
            f"Could not read the model list of {base_url}: {error!r}. Pass the "
            "model name with --model (or --helpers-model / --judge-model)."
        ) from None


def cache_name(settings: Settings, model: str) -> str | None:
    """Name the embedded engine in cache keys, because its port changes every run."""
    if settings.engine is not Engine.EMBEDDED:
        return None
    path = settings.embedded_model_path
    return f"embedded:{path.name if path else 'gemma3-270m-q4-k-m'}:{model}"


def _capped(default: int, cap: int | None) -> int:
    return default if cap is None else min(default, cap)


def _initial_heldout_reward(record: RunRecord) -> float | None:
    initial = record.search.initial_prompt
    for candidate in record.search.heldout:
        if candidate.system_prompt == initial:
            return candidate.reward
    return None
