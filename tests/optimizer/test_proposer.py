"""LLMProposer: prompt proposals, their cleaning and fallback, and answer rewrites."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from optimizer.client import ModelClient
from optimizer.proposer import (
    MAX_PROMPT_CHARS,
    PROMPTS_SCHEMA_NAME,
    REWRITER_SYSTEM_PROMPT,
    LLMProposer,
)
from optimizer.types import (
    AspectScore,
    AspectSelection,
    Evaluation,
    Judgement,
    Proposer,
    Query,
    QueryKind,
)
from tests.optimizer.fake_models import (
    FakeModels,
    FakeReply,
    Reply,
    chat_reply,
    first_user_text,
    json_reply,
    requested_prompt_count,
    tagged,
)

CURRENT = "You are a helpful assistant."


def evaluation(query_id: str, text: str, scores: dict[str, int | None]) -> Evaluation:
    query = Query(query_id, text, "everyday", QueryKind.GENERAL)
    aspect_scores = tuple(
        AspectScore(name, score, f"{name} rationale of {query_id}.")
        for name, score in scores.items()
    )
    return Evaluation(
        query=query,
        answer=f"Answer to {query_id}.",
        selection=AspectSelection(query_id, "", tuple(scores), ""),
        judgement=Judgement(query_id, aspect_scores),
    )


GOOD = evaluation("good", "Name a prime number.", {"Clarity": 5, "Depth": 4})
BAD = evaluation("bad", "Explain tides.", {"Clarity": 5, "Factuality": 1})


@pytest.fixture
def fake() -> Iterator[FakeModels]:
    with FakeModels() as models:
        yield models


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ModelClient]:
    model_client = ModelClient(tmp_path / "cache", concurrency=4, retry_delay=0)
    yield model_client
    await model_client.aclose()


@pytest.fixture
def proposer(fake: FakeModels, client: ModelClient) -> LLMProposer:
    return LLMProposer(client, fake.endpoint())


async def test_one_call_returns_n_prompts(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    protocol: Proposer = proposer

    prompts = await protocol.propose_prompts(CURRENT, [GOOD, BAD], [], n=3)

    [call] = fake.calls_for("optimizer")
    assert len(prompts) == 3
    assert len(set(prompts)) == 3
    assert requested_prompt_count(call.body) == 3


async def test_request_uses_temperature_and_schema(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    await proposer.propose_prompts(CURRENT, [GOOD], [], n=2)

    [call] = fake.calls_for("optimizer")
    schema = call.body["response_format"]["json_schema"]
    assert call.body["temperature"] == 0.2
    assert schema["name"] == PROMPTS_SCHEMA_NAME
    assert schema["strict"] is True
    assert schema["schema"]["properties"]["prompts"]["maxItems"] == 2


async def test_unusable_prompts_dropped_then_refilled(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    def optimizer(request: dict[str, Any]) -> Reply:
        seed = request["seed"]
        if seed == 0:
            too_long = "x" * (MAX_PROMPT_CHARS + 1)
            candidates = ["", "...", too_long, "A", " A ", CURRENT]
            return json_reply({"prompts": candidates})
        return json_reply({"prompts": [f"Fallback {seed}"]})

    fake.optimizer = optimizer

    prompts = await proposer.propose_prompts(CURRENT, [BAD], [], n=3)

    calls = fake.calls_for("optimizer")
    assert prompts == ["A", "Fallback 1", "Fallback 2"]
    assert proposer.parse_failures == 0
    assert sorted(call.body["seed"] for call in calls) == [0, 1, 2]
    assert [requested_prompt_count(call.body) for call in calls[1:]] == [1, 1]


async def test_duplicate_fallbacks_give_fewer_prompts(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    fake.optimizer = lambda request: json_reply({"prompts": ["Same prompt."]})

    prompts = await proposer.propose_prompts(CURRENT, [BAD], [], n=3)

    assert prompts == ["Same prompt."]
    assert len(fake.calls_for("optimizer")) == 3
    assert proposer.parse_failures == 2


async def test_unparseable_reply_counted(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    fake.optimizer = lambda request: chat_reply("Here are some ideas: be nice.")

    prompts = await proposer.propose_prompts(CURRENT, [BAD], [], n=2)

    assert prompts == []
    assert proposer.parse_failures == 3


async def test_fenced_prompt_list_accepted(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    fake.optimizer = lambda request: chat_reply(
        '```json\n{"prompts": ["Be accurate.", "Be brief."]}\n```'
    )

    prompts = await proposer.propose_prompts(CURRENT, [BAD], [], n=2)

    assert prompts == ["Be accurate.", "Be brief."]


async def test_meta_prompt_puts_worst_first(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    history = ["Oldest prompt.", "Newer prompt."]

    await proposer.propose_prompts(CURRENT, [GOOD, BAD], history, n=1)

    text = first_user_text(fake.calls_for("optimizer")[0].body)
    assert tagged(fake.calls[0].body, "current_prompt") == CURRENT
    assert text.index("Explain tides.") < text.index("Name a prime number.")
    assert text.index("Factuality (1/5)") < text.index("Clarity (5/5)")
    assert "Factuality rationale of bad." in text
    assert text.index("Oldest prompt.") < text.index("Newer prompt.")


async def test_missing_score_shown_last(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    partial = evaluation("p", "Plan a trip.", {"Depth": None, "Clarity": 2})

    await proposer.propose_prompts(CURRENT, [partial], [], n=1)

    text = first_user_text(fake.calls[0].body)
    assert text.index("Clarity (2/5)") < text.index("Depth (no score)")


async def test_zero_prompts_sends_nothing(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    assert await proposer.propose_prompts(CURRENT, [BAD], [], n=0) == []
    assert fake.calls == []


async def test_rewrite_returns_answer_text(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    fake.optimizer = lambda request: chat_reply("\n  Tides come from the Moon.  \n")

    answer = await proposer.rewrite_answer(BAD.query, BAD.answer, BAD.judgement)

    [call] = fake.calls_for("optimizer")
    assert answer == "Tides come from the Moon."
    assert call.body["messages"][0]["content"] == REWRITER_SYSTEM_PROMPT
    assert tagged(call.body, "answer") == BAD.answer
    assert "Factuality (1/5): Factuality rationale of bad." in first_user_text(
        call.body
    )


async def test_rewrite_without_text_returns_empty(
    fake: FakeModels, proposer: LLMProposer
) -> None:
    fake.optimizer = lambda request: FakeReply(200, {"error": {"message": "busy"}})

    answer = await proposer.rewrite_answer(BAD.query, BAD.answer, BAD.judgement)

    assert answer == ""
    assert proposer.parse_failures == 1


def test_rewrite_echoing_tags_is_unwrapped() -> None:
    from optimizer.proposer import _strip_echoed_tags

    echoed = "<answer>\n1. Remove the stain.\n</answer>\n\n<critique>\nToo short."

    assert _strip_echoed_tags(echoed) == "1. Remove the stain."
    assert _strip_echoed_tags("A plain rewrite.") == "A plain rewrite."
