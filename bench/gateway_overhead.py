"""Measure the latency and throughput the gateway adds in front of a fast upstream.

Three targets get the same chat completion request from wrk: nginx returning a
fixed completion (direct), a bare starlette + httpx passthrough in front of it,
and drpo-gateway in chat mode with injection and metrics on. Each runs at 1 and
at 32 connections in one run of this script, which prints a table and ratios.

Needs nginx and wrk (Debian packages nginx-light and wrk):
    .venv/bin/python bench/gateway_overhead.py [--duration 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Paris is the capital of France.",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 8, "total_tokens": 28},
}
REQUEST = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32,
}
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, method: str = "GET", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = httpx.request(method, url, json=REQUEST, timeout=2)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


@contextmanager
def process(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[None]:
    with log.open("wb") as output:
        child = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            yield
        finally:
            child.terminate()
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()


@contextmanager
def nginx(workdir: Path, port: int) -> Iterator[str]:
    body = json.dumps(COMPLETION).replace("'", "\\'")
    config = workdir / "nginx.conf"
    config.write_text(
        f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {workdir};
    proxy_temp_path {workdir};
    fastcgi_temp_path {workdir};
    uwsgi_temp_path {workdir};
    scgi_temp_path {workdir};
    server {{
        listen 127.0.0.1:{port};
        keepalive_requests 1000000;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
}}
"""
    )
    with process(["nginx", "-c", str(config)], workdir / "nginx.log"):
        url = f"http://127.0.0.1:{port}"
        wait_for(url + "/v1/chat/completions", "POST")
        yield url


def run_wrk(
    url: str, connections: int, duration: int, script: Path
) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
    output = subprocess.run(
        [
            "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s",
            "--latency", "-s", str(script), url + "/v1/chat/completions",
        ],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return {
        "p50_ms": _latency(output, "50%"),
        "p99_ms": _latency(output, "99%"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
        "errors": float("Non-2xx" in output or "Socket errors" in output),
    }


def _latency(output: str, label: str) -> float:
    match = re.search(
        rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE
    )
    if match is None:
        raise RuntimeError(f"wrk printed no {label} latency:\n{output}")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "us":
        return value / 1000
    if unit == "s":
        return value * 1000
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install nginx-light wrk")

    workdir = Path(tempfile.mkdtemp(prefix="drpo-bench-"))
    script = workdir / "request.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(REQUEST)))
    results: dict[str, dict[int, dict[str, float]]] = {}
    uvicorn_flags = ["--host", "127.0.0.1", "--no-access-log", "--log-level", "warning"]

    with nginx(workdir, free_port()) as upstream:
        passthrough_port, gateway_port = free_port(), free_port()
        passthrough = [
            sys.executable, "-m", "uvicorn", "bench.passthrough_app:app",
            "--port", str(passthrough_port), *uvicorn_flags,
        ]  # fmt: skip
        gateway = [
            sys.executable, "-m", "gateway", "serve", "--upstream", upstream + "/v1",
            "--port", str(gateway_port), "--data-dir", str(workdir / "data"),
            "--mode", "chat",
        ]  # fmt: skip
        env = {"BENCH_UPSTREAM": upstream, "PYTHONPATH": str(ROOT)}
        with (
            process(passthrough, workdir / "passthrough.log", env),
            process(gateway, workdir / "gateway.log", env),
        ):
            targets = {
                "direct": upstream,
                "passthrough": f"http://127.0.0.1:{passthrough_port}",
                "gateway": f"http://127.0.0.1:{gateway_port}",
            }
            for url in targets.values():
                wait_for(url + "/v1/chat/completions", "POST")
            injected = httpx.post(
                targets["gateway"] + "/v1/chat/completions", json=REQUEST
            ).headers.get("x-drpo-prompt-version")
            for name, url in targets.items():
                results[name] = {}
                for connections in (1, 32):
                    run_wrk(url, connections, 2, script)  # warm-up
                    results[name][connections] = run_wrk(
                        url, connections, args.duration, script
                    )
    report(results, injected)


def report(
    results: dict[str, dict[int, dict[str, float]]], version: str | None
) -> None:
    print(f"gateway injected prompt version: {version}")
    print(f"{'target':<12} {'conns':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9}")
    for name, runs in results.items():
        for connections, numbers in runs.items():
            print(
                f"{name:<12} {connections:>5} {numbers['p50_ms']:>8.3f} "
                f"{numbers['p99_ms']:>8.3f} {numbers['rps']:>9.0f}"
            )
    for connections in (1, 32):
        gateway = results["gateway"][connections]
        floor = results["passthrough"][connections]
        direct = results["direct"][connections]
        print(
            f"{connections:>2} conns: gateway/passthrough p50 "
            f"{gateway['p50_ms'] / floor['p50_ms']:.2f}x, p99 "
            f"{gateway['p99_ms'] / floor['p99_ms']:.2f}x, throughput "
            f"{gateway['rps'] / floor['rps']:.2f}x; added p50 over direct "
            f"{gateway['p50_ms'] - direct['p50_ms']:.3f} ms "
            f"(passthrough {floor['p50_ms'] - direct['p50_ms']:.3f} ms)"
        )


if __name__ == "__main__":
    main()
