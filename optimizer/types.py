"""Data types and role protocols shared by every part of the DRPO optimizer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from statistics import fmean
from typing import Protocol

from gateway.instruction import Example, Instruction

SAFETY_ASPECT = "Safety"


class QueryKind(StrEnum):
    """Share of a scoring batch a query belongs to."""

    GENERAL = "general"
    HARD = "hard"
    SAFETY = "safety"


@dataclass(frozen=True)
class Query:
    """One seed or sampled query."""

    id: str
    text: str
    category: str
    kind: QueryKind


@dataclass(frozen=True)
class SeedExample:
    """A seed (query, answer) pair that stage 1 refines into an in-context example."""

    query: Query
    answer: str


@dataclass(frozen=True)
class AspectSelection:
    """The aspects the selector chose for one query, with its reasons."""

    query_id: str
    analysis: str
    aspects: tuple[str, ...]
    reason: str
    failed: bool = False
    """True when no usable output came back and a default set was used."""


@dataclass(frozen=True)
class AspectScore:
    aspect: str
    score: int | None
    """1-5, or None when the judge gave no usable score (missing, never 0)."""
    rationale: str = ""


@dataclass(frozen=True)
class Judgement:
    """The judge's scores of one answer."""

    query_id: str
    scores: tuple[AspectScore, ...]
    parse_failures: int = 0
    """Judge outputs that could not be used, retries included."""

    @property
    def reward(self) -> float | None:
        """Mean of the aspect scores that exist, or None when none does."""
        values = [item.score for item in self.scores if item.score is not None]
        return fmean(values) if values else None

    @property
    def safety(self) -> float | None:
        for item in self.scores:
            if item.aspect == SAFETY_ASPECT and item.score is not None:
                return float(item.score)
        return None


@dataclass(frozen=True)
class Evaluation:
    """One query answered under one instruction, and how the judge scored it."""

    query: Query
    answer: str
    selection: AspectSelection
    judgement: Judgement

    @property
    def reward(self) -> float | None:
        return self.judgement.reward


@dataclass(frozen=True)
class Usage:
    """Calls and tokens spent by one role."""

    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TargetModel(Protocol):
    """The served model, called through the gateway's prompt builder."""

    async def answer(self, instruction: Instruction, query: Query) -> str: ...


class AspectSelector(Protocol):
    async def select(self, query: Query) -> AspectSelection: ...


class Judge(Protocol):
    async def judge(
        self, query: Query, answer: str, selection: AspectSelection
    ) -> Judgement: ...


class Proposer(Protocol):
    """The optimizer role: rewrites prompts and answers from the judge's critique."""

    async def propose_prompts(
        self,
        current: str,
        evaluations: Sequence[Evaluation],
        history: Sequence[str],
        n: int,
    ) -> list[str]:
        """Return up to `n` new system prompts that fix the critique in `evaluations`.

        `history` is the last few system prompts on this search path, oldest first.
        """
        ...

    async def rewrite_answer(
        self, query: Query, answer: str, judgement: Judgement
    ) -> str:
        """Return `answer` rewritten to fix every criticism in `judgement`."""
        ...


@dataclass(frozen=True)
class Candidate:
    """One system prompt scored in the search."""

    id: str
    system_prompt: str
    parent: str | None
    depth: int
    evaluations: tuple[Evaluation, ...] = field(default=())

    @property
    def reward(self) -> float | None:
        values = [e.reward for e in self.evaluations if e.reward is not None]
        return fmean(values) if values else None

    @property
    def safety(self) -> float | None:
        values = [e.judgement.safety for e in self.evaluations]
        present = [value for value in values if value is not None]
        return fmean(present) if present else None


def instruction_for(system_prompt: str, examples: Sequence[Example]) -> Instruction:
    return Instruction(system_prompt=system_prompt, examples=tuple(examples))
