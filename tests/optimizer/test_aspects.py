"""Tests of the aspect bank and of aspect name resolution."""

from __future__ import annotations

import pytest

from optimizer.aspects import (
    ASPECTS,
    GENERIC_ASPECT_NAME,
    MAX_ASPECT_NAME_LENGTH,
    Aspect,
    resolve_aspect,
    selector_menu,
)

BANK_ORDER = [
    "Helpfulness",
    "Clarity",
    "Factuality",
    "Depth",
    "Engagement",
    "Conciseness",
    "Safety",
    "Compliance",
    "Limitations",
    "Critical-Thinking",
    "Creativity",
    "Interactivity",
    "Empathy",
    "Sensitivity",
]


def assert_five_level_rubric(aspect: Aspect) -> None:
    lines = aspect.rubric.split("\n")
    assert len(lines) == 5, aspect.rubric
    for score, line in enumerate(lines, start=1):
        prefix = f"{score}: "
        assert line.startswith(prefix), line
        assert line[len(prefix) :].strip(), line


def test_bank_lists_fourteen_aspects_in_order() -> None:
    assert list(ASPECTS) == BANK_ORDER


def test_bank_keys_match_aspect_names() -> None:
    for name, aspect in ASPECTS.items():
        assert aspect.name == name


@pytest.mark.parametrize("name", BANK_ORDER)
def test_bank_rubric_has_five_levels(name: str) -> None:
    assert_five_level_rubric(ASPECTS[name])


@pytest.mark.parametrize("name", BANK_ORDER)
def test_bank_description_is_one_line(name: str) -> None:
    description = ASPECTS[name].description
    assert description.strip()
    assert "\n" not in description


def test_bank_rubrics_are_all_different() -> None:
    rubrics = [aspect.rubric for aspect in ASPECTS.values()]
    assert len(set(rubrics)) == len(rubrics)


def test_bank_cannot_be_modified() -> None:
    with pytest.raises(TypeError):
        ASPECTS["Humor"] = ASPECTS["Creativity"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("helpfulness", "Helpfulness"),
        ("HELPFULNESS", "Helpfulness"),
        ("critical thinking", "Critical-Thinking"),
        ("Critical_Thinking", "Critical-Thinking"),
        ("critical-thinking", "Critical-Thinking"),
        (" Limitations ", "Limitations"),
        ("**Safety**", "Safety"),
    ],
)
def test_resolve_ignores_case_and_separators(name: str, expected: str) -> None:
    assert resolve_aspect(name) is ASPECTS[expected]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Truthfulness", "Factuality"),
        ("Accuracy", "Factuality"),
        ("Harmlessness", "Safety"),
        ("Instruction following", "Compliance"),
        ("Cultural sensitivity", "Sensitivity"),
        ("concise", "Conciseness"),
    ],
)
def test_resolve_maps_synonym_to_bank(name: str, expected: str) -> None:
    assert resolve_aspect(name) is ASPECTS[expected]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Helpfullness", "Helpfulness"),
        ("Complience", "Compliance"),
        ("Clearity", "Clarity"),
        ("Limitation", "Limitations"),
    ],
)
def test_resolve_maps_misspelling_to_bank(name: str, expected: str) -> None:
    assert resolve_aspect(name) is ASPECTS[expected]


def test_resolve_empty_name_gives_generic() -> None:
    aspect = resolve_aspect("")

    assert aspect.name == GENERIC_ASPECT_NAME
    assert_five_level_rubric(aspect)


def test_resolve_invented_name_gives_generic() -> None:
    aspect = resolve_aspect("Whimsy")

    assert aspect.name == "Whimsy"
    assert "Whimsy" not in ASPECTS
    assert "Whimsy" in aspect.rubric
    assert_five_level_rubric(aspect)


def test_resolve_keeps_unrelated_name_generic() -> None:
    # "Activity" is 0.78 similar to "Creativity" by difflib ratio, below the cutoff.
    assert resolve_aspect("Activity").name == "Activity"


@pytest.mark.parametrize(
    "name",
    ["\n\t ", "x" * 500, "\U0001f642", "1-5", "{}", '"Humor":\n', "Safety\nand more"],
)
def test_resolve_odd_input_gives_usable_aspect(name: str) -> None:
    aspect = resolve_aspect(name)

    assert aspect.name
    assert len(aspect.name) <= MAX_ASPECT_NAME_LENGTH
    assert "\n" not in aspect.name
    assert_five_level_rubric(aspect)


def test_resolve_strips_quotes_from_generic_name() -> None:
    assert resolve_aspect('"Humor":\n').name == "Humor"


def test_selector_menu_lists_every_aspect() -> None:
    lines = selector_menu().split("\n")

    assert len(lines) == len(ASPECTS)
    for line, aspect in zip(lines, ASPECTS.values(), strict=True):
        assert line == f"- {aspect.name}: {aspect.description}"
