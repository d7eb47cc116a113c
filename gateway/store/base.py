"""The prompt store interface shared by every backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from gateway.errors import ConfigurationError
from gateway.instruction import Example, Instruction, PromptVersion

# Key of the default pointer, which serves every model without its own pointer.
# The public methods take `model=None` for it.
DEFAULT_MODEL_KEY = "*"


class StoreError(ConfigurationError):
    """The prompt store cannot be opened or read, or a record in it is corrupt."""


class ActivationEvent(BaseModel):
    """One change of an active pointer, recorded so that it can be rolled back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None
    """Model whose pointer changed, or None for the default pointer."""
    version: str
    previous: str | None
    """Version of the pointer before the change, or None if it was unset."""
    at: datetime


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

    def activate(self, version: str, model: str | None = None) -> None:
        """Point `model` (the default pointer when None) at `version`."""
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
        """Return a counter that increases on every create and activate."""
        ...

    def ensure_seeded(self, instruction: Instruction) -> PromptVersion | None:
        """Create and activate a first version when the store is empty.

        Returns the new version, or None when the store already had versions.
        """
        ...

    def close(self) -> None:
        """Release the store's connections."""
        ...
