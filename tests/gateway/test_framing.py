"""Tests of the base-mode stop strings and the answer trimmer."""

from __future__ import annotations

import itertools
import random

import pytest

from gateway.errors import InvalidRequestError
from gateway.prompting import END, START, AnswerTrimmer, base_stop_strings, trim_answer

# Run-on answers shaped like the ones a small base model writes after the
# framing: a new <START> without a header, a closed section and a new query,
# Markdown and bold variants of the headers, and an answer that never stops.
RUN_ON_SAMPLES = [
    (
        "Canberra is the capital of Australia.\n\n<START>\nIt is a planned city.",
        "Canberra is the capital of Australia.",
    ),
    (
        "<START>\nBitcoin prices change every minute.\n<START>\nCheck an exchange.",
        "Bitcoin prices change every minute.",
    ),
    (
        "<START>\n<START>\n<START>\n\n# Query:\nWhy is the sky blue?",
        "",
    ),
    (
        "Paris is the capital of France.\n<END>\n\n# Query:\n"
        "What is the capital of Spain?\n\n# Answer:\n<START>\nMadrid.",
        "Paris is the capital of France.",
    ),
    (
        "\n  Photosynthesis turns light into chemical energy.\n\n# Query:\n"
        "What is respiration?",
        "Photosynthesis turns light into chemical energy.",
    ),
    (
        "Here are three tips:\n1. Sleep well.\n2. Drink water.\n\n"
        "## Query: How do I stay focused?\n## Answer: Turn off notifications.",
        "Here are three tips:\n1. Sleep well.\n2. Drink water.",
    ),
    (
        "2 + 2 = 4.\n\n**Query:** What is 3 + 3?\n**Answer:** 6",
        "2 + 2 = 4.",
    ),
    (
        "Use a hash map.\nQuery: How do I sort a list?\nAnswer: Call sorted().",
        "Use a hash map.",
    ),
    (
        "Water boils at 100 °C at sea level.<END><START>\n# Query",
        "Water boils at 100 °C at sea level.",
    ),
    (
        "Water boils at 100 °C.\n\n# Answer:\n<START>\nWater boils at 100 °C."
        "\n\n# Answer:\n<START>\nWater boils at 100 °C.\n\n# Answer:\n<START>\n",
        "Water boils at 100 °C.",
    ),
    (
        "The mitochondria is the powerhouse of the cell.\n\n# Instructions\n\n"
        "You are a helpful assistant.",
        "The mitochondria is the powerhouse of the cell.",
    ),
    (
        "It depends on the load.\n\n#Query:\nAnd at night?",
        "It depends on the load.",
    ),
    (
        "Yes, you can.\n\n# QUERY:\nwhy?",
        "Yes, you can.",
    ),
    (
        "The limit is 5 MB.<end>",
        "The limit is 5 MB.",
    ),
    (
        "Istanbul is spelled İstanbul in Turkish.  \n# Query:\nnext",
        "Istanbul is spelled İstanbul in Turkish.",
    ),
    (
        "Max tokens ran out here.\n<EN",
        "Max tokens ran out here.",
    ),
    (
        "Max tokens ran out in a header.\n\n# Que",
        "Max tokens ran out in a header.",
    ),
]

# Legitimate answers that contain marker-like text away from a line start,
# or headings that only look similar.
LEGITIMATE_SAMPLES = [
    "The answer: 42",
    "So the final answer: yes.",
    "```markdown\n## Queries in SQL\nSELECT 1;\n```",
    "# Query optimization\nAdd an index on the join column.",
    "## Instructions\n1. Preheat the oven.\n2. Bake for 20 minutes.",
    "Wrap it in <em>tags</em> and use a <b>bold</b> word.",
    "Pick the option that fits:\nA",
    "This is **important**: back up first.",
    "Answers vary.\nQuery languages such as SQL differ.",
]

# Answers that begin with an echo of the open section's <START>.
ECHO_SAMPLES = [
    ("<START>\nSydney is the largest city.", "Sydney is the largest city."),
    ("\n<start>\n\n<START>\nTwo echoes.", "Two echoes."),
    ("<START>\n<START>\n<START>\n<START>\n", ""),
    ("<STA", ""),
    ("<STAR is not an echo.", "<STAR is not an echo."),
]

SAMPLES = [
    *(text for text, _ in RUN_ON_SAMPLES),
    *LEGITIMATE_SAMPLES,
    *(text for text, _ in ECHO_SAMPLES),
]


def stream(text: str, cuts: list[int], prefill: str = "") -> str:
    trimmer = AnswerTrimmer(prefill)
    bounds = [0, *cuts, len(text)]
    pieces = [trimmer.feed(text[a:b]) for a, b in itertools.pairwise(bounds)]
    return "".join(pieces) + trimmer.finish()


def test_stop_strings_start_with_end() -> None:
    assert base_stop_strings(None)[0] == END


def test_stop_strings_cover_section_starts() -> None:
    stops = base_stop_strings(None)

    assert "\n# Query:" in stops
    assert "\n# Answer:" in stops
    assert f"\n{START}" in stops


def test_stop_strings_append_client_stops_in_order() -> None:
    stops = base_stop_strings(["###", END, "Q:", "###", ""])

    assert stops == [END, "\n# Query:", "\n# Answer:", "\n<START>", "###", "Q:"]


def test_stop_strings_accept_single_string() -> None:
    assert base_stop_strings("STOP")[-1] == "STOP"


def test_stop_strings_reject_non_string() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        base_stop_strings(["ok", 3])  # type: ignore[list-item]

    assert caught.value.param == "stop"


@pytest.mark.parametrize(("text", "expected"), RUN_ON_SAMPLES)
def test_trim_cuts_run_on_answer(text: str, expected: str) -> None:
    clean, was_cut = trim_answer(text)

    assert clean == expected
    assert was_cut


@pytest.mark.parametrize("text", LEGITIMATE_SAMPLES)
def test_trim_keeps_legitimate_text(text: str) -> None:
    clean, was_cut = trim_answer(text)

    assert clean == text
    assert not was_cut


@pytest.mark.parametrize(("text", "expected"), ECHO_SAMPLES)
def test_trim_skips_leading_start_echo(text: str, expected: str) -> None:
    assert trim_answer(text)[0] == expected


def test_trim_prefill_keeps_start_as_marker() -> None:
    assert trim_answer("<START>\nmore", prefill="Sure") == ("", True)


def test_trim_strips_surrounding_whitespace() -> None:
    assert trim_answer("\n\n  Paris.  \n\n") == ("Paris.", False)


def test_trim_returns_empty_for_leading_marker() -> None:
    assert trim_answer("\n<END>\nParis") == ("", True)


def test_trim_keeps_prefill_leading_space() -> None:
    clean, _ = trim_answer(" is Paris.\n# Query:\nnext", prefill="The capital")

    assert clean == " is Paris."


def test_trim_prefill_without_newline_is_midline() -> None:
    clean, was_cut = trim_answer("Query: stays", prefill="The label ")

    assert clean == "Query: stays"
    assert not was_cut


def test_trim_prefill_with_newline_starts_line() -> None:
    assert trim_answer("Query: cut", prefill="Line one\n") == ("", True)


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_matches_trim_at_every_split(text: str) -> None:
    expected = trim_answer(text)[0]

    for cut in range(len(text) + 1):
        assert stream(text, [cut]) == expected, f"split at {cut}"


@pytest.mark.parametrize("text", SAMPLES)
def test_stream_matches_trim_for_random_splits(text: str) -> None:
    expected = trim_answer(text)[0]
    rng = random.Random(20240611)

    for _ in range(200):
        count = rng.randint(1, max(1, len(text) // 2))
        cuts = sorted(rng.sample(range(len(text) + 1), min(count, len(text) + 1)))
        assert stream(text, cuts) == expected, f"splits at {cuts}"


def test_stream_matches_trim_per_character() -> None:
    for text in SAMPLES:
        expected = trim_answer(text)[0]
        assert stream(text, list(range(1, len(text)))) == expected, text


def test_stream_with_prefill_matches_trim() -> None:
    text = " continues.\n\nQuery: next"
    expected = trim_answer(text, prefill="It")[0]

    for cut in range(len(text) + 1):
        assert stream(text, [cut], prefill="It") == expected, f"split at {cut}"


def test_feed_emits_plain_text_at_once() -> None:
    trimmer = AnswerTrimmer()

    assert trimmer.feed("Paris is the capital") == "Paris is the capital"


def test_feed_holds_back_partial_marker() -> None:
    trimmer = AnswerTrimmer()

    assert trimmer.feed("Paris.\n<EN") == "Paris."
    assert trimmer.feed("D>") == ""
    assert trimmer.stopped


def test_feed_releases_false_partial_marker() -> None:
    trimmer = AnswerTrimmer()
    trimmer.feed("Use\n#")

    assert trimmer.feed(" Query optimization") == "\n# Query optimization"
    assert not trimmer.stopped


def test_feed_holds_back_trailing_whitespace() -> None:
    trimmer = AnswerTrimmer()

    assert trimmer.feed("Paris. \n") == "Paris."
    assert trimmer.feed("It is big.") == " \nIt is big."


def test_feed_returns_nothing_after_stop() -> None:
    trimmer = AnswerTrimmer()
    trimmer.feed("Done.<END>")

    assert trimmer.feed(" more text") == ""
    assert trimmer.finish() == ""


def test_finish_marks_dangling_cut_without_stop() -> None:
    trimmer = AnswerTrimmer()
    trimmer.feed("Done.<EN")

    assert trimmer.finish() == ""
    assert trimmer.was_cut
    assert not trimmer.stopped
