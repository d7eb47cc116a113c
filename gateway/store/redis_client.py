"""Connections to the Redis server that holds the prompt and sample stores.

Both stores share these client settings, the conversion of redis-py errors
into StoreError without the password, and the listener thread that delivers
change notifications.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import redis
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.store.base import StoreError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to the Redis server."""
COMMAND_TIMEOUT = 5.0
"""Seconds to wait for the reply to one command before it fails."""
HEALTH_CHECK_INTERVAL = 10
"""Seconds of silence after which a connection is checked with PING before use."""

# The change listener reconnects after a failure with a delay that doubles
# from the first value to the second, in seconds.
_RECONNECT_DELAYS = (0.1, 2.0)
_LISTEN_TIMEOUT = 0.5
_FAILURE_LOG_EVERY = 50


def redact_url(url: str) -> str:
    """Return `url` with its password, in the user part or the query, as "***"."""
    parts = urlsplit(url)
    redacted = url
    if parts.password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        redacted = redacted.replace(f"{userinfo}@", f"{parts.username or ''}:***@", 1)
    return re.sub(r"([?&])password=[^&#]*", r"\1password=***", redacted)


def connect(url: str | SecretStr) -> redis.Redis:
    """Return a client of the Redis server at `url` without connecting yet.

    Commands are not retried by the client, because a retried EXEC after a
    timeout could apply a change twice. Callers retry by calling again.
    """
    text = url.get_secret_value() if isinstance(url, SecretStr) else url
    try:
        return redis.Redis.from_url(
            text,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=COMMAND_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as error:
        raise StoreError(
            f"The Redis URL {redact_url(text)!r} is invalid: "
            f"{_scrub(str(error), text)}. Set DRPO_REDIS_URL to a URL such as "
            "redis://:PASSWORD@HOST:6379/0."
        ) from None


@contextmanager
def redis_errors(store: str, location: str, action: str) -> Iterator[None]:
    """Convert redis-py errors into StoreError naming `store` and the redacted URL."""
    try:
        yield
    except redis.RedisError as error:
        raise StoreError(
            f"Could not {action} the {store} in Redis at {location}: "
            f"{type(error).__name__}: {str(error).rstrip('.')}. Check that the "
            "Redis server is running and reachable from this host, and that "
            "DRPO_REDIS_URL (redis_url) has the right host, port, password and "
            "database."
        ) from error


def _scrub(message: str, url: str) -> str:
    password = urlsplit(url).password
    return message.replace(password, "***") if password else message


def reply_text(value: object) -> str | None:
    """Return a reply as text. The client decodes replies, so bytes are rare."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


class ChangeListener:
    """A thread that calls a callback for every message on a change channel.

    It subscribes again after a lost connection, with a delay that doubles
    from 0.1 s up to 2 s, so a Redis restart never ends it.
    """

    def __init__(
        self,
        client: redis.Redis,
        channel: str,
        callback: Callable[[], None],
        location: str,
    ) -> None:
        self._client = client
        self._channel = channel
        self._callback = callback
        self._location = location
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="drpo-redis-changes", daemon=True
        )
        self._failures = 0
        self.subscribed = threading.Event()
        """Set while the subscription is confirmed by the server."""

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to `timeout` seconds for it to end."""
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = _RECONNECT_DELAYS[0]
        while not self._stop.is_set():
            try:
                self._listen()
            # Any failure, expected or a bug, is logged and retried, because
            # the gateway would otherwise fall back to polling for good.
            except Exception as error:
                self._record_failure(error, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, _RECONNECT_DELAYS[1])
            else:
                delay = _RECONNECT_DELAYS[0]

    def _listen(self) -> None:
        pubsub = self._client.pubsub()
        try:
            pubsub.subscribe(self._channel)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=_LISTEN_TIMEOUT)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    self._record_subscribed()
                if message["type"] in ("subscribe", "message"):
                    self._notify()
        finally:
            self.subscribed.clear()
            pubsub.close()

    def _notify(self) -> None:
        try:
            self._callback()
        except Exception:
            logger.exception("Prompt store change callback %r failed", self._callback)

    def _record_subscribed(self) -> None:
        self.subscribed.set()
        if self._failures:
            logger.info(
                "Subscribed again to %s at %s after %d failed attempts",
                self._channel,
                self._location,
                self._failures,
            )
            self._failures = 0
        else:
            logger.debug("Subscribed to %s at %s", self._channel, self._location)

    def _record_failure(self, error: Exception, delay: float) -> None:
        self._failures += 1
        if self._failures % _FAILURE_LOG_EVERY == 1:
            logger.warning(
                "Lost the subscription to %s at %s (%d failures in a row; "
                "retrying in %.1f s, and polling meanwhile): %s: %s",
                self._channel,
                self._location,
                self._failures,
                delay,
                type(error).__name__,
                error,
                exc_info=not isinstance(error, redis.RedisError),
            )
