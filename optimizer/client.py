"""Cached, concurrency-limited client for the OpenAI-compatible endpoints of all roles.

Every model call of a DRPO run goes through one `ModelClient`, so that:

- one global semaphore bounds the upstream requests in flight, whatever role
  sends them;
- a persistent cache keyed by a hash of the full request replays earlier
  responses, so an interrupted run resumes without paying again;
- calls, cache hits and tokens are counted per role, and an optional budget is
  checked before each upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import diskcache
import httpx

from optimizer.errors import OptimizerError
from optimizer.types import Usage

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""Tries per call for connection failures, timeouts and retryable statuses."""

# 408 and 429 are client statuses that a later retry usually gets past
# (request timeout, rate limit); every other 4xx fails at once.
RETRYABLE_STATUSES = frozenset({408, 429})

_DETAIL_CHARS = 300
_CACHE_ERRORS_LOGGED_EVERY = 100


OPTIMIZER_HEADERS = {"x-drpo-prompt": "off", "x-drpo-sample": "off"}
"""Headers of every optimizer call. A role pointed at a drpo-gateway then gets
no injected instruction, and the optimizer's own calls are not sampled as
traffic; other servers ignore them."""


class ModelCallError(OptimizerError):
    """A model endpoint failed, rejected the request or returned no JSON object."""

    def __init__(self, message: str, endpoint: Endpoint, status: int | None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status


class BudgetExceededError(OptimizerError):
    """The run's budget of upstream calls or tokens is spent."""


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server and the model one role calls on it.

    `base_url` includes the API prefix, as in ``http://127.0.0.1:8080/v1``.
    A trailing slash is removed. `cache_name`, when set, replaces `base_url`
    in cache keys. Set it for a server whose URL changes between runs, such
    as the embedded llama-server on a free port, so that a rerun still finds
    its cached responses.
    """

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    cache_name: str | None = None

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise OptimizerError(
                f"Endpoint URL {self.base_url!r} is invalid. Give the base URL of "
                "an OpenAI-compatible server, such as http://127.0.0.1:8080/v1."
            )
        if not self.model:
            raise OptimizerError(
                f"Endpoint {self.base_url!r} has no model name. Give the name the "
                "server serves (GET /v1/models lists them)."
            )
        object.__setattr__(self, "base_url", self.base_url.rstrip("/"))


@dataclass(frozen=True)
class Budget:
    """Limits on the upstream requests of one run; None means no limit.

    `max_calls` counts every request sent, retries included. `max_tokens`
    counts prompt plus completion tokens as the servers report them. Cache
    hits are free.
    """

    max_calls: int | None = None
    max_tokens: int | None = None


def request_key(endpoint: Endpoint, path: str, body: Mapping[str, Any]) -> str:
    """Return the cache key of a request: the SHA-256 of its canonical JSON.

    The key covers the base URL (or the endpoint's `cache_name`), the model,
    the path and the whole body, but not the API key, so rotating a key keeps
    the cache.
    """
    payload = {
        "base_url": endpoint.cache_name or endpoint.base_url,
        "model": endpoint.model,
        "path": path,
        "body": body,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_cacheable(response: Mapping[str, Any]) -> bool:
    """Return whether a response is worth replaying: no error and some choices."""
    choices = response.get("choices")
    return "error" not in response and isinstance(choices, list) and bool(choices)


class _ResponseCache:
    """Fail-open store of response JSON, on disk or, without a directory, in memory.

    Values are stored as JSON text, so reading one back never unpickles.
    Every cache error is logged and counted, and then treated as a miss.
    """

    _ERRORS = (OSError, sqlite3.Error, diskcache.Timeout, ValueError)

    def __init__(self, directory: Path | None) -> None:
        self.errors = 0
        self._memory: dict[str, str] = {}
        self._disk: diskcache.Cache | None = None
        if directory is None:
            return
        try:
            self._disk = diskcache.Cache(str(directory))
        except self._ERRORS as error:
            self._count_error("open", str(directory), error)

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            text = self._memory.get(key)
            if text is None and self._disk is not None:
                text = self._disk.get(key)
            if not isinstance(text, str):
                return None
            value = json.loads(text)
        except self._ERRORS as error:
            self._count_error("read", key, error)
            return None
        return value if isinstance(value, dict) else None

    def set(self, key: str, response: Mapping[str, Any]) -> None:
        text = json.dumps(response, separators=(",", ":"))
        if self._disk is None:
            self._memory[key] = text
            return
        try:
            self._disk.set(key, text)
        except self._ERRORS as error:
            self._count_error("write", key, error)

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()

    def _count_error(self, action: str, subject: str, error: Exception) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % _CACHE_ERRORS_LOGGED_EVERY == 0:
            logger.warning(
                "Model cache %s failed for %s (%d cache errors so far), "
                "continuing without the cache entry: %r",
                action,
                subject,
                self.errors,
                error,
            )


class _KeyLocks:
    """One asyncio lock per cache key, dropped when its last user leaves.

    Identical requests that arrive together wait for the first one and then
    find its response in the cache, so the upstream receives the request once.
    """

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _RetryableError(Exception):
    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class ModelClient:
    """Client shared by every role of a run (see the module docstring).

    `usage` counts per role the upstream requests sent (`calls`, retries
    included), the requests served from the cache (`cache_hits`) and the
    tokens that the upstream reported. Tokens of cache hits are not counted
    anywhere, so the token counts are what this process paid for.

    `http` is an optional client to send with. The ModelClient closes only a
    client that it created itself, and `timeout` (seconds) applies only to
    that one. `retry_delay` is the wait in seconds before the second try,
    doubled before each later one.
    """

    def __init__(
        self,
        cache_dir: Path | None,
        concurrency: int,
        budget: Budget | None = None,
        http: httpx.AsyncClient | None = None,
        timeout: float = 600,
        retry_delay: float = 0.5,
    ) -> None:
        if concurrency < 1:
            raise OptimizerError(
                f"Concurrency must be at least 1, got {concurrency}. "
                "Pass the number of model calls allowed in flight at once."
            )
        self.budget = budget or Budget()
        self.retry_delay = retry_delay
        self._semaphore = asyncio.Semaphore(concurrency)
        self._cache = _ResponseCache(cache_dir)
        self._locks = _KeyLocks()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._usage: dict[str, Usage] = {}
        self._calls_sent = 0
        self._tokens_spent = 0

    @property
    def usage(self) -> Mapping[str, Usage]:
        return dict(self._usage)

    @property
    def cache_errors(self) -> int:
        """Number of cache reads and writes that failed and were skipped."""
        return self._cache.errors

    async def complete(
        self, role: str, endpoint: Endpoint, path: str, body: Mapping[str, Any]
    ) -> dict[str, Any]:
        """POST `body` to `endpoint.base_url + path` and return the JSON response.

        `path` is "/chat/completions" or "/completions". The body's "model" is
        set to `endpoint.model`. A response with an "error" key or without
        choices is returned but not cached.

        Raises ModelCallError when the endpoint fails after `MAX_ATTEMPTS`
        tries or rejects the request, and BudgetExceededError when the budget
        is spent before an upstream request.
        """
        request = {**body, "model": endpoint.model}
        key = request_key(endpoint, path, request)
        async with self._locks.hold(key):
            cached = self._cache.get(key)
            if cached is not None:
                self._record(role, cache_hits=1)
                logger.debug("Cache hit for a %s call to %s", role, endpoint.base_url)
                return cached

            response = await self._send_with_retries(role, endpoint, path, request)
            if is_cacheable(response):
                self._cache.set(key, response)
            return response

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()
        self._cache.close()

    async def __aenter__(self) -> ModelClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _send_with_retries(
        self, role: str, endpoint: Endpoint, path: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        url = endpoint.base_url + path
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await self._send_once(role, endpoint, url, request)
            except _RetryableError as error:
                if attempt == MAX_ATTEMPTS:
                    raise ModelCallError(
                        f"The {role} call to {url} (model {endpoint.model!r}) "
                        f"failed after {MAX_ATTEMPTS} tries: {error.reason}. "
                        "Check that the server is running and reachable, or "
                        "configure another endpoint for this role.",
                        endpoint,
                        error.status,
                    ) from error
                delay = self.retry_delay * 2 ** (attempt - 1)
                logger.warning(
                    "The %s call to %s (model %r) failed on try %d of %d: %s; "
                    "retrying in %.1f s",
                    role,
                    url,
                    endpoint.model,
                    attempt,
                    MAX_ATTEMPTS,
                    error.reason,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last try returns or raises")

    async def _send_once(
        self, role: str, endpoint: Endpoint, url: str, request: dict[str, Any]
    ) -> dict[str, Any]:
        headers = dict(OPTIMIZER_HEADERS)
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        async with self._semaphore:
            self._check_budget()
            self._calls_sent += 1
            self._record(role, calls=1)
            try:
                reply = await self._http.post(url, json=request, headers=headers)
            except httpx.TimeoutException as error:
                raise _RetryableError(f"timed out ({error!r})", None) from error
            except httpx.TransportError as error:
                raise _RetryableError(f"connection failed ({error!r})", None) from error

        status = reply.status_code
        if status >= 500 or status in RETRYABLE_STATUSES:
            raise _RetryableError(f"HTTP {status} ({_detail(reply)})", status)
        if status >= 400:
            raise ModelCallError(
                f"The {role} call to {url} (model {endpoint.model!r}) was rejected "
                f"with HTTP {status}: {_detail(reply).rstrip('.')}. "
                f"{_client_error_hint(status, _detail(reply))}",
                endpoint,
                status,
            )
        response = _json_object(reply, role, endpoint, url)
        self._record_tokens(role, response)
        return response

    def _check_budget(self) -> None:
        max_calls, max_tokens = self.budget.max_calls, self.budget.max_tokens
        if max_calls is not None and self._calls_sent + 1 > max_calls:
            raise BudgetExceededError(
                f"The budget of {max_calls} upstream calls is spent. Raise the "
                "call budget, or rerun with the same cache directory to reuse "
                "the responses already paid for."
            )
        if max_tokens is not None and self._tokens_spent >= max_tokens:
            raise BudgetExceededError(
                f"The budget of {max_tokens} tokens is spent "
                f"({self._tokens_spent} used). Raise the token budget, or rerun "
                "with the same cache directory to reuse the responses already "
                "paid for."
            )

    def _record_tokens(self, role: str, response: Mapping[str, Any]) -> None:
        usage = response.get("usage")
        if not isinstance(usage, Mapping):
            return
        prompt = _token_count(usage.get("prompt_tokens"))
        completion = _token_count(usage.get("completion_tokens"))
        self._tokens_spent += prompt + completion
        self._record(role, prompt_tokens=prompt, completion_tokens=completion)

    def _record(
        self,
        role: str,
        calls: int = 0,
        cache_hits: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        current = self._usage.get(role, Usage())
        self._usage[role] = replace(
            current,
            calls=current.calls + calls,
            cache_hits=current.cache_hits + cache_hits,
            prompt_tokens=current.prompt_tokens + prompt_tokens,
            completion_tokens=current.completion_tokens + completion_tokens,
        )


def _json_object(
    reply: httpx.Response, role: str, endpoint: Endpoint, url: str
) -> dict[str, Any]:
    try:
        value = reply.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise ModelCallError(
            f"The {role} call to {url} (model {endpoint.model!r}) returned HTTP "
            f"{reply.status_code} without a JSON object: {_detail(reply)}. Check "
            "that the URL points at an OpenAI-compatible API (it usually ends "
            "with /v1).",
            endpoint,
            reply.status_code,
        )
    return value


def _client_error_hint(status: int, detail: str = "") -> str:
    if status == 404 and "model" in detail.lower():
        return (
            "Pass a model name the server lists at GET /v1/models "
            "(--model, --helpers-model or --judge-model)."
        )
    if status == 404:
        return (
            "Check that the endpoint URL is the API base, which usually ends "
            "with /v1, and that the server serves this path."
        )
    if status in (401, 403):
        return "Check the API key configured for this role."
    return "Check the model name and the request options that this server supports."


def _detail(reply: httpx.Response) -> str:
    """Return the error message of a reply, or the start of its body."""
    try:
        body = reply.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = body["error"].get("message")
        if isinstance(message, str):
            return message[:_DETAIL_CHARS]
    text = reply.text.strip()
    return repr(text[:_DETAIL_CHARS]) if text else "empty body"


def _token_count(value: object) -> int:
    return value if isinstance(value, int) and value >= 0 else 0
