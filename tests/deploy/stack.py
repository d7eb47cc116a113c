"""The observed stack of the dashboard test: fakes, gateway, sidecar, traffic.

FakeModels plays the upstream and every optimizer role. Under a prompt with
the scripted FEATURE, the target marks its answers for model A with WIN and
for model B with PARTIAL. The judge scores WIN 5, PARTIAL 4 and others 3.
With a margin of 1.5 the sidecar's cycle therefore publishes a version for
model A (gain 2) and rejects the candidate for model B (gain 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.deploy.support import REPO
from tests.fakes.upstream import ServerThread
from tests.optimizer.fake_models import (
    FAKE_MODEL,
    FakeModels,
    FakeReply,
    Reply,
    requested_aspects,
    scores_reply,
    tagged,
)
from tests.optimizer.sidecar.scripted import (
    FEATURE,
    SMALL_OPTIONS,
    feature_optimizer,
    prompt_text,
)

MODEL_A = FAKE_MODEL
MODEL_B = "fake-model-b"
WIN = "[sourced]"
PARTIAL = "[partly]"
FAIL_TRIGGER = "FAIL-UPSTREAM"
MARGIN = 1.5
# The judge waits this long per reply until the stack releases it, so that
# Prometheus scrapes the sidecar's counters before the cycle's run ends.
HELD_JUDGE_DELAY = 0.2


def last_user_text(body: dict[str, Any]) -> str:
    """Return the client's query: in chat mode the examples come before it."""
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    return str(users[-1].get("content") or "") if users else str(body.get("prompt"))


def stack_target(body: dict[str, Any]) -> Reply:
    if FAIL_TRIGGER in last_user_text(body):
        return FakeReply(
            status=500,
            body={"error": {"message": "Scripted failure.", "type": "server_error"}},
        )
    if FEATURE not in prompt_text(body):
        return "An answer."
    mark = PARTIAL if body.get("model") == MODEL_B else WIN
    return f"An answer {mark}."


class HeldJudge:
    """The scripted judge, slowed down until `release` is called."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def __call__(self, body: dict[str, Any]) -> Reply:
        answer = tagged(body, "answer")
        score = 3
        if WIN in answer:
            score = 5
        elif PARTIAL in answer:
            score = 4
        reply = scores_reply(dict.fromkeys(requested_aspects(body), score))
        assert isinstance(reply, dict)
        delay = 0.0 if self.released.is_set() else HELD_JUDGE_DELAY
        return FakeReply(body=reply, delay=delay)

    def release(self) -> None:
        self.released.set()


def stack_models() -> tuple[FakeModels, HeldJudge]:
    judge = HeldJudge()
    models = FakeModels(target=stack_target, judge=judge, optimizer=feature_optimizer)
    return models, judge


class FakeVllmMetrics:
    """A /metrics endpoint with vLLM's gauge names; `running` follows FakeModels."""

    def __init__(self, models: FakeModels) -> None:
        self.registry = CollectorRegistry()
        labels = {"model_name": FAKE_MODEL}
        running = Gauge(
            "vllm:num_requests_running",
            "Requests in model execution batches.",
            ["model_name"],
            registry=self.registry,
        )
        running.labels(**labels).set_function(lambda: models.in_flight)
        waiting = Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed.",
            ["model_name"],
            registry=self.registry,
        )
        waiting.labels(**labels).set(0)
        cache = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage; 1 means 100 percent.",
            ["model_name"],
            registry=self.registry,
        )
        cache.labels(**labels).set(0.25)
        self.server = ServerThread(
            Starlette(routes=[Route("/metrics", self._metrics, methods=["GET"])])
        )
        self.port = 0

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type="text/plain")

    def start(self) -> FakeVllmMetrics:
        self.port = self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()


def clean_environment(**variables: str) -> dict[str, str]:
    """Return this process's environment without DRPO_ variables, plus `variables`."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DRPO_")}
    environment.update(variables)
    return environment


class CommandProcess:
    """A `drpo-gateway` subprocess whose output goes to a log file."""

    def __init__(
        self, arguments: list[str], log_path: Path, environment: dict[str, str]
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", *arguments],
            cwd=REPO,
            env=environment,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def wait_until(
        self, condition: Callable[[], bool], what: str, timeout: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"exited before {what}: {self.log()}")
            try:
                if condition():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}: {self.log()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def scrape(url: str, name: str, **labels: str) -> float:
    """Return the sum of the `name` samples at `url` whose labels include `labels`."""
    text = httpx.get(url, timeout=5).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
        and all(sample.labels.get(key) == value for key, value in labels.items())
    )


def start_gateway(upstream: str, data_dir: Path, port: int) -> CommandProcess:
    arguments = [
        "serve", "--upstream", upstream, "--host", "127.0.0.1",
        "--port", str(port), "--data-dir", str(data_dir),
    ]  # fmt: skip
    environment = clean_environment(
        DRPO_SAMPLE_RATE="1", DRPO_STORE_POLL_INTERVAL="0.05"
    )
    return CommandProcess(arguments, data_dir.parent / "gateway.log", environment)


def start_sidecar(upstream: str, data_dir: Path, metrics_port: int) -> CommandProcess:
    options = {
        **SMALL_OPTIONS,
        "metrics_host": "127.0.0.1",
        "metrics_port": metrics_port,
        "margin": MARGIN,
        "safety_queries": 3,
        "interval": 3600,
    }
    config = data_dir.parent / "sidecar.yaml"
    config.write_text(yaml.safe_dump({"optimizer": options}))
    arguments = [
        "optimizer", "--upstream", upstream, "--data-dir", str(data_dir),
        "--config", str(config),
    ]  # fmt: skip
    return CommandProcess(
        arguments, data_dir.parent / "sidecar.log", clean_environment()
    )


def run_prompts_command(data_dir: Path, *arguments: str) -> str:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "prompts",
            *arguments,
            "--data-dir",
            str(data_dir),
        ],
        cwd=REPO,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_canary(data_dir: Path, share: float) -> str:
    """Import a new version and serve it to `share` of the clients; return its id."""
    instruction = data_dir.parent / "canary.json"
    instruction.write_text(
        json.dumps({"system_prompt": "Answer carefully and briefly.", "examples": []})
    )
    before = listed_versions(data_dir)
    run_prompts_command(data_dir, "import", str(instruction))
    (version,) = listed_versions(data_dir) - before
    run_prompts_command(data_dir, "canary", version, "--share", str(share))
    return version


def listed_versions(data_dir: Path) -> set[str]:
    rows = json.loads(run_prompts_command(data_dir, "list", "--json"))
    return {str(row["version"]) for row in rows}


def chat(
    client: httpx.Client,
    model: str,
    text: str,
    *,
    key: str = "client-0",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {key}", **(headers or {})},
    )


def stream_chat(client: httpx.Client, model: str, text: str, key: str) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": f"Bearer {key}"}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.status_code == 200
        lines = list(r.iter_lines())
    assert "data: [DONE]" in lines


def send_traffic(client: httpx.Client, questions: list[str], tag: str) -> None:
    """Send chats for both models, streams, a completion, errors and opt-outs."""
    for index, question in enumerate(questions):
        for model in (MODEL_A, MODEL_B):
            reply = chat(client, model, question, key=f"client-{index}")
            assert reply.status_code == 200, reply.text
    for index in range(3):
        stream_chat(client, MODEL_A, f"Tell me a short story ({tag} {index}).", "s")
    completion = client.post(
        "/v1/completions", json={"model": MODEL_A, "prompt": f"Once upon ({tag})"}
    )
    assert completion.status_code == 200, completion.text

    invalid = client.post(
        "/v1/chat/completions",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert invalid.status_code == 400
    pinned = chat(client, MODEL_A, "Hello?", headers={"x-drpo-prompt": "v99"})
    assert pinned.status_code == 404
    failed = chat(client, MODEL_A, f"{FAIL_TRIGGER} ({tag})")
    assert failed.status_code == 502
    opted_out = chat(client, MODEL_A, "Hello?", headers={"x-drpo-sample": "off"})
    assert opted_out.status_code == 200
    personal = chat(client, MODEL_A, f"Mail jane.doe@example.com about {tag}.")
    assert personal.status_code == 200
