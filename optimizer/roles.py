"""The four model roles of a DRPO run and the endpoint each one calls."""

from __future__ import annotations

from dataclasses import dataclass, replace

from optimizer.client import Endpoint


@dataclass(frozen=True)
class RoleSet:
    """Endpoints of the target, aspect selector, judge and optimizer roles."""

    target: Endpoint
    selector: Endpoint
    judge: Endpoint
    optimizer: Endpoint

    @classmethod
    def single(cls, endpoint: Endpoint) -> RoleSet:
        """Return a role set in which one model plays every role (self-alignment)."""
        return cls(endpoint, endpoint, endpoint, endpoint)

    def with_helpers(self, endpoint: Endpoint) -> RoleSet:
        """Return a copy whose selector, judge and optimizer call `endpoint`.

        The target keeps its endpoint.
        """
        return replace(self, selector=endpoint, judge=endpoint, optimizer=endpoint)
