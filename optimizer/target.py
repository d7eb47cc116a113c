"""The target model, called exactly as the gateway serves it."""

from __future__ import annotations

from typing import Any

from gateway.instruction import Instruction
from gateway.prompting import base_stop_strings, trim_answer
from gateway.prompting.builder import PromptBuilder
from gateway.settings import InjectionMode
from optimizer.client import Endpoint, ModelCallError, ModelClient
from optimizer.errors import OptimizerError
from optimizer.parsing import response_text
from optimizer.types import Query

ROLE = "target"


class GatewayTarget:
    """TargetModel that renders each query with the gateway's `PromptBuilder`.

    Base mode sends the builder's raw-text prompt to /completions with the
    gateway's stop strings and trims the answer as the gateway does. Chat mode
    sends the builder's messages to /chat/completions. Decoding is greedy
    (temperature 0) in both modes.

    `mode` must already be resolved to chat or base, for example with
    `gateway.modes.ModeResolver`.
    """

    def __init__(
        self,
        client: ModelClient,
        endpoint: Endpoint,
        mode: InjectionMode,
        builder: PromptBuilder,
        max_tokens: int = 256,
    ) -> None:
        if mode is InjectionMode.AUTO:
            raise OptimizerError(
                "The target's injection mode is 'auto', but the optimizer must "
                "know whether the gateway serves the model in chat or base mode. "
                "Resolve it first (gateway.modes.ModeResolver) or pass chat or "
                "base."
            )
        self.client = client
        self.endpoint = endpoint
        self.mode = mode
        self.builder = builder
        self.max_tokens = max_tokens

    async def answer(self, instruction: Instruction, query: Query) -> str:
        """Return the target's answer to `query` under `instruction`.

        Raises ModelCallError when the call fails or returns no answer text.
        """
        messages = [{"role": "user", "content": query.text}]
        if self.mode is InjectionMode.BASE:
            prompt = self.builder.base_prompt(instruction, messages)
            text = await self._call("/completions", self.base_request(prompt))
            return trim_answer(text)[0]

        chat = self.builder.chat_messages(instruction, messages)
        return await self._call("/chat/completions", self.chat_request(chat))

    def base_request(self, prompt: str) -> dict[str, Any]:
        return {
            "prompt": prompt,
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stop": base_stop_strings(None),
        }

    def chat_request(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        return {"messages": messages, "max_tokens": self.max_tokens, "temperature": 0}

    async def _call(self, path: str, body: dict[str, Any]) -> str:
        response = await self.client.complete(ROLE, self.endpoint, path, body)
        text = response_text(response)
        if text is None or "error" in response:
            raise ModelCallError(
                f"The target call to {self.endpoint.base_url}{path} (model "
                f"{self.endpoint.model!r}) returned no answer text: "
                f"{str(response)[:300]}. Check that the server serves this model "
                f"on {path}.",
                self.endpoint,
                None,
            )
        return text
