"""The faithful stage-2 search: the original DRPO beam search, for comparison.

The state is a path of nodes from the root. Level d scores every child on the
single query at position d of the shuffled order, the child's step reward is
that one score, and paths are ranked by their mean step reward. There is no
held-out set, no merging and no safety floor: the deployed prompt is the last
prompt on the best path.
"""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean

from optimizer.evaluate import gather_all
from optimizer.search.nodes import score_key
from optimizer.search.queries import QuerySplit, check_unique_ids, shuffled
from optimizer.search.recorder import DepthBudget, apply_skip_rule
from optimizer.search.result import FinalChoice, SearchResult
from optimizer.search.scoring import Proposal, score_candidate
from optimizer.search.strategy import StrategyRun
from optimizer.types import Candidate, Query

Path = tuple[Candidate, ...]


def path_reward(path: Path) -> float | None:
    """Return the mean step reward along `path`, ignoring missing rewards."""
    values = [node.reward for node in path if node.reward is not None]
    return fmean(values) if values else None


class FaithfulSearch(StrategyRun):
    """One run of the faithful beam search; create a new one per run."""

    async def run(self, initial_prompt: str, queries: Sequence[Query]) -> SearchResult:
        """Search from `initial_prompt`, one query per level, and freeze the result."""
        self.recorder.initial_prompt = initial_prompt
        order = self._order(queries)
        root = await self._score_root(initial_prompt, order[0])
        paths: list[Path] = [(root,)]
        budget = DepthBudget(self.settings.depth, self.settings.max_extra_depth)
        depth = 1
        while depth <= budget.limit:
            # Past the end of the order the queries repeat from the start.
            query = order[depth % len(order)]
            paths = await self._run_level(depth, paths, query, budget)
            depth += 1
        return self.recorder.freeze(describe_best_path(paths[0]))

    def _order(self, queries: Sequence[Query]) -> list[Query]:
        check_unique_ids(queries)
        order = shuffled(queries, self.rng)
        ids = tuple(query.id for query in order)
        self.recorder.split = QuerySplit(order=ids, search=ids, heldout=())
        return order

    async def _score_root(self, prompt: str, query: Query) -> Candidate:
        root = Candidate(self.recorder.new_id(), prompt, None, 0)
        root = await self._score(root, query)
        self.recorder.add_candidates([root])
        self.recorder.add_level(0, [query], [root], [root], [root.reward], False)
        return root

    async def _run_level(
        self, depth: int, paths: Sequence[Path], query: Query, budget: DepthBudget
    ) -> list[Path]:
        leaves = [path[-1] for path in paths]
        expand, extended = apply_skip_rule(
            self.recorder, depth, leaves, budget, self.settings.skip_threshold
        )
        proposals = await self._propose(expand)
        planned = self._plan_children(depth, paths, expand, proposals)
        children = await gather_all(self._score(child, query) for _, child in planned)
        grown = [
            (*path, child) for (path, _), child in zip(planned, children, strict=True)
        ]

        kept = sorted(grown, key=lambda path: -score_key(path_reward(path)))
        kept = kept[: self.settings.beam_size]

        self.recorder.add_candidates(children)
        self.recorder.add_level(
            depth,
            [query],
            children,
            [path[-1] for path in kept],
            [path_reward(path) for path in kept],
            extended,
        )
        return kept

    def _plan_children(
        self,
        depth: int,
        paths: Sequence[Path],
        expand: Sequence[Candidate],
        proposals: Sequence[Proposal],
    ) -> list[tuple[Path, Candidate]]:
        """Pair each path with its unscored children, in path order.

        A skipped leaf, or one for which the proposer returned nothing, gets
        one child with its prompt unchanged.
        """
        expanded = {node.id for node in expand}
        planned: list[tuple[Path, Candidate]] = []
        for path in paths:
            leaf = path[-1]
            prompts = [p.prompt for p in proposals if p.parent.id == leaf.id]
            if leaf.id not in expanded or not prompts:
                prompts = [leaf.system_prompt]
            for prompt in prompts:
                child = Candidate(self.recorder.new_id(), prompt, leaf.id, depth)
                planned.append((path, child))
        return planned

    async def _score(self, candidate: Candidate, query: Query) -> Candidate:
        return await score_candidate(self.evaluator, self.examples, candidate, [query])


def describe_best_path(path: Path) -> FinalChoice:
    """Return the last prompt of `path` as the choice, with its path reward."""
    leaf = path[-1]
    reward = path_reward(path)
    shown = "missing" if reward is None else f"{reward:.2f}"
    return FinalChoice(
        candidate_id=leaf.id,
        system_prompt=leaf.system_prompt,
        reason=(
            f"Last prompt on the best path: mean step reward {shown} over "
            f"{len(path)} steps, each scored on one query."
        ),
        reward=reward,
    )
