"""Versioned store of alignment instructions and the gateway's live view of it."""

from gateway.store.active import ActivePrompts
from gateway.store.base import (
    DEFAULT_MODEL_KEY,
    UNSET,
    ActivationConflictError,
    ActivationEvent,
    Canary,
    Lease,
    PromptStore,
    StoreError,
)
from gateway.store.disk import DiskPromptStore

__all__ = [
    "DEFAULT_MODEL_KEY",
    "UNSET",
    "ActivationConflictError",
    "ActivationEvent",
    "ActivePrompts",
    "Canary",
    "DiskPromptStore",
    "Lease",
    "PromptStore",
    "StoreError",
]
