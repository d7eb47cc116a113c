"""The prompt store in a local diskcache directory (SQLite underneath)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import diskcache
from pydantic import TypeAdapter, ValidationError

from gateway.errors import PromptVersionNotFoundError
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.store.base import (
    DEFAULT_MODEL_KEY,
    UNSET,
    ActivationConflictError,
    ActivationEvent,
    Canary,
    Lease,
    StoreError,
    Unset,
    describe_pointer,
    model_key,
)
from gateway.store.checks import (
    check_lease_request,
    check_model_name,
    check_scores,
    check_share,
    first_problem,
)

logger = logging.getLogger(__name__)

# eviction_policy "none": diskcache's default policy evicts the oldest entries
# past 1 GiB, which would silently drop versions.
# sqlite_synchronous 2 (FULL): a committed write survives a power loss, not
# only a process crash. Writes are rare, so the extra fsync costs little.
# disk_min_file_size 1 GiB: every record stays inside the SQLite database
# instead of in a separate value file that diskcache writes without fsync.
_CACHE_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "sqlite_synchronous": 2,
    "disk_min_file_size": 2**30,
}

_VERSION_COUNT_KEY = "version-count"
_HISTORY_COUNT_KEY = "history-count"
_GENERATION_KEY = "generation"
_POINTERS_KEY = "pointers"
_CANARIES_KEY = "canaries"

_POINTERS_ADAPTER = TypeAdapter(dict[str, str])
_CANARIES_ADAPTER = TypeAdapter(dict[str, Canary])


def _version_key(version: str) -> str:
    return f"version:{version}"


def _event_key(index: int) -> str:
    return f"history:{index}"


def _lease_key(name: str) -> str:
    return f"lease:{name}"


class DiskPromptStore:
    """A PromptStore in one diskcache directory, shared safely by processes.

    Every change runs in one SQLite transaction (`BEGIN IMMEDIATE`), so
    version ids stay unique across processes and a reader sees either all of
    a change or none of it.
    """

    def __init__(self, directory: Path, *, timeout: float = 10.0) -> None:
        """Open or create the store in `directory`.

        `timeout` is how many seconds a call waits for another process's write
        lock before it raises StoreError.
        """
        self.directory = Path(directory)
        self._timeout = timeout
        with self._errors("open"):
            self._cache = diskcache.Cache(
                str(self.directory), timeout=timeout, **_CACHE_SETTINGS
            )

    def __repr__(self) -> str:
        return f"DiskPromptStore({str(self.directory)!r})"

    def __enter__(self) -> DiskPromptStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def create(
        self,
        system_prompt: str,
        examples: Sequence[Example],
        *,
        parent: str | None = None,
        source: str = "manual",
        scores: Mapping[str, float] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> PromptVersion:
        """Store a new version with the next free id and return it.

        Raises PromptVersionNotFoundError (param "parent") when `parent` is
        not in the store, and ValueError when a score is not a finite number.
        """
        scores = dict(scores or {})
        check_scores(scores)

        with self._errors("write to"), self._cache.transact():
            if parent is not None and not self._contains(parent):
                raise PromptVersionNotFoundError(parent, param="parent")
            number = self._cache.incr(_VERSION_COUNT_KEY)
            record = PromptVersion(
                version=f"v{number}",
                system_prompt=system_prompt,
                examples=tuple(examples),
                parent=parent,
                source=source,
                scores=scores,
                metadata=dict(metadata or {}),
            )
            self._cache.set(_version_key(record.version), record.model_dump_json())
            self._cache.incr(_GENERATION_KEY)

        logger.info(
            "Created prompt version %s (source %s, parent %s)",
            record.version,
            source,
            parent,
        )
        return record

    def get(self, version: str) -> PromptVersion:
        """Return `version`, or raise PromptVersionNotFoundError if it is unknown."""
        with self._errors("read"):
            text = self._cache.get(_version_key(version))
        if text is None:
            raise PromptVersionNotFoundError(version)
        return self._parse_version(version, text)

    def list_versions(self) -> list[PromptVersion]:
        """Return every version, oldest first."""
        with self._errors("read"):
            count = self._read_counter(_VERSION_COUNT_KEY)
            texts = [
                (f"v{number}", self._cache.get(_version_key(f"v{number}")))
                for number in range(1, count + 1)
            ]
        return [self._parse_version(version, text) for version, text in texts]

    def activate(
        self,
        version: str,
        model: str | None = None,
        *,
        expected: str | Unset | None = UNSET,
    ) -> None:
        """Point `model` (the default pointer when None) at `version`.

        With `expected`, the pointer changes only if its own value (None:
        unset), not the default it falls back to, is `expected`; otherwise
        ActivationConflictError is raised and nothing changes. The check, the
        pointer, the history event, the end of a canary of `version` on this
        pointer and the generation share one transaction. Activating the
        version a pointer already has records no event. Raises ValueError for
        the model name "*", which is reserved for the default pointer.
        """
        check_model_name(model, "activate")
        key = model_key(model)
        with self._errors("write to"), self._cache.transact():
            if not self._contains(version):
                raise PromptVersionNotFoundError(version)
            pointers = self._read_pointers()
            previous = pointers.get(key)
            if not isinstance(expected, Unset) and previous != expected:
                raise ActivationConflictError(model, expected, previous)
            promoted = self._end_canary_of(key, version)
            if previous == version and promoted is None:
                return
            if previous != version:
                self._move_pointer(pointers, model, version, previous)
            self._cache.incr(_GENERATION_KEY)

        logger.info(
            "Activated prompt version %s for %s (previous %s)",
            version,
            describe_pointer(model),
            previous,
        )
        if promoted is not None:
            logger.info(
                "Ended the canary of %s for %s (share %.3g) by activating it",
                version,
                describe_pointer(model),
                promoted.share,
            )

    def set_canary(
        self, version: str, share: float, model: str | None = None
    ) -> Canary:
        """Serve `version` to a `share` of the clients of `model` (None: default).

        Replaces an earlier canary of the same pointer. A replacement of the
        same version keeps its `started_at`, and the clients already in it
        stay in it while the share grows. Raises ValueError when `share` is
        not strictly between 0 and 1 or when `version` is the version the
        pointer serves now, and PromptVersionNotFoundError for an unknown
        version.
        """
        check_model_name(model, "set the canary of")
        check_share(share)
        key = model_key(model)
        with self._errors("write to"), self._cache.transact():
            if not self._contains(version):
                raise PromptVersionNotFoundError(version)
            pointers = self._read_pointers()
            if version == pointers.get(key, pointers.get(DEFAULT_MODEL_KEY)):
                raise ValueError(
                    f"Version {version!r} is already active for "
                    f"{describe_pointer(model)}, so a canary of it would have "
                    "nothing to compare with. Choose another version."
                )
            canaries = self._read_canaries()
            earlier = canaries.get(key)
            started_at = (
                earlier.started_at
                if earlier is not None and earlier.version == version
                else datetime.now(UTC)
            )
            canary = Canary(
                model=model, version=version, share=share, started_at=started_at
            )
            canaries[key] = canary
            self._write_canaries(canaries)
            self._cache.incr(_GENERATION_KEY)

        logger.info(
            "Started a canary of %s for %s (share %.3g, replacing %s)",
            version,
            describe_pointer(model),
            share,
            earlier.version if earlier is not None else None,
        )
        return canary

    def clear_canary(self, model: str | None = None) -> Canary | None:
        """End the canary of `model`'s pointer and return it, or None if none ran."""
        key = model_key(model)
        with self._errors("write to"), self._cache.transact():
            canaries = self._read_canaries()
            ended = canaries.pop(key, None)
            if ended is None:
                return None
            self._write_canaries(canaries)
            self._cache.incr(_GENERATION_KEY)

        logger.info(
            "Ended the canary of %s for %s", ended.version, describe_pointer(model)
        )
        return ended

    def canaries(self) -> dict[str, Canary]:
        """Return every running canary, keyed like `active_pointers`."""
        with self._errors("read"):
            return self._read_canaries()

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease `name` for `ttl` seconds of wall-clock time.

        Succeeds when the lease is free, expired or already `owner`'s, and
        returns it; returns None while another owner holds it. The check and
        the write share one transaction, so two processes never both get it.
        The generation does not change, so renewals do not make gateways
        reload. Raises ValueError for an empty name or owner, or a `ttl` that
        is not a positive number.
        """
        check_lease_request(name, owner, ttl)
        with self._errors("write to"), self._cache.transact():
            now = datetime.now(UTC)
            current = self._read_lease(name)
            if (
                current is not None
                and current.owner != owner
                and current.expires_at > now
            ):
                return None
            lease = Lease(
                name=name, owner=owner, expires_at=now + timedelta(seconds=ttl)
            )
            self._cache.set(_lease_key(name), lease.model_dump_json())

        if current is not None and current.owner == owner:
            logger.debug(
                "Renewed lease %r for %r until %s",
                name,
                owner,
                lease.expires_at.isoformat(),
            )
        else:
            logger.info(
                "Lease %r taken by %r until %s (previous holder %r)",
                name,
                owner,
                lease.expires_at.isoformat(),
                current.owner if current is not None else None,
            )
        return lease

    def release_lease(self, name: str, owner: str) -> None:
        """Free lease `name` if `owner` holds it; do nothing otherwise."""
        with self._errors("write to"), self._cache.transact():
            current = self._read_lease(name)
            if current is None or current.owner != owner:
                return
            self._cache.delete(_lease_key(name))
        logger.info("Lease %r released by %r", name, owner)

    def lease(self, name: str) -> Lease | None:
        """Return the unexpired holder of lease `name`, or None."""
        with self._errors("read"):
            current = self._read_lease(name)
        if current is None or current.expires_at <= datetime.now(UTC):
            return None
        return current

    def active_version(self, model: str | None = None) -> str | None:
        """Return the version `model` is served: its own pointer, else the default."""
        key = model_key(model)
        with self._errors("read"):
            pointers = self._read_pointers()
        return pointers.get(key, pointers.get(DEFAULT_MODEL_KEY))

    def active_pointers(self) -> dict[str, str]:
        """Return every pointer, keyed by model name with "*" for the default."""
        with self._errors("read"):
            return self._read_pointers()

    def history(self, model: str | None = None) -> list[ActivationEvent]:
        """Return the activations of `model`'s pointer (None: default), oldest first."""
        if model == DEFAULT_MODEL_KEY:
            model = None
        with self._errors("read"):
            count = self._read_counter(_HISTORY_COUNT_KEY)
            texts = [
                self._cache.get(_event_key(index)) for index in range(1, count + 1)
            ]
        events = [self._parse_event(index, text) for index, text in enumerate(texts, 1)]
        return [event for event in events if event.model == model]

    def generation(self) -> int:
        """Return a counter that increases on every change to versions or pointers.

        Canary changes count too, but lease changes do not.
        """
        with self._errors("read"):
            return self._read_counter(_GENERATION_KEY)

    def ensure_seeded(self, instruction: Instruction) -> PromptVersion | None:
        """Create v1 from `instruction` and make it the default when the store is empty.

        The check and both writes share one transaction, so processes that
        start together create exactly one v1. Returns None when the store
        already had versions.
        """
        with self._errors("seed"), self._cache.transact():
            if self._read_counter(_VERSION_COUNT_KEY) > 0:
                return None
            record = self.create(
                instruction.system_prompt, instruction.examples, source="builtin"
            )
            self.activate(record.version)
        return record

    def close(self) -> None:
        """Close the SQLite connections of this process."""
        self._cache.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Convert diskcache and SQLite failures into StoreError naming the path."""
        try:
            yield
        except diskcache.Timeout:
            raise StoreError(
                f"Could not {action} the prompt store at {str(self.directory)!r}: "
                f"another process held its write lock for more than "
                f"{self._timeout} s. Retry the command."
            ) from None
        except (sqlite3.Error, OSError) as error:
            raise StoreError(
                f"Could not {action} the prompt store at {str(self.directory)!r}: "
                f"{error}. Check that the directory is readable and writable and "
                "that its cache.db is a diskcache database, or choose another "
                "directory with --data-dir or DRPO_DATA_DIR."
            ) from error

    def _contains(self, version: str) -> bool:
        return self._cache.get(_version_key(version)) is not None

    def _read_counter(self, key: str) -> int:
        value = self._cache.get(key, 0)
        if not isinstance(value, int):
            raise self._corrupt(f"counter {key!r}", f"{value!r} is not an integer")
        return value

    def _read_pointers(self) -> dict[str, str]:
        text = self._cache.get(_POINTERS_KEY)
        if text is None:
            return {}
        try:
            return _POINTERS_ADAPTER.validate_json(text)
        except ValidationError as error:
            raise self._corrupt("the active pointers", first_problem(error)) from None

    def _read_canaries(self) -> dict[str, Canary]:
        text = self._cache.get(_CANARIES_KEY)
        if text is None:
            return {}
        try:
            return _CANARIES_ADAPTER.validate_json(text)
        except ValidationError as error:
            raise self._corrupt("the canaries", first_problem(error)) from None

    def _write_canaries(self, canaries: dict[str, Canary]) -> None:
        self._cache.set(_CANARIES_KEY, _CANARIES_ADAPTER.dump_json(canaries).decode())

    def _end_canary_of(self, key: str, version: str) -> Canary | None:
        """Remove and return the canary of pointer `key` if it serves `version`."""
        canaries = self._read_canaries()
        canary = canaries.get(key)
        if canary is None or canary.version != version:
            return None
        del canaries[key]
        self._write_canaries(canaries)
        return canary

    def _move_pointer(
        self,
        pointers: dict[str, str],
        model: str | None,
        version: str,
        previous: str | None,
    ) -> None:
        pointers[model_key(model)] = version
        self._append_event(
            ActivationEvent(
                model=model, version=version, previous=previous, at=datetime.now(UTC)
            )
        )
        self._cache.set(_POINTERS_KEY, json.dumps(pointers, sort_keys=True))

    def _read_lease(self, name: str) -> Lease | None:
        text = self._cache.get(_lease_key(name))
        if text is None:
            return None
        try:
            return Lease.model_validate_json(text)
        except ValidationError as error:
            raise self._corrupt(f"lease {name!r}", first_problem(error)) from None

    def _append_event(self, event: ActivationEvent) -> None:
        index = self._cache.incr(_HISTORY_COUNT_KEY)
        self._cache.set(_event_key(index), event.model_dump_json())

    def _parse_version(self, version: str, text: object) -> PromptVersion:
        if text is None:
            raise self._corrupt(f"prompt version {version!r}", "the record is missing")
        if not isinstance(text, str):
            raise self._corrupt(f"prompt version {version!r}", "the record is not text")
        try:
            record = PromptVersion.model_validate_json(text)
        except ValidationError as error:
            raise self._corrupt(
                f"prompt version {version!r}", first_problem(error)
            ) from None
        if record.version != version:
            raise self._corrupt(
                f"prompt version {version!r}",
                f"the record is labelled {record.version!r}",
            )
        return record

    def _parse_event(self, index: int, text: object) -> ActivationEvent:
        if not isinstance(text, str):
            raise self._corrupt(f"history event {index}", "the record is missing")
        try:
            return ActivationEvent.model_validate_json(text)
        except ValidationError as error:
            raise self._corrupt(
                f"history event {index}", first_problem(error)
            ) from None

    def _corrupt(self, item: str, problem: str) -> StoreError:
        return StoreError(
            f"The prompt store at {str(self.directory)!r} is corrupt: {item} "
            f"cannot be read because {problem}. Restore the directory from a "
            "backup, or export the readable versions with `drpo-gateway prompts "
            "export VERSION ...` and import them into a new directory."
        )
