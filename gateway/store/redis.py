"""The prompt store in a Redis server, shared by gateway replicas and the sidecar.

Keys, all under one prefix (default "drpo"):

- `<prefix>:version-count`: the number of the newest version.
- `<prefix>:versions`: a hash of version id to the PromptVersion JSON.
- `<prefix>:pointers`: a hash of pointer key ("*" for the default) to version id.
- `<prefix>:canaries`: a hash of pointer key to the Canary JSON.
- `<prefix>:history`: a list of ActivationEvent JSON, oldest first.
- `<prefix>:generation`: the change counter.
- `<prefix>:lease:<name>`: the Lease JSON, with a Redis expiry at its end.

Every change that bumps the generation also publishes the new generation on
the channel `<prefix>:changes`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import redis
from pydantic import SecretStr, ValidationError
from redis.client import Pipeline

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
from gateway.store.redis_client import (
    ChangeListener,
    connect,
    redact_url,
    redis_errors,
    reply_text,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Optimistic transactions (WATCH, MULTI, EXEC) are retried when another client
# wrote a watched key first. Each round has a winner, so only a process that
# keeps losing to a stream of other writers gets this far.
_MAX_ATTEMPTS = 100
_RETRY_JITTER = 0.002


@dataclass(frozen=True)
class _Keys:
    prefix: str

    @property
    def version_count(self) -> str:
        return f"{self.prefix}:version-count"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def pointers(self) -> str:
        return f"{self.prefix}:pointers"

    @property
    def canaries(self) -> str:
        return f"{self.prefix}:canaries"

    @property
    def history(self) -> str:
        return f"{self.prefix}:history"

    @property
    def generation(self) -> str:
        return f"{self.prefix}:generation"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:changes"

    def lease(self, name: str) -> str:
        return f"{self.prefix}:lease:{name}"


@dataclass(frozen=True)
class _Activation:
    previous: str | None
    promoted: Canary | None
    changed: bool


class RedisPromptStore:
    """A PromptStore in a Redis server, shared by every process that uses it.

    Each change is one optimistic transaction: the keys it reads are watched,
    its writes run in MULTI/EXEC, and it starts over when another client
    changed a watched key first. Every change that bumps the generation
    watches the generation key, so such changes apply one at a time, and
    version ids stay unique across processes.
    """

    def __init__(self, url: str | SecretStr, prefix: str = "drpo") -> None:
        """Connect to the Redis server at `url` and check that it responds to PING.

        Raises StoreError, without the password, when the URL is invalid or
        the server cannot be reached.
        """
        text = url.get_secret_value() if isinstance(url, SecretStr) else url
        self.location = redact_url(text)
        self.prefix = prefix
        self._keys = _Keys(prefix)
        self._client = connect(text)
        with self._errors("connect to"):
            self._client.ping()

    def __repr__(self) -> str:
        return f"RedisPromptStore({self.location!r}, prefix={self.prefix!r})"

    def __enter__(self) -> RedisPromptStore:
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
        not in the store, and ValueError when a score is not a finite number
        or the metadata cannot be written as JSON.
        """
        scores = dict(scores or {})
        check_scores(scores)
        keys = self._keys

        def write(pipe: Pipeline) -> PromptVersion:
            if parent is not None and not pipe.hexists(keys.versions, parent):
                raise PromptVersionNotFoundError(parent, param="parent")
            number = self._read_int(pipe.get(keys.version_count), "version count") + 1
            record = PromptVersion(
                version=f"v{number}",
                system_prompt=system_prompt,
                examples=tuple(examples),
                parent=parent,
                source=source,
                scores=scores,
                metadata=dict(metadata or {}),
            )
            text = record.model_dump_json()
            generation = self._read_generation(pipe)
            pipe.multi()
            pipe.hset(keys.versions, record.version, text)
            pipe.set(keys.version_count, number)
            self._queue_bump(pipe, generation)
            return record

        record = self._transact(
            "write to", [keys.version_count, keys.generation], write
        )
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
            text = reply_text(self._client.hget(self._keys.versions, version))
        if text is None:
            raise PromptVersionNotFoundError(version)
        return self._parse_version(version, text)

    def list_versions(self) -> list[PromptVersion]:
        """Return every version, oldest first."""
        with self._errors("read"):
            count = self._read_int(
                self._client.get(self._keys.version_count), "version count"
            )
            if count == 0:
                return []
            names = [f"v{number}" for number in range(1, count + 1)]
            texts = self._client.hmget(self._keys.versions, names)
        return [
            self._parse_version(name, reply_text(text))
            for name, text in zip(names, texts, strict=True)
        ]

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
        keys = self._keys

        def write(pipe: Pipeline) -> _Activation:
            if not pipe.hexists(keys.versions, version):
                raise PromptVersionNotFoundError(version)
            previous = reply_text(pipe.hget(keys.pointers, key))
            if not isinstance(expected, Unset) and previous != expected:
                raise ActivationConflictError(model, expected, previous)
            canary = self._read_canary(pipe, key)
            promoted = None
            if canary is not None and canary.version == version:
                promoted = canary
            if previous == version and promoted is None:
                return _Activation(previous, None, changed=False)
            generation = self._read_generation(pipe)
            pipe.multi()
            if previous != version:
                event = ActivationEvent(
                    model=model, version=version, previous=previous, at=_now()
                )
                pipe.hset(keys.pointers, key, version)
                pipe.rpush(keys.history, event.model_dump_json())
            if promoted is not None:
                pipe.hdel(keys.canaries, key)
            self._queue_bump(pipe, generation)
            return _Activation(previous, promoted, changed=True)

        watched = [keys.pointers, keys.canaries, keys.generation]
        outcome = self._transact("write to", watched, write)
        if not outcome.changed:
            return

        logger.info(
            "Activated prompt version %s for %s (previous %s)",
            version,
            describe_pointer(model),
            outcome.previous,
        )
        if outcome.promoted is not None:
            logger.info(
                "Ended the canary of %s for %s (share %.3g) by activating it",
                version,
                describe_pointer(model),
                outcome.promoted.share,
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
        keys = self._keys

        def write(pipe: Pipeline) -> tuple[Canary, Canary | None]:
            if not pipe.hexists(keys.versions, version):
                raise PromptVersionNotFoundError(version)
            own, default = pipe.hmget(keys.pointers, [key, DEFAULT_MODEL_KEY])
            if version == reply_text(own if own is not None else default):
                raise ValueError(
                    f"Version {version!r} is already active for "
                    f"{describe_pointer(model)}, so a canary of it would have "
                    "nothing to compare with. Choose another version."
                )
            earlier = self._read_canary(pipe, key)
            started_at = (
                earlier.started_at
                if earlier is not None and earlier.version == version
                else _now()
            )
            canary = Canary(
                model=model, version=version, share=share, started_at=started_at
            )
            generation = self._read_generation(pipe)
            pipe.multi()
            pipe.hset(keys.canaries, key, canary.model_dump_json())
            self._queue_bump(pipe, generation)
            return canary, earlier

        watched = [keys.pointers, keys.canaries, keys.generation]
        canary, earlier = self._transact("write to", watched, write)
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
        keys = self._keys

        def write(pipe: Pipeline) -> Canary | None:
            ended = self._read_canary(pipe, key)
            if ended is None:
                return None
            generation = self._read_generation(pipe)
            pipe.multi()
            pipe.hdel(keys.canaries, key)
            self._queue_bump(pipe, generation)
            return ended

        ended = self._transact("write to", [keys.canaries, keys.generation], write)
        if ended is not None:
            logger.info(
                "Ended the canary of %s for %s",
                ended.version,
                describe_pointer(model),
            )
        return ended

    def canaries(self) -> dict[str, Canary]:
        """Return every running canary, keyed like `active_pointers`."""
        with self._errors("read"):
            texts = self._client.hgetall(self._keys.canaries)
        return {
            str(key): self._parse_canary(str(key), reply_text(text))
            for key, text in texts.items()
        }

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease `name` for `ttl` seconds of wall-clock time.

        Succeeds when the lease is free, expired or already `owner`'s, and
        returns it; returns None while another owner holds it. Expiry is
        checked against this host's clock, as in DiskPromptStore, and the
        Redis key also expires after `ttl` so that a lease of a crashed
        holder does not linger. The generation does not change, so renewals
        do not make gateways reload. Raises ValueError for an empty name or
        owner, or a `ttl` that is not a positive number.
        """
        check_lease_request(name, owner, ttl)
        key = self._keys.lease(name)

        def write(pipe: Pipeline) -> tuple[Lease | None, Lease | None]:
            now = _now()
            current = self._parse_lease(name, reply_text(pipe.get(key)))
            if (
                current is not None
                and current.owner != owner
                and current.expires_at > now
            ):
                return None, current
            lease = Lease(
                name=name, owner=owner, expires_at=now + timedelta(seconds=ttl)
            )
            pipe.multi()
            pipe.set(key, lease.model_dump_json(), px=max(1, math.ceil(ttl * 1000)))
            return lease, current

        lease, current = self._transact("write to", [key], write)
        if lease is None:
            return None

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
        key = self._keys.lease(name)

        def write(pipe: Pipeline) -> bool:
            current = self._parse_lease(name, reply_text(pipe.get(key)))
            if current is None or current.owner != owner:
                return False
            pipe.multi()
            pipe.delete(key)
            return True

        if self._transact("write to", [key], write):
            logger.info("Lease %r released by %r", name, owner)

    def lease(self, name: str) -> Lease | None:
        """Return the unexpired holder of lease `name`, or None."""
        with self._errors("read"):
            text = reply_text(self._client.get(self._keys.lease(name)))
        current = self._parse_lease(name, text)
        if current is None or current.expires_at <= _now():
            return None
        return current

    def active_version(self, model: str | None = None) -> str | None:
        """Return the version `model` is served: its own pointer, else the default."""
        with self._errors("read"):
            own, default = self._client.hmget(
                self._keys.pointers, [model_key(model), DEFAULT_MODEL_KEY]
            )
        return reply_text(own if own is not None else default)

    def active_pointers(self) -> dict[str, str]:
        """Return every pointer, keyed by model name with "*" for the default."""
        with self._errors("read"):
            pointers = self._client.hgetall(self._keys.pointers)
        return {str(key): str(value) for key, value in pointers.items()}

    def history(self, model: str | None = None) -> list[ActivationEvent]:
        """Return the activations of `model`'s pointer (None: default), oldest first."""
        if model == DEFAULT_MODEL_KEY:
            model = None
        with self._errors("read"):
            texts = self._client.lrange(self._keys.history, 0, -1)
        events = [
            self._parse_event(index, reply_text(text))
            for index, text in enumerate(texts, 1)
        ]
        return [event for event in events if event.model == model]

    def generation(self) -> int:
        """Return a counter that increases on every change to versions or pointers.

        Canary changes count too, but lease changes do not.
        """
        with self._errors("read"):
            return self._read_int(self._client.get(self._keys.generation), "generation")

    def ensure_seeded(self, instruction: Instruction) -> PromptVersion | None:
        """Create v1 from `instruction` and make it the default when the store is empty.

        The check and every write share one transaction, so processes that
        start together create exactly one v1. The seeding bumps the
        generation once. Returns None when the store already had versions.
        """
        keys = self._keys

        def write(pipe: Pipeline) -> PromptVersion | None:
            if self._read_int(pipe.get(keys.version_count), "version count") > 0:
                return None
            record = PromptVersion(
                version="v1",
                system_prompt=instruction.system_prompt,
                examples=instruction.examples,
                source="builtin",
            )
            previous = reply_text(pipe.hget(keys.pointers, DEFAULT_MODEL_KEY))
            event = ActivationEvent(
                model=None, version="v1", previous=previous, at=_now()
            )
            generation = self._read_generation(pipe)
            pipe.multi()
            pipe.hset(keys.versions, "v1", record.model_dump_json())
            pipe.set(keys.version_count, 1)
            pipe.hset(keys.pointers, DEFAULT_MODEL_KEY, "v1")
            pipe.rpush(keys.history, event.model_dump_json())
            self._queue_bump(pipe, generation)
            return record

        watched = [keys.version_count, keys.pointers, keys.generation]
        record = self._transact("seed", watched, write)
        if record is not None:
            logger.info(
                "Created prompt version v1 (source builtin) and activated it "
                "for the default pointer"
            )
        return record

    def subscribe_changes(self, callback: Callable[[], None]) -> ChangeListener:
        """Call `callback` from a thread after every change that bumps the generation.

        The callback also runs each time the subscription is made or made
        again after a lost connection, because changes may have been missed
        meanwhile. Close the returned listener to stop it.
        """
        listener = ChangeListener(
            self._client, self._keys.channel, callback, self.location
        )
        listener.start()
        return listener

    def close(self) -> None:
        """Close the connections of this client."""
        self._client.close()

    def _transact(
        self, action: str, watched: Sequence[str], write: Callable[[Pipeline], T]
    ) -> T:
        """Run `write` under WATCH of `watched`, again while another client wins.

        `write` reads through the pipeline, then calls `multi()` and queues
        its writes. If it queues none, the transaction only confirms that the
        watched keys did not change meanwhile.
        """
        with self._errors(action):
            for attempt in range(_MAX_ATTEMPTS):
                with self._client.pipeline() as pipe:
                    pipe.watch(*watched)  # type: ignore[no-untyped-call]
                    result = write(pipe)
                    try:
                        pipe.execute()
                    except redis.WatchError:
                        time.sleep(random.uniform(0, _RETRY_JITTER * (attempt + 1)))
                        continue
                    return result
        raise StoreError(
            f"Could not {action} the prompt store in Redis at {self.location}: "
            f"other clients changed it first {_MAX_ATTEMPTS} times in a row. "
            "Retry the command."
        )

    def _queue_bump(self, pipe: Pipeline, generation: int) -> None:
        """Queue the generation increase and its announcement on the channel."""
        pipe.set(self._keys.generation, generation + 1)
        pipe.publish(self._keys.channel, generation + 1)

    def _read_generation(self, pipe: Pipeline) -> int:
        return self._read_int(pipe.get(self._keys.generation), "generation")

    def _read_int(self, value: object, item: str) -> int:
        text = reply_text(value)
        if text is None:
            return 0
        try:
            return int(text)
        except ValueError:
            raise self._corrupt(item, f"{text!r} is not an integer") from None

    def _read_canary(self, pipe: Pipeline, key: str) -> Canary | None:
        text = reply_text(pipe.hget(self._keys.canaries, key))
        return None if text is None else self._parse_canary(key, text)

    def _parse_canary(self, key: str, text: str | None) -> Canary:
        try:
            return Canary.model_validate_json(text or "")
        except ValidationError as error:
            raise self._corrupt(
                f"the canary of {key!r}", first_problem(error)
            ) from None

    def _parse_lease(self, name: str, text: str | None) -> Lease | None:
        if text is None:
            return None
        try:
            return Lease.model_validate_json(text)
        except ValidationError as error:
            raise self._corrupt(f"lease {name!r}", first_problem(error)) from None

    def _parse_version(self, version: str, text: str | None) -> PromptVersion:
        if text is None:
            raise self._corrupt(f"prompt version {version!r}", "the record is missing")
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

    def _parse_event(self, index: int, text: str | None) -> ActivationEvent:
        try:
            return ActivationEvent.model_validate_json(text or "")
        except ValidationError as error:
            raise self._corrupt(
                f"history event {index}", first_problem(error)
            ) from None

    def _corrupt(self, item: str, problem: str) -> StoreError:
        return StoreError(
            f"The prompt store in Redis at {self.location} (key prefix "
            f"{self.prefix!r}) is corrupt: {item} cannot be read because "
            f"{problem}. Restore the Redis data from a backup, or export the "
            "readable versions with `drpo-gateway prompts export VERSION ...` "
            "and import them under another DRPO_REDIS_PREFIX."
        )

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return redis_errors("prompt store", self.location, action)


def _now() -> datetime:
    return datetime.now(UTC)
