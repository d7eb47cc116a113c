"""Everything a running gateway holds, built in the app's lifespan."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from gateway.metrics import GatewayMetrics, ModelLabels
from gateway.modes import ModeResolver
from gateway.prompting import (
    BM25Retriever,
    EmbeddingRetriever,
    ExampleRetriever,
    PromptBuilder,
    load_default_instruction,
)
from gateway.sampling import SampleRecorder, SampleStore
from gateway.service.chat import ChatCompletions
from gateway.service.completions import Completions
from gateway.service.components import Components
from gateway.service.tokens import InjectedTokenCounter
from gateway.settings import ExampleSelection, Settings
from gateway.store import ActivePrompts, PromptStore
from gateway.store.factory import open_prompt_store, open_sample_store
from gateway.upstream import UpstreamClient, UpstreamTarget

logger = logging.getLogger(__name__)


@dataclass
class GatewayState:
    parts: Components
    chat: ChatCompletions
    completions: Completions
    store: PromptStore

    @classmethod
    async def start(
        cls, settings: Settings, target: UpstreamTarget, store: PromptStore | None
    ) -> GatewayState:
        """Open the store, load the active prompts and connect to the upstream."""
        store = store or open_prompt_store(settings)
        seeded = store.ensure_seeded(load_default_instruction())
        if seeded is not None:
            logger.info(
                "Prompt store was empty; loaded the built-in %s", seeded.version
            )
        metrics = GatewayMetrics()
        prompts = ActivePrompts(store, settings.store_poll_interval)
        prompts.add_listener(metrics.set_active_versions)
        prompts.add_canary_listener(metrics.set_canaries)
        await prompts.start()

        upstream = UpstreamClient(target, settings)
        labels = ModelLabels(
            [name for name in (settings.model, *settings.model_modes) if name],
            limit=settings.metrics_max_models,
        )
        labels.add(await list_models(upstream))
        parts = Components(
            settings=settings,
            upstream=upstream,
            prompts=prompts,
            metrics=metrics,
            builder=PromptBuilder(settings.system_message_policy),
            modes=ModeResolver(settings, target.default_mode),
            model_labels=labels,
            injected_tokens=InjectedTokenCounter(upstream),
            retriever=make_retriever(settings, upstream),
            sampler=start_sampler(settings, metrics),
        )
        return cls(parts, ChatCompletions(parts), Completions(parts), store)

    async def stop(self) -> None:
        sampler = self.parts.sampler
        if sampler is not None:
            await sampler.stop()
            sampler.store.close()
        await self.parts.injected_tokens.close()
        await self.parts.prompts.stop()
        await self.parts.upstream.close()
        self.store.close()


def start_sampler(
    settings: Settings,
    metrics: GatewayMetrics,
    store: SampleStore | None = None,
) -> SampleRecorder | None:
    """Open the sample store and start its writer, or return None when disabled."""
    if settings.sample_rate <= 0:
        return None
    store = store or open_sample_store(settings)
    sampler = SampleRecorder(store, settings, metrics)
    sampler.start()
    logger.info(
        "Sampling %.3g of chat and completion requests into %s",
        settings.sample_rate,
        store,
    )
    return sampler


async def list_models(upstream: UpstreamClient) -> list[str]:
    """Return the model ids the upstream lists, or an empty list if the call fails."""
    try:
        response = await upstream.http.get("/models", timeout=5.0)
        data = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError) as error:
        logger.warning("Could not list the upstream's models: %s", error)
        return []
    if not isinstance(data, list):
        return []
    return [item["id"] for item in data if isinstance(item, dict) and "id" in item]


def make_retriever(
    settings: Settings, upstream: UpstreamClient
) -> ExampleRetriever | None:
    if settings.example_selection is ExampleSelection.BM25:
        return BM25Retriever()
    if settings.example_selection is ExampleSelection.EMBEDDINGS:
        if not settings.embedding_model:
            from gateway.errors import ConfigurationError

            raise ConfigurationError(
                "DRPO_EXAMPLE_SELECTION=embeddings needs DRPO_EMBEDDING_MODEL."
            )
        key = upstream.target.api_key
        return EmbeddingRetriever(
            upstream.http, upstream.target.base_url, settings.embedding_model, key
        )
    return None
