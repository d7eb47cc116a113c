"""The parts every service call uses, built once at start-up."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from gateway.errors import (
    GatewayError,
    NotFoundError,
    UpstreamError,
    UpstreamStatusError,
)
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.metrics import GatewayMetrics, ModelLabels
from gateway.modes import ModeResolver
from gateway.prompting import ExampleRetriever, PromptBuilder
from gateway.sampling import SampleRecorder
from gateway.sampling.capture import client_id
from gateway.service.context import RequestContext
from gateway.service.tokens import InjectedTokenCounter
from gateway.settings import Settings
from gateway.store import ActivePrompts
from gateway.upstream import UpstreamClient

logger = logging.getLogger(__name__)

PROMPT_HEADER = "x-drpo-prompt"
VERSION_HEADER = "x-drpo-prompt-version"
PROMPT_OFF = "off"
EMPTY_INSTRUCTION = Instruction(system_prompt="")


@dataclass
class Components:
    settings: Settings
    upstream: UpstreamClient
    prompts: ActivePrompts
    metrics: GatewayMetrics
    builder: PromptBuilder
    modes: ModeResolver
    model_labels: ModelLabels
    injected_tokens: InjectedTokenCounter
    retriever: ExampleRetriever | None = None
    sampler: SampleRecorder | None = None

    def check_model(self, model: str) -> None:
        """Raise NotFoundError for a model that the managed engine does not serve.

        A managed engine serves one model, and llama-server would answer any
        name with it; vLLM rejects unknown names the same way.
        """
        served = self.upstream.target.served_models
        if served and model not in served:
            raise NotFoundError(
                f"The model {model!r} does not exist; this gateway serves "
                f"{', '.join(repr(name) for name in served)}.",
                param="model",
                code="model_not_found",
            )

    def resolve_prompt(
        self, model: str, headers: Mapping[str, str], peer: tuple[str, int] | None
    ) -> PromptVersion | None:
        """Return the version a request uses: pinned, canary, active, or None.

        None means the client turned the instruction off. The canary split
        uses the client id that the sampler stores, so a sampled request
        records the arm its client is in.
        """
        requested = headers.get(PROMPT_HEADER, "").strip()
        if requested.lower() == PROMPT_OFF:
            return None
        client = client_id(headers, peer) if self.prompts.active_canaries else None
        return self.prompts.resolve(model, pinned=requested or None, client=client)

    async def select_examples(
        self, version: PromptVersion, query: str
    ) -> tuple[Example, ...]:
        """Return the examples to inject: all of them, or the k nearest to `query`."""
        if self.retriever is None or not version.examples:
            return version.examples
        chosen = await self.retriever.select(
            query, version.examples, self.settings.example_count
        )
        return tuple(chosen)

    def choose_sample(
        self, raw: bytes, headers: Mapping[str, str], ctx: RequestContext, stream: bool
    ) -> None:
        """Decide whether the request is sampled, setting `ctx.sample` when it is."""
        if self.sampler is not None:
            ctx.sample = self.sampler.choose(raw, headers, ctx.route, ctx.peer, stream)

    def finish(self, ctx: RequestContext) -> None:
        """Record a finished request's metrics and write its one log line."""
        if ctx.recorded:
            return
        duration = ctx.record(self.metrics)
        logger.info(
            "request_id=%s route=%s model=%s upstream=%s status=%d "
            "latency_ms=%.1f prompt_version=%s",
            ctx.request_id,
            ctx.route,
            ctx.model,
            self.upstream.target.base_url,
            ctx.status,
            duration * 1000,
            ctx.prompt_version,
        )
        if ctx.sample is not None and self.sampler is not None:
            ctx.sample.finish(ctx.status, ctx.prompt_version, ctx.usage, duration)
            self.sampler.submit(ctx.sample)

    def count_upstream_error(self, error: GatewayError) -> None:
        if isinstance(error, UpstreamStatusError):
            kind = f"status_{error.status_code // 100}xx"
        elif isinstance(error, UpstreamError):
            kind = error.code or "upstream_failed"
        else:
            return
        self.metrics.upstream_errors.labels(kind=kind).inc()


def version_label(version: PromptVersion | None) -> str:
    """Return the metrics label of the version a request used, "off" for none."""
    return version.version if version is not None else PROMPT_OFF


def version_header(version: PromptVersion | None) -> dict[str, str]:
    return {VERSION_HEADER: version.version if version is not None else PROMPT_OFF}
