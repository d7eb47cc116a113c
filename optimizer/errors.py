"""Exception tree of the optimizer."""

from __future__ import annotations


class OptimizerError(Exception):
    """Base class of every error the optimizer raises on purpose."""


class SeedFileError(OptimizerError):
    """A query or seed example file is missing, unreadable or has an invalid entry.

    `line` is 1-based and `field` names the JSON field. Either is None when the
    error is not about one line or one field.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


class SearchError(OptimizerError):
    """The prompt search cannot run with the given settings or queries."""
