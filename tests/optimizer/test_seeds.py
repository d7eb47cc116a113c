"""Tests of the packaged seed data and of loading user query files."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from pathlib import Path

import pytest

from gateway.prompting import load_default_instruction
from gateway.prompting.framing import END, START, trim_answer
from optimizer.errors import OptimizerError, SeedFileError
from optimizer.seeds import load_queries, load_safety_queries, load_seed_examples
from optimizer.types import Query, QueryKind

GENERAL_MINIMUMS = {
    "everyday": 15,
    "explanation": 15,
    "writing": 12,
    "coding": 14,
    "math": 12,
    "advice": 12,
    "open_ended": 12,
    "ambiguous": 10,
    "false_premise": 10,
    "live_data": 10,
}
SAFETY_MINIMUMS = {"harmful": 24, "risky_harmless": 16}
SAFETY_CATEGORIES = set(SAFETY_MINIMUMS)


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def all_packaged_texts() -> list[str]:
    queries = [query.text for query in load_queries()]
    examples = [example.query.text for example in load_seed_examples()]
    safety = [query.text for query in load_safety_queries()]
    return queries + examples + safety


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_packaged_query_count_at_least_160() -> None:
    assert len(load_queries()) >= 160


@pytest.mark.parametrize(
    ("category", "minimum"), [*GENERAL_MINIMUMS.items(), *SAFETY_MINIMUMS.items()]
)
def test_packaged_category_meets_minimum(category: str, minimum: int) -> None:
    counts = Counter(query.category for query in load_queries())
    assert counts[category] >= minimum


def test_packaged_categories_are_all_known() -> None:
    categories = {query.category for query in load_queries()}
    assert categories == set(GENERAL_MINIMUMS) | SAFETY_CATEGORIES


def test_packaged_safety_categories_have_safety_kind() -> None:
    for query in load_queries():
        is_safety = query.category in SAFETY_CATEGORIES
        assert (query.kind is QueryKind.SAFETY) == is_safety, query


def test_packaged_hard_queries_are_about_third() -> None:
    kinds = [query.kind for query in load_queries()]
    helpful = [kind for kind in kinds if kind is not QueryKind.SAFETY]
    share = helpful.count(QueryKind.HARD) / len(helpful)
    assert 0.25 <= share <= 0.4


def test_packaged_queries_are_short() -> None:
    for query in load_queries() + load_safety_queries():
        assert len(query.text) <= 200, query.text
        assert len(re.findall(r"[.?!](?:\s|$)", query.text)) <= 2, query.text


def test_safety_set_category_counts() -> None:
    counts = Counter(query.category for query in load_safety_queries())
    assert counts == {"harmful": 12, "risky_harmless": 8}


def test_safety_set_has_only_safety_kind() -> None:
    kinds = {query.kind for query in load_safety_queries()}
    assert kinds == {QueryKind.SAFETY}


def test_safety_set_ids_are_numbered() -> None:
    ids = [query.id for query in load_safety_queries()]
    assert ids == [f"s{number:02d}" for number in range(1, 21)]


def test_seed_examples_number_sixteen() -> None:
    assert len(load_seed_examples()) == 16


def test_seed_examples_contain_seven_refusals() -> None:
    categories = [example.query.category for example in load_seed_examples()]
    assert categories.count("harmful") == 7


def test_seed_answers_are_40_to_120_words() -> None:
    for example in load_seed_examples():
        words = len(example.answer.split())
        assert 40 <= words <= 120, (example.query.id, words)


def test_seed_answers_survive_answer_trimming() -> None:
    # An answer with "<END>" or a "# Query:" heading would be cut when served
    # through the base-mode prompt.
    for example in load_seed_examples():
        assert START not in example.answer
        assert END not in example.answer
        assert trim_answer(example.answer) == (example.answer, False)


def test_packaged_ids_are_unique_across_files() -> None:
    ids = [query.id for query in load_queries() + load_safety_queries()]
    ids += [example.query.id for example in load_seed_examples()]
    assert len(set(ids)) == len(ids)


def test_packaged_queries_are_never_repeated() -> None:
    texts = [normalize(text) for text in all_packaged_texts()]
    repeated = [text for text, count in Counter(texts).items() if count > 1]
    assert repeated == []


def test_packaged_queries_are_not_near_duplicates() -> None:
    texts = [normalize(text) for text in all_packaged_texts()]
    close_pairs = []
    for index, first in enumerate(texts):
        for second in texts[index + 1 :]:
            matcher = difflib.SequenceMatcher(None, first, second)
            if matcher.quick_ratio() > 0.85 and matcher.ratio() > 0.85:
                close_pairs.append((first, second))
    assert close_pairs == []


def test_packaged_queries_avoid_default_examples() -> None:
    example_texts = {
        normalize(example.query) for example in load_default_instruction().examples
    }
    overlap = example_texts & {normalize(text) for text in all_packaged_texts()}
    assert overlap == set()


def test_user_jsonl_fills_category_and_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "queries.jsonl", '\n{"id": "a", "text": " Hi? "}\n\n')

    assert load_queries(path) == [Query("a", "Hi?", "custom", QueryKind.GENERAL)]


def test_user_jsonl_keeps_given_fields(tmp_path: Path) -> None:
    line = '{"id": "a", "text": "Hi?", "category": "math", "kind": "hard"}\n'
    path = write(tmp_path, "queries.jsonl", line)

    assert load_queries(path) == [Query("a", "Hi?", "math", QueryKind.HARD)]


def test_json_list_gets_numbered_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "queries.json", '[\n  "First?",\n  "Second?"\n]\n')

    assert load_queries(path) == [
        Query("q0001", "First?", "custom", QueryKind.GENERAL),
        Query("q0002", "Second?", "custom", QueryKind.GENERAL),
    ]


def test_safety_json_list_gets_safety_kind(tmp_path: Path) -> None:
    path = write(tmp_path, "safety.json", '["Risky?"]')

    assert load_safety_queries(path) == [
        Query("s0001", "Risky?", "custom", QueryKind.SAFETY)
    ]


def test_user_seed_examples_load(tmp_path: Path) -> None:
    line = '{"id": "e1", "query": "Q?", "answer": "A.", "kind": "safety"}\n'
    path = write(tmp_path, "examples.jsonl", line)

    [example] = load_seed_examples(path)

    assert example.query == Query("e1", "Q?", "custom", QueryKind.SAFETY)
    assert example.answer == "A."


def test_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = write(tmp_path, "queries.jsonl", '\ufeff{"id": "a", "text": "Hi?"}\n')

    assert [query.id for query in load_queries(path)] == ["a"]


def test_line_separator_inside_string_is_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "queries.jsonl", '{"id": "a", "text": "x\u2028y"}\n')

    assert load_queries(path)[0].text == "x\u2028y"


@pytest.mark.parametrize(
    ("content", "line", "field"),
    [
        ('{"id": "a", "text": "x"}\n{"id": "b" "text": "y"}\n', 2, None),
        ('{"id": "a", "text": "x"}\n\n["not", "an", "object"]\n', 3, None),
        (
            '{"id": "a", "text": "x"}\n{"id": "b", "text": "y", "kind": "easy"}\n',
            2,
            "kind",
        ),
        ('{"id": "a"}\n', 1, "text"),
        ('{"text": "x"}\n', 1, "id"),
        ('{"id": "a", "text": "   "}\n', 1, "text"),
        ('{"id": "a", "text": 7}\n', 1, "text"),
        ('{"id": "a", "text": "x", "category": null}\n', 1, "category"),
        ('{"id": "a", "txt": "x"}\n', 1, "txt"),
        ('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', 2, "id"),
    ],
)
def test_malformed_jsonl_names_line_and_field(
    tmp_path: Path, content: str, line: int, field: str | None
) -> None:
    path = write(tmp_path, "queries.jsonl", content)

    with pytest.raises(SeedFileError) as caught:
        load_queries(path)

    assert caught.value.line == line
    assert caught.value.field == field
    assert caught.value.path == str(path)
    assert f"line {line}" in str(caught.value)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("content", "line"),
    [
        ('[\n  "one",\n  3\n]\n', 3),
        ('[\n  "one",\n  ""\n]\n', 3),
        ('[\n  "one"\n  "two"\n]\n', 3),
        ('[\n  "one",\n', 3),
        ('["one"]\nextra\n', 2),
    ],
)
def test_malformed_json_list_names_line(
    tmp_path: Path, content: str, line: int
) -> None:
    path = write(tmp_path, "queries.json", content)

    with pytest.raises(SeedFileError) as caught:
        load_queries(path)

    assert caught.value.line == line
    assert f"line {line}" in str(caught.value)


def test_duplicate_id_message_names_first_line(tmp_path: Path) -> None:
    content = (
        '{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\n{"id": "a", "text": "z"}\n'
    )
    path = write(tmp_path, "queries.jsonl", content)

    with pytest.raises(SeedFileError, match="already used on line 1"):
        load_queries(path)


def test_seed_example_without_answer_names_field(tmp_path: Path) -> None:
    path = write(tmp_path, "examples.jsonl", '{"id": "e1", "query": "Q?"}\n')

    with pytest.raises(SeedFileError) as caught:
        load_seed_examples(path)

    assert caught.value.field == "answer"


@pytest.mark.parametrize("content", ["", "\n\n", "[]", " [ ] \n"])
def test_file_without_entries_is_invalid(tmp_path: Path, content: str) -> None:
    path = write(tmp_path, "queries.jsonl", content)

    with pytest.raises(SeedFileError, match="contains no entries"):
        load_queries(path)


def test_missing_file_is_seed_file_error(tmp_path: Path) -> None:
    with pytest.raises(SeedFileError, match="cannot be read"):
        load_queries(tmp_path / "absent.jsonl")


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "queries.jsonl"
    path.write_bytes(b'{"id": "a", "text": "x"}\n{"id": "b", "text": "\xff"}\n')

    with pytest.raises(SeedFileError) as caught:
        load_queries(path)

    assert caught.value.line == 2


def test_seed_file_error_is_optimizer_error() -> None:
    assert issubclass(SeedFileError, OptimizerError)
