"""HTTP client for the upstream model server and the mapping of its failures."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass

import httpx

from gateway.errors import UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from gateway.settings import InjectionMode, Settings

logger = logging.getLogger(__name__)

# Request headers never forwarded to the upstream: the client's credentials
# belong to the gateway, and the hop-by-hop headers belong to one connection.
DROPPED_REQUEST_HEADERS = frozenset(
    {
        "authorization",
        "api-key",
        "x-api-key",
        "host",
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-authorization",
        "accept-encoding",
        "cookie",
    }
)
DROPPED_RESPONSE_HEADERS = frozenset(
    {
        "content-length",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-encoding",
    }
)


@dataclass(frozen=True)
class UpstreamTarget:
    """The upstream server: its URL, key, default injection mode and health URL."""

    base_url: str
    api_key: str | None = None
    default_mode: InjectionMode = InjectionMode.CHAT
    health_url: str | None = None
    served_models: tuple[str, ...] = ()
    """Model names a managed engine serves; empty lets every name through."""


class UpstreamClient:
    """One pooled httpx client for every call to the upstream."""

    def __init__(self, target: UpstreamTarget, settings: Settings) -> None:
        self.target = target
        headers = {"accept": "application/json"}
        if target.api_key:
            headers["authorization"] = f"Bearer {target.api_key}"
        self._client = httpx.AsyncClient(
            base_url=target.base_url,
            headers=headers,
            timeout=httpx.Timeout(
                connect=settings.upstream_connect_timeout,
                read=settings.upstream_read_timeout,
                write=settings.upstream_read_timeout,
                pool=settings.upstream_connect_timeout,
            ),
            limits=httpx.Limits(
                max_connections=settings.upstream_max_connections,
                max_keepalive_connections=settings.upstream_max_connections,
            ),
        )

    @property
    def http(self) -> httpx.AsyncClient:
        return self._client

    async def close(self) -> None:
        await self._client.aclose()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Send a request and yield the response before its body is read.

        Connection failures and timeouts raise UpstreamError subclasses; the
        status is left to the caller.
        """
        request = self._client.build_request(
            method, path, content=content, headers=headers, params=params
        )
        with upstream_errors(self.target.base_url):
            response = await self._send(request, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def post_json(
        self, path: str, content: bytes, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """POST a JSON body and return the body of a 2xx response.

        A 4xx response raises UpstreamStatusError carrying the upstream body; a
        5xx raises UpstreamError.
        """
        request = self._client.build_request(
            "POST", path, content=content, headers=_json_headers(headers)
        )
        with upstream_errors(self.target.base_url):
            response = await self._send(request, stream=False)
        check_status(response, response.content)
        return response.content

    async def _send(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send `request`, once more on a new connection if a pooled one was stale.

        A keep-alive connection that the server closed meanwhile fails with
        "Server disconnected without sending a response" before any byte of
        the response. llama-server does this to some connections that carried
        a stream. The request is sent again, which is safe for completions
        because they have no side effects.
        """
        try:
            return await self._client.send(request, stream=stream)
        except httpx.RemoteProtocolError as error:
            if "without sending a response" not in str(error):
                raise
            logger.debug("Retrying on a new connection after: %s", error)
            return await self._client.send(request, stream=stream)

    async def is_ready(self) -> bool:
        """Return whether the upstream answers its health or models endpoint."""
        url = self.target.health_url or "/models"
        try:
            response = await self._client.get(url, timeout=2.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200


def _json_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    merged = {"content-type": "application/json"}
    if headers:
        merged.update(headers)
    return merged


def check_status(response: httpx.Response, body: bytes) -> None:
    """Raise the gateway error for a non-2xx upstream response."""
    status = response.status_code
    if status < 400:
        return
    if status < 500:
        content_type = response.headers.get("content-type", "application/json")
        raise UpstreamStatusError(status, body, content_type)
    detail = _error_detail(body)
    raise UpstreamError(
        f"The upstream at {response.request.url.host}:{response.request.url.port} "
        f"failed with HTTP {status}{detail}.",
        code="upstream_status",
    )


def _error_detail(body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""


@contextlib.contextmanager
def upstream_errors(base_url: str) -> Iterator[None]:
    """Turn httpx failures into UpstreamError and UpstreamTimeoutError."""
    try:
        yield
    except httpx.TimeoutException as error:
        raise UpstreamTimeoutError(
            f"The upstream at {base_url} timed out ({type(error).__name__}). "
            "Raise DRPO_UPSTREAM_READ_TIMEOUT if the model is just slow.",
            code="upstream_timeout",
        ) from error
    except httpx.ConnectError as error:
        raise UpstreamError(
            f"Could not connect to the upstream at {base_url}: {error}. "
            "Check that the model server is running and DRPO_UPSTREAM is right.",
            code="upstream_unreachable",
        ) from error
    except httpx.HTTPError as error:
        raise UpstreamError(
            f"The request to the upstream at {base_url} failed: "
            f"{type(error).__name__}: {error}.",
            code="upstream_failed",
        ) from error


def forwarded_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Return the client headers that may travel on to the upstream.

    Headers whose value is not ASCII are left out: HTTP gives them no
    portable meaning, and httpx cannot encode them.
    """
    return {
        name: value
        for name, value in headers.items()
        if name.lower() not in DROPPED_REQUEST_HEADERS
        and not name.lower().startswith("x-drpo-")
        and value.isascii()
    }
