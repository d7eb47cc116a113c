"""The sample store in a Redis server, shared by gateway replicas and the sidecar.

Keys, under the same prefix as the prompt store:

- `<prefix>:samples`: a list of Sample JSON, oldest first.
- `<prefix>:sample-clients`: a list of the client id of each sample, in the
  same order.
- `<prefix>:sample-counts`: a hash of client id to its number of samples.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from types import TracebackType

from pydantic import SecretStr, ValidationError

from gateway.sampling.store import Sample
from gateway.store.redis_client import connect, redact_url, redis_errors

logger = logging.getLogger(__name__)

# Appends one sample and its client, then evicts the oldest samples past the
# bound, keeping the per-client counts right. A script runs atomically, so
# the three keys always agree.
# KEYS: samples, sample-clients, sample-counts. ARGV: JSON, client, bound.
_ADD_SCRIPT = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
local excess = redis.call('LLEN', KEYS[1]) - tonumber(ARGV[3])
for _ = 1, excess do
  redis.call('LPOP', KEYS[1])
  local client = redis.call('LPOP', KEYS[2])
  if client and redis.call('HINCRBY', KEYS[3], client, -1) <= 0 then
    redis.call('HDEL', KEYS[3], client)
  end
end
return math.max(excess, 0)
"""


class RedisSampleStore:
    """A SampleStore in a Redis server, bounded to `max_count` samples.

    Each add runs one Lua script that appends the sample, evicts the oldest
    samples past the bound and keeps a sample count per client, so every
    gateway replica can write to the same store.
    """

    def __init__(
        self, url: str | SecretStr, *, prefix: str = "drpo", max_count: int = 10000
    ) -> None:
        """Connect to the Redis server at `url` and check that it responds to PING.

        Raises StoreError, without the password, when the URL is invalid or
        the server cannot be reached.
        """
        if max_count < 1:
            raise ValueError(f"max_count must be at least 1, got {max_count!r}.")
        text = url.get_secret_value() if isinstance(url, SecretStr) else url
        self.location = redact_url(text)
        self.prefix = prefix
        self.max_count = max_count
        self._samples_key = f"{prefix}:samples"
        self._clients_key = f"{prefix}:sample-clients"
        self._counts_key = f"{prefix}:sample-counts"
        self._client = connect(text)
        self._add = self._client.register_script(_ADD_SCRIPT)
        with self._errors("connect to"):
            self._client.ping()

    def __repr__(self) -> str:
        return f"RedisSampleStore({self.location!r}, prefix={self.prefix!r})"

    def __enter__(self) -> RedisSampleStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def add(self, sample: Sample) -> None:
        """Store `sample`, evicting the oldest samples past `max_count`."""
        keys = [self._samples_key, self._clients_key, self._counts_key]
        with self._errors("write to"):
            self._add(
                keys=keys,
                args=[sample.model_dump_json(), sample.client, self.max_count],
            )

    def recent(self, limit: int, since: datetime | None = None) -> list[Sample]:
        """Return up to `limit` of the newest samples, newest last.

        With `since`, only samples whose time is at or after it; the search
        stops at the first older sample, as in DiskSampleStore. A naive
        `since` is taken as UTC. An unreadable sample is skipped and logged,
        so the result can hold fewer than `limit` samples.
        """
        if limit <= 0:
            return []
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        with self._errors("read"):
            texts = self._client.lrange(self._samples_key, -limit, -1)

        newest_first: list[Sample] = []
        for offset, text in enumerate(reversed(texts)):
            sample = self._parse(offset, text)
            if sample is None:
                continue
            if since is not None and sample.time < since:
                break
            newest_first.append(sample)
        newest_first.reverse()
        return newest_first

    def count(self) -> int:
        """Return the number of stored samples."""
        with self._errors("read"):
            return int(self._client.llen(self._samples_key))

    def count_for(self, client: str) -> int:
        """Return the number of stored samples of `client`."""
        with self._errors("read"):
            value = self._client.hget(self._counts_key, client)
        return int(value) if value is not None else 0

    def close(self) -> None:
        """Close the connections of this client."""
        self._client.close()

    def _parse(self, offset: int, text: object) -> Sample | None:
        try:
            return Sample.model_validate_json(str(text))
        except ValidationError as error:
            # Only the location and the kind of the problem are logged,
            # because the input may quote request text.
            problem = error.errors(include_input=False)[0]
            logger.warning(
                "Skipping unreadable sample %d from the newest in %s: %s: %s",
                offset,
                self.location,
                ".".join(str(part) for part in problem["loc"]) or "the record",
                problem["msg"],
            )
            return None

    def _errors(self, action: str) -> AbstractContextManager[None]:
        return redis_errors("sample store", self.location, action)
