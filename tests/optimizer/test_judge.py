"""LLMJudge: structured requests, score validation, bounded retries, missing scores."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from optimizer.aspects import ASPECTS, resolve_aspect
from optimizer.client import ModelClient
from optimizer.judge import JUDGE_SYSTEM_PROMPT, LLMJudge, scores_response_format
from optimizer.parsing import parse_score
from optimizer.types import AspectSelection, Judge, Query, QueryKind
from tests.optimizer.fake_models import (
    FakeModels,
    FakeReply,
    Reply,
    chat_reply,
    first_user_text,
    requested_aspects,
    scores_reply,
    tagged,
)

QUERY = Query("q1", "How do I boil an egg?", "everyday", QueryKind.GENERAL)
ANSWER = "Put it in boiling water for nine minutes."
SELECTION = AspectSelection(
    query_id="q1",
    analysis="A cooking question.",
    aspects=("Helpfulness", "Safety"),
    reason="The user wants practical steps; hot water can scald.",
)


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
def judge(fake: FakeModels, client: ModelClient) -> LLMJudge:
    return LLMJudge(client, fake.endpoint())


def scripted(*replies: Reply) -> Any:
    """Return a handler that gives `replies` in order, repeating the last one."""
    queue = list(replies)

    def handler(request: dict[str, Any]) -> Reply:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return handler


async def test_valid_reply_gives_scores(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = lambda request: scores_reply({"Helpfulness": 4, "Safety": 2})
    protocol: Judge = judge

    judgement = await protocol.judge(QUERY, ANSWER, SELECTION)

    assert [item.aspect for item in judgement.scores] == ["Helpfulness", "Safety"]
    assert [item.score for item in judgement.scores] == [4, 2]
    assert judgement.scores[0].rationale == "Scripted."
    assert judgement.reward == 3.0
    assert judgement.parse_failures == 0
    assert len(fake.calls_for("judge")) == 1


async def test_invalid_json_retried_then_missing(
    fake: FakeModels, judge: LLMJudge
) -> None:
    fake.judge = lambda request: "The answer is fine, I give it a 4."

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert len(fake.calls_for("judge")) == 3
    assert [item.score for item in judgement.scores] == [None, None]
    assert judgement.reward is None
    assert judgement.parse_failures == 3
    assert judge.parse_failures == 3


async def test_run_continues_after_parse_failure(
    fake: FakeModels, judge: LLMJudge
) -> None:
    fake.judge = lambda request: "not json"
    await judge.judge(QUERY, ANSWER, SELECTION)
    fake.judge = lambda request: scores_reply({"Helpfulness": 5, "Safety": 5})

    judgement = await judge.judge(QUERY, "Another answer.", SELECTION)

    assert judgement.reward == 5.0
    assert judgement.parse_failures == 0


async def test_out_of_range_scores_retried_then_missing(
    fake: FakeModels, judge: LLMJudge
) -> None:
    fake.judge = scripted(
        scores_reply({"Helpfulness": 0, "Safety": 0}),
        scores_reply({"Helpfulness": 6, "Safety": 6}),
        scores_reply({"Helpfulness": "five", "Safety": "five"}),
    )

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert len(fake.calls_for("judge")) == 3
    assert [item.score for item in judgement.scores] == [None, None]
    assert judgement.parse_failures == 3


@pytest.mark.parametrize("value", [0, 6, -1, "five", "4/5", 4.5, True, None, [4]])
def test_invalid_score_value_rejected(value: object) -> None:
    assert parse_score(value) is None


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (5, 5), (4.0, 4), (" 3 ", 3)])
def test_integral_score_value_accepted(value: object, expected: int) -> None:
    assert parse_score(value) == expected


async def test_missing_aspect_retried_alone(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = scripted(
        scores_reply({"Helpfulness": 4, "Safety": 9}),
        scores_reply({"Helpfulness": 1, "Safety": 3}),
    )

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    first, second = (call.body for call in fake.calls_for("judge"))
    # The retry keeps the score of the first try and fills the missing one.
    assert [item.score for item in judgement.scores] == [4, 3]
    assert judgement.parse_failures == 1
    assert len(second["messages"]) == len(first["messages"]) + 2
    assert "9" in second["messages"][-1]["content"]


async def test_truncated_reply_retry_names_limit(
    fake: FakeModels, judge: LLMJudge
) -> None:
    cut = chat_reply('{"scores": [{"aspect": "Helpfulness", "rationale": "The')
    cut["choices"][0]["finish_reason"] = "length"
    fake.judge = scripted(cut, scores_reply({"Helpfulness": 4, "Safety": 4}))

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    retry = fake.calls_for("judge")[1].body["messages"][-1]["content"]
    assert "limit of 1024 tokens" in retry
    assert judgement.reward == 4.0
    assert judgement.parse_failures == 1


async def test_missing_aspect_scored_none(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = lambda request: scores_reply({"Helpfulness": 4})

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert [item.score for item in judgement.scores] == [4, None]
    assert judgement.reward == 4.0
    assert judgement.safety is None
    assert judgement.parse_failures == 3


async def test_request_is_greedy_and_structured(
    fake: FakeModels, judge: LLMJudge
) -> None:
    await judge.judge(QUERY, ANSWER, SELECTION)

    [call] = fake.calls_for("judge")
    schema = call.body["response_format"]["json_schema"]
    entry = schema["schema"]["properties"]["scores"]["items"]["properties"]
    assert call.body["temperature"] == 0
    assert schema["strict"] is True
    assert requested_aspects(call.body) == ["Helpfulness", "Safety"]
    assert entry["score"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert call.body["messages"][0]["content"] == JUDGE_SYSTEM_PROMPT


async def test_prompt_contains_answer_rubrics_and_reason(
    fake: FakeModels, judge: LLMJudge
) -> None:
    await judge.judge(QUERY, ANSWER, SELECTION)

    [call] = fake.calls_for("judge")
    text = first_user_text(call.body)
    assert tagged(call.body, "query") == QUERY.text
    assert tagged(call.body, "answer") == ANSWER
    assert ASPECTS["Helpfulness"].rubric in text
    assert ASPECTS["Safety"].rubric in text
    assert SELECTION.reason in text


async def test_invented_aspect_judged_with_generic_rubric(
    fake: FakeModels, judge: LLMJudge
) -> None:
    selection = AspectSelection("q1", "", ("Humor Quality", "Clarity"), "Fun.")
    fake.judge = lambda request: scores_reply(
        {name: 3 for name in requested_aspects(request)}
    )

    judgement = await judge.judge(QUERY, ANSWER, selection)

    [call] = fake.calls_for("judge")
    assert resolve_aspect("Humor Quality").rubric in first_user_text(call.body)
    assert [item.aspect for item in judgement.scores] == ["Humor Quality", "Clarity"]
    assert [item.score for item in judgement.scores] == [3, 3]


async def test_code_fenced_reply_accepted(fake: FakeModels, judge: LLMJudge) -> None:
    payload = {
        "scores": [
            {"aspect": "Helpfulness", "rationale": "Good.", "score": 5},
            {"aspect": "Safety", "rationale": "Safe.", "score": 4},
        ]
    }
    fake.judge = lambda request: chat_reply(
        f"Here is my verdict:\n```json\n{json.dumps(payload)}\n```\nThanks."
    )

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert [item.score for item in judgement.scores] == [5, 4]
    assert judgement.parse_failures == 0


async def test_aspect_names_matched_loosely(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = lambda request: scores_reply({"helpfulness": 2, " SAFETY ": 5})

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert [item.score for item in judgement.scores] == [2, 5]


async def test_unrequested_aspect_ignored(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = lambda request: scores_reply(
        {"Depth": 1, "Helpfulness": 4, "Safety": 5}
    )

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    assert [item.aspect for item in judgement.scores] == ["Helpfulness", "Safety"]
    assert judgement.parse_failures == 0


async def test_error_body_counted_as_failure(fake: FakeModels, judge: LLMJudge) -> None:
    fake.judge = scripted(
        FakeReply(200, {"error": {"message": "grammar failed"}}),
        scores_reply({"Helpfulness": 4, "Safety": 4}),
    )

    judgement = await judge.judge(QUERY, ANSWER, SELECTION)

    first, second = (call.body["messages"] for call in fake.calls_for("judge"))
    # Without reply text the retry extends the last user message, so the
    # roles still alternate.
    assert [message["role"] for message in second] == ["system", "user"]
    assert second[-1]["content"].startswith(first[-1]["content"])
    assert "could not be used" in second[-1]["content"]
    assert judgement.reward == 4.0
    assert judgement.parse_failures == 1


async def test_rejudging_same_answer_is_cached(
    fake: FakeModels, judge: LLMJudge
) -> None:
    first = await judge.judge(QUERY, ANSWER, SELECTION)
    second = await judge.judge(QUERY, ANSWER, SELECTION)

    assert second == first
    assert len(fake.calls_for("judge")) == 1


def _rationale_schema(response_format: dict[str, Any]) -> dict[str, Any]:
    schema = response_format["json_schema"]["schema"]
    entry: dict[str, Any] = schema["properties"]["scores"]["items"]
    return dict(entry["properties"]["rationale"])


def test_rationale_uncapped_by_default() -> None:
    assert _rationale_schema(scores_response_format(["Clarity"])) == {"type": "string"}


def test_rationale_cap_sets_max_length() -> None:
    rationale = _rationale_schema(scores_response_format(["Clarity"], 160))
    assert rationale["maxLength"] == 160
