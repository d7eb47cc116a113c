"""Base-mode text framing: section layout, stop strings and the answer trimmer.

A base model has no chat template, so the instruction, the examples and the
conversation are rendered as plain text sections::

    # Instructions

    {system prompt}

    # Query:
    {query}

    # Answer:
    <START>
    {answer}
    <END>

The prompt ends with an open answer section (``<START>`` and a newline), and
the model is expected to write one answer and then ``<END>``. It often runs on
into a new ``<START>``, query or answer section instead, so
`base_stop_strings` stops the upstream there and `AnswerTrimmer` cuts the
generated text at the first framing marker.

Measured with the Gemma 3 270M base model (Q4_K_M) under llama-server on 2
CPU threads, the default instruction, 20 queries, 200 tokens at most and
temperature 0.8 or 1.0: with ``<END>`` as the only stop string, 12 of 40
answers ran on or never stopped and 7 of 40 began by echoing ``<START>``.
With `base_stop_strings`, none of 20 answers reached the token limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gateway.errors import InvalidRequestError

START = "<START>"
END = "<END>"
INSTRUCTIONS_HEADER = "# Instructions"
QUERY_HEADER = "# Query:"
ANSWER_HEADER = "# Answer:"
SECTION_SEPARATOR = "\n\n"


def render_instructions(system_text: str) -> str:
    """Render the instructions section, or "" when there is no system text."""
    if not system_text:
        return ""
    return f"{INSTRUCTIONS_HEADER}\n\n{system_text}{SECTION_SEPARATOR}"


def render_query(query: str) -> str:
    return f"{QUERY_HEADER}\n{query}{SECTION_SEPARATOR}"


def render_answer(answer: str) -> str:
    """Render a closed answer section that ends with `END` and a blank line."""
    return f"{ANSWER_HEADER}\n{START}\n{answer}\n{END}{SECTION_SEPARATOR}"


def render_open_answer(prefill: str = "") -> str:
    """Render the answer section that the model completes, after `prefill`."""
    return f"{ANSWER_HEADER}\n{START}\n{prefill}"


def base_stop_strings(client_stop: str | list[str] | None) -> list[str]:
    """Return the stop strings for a base-mode request.

    `END` comes first, then the starts of the sections a run-on answer writes
    next, then the client's own stop strings. Duplicates and empty strings are
    dropped and the order is kept. The list is longer than the 4 stop strings
    the OpenAI API allows, which is fine because base mode targets local
    servers (llama.cpp's llama-server and vLLM take any number).
    """
    if client_stop is None:
        client_stops: list[str] = []
    elif isinstance(client_stop, str):
        client_stops = [client_stop]
    else:
        client_stops = list(client_stop)

    for stop in client_stops:
        if not isinstance(stop, str):
            raise InvalidRequestError(
                f"stop must be a string or a list of strings, got an item {stop!r}.",
                param="stop",
            )

    # "\n# Query:" and not "\n# Query", because the shorter form would also
    # stop a legitimate Markdown heading such as "# Query optimization".
    # "\n<START>" and not "<START>", because the model often echoes START as
    # its first output and may write a usable answer after it.
    candidates = [END, f"\n{QUERY_HEADER}", f"\n{ANSWER_HEADER}", f"\n{START}"]
    candidates += client_stops
    return list(dict.fromkeys(stop for stop in candidates if stop))


@dataclass(frozen=True)
class _Marker:
    """A literal that ends a base-mode answer wherever it occurs."""

    text: str
    line_start: bool
    ignore_case: bool

    def compare_form(self, candidate: str) -> str:
        return _ascii_lower(candidate) if self.ignore_case else candidate


def _ascii_lower(text: str) -> str:
    # The markers are ASCII, and str.lower() would change the length of some
    # non-ASCII text ("İ" becomes two characters) and so shift the cut.
    return text.translate(_ASCII_LOWER_TABLE)


_ASCII_LOWER_TABLE = str.maketrans(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"
)


def _heading_markers() -> Iterable[_Marker]:
    # Markdown headings for query and answer with one to three "#", with or
    # without a space, ending in ":" or at the end of the line. "Instructions"
    # only counts with a single "#", because "## Instructions" is a common
    # heading in legitimate answers such as recipes.
    for keyword, levels in (("query", 3), ("answer", 3), ("instructions", 1)):
        for level in range(1, levels + 1):
            for space in ("", " "):
                for ending in (":", "\n"):
                    text = f"{'#' * level}{space}{keyword}{ending}"
                    yield _Marker(text, line_start=True, ignore_case=True)


def _build_markers() -> tuple[_Marker, ...]:
    markers = [
        _Marker(_ascii_lower(START), line_start=False, ignore_case=True),
        _Marker(_ascii_lower(END), line_start=False, ignore_case=True),
        *_heading_markers(),
    ]
    for keyword in ("query", "answer"):
        for bold in (f"**{keyword}:**", f"**{keyword}**:"):
            markers.append(_Marker(bold, line_start=True, ignore_case=True))
    # Bare labels are case-sensitive: a line that starts with "answer: 42" is
    # more often part of a legitimate answer than a new section.
    for label in ("Query:", "Answer:", "QUERY:", "ANSWER:"):
        markers.append(_Marker(label, line_start=True, ignore_case=False))
    return tuple(markers)


# Trade-off: every line-anchored marker also cuts legitimate text that starts
# a line with it, such as "Query:" above a SQL statement or "# Answer:" inside
# a code block. Markers are anchored at line starts (except START and END), so
# mid-line text such as "the answer: 42" is never cut.
_MARKERS = _build_markers()

# A dangling marker prefix at the end of the stream (as when max_tokens cuts
# "<END>" to "<EN") is removed only from this length on, so that a final line
# "A" (a multiple-choice answer, a prefix of "Answer:") survives.
_MIN_DANGLING_LENGTH = 2

_COMPLETE, _PARTIAL = "complete", "partial"


def _classify(text: str, position: int, at_line_start: bool) -> str | None:
    """Return whether a marker is complete at `position`, may still become one
    when more text arrives (partial), or neither (None)."""
    tail = text[position:]
    if position == 0:
        line_start = at_line_start
    else:
        line_start = text[position - 1] == "\n"
    verdict = None
    for marker in _MARKERS:
        if marker.line_start and not line_start:
            continue
        candidate = marker.compare_form(tail[: len(marker.text)])
        if candidate == marker.text:
            return _COMPLETE
        if len(tail) < len(marker.text) and marker.text.startswith(candidate):
            verdict = _PARTIAL
    return verdict


def _find_marker(text: str, at_line_start: bool) -> tuple[str, int] | None:
    """Return the kind and position of the first complete or partial marker."""
    for position in range(len(text)):
        if text[position] != "<" and not (position == 0 or text[position - 1] == "\n"):
            continue
        kind = _classify(text, position, at_line_start)
        if kind is not None:
            return kind, position
    return None


def _skip_leading_echo(text: str) -> str:
    """Remove leading whitespace and any `START` markers among it."""
    text = text.lstrip()
    while _ascii_lower(text[: len(START)]) == _LOWER_START:
        text = text[len(START) :].lstrip()
    return text


def _may_become_echo(text: str) -> bool:
    return len(text) < len(START) and _LOWER_START.startswith(_ascii_lower(text))


_LOWER_START = _ascii_lower(START)


class AnswerTrimmer:
    """Streaming-safe cleaner of one base-mode answer.

    The trimmer cuts the answer at the first framing marker, strips leading
    whitespace and the whitespace before the cut or the end, and drops a
    dangling partial marker when the stream ends. A `START` before any other
    text is an echo of the open answer section: it is skipped, not cut at,
    because the text after it is often a usable answer. It holds back only text that
    could still be trailing whitespace or the start of a marker, so the
    concatenated output of `feed` and `finish` equals `trim_answer` of the
    whole text however the text is split into chunks.

    `prefill` is the assistant text the prompt ended with (see
    `PromptBuilder.base_prompt`). When it is set, the generated text continues
    it: leading whitespace and a leading `START` are kept, and the text starts
    a line only when the prefill ends with a newline.

    `stopped` becomes true once a marker was seen, and later `feed` calls
    return "". `was_cut` is also true when `finish` dropped a dangling partial
    marker.
    """

    def __init__(self, prefill: str = "") -> None:
        self.stopped = False
        self.was_cut = False
        self._finished = False
        self._pending = ""
        self._in_leading_text = not prefill
        self._pending_at_line_start = not prefill or prefill.endswith("\n")

    def feed(self, text: str) -> str:
        """Add generated text and return the part that is now safe to emit."""
        if self._finished:
            return ""
        self._pending += text
        if self._in_leading_text:
            self._pending = _skip_leading_echo(self._pending)
            if not self._pending or _may_become_echo(self._pending):
                return ""
            self._in_leading_text = False

        found = _find_marker(self._pending, self._pending_at_line_start)
        if found is not None and found[0] == _COMPLETE:
            return self._cut(found[1])

        safe_end = len(self._pending) if found is None else found[1]
        return self._emit(self._pending[:safe_end].rstrip())

    def finish(self) -> str:
        """Flush the held-back text at the end of the stream."""
        if self._finished:
            return ""
        self._finished = True
        found = _find_marker(self._pending, self._pending_at_line_start)
        if found is not None:
            kind, position = found
            dangling = len(self._pending) - position
            if kind == _COMPLETE or dangling >= _MIN_DANGLING_LENGTH:
                return self._cut(position, marker_seen=kind == _COMPLETE)

        return self._emit(self._pending.rstrip())

    def _cut(self, position: int, *, marker_seen: bool = True) -> str:
        self.stopped = marker_seen
        self.was_cut = True
        self._finished = True
        return self._emit(self._pending[:position].rstrip())

    def _emit(self, text: str) -> str:
        # `text` is a prefix of the pending text that never ends in whitespace,
        # so the pending text left over never starts a line after an emit.
        self._pending = self._pending[len(text) :]
        if text:
            self._pending_at_line_start = False
        return text


def trim_answer(text: str, prefill: str = "") -> tuple[str, bool]:
    """Trim a whole base-mode answer and report whether any text was cut."""
    trimmer = AnswerTrimmer(prefill)
    clean = trimmer.feed(text) + trimmer.finish()
    return clean, trimmer.was_cut
