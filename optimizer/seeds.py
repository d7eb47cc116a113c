"""Loading of seed queries, seed examples and the safety set from JSONL files.

The packaged files live in `optimizer/data/`. A user file has the same shape,
one JSON object per line (blank lines are skipped), or for queries it may be a
plain JSON list of strings.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from optimizer.errors import SeedFileError
from optimizer.types import Query, QueryKind, SeedExample

logger = logging.getLogger(__name__)

SEEDS_FILE = "seeds.jsonl"
SEED_ANSWERS_FILE = "seed_answers.jsonl"
SAFETY_FILE = "safety.jsonl"
CUSTOM_CATEGORY = "custom"

_QUERY_FIELDS = ("id", "text", "category", "kind")
_EXAMPLE_FIELDS = ("id", "query", "category", "kind", "answer")
_KIND_NAMES = ", ".join(repr(kind.value) for kind in QueryKind)


@dataclass(frozen=True)
class _Source:
    name: str
    text: str


@dataclass(frozen=True)
class _Record:
    line: int
    fields: dict[str, Any]


def load_queries(path: Path | None = None) -> list[Query]:
    """Load queries from `path`, or the packaged seed queries when it is None.

    In a plain JSON list of strings the queries get the ids q0001, q0002, ...,
    the category "custom" and the kind general.
    """
    return _load_queries(path, SEEDS_FILE, id_prefix="q", kind=QueryKind.GENERAL)


def load_safety_queries(path: Path | None = None) -> list[Query]:
    """Load the safety set from `path`, or the packaged one when it is None.

    In a plain JSON list of strings the queries get the ids s0001, s0002, ...,
    the category "custom" and the kind safety.
    """
    return _load_queries(path, SAFETY_FILE, id_prefix="s", kind=QueryKind.SAFETY)


def load_seed_examples(path: Path | None = None) -> list[SeedExample]:
    """Load seed (query, answer) pairs from `path`, or the packaged ones."""
    source = _read_source(path, SEED_ANSWERS_FILE)
    records = _unique_records(source, _json_lines(source))
    examples = [_seed_example(source, record) for record in records]

    _require_entries(source, examples)
    logger.debug("Loaded %d seed examples from %s", len(examples), source.name)
    return examples


def _load_queries(
    path: Path | None, packaged: str, *, id_prefix: str, kind: QueryKind
) -> list[Query]:
    source = _read_source(path, packaged)
    if source.text.lstrip().startswith("["):
        queries = _queries_from_list(source, id_prefix, kind)
    else:
        records = _unique_records(source, _json_lines(source))
        queries = [_query(source, record) for record in records]

    _require_entries(source, queries)
    logger.debug("Loaded %d queries from %s", len(queries), source.name)
    return queries


def _read_source(path: Path | None, packaged: str) -> _Source:
    if path is None:
        resource = resources.files("optimizer").joinpath("data", packaged)
        name, reader = str(resource), resource.read_bytes
    else:
        name, reader = str(path), Path(path).read_bytes
    try:
        raw = reader()
    except OSError as exc:
        message = f"Seed file {name!r} cannot be read: {exc.strerror or exc}."
        raise SeedFileError(f"{message} Check the path.", path=name) from exc
    return _Source(name, _decode(name, raw))


def _decode(name: str, raw: bytes) -> str:
    try:
        # utf-8-sig also accepts the byte order mark that some editors write.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        problem = "the text is not valid UTF-8."
        fix = "Save the file with UTF-8 encoding and load it again."
        raise _invalid(_Source(name, ""), line, None, problem, fix=fix) from exc


def _json_lines(source: _Source) -> Iterator[_Record]:
    # JSON strings may contain U+2028 and other characters that splitlines()
    # treats as line breaks, so only "\n" ends a line.
    for number, line in enumerate(source.text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"the line is not valid JSON ({exc.msg}, column {exc.colno})."
            raise _invalid(source, number, None, problem) from exc
        if not isinstance(value, dict):
            problem = f"expected a JSON object, not {value!r}."
            raise _invalid(source, number, None, problem)
        yield _Record(number, value)


def _unique_records(source: _Source, records: Iterator[_Record]) -> list[_Record]:
    first_lines: dict[str, int] = {}
    unique = []
    for record in records:
        identifier = _string(source, record, "id")
        if identifier in first_lines:
            problem = f"id {identifier!r} is already used on line "
            problem += f"{first_lines[identifier]}."
            raise _invalid(source, record.line, "id", problem)
        first_lines[identifier] = record.line
        unique.append(record)
    return unique


def _query(source: _Source, record: _Record) -> Query:
    _reject_unknown_fields(source, record, _QUERY_FIELDS)
    return Query(
        id=_string(source, record, "id"),
        text=_string(source, record, "text"),
        category=_string(source, record, "category", default=CUSTOM_CATEGORY),
        kind=_kind(source, record),
    )


def _seed_example(source: _Source, record: _Record) -> SeedExample:
    _reject_unknown_fields(source, record, _EXAMPLE_FIELDS)
    query = Query(
        id=_string(source, record, "id"),
        text=_string(source, record, "query"),
        category=_string(source, record, "category", default=CUSTOM_CATEGORY),
        kind=_kind(source, record),
    )
    return SeedExample(query=query, answer=_string(source, record, "answer"))


def _reject_unknown_fields(
    source: _Source, record: _Record, allowed: Sequence[str]
) -> None:
    for field in record.fields:
        if field not in allowed:
            names = ", ".join(repr(name) for name in allowed)
            problem = f"the field is unknown. The known fields are {names}."
            raise _invalid(source, record.line, field, problem)


def _string(
    source: _Source, record: _Record, field: str, *, default: str | None = None
) -> str:
    if field not in record.fields:
        if default is not None:
            return default
        raise _invalid(source, record.line, field, "the field is missing.")
    value = record.fields[field]
    if not isinstance(value, str) or not value.strip():
        problem = f"the value must be a non-empty string, not {value!r}."
        raise _invalid(source, record.line, field, problem)
    return value.strip()


def _kind(source: _Source, record: _Record) -> QueryKind:
    value = _string(source, record, "kind", default=QueryKind.GENERAL.value)
    try:
        return QueryKind(value)
    except ValueError:
        problem = f"the value must be one of {_KIND_NAMES}, not {value!r}."
        raise _invalid(source, record.line, "kind", problem) from None


def _queries_from_list(source: _Source, id_prefix: str, kind: QueryKind) -> list[Query]:
    queries = []
    for index, (line, value) in enumerate(_list_items(source), start=1):
        if not isinstance(value, str) or not value.strip():
            problem = f"each list item must be a non-empty string, not {value!r}."
            raise _invalid(source, line, None, problem)
        identifier = f"{id_prefix}{index:04d}"
        queries.append(Query(identifier, value.strip(), CUSTOM_CATEGORY, kind))
    return queries


def _list_items(source: _Source) -> Iterator[tuple[int, Any]]:
    """Yield (line, value) for each item of the JSON list in `source`."""
    text = source.text
    decoder = json.JSONDecoder()
    position = _skip_space(text, text.index("[") + 1)
    while not text.startswith("]", position):
        line = _line_of(text, position)
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            problem = f"the list is not valid JSON ({exc.msg})."
            raise _invalid(source, exc.lineno, None, problem) from exc
        yield line, value
        position = _skip_space(text, position)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif not text.startswith("]", position):
            problem = "expected ',' or ']' after the list item."
            raise _invalid(source, _line_of(text, position), None, problem)

    position = _skip_space(text, position + 1)
    if position < len(text):
        problem = "unexpected text after the end of the list."
        raise _invalid(source, _line_of(text, position), None, problem)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _require_entries(source: _Source, entries: Sequence[object]) -> None:
    if not entries:
        message = f"Seed file {source.name!r} contains no entries."
        raise SeedFileError(f"{message} Add at least one.", path=source.name)


def _invalid(
    source: _Source,
    line: int,
    field: str | None,
    problem: str,
    *,
    fix: str = "Correct the file and load it again.",
) -> SeedFileError:
    where = f"line {line}" if field is None else f"line {line}, field {field!r}"
    return SeedFileError(
        f"Seed file {source.name!r} is invalid at {where}: {problem} {fix}",
        path=source.name,
        line=line,
        field=field,
    )
