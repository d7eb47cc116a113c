"""Opening the prompt store and the sample store that the settings choose."""

from __future__ import annotations

from pydantic import SecretStr

from gateway.errors import ConfigurationError
from gateway.sampling.redis_store import RedisSampleStore
from gateway.sampling.store import DiskSampleStore, SampleStore
from gateway.settings import Settings
from gateway.store.base import PromptStore
from gateway.store.disk import DiskPromptStore
from gateway.store.redis import RedisPromptStore


def open_prompt_store(settings: Settings) -> PromptStore:
    """Open the prompt store of `settings.store_backend`.

    Raises StoreError when the store cannot be opened, such as a Redis server
    that does not answer.
    """
    if settings.store_backend == "redis":
        return RedisPromptStore(_redis_url(settings), prefix=settings.redis_prefix)
    return DiskPromptStore(settings.store_dir)


def open_sample_store(settings: Settings) -> SampleStore:
    """Open the sample store of `settings.store_backend`, bounded by sample_max_count.

    Raises StoreError when the store cannot be opened.
    """
    if settings.store_backend == "redis":
        return RedisSampleStore(
            _redis_url(settings),
            prefix=settings.redis_prefix,
            max_count=settings.sample_max_count,
        )
    return DiskSampleStore(settings.sample_dir, max_count=settings.sample_max_count)


def check_stores(settings: Settings) -> None:
    """Open and close the stores that a gateway with `settings` uses.

    Raises StoreError, a ConfigurationError, when one cannot be opened. Run
    before an engine starts or a port is bound, this turns an unreachable
    Redis server into a one-line start-up error.
    """
    open_prompt_store(settings).close()
    if settings.sample_rate > 0:
        open_sample_store(settings).close()


def _redis_url(settings: Settings) -> SecretStr:
    # Settings validation rejects this combination already; this check covers
    # settings built with model_construct, which skips validation.
    if settings.redis_url is None:
        raise ConfigurationError(
            "DRPO_STORE_BACKEND=redis (store_backend) needs DRPO_REDIS_URL "
            "(redis_url), such as redis://127.0.0.1:6379/0."
        )
    return settings.redis_url
