"""BeamSearch: the entry point of stage 2, running the configured strategy."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.instruction import Example
from optimizer.evaluate import Evaluator
from optimizer.search.faithful import FaithfulSearch
from optimizer.search.improved import ImprovedSearch
from optimizer.search.result import SearchResult
from optimizer.search.settings import SearchSettings
from optimizer.types import Proposer, Query


class BeamSearch:
    """Beam search over system prompts, with `examples` as the fixed ICL examples.

    `rng` is the run's one random generator. It draws the query order, the
    held-out split and the batches, and nothing else, so a rerun with a
    generator seeded alike scores the same queries in the same order.
    """

    def __init__(
        self,
        evaluator: Evaluator,
        proposer: Proposer,
        settings: SearchSettings,
        examples: Sequence[Example],
        rng: random.Random,
    ) -> None:
        self.evaluator = evaluator
        self.proposer = proposer
        self.settings = settings
        self.examples = tuple(examples)
        self.rng = rng

    async def run(self, initial_prompt: str, queries: Sequence[Query]) -> SearchResult:
        """Search from `initial_prompt` over `queries` and return the frozen result."""
        strategy = (
            FaithfulSearch if self.settings.strategy == "faithful" else ImprovedSearch
        )
        search = strategy(
            self.evaluator, self.proposer, self.settings, self.examples, self.rng
        )
        return await search.run(initial_prompt, queries)
