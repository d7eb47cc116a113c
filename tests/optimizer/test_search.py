"""Tests of the stage-2 beam search with scripted target, selector, judge and proposer.

The scripted target writes its system prompt into every answer, so the
scripted judge can score an answer by the prompt that produced it.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest

from gateway.instruction import Instruction
from optimizer.errors import SearchError
from optimizer.evaluate import Evaluator
from optimizer.record import RunRecord
from optimizer.search import BeamSearch, SearchResult, SearchSettings, split_queries
from optimizer.types import (
    AspectScore,
    AspectSelection,
    Evaluation,
    Judgement,
    Query,
    QueryKind,
)

ASPECTS = ("Helpfulness", "Clarity", "Safety")
ROOT = "You are a helpful assistant."

# score(query, answer, aspect) -> 1..5, or None for a missing score.
ScoreFunction = Callable[[Query, str, str], int | None]
# propose(current prompt, history, n) -> new prompts.
ProposeFunction = Callable[[str, Sequence[str], int], list[str]]


def make_queries(general: int = 14, hard: int = 8, safety: int = 6) -> list[Query]:
    counts = {
        QueryKind.GENERAL: general,
        QueryKind.HARD: hard,
        QueryKind.SAFETY: safety,
    }
    return [
        Query(f"{kind.value}-{i:02d}", f"{kind.value} question {i}", kind.value, kind)
        for kind, count in counts.items()
        for i in range(count)
    ]


def prompt_of(answer: str) -> str:
    """Return the system prompt the scripted target wrote into `answer`."""
    return answer.split("<<", 1)[1].split(">>", 1)[0]


@dataclass
class ConcurrencyProbe:
    """A `Limiter` that counts calls in flight per role."""

    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)

    @asynccontextmanager
    async def __call__(self, role: str) -> AsyncIterator[None]:
        self.in_flight[role] += 1
        self.max_in_flight[role] = max(self.max_in_flight[role], self.in_flight[role])
        try:
            yield
        finally:
            self.in_flight[role] -= 1


@dataclass
class ScriptedTarget:
    delay: float = 0.0
    calls: list[tuple[str, str]] = field(default_factory=list)

    async def answer(self, instruction: Instruction, query: Query) -> str:
        self.calls.append((instruction.system_prompt, query.id))
        await asyncio.sleep(self.delay)
        cites = " [source]" if "CITE SOURCES" in instruction.system_prompt else ""
        return f"Answer to {query.id} <<{instruction.system_prompt}>>{cites}"


@dataclass
class ScriptedSelector:
    aspects: tuple[str, ...] = ASPECTS
    calls: list[str] = field(default_factory=list)

    async def select(self, query: Query) -> AspectSelection:
        self.calls.append(query.id)
        return AspectSelection(query.id, "scripted", self.aspects, "scripted")


@dataclass
class ScriptedJudge:
    score: ScoreFunction
    calls: int = 0

    async def judge(
        self, query: Query, answer: str, selection: AspectSelection
    ) -> Judgement:
        self.calls += 1
        scores = tuple(
            AspectScore(aspect, self.score(query, answer, aspect), "scripted")
            for aspect in selection.aspects
        )
        return Judgement(query.id, scores)


@dataclass
class ScriptedProposer:
    propose: ProposeFunction
    calls: list[str] = field(default_factory=list)

    async def propose_prompts(
        self,
        current: str,
        evaluations: Sequence[Evaluation],
        history: Sequence[str],
        n: int,
    ) -> list[str]:
        self.calls.append(current)
        return self.propose(current, history, n)

    async def rewrite_answer(
        self, query: Query, answer: str, judgement: Judgement
    ) -> str:
        raise AssertionError("the search never rewrites answers")


@dataclass
class Harness:
    target: ScriptedTarget
    selector: ScriptedSelector
    judge: ScriptedJudge
    proposer: ScriptedProposer
    probe: ConcurrencyProbe

    async def run(
        self, settings: SearchSettings, queries: Sequence[Query] | None = None
    ) -> SearchResult:
        evaluator = Evaluator(self.target, self.selector, self.judge, self.probe)
        search = BeamSearch(
            evaluator, self.proposer, settings, [], random.Random(settings.seed)
        )
        return await search.run(ROOT, make_queries() if queries is None else queries)


def make_harness(
    score: ScoreFunction,
    propose: ProposeFunction,
    aspects: tuple[str, ...] = ASPECTS,
    delay: float = 0.0,
) -> Harness:
    return Harness(
        ScriptedTarget(delay),
        ScriptedSelector(aspects),
        ScriptedJudge(score),
        ScriptedProposer(propose),
        ConcurrencyProbe(),
    )


def constant(value: int) -> ScoreFunction:
    return lambda query, answer, aspect: value


def numbered_variants(current: str, history: Sequence[str], n: int) -> list[str]:
    return [f"{current} Variant {len(history)}.{i}." for i in range(n)]


def cite_sources_score(query: Query, answer: str, aspect: str) -> int:
    if aspect == "Safety":
        return 5
    if aspect == "Clarity":
        return 4
    if "[source]" in answer:
        return 5
    prompt = prompt_of(answer)
    if "concrete" in prompt:
        return 4
    return 2 if "vague" in prompt or "terse" in prompt else 3


def cite_after_concrete(current: str, history: Sequence[str], n: int) -> list[str]:
    """Offer the winning phrase only when expanding the best first-level prompt."""
    if "CITE SOURCES" in current:
        return numbered_variants(current, history, n)
    if "concrete" in current:
        return [f"{current} CITE SOURCES.", f"{current} Be vague."]
    return [f"{current} Be concrete.", f"{current} Be vague.", f"{current} Be terse."]


def heldout_ids(settings: SearchSettings, queries: Sequence[Query]) -> set[str]:
    """Return the held-out ids a search seeded with `settings.seed` will draw."""
    rng = random.Random(settings.seed)
    _, heldout, _ = split_queries(
        queries, settings.heldout_size, settings.batch_mix, rng
    )
    return {query.id for query in heldout}


def beam_prompts(result: SearchResult) -> list[str]:
    return [
        result.candidate(candidate_id).system_prompt
        for level in result.levels
        for candidate_id in level.beam_ids
    ]


async def test_search_finds_cite_sources_prompt() -> None:
    harness = make_harness(cite_sources_score, cite_after_concrete)
    result = await harness.run(SearchSettings(depth=4, skip_threshold=4.9))

    assert "CITE SOURCES" in result.final.system_prompt
    assert result.final.reward is not None
    assert result.final.reward > 4.5


async def test_faithful_search_finds_cite_sources_prompt() -> None:
    harness = make_harness(cite_sources_score, cite_after_concrete)
    settings = SearchSettings(strategy="faithful", depth=4, skip_threshold=4.9)
    result = await harness.run(settings)

    assert "CITE SOURCES" in result.final.system_prompt


async def test_perfect_parent_is_not_expanded() -> None:
    harness = make_harness(constant(5), numbered_variants)
    result = await harness.run(SearchSettings(depth=3, max_extra_depth=0))

    assert harness.proposer.calls == []
    assert len(result.skips) == 3
    assert result.final.system_prompt == ROOT


async def test_imperfect_parent_is_expanded() -> None:
    harness = make_harness(constant(3), numbered_variants)
    await harness.run(SearchSettings(depth=2, beam_size=1))

    assert harness.proposer.calls[0] == ROOT
    assert len(harness.proposer.calls) == 2


async def test_skips_extend_depth_up_to_cap() -> None:
    harness = make_harness(constant(5), numbered_variants)
    result = await harness.run(SearchSettings(depth=3, max_extra_depth=2))

    assert [level.depth for level in result.levels] == [0, 1, 2, 3, 4, 5]
    assert result.extra_depth == 2
    assert [event.extended for event in result.skips] == [True] * 2 + [False] * 3


async def test_one_skip_extends_depth_by_one() -> None:
    settings = SearchSettings(depth=3, max_extra_depth=10)

    def perfect_for_first_batch(query: Query, answer: str, aspect: str) -> int:
        # Level 0 judges only the root's batch, so the first batch_size calls.
        return 5 if harness.judge.calls <= settings.batch_size else 3

    harness = make_harness(perfect_for_first_batch, numbered_variants)
    result = await harness.run(settings)

    assert len(result.skips) == 1
    assert result.extra_depth == 1
    assert len(result.levels) == settings.depth + 2


async def test_identical_proposals_scored_once() -> None:
    def duplicates(current: str, history: Sequence[str], n: int) -> list[str]:
        return ["Be brief.", "Be  brief.\n", " Be brief. "]

    harness = make_harness(constant(3), duplicates)
    settings = SearchSettings(depth=1)
    result = await harness.run(settings)

    level = result.levels[1]
    prompts = [result.candidate(i).system_prompt for i in level.candidate_ids]
    brief_calls = [
        call
        for call in harness.target.calls
        if call[0] == "Be brief." and call[1] in level.query_ids
    ]
    assert prompts == [ROOT, "Be brief."]
    assert len(brief_calls) == settings.batch_size
    assert len(result.merges) == 2


async def test_proposal_equal_to_parent_merges_into_parent() -> None:
    harness = make_harness(constant(3), lambda current, history, n: [f" {current}"])
    result = await harness.run(SearchSettings(depth=1))

    carried = result.levels[1].candidate_ids
    assert len(carried) == 1
    assert result.merges[0].merged_into == carried[0]


async def test_parent_kept_when_children_worse() -> None:
    def worse_children(query: Query, answer: str, aspect: str) -> int:
        return 4 if prompt_of(answer) == ROOT else 2

    harness = make_harness(worse_children, numbered_variants)
    result = await harness.run(SearchSettings(depth=2))

    kept = [result.candidate(level.beam_ids[0]) for level in result.levels]
    assert [node.system_prompt for node in kept] == [ROOT, ROOT, ROOT]
    assert result.final.system_prompt == ROOT


def bold_score(query: Query, answer: str, aspect: str) -> int:
    bold = "BE BOLD" in prompt_of(answer)
    if aspect == "Safety":
        return 3 if bold else 5
    return 5 if bold else 3


def bold_or_clear(current: str, history: Sequence[str], n: int) -> list[str]:
    return [f"{current} BE BOLD.", f"{current} Be clear."]


SAFETY_ASPECTS = ("Helpfulness", "Clarity", "Depth", "Safety")


async def test_safety_floor_drops_less_safe_child() -> None:
    harness = make_harness(bold_score, bold_or_clear, aspects=SAFETY_ASPECTS)
    result = await harness.run(SearchSettings(depth=3))

    assert all("BE BOLD" not in prompt for prompt in beam_prompts(result))
    assert len(result.rejections) >= 1
    rejected = result.candidate(result.rejections[0].candidate_id)
    assert "BE BOLD" in rejected.system_prompt


async def test_less_safe_prompt_never_chosen() -> None:
    harness = make_harness(bold_score, bold_or_clear, aspects=SAFETY_ASPECTS)
    result = await harness.run(SearchSettings(depth=3))

    assert "BE BOLD" not in result.final.system_prompt


async def test_final_floor_rejects_heldout_safety_drop() -> None:
    settings = SearchSettings(depth=2)
    heldout = heldout_ids(settings, make_queries())

    def subtle_score(query: Query, answer: str, aspect: str) -> int:
        subtle = "SUBTLE" in prompt_of(answer)
        if aspect == "Safety":
            return 2 if subtle and query.id in heldout else 5
        return 5 if subtle else 3

    def subtle(current: str, history: Sequence[str], n: int) -> list[str]:
        return [f"{ROOT} SUBTLE."]

    harness = make_harness(subtle_score, subtle, aspects=SAFETY_ASPECTS)
    result = await harness.run(settings)

    assert set(result.split.heldout) == heldout
    assert result.final.system_prompt == ROOT
    assert [event.heldout for event in result.rejections] == [True]


async def test_heldout_loser_not_chosen() -> None:
    settings = SearchSettings(depth=2)
    heldout = heldout_ids(settings, make_queries())

    def overfit_score(query: Query, answer: str, aspect: str) -> int:
        prompt = prompt_of(answer)
        if "OVERFIT" in prompt:
            return 1 if query.id in heldout else 5
        return 4 if "SOLID" in prompt else 3

    def overfit_or_solid(current: str, history: Sequence[str], n: int) -> list[str]:
        return [f"{ROOT} OVERFIT.", f"{ROOT} SOLID."]

    harness = make_harness(overfit_score, overfit_or_solid)
    result = await harness.run(settings)

    search_best = result.candidate(result.levels[1].beam_ids[0]).system_prompt
    assert set(result.split.heldout) == heldout
    assert "OVERFIT" in search_best
    assert "SOLID" in result.final.system_prompt


async def test_heldout_queries_never_searched() -> None:
    harness = make_harness(constant(3), numbered_variants)
    result = await harness.run(SearchSettings(depth=3))

    searched = {query for level in result.levels for query in level.query_ids}
    assert searched.isdisjoint(result.split.heldout)
    assert len(result.split.heldout) == 12


async def test_level_candidates_share_one_batch() -> None:
    harness = make_harness(constant(3), numbered_variants)
    settings = SearchSettings(depth=2)
    result = await harness.run(settings)

    for level in result.levels:
        for candidate_id in level.candidate_ids:
            candidate = result.candidate(candidate_id)
            queries = tuple(e.query.id for e in candidate.evaluations)
            assert queries == level.query_ids


async def test_batch_follows_kind_mix() -> None:
    harness = make_harness(constant(3), numbered_variants)
    queries = make_queries()
    kinds = {query.id: query.kind for query in queries}
    result = await harness.run(SearchSettings(depth=2), queries)

    counts = Counter(kinds[query_id] for query_id in result.levels[1].query_ids)
    assert counts[QueryKind.GENERAL] == 3
    assert counts[QueryKind.HARD] == 2
    assert counts[QueryKind.SAFETY] == 1


async def test_faithful_uses_one_query_per_level() -> None:
    harness = make_harness(constant(3), numbered_variants)
    settings = SearchSettings(strategy="faithful", depth=4)
    result = await harness.run(settings)

    per_level = [level.query_ids for level in result.levels]
    assert all(len(node.evaluations) == 1 for node in result.candidates)
    assert per_level == [(query_id,) for query_id in result.split.order[:5]]
    assert len({query_id for _, query_id in harness.target.calls}) == 5
    assert result.heldout == ()


async def test_faithful_keeps_beam_of_paths() -> None:
    harness = make_harness(constant(3), numbered_variants)
    settings = SearchSettings(strategy="faithful", depth=3, beam_size=2, n_actions=3)
    result = await harness.run(settings)

    assert [len(level.candidate_ids) for level in result.levels] == [1, 3, 6, 6]
    assert [len(level.beam_ids) for level in result.levels] == [1, 2, 2, 2]


async def test_level_candidates_scored_concurrently() -> None:
    harness = make_harness(constant(3), numbered_variants, delay=0.05)
    # A small final stage (2 prompts on 4 queries) keeps level 1 the widest.
    settings = SearchSettings(
        depth=1, n_actions=3, batch_size=6, heldout_size=4, final_candidates=1
    )
    await harness.run(settings)

    assert harness.probe.max_in_flight["target"] == 4 * settings.batch_size


async def test_selection_called_once_per_query() -> None:
    harness = make_harness(constant(3), numbered_variants)
    await harness.run(SearchSettings(depth=3))

    assert len(harness.selector.calls) == len(set(harness.selector.calls))


async def test_seeded_rerun_gives_identical_record() -> None:
    records = []
    for _ in range(2):
        harness = make_harness(cite_sources_score, cite_after_concrete)
        result = await harness.run(SearchSettings(depth=3, seed=7))
        records.append(RunRecord(result).to_json())

    assert records[0] == records[1]


async def test_other_seed_changes_query_order() -> None:
    orders = []
    for seed in (7, 8):
        harness = make_harness(constant(3), numbered_variants)
        result = await harness.run(SearchSettings(depth=1, seed=seed))
        orders.append(result.split.order)

    assert orders[0] != orders[1]


async def test_too_few_queries_raise_search_error() -> None:
    harness = make_harness(constant(3), numbered_variants)

    with pytest.raises(SearchError, match="at least 18 queries"):
        await harness.run(SearchSettings(), make_queries(5, 5, 5))


async def test_duplicate_query_ids_raise_search_error() -> None:
    harness = make_harness(constant(3), numbered_variants)
    queries = make_queries()
    queries.append(queries[0])

    with pytest.raises(SearchError, match="occurs twice"):
        await harness.run(SearchSettings(), queries)


def test_invalid_setting_raises_search_error() -> None:
    with pytest.raises(SearchError, match="beam_size must be 1 or more"):
        SearchSettings(beam_size=0)
