"""The sidecar lease: one holder at a time per prompt store, renewed in the background.

Two sidecars on one store would otherwise both publish. The holder renews the
lease every third of its time to live. A sidecar that cannot take it waits
on standby, and a holder whose renewal fails stops publishing until it has
the lease again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from datetime import UTC, datetime

from gateway.store.base import Lease, PromptStore, StoreError

logger = logging.getLogger(__name__)

LEASE_NAME = "optimizer"


def new_owner_id() -> str:
    """Return an owner id: host name, process id and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class LeaseKeeper:
    """Takes, renews and releases the sidecar lease for one owner."""

    def __init__(
        self,
        store: PromptStore,
        owner: str,
        ttl: float,
        name: str = LEASE_NAME,
    ) -> None:
        self.store = store
        self.owner = owner
        self.ttl = ttl
        self.name = name
        self.held = False
        self._expires_at: datetime | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._last_holder: str | None = None

    def try_acquire(self) -> bool:
        """Take or renew the lease, and log the holder once when another one has it.

        A lease of a process on this host that no longer runs is taken over
        at once instead of waiting for it to expire.
        """
        lease = self._acquire()
        if lease is None:
            lease = self._take_over_dead_holder()
        if lease is None:
            self._note_holder()
            return False
        if not self.held:
            logger.info(
                "Took the %r lease as %s until %s",
                self.name,
                self.owner,
                lease.expires_at.isoformat(),
            )
        self.held = True
        self._expires_at = lease.expires_at
        self._last_holder = None
        return True

    def confirm(self) -> bool:
        """Renew the lease now and return whether this owner still holds it.

        Called right before every change to the store's pointers, so that a
        sidecar that lost its lease never publishes.
        """
        if not self.held:
            return False
        lease = self._acquire()
        if lease is None:
            self._lose("another owner holds it now")
            return False
        self._expires_at = lease.expires_at
        return True

    def start_renewing(self) -> None:
        if self._renewer is None:
            self._renewer = asyncio.create_task(
                self._renew_forever(), name="drpo-optimizer-lease"
            )

    async def release(self) -> None:
        """Stop renewing and free the lease if this owner holds it."""
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        if self.held:
            try:
                self.store.release_lease(self.name, self.owner)
            except StoreError as error:
                logger.warning("Could not release the %r lease: %s", self.name, error)
            logger.info("Released the %r lease", self.name)
        self.held = False

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self.held:
                continue
            try:
                lease = self._acquire()
            except StoreError as error:
                if self._expired():
                    self._lose(f"renewals failed until it expired: {error}")
                else:
                    logger.warning("Could not renew the %r lease: %s", self.name, error)
                continue
            if lease is None:
                self._lose("another owner holds it now")
            else:
                self._expires_at = lease.expires_at

    def _acquire(self) -> Lease | None:
        return self.store.acquire_lease(self.name, self.owner, self.ttl)

    def _take_over_dead_holder(self) -> Lease | None:
        holder = self.store.lease(self.name)
        if holder is None or not _is_dead_local_process(holder.owner):
            return None
        logger.warning(
            "The %r lease belongs to %s, a process on this host that no longer "
            "runs; taking it over",
            self.name,
            holder.owner,
        )
        self.store.release_lease(self.name, holder.owner)
        return self._acquire()

    def _note_holder(self) -> None:
        holder = self.store.lease(self.name)
        owner = holder.owner if holder else None
        if owner == self._last_holder:
            return
        self._last_holder = owner
        until = holder.expires_at.isoformat() if holder else "unknown"
        logger.info(
            "On standby: the %r lease is held by %s until %s (renewed while it runs)",
            self.name,
            owner,
            until,
        )

    def _lose(self, why: str) -> None:
        if self.held:
            logger.warning(
                "Lost the %r lease (%s); nothing is published until it is back",
                self.name,
                why,
            )
        self.held = False

    def _expired(self) -> bool:
        return self._expires_at is None or datetime.now(UTC) >= self._expires_at


def _is_dead_local_process(owner: str) -> bool:
    """Return whether `owner` names a process of this host that has exited."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
