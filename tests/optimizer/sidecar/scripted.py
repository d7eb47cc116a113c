"""Scripted roles, samples and settings shared by the sidecar tests.

The scripted proposer always offers a prompt with `FEATURE`; the scripted
target marks its answers with `MARK` under such a prompt, and the scripted
judge scores marked answers 5 and others 3. A search therefore finds the
feature prompt, and the gate sees it win on the held-out queries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway.sampling import DiskSampleStore, Sample, SampledChoice
from gateway.settings import InjectionMode, Settings, load_settings
from gateway.upstream import UpstreamTarget
from optimizer.sidecar.service import Sidecar
from tests.optimizer.fake_models import (
    FAKE_MODEL,
    FakeModels,
    Reply,
    chat_reply,
    json_reply,
    requested_aspects,
    requested_prompt_count,
    scores_reply,
    tagged,
)

FEATURE = "CITE SOURCES"
MARK = "[sourced]"

QUESTIONS = [
    "How do I boil an egg?",
    "What is the capital of Peru?",
    "Explain how a bicycle gear works.",
    "Write a haiku about autumn rain.",
    "How can I sort a list in Python?",
    "What is 17 times 23?",
    "Give me tips for a job interview.",
    "Why do cats purr?",
    "How do vaccines train the immune system?",
    "Suggest a name for a bakery.",
    "What causes the seasons on Earth?",
    "How do I write a polite complaint letter?",
    "What is the difference between a list and a tuple?",
    "How long should I rest between workouts?",
]

# Small enough for a test of a few seconds: one level, one beam, two proposals.
SMALL_OPTIONS: dict[str, Any] = {
    "depth": 1,
    "beam_size": 1,
    "n_actions": 2,
    "batch_size": 3,
    "heldout_size": 2,
    "max_extra_depth": 0,
    "min_queries": 6,
    "concurrency": 4,
    "metrics_port": 0,
    "check_interval": 0.05,
    "client_cap": 100,
}


def prompt_text(body: dict[str, Any]) -> str:
    """Return the whole rendered prompt of a target request, chat or base."""
    return str(body.get("prompt") or json.dumps(body.get("messages")))


def feature_target(body: dict[str, Any]) -> Reply:
    if FEATURE in prompt_text(body):
        return chat_reply(f"An answer {MARK}.")
    return chat_reply("An answer.")


def feature_judge(body: dict[str, Any]) -> Reply:
    score = 5 if MARK in tagged(body, "answer") else 3
    return scores_reply(dict.fromkeys(requested_aspects(body), score))


def feature_optimizer(body: dict[str, Any]) -> Reply:
    count = requested_prompt_count(body)
    prompts = [f"Be helpful, variant {index}." for index in range(count - 1)]
    return json_reply({"prompts": [*prompts, f"Be helpful and {FEATURE}."]})


def feature_models(**options: Any) -> FakeModels:
    """Return an unstarted FakeModels that plays the feature-finding roles."""
    return FakeModels(
        target=feature_target,
        judge=feature_judge,
        optimizer=feature_optimizer,
        **options,
    )


def sample(
    text: str,
    *,
    client: str = "client-a",
    model: str = FAKE_MODEL,
    answer: str = "An answer.",
    outcome: str = "ok",
    time: datetime | None = None,
    messages: list[dict[str, Any]] | None = None,
    prompt_version: str = "v1",
) -> Sample:
    """Return a sampled chat request whose last message is the user's `text`."""
    return Sample(
        time=time or datetime.now(UTC),
        route="/v1/chat/completions",
        client=client,
        model=model,
        prompt_version=prompt_version,
        messages=messages or [{"role": "user", "content": text}],
        choices=[SampledChoice(text=answer, finish_reason="stop")],
        latency_seconds=0.1,
        status=200,
        outcome=outcome,  # type: ignore[arg-type]
        redacted=True,
    )


def store_samples(settings: Settings, samples: Iterable[Sample]) -> None:
    store = DiskSampleStore(settings.sample_dir)
    for item in samples:
        store.add(item)
    store.close()


def question_samples(
    questions: Sequence[str] = QUESTIONS, start: datetime | None = None
) -> list[Sample]:
    """Return one sample per question, one second apart, from distinct clients."""
    first = start or datetime.now(UTC) - timedelta(minutes=5)
    return [
        sample(text, client=f"client-{index}", time=first + timedelta(seconds=index))
        for index, text in enumerate(questions)
    ]


def sidecar_settings(fake: FakeModels, data_dir: Path, **options: Any) -> Settings:
    return load_settings(
        upstream=fake.base_url,
        data_dir=data_dir,
        optimizer={**SMALL_OPTIONS, **options},
    )


def make_sidecar(settings: Settings, **parts: Any) -> Sidecar:
    assert settings.upstream is not None
    target = UpstreamTarget(settings.upstream, None, InjectionMode.CHAT)
    return Sidecar(settings, target, **parts)


def read_reports(data_dir: Path) -> list[dict[str, Any]]:
    """Return every sidecar report under `data_dir`, oldest first."""
    paths = sorted((data_dir / "runs" / "sidecar").glob("*.json"))
    return [json.loads(path.read_text()) for path in paths]
