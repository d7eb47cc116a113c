"""Answer queries under an instruction and score the answers with dynamic rewarding.

One evaluation is three role calls: the target answers the query, the aspect
selector picks the aspects that matter for the query, and the judge scores the
answer on those aspects. The answer and the selection do not depend on each
other, so they run concurrently and only the judge waits for both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from gateway.instruction import Instruction
from optimizer.types import (
    AspectSelection,
    AspectSelector,
    Evaluation,
    Judge,
    Query,
    TargetModel,
)

T = TypeVar("T")
EvaluationKey = tuple[Instruction, Query]

Limiter = Callable[[str], AbstractAsyncContextManager[None]]
"""A factory of context managers entered around every role call, given the role name.

The `ModelClient` already applies the one global limit on concurrent upstream
calls, so the default limiter does nothing. Tests pass one that counts calls in
flight per role. A limiter must not share the client's semaphore: an
evaluation would then hold a slot while its own upstream call waits for one.
"""


@asynccontextmanager
async def unlimited(role: str) -> AsyncIterator[None]:
    """Enter no limit, the default `Limiter`."""
    yield


async def gather_all(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Await all `awaitables` concurrently and return their results in order.

    Unlike `asyncio.gather`, the first error cancels the remaining tasks before
    it propagates, so a failed call leaves no orphan calls running.
    """
    tasks = [asyncio.ensure_future(item) for item in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class Evaluator:
    """Score answers of the target model with per-query aspects and the judge.

    Aspect selections are cached per query id, and evaluations per instruction
    and query, so concurrent requests for the same item share one call.
    """

    def __init__(
        self,
        target: TargetModel,
        selector: AspectSelector,
        judge: Judge,
        limiter: Limiter = unlimited,
    ) -> None:
        self.target = target
        self.selector = selector
        self.judge = judge
        self.limiter = limiter
        self._selections: dict[str, asyncio.Task[AspectSelection]] = {}
        self._evaluations: dict[EvaluationKey, asyncio.Task[Evaluation]] = {}

    async def select(self, query: Query) -> AspectSelection:
        """Return the aspect selection of `query`, calling the selector once per id."""
        # shield: one cancelled waiter must not cancel the call the others share.
        return await asyncio.shield(self._selection_task(query))

    async def evaluate(self, instruction: Instruction, query: Query) -> Evaluation:
        """Answer `query` under `instruction` and judge the answer."""
        key = (instruction, query)
        task = self._evaluations.get(key)
        if task is None:
            task = asyncio.ensure_future(self._evaluate(instruction, query))
            task.add_done_callback(_retrieve_exception)
            self._evaluations[key] = task
        return await asyncio.shield(task)

    async def evaluate_batch(
        self, instruction: Instruction, queries: Sequence[Query]
    ) -> list[Evaluation]:
        """Evaluate every query of `queries` concurrently, results in query order."""
        return await gather_all(self.evaluate(instruction, query) for query in queries)

    async def judge_answer(self, query: Query, answer: str) -> Evaluation:
        """Judge a given `answer` to `query` on the query's selected aspects."""
        selection = await self.select(query)
        async with self.limiter("judge"):
            judgement = await self.judge.judge(query, answer, selection)
        return Evaluation(
            query=query, answer=answer, selection=selection, judgement=judgement
        )

    async def _evaluate(self, instruction: Instruction, query: Query) -> Evaluation:
        # Start the selection first: it runs while the target answers, and
        # judge_answer then awaits the same task.
        self._selection_task(query)
        answer = await self._answer(instruction, query)
        return await self.judge_answer(query, answer)

    def _selection_task(self, query: Query) -> asyncio.Task[AspectSelection]:
        task = self._selections.get(query.id)
        if task is None:
            task = asyncio.ensure_future(self._select(query))
            task.add_done_callback(_retrieve_exception)
            self._selections[query.id] = task
        return task

    async def _answer(self, instruction: Instruction, query: Query) -> str:
        async with self.limiter("target"):
            return await self.target.answer(instruction, query)

    async def _select(self, query: Query) -> AspectSelection:
        async with self.limiter("selector"):
            return await self.selector.select(query)


def _retrieve_exception(task: asyncio.Task[Any]) -> None:
    # A cached task can fail after every awaiter has gone, when the run
    # stopped on another error. Reading its exception keeps asyncio from
    # logging "Task exception was never retrieved" over the real message.
    if not task.cancelled():
        task.exception()
