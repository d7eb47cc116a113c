"""Tests of stage 1, the refinement of seed answers by a scripted judge and proposer."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from gateway.instruction import Instruction
from optimizer.errors import OptimizerError
from optimizer.evaluate import Evaluator
from optimizer.stage1 import ExampleOptimizer
from optimizer.types import (
    AspectScore,
    AspectSelection,
    Evaluation,
    Judgement,
    Query,
    QueryKind,
    SeedExample,
)

ASPECTS = ("Helpfulness", "Clarity")


def make_seed(index: int = 0, answer: str = "seed") -> SeedExample:
    query = Query(
        f"e{index:02d}", f"Seed question {index}", "advice", QueryKind.GENERAL
    )
    return SeedExample(query, answer)


class UnusedTarget:
    async def answer(self, instruction: Instruction, query: Query) -> str:
        raise AssertionError("stage 1 judges given answers and never calls the target")


@dataclass
class FixedSelector:
    calls: list[str] = field(default_factory=list)

    async def select(self, query: Query) -> AspectSelection:
        self.calls.append(query.id)
        return AspectSelection(query.id, "fixed", ASPECTS, "fixed")


@dataclass
class TableJudge:
    """Score an answer by looking it up; unknown answers get 3, None is missing."""

    table: Mapping[str, int | None]

    async def judge(
        self, query: Query, answer: str, selection: AspectSelection
    ) -> Judgement:
        score = self.table.get(answer, 3)
        scores = tuple(AspectScore(aspect, score) for aspect in selection.aspects)
        return Judgement(query.id, scores, parse_failures=int(score is None))


@dataclass
class ChainProposer:
    """Rewrite answer X into the next answer in `chain`, or into X + "+"."""

    chain: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    inputs: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def propose_prompts(
        self,
        current: str,
        evaluations: Sequence[Evaluation],
        history: Sequence[str],
        n: int,
    ) -> list[str]:
        raise AssertionError("stage 1 never proposes prompts")

    async def rewrite_answer(
        self, query: Query, answer: str, judgement: Judgement
    ) -> str:
        self.inputs.append(answer)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(self.delay)
        self.in_flight -= 1
        return self.chain.get(answer, answer + "+")


def make_optimizer(
    table: Mapping[str, int | None],
    proposer: ChainProposer,
    rounds: int = 5,
) -> ExampleOptimizer:
    evaluator = Evaluator(UnusedTarget(), FixedSelector(), TableJudge(table))
    return ExampleOptimizer(evaluator, proposer, rounds=rounds)


async def test_best_answer_kept_over_later_worse() -> None:
    proposer = ChainProposer({"seed": "better", "better": "worse"})
    optimizer = make_optimizer({"seed": 3, "better": 4, "worse": 2}, proposer)

    [result] = await optimizer.run([make_seed()])

    assert result.example.answer == "better"
    assert result.best_round == 1
    assert result.example.query == "Seed question 0"


async def test_rewrites_start_from_latest_answer() -> None:
    proposer = ChainProposer({"seed": "better", "better": "worse"})
    optimizer = make_optimizer({"seed": 3, "better": 4, "worse": 2}, proposer, 3)

    await optimizer.run([make_seed()])

    assert proposer.inputs == ["seed", "better", "worse"]


async def test_perfect_score_stops_rewriting() -> None:
    proposer = ChainProposer({"seed": "perfect"})
    optimizer = make_optimizer({"seed": 3, "perfect": 5}, proposer)

    [result] = await optimizer.run([make_seed()])

    assert proposer.inputs == ["seed"]
    assert [attempt.answer for attempt in result.history] == ["seed", "perfect"]
    assert result.example.answer == "perfect"


async def test_perfect_seed_is_not_rewritten() -> None:
    proposer = ChainProposer()
    optimizer = make_optimizer({"seed": 5}, proposer)

    [result] = await optimizer.run([make_seed()])

    assert proposer.inputs == []
    assert result.best_round == 0


async def test_rewrites_stop_after_rounds() -> None:
    proposer = ChainProposer()
    optimizer = make_optimizer({}, proposer)

    [result] = await optimizer.run([make_seed()])

    assert len(proposer.inputs) == 5
    assert [attempt.round for attempt in result.history] == [0, 1, 2, 3, 4, 5]


async def test_missing_reward_never_wins() -> None:
    proposer = ChainProposer({"seed": "unscored"})
    optimizer = make_optimizer({"seed": 2, "unscored": None}, proposer, rounds=1)

    [result] = await optimizer.run([make_seed()])

    assert result.example.answer == "seed"
    assert result.history[1].reward is None
    assert result.history[1].evaluation.judgement.parse_failures == 1


async def test_missing_seed_reward_replaced() -> None:
    proposer = ChainProposer({"seed": "scored"})
    optimizer = make_optimizer({"seed": None, "scored": 2}, proposer, rounds=1)

    [result] = await optimizer.run([make_seed()])

    assert result.example.answer == "scored"


async def test_blank_rewrite_ends_refinement() -> None:
    proposer = ChainProposer({"seed": "  \n"})
    optimizer = make_optimizer({"seed": 3}, proposer)

    [result] = await optimizer.run([make_seed()])

    assert proposer.inputs == ["seed"]
    assert len(result.history) == 1
    assert result.example.answer == "seed"


async def test_seed_examples_refined_concurrently() -> None:
    proposer = ChainProposer(delay=0.05)
    optimizer = make_optimizer({}, proposer, rounds=1)
    seeds = [make_seed(index) for index in range(4)]

    results = await optimizer.run(seeds)

    assert proposer.max_in_flight == 4
    assert [result.seed for result in results] == seeds


async def test_history_records_rewards() -> None:
    proposer = ChainProposer({"seed": "better", "better": "worse"})
    optimizer = make_optimizer({"seed": 3, "better": 4, "worse": 2}, proposer, 2)

    [result] = await optimizer.run([make_seed()])

    rewards = [attempt.reward for attempt in result.history]
    assert rewards == [3.0, 4.0, 2.0]


def test_negative_rounds_raise() -> None:
    evaluator = Evaluator(UnusedTarget(), FixedSelector(), TableJudge({}))

    with pytest.raises(OptimizerError, match="rounds must be 0 or more"):
        ExampleOptimizer(evaluator, ChainProposer(), rounds=-1)
