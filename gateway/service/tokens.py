"""Token counts of the injected instruction, for the injected-tokens metric."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

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
        self._waiting: dict[str, list[Callable[[int], None]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def count(self, text: str, record: Callable[[int], None]) -> None:
        """Call `record` with the token count of `text`, now or once it is known.

        The first request with a new text starts one tokenize call in the
        background. That request and every one that arrives before the call
        returns are recorded when it does.
        """
        if not text:
            return
        known = self._counts.get(text)
        if known is not None:
            record(known)
            return
        waiting = self._waiting.get(text)
        if waiting is not None:
            waiting.append(record)
            return
        self._waiting[text] = [record]
        task = asyncio.create_task(self._measure(text))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _measure(self, text: str) -> None:
        try:
            count = await self.tokenize(text)
        finally:
            records = self._waiting.pop(text, [])
        self._counts[text] = count
        for record in records:
            record(count)

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
            try:
                payload = response.json()
            except ValueError:
                continue
            if not isinstance(payload, dict):
                continue
            if isinstance(payload.get("count"), int):
                return int(payload["count"])
            if isinstance(payload.get("tokens"), list):
                return len(payload["tokens"])
        return max(1, len(text) // CHARACTERS_PER_TOKEN)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
