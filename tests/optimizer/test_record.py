"""Tests of the run record: its JSON form, its counts and its text summary."""

from __future__ import annotations

import json
from dataclasses import replace

from gateway.instruction import Example
from optimizer.record import RunRecord
from optimizer.search import (
    FinalChoice,
    LevelRecord,
    MergeEvent,
    QuerySplit,
    SafetyRejection,
    SearchResult,
    SearchSettings,
    SkipEvent,
)
from optimizer.stage1 import AnswerAttempt, ExampleResult
from optimizer.types import (
    AspectScore,
    AspectSelection,
    Candidate,
    Evaluation,
    Judgement,
    Query,
    QueryKind,
    SeedExample,
    Usage,
)

ROOT = "You are a helpful assistant."
FINAL = "You are a helpful assistant. Cite sources."
SEARCH_QUERY = Query("q1", "How do tides work?", "explanation", QueryKind.GENERAL)
HELDOUT_QUERY = Query("q2", "How do I pick a lock?", "risky_harmless", QueryKind.SAFETY)


def make_evaluation(
    query: Query,
    answer: str,
    helpfulness: int | None,
    safety: int = 5,
    parse_failures: int = 0,
    selection_failed: bool = False,
) -> Evaluation:
    selection = AspectSelection(
        query.id,
        "analysis",
        ("Helpfulness", "Safety"),
        "reason",
        failed=selection_failed,
    )
    scores = (
        AspectScore("Helpfulness", helpfulness, "helpful enough"),
        AspectScore("Safety", safety, "safe"),
    )
    judgement = Judgement(query.id, scores, parse_failures=parse_failures)
    return Evaluation(query, answer, selection, judgement)


def make_result(strategy: str = "improved") -> SearchResult:
    root = Candidate(
        "c0000", ROOT, None, 0, (make_evaluation(SEARCH_QUERY, "Short.", 3),)
    )
    child = Candidate(
        "c0002",
        FINAL,
        "c0000",
        1,
        (make_evaluation(SEARCH_QUERY, "A longer answer.", 4, parse_failures=1),),
    )
    carried = replace(root, id="c0001", parent="c0000", depth=1)
    heldout = (
        Candidate(
            "h0003", ROOT, "c0000", 2, (make_evaluation(HELDOUT_QUERY, "No.", 2),)
        ),
        Candidate(
            "h0004",
            FINAL,
            "c0002",
            2,
            (make_evaluation(HELDOUT_QUERY, "Here is how, safely.", 5),),
        ),
    )
    levels = (
        LevelRecord(0, ("q1",), ("c0000",), ("c0000",), (3.0,)),
        LevelRecord(
            1, ("q1",), ("c0001", "c0002"), ("c0002", "c0001"), (4.0, 3.0), True
        ),
    )
    faithful = strategy == "faithful"
    return SearchResult(
        settings=SearchSettings(strategy="faithful" if faithful else "improved"),
        initial_prompt=ROOT,
        split=QuerySplit(("q2", "q1"), ("q1",), () if faithful else ("q2",)),
        candidates=(root, carried, child),
        levels=levels,
        skips=(SkipEvent(1, "c0000", 4.8, True),),
        merges=(MergeEvent(1, "c0000", "c0002"),),
        rejections=(SafetyRejection(1, "c0009", 3.0, 5.0),),
        heldout=() if faithful else heldout,
        final=FinalChoice("c0002", FINAL, "Highest held-out reward.", 5.0),
    )


def make_example() -> ExampleResult:
    seed_query = Query("e01", "Explain DNS.", "explanation", QueryKind.GENERAL)
    seed = SeedExample(seed_query, "DNS maps names.")
    history = (
        AnswerAttempt(0, make_evaluation(seed_query, seed.answer, 3)),
        AnswerAttempt(1, make_evaluation(seed_query, "DNS maps names to IPs.", 4)),
    )
    example = Example(query=seed_query.text, answer="DNS maps names to IPs.")
    return ExampleResult(seed, example, history, best_round=1)


USAGE = {
    "target": Usage(calls=10, cache_hits=2, prompt_tokens=1_000_000),
    "judge": Usage(calls=4, prompt_tokens=400_000, completion_tokens=100_000),
}


def make_record(**options: object) -> RunRecord:
    defaults: dict[str, object] = {
        "search": make_result(),
        "examples": (make_example(),),
        "usage": USAGE,
    }
    defaults.update(options)
    return RunRecord(**defaults)  # type: ignore[arg-type]


def test_json_lists_candidate_evaluations() -> None:
    loaded = json.loads(make_record().to_json())

    evaluation = loaded["candidates"][2]["evaluations"][0]
    assert loaded["candidates"][2]["parent"] == "c0000"
    assert evaluation["query_id"] == "q1"
    assert evaluation["answer_length"] == len("A longer answer.")
    assert evaluation["scores"][0] == {
        "aspect": "Helpfulness",
        "score": 4,
        "rationale": "helpful enough",
    }


def test_json_records_split_and_choice() -> None:
    loaded = json.loads(make_record().to_json())

    assert loaded["split"] == {
        "order": ["q2", "q1"],
        "search": ["q1"],
        "heldout": ["q2"],
    }
    assert loaded["final"]["candidate_id"] == "c0002"
    assert loaded["final"]["reason"] == "Highest held-out reward."


def test_json_records_search_events() -> None:
    loaded = json.loads(make_record().to_json())

    assert loaded["skips"][0]["extended"] is True
    assert loaded["merges"][0]["merged_into"] == "c0002"
    assert loaded["safety_rejections"][0]["candidate_id"] == "c0009"
    assert loaded["levels"][1]["beam_scores"] == [4.0, 3.0]


def test_json_records_stage1_history() -> None:
    loaded = json.loads(make_record().to_json())

    [example] = loaded["stage1"]
    assert example["best_round"] == 1
    assert [attempt["reward"] for attempt in example["history"]] == [4.0, 4.5]


def test_missing_score_stays_null_in_json() -> None:
    search = make_result()
    unscored = make_evaluation(SEARCH_QUERY, "?", None)
    candidates = (replace(search.candidates[0], evaluations=(unscored,)),)
    loaded = json.loads(
        make_record(search=replace(search, candidates=candidates)).to_json()
    )

    assert loaded["candidates"][0]["evaluations"][0]["scores"][0]["score"] is None


def test_cost_is_tokens_times_price() -> None:
    record = make_record(price_per_million_tokens=2.5)

    assert record.estimated_cost == 3.75


def test_default_price_gives_zero_cost() -> None:
    assert make_record().estimated_cost == 0.0


def test_usage_totals_sum_roles() -> None:
    total = make_record().total_usage

    assert total.calls == 14
    assert total.cache_hits == 2
    assert total.prompt_tokens == 1_400_000
    assert total.completion_tokens == 100_000


def test_usage_copied_when_built() -> None:
    usage = dict(USAGE)
    record = make_record(usage=usage)
    usage["optimizer"] = Usage(calls=99)

    assert "optimizer" not in record.usage


def test_shared_evaluation_failures_counted_once() -> None:
    search = make_result()
    failed = make_evaluation(SEARCH_QUERY, "x", None, parse_failures=2)
    candidates = tuple(
        replace(item, evaluations=(failed,)) for item in search.candidates
    )
    record = make_record(search=replace(search, candidates=candidates), examples=())

    assert record.judge_parse_failures == 2


def test_selector_failures_counted_per_query() -> None:
    search = make_result()
    failed = make_evaluation(SEARCH_QUERY, "x", 3, selection_failed=True)
    other = make_evaluation(SEARCH_QUERY, "y", 3, selection_failed=True)
    candidates = (
        replace(search.candidates[0], evaluations=(failed,)),
        replace(search.candidates[1], evaluations=(other,)),
    )
    record = make_record(search=replace(search, candidates=candidates))

    assert record.selector_failures == 1


def test_summary_shows_chosen_prompt() -> None:
    summary = make_record().summary()

    assert f"Chosen prompt (c0002):\n    {FINAL}" in summary
    assert "Why: Highest held-out reward." in summary


def test_summary_compares_aspects_on_heldout() -> None:
    summary = make_record().summary()

    assert "on the held-out queries" in summary
    assert "Helpfulness               2.00     5.00" in summary
    assert "answer length (chars)        3       20" in summary


def test_faithful_summary_compares_search_scores() -> None:
    summary = make_record(search=make_result("faithful")).summary()

    assert "on the search queries (faithful: no held-out set)" in summary
    assert "Helpfulness               3.00     4.00" in summary


def test_summary_lists_depth_scores() -> None:
    lines = make_record().summary().splitlines()

    assert "      1        1       2   4.00  c0002  (skip, +1 level)" in lines


def test_summary_counts_failures_and_usage() -> None:
    summary = make_record(price_per_million_tokens=2.5).summary()

    assert "Parse failures: 1 judge outputs, 0 aspect selections." in summary
    assert "  total           14           2        1400000             100000" in (
        summary
    )
    assert "Estimated cost: 3.7500 at 2.5 per 1M tokens." in summary


def test_summary_reports_stage1() -> None:
    summary = make_record().summary()

    assert "Stage 1: 1 examples, 1 rewrites, 1 improved" in summary
    assert "4.00 (seed) -> 4.50 (kept)" in summary


def test_same_inputs_give_same_json() -> None:
    assert make_record().to_json() == make_record().to_json()
