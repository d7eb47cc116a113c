"""Token counts of the injected instruction, for the injected-tokens metric."""

from __future__ import annotations

import asyncio
import logging

import httpx

from gateway.upstream import UpstreamClient

logger = logging.getLogger(__name__)

# Used when the upstream has no /tokenize endpoint. English text averages
# about four characters per token for the tokenizers of current LLMs; this is
# an estimate, not a count.
CHARACTERS_PER_TOKEN = 4


class InjectedTokenCounter:
    """Count the tokens of each injected text once, off the request path."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self._upstream = upstream
        self._counts: dict[str, int] = {}
        self._pending: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def count(self, text: str) -> int | None:
        """Return the token count of `text`, or None while it is being computed."""
        if not text:
            return 0
        known = self._counts.get(text)
        if known is not None or text in self._pending:
            return known
        self._pending.add(text)
        task = asyncio.create_task(self._measure(text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return None

    async def _measure(self, text: str) -> None:
        try:
            self._counts[text] = await self.tokenize(text)
        finally:
            self._pending.discard(text)

    async def tokenize(self, text: str) -> int:
        """Return the upstream's token count of `text`, or an estimate."""
        # vLLM and llama-server serve /tokenize next to /v1, not under it.
        url = self._upstream.target.base_url.removesuffix("/v1") + "/tokenize"
        for body in ({"content": text, "add_special": False}, {"prompt": text}):
            try:
                response = await self._upstream.http.post(url, json=body, timeout=10)
            except httpx.HTTPError as error:
                logger.debug("Tokenizing the instruction failed: %s", error)
                break
            if response.status_code != 200:
                continue
            payload = response.json()
            if isinstance(payload.get("count"), int):
                return int(payload["count"])
            if isinstance(payload.get("tokens"), list):
                return len(payload["tokens"])
        return max(1, len(text) // CHARACTERS_PER_TOKEN)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
