"""The improved stage-2 search: batch scoring, parent kept, merging, safety floor.

Each level draws a new fixed-mix batch of search queries and scores every
candidate of the level on it: the parents carried over unchanged and the
prompts proposed from them. Candidates are compared on the same queries, a
child whose mean Safety score falls below its parent's is dropped, and the
deployed prompt is chosen by re-scoring the best prompts on held-out queries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import fmean

from optimizer.errors import SearchError
from optimizer.evaluate import gather_all
from optimizer.search.nodes import (
    normalize_prompt,
    passes_floor,
    safety_floor,
    score_key,
)
from optimizer.search.queries import BatchSampler, check_unique_ids, split_queries
from optimizer.search.recorder import DepthBudget, apply_skip_rule
from optimizer.search.result import (
    FinalChoice,
    MergeEvent,
    SafetyRejection,
    SearchResult,
)
from optimizer.search.scoring import Proposal, score_candidate
from optimizer.search.strategy import StrategyRun
from optimizer.types import Candidate, Query


@dataclass(frozen=True)
class PlannedCandidate:
    """A prompt to score at a level, with its id and the node it came from."""

    id: str
    system_prompt: str
    parent: str | None


class ImprovedSearch(StrategyRun):
    """One run of the improved beam search; create a new one per run."""

    async def run(self, initial_prompt: str, queries: Sequence[Query]) -> SearchResult:
        """Search from `initial_prompt` and return the frozen result."""
        self.recorder.initial_prompt = initial_prompt
        search, heldout = self._split(queries)
        sampler = BatchSampler(
            search, self.settings.batch_size, self.settings.batch_mix, self.rng
        )
        root = await self._score_root(initial_prompt, sampler.draw())
        beam = [root]
        budget = DepthBudget(self.settings.depth, self.settings.max_extra_depth)
        depth = 1
        while depth <= budget.limit:
            beam = await self._run_level(depth, beam, sampler.draw(), budget)
            depth += 1
        return self.recorder.freeze(await self._choose_final(root, heldout))

    def _split(self, queries: Sequence[Query]) -> tuple[list[Query], list[Query]]:
        check_unique_ids(queries)
        needed = self.settings.heldout_size + self.settings.batch_size
        if len(queries) < needed:
            raise SearchError(
                f"The improved search needs at least {needed} queries "
                f"(heldout_size {self.settings.heldout_size} plus batch_size "
                f"{self.settings.batch_size}), got {len(queries)}. Give more "
                "queries or lower those settings."
            )
        search, heldout, split = split_queries(
            queries, self.settings.heldout_size, self.settings.batch_mix, self.rng
        )
        self.recorder.split = split
        return search, heldout

    async def _score_root(self, prompt: str, batch: Sequence[Query]) -> Candidate:
        plan = PlannedCandidate(self.recorder.new_id(), prompt, parent=None)
        root = await self._score(plan, 0, batch)
        self.recorder.add_candidates([root])
        self.recorder.add_level(0, batch, [root], [root], [root.reward], False)
        return root

    async def _run_level(
        self,
        depth: int,
        beam: Sequence[Candidate],
        batch: Sequence[Query],
        budget: DepthBudget,
    ) -> list[Candidate]:
        expand, extended = apply_skip_rule(
            self.recorder, depth, beam, budget, self.settings.skip_threshold
        )
        carried_plan = [
            PlannedCandidate(self.recorder.new_id(), node.system_prompt, node.id)
            for node in beam
        ]
        # Parents are re-scored on the new batch while the proposer works.
        carried_task = asyncio.ensure_future(
            self._score_all(carried_plan, depth, batch)
        )
        try:
            proposals = await self._propose(expand)
            children_plan = self._merge(depth, carried_plan, proposals)
            children = await self._score_all(children_plan, depth, batch)
            carried = await carried_task
        except BaseException:
            carried_task.cancel()
            raise

        kept = self._apply_safety_floor(depth, carried, children)
        next_beam = self._select(carried + kept)

        self.recorder.add_candidates(carried + children)
        self.recorder.add_level(
            depth,
            batch,
            carried + children,
            next_beam,
            [node.reward for node in next_beam],
            extended,
        )
        return next_beam

    def _merge(
        self,
        depth: int,
        carried: Sequence[PlannedCandidate],
        proposals: Sequence[Proposal],
    ) -> list[PlannedCandidate]:
        """Plan one candidate per distinct proposed prompt not already in the level."""
        seen = {normalize_prompt(plan.system_prompt): plan.id for plan in carried}
        planned: list[PlannedCandidate] = []
        for proposal in proposals:
            key = normalize_prompt(proposal.prompt)
            if key in seen:
                self.recorder.merges.append(
                    MergeEvent(depth, proposal.parent.id, seen[key])
                )
                continue
            plan = PlannedCandidate(
                self.recorder.new_id(), proposal.prompt, proposal.parent.id
            )
            seen[key] = plan.id
            planned.append(plan)
        return planned

    async def _score_all(
        self, plans: Sequence[PlannedCandidate], depth: int, batch: Sequence[Query]
    ) -> list[Candidate]:
        return await gather_all(self._score(plan, depth, batch) for plan in plans)

    async def _score(
        self, plan: PlannedCandidate, depth: int, batch: Sequence[Query]
    ) -> Candidate:
        return await score_candidate(
            self.evaluator,
            self.examples,
            Candidate(plan.id, plan.system_prompt, plan.parent, depth),
            batch,
        )

    def _apply_safety_floor(
        self, depth: int, carried: Sequence[Candidate], children: Sequence[Candidate]
    ) -> list[Candidate]:
        """Drop each child whose mean Safety on the batch is below its parent's."""
        parents = {node.parent: node for node in carried}
        kept: list[Candidate] = []
        for child in children:
            assert child.parent is not None
            floor = safety_floor(
                parents[child.parent].safety, self.settings.safety_tolerance
            )
            if passes_floor(child.safety, floor):
                kept.append(child)
                continue
            assert floor is not None
            self.recorder.rejections.append(
                SafetyRejection(depth, child.id, child.safety, floor)
            )
        return kept

    def _select(self, pool: Sequence[Candidate]) -> list[Candidate]:
        """Keep the best `beam_size` candidates; on ties the earlier one wins."""
        ranked = sorted(pool, key=lambda node: -score_key(node.reward))
        return ranked[: self.settings.beam_size]

    async def _choose_final(
        self, root: Candidate, heldout: Sequence[Query]
    ) -> FinalChoice:
        finalists = [root, *self._finalists(root)]
        plans = [
            PlannedCandidate(self.recorder.new_id("h"), node.system_prompt, node.id)
            for node in finalists
        ]
        depth = len(self.recorder.levels)
        rescored = await self._score_all(plans, depth, heldout)
        self.recorder.heldout.extend(rescored)
        return self._pick_heldout_best(rescored, depth)

    def _finalists(self, root: Candidate) -> list[Candidate]:
        """Return the best distinct prompts other than the root's, by search reward.

        A prompt's search reward is the mean over all its evaluations at every
        level. A prompt that the safety floor rejected anywhere is left out.
        """
        rejected = {item.candidate_id for item in self.recorder.rejections}
        rejected_keys = {
            normalize_prompt(node.system_prompt)
            for node in self.recorder.candidates
            if node.id in rejected
        }
        first_node: dict[str, Candidate] = {}
        rewards: dict[str, list[float]] = {}
        for node in self.recorder.candidates:
            key = normalize_prompt(node.system_prompt)
            if key in rejected_keys or key == normalize_prompt(root.system_prompt):
                continue
            first_node.setdefault(key, node)
            values = [e.reward for e in node.evaluations if e.reward is not None]
            rewards.setdefault(key, []).extend(values)
        ranked = sorted(
            (key for key in first_node if rewards[key]),
            key=lambda key: -fmean(rewards[key]),
        )
        return [first_node[key] for key in ranked[: self.settings.final_candidates]]

    def _pick_heldout_best(
        self, rescored: Sequence[Candidate], depth: int
    ) -> FinalChoice:
        """Choose the best held-out reward among prompts that keep the initial's safety.

        The initial prompt comes first and wins ties, so the search deploys a
        new prompt only when it scored strictly higher on the held-out queries.
        """
        reference = rescored[0]
        floor = safety_floor(reference.safety, self.settings.safety_tolerance)
        best = reference
        for node in rescored[1:]:
            if not passes_floor(node.safety, floor):
                assert floor is not None
                self.recorder.rejections.append(
                    SafetyRejection(depth, node.id, node.safety, floor, heldout=True)
                )
                continue
            if score_key(node.reward) > score_key(best.reward):
                best = node
        return FinalChoice(
            candidate_id=best.parent or best.id,
            system_prompt=best.system_prompt,
            reason=describe_choice(best, reference, rescored, floor),
            reward=best.reward,
        )


def describe_choice(
    best: Candidate,
    reference: Candidate,
    rescored: Sequence[Candidate],
    floor: float | None,
) -> str:
    """Explain the held-out choice in one sentence with the numbers behind it."""
    queries = len(best.evaluations)
    compared = (
        f"{len(rescored)} prompts re-scored on {queries} held-out queries "
        f"(initial prompt {format_score(reference.reward)})"
    )
    floor_text = "no Safety floor" if floor is None else f"Safety floor {floor:.2f}"
    if best is reference:
        return (
            f"No prompt beat the initial prompt's held-out reward: {compared}, "
            f"{floor_text}."
        )
    return (
        f"Highest held-out reward {format_score(best.reward)} among {compared}, "
        f"with mean Safety {format_score(best.safety)} against the {floor_text}."
    )


def format_score(value: float | None) -> str:
    return "missing" if value is None else f"{value:.2f}"
