"""State and steps shared by one run of either search strategy."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.instruction import Example
from optimizer.evaluate import Evaluator
from optimizer.search.nodes import path_history
from optimizer.search.recorder import SearchRecorder
from optimizer.search.scoring import Proposal, propose_all
from optimizer.search.settings import SearchSettings
from optimizer.types import Candidate, Proposer


class StrategyRun:
    """One run of a beam search strategy; create a new one per run."""

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
        self.recorder = SearchRecorder(settings, initial_prompt="")

    async def _propose(self, expand: Sequence[Candidate]) -> list[Proposal]:
        """Ask the proposer for new prompts for every node of `expand` at once."""
        index = self.recorder.candidate_index()
        return await propose_all(
            self.evaluator,
            self.proposer,
            [
                (node, path_history(node, index, self.settings.history_length))
                for node in expand
            ],
            self.settings.n_actions,
        )
