"""The real path: `drpo-gateway serve` on the embedded Gemma 3 270M base model."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from gateway.engines import pick_free_port

pytestmark = pytest.mark.embedded

FRAMING = ("<START>", "<END>", "# Query", "# Answer", "# Instructions")


@pytest.fixture(scope="module")
def embedded_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start the gateway CLI with no upstream, as a user would, and stop it after."""
    with serve_embedded(tmp_path_factory.mktemp("embedded")) as url:
        yield url


@contextlib.contextmanager
def embedded_gateway_process(data_dir: Path) -> Iterator[openai.OpenAI]:
    """Run `drpo-gateway serve` on `data_dir` and yield a client for it."""
    with serve_embedded(data_dir) as url:
        yield _client(url)


@contextlib.contextmanager
def serve_embedded(data_dir: Path) -> Iterator[str]:
    port = pick_free_port()
    log = (data_dir / "serve.log").open("wb")
    command = [
        sys.executable, "-m", "gateway", "serve",
        "--port", str(port), "--data-dir", str(data_dir),
    ]  # fmt: skip
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DRPO_")}
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env=environment
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, data_dir / "serve.log")
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"drpo-gateway serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"drpo-gateway serve was not ready in 300 s:\n{log.read_text()[-3000:]}"
    )


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=240
    )


def test_embedded_chat_completion_has_no_framing(embedded_gateway: str) -> None:
    client = _client(embedded_gateway)

    raw = client.chat.completions.with_raw_response.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=48,
        temperature=0,
    )
    completion = raw.parse()

    text = completion.choices[0].message.content or ""
    assert raw.headers["x-drpo-prompt-version"] == "v1"
    assert completion.object == "chat.completion"
    assert text.strip()
    for marker in FRAMING:
        assert marker not in text
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 100


def test_embedded_stream_has_no_framing(embedded_gateway: str) -> None:
    client = _client(embedded_gateway)

    stream = client.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=48,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    text = "".join(
        chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices
    )
    finish_reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text.strip()
    for marker in FRAMING:
        assert marker not in text
    assert finish_reasons[-1] in {"stop", "length"}
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_embedded_gateway_lists_model(embedded_gateway: str) -> None:
    models = _client(embedded_gateway).models.list()

    assert [model.id for model in models.data] == ["gemma-3-270m"]
