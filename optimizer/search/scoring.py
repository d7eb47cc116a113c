"""Calls shared by both strategies: score a candidate on queries, ask for proposals."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from gateway.instruction import Example
from optimizer.evaluate import Evaluator, gather_all
from optimizer.types import Candidate, Proposer, Query, instruction_for

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Proposal:
    """A new system prompt and the node whose expansion proposed it."""

    parent: Candidate
    prompt: str


async def score_candidate(
    evaluator: Evaluator,
    examples: Sequence[Example],
    candidate: Candidate,
    queries: Sequence[Query],
) -> Candidate:
    """Return `candidate` with its evaluations on `queries`, run concurrently."""
    instruction = instruction_for(candidate.system_prompt, examples)
    evaluations = await evaluator.evaluate_batch(instruction, queries)
    return replace(candidate, evaluations=tuple(evaluations))


async def propose_all(
    evaluator: Evaluator,
    proposer: Proposer,
    nodes: Sequence[tuple[Candidate, Sequence[str]]],
    n_actions: int,
) -> list[Proposal]:
    """Ask for `n_actions` prompts per (node, path history), all nodes concurrently.

    Blank prompts are dropped and extra prompts beyond `n_actions` are ignored.
    Proposals keep the order of `nodes`, then the proposer's order.
    """
    batches = await gather_all(
        propose(evaluator, proposer, node, history, n_actions)
        for node, history in nodes
    )
    return [proposal for batch in batches for proposal in batch]


async def propose(
    evaluator: Evaluator,
    proposer: Proposer,
    node: Candidate,
    history: Sequence[str],
    n_actions: int,
) -> list[Proposal]:
    async with evaluator.limiter("optimizer"):
        prompts = await proposer.propose_prompts(
            node.system_prompt, node.evaluations, history, n_actions
        )
    kept = [prompt.strip() for prompt in prompts if prompt.strip()][:n_actions]
    if not kept:
        logger.warning(
            "The proposer returned no usable prompt for candidate %s.", node.id
        )
    return [Proposal(node, prompt) for prompt in kept]
