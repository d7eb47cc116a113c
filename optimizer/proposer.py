"""The optimizer role: new system prompts and rewritten answers from a critique."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from optimizer.client import Endpoint, ModelClient
from optimizer.evaluate import gather_all
from optimizer.parsing import first_json_object, normalize_name, response_text
from optimizer.types import AspectScore, Evaluation, Judgement, Query

logger = logging.getLogger(__name__)

ROLE = "optimizer"
PROMPTS_SCHEMA_NAME = "system_prompts"
MAX_PROMPT_CHARS = 4000

PROPOSER_SYSTEM_PROMPT = (
    "You are the prompt optimizer of an alignment search. An assistant model "
    "answers user queries under a system prompt, and a strict judge scores "
    "each answer from 1 (poor) to 5 (excellent) on the aspects that matter "
    "for that query. Your job is to write better system prompts for that "
    "assistant, based on the judge's critique."
)

REWRITER_SYSTEM_PROMPT = (
    "You are the answer rewriter of an alignment search. You receive a user "
    "query, an answer to it and a strict judge's critique of that answer. "
    "Write an improved answer that fixes every criticism while keeping what "
    "the judge liked."
)

_PROPOSAL_TASK = (
    "Write {n} different improved system prompts for the assistant. Each one "
    "must be a complete system prompt on its own that fixes the weaknesses "
    "above without losing what already worked. State general principles that "
    "help on any query, not rules about these particular queries. Keep each "
    "prompt under {max_chars} characters. Reply with only a JSON object that "
    "holds exactly {n} strings, such as "
    '{{"prompts": ["You are a knowledgeable assistant. Answer the question '
    'directly, explain your reasoning, and keep it short."]}}.'
)

_REWRITE_TASK = (
    "Rewrite the answer so that it fixes every criticism above. Reply with "
    "the new answer text only: no preamble, no notes about what changed, no "
    "quotation marks around it."
)


class LLMProposer:
    """Proposer that calls the optimizer role's endpoint.

    `temperature` applies to both prompt proposals and answer rewrites.
    Requests carry a fixed `seed`, so a rerun sends byte-identical requests and
    the client's cache replays them.
    """

    def __init__(
        self,
        client: ModelClient,
        endpoint: Endpoint,
        temperature: float = 0.2,
        max_tokens: int = 2048,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.parse_failures = 0
        """Optimizer outputs with no usable prompt or answer."""

    async def propose_prompts(
        self,
        current: str,
        evaluations: Sequence[Evaluation],
        history: Sequence[str],
        n: int,
    ) -> list[str]:
        """Return up to `n` new system prompts that fix the critique in `evaluations`.

        The first request is for all `n` prompts. When fewer usable prompts
        come back, one request per missing prompt follows, concurrently and
        each with another seed, so fewer than `n` come back only when those
        fail too. Empty prompts (no letter or digit), prompts over
        `MAX_PROMPT_CHARS` characters, duplicates and copies of `current` are
        dropped.
        """
        if n < 1:
            return []
        context = render_proposal_context(current, evaluations, history)
        collector = _PromptCollector(current)
        self._collect(collector, await self._ask_for_prompts(context, n, seed=0))

        missing = n - len(collector.prompts)
        if missing > 0:
            extra = await gather_all(
                self._ask_for_prompts(context, 1, seed=seed)
                for seed in range(1, missing + 1)
            )
            for prompts in extra:
                self._collect(collector, prompts)
        return collector.prompts[:n]

    async def rewrite_answer(
        self, query: Query, answer: str, judgement: Judgement
    ) -> str:
        """Return `answer` rewritten to fix every criticism in `judgement`.

        Returns "" when the optimizer returns no text, and counts that in
        `parse_failures`. Stage 1 then stops rewriting this answer.
        """
        content = (
            f"<query>\n{query.text}\n</query>\n\n"
            f"<answer>\n{answer}\n</answer>\n\n"
            f"<critique>\n{render_critique(judgement.scores)}\n</critique>\n\n"
            f"{_REWRITE_TASK}"
        )
        body = self._chat_body(REWRITER_SYSTEM_PROMPT, content, seed=0)
        response = await self.client.complete(
            ROLE, self.endpoint, "/chat/completions", body
        )
        text = _strip_echoed_tags(response_text(response) or "")
        if not text:
            self.parse_failures += 1
            logger.warning(
                "The optimizer returned no rewrite of the answer to query %s",
                query.id,
            )
        return text

    async def _ask_for_prompts(self, context: str, n: int, seed: int) -> list[str]:
        task = _PROPOSAL_TASK.format(n=n, max_chars=MAX_PROMPT_CHARS)
        body = self._chat_body(PROPOSER_SYSTEM_PROMPT, f"{context}\n\n{task}", seed)
        body["response_format"] = prompts_response_format(n)
        response = await self.client.complete(
            ROLE, self.endpoint, "/chat/completions", body
        )
        return parse_prompts(response_text(response) or "")

    def _collect(self, collector: _PromptCollector, prompts: Sequence[str]) -> None:
        if collector.add_all(prompts) == 0:
            self.parse_failures += 1
            logger.warning(
                "The optimizer reply contained no new usable system prompt: %r",
                [prompt[:80] for prompt in prompts],
            )

    def _chat_body(self, system: str, content: str, seed: int) -> dict[str, Any]:
        return {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": content},
            ],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": seed,
        }


class _PromptCollector:
    """Accumulator of proposed prompts that drops unusable and repeated ones."""

    def __init__(self, current: str) -> None:
        self.prompts: list[str] = []
        self._seen = {current.strip()}

    def add_all(self, candidates: Sequence[str]) -> int:
        """Add the usable new prompts of `candidates` and return how many."""
        added = 0
        for candidate in candidates:
            prompt = candidate.strip()
            if not normalize_name(prompt) or len(prompt) > MAX_PROMPT_CHARS:
                continue
            if prompt in self._seen:
                continue
            self._seen.add(prompt)
            self.prompts.append(prompt)
            added += 1
        return added


def prompts_response_format(n: int) -> dict[str, Any]:
    """Return the `response_format` that requests exactly `n` prompt strings."""
    schema = {
        "type": "object",
        "properties": {
            "prompts": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": n,
                "maxItems": n,
            }
        },
        "required": ["prompts"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": PROMPTS_SCHEMA_NAME, "schema": schema, "strict": True},
    }


def parse_prompts(text: str) -> list[str]:
    """Return the strings of the "prompts" list in the optimizer's reply.

    A bare JSON list of strings is accepted as well. Non-string items are
    skipped; cleaning (length, duplicates) is left to the caller.
    """
    found = first_json_object(text)
    items: object = found.get("prompts") if found is not None else None
    if items is None:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except ValueError:
                items = None
    if not isinstance(items, list):
        return []
    return [item for item in items if isinstance(item, str)]


def render_proposal_context(
    current: str, evaluations: Sequence[Evaluation], history: Sequence[str]
) -> str:
    """Render the current prompt, the scored answers (worst first) and the history."""
    parts = [f"<current_prompt>\n{current}\n</current_prompt>"]
    ordered = sorted(evaluations, key=_reward_or_top)
    for index, evaluation in enumerate(ordered, start=1):
        parts.append(_render_evaluation(index, evaluation))
    if history:
        listed = "\n\n".join(
            f"{index}. {prompt}" for index, prompt in enumerate(history, start=1)
        )
        parts.append(
            "Earlier system prompts on this search path, oldest first. Do not "
            f"repeat them:\n<previous_prompts>\n{listed}\n</previous_prompts>"
        )
    return "\n\n".join(parts)


def render_critique(scores: Sequence[AspectScore]) -> str:
    """Render one line per aspect, the worst scores first and missing ones last."""
    lines = []
    for item in sorted(scores, key=_score_or_top):
        score = "no score" if item.score is None else f"{item.score}/5"
        rationale = item.rationale.strip() or "no rationale given"
        lines.append(f"- {item.aspect} ({score}): {rationale}")
    return "\n".join(lines) if lines else "- no critique available"


def _render_evaluation(index: int, evaluation: Evaluation) -> str:
    reward = evaluation.reward
    mean = "no score" if reward is None else f"{reward:.2f}/5"
    return (
        f'<scored_answer index="{index}" mean_score="{mean}">\n'
        f"<query>\n{evaluation.query.text}\n</query>\n"
        f"<answer>\n{evaluation.answer}\n</answer>\n"
        f"<critique>\n{render_critique(evaluation.judgement.scores)}\n</critique>\n"
        "</scored_answer>"
    )


def _reward_or_top(evaluation: Evaluation) -> float:
    reward = evaluation.reward
    return 6.0 if reward is None else reward


def _score_or_top(item: AspectScore) -> int:
    return 6 if item.score is None else item.score


_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*(?:</answer>|$)", re.DOTALL)


def _strip_echoed_tags(text: str) -> str:
    """Return the rewrite without the <answer> and <critique> tags it may echo."""
    match = _ANSWER_TAG.search(text)
    if match is not None:
        text = match.group(1)
    return re.split(r"</?(?:critique|query)>", text)[0].strip()
