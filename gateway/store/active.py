"""The gateway's live view of the active prompt versions."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from gateway.errors import PromptVersionNotFoundError, ServiceUnavailableError
from gateway.instruction import PromptVersion
from gateway.store.base import DEFAULT_MODEL_KEY, Canary, PromptStore, StoreError

logger = logging.getLogger(__name__)

Listener = Callable[[dict[str, PromptVersion]], None]
CanaryListener = Callable[[dict[str, Canary]], None]

# While the store keeps failing, one warning is logged per this many polls
# (about 20 s at the default interval) instead of one per poll.
_FAILURE_LOG_EVERY = 100


class ChangeSubscription(Protocol):
    """A running subscription to a store's change notifications."""

    def close(self) -> None:
        """Stop the notifications and release the connection they use."""
        ...


@runtime_checkable
class ChangeNotifier(Protocol):
    """A PromptStore that announces its changes, such as RedisPromptStore.

    Stores without it are only polled.
    """

    def subscribe_changes(self, callback: Callable[[], None]) -> ChangeSubscription:
        """Call `callback`, from any thread, soon after each change."""
        ...


def canary_bucket(version: str, client: str) -> float:
    """Return the position in [0, 1) of `client` in the canary of `version`.

    The position is the first 53 bits of SHA-256 of the pair, divided by
    2**53. A client keeps its position for the whole canary, also when its
    share grows, and clients whose position is below the share get the canary.
    """
    digest = hashlib.sha256(f"{version}\0{client}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / 2**53


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    versions: Mapping[str, PromptVersion]
    """Active version per pointer key, "*" for the default."""
    canaries: Mapping[str, Canary]
    """Running canary per pointer key."""
    canary_versions: Mapping[str, PromptVersion]
    """Record of each canary's version, keyed like `canaries`."""


_EMPTY_SNAPSHOT = _Snapshot(
    generation=-1,
    versions=MappingProxyType({}),
    canaries=MappingProxyType({}),
    canary_versions=MappingProxyType({}),
)


class ActivePrompts:
    """Active versions and canaries of a PromptStore, reloaded on a new generation.

    The store's generation is checked every `poll_interval` seconds. With
    `push` and a store that is a ChangeNotifier, it is also checked as soon
    as the store announces a change, and polling remains the fallback while
    the notifications are down.

    The snapshot is immutable and replaced in one assignment, so a request
    that resolved a version keeps it even if a swap happens meanwhile.
    `resolve` reads only memory, except for the first request that pins a
    version not loaded yet.
    """

    def __init__(
        self, store: PromptStore, poll_interval: float = 0.2, *, push: bool = True
    ) -> None:
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
        self._canary_listeners: list[CanaryListener] = []
        self._task: asyncio.Task[None] | None = None
        self._failed_polls = 0
        self._push = push
        self._subscription: ChangeSubscription | None = None
        self._wake = asyncio.Event()

    async def __aenter__(self) -> ActivePrompts:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Load the active versions, then watch the store in a background task.

        A store error during this first load propagates, so the gateway does
        not start without its prompts. Errors in later polls are only logged.
        """
        if self._task is not None:
            raise RuntimeError("ActivePrompts.start() was called twice.")
        await self._reload()
        self._subscribe()
        self._task = asyncio.create_task(
            self._poll_forever(), name="drpo-prompt-store-poll"
        )
        logger.info(
            "Watching the prompt store (generation %d, every %.2f s, %s)",
            self._snapshot.generation,
            self._poll_interval,
            "and on every change notification"
            if self._subscription is not None
            else "polling only",
        )

    async def stop(self) -> None:
        """End the change subscription and the polling task, and wait for both."""
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            await asyncio.to_thread(subscription.close)
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

    @property
    def active_canaries(self) -> Mapping[str, Canary]:
        """Read-only mapping of pointer key ("*" for the default) to its canary."""
        return self._snapshot.canaries

    def add_listener(self, callback: Listener) -> None:
        """Call `callback` with the active versions after every reload.

        The callback runs on the event loop and gets its own copy of the
        mapping, keyed like `active_pointers`. An exception in it is logged.
        """
        self._listeners.append(callback)

    def add_canary_listener(self, callback: CanaryListener) -> None:
        """Call `callback` with the running canaries after every reload.

        It runs like the callbacks of `add_listener`, with a copy of the
        mapping keyed like `active_pointers`, empty when no canary runs.
        """
        self._canary_listeners.append(callback)

    def resolve(
        self, model: str, pinned: str | None = None, client: str | None = None
    ) -> PromptVersion | None:
        """Return the version for a request, or None when no pointer applies.

        A `pinned` version wins. Otherwise a model with its own pointer or its
        own canary follows that pointer key, and every other model the
        default one. When that key has a canary and `client` is given, the
        clients whose `canary_bucket` is below the share get the canary's
        version. The rest get the model's own pointer, else the default.

        Raises PromptVersionNotFoundError (param "x-drpo-prompt") for an
        unknown pinned version, and ServiceUnavailableError when the store
        cannot be read to fetch it.
        """
        if pinned is not None:
            return self._fetch_pinned(pinned)
        snapshot = self._snapshot
        if client is not None:
            canary_version = _canary_for(snapshot, model, client)
            if canary_version is not None:
                return canary_version
        versions = snapshot.versions
        return versions.get(model) or versions.get(DEFAULT_MODEL_KEY)

    def _fetch_pinned(self, version: str) -> PromptVersion:
        record = self._fetched.get(version)
        if record is not None:
            return record

        # NOTE: this one store read runs on the caller's thread (the event
        # loop); with DiskPromptStore it is one indexed SQLite query, and
        # with RedisPromptStore one HGET, which blocks the loop for up to
        # its 5 s command timeout while the server does not respond.
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
        if not snapshot.versions and self._snapshot.versions:
            # No operation removes every pointer, so an empty store that had
            # pointers was lost, e.g. a Redis server restarted without
            # persistence. Serving no instruction would fail every client.
            if self._snapshot.generation != snapshot.generation:
                logger.warning(
                    "The prompt store has no active versions any more (generation "
                    "%d, was %d); keeping the last loaded ones. Restore it with "
                    "`drpo-gateway prompts import` or activate a version.",
                    snapshot.generation,
                    self._snapshot.generation,
                )
            self._snapshot = replace(self._snapshot, generation=snapshot.generation)
            return
        self._snapshot = snapshot
        self._notify_listeners(snapshot)

    def _load_snapshot(self) -> _Snapshot:
        # The generation is read first. A change that lands between the reads
        # leaves the snapshot with the older generation, so the next poll
        # loads again instead of missing the change. The canaries are read
        # before the pointers: a promotion that lands in between then gives
        # a snapshot with both the canary and the promoted pointer, which
        # serve the same version, never the old pointer without the canary.
        generation = self._store.generation()
        canaries = self._store.canaries()
        pointers = self._store.active_pointers()
        versions = {key: self._fetch(version) for key, version in pointers.items()}
        canary_versions = {
            key: self._fetch(canary.version) for key, canary in canaries.items()
        }
        return _Snapshot(
            generation=generation,
            versions=MappingProxyType(versions),
            canaries=MappingProxyType(canaries),
            canary_versions=MappingProxyType(canary_versions),
        )

    def _fetch(self, version: str) -> PromptVersion:
        record = self._fetched.get(version)
        if record is None:
            record = self._store.get(version)
            self._fetched[version] = record
        return record

    def _subscribe(self) -> None:
        if not self._push or not isinstance(self._store, ChangeNotifier):
            return
        loop = asyncio.get_running_loop()

        def wake() -> None:
            # Runs on the store's listener thread.
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._wake.set)

        self._subscription = self._store.subscribe_changes(wake)

    async def _wait_for_change(self) -> None:
        """Return after `poll_interval` seconds, or sooner on a change notification."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self._poll_interval)
        self._wake.clear()

    async def _poll_forever(self) -> None:
        while True:
            await self._wait_for_change()
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
        for canary_callback in self._canary_listeners:
            try:
                canary_callback(dict(snapshot.canaries))
            except Exception:
                logger.exception("Prompt store listener %r failed", canary_callback)
        if snapshot.generation >= 0:
            logger.debug("Loaded prompt store generation %d", snapshot.generation)


def _canary_for(snapshot: _Snapshot, model: str, client: str) -> PromptVersion | None:
    """Return the canary version `client` gets for `model`, or None for control."""
    has_own_key = model in snapshot.versions or model in snapshot.canaries
    key = model if has_own_key else DEFAULT_MODEL_KEY
    canary = snapshot.canaries.get(key)
    if canary is None or canary_bucket(canary.version, client) >= canary.share:
        return None
    return snapshot.canary_versions[key]
