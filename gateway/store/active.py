"""The gateway's live view of the active prompt versions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from gateway.errors import PromptVersionNotFoundError, ServiceUnavailableError
from gateway.instruction import PromptVersion
from gateway.store.base import DEFAULT_MODEL_KEY, PromptStore, StoreError

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, PromptVersion]], None]

# While the store keeps failing, one warning is logged per this many polls
# (about 20 s at the default interval) instead of one per poll.
_FAILURE_LOG_EVERY = 100


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    versions: Mapping[str, PromptVersion]
    """Active version per pointer key, "*" for the default."""


_EMPTY_SNAPSHOT = _Snapshot(generation=-1, versions=MappingProxyType({}))


class ActivePrompts:
    """Active versions of a PromptStore, reloaded when its generation changes.

    The snapshot is an immutable mapping replaced in one assignment, so a
    request that resolved a version keeps it even if a swap happens meanwhile.
    `resolve` reads only memory, except for the first request that pins a
    version not loaded yet.
    """

    def __init__(self, store: PromptStore, poll_interval: float = 0.2) -> None:
        if poll_interval <= 0:
            raise ValueError(
                f"poll_interval must be a positive number of seconds, "
                f"got {poll_interval!r}."
            )
        self._store = store
        self._poll_interval = poll_interval
        self._snapshot = _EMPTY_SNAPSHOT
        # Versions are immutable, so every record fetched once stays valid.
        self._fetched: dict[str, PromptVersion] = {}
        self._listeners: list[Listener] = []
        self._task: asyncio.Task[None] | None = None
        self._failed_polls = 0

    async def __aenter__(self) -> ActivePrompts:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load the active versions, then poll the store in a background task.

        A store error during this first load propagates, so the gateway does
        not start without its prompts. Errors in later polls are only logged.
        """
        if self._task is not None:
            raise RuntimeError("ActivePrompts.start() was called twice.")
        await self._reload()
        self._task = asyncio.create_task(
            self._poll_forever(), name="drpo-prompt-store-poll"
        )
        logger.info(
            "Watching the prompt store (generation %d, every %.2f s)",
            self._snapshot.generation,
            self._poll_interval,
        )

    async def stop(self) -> None:
        """Cancel the polling task and wait for it to end."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    @property
    def generation(self) -> int:
        """Store generation of the loaded snapshot, or -1 before `start`."""
        return self._snapshot.generation

    @property
    def active(self) -> Mapping[str, PromptVersion]:
        """Read-only mapping of pointer key ("*" for the default) to version."""
        return self._snapshot.versions

    def add_listener(self, callback: Listener) -> None:
        """Call `callback` with the active versions after every reload.

        The callback runs on the event loop and gets its own copy of the
        mapping, keyed like `active_pointers`. An exception in it is logged.
        """
        self._listeners.append(callback)

    def resolve(self, model: str, pinned: str | None = None) -> PromptVersion | None:
        """Return the version for a request, or None when no pointer applies.

        A `pinned` version wins. Otherwise the model's own pointer applies,
        and then the default pointer. Raises PromptVersionNotFoundError (param
        "x-drpo-prompt") for an unknown pinned version, and
        ServiceUnavailableError when the store cannot be read to fetch it.
        """
        if pinned is not None:
            return self._fetch_pinned(pinned)
        versions = self._snapshot.versions
        return versions.get(model) or versions.get(DEFAULT_MODEL_KEY)

    def _fetch_pinned(self, version: str) -> PromptVersion:
        record = self._fetched.get(version)
        if record is not None:
            return record

        # NOTE: this one store read runs on the caller's thread (the event
        # loop); with DiskPromptStore it is one indexed SQLite query.
        try:
            record = self._store.get(version)
        except PromptVersionNotFoundError:
            raise PromptVersionNotFoundError(version, param="x-drpo-prompt") from None
        except StoreError as error:
            logger.warning(
                "Failed to fetch pinned prompt version %r: %s", version, error
            )
            raise ServiceUnavailableError(
                f"The prompt store could not be read to fetch version {version!r}. "
                "Retry later, or send the request without x-drpo-prompt.",
                param="x-drpo-prompt",
            ) from error

        self._fetched[version] = record
        return record

    async def _reload(self) -> None:
        snapshot = await asyncio.to_thread(self._load_snapshot)
        self._snapshot = snapshot
        self._notify_listeners(snapshot)

    def _load_snapshot(self) -> _Snapshot:
        # The generation is read before the pointers. A change that lands
        # between the two reads leaves the snapshot with the older generation,
        # so the next poll loads again instead of missing the change.
        generation = self._store.generation()
        pointers = self._store.active_pointers()
        versions = {key: self._fetch(version) for key, version in pointers.items()}
        return _Snapshot(generation=generation, versions=MappingProxyType(versions))

    def _fetch(self, version: str) -> PromptVersion:
        record = self._fetched.get(version)
        if record is None:
            record = self._store.get(version)
            self._fetched[version] = record
        return record

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                generation = await asyncio.to_thread(self._store.generation)
                if generation != self._snapshot.generation:
                    await self._reload()
            except Exception as error:  # a failed poll must never end the task
                self._record_failure(error)
            else:
                self._record_success()

    def _record_failure(self, error: Exception) -> None:
        self._failed_polls += 1
        if self._failed_polls % _FAILURE_LOG_EVERY == 1:
            logger.warning(
                "Prompt store poll failed (%d in a row, retrying every %.2f s): %s",
                self._failed_polls,
                self._poll_interval,
                error,
                exc_info=not isinstance(error, StoreError),
            )

    def _record_success(self) -> None:
        if self._failed_polls:
            logger.info(
                "Prompt store poll recovered after %d failed polls", self._failed_polls
            )
            self._failed_polls = 0

    def _notify_listeners(self, snapshot: _Snapshot) -> None:
        for callback in self._listeners:
            try:
                callback(dict(snapshot.versions))
            except Exception:
                logger.exception("Prompt store listener %r failed", callback)
        if snapshot.generation >= 0:
            logger.debug("Loaded prompt store generation %d", snapshot.generation)
