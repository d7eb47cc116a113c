"""A real redis-server on a free loopback port, started and stopped by a test.

Tests that need it fail when the binary is missing (see `tests.services`).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

from tests.services import require_binary

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """Return the path of redis-server, or fail (or skip) the test without one."""
    return require_binary("redis-server", "redis-server")


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class RedisServer:
    """One redis-server process bound to 127.0.0.1, with its files in `directory`.

    `persistent` turns on the append-only file, so that the data survives
    `restart`; otherwise nothing is written to disk. A `password` turns on
    requirepass.
    """

    def __init__(
        self, directory: Path, *, persistent: bool = False, password: str = ""
    ) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.persistent = persistent
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        """URL of the server, with the password when there is one."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def start(self) -> RedisServer:
        """Start the server on `port` and wait until it responds to PING."""
        arguments = [
            self.binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        if self.password:
            arguments += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._wait_until_ready()
        return self

    def stop(self) -> None:
        """Stop the server with SIGTERM, which flushes the append-only file."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def _wait_until_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        with self.client() as client:
            while True:
                if self.process.poll() is not None:
                    log = self._log_tail()
                    raise RuntimeError(
                        f"redis-server exited with status {self.process.returncode} "
                        f"on port {self.port}: {log}"
                    )
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                except redis.ResponseError as error:
                    # LOADING: the server is still reading its append-only file.
                    if "LOADING" not in str(error):
                        raise
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"redis-server did not answer on port {self.port} within "
                        f"{START_TIMEOUT} s: {self._log_tail()}"
                    )
                time.sleep(0.02)

    def _log_tail(self) -> str:
        log = self.directory / "redis.log"
        if not log.exists():
            return "no log"
        return " | ".join(log.read_text(errors="replace").splitlines()[-5:])


def start_redis_server(
    directory: Path, *, persistent: bool = False, password: str = ""
) -> RedisServer:
    """Start a RedisServer, on a new port each time the port was taken meanwhile."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        server = RedisServer(directory, persistent=persistent, password=password)
        try:
            return server.start()
        except RuntimeError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
