"""Measure the stage-2 search against a scripted model server with a fixed delay.

Both strategies run the real optimizer stack (ModelClient, GatewayTarget in
base mode, LLMAspectSelector, LLMJudge, LLMProposer) against the scripted
OpenAI-compatible server of the optimizer tests on loopback, which answers
every request after `--delay` seconds. The script prints, per strategy:

- wall time against the lower bound set by the longest chain of dependent
  calls. The chain is counted from the recorded search: 2 calls for level 0
  and for the held-out stage (target and selector run concurrently, then the
  judge), 3 for a level with an expansion (proposer, then target, then judge),
  2 for a level where every node was skipped;
- upstream calls and tokens per role, and the improved/faithful ratios.

Token counts are estimates: the fake reports 1 token per 4 characters of the
request's messages or prompt and of the reply. The fake server and the search
share one Python process, so the CPU time of the HTTP stack on both sides
adds to the wall time; a larger `--delay` shows how much of the gap is that.

    .venv/bin/python bench/optimizer_search.py [--depth 5] [--delay 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INITIAL_PROMPT = "You are a helpful assistant."
CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class Measurement:
    strategy: str
    wall_seconds: float
    chain_calls: int
    calls: dict[str, int]
    tokens: dict[str, int]

    @property
    def total_calls(self) -> int:
        return sum(self.calls.values())

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())


def digest(value: Any) -> int:
    text = json.dumps(value, sort_keys=True)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def request_text(body: dict[str, Any]) -> str:
    return str(body.get("prompt") or json.dumps(body.get("messages")))


def with_estimated_usage(
    handler: Callable[[dict[str, Any]], Any],
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Wrap a fake handler so its reply reports tokens in proportion to its text."""
    from tests.fakes.upstream import chat_body, completion_body

    def handle(body: dict[str, Any]) -> dict[str, Any]:
        reply = handler(body)
        if isinstance(reply, str):
            reply = completion_body(reply) if "prompt" in body else chat_body(reply)
        reply = dict(reply)
        choice = reply["choices"][0]
        text = choice.get("text") or choice.get("message", {}).get("content", "")
        reply["usage"] = {
            "prompt_tokens": len(request_text(body)) // CHARS_PER_TOKEN,
            "completion_tokens": len(text) // CHARS_PER_TOKEN,
        }
        return reply

    return handle


def answer_by_prompt(body: dict[str, Any]) -> str:
    """Answer differently per prompt, so that no two candidates share a judge call."""
    return f"An answer, variant {digest(request_text(body)) % 100000}."


def score_by_request(body: dict[str, Any]) -> Any:
    """Score every requested aspect 2, 3 or 4 by a hash: never above the skip rule."""
    from tests.optimizer.fake_models import requested_aspects, scores_reply

    seed = digest(body.get("messages"))
    aspects = requested_aspects(body)
    return scores_reply(
        {aspect: 2 + (seed + index) % 3 for index, aspect in enumerate(aspects)}
    )


def chain_length(result: Any) -> int:
    """Count the dependent calls on the longest path through the recorded search."""
    calls = 2
    for previous, level in zip(result.levels, result.levels[1:], strict=False):
        skipped = sum(1 for event in result.skips if event.depth == level.depth)
        calls += 2 if skipped == len(previous.beam_ids) else 3
    return calls + (2 if result.heldout else 0)


async def measure(strategy: str, args: argparse.Namespace, fake: Any) -> Measurement:
    from gateway.prompting.builder import PromptBuilder
    from gateway.settings import InjectionMode
    from optimizer.client import ModelClient
    from optimizer.evaluate import Evaluator
    from optimizer.judge import LLMJudge
    from optimizer.proposer import LLMProposer
    from optimizer.search import BeamSearch, SearchSettings
    from optimizer.seeds import load_queries
    from optimizer.selector import LLMAspectSelector
    from optimizer.target import GatewayTarget

    settings = SearchSettings(
        strategy=strategy,  # type: ignore[arg-type]
        beam_size=args.beam_size,
        n_actions=args.n_actions,
        depth=args.depth,
        seed=args.seed,
    )
    endpoint = fake.endpoint()
    async with ModelClient(None, concurrency=args.concurrency) as client:
        target = GatewayTarget(
            client, endpoint, InjectionMode.BASE, PromptBuilder(), max_tokens=64
        )
        evaluator = Evaluator(
            target, LLMAspectSelector(client, endpoint), LLMJudge(client, endpoint)
        )
        search = BeamSearch(
            evaluator,
            LLMProposer(client, endpoint),
            settings,
            [],
            random.Random(settings.seed),
        )
        started = time.perf_counter()
        result = await search.run(INITIAL_PROMPT, load_queries())
        wall = time.perf_counter() - started
        usage = client.usage
    return Measurement(
        strategy=strategy,
        wall_seconds=wall,
        chain_calls=chain_length(result),
        calls={role: item.calls for role, item in usage.items()},
        tokens={
            role: item.prompt_tokens + item.completion_tokens
            for role, item in usage.items()
        },
    )


def report(measurements: list[Measurement], delay: float) -> None:
    print(
        f"{'strategy':<9} {'wall s':>7} {'bound s':>7} {'wall/bound':>10} "
        f"{'calls':>6} {'tokens':>8}  calls per role"
    )
    for item in measurements:
        bound = item.chain_calls * delay
        roles = ", ".join(
            f"{role} {count}" for role, count in sorted(item.calls.items())
        )
        print(
            f"{item.strategy:<9} {item.wall_seconds:>7.2f} {bound:>7.2f} "
            f"{item.wall_seconds / bound:>10.2f} {item.total_calls:>6} "
            f"{item.total_tokens:>8}  {roles}"
        )
    improved, faithful = measurements
    print(
        f"improved/faithful: calls {improved.total_calls / faithful.total_calls:.2f}x, "
        f"tokens {improved.total_tokens / faithful.total_tokens:.2f}x, "
        f"wall {improved.wall_seconds / faithful.wall_seconds:.2f}x"
    )
    for item in measurements:
        serial = item.total_calls * delay
        print(
            f"{item.strategy}: {item.chain_calls} dependent calls; one call at a "
            f"time would take {serial:.1f} s, {serial / item.wall_seconds:.1f}x the "
            "wall time"
        )


async def run(args: argparse.Namespace) -> list[Measurement]:
    from tests.optimizer.fake_models import (
        FakeModels,
        default_optimizer,
        default_selector,
    )

    fake = FakeModels(
        selector=with_estimated_usage(default_selector),
        judge=with_estimated_usage(score_by_request),
        optimizer=with_estimated_usage(default_optimizer),
        target=with_estimated_usage(answer_by_prompt),
        delay=args.delay,
    )
    with fake:
        return [
            await measure(strategy, args, fake) for strategy in ("improved", "faithful")
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=5, help="search levels")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per call")
    parser.add_argument("--beam-size", type=int, default=2)
    parser.add_argument("--n-actions", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=64, help="upstream calls in flight"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    report(asyncio.run(run(args)), args.delay)


if __name__ == "__main__":
    main()
