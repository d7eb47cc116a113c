"""Sampled requests and the bounded store that keeps them for the optimizer."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

import diskcache
from pydantic import BaseModel, Field, ValidationError, computed_field

from gateway.store.base import StoreError

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "truncated", "failed", "disconnected"]

# eviction_policy "none": the store evicts its own oldest samples by count, and
# diskcache's size-based eviction would drop samples without updating the
# per-client counts. disk_min_file_size 1 GiB keeps every sample in the SQLite
# database instead of in separate value files.
_CACHE_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "sqlite_synchronous": 1,
    "disk_min_file_size": 2**30,
}
_LAST_KEY = "last"
_FIRST_KEY = "first"


class SampledChoice(BaseModel):
    """One answer choice as the client received it."""

    index: int = 0
    text: str = ""
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    finish_reason: str | None = None


class Sample(BaseModel):
    """One sampled request and the response the client received."""

    time: datetime
    route: str
    client: str
    model: str | None = None
    prompt_version: str
    stream: bool = False
    messages: list[dict[str, Any]] | None = None
    prompt: Any = None
    choices: list[SampledChoice] = Field(default_factory=list)
    usage: dict[str, Any] | None = None
    latency_seconds: float
    status: int
    outcome: Outcome
    redacted: bool

    @computed_field  # type: ignore[prop-decorator]
    @property
    def complete(self) -> bool:
        """Whether the answer ended normally: not truncated, failed or cut off."""
        return self.outcome == "ok"

    @property
    def answer(self) -> str:
        """Text of the first choice, or an empty string when there is none."""
        return self.choices[0].text if self.choices else ""

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None


class SampleStore(Protocol):
    """Storage of samples, read by the optimizer sidecar."""

    def add(self, sample: Sample) -> None:
        """Store `sample`, evicting the oldest samples past the store's bound."""

    def recent(self, limit: int, since: datetime | None = None) -> list[Sample]:
        """Return up to `limit` of the newest samples, newest last.

        With `since`, only samples whose time is at or after it. A naive
        `since` is taken as UTC.
        """

    def count(self) -> int: ...

    def count_for(self, client: str) -> int: ...

    def close(self) -> None: ...


def _sample_key(number: int) -> str:
    return f"sample:{number}"


def _client_key(client: str) -> str:
    return f"client:{client}"


class DiskSampleStore:
    """A SampleStore in one diskcache directory, bounded to `max_count` samples.

    Samples are numbered in the order they are added. Each add runs in one
    SQLite transaction that also evicts the oldest samples past the bound and
    keeps a sample count per client, so processes can share the directory.
    """

    def __init__(
        self, directory: Path, *, max_count: int = 10000, timeout: float = 10.0
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, got {max_count!r}.")
        self.directory = Path(directory)
        self.max_count = max_count
        with self._errors("open"):
            self._cache = diskcache.Cache(
                str(self.directory), timeout=timeout, **_CACHE_SETTINGS
            )

    def __repr__(self) -> str:
        return f"DiskSampleStore({str(self.directory)!r})"

    def add(self, sample: Sample) -> None:
        with self._errors("write to"), self._cache.transact():
            number = self._cache.incr(_LAST_KEY)
            if number == 1:
                self._cache.set(_FIRST_KEY, 1)
            self._cache.set(_sample_key(number), sample.model_dump_json())
            self._cache.incr(_client_key(sample.client))
            self._evict_past(self.max_count)

    def recent(self, limit: int, since: datetime | None = None) -> list[Sample]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        with self._errors("read"):
            first, last = self._range()
            newest_first: list[Sample] = []
            for number in range(last, first - 1, -1):
                if len(newest_first) >= limit:
                    break
                sample = self._read(number)
                if sample is None:
                    continue
                if since is not None and sample.time < since:
                    break
                newest_first.append(sample)
        newest_first.reverse()
        return newest_first

    def count(self) -> int:
        with self._errors("read"):
            first, last = self._range()
        return max(0, last - first + 1)

    def count_for(self, client: str) -> int:
        with self._errors("read"):
            value = self._cache.get(_client_key(client), 0)
        return int(value)

    def close(self) -> None:
        self._cache.close()

    def _range(self) -> tuple[int, int]:
        last = int(self._cache.get(_LAST_KEY, 0))
        first = int(self._cache.get(_FIRST_KEY, 1))
        return first, last

    def _evict_past(self, bound: int) -> None:
        first, last = self._range()
        while last - first + 1 > bound:
            text = self._cache.pop(_sample_key(first))
            if text is not None:
                self._forget_client(text)
            first += 1
        self._cache.set(_FIRST_KEY, first)

    def _forget_client(self, text: str) -> None:
        try:
            client = Sample.model_validate_json(text).client
        except ValidationError:
            return
        key = _client_key(client)
        if self._cache.decr(key) <= 0:
            self._cache.delete(key)

    def _read(self, number: int) -> Sample | None:
        text = self._cache.get(_sample_key(number))
        if text is None:
            return None
        try:
            return Sample.model_validate_json(text)
        except ValidationError as error:
            logger.warning("Skipping unreadable sample %d: %s", number, error)
            return None

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except (sqlite3.Error, OSError, diskcache.Timeout) as error:
            raise StoreError(
                f"Could not {action} the sample store at {str(self.directory)!r}: "
                f"{error}. Check that the directory is writable and not locked "
                "by another process, or set DRPO_SAMPLE_RATE=0 to stop sampling."
            ) from error
