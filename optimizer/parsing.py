"""Tolerant parsing of the JSON that the helper models return.

Servers that honour ``response_format`` return bare JSON, but a model behind a
server that ignores it often wraps the object in a Markdown code fence or in
prose. These helpers recover the first JSON object from such text and
validate the scores in it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

MIN_SCORE = 1
MAX_SCORE = 5

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_NOT_ALPHANUMERIC = re.compile(r"[^0-9a-z]+")
_INTEGER = re.compile(r"[+-]?\d+")
# Bound on the "{" positions tried, so that a long reply full of braces
# costs linear time instead of one decode attempt per brace.
_MAX_OBJECT_STARTS = 64


def response_text(response: Mapping[str, Any]) -> str | None:
    """Return the text of the first choice of a chat or text completion.

    Returns None when the response has no choices or the first choice has no
    text, as when the server put an error body in a 200 response.
    """
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return None
    choice = choices[0]
    if not isinstance(choice, Mapping):
        return None
    message = choice.get("message")
    if isinstance(message, Mapping):
        content = message.get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def strip_code_fences(text: str) -> str:
    """Return the body of the first fenced code block, or `text` stripped."""
    match = _FENCE.search(text)
    return (match.group(1) if match else text).strip()


def first_json_object(text: str) -> dict[str, Any] | None:
    """Return the first JSON object in `text`, or None when there is none.

    The text is tried as a whole, then the body of its first code fence, then
    each "{" in turn as the start of an object with prose around it.
    """
    decoder = json.JSONDecoder()
    for candidate in (text.strip(), strip_code_fences(text)):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value

    starts = [index for index, char in enumerate(text) if char == "{"]
    for start in starts[:_MAX_OBJECT_STARTS]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def parse_score(value: object) -> int | None:
    """Return `value` as an integer score from 1 to 5, or None when it is not one.

    Accepted: an int, a float with an integral value (4.0), and a string that
    contains only an integer ("4"). Rejected: bools, fractions (4.5), words
    ("five"), ratios ("4/5") and anything out of range (0, 6).
    """
    if isinstance(value, bool):
        return None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER.fullmatch(value.strip()):
        number = int(value.strip())
    if number is None or not MIN_SCORE <= number <= MAX_SCORE:
        return None
    return number


def normalize_name(name: str) -> str:
    """Return `name` lowercased with every run of non-alphanumerics removed."""
    return _NOT_ALPHANUMERIC.sub("", name.lower())


def match_name(name: str, choices: Iterable[str]) -> str | None:
    """Return the entry of `choices` that `name` spells, ignoring case and
    punctuation ("critical thinking" matches "Critical-Thinking")."""
    normalized = normalize_name(name)
    if not normalized:
        return None
    for choice in choices:
        if normalize_name(choice) == normalized:
            return choice
    return None


def item_names(items: object) -> list[str]:
    """Return the names in a list of strings or of objects with a "name" key.

    Items of any other shape are skipped, and so are names without a letter
    or digit, such as the "..." that small models copy from an example.
    """
    if not isinstance(items, list):
        return []
    names: list[str] = []
    for item in items:
        if isinstance(item, Mapping):
            item = item.get("name") or item.get("aspect")
        if isinstance(item, str) and normalize_name(item):
            names.append(item.strip())
    return names


def was_truncated(response: Mapping[str, Any]) -> bool:
    """Return whether the first choice stopped at the token limit."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    choice = choices[0]
    return isinstance(choice, Mapping) and choice.get("finish_reason") == "length"


def describe_problem(problem: str, response: Mapping[str, Any], max_tokens: int) -> str:
    """Return `problem`, plus the likely cause when the reply hit the token limit."""
    if not was_truncated(response):
        return problem
    return (
        f"{problem} (the reply was cut off at the limit of {max_tokens} tokens, "
        "so keep it shorter)"
    )


def retry_messages(
    messages: list[dict[str, Any]], reply: str | None, problem: str
) -> list[dict[str, Any]]:
    """Return `messages` extended with a request to fix the unusable `reply`.

    With reply text, the reply and a new user message follow. Without it, the
    request is appended to the last user message instead, because some chat
    templates (Gemma's, for one) reject two user messages in a row. Either way
    the retry's request (and its cache key) differs from every earlier try,
    even under greedy decoding.
    """
    nudge = (
        f"That reply could not be used: {problem}. Reply again with only the "
        "JSON object, in exactly the requested form."
    )
    if reply:
        return [
            *messages,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": nudge},
        ]

    extended = list(messages)
    last = extended[-1]
    extended[-1] = {**last, "content": f"{last['content']}\n\n{nudge}"}
    return extended
