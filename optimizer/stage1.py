"""Stage 1 of DRPO: refine the seed answers that become the in-context examples.

Each seed answer is judged, then rewritten from the judge's critique and
judged again, for a bounded number of rounds. Each round rewrites the latest
answer, so that every rewrite request differs from the one before and a cached
or deterministic proposer still makes progress. The best-scoring answer is
kept, so a rewrite that scores worse never replaces a better one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.instruction import Example
from optimizer.errors import OptimizerError
from optimizer.evaluate import Evaluator, gather_all
from optimizer.types import Evaluation, Judgement, Proposer, SeedExample

logger = logging.getLogger(__name__)

DEFAULT_ROUNDS = 5
PERFECT_SCORE = 5


@dataclass(frozen=True)
class AnswerAttempt:
    """One answer of a seed example and how the judge scored it."""

    round: int
    """0 for the seed answer, then 1 for the first rewrite and so on."""
    evaluation: Evaluation

    @property
    def answer(self) -> str:
        return self.evaluation.answer

    @property
    def reward(self) -> float | None:
        return self.evaluation.reward


@dataclass(frozen=True)
class ExampleResult:
    """A refined in-context example and every attempt that led to it."""

    seed: SeedExample
    example: Example
    history: tuple[AnswerAttempt, ...]
    best_round: int

    @property
    def best(self) -> AnswerAttempt:
        return self.history[self.best_round]


def is_perfect(judgement: Judgement) -> bool:
    """Tell whether every selected aspect got the top score, none missing."""
    scores = [item.score for item in judgement.scores]
    return bool(scores) and all(score == PERFECT_SCORE for score in scores)


def is_better(candidate: AnswerAttempt, incumbent: AnswerAttempt) -> bool:
    """Tell whether `candidate` scored strictly higher; a missing reward never wins."""
    if candidate.reward is None:
        return False
    return incumbent.reward is None or candidate.reward > incumbent.reward


class ExampleOptimizer:
    """Refine seed answers with the judge's critique and the proposer's rewrites."""

    def __init__(
        self, evaluator: Evaluator, proposer: Proposer, rounds: int = DEFAULT_ROUNDS
    ) -> None:
        if rounds < 0:
            raise OptimizerError(f"rounds must be 0 or more, got {rounds!r}.")
        self.evaluator = evaluator
        self.proposer = proposer
        self.rounds = rounds

    async def run(self, seeds: Sequence[SeedExample]) -> list[ExampleResult]:
        """Refine every seed example concurrently, results in seed order."""
        return await gather_all(self.refine(seed) for seed in seeds)

    async def refine(self, seed: SeedExample) -> ExampleResult:
        """Judge and rewrite one seed answer, and keep the best-scoring answer."""
        latest = AnswerAttempt(
            0, await self.evaluator.judge_answer(seed.query, seed.answer)
        )
        history = [latest]
        best = latest
        for round_number in range(1, self.rounds + 1):
            if is_perfect(latest.evaluation.judgement):
                break
            attempt = await self._rewrite(latest, round_number)
            if attempt is None:
                break
            history.append(attempt)
            latest = attempt
            if is_better(attempt, best):
                best = attempt

        logger.debug(
            "Refined seed example %s in %d rounds, best reward %s in round %d.",
            seed.query.id,
            len(history) - 1,
            best.reward,
            best.round,
        )
        return ExampleResult(
            seed=seed,
            example=Example(query=seed.query.text, answer=best.answer),
            history=tuple(history),
            best_round=best.round,
        )

    async def _rewrite(
        self, latest: AnswerAttempt, round_number: int
    ) -> AnswerAttempt | None:
        query = latest.evaluation.query
        async with self.evaluator.limiter("optimizer"):
            answer = await self.proposer.rewrite_answer(
                query, latest.answer, latest.evaluation.judgement
            )
        answer = answer.strip()
        if not answer:
            # A blank rewrite would come back blank again from the same request.
            logger.warning(
                "The proposer returned a blank rewrite of seed example %s in "
                "round %d; keeping the best answer so far.",
                query.id,
                round_number,
            )
            return None
        return AnswerAttempt(
            round_number, await self.evaluator.judge_answer(query, answer)
        )
