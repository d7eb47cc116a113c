"""Versioned store of alignment instructions and the gateway's live view of it."""

from gateway.store.active import ActivePrompts
from gateway.store.base import (
    DEFAULT_MODEL_KEY,
    ActivationEvent,
    PromptStore,
    StoreError,
)
from gateway.store.disk import DiskPromptStore

__all__ = [
    "DEFAULT_MODEL_KEY",
    "ActivationEvent",
    "ActivePrompts",
    "DiskPromptStore",
    "PromptStore",
    "StoreError",
]
