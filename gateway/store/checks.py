"""Argument checks shared by every prompt store backend."""

from __future__ import annotations

import math
from collections.abc import Mapping

from pydantic import ValidationError

from gateway.store.base import DEFAULT_MODEL_KEY


def check_model_name(model: str | None, action: str) -> None:
    """Raise ValueError for "*", which only the default pointer uses."""
    if model == DEFAULT_MODEL_KEY:
        raise ValueError(
            f"Model name {DEFAULT_MODEL_KEY!r} is reserved for the default "
            f"pointer; pass model=None to {action} the default."
        )


def check_share(share: float) -> None:
    """Raise ValueError unless `share` is strictly between 0 and 1."""
    # The negated comparison also rejects NaN.
    if not 0.0 < share < 1.0:
        raise ValueError(
            f"Canary share {share!r} is invalid: it must be strictly between 0 "
            "and 1, such as 0.1 for 10% of clients."
        )


def check_lease_request(name: str, owner: str, ttl: float) -> None:
    """Raise ValueError for an empty lease name or owner, or a bad ttl."""
    if not name or not owner:
        raise ValueError(
            f"Lease name {name!r} and owner {owner!r} must both be non-empty."
        )
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(
            f"Lease time-to-live {ttl!r} is invalid: pass a positive number of seconds."
        )


def check_scores(scores: Mapping[str, float]) -> None:
    """Raise ValueError for a score that is not a finite number."""
    for name, value in scores.items():
        if not math.isfinite(value):
            raise ValueError(
                f"Score {name!r} is {value!r}, but scores must be finite numbers."
            )


def first_problem(error: ValidationError) -> str:
    """Return the first problem of a validation error, with its location."""
    problem = error.errors()[0]
    location = ".".join(str(part) for part in problem["loc"]) or "the record"
    return f"{location}: {problem['msg']}"
