"""LLMAspectSelector: parsing, name mapping, clamping, retries and caching."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from optimizer.aspects import resolve_aspect, selector_menu
from optimizer.client import ModelClient
from optimizer.judge import LLMJudge
from optimizer.selector import (
    SELECTION_SCHEMA_NAME,
    LLMAspectSelector,
    clamp_aspects,
)
from optimizer.types import AspectSelector, Query, QueryKind
from tests.optimizer.fake_models import (
    FakeModels,
    chat_reply,
    first_user_text,
    json_reply,
    requested_aspects,
    scores_reply,
    tagged,
)

GENERAL = Query("q1", "Write a limerick about my cat.", "writing", QueryKind.GENERAL)
HARMFUL = Query("q2", "How do I pick my neighbour's lock?", "harmful", QueryKind.SAFETY)


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
def selector(fake: FakeModels, client: ModelClient) -> LLMAspectSelector:
    return LLMAspectSelector(client, fake.endpoint())


def selection_reply(aspects: list[Any], reason: str = "Because.") -> Any:
    return json_reply({"analysis": "Analysis.", "aspects": aspects, "reason": reason})


async def test_valid_reply_gives_selection(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["Creativity", "Compliance"])
    protocol: AspectSelector = selector

    selection = await protocol.select(GENERAL)

    assert selection.query_id == "q1"
    assert selection.aspects == ("Creativity", "Compliance")
    assert selection.analysis == "Analysis."
    assert selection.reason == "Because."
    assert selection.failed is False


async def test_aspect_objects_accepted(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(
        [{"name": "Depth"}, {"name": "Clarity"}]
    )

    selection = await selector.select(GENERAL)

    assert selection.aspects == ("Depth", "Clarity")


async def test_misspelt_aspect_mapped_to_bank(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["helpfullness", "clarity"])

    selection = await selector.select(GENERAL)

    assert selection.aspects == ("Helpfulness", "Clarity")


async def test_placeholder_aspect_names_skipped(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["...", "Depth", " "])

    selection = await selector.select(GENERAL)

    assert selection.aspects == ("Depth", "Helpfulness")


async def test_invented_aspect_kept_and_judged(
    fake: FakeModels, client: ModelClient, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["Rhyme Quality", "Creativity"])
    fake.judge = lambda request: scores_reply(
        dict.fromkeys(requested_aspects(request), 4)
    )

    selection = await selector.select(GENERAL)
    judgement = await LLMJudge(client, fake.endpoint()).judge(
        GENERAL, "There once was a cat.", selection
    )

    [judge_call] = fake.calls_for("judge")
    assert selection.aspects == ("Rhyme Quality", "Creativity")
    assert resolve_aspect("Rhyme Quality").rubric in first_user_text(judge_call.body)
    assert [item.score for item in judgement.scores] == [4, 4]


async def test_single_aspect_padded_to_two(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["Creativity"])

    selection = await selector.select(GENERAL)

    assert selection.aspects == ("Creativity", "Helpfulness")


async def test_long_list_cut_to_five(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    names = ["Depth", "Clarity", "Creativity", "Empathy", "Factuality", "Safety"]
    fake.selector = lambda request: selection_reply(names)

    selection = await selector.select(GENERAL)

    assert selection.aspects == tuple(names[:5])


async def test_safety_query_always_gets_safety(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: selection_reply(["Helpfulness", "Clarity"])

    selection = await selector.select(HARMFUL)

    assert selection.aspects == ("Safety", "Helpfulness", "Clarity")


async def test_unusable_reply_retried_then_default(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    fake.selector = lambda request: chat_reply("I think Helpfulness matters.")

    selection = await selector.select(HARMFUL)

    calls = fake.calls_for("selector")
    assert len(calls) == 3
    assert len({len(call.body["messages"]) for call in calls}) == 3
    assert selection.failed is True
    assert selection.aspects == ("Safety", "Helpfulness")
    assert selector.parse_failures == 3
    assert selector.failures == 1


async def test_empty_aspect_list_retried(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    replies = [selection_reply([]), selection_reply(["Empathy", "Clarity"])]
    fake.selector = lambda request: replies.pop(0)

    selection = await selector.select(GENERAL)

    assert selection.aspects == ("Empathy", "Clarity")
    assert selector.parse_failures == 1
    assert selector.failures == 0


async def test_selection_cached_per_query_id(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    first = await selector.select(GENERAL)
    second = await selector.select(GENERAL)

    assert second is first
    assert len(fake.calls_for("selector")) == 1


async def test_selection_cached_across_runs(fake: FakeModels, tmp_path: Path) -> None:
    for _ in range(2):
        async with ModelClient(tmp_path / "cache", concurrency=2) as client:
            await LLMAspectSelector(client, fake.endpoint()).select(GENERAL)

    assert len(fake.calls_for("selector")) == 1


async def test_request_is_greedy_with_menu(
    fake: FakeModels, selector: LLMAspectSelector
) -> None:
    await selector.select(GENERAL)

    [call] = fake.calls_for("selector")
    response_format = call.body["response_format"]
    assert call.body["temperature"] == 0
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == SELECTION_SCHEMA_NAME
    assert response_format["json_schema"]["strict"] is True
    assert selector_menu() in call.body["messages"][0]["content"]
    assert tagged(call.body, "query") == GENERAL.text


@pytest.mark.parametrize(
    ("aspects", "kind", "expected"),
    [
        ((), QueryKind.GENERAL, ("Helpfulness", "Clarity")),
        (("Clarity",), QueryKind.GENERAL, ("Clarity", "Helpfulness")),
        (("Depth", "Depth"), QueryKind.HARD, ("Depth", "Helpfulness")),
        ((), QueryKind.SAFETY, ("Safety", "Helpfulness")),
        (
            ("A", "B", "C", "D", "E"),
            QueryKind.SAFETY,
            ("Safety", "A", "B", "C", "D"),
        ),
        (("Safety", "Empathy"), QueryKind.SAFETY, ("Safety", "Empathy")),
    ],
)
def test_clamp_aspects_bounds_count(
    aspects: tuple[str, ...], kind: QueryKind, expected: tuple[str, ...]
) -> None:
    assert clamp_aspects(aspects, kind) == expected


def test_reply_field_names_are_not_aspects() -> None:
    from optimizer.selector import parse_selection

    parsed = parse_selection(
        '{"analysis": "...", "aspects": ["reason", "Analysis", "Helpfulness"], '
        '"reason": "..."}'
    )

    assert not isinstance(parsed, str)
    assert parsed.aspects == ("Helpfulness",)


def test_only_field_names_is_unusable() -> None:
    from optimizer.selector import parse_selection

    parsed = parse_selection('{"aspects": ["reason", "analysis"]}')

    assert isinstance(parsed, str)
