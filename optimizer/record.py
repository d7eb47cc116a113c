"""The frozen record of a DRPO run, as JSON and as a plain-text summary.

The record contains the whole search result, the stage-1 history and the calls
and tokens per role. It contains no timestamps, so two runs that made the same
calls produce the same JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from statistics import fmean
from types import MappingProxyType
from typing import Any

from optimizer.search import SearchResult
from optimizer.search.nodes import normalize_prompt
from optimizer.stage1 import AnswerAttempt, ExampleResult
from optimizer.types import Candidate, Evaluation, Usage

TOKENS_PER_PRICE_UNIT = 1_000_000


@dataclass(frozen=True)
class RunRecord:
    """Everything one run scored, chose and spent."""

    search: SearchResult
    examples: tuple[ExampleResult, ...] = ()
    usage: Mapping[str, Usage] = field(default_factory=dict)
    """Calls, cache hits and tokens per role, as the model client counted them."""
    price_per_million_tokens: float = 0.0
    """Price of 1,000,000 prompt or completion tokens, for the cost estimate."""

    def __post_init__(self) -> None:
        # A read-only copy, so the caller's live usage counters cannot change it.
        object.__setattr__(self, "usage", MappingProxyType(dict(self.usage)))
        object.__setattr__(self, "examples", tuple(self.examples))

    @property
    def total_usage(self) -> Usage:
        return Usage(
            calls=sum(item.calls for item in self.usage.values()),
            cache_hits=sum(item.cache_hits for item in self.usage.values()),
            prompt_tokens=sum(item.prompt_tokens for item in self.usage.values()),
            completion_tokens=sum(
                item.completion_tokens for item in self.usage.values()
            ),
        )

    @property
    def estimated_cost(self) -> float:
        """Tokens of every role times the price, in the price's currency."""
        usage = self.total_usage
        tokens = usage.prompt_tokens + usage.completion_tokens
        return tokens * self.price_per_million_tokens / TOKENS_PER_PRICE_UNIT

    def evaluations(self) -> list[Evaluation]:
        """Return every distinct evaluation of the run: search, held-out and stage 1."""
        found = [
            evaluation
            for candidate in self.search.all_candidates()
            for evaluation in candidate.evaluations
        ]
        found.extend(
            attempt.evaluation for result in self.examples for attempt in result.history
        )
        # An evaluation shared by two candidates (same prompt and query) counts once.
        return list(dict.fromkeys(found))

    @property
    def judge_parse_failures(self) -> int:
        """Judge outputs that could not be used, over all distinct evaluations."""
        return sum(item.judgement.parse_failures for item in self.evaluations())

    @property
    def selector_failures(self) -> int:
        """Queries whose aspect selection fell back to the default aspects."""
        failed = {item.query.id for item in self.evaluations() if item.selection.failed}
        return len(failed)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as JSON-ready dicts and lists, in a fixed order."""
        search = self.search
        return {
            "settings": asdict(search.settings),
            "initial_prompt": search.initial_prompt,
            "final": asdict(search.final),
            "split": asdict(search.split),
            "levels": [asdict(level) for level in search.levels],
            "skips": [asdict(event) for event in search.skips],
            "merges": [asdict(event) for event in search.merges],
            "safety_rejections": [asdict(event) for event in search.rejections],
            "candidates": [candidate_dict(item) for item in search.candidates],
            "heldout": [candidate_dict(item) for item in search.heldout],
            "stage1": [example_dict(item) for item in self.examples],
            "parse_failures": {
                "judge": self.judge_parse_failures,
                "selector": self.selector_failures,
            },
            "usage": {role: asdict(item) for role, item in sorted(self.usage.items())},
            "price_per_million_tokens": self.price_per_million_tokens,
            "estimated_cost": self.estimated_cost,
        }

    def to_json(self) -> str:
        """Return the record as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def summary(self) -> str:
        """Return a plain-text report of the choice, the scores and the spending."""
        sections = [
            self._headline(),
            render_levels(self.search),
            render_comparison(*self._initial_and_final(), self._comparison_basis()),
            self._events(),
            render_stage1(self.examples),
            render_usage(self.usage, self.total_usage),
            f"Estimated cost: {self.estimated_cost:.4f} at "
            f"{self.price_per_million_tokens:g} per 1M tokens.",
        ]
        return "\n\n".join(section for section in sections if section) + "\n"

    def _headline(self) -> str:
        search = self.search
        final = search.final
        prompt = "\n".join(
            "    " + line for line in final.system_prompt.splitlines() or [""]
        )
        return (
            f"DRPO run: {search.settings.strategy} search, seed "
            f"{search.settings.seed}, depth {len(search.levels) - 1} "
            f"({search.extra_depth} levels added by skips).\n"
            f"Chosen prompt ({final.candidate_id}):\n{prompt}\n"
            f"Why: {final.reason}"
        )

    def _events(self) -> str:
        search = self.search
        extended = sum(1 for event in search.skips if event.extended)
        return (
            f"Events: {len(search.skips)} skips ({extended} added a level), "
            f"{len(search.merges)} merged duplicates, "
            f"{len(search.rejections)} safety-floor rejections.\n"
            f"Parse failures: {self.judge_parse_failures} judge outputs, "
            f"{self.selector_failures} aspect selections."
        )

    def _comparison_basis(self) -> str:
        if self.search.heldout:
            return "held-out queries"
        return "search queries (faithful: no held-out set)"

    def _initial_and_final(self) -> tuple[list[Evaluation], list[Evaluation]]:
        """Return the evaluations that compare the initial and the final prompt."""
        search = self.search
        if search.heldout:
            initial = search.heldout[0]
            final = next(
                (
                    item
                    for item in search.heldout
                    if item.parent == search.final.candidate_id
                ),
                initial,
            )
            return list(initial.evaluations), list(final.evaluations)
        return (
            prompt_evaluations(search.candidates, search.initial_prompt),
            prompt_evaluations(search.candidates, search.final.system_prompt),
        )


def evaluation_dict(evaluation: Evaluation) -> dict[str, Any]:
    selection = evaluation.selection
    return {
        "query_id": evaluation.query.id,
        "answer": evaluation.answer,
        "answer_length": len(evaluation.answer),
        "selection": {
            "aspects": list(selection.aspects),
            "analysis": selection.analysis,
            "reason": selection.reason,
            "failed": selection.failed,
        },
        "scores": [asdict(score) for score in evaluation.judgement.scores],
        "reward": evaluation.reward,
        "parse_failures": evaluation.judgement.parse_failures,
    }


def candidate_dict(candidate: Candidate) -> dict[str, Any]:
    return {
        "id": candidate.id,
        "system_prompt": candidate.system_prompt,
        "parent": candidate.parent,
        "depth": candidate.depth,
        "reward": candidate.reward,
        "safety": candidate.safety,
        "evaluations": [evaluation_dict(item) for item in candidate.evaluations],
    }


def example_dict(result: ExampleResult) -> dict[str, Any]:
    return {
        "seed_id": result.seed.query.id,
        "query": result.example.query,
        "answer": result.example.answer,
        "best_round": result.best_round,
        "history": [attempt_dict(attempt) for attempt in result.history],
    }


def attempt_dict(attempt: AnswerAttempt) -> dict[str, Any]:
    return {"round": attempt.round, **evaluation_dict(attempt.evaluation)}


def prompt_evaluations(
    candidates: Iterable[Candidate], prompt: str
) -> list[Evaluation]:
    """Return the evaluations of every candidate whose prompt matches `prompt`."""
    key = normalize_prompt(prompt)
    return [
        evaluation
        for candidate in candidates
        if normalize_prompt(candidate.system_prompt) == key
        for evaluation in candidate.evaluations
    ]


def aspect_means(evaluations: Sequence[Evaluation]) -> dict[str, float]:
    """Return the mean score per aspect over the scores that exist, by aspect name."""
    scores: dict[str, list[int]] = {}
    for evaluation in evaluations:
        for item in evaluation.judgement.scores:
            if item.score is not None:
                scores.setdefault(item.aspect, []).append(item.score)
    return {aspect: fmean(values) for aspect, values in sorted(scores.items())}


def mean_reward(evaluations: Sequence[Evaluation]) -> float | None:
    values = [item.reward for item in evaluations if item.reward is not None]
    return fmean(values) if values else None


def mean_length(evaluations: Sequence[Evaluation]) -> float | None:
    return fmean(len(item.answer) for item in evaluations) if evaluations else None


def format_number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_levels(search: SearchResult) -> str:
    """Render the best selection score per level, one line per level."""
    skipped = {event.depth for event in search.skips}
    lines = [
        "Score by depth (best kept candidate; each level has its own queries):",
        f"  {'depth':>5}  {'queries':>7}  {'scored':>6}  {'best':>5}  id",
    ]
    for level in search.levels:
        best = level.beam_scores[0] if level.beam_scores else None
        best_id = level.beam_ids[0] if level.beam_ids else "-"
        notes = []
        if level.depth in skipped:
            notes.append("skip")
        if level.extended:
            notes.append("+1 level")
        lines.append(
            f"  {level.depth:>5}  {len(level.query_ids):>7}  "
            f"{len(level.candidate_ids):>6}  {format_number(best):>5}  {best_id}"
            + (f"  ({', '.join(notes)})" if notes else "")
        )
    return "\n".join(lines)


def render_comparison(
    initial: Sequence[Evaluation], final: Sequence[Evaluation], basis: str
) -> str:
    """Render the mean score per aspect, the reward and answer length side by side."""
    initial_means = aspect_means(initial)
    final_means = aspect_means(final)
    aspects = sorted(set(initial_means) | set(final_means))
    width = max([len(name) for name in aspects] + [len("answer length (chars)")])
    lines = [
        f"Initial and final prompt on the {basis}:",
        f"  {'':<{width}}  {'initial':>7}  {'final':>7}",
    ]
    for aspect in aspects:
        lines.append(
            f"  {aspect:<{width}}  {format_number(initial_means.get(aspect)):>7}"
            f"  {format_number(final_means.get(aspect)):>7}"
        )
    rows = [
        ("reward", mean_reward(initial), mean_reward(final), 2),
        ("answer length (chars)", mean_length(initial), mean_length(final), 0),
    ]
    for name, before, after, digits in rows:
        lines.append(
            f"  {name:<{width}}  {format_number(before, digits):>7}"
            f"  {format_number(after, digits):>7}"
        )
    return "\n".join(lines)


def render_stage1(examples: Sequence[ExampleResult]) -> str:
    """Render the mean seed and refined reward of the in-context examples."""
    if not examples:
        return ""
    seed = [result.history[0].reward for result in examples]
    best = [result.best.reward for result in examples]
    improved = sum(1 for result in examples if result.best_round > 0)
    rounds = sum(len(result.history) - 1 for result in examples)
    return (
        f"Stage 1: {len(examples)} examples, {rounds} rewrites, {improved} "
        f"improved; mean reward {format_number(mean_of(seed))} (seed) -> "
        f"{format_number(mean_of(best))} (kept)."
    )


def mean_of(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return fmean(present) if present else None


def render_usage(usage: Mapping[str, Usage], total: Usage) -> str:
    """Render calls, cache hits and tokens per role, with a total line."""
    header = (
        f"  {'role':<10}  {'calls':>6}  {'cache hits':>10}  "
        f"{'prompt tokens':>13}  {'completion tokens':>17}"
    )
    lines = ["Usage per role, as counted by the model client:", header]
    rows = [*sorted(usage.items()), ("total", total)]
    for role, item in rows:
        lines.append(
            f"  {role:<10}  {item.calls:>6}  {item.cache_hits:>10}  "
            f"{item.prompt_tokens:>13}  {item.completion_tokens:>17}"
        )
    return "\n".join(lines)
