"""Canary review: live sampled answers judged by the real selector and judge."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.prompting.builder import PromptBuilder
from gateway.sampling.store import DiskSampleStore, Outcome, Sample, SampledChoice
from gateway.settings import InjectionMode
from gateway.store.base import Canary
from optimizer.client import ModelClient
from optimizer.evaluate import Evaluator
from optimizer.judge import LLMJudge
from optimizer.selector import LLMAspectSelector
from optimizer.sidecar.canary import (
    MAX_ANSWERS_PER_ARM,
    MAX_TEXT_CHARS,
    CanaryReview,
    CanarySettings,
    query_text,
    review_canary,
    sampled_query_id,
)
from optimizer.target import GatewayTarget
from tests.optimizer.fake_models import (
    FAKE_MODEL,
    FakeModels,
    Reply,
    json_reply,
    requested_aspects,
    scores_reply,
    tagged,
    texts,
)

STARTED = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
NOW = STARTED + timedelta(hours=1)
CANARY = Canary(model=None, version="v2", share=0.5, started_at=STARTED)
CONTROL = "v1"
SETTINGS = CanarySettings(min_samples=4, max_seconds=7200)
GOOD = "CANARY-GOOD answer."
PLAIN = "A plain answer."
UNSAFE_GOOD = "CANARY-GOOD UNSAFE answer."


def scripted_selector(body: dict[str, Any]) -> Reply:
    return json_reply(
        {
            "analysis": "A sampled request.",
            "aspects": ["Helpfulness", "Clarity", "Safety"],
            "reason": "The answer must help, read clearly and stay safe.",
        }
    )


def scripted_judge(body: dict[str, Any]) -> Reply:
    """Score CANARY-GOOD answers 5, others 3, and Safety 1 if UNSAFE, else 4."""
    answer = tagged(body, "answer")
    scores = {}
    for aspect in requested_aspects(body):
        if aspect == "Safety":
            scores[aspect] = 1 if "UNSAFE" in answer else 4
        else:
            scores[aspect] = 5 if "CANARY-GOOD" in answer else 3
    return scores_reply(scores)


@pytest.fixture
def fake() -> Iterator[FakeModels]:
    with FakeModels(selector=scripted_selector, judge=scripted_judge) as models:
        yield models


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[ModelClient]:
    model_client = ModelClient(tmp_path / "cache", concurrency=8, retry_delay=0)
    yield model_client
    await model_client.aclose()


def build_evaluator(fake: FakeModels, client: ModelClient) -> Evaluator:
    endpoint = fake.endpoint()
    target = GatewayTarget(client, endpoint, InjectionMode.CHAT, PromptBuilder())
    return Evaluator(
        target, LLMAspectSelector(client, endpoint), LLMJudge(client, endpoint)
    )


@pytest.fixture
def evaluator(fake: FakeModels, client: ModelClient) -> Evaluator:
    return build_evaluator(fake, client)


def chat_sample(
    version: str,
    answer: str,
    *,
    query: str = "How do I boil an egg?",
    minutes: float = 10,
    outcome: Outcome = "ok",
    model: str | None = FAKE_MODEL,
    messages: list[dict[str, Any]] | None = None,
) -> Sample:
    return Sample(
        time=STARTED + timedelta(minutes=minutes),
        route="/v1/chat/completions",
        client="client-1",
        model=model,
        prompt_version=version,
        messages=messages or [{"role": "user", "content": query}],
        choices=[SampledChoice(text=answer, finish_reason="stop")],
        latency_seconds=0.1,
        status=200,
        outcome=outcome,
        redacted=False,
    )


def arm(version: str, answer: str, count: int, start: int = 0) -> list[Sample]:
    """Return `count` samples of `version`, one minute apart, over three queries."""
    return [
        chat_sample(
            version,
            f"{answer} ({index})",
            query=f"Question {index % 3}?",
            minutes=10 + index,
        )
        for index in range(start, start + count)
    ]


async def review(
    samples: Sequence[Sample],
    evaluator: Evaluator,
    settings: CanarySettings = SETTINGS,
    now: datetime = NOW,
    canary: Canary = CANARY,
) -> CanaryReview:
    return await review_canary(canary, CONTROL, samples, evaluator, settings, now)


async def test_better_canary_promoted(fake: FakeModels, evaluator: Evaluator) -> None:
    samples = [*arm("v2", GOOD, 5), *arm("v1", PLAIN, 6)]

    result = await review(samples, evaluator)

    assert result.decision == "promote"
    assert result.canary.samples == 5
    assert result.control.samples == 6
    assert result.canary.reward == pytest.approx(14 / 3)
    assert result.control.reward == pytest.approx(10 / 3)
    assert result.canary.safety == 4.0
    assert "reward 4.67 vs control v1 3.33" in result.reason
    assert fake.calls_for("target") == []


async def test_equal_canary_promoted(fake: FakeModels, evaluator: Evaluator) -> None:
    samples = [*arm("v2", PLAIN, 4), *arm("v1", PLAIN, 4)]

    result = await review(samples, evaluator)

    assert result.decision == "promote"
    assert result.canary.reward == result.control.reward
    assert fake.calls_for("target") == []


async def test_worse_reward_rolled_back(fake: FakeModels, evaluator: Evaluator) -> None:
    samples = [*arm("v2", PLAIN, 4), *arm("v1", GOOD, 4)]

    result = await review(samples, evaluator)

    assert result.decision == "rollback"
    assert "reward 3.33 is below control v1 reward 4.67" in result.reason
    assert "margin 0.00" in result.reason
    assert fake.calls_for("target") == []


async def test_reward_within_margin_promoted(evaluator: Evaluator) -> None:
    samples = [*arm("v2", PLAIN, 4), *arm("v1", GOOD, 4)]
    settings = CanarySettings(min_samples=4, margin=1.5)

    result = await review(samples, evaluator, settings)

    assert result.decision == "promote"


async def test_safety_drop_rolled_back(fake: FakeModels, evaluator: Evaluator) -> None:
    samples = [*arm("v2", UNSAFE_GOOD, 4), *arm("v1", PLAIN, 4)]

    result = await review(samples, evaluator)

    assert result.canary.reward is not None
    assert result.control.reward is not None
    assert result.canary.reward > result.control.reward
    assert result.decision == "rollback"
    assert "safety 1.00 fell below control v1 safety 4.00" in result.reason
    assert "reward" not in result.reason
    assert fake.calls_for("target") == []


async def test_safety_within_tolerance_promoted(evaluator: Evaluator) -> None:
    samples = [*arm("v2", UNSAFE_GOOD, 4), *arm("v1", PLAIN, 4)]
    settings = CanarySettings(min_samples=4, safety_tolerance=3.0)

    result = await review(samples, evaluator, settings)

    assert result.decision == "promote"


async def test_few_samples_wait_without_calls(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    samples = [*arm("v2", GOOD, 3), *arm("v1", PLAIN, 10)]

    result = await review(samples, evaluator)

    assert result.decision == "wait"
    assert result.canary.samples == 3
    assert result.control.samples == 10
    assert result.canary.reward is None
    assert "canary v2 has 3 and control v1 has 10" in result.reason
    assert fake.calls == []


async def test_few_samples_after_timeout_rolled_back(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    samples = [*arm("v2", GOOD, 3), *arm("v1", PLAIN, 10)]
    late = STARTED + timedelta(seconds=SETTINGS.max_seconds + 1)

    result = await review(samples, evaluator, now=late)

    assert result.decision == "rollback"
    assert "not enough traffic" in result.reason
    assert "after 7201 s (limit 7200 s)" in result.reason
    # The timed-out review still judges, so its record contains the scores.
    assert result.canary.reward == pytest.approx(14 / 3)
    assert fake.calls_for("target") == []


async def test_at_timeout_exactly_still_waits(evaluator: Evaluator) -> None:
    samples = arm("v2", GOOD, 3)
    edge = STARTED + timedelta(seconds=SETTINGS.max_seconds)

    result = await review(samples, evaluator, now=edge)

    assert result.decision == "wait"


async def test_unscored_answers_wait(fake: FakeModels, evaluator: Evaluator) -> None:
    def judge(body: dict[str, Any]) -> Reply:
        if "UNREADABLE" in tagged(body, "answer"):
            return "I cannot score this."
        return scripted_judge(body)

    fake.judge = judge
    samples = [*arm("v2", GOOD, 3), *arm("v2", "UNREADABLE", 3, 3)]
    samples += arm("v1", PLAIN, 4)

    result = await review(samples, evaluator)

    assert result.decision == "wait"
    assert result.canary.samples == 6
    assert result.canary.scored == 3
    assert "canary v2 has 3 scored answers of 6" in result.reason


async def test_ignored_samples_not_judged(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    canary = CANARY.model_copy(update={"model": FAKE_MODEL})
    ignored = [
        chat_sample("v2", "UNSAFE truncated", outcome="truncated"),
        chat_sample("v2", "UNSAFE failed", outcome="failed"),
        chat_sample("v2", "UNSAFE early", minutes=-1),
        chat_sample("v2", "UNSAFE other model", model="other-model"),
        chat_sample("v2", "UNSAFE no model", model=None),
        chat_sample("v3", "UNSAFE other version"),
        chat_sample("v2", "   "),
        chat_sample("v2", "UNSAFE long", query="x" * (MAX_TEXT_CHARS + 1)),
        chat_sample("v2", "UNSAFE " + "y" * MAX_TEXT_CHARS),
        chat_sample(
            "v2",
            "UNSAFE prefill",
            messages=[
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Sure"},
            ],
        ),
    ]
    samples = [*ignored, *arm("v2", GOOD, 4), *arm("v1", PLAIN, 4)]

    result = await review(samples, evaluator, canary=canary)

    assert result.decision == "promote"
    assert result.canary.samples == 4
    assert result.canary.safety == 4.0
    judged = [tagged(call.body, "answer") for call in fake.calls_for("judge")]
    assert not any("UNSAFE" in answer for answer in judged)


async def test_started_at_boundary_included(evaluator: Evaluator) -> None:
    samples = [chat_sample("v2", GOOD, minutes=0), *arm("v1", PLAIN, 1)]
    settings = CanarySettings(min_samples=1)

    result = await review(samples, evaluator, settings)

    assert result.canary.samples == 1
    assert result.decision == "promote"


async def test_default_pointer_accepts_any_model(evaluator: Evaluator) -> None:
    samples = [
        chat_sample("v2", GOOD, model="model-a"),
        chat_sample("v2", GOOD, model=None),
        chat_sample("v1", PLAIN, model="model-b"),
    ]
    settings = CanarySettings(min_samples=1)

    result = await review(samples, evaluator, settings)

    assert result.canary.samples == 2
    assert result.control.samples == 1


async def test_arm_capped_at_newest_answers(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    # The oldest canary answers would score 3, the newest 100 score 5.
    old = arm("v2", PLAIN, 20)
    new = arm("v2", GOOD, MAX_ANSWERS_PER_ARM, start=20)
    samples = [*reversed(new), *old, *arm("v1", PLAIN, 4)]

    result = await review(samples, evaluator)

    assert result.canary.samples == MAX_ANSWERS_PER_ARM
    assert result.canary.reward == pytest.approx(14 / 3)
    assert len(fake.calls_for("judge")) == MAX_ANSWERS_PER_ARM + 4


async def test_later_review_hits_cache(
    fake: FakeModels, client: ModelClient, evaluator: Evaluator
) -> None:
    samples = [*arm("v2", GOOD, 4), *arm("v1", PLAIN, 4)]
    first = await review(samples, evaluator)
    sent = len(fake.calls)

    second = await review(samples, build_evaluator(fake, client))

    assert len(fake.calls) == sent
    assert second == first


async def test_judge_calls_run_concurrently(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    fake.delay = 0.05
    samples = [*arm("v2", GOOD, 4), *arm("v1", PLAIN, 4)]

    await review(samples, evaluator)

    assert fake.max_in_flight > 1


async def test_completion_and_content_list_judged(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    completion = chat_sample("v2", GOOD).model_copy(
        update={"route": "/v1/completions", "messages": None, "prompt": "Say hi."}
    )
    parts = chat_sample(
        "v1",
        PLAIN,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                    {"type": "text", "text": "this picture."},
                ],
            }
        ],
    )
    settings = CanarySettings(min_samples=1)

    result = await review([completion, parts], evaluator, settings)

    assert result.decision == "promote"
    queries = {tagged(call.body, "query") for call in fake.calls_for("judge")}
    assert queries == {"Say hi.", "Describe\nthis picture."}


def test_query_text_of_last_user_message() -> None:
    sample = chat_sample(
        "v1",
        PLAIN,
        messages=[
            {"role": "user", "content": "First."},
            {"role": "assistant", "content": "Reply."},
            {"role": "user", "content": "  Second.  "},
        ],
    )

    assert query_text(sample) == "Second."


def test_query_id_stable_per_text() -> None:
    assert sampled_query_id("Hello?") == sampled_query_id("Hello?")
    assert sampled_query_id("Hello?") != sampled_query_id("Hello!")


async def test_samples_from_disk_store_reviewed(
    tmp_path: Path, evaluator: Evaluator
) -> None:
    store = DiskSampleStore(tmp_path / "samples")
    for sample in [*arm("v2", GOOD, 4), *arm("v1", PLAIN, 4)]:
        store.add(sample)
    samples = store.recent(1000, since=CANARY.started_at)
    store.close()

    result = await review(samples, evaluator)

    assert result.decision == "promote"


async def test_canary_as_control_rejected(evaluator: Evaluator) -> None:
    with pytest.raises(ValueError, match="is the canary version itself"):
        await review_canary(CANARY, "v2", [], evaluator, SETTINGS, NOW)


@pytest.mark.parametrize(
    "values",
    [
        {"min_samples": 0},
        {"min_samples": MAX_ANSWERS_PER_ARM + 1},
        {"margin": -0.1},
        {"safety_tolerance": -1.0},
        {"max_seconds": 0},
    ],
)
def test_invalid_settings_rejected(values: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="canary"):
        CanarySettings(**values)


async def test_review_dict_is_json(evaluator: Evaluator) -> None:
    samples = [*arm("v2", GOOD, 4), *arm("v1", PLAIN, 4)]
    result = await review(samples, evaluator)

    payload = json.loads(json.dumps(result.to_dict()))

    assert payload["decision"] == "promote"
    assert payload["canary"]["version"] == "v2"
    assert payload["canary"]["scored"] == 4
    assert payload["control"]["reward"] == pytest.approx(10 / 3)
    assert payload["reason"] == result.reason


async def test_selector_called_once_per_query(
    fake: FakeModels, evaluator: Evaluator
) -> None:
    samples = [*arm("v2", GOOD, 6), *arm("v1", PLAIN, 6)]

    await review(samples, evaluator)

    selected = texts(fake.calls_for("selector"))
    assert len(selected) == 3
    assert len(set(selected)) == 3
