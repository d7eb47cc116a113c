"""The prompt store interface shared by every backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from gateway.errors import ConfigurationError
from gateway.instruction import Example, Instruction, PromptVersion

# Key of the default pointer, which serves every model without its own pointer.
# The public methods take `model=None` for it.
DEFAULT_MODEL_KEY = "*"


class StoreError(ConfigurationError):
    """The prompt store cannot be opened or read, or a record in it is corrupt."""


class ActivationConflictError(StoreError):
    """A pointer was not at the version the caller expected, so it was left alone."""

    def __init__(self, model: str | None, expected: str | None, found: str | None):
        self.model = model
        self.expected = expected
        self.found = found
        target = describe_pointer(model)
        super().__init__(
            f"The active version of {target} is {found!r}, not {expected!r} as "
            "expected: another process changed it first. Reload and retry."
        )


class Canary(BaseModel):
    """A version served to a consistent share of clients before it is promoted."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None
    """Model whose traffic is split, or None for models on the default pointer."""
    version: str
    share: float
    """Fraction of clients, in (0, 1), whose requests get `version`."""
    started_at: datetime


class Lease(BaseModel):
    """A named lock with an owner and an expiry, held by a long-running process."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    owner: str
    expires_at: datetime


class ActivationEvent(BaseModel):
    """One change of an active pointer, recorded so that it can be rolled back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None
    """Model whose pointer changed, or None for the default pointer."""
    version: str
    previous: str | None
    """Version of the pointer before the change, or None if it was unset."""
    at: datetime


class Unset(Enum):
    """Type of UNSET, the default of arguments where None is a meaningful value."""

    UNSET = "unset"


UNSET = Unset.UNSET


def describe_pointer(model: str | None) -> str:
    """Return how messages name the pointer of `model`."""
    return "the default pointer" if model is None else f"model {model!r}"


def model_key(model: str | None) -> str:
    """Return the pointer key of `model`, where None and "*" mean the default."""
    return DEFAULT_MODEL_KEY if model is None else model


class PromptStore(Protocol):
    """A versioned store of alignment instructions with one pointer per model.

    Versions are immutable once created. `activate` is the only change to a
    pointer, and every activation is kept in the history.
    """

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
        """Store a new version with the next free id and return it."""
        ...

    def get(self, version: str) -> PromptVersion:
        """Return `version`, or raise PromptVersionNotFoundError if it is unknown."""
        ...

    def list_versions(self) -> list[PromptVersion]:
        """Return every version, oldest first."""
        ...

    def activate(
        self,
        version: str,
        model: str | None = None,
        *,
        expected: str | Unset | None = UNSET,
    ) -> None:
        """Point `model` (the default pointer when None) at `version`.

        With `expected`, the pointer changes only if its own current value
        (None: unset) is `expected`; otherwise ActivationConflictError is
        raised and nothing changes. Activating the version of the model's
        canary also ends that canary, in the same transaction.
        """
        ...

    def set_canary(
        self, version: str, share: float, model: str | None = None
    ) -> Canary:
        """Serve `version` to a `share` of the clients of `model` (None: default).

        Replaces an earlier canary of the same pointer, and changes the
        generation. Raises ValueError when `share` is not strictly between 0
        and 1 or when `version` is the one the pointer serves now (its own
        version, else the default's), and PromptVersionNotFoundError for an
        unknown version.
        """
        ...

    def clear_canary(self, model: str | None = None) -> Canary | None:
        """End the canary of `model`'s pointer and return it, or None if none ran."""
        ...

    def canaries(self) -> dict[str, Canary]:
        """Return every running canary, keyed like `active_pointers`."""
        ...

    def acquire_lease(self, name: str, owner: str, ttl: float) -> Lease | None:
        """Take or renew lease `name` for `ttl` seconds.

        Succeeds when the lease is free, expired or already `owner`'s, and
        returns it; returns None while another owner holds it. Expiry is wall
        clock time in UTC. Lease changes leave the generation alone, so
        renewals do not make gateways reload.
        """
        ...

    def release_lease(self, name: str, owner: str) -> None:
        """Free lease `name` if `owner` holds it; do nothing otherwise."""
        ...

    def lease(self, name: str) -> Lease | None:
        """Return the unexpired holder of lease `name`, or None."""
        ...

    def active_version(self, model: str | None = None) -> str | None:
        """Return the version `model` is served: its own pointer, else the default."""
        ...

    def active_pointers(self) -> dict[str, str]:
        """Return every pointer, keyed by model name with "*" for the default."""
        ...

    def history(self, model: str | None = None) -> list[ActivationEvent]:
        """Return the activations of `model`'s pointer (None: default), oldest first."""
        ...

    def generation(self) -> int:
        """Return a counter that increases on every change to versions or pointers.

        Canary changes count too, but lease changes do not.
        """
        ...

    def ensure_seeded(self, instruction: Instruction) -> PromptVersion | None:
        """Create and activate a first version when the store is empty.

        Returns the new version, or None when the store already had versions.
        """
        ...

    def close(self) -> None:
        """Release the store's connections."""
        ...
