"""Server-sent events: splitting an upstream byte stream into whole events."""

from __future__ import annotations

from typing import Any

import orjson

DONE = b"[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class EventSplitter:
    """Cut a byte stream into complete SSE events, each with its blank line.

    Only the bytes of an unfinished event are held back, so events are passed
    on as soon as their last byte arrives.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        events: list[bytes] = []
        while True:
            end, separator = _find_separator(self._buffer)
            if end < 0:
                return events
            cut = end + len(separator)
            events.append(self._buffer[:cut])
            self._buffer = self._buffer[cut:]

    def rest(self) -> bytes:
        """Return and clear an unterminated last event, if the stream ended in one."""
        rest, self._buffer = self._buffer, b""
        return rest


def _find_separator(buffer: bytes) -> tuple[int, bytes]:
    lf = buffer.find(b"\n\n")
    crlf = buffer.find(b"\r\n\r\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, b"\r\n\r\n"
    return lf, b"\n\n"


def event_data(event: bytes) -> bytes | None:
    """Return the joined `data:` lines of an event, or None when it has none."""
    parts = [
        line[5:].lstrip(b" ")
        for line in event.splitlines()
        if line.startswith(b"data:")
    ]
    if not parts:
        return None
    return b"\n".join(parts)


def encode_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"
