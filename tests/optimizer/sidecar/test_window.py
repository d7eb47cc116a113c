"""Samples to window queries: filters, deduplication, client cap and the split."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.sampling import Sample
from optimizer.sidecar.window import (
    build_window,
    is_heldout,
    normalize,
    sampled_query,
    split_queries,
)
from tests.optimizer.sidecar.scripted import sample

START = datetime(2025, 1, 1, tzinfo=UTC)


def timed(samples: list[Sample]) -> list[Sample]:
    """Give `samples` increasing times, one second apart, in list order."""
    return [
        item.model_copy(update={"time": START + timedelta(seconds=index)})
        for index, item in enumerate(samples)
    ]


def window_texts(samples: list[Sample], **options: Any) -> dict[str, list[str]]:
    options.setdefault("client_cap", 100)
    options.setdefault("max_chars", 1000)
    window = build_window(timed(samples), **options)
    return {
        model: [query.text for query in queries]
        for model, queries in window.queries.items()
    }


def test_duplicates_keep_one_query() -> None:
    samples = [
        sample("How do I boil an egg?"),
        sample("how do I   BOIL an egg?", client="client-b"),
        sample("Why is the sky blue?"),
    ]

    window = build_window(timed(samples), client_cap=100, max_chars=1000)

    texts = [query.text for query in window.queries["fake-model"]]
    assert texts == ["how do I   BOIL an egg?", "Why is the sky blue?"]
    assert window.facts.dropped == {"duplicate": 1}
    assert window.facts.kept == 2


def test_client_cap_keeps_newest_queries() -> None:
    samples = [sample(f"Question {index}?", client="busy") for index in range(5)]
    samples.append(sample("Another question?", client="quiet"))

    window = build_window(timed(samples), client_cap=2, max_chars=1000)

    texts = [query.text for query in window.queries["fake-model"]]
    assert texts == ["Question 3?", "Question 4?", "Another question?"]
    assert window.facts.dropped == {"client_cap": 3}
    assert window.facts.capped_clients == 1


def test_incomplete_samples_are_dropped() -> None:
    samples = [
        sample("A truncated answer?", outcome="truncated"),
        sample("A failed answer?", outcome="failed"),
        sample("A good one?"),
    ]

    window = build_window(timed(samples), client_cap=100, max_chars=1000)

    assert [q.text for q in window.queries["fake-model"]] == ["A good one?"]
    assert window.facts.dropped == {"incomplete": 2}


def test_conversation_must_end_with_user() -> None:
    ends_with_tool = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "sunny"},
    ]
    samples = [sample("", messages=ends_with_tool), sample("Kept?")]

    window = build_window(timed(samples), client_cap=100, max_chars=1000)

    assert [q.text for q in window.queries["fake-model"]] == ["Kept?"]
    assert window.facts.dropped == {"no_query": 1}


def test_last_user_message_is_query() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question?"},
        {"role": "assistant", "content": "First answer."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this picture."},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"type": "text", "text": "Be detailed."},
            ],
        },
    ]

    texts = window_texts([sample("", messages=conversation)])

    assert texts == {"fake-model": ["Describe this picture.\nBe detailed."]}


def test_completion_prompt_is_query() -> None:
    completion = sample("").model_copy(
        update={"route": "/v1/completions", "messages": None, "prompt": "Once upon"}
    )
    token_prompt = completion.model_copy(update={"prompt": [1, 2, 3]})

    window = build_window(timed([completion, token_prompt]), client_cap=9, max_chars=99)

    assert [q.text for q in window.queries["fake-model"]] == ["Once upon"]
    assert window.facts.dropped == {"no_query": 1}


def test_empty_and_long_queries_dropped() -> None:
    samples = [sample("   "), sample("x" * 51), sample("Short enough?")]

    window = build_window(timed(samples), client_cap=100, max_chars=50)

    assert [q.text for q in window.queries["fake-model"]] == ["Short enough?"]
    assert window.facts.dropped == {"no_query": 1, "too_long": 1}


def test_queries_grouped_by_model() -> None:
    samples = [
        sample("Same question?", model="model-a"),
        sample("Same question?", model="model-b"),
        sample("Unnamed model?", model=""),
    ]

    texts = window_texts(samples)

    assert texts == {"model-a": ["Same question?"], "model-b": ["Same question?"]}


def test_model_filter_drops_others() -> None:
    samples = [sample("Kept?", model="model-a"), sample("Other?", model="model-b")]

    window = build_window(
        timed(samples), client_cap=100, max_chars=1000, models=["model-a"]
    )

    assert list(window.queries) == ["model-a"]
    assert window.facts.dropped == {"other_model": 1}


def test_query_ids_stable_across_windows() -> None:
    first = sampled_query("How do I boil an egg?")
    again = sampled_query("how do i boil an EGG?  ")

    assert first.id == again.id
    assert first.id != sampled_query("How do I fry an egg?").id
    assert normalize(" A\tB  c ") == "a b c"


def test_split_is_stable_and_partial() -> None:
    queries = [sampled_query(f"Question number {index}?") for index in range(200)]

    search, heldout = split_queries(queries, 0.3)
    shuffled_search, shuffled_heldout = split_queries(list(reversed(queries)), 0.3)
    smaller_search, smaller_heldout = split_queries(queries[:50], 0.3)

    assert 40 <= len(heldout) <= 80
    assert len(search) + len(heldout) == 200
    assert {q.id for q in shuffled_heldout} == {q.id for q in heldout}
    assert {q.id for q in smaller_heldout} <= {q.id for q in heldout}
    assert {q.id for q in smaller_search} <= {q.id for q in search}
    assert not {q.id for q in search} & {q.id for q in heldout}
    assert is_heldout(heldout[0].id, 0.3)
    assert shuffled_search
