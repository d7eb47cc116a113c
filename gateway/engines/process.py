"""A managed model-server process: spawn, readiness check, log capture, shutdown."""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import httpx

from gateway.errors import EngineError

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"

# Signals of a binary that uses CPU instructions the machine does not allow.
CRASH_SIGNALS = frozenset({signal.SIGILL, signal.SIGSEGV})

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_LOG_TAIL_LINES = 20
_LOG_TAIL_BYTES = 64 * 1024
_HEALTH_REQUEST_TIMEOUT = 2.0
_GROUP_POLL_INTERVAL = 0.05
_KILL_WAIT = 5.0
_EXIT_HANDLER_WAIT = 1.0


def pick_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function ran.

    Another process can take the port before the server binds it. The server
    then exits with its own error, which start() reports.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def find_executable(name: str) -> Path | None:
    """Return the path of `name`, a path or a command on PATH, if it is executable."""
    found = shutil.which(name)
    return Path(found) if found is not None else None


def child_environment(removed_prefixes: Sequence[str]) -> dict[str, str]:
    """Return this process's environment without variables that start with any prefix.

    It is the environment of a child that reads settings from the environment,
    so that only its command line configures it.
    """
    removed = sorted(
        name for name in os.environ if name.startswith(tuple(removed_prefixes))
    )
    if removed:
        logger.warning(
            "Not passing %s to the engine; set engine flags with "
            "DRPO_ENGINE_ARGS (--engine-args) instead",
            ", ".join(removed),
        )
    return {name: value for name, value in os.environ.items() if name not in removed}


class ManagedServer:
    """One child process that serves an OpenAI-compatible API on loopback.

    The child runs in its own session and process group, so stop() also ends
    the processes it spawned, and a Ctrl-C in the terminal reaches only the
    gateway, which then stops the child in order.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str,
        port: int,
        log_dir: Path,
        startup_timeout: float,
        crash_advice: str = "",
        environment: Mapping[str, str] | None = None,
        health_path: str = "/health",
        poll_interval: float = 0.2,
        stop_timeout: float = 5.0,
    ) -> None:
        self.command = list(command)
        self.name = name
        self.port = port
        self.log_dir = log_dir
        self.startup_timeout = startup_timeout
        self.crash_advice = crash_advice
        self.environment = dict(environment) if environment is not None else None
        self.health_url = f"http://{LOOPBACK_HOST}:{port}{health_path}"
        self.poll_interval = poll_interval
        self.stop_timeout = stop_timeout
        self.log_path: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """URL of the OpenAI-compatible API, ending with /v1."""
        return f"http://{LOOPBACK_HOST}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """Process id of the running child, or None before start and after stop."""
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        """Spawn the server and wait until its health check returns 200.

        Raises EngineError when the child cannot be spawned, exits before it
        is ready, or is not ready within `startup_timeout` seconds. In every
        failure case the child and its process group are stopped first.
        """
        if self._process is not None:
            raise EngineError(
                f"{self.name} is already running with pid {self._process.pid}. "
                "Call stop() before starting it again."
            )
        self.log_path = self._create_log_path()
        self._process = self._spawn(self.log_path)
        atexit.register(self._kill_at_exit)
        logger.info(
            "Started %s (pid %d) on port %d, writing its output to %s",
            self.name,
            self._process.pid,
            self.port,
            self.log_path,
        )

        started = time.monotonic()
        try:
            await self._wait_until_ready(self._process)
        except BaseException:
            await self.stop()
            raise

        elapsed = time.monotonic() - started
        logger.info("%s is ready at %s after %.1f s", self.name, self.base_url, elapsed)

    async def stop(self) -> None:
        """Send SIGTERM to the process group, then SIGKILL after `stop_timeout`.

        Calling it again, or before start(), does nothing. If the call is
        cancelled, the child stays registered for the interpreter-exit handler.
        """
        process = self._process
        if process is None:
            return

        _signal_group(process.pid, signal.SIGTERM)
        if not await _wait_for_group_exit(process, self.stop_timeout):
            logger.warning(
                "%s (pid %d) did not stop within %g s of SIGTERM; sending SIGKILL",
                self.name,
                process.pid,
                self.stop_timeout,
            )
            _signal_group(process.pid, signal.SIGKILL)
            if not await _wait_for_group_exit(process, _KILL_WAIT):
                logger.error(
                    "Process group %d of %s still runs %g s after SIGKILL",
                    process.pid,
                    self.name,
                    _KILL_WAIT,
                )

        self._process = None
        atexit.unregister(self._kill_at_exit)
        logger.info(
            "Stopped %s (pid %d, exit status %s)",
            self.name,
            process.pid,
            process.returncode,
        )

    async def __aenter__(self) -> ManagedServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def _create_log_path(self) -> Path:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EngineError(
                f"Failed to create the engine log directory {str(self.log_dir)!r}: "
                f"{error.strerror}. Set DRPO_DATA_DIR (--data-dir) to a "
                "writable directory."
            ) from error
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return self.log_dir / f"{self.name}-{stamp}-{self.port}.log"

    def _spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        # The child writes to a file, not a pipe, because no one reads a pipe
        # while the server runs and a full pipe would block the server.
        try:
            with log_path.open("ab") as log_file:
                return subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=self.environment,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
        except OSError as error:
            raise EngineError(
                f"Failed to start {self.name} with the command {self.command!r}: "
                f"{error.strerror}. Check that DRPO_ENGINE_EXECUTABLE "
                "(--engine-executable) names an executable file."
            ) from error

    async def _wait_until_ready(self, process: subprocess.Popen[bytes]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout
        async with httpx.AsyncClient(trust_env=False) as client:
            while True:
                if process.poll() is not None:
                    raise self._exit_error(process.returncode)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._timeout_error()
                timeout = min(_HEALTH_REQUEST_TIMEOUT, remaining)
                if await _is_healthy(client, self.health_url, timeout):
                    return
                await asyncio.sleep(min(self.poll_interval, remaining))

    def _exit_error(self, returncode: int) -> EngineError:
        if returncode < 0:
            message = (
                f"{self.name} was killed by {_signal_name(-returncode)} "
                "before it was ready."
            )
            if -returncode in CRASH_SIGNALS and self.crash_advice:
                message += " " + self.crash_advice
        else:
            message = f"{self.name} exited with code {returncode} before it was ready."
        return EngineError(message + self._describe_log())

    def _timeout_error(self) -> EngineError:
        return EngineError(
            f"{self.name} timed out: it was not ready within "
            f"{self.startup_timeout:g} s because GET {self.health_url} never "
            "returned 200, so it was stopped. "
            "If the model needs longer to load, raise "
            "DRPO_ENGINE_STARTUP_TIMEOUT (--engine-startup-timeout)."
            + self._describe_log()
        )

    def _describe_log(self) -> str:
        if self.log_path is None:
            return ""
        lines = read_log_tail(self.log_path, _LOG_TAIL_LINES)
        if not lines:
            return f" Its log {self.log_path} is empty."
        tail = "\n".join(lines)
        return f" The last {len(lines)} lines of its log {self.log_path}:\n{tail}"

    def _kill_at_exit(self) -> None:
        # Runs only when the interpreter exits while the child is still running,
        # for example after an unhandled error skipped stop().
        process = self._process
        if process is None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + _EXIT_HANDLER_WAIT
        while _group_is_running(process) and time.monotonic() < deadline:
            time.sleep(_GROUP_POLL_INTERVAL)
        _signal_group(process.pid, signal.SIGKILL)


def _die_with_parent() -> None:
    """Ask Linux to send the child SIGTERM when the gateway process dies.

    The gateway stops its engine on a normal exit, but a SIGKILL or an
    unhandled SIGTERM skips that, and the engine would keep running.
    """
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def read_log_tail(path: Path, count: int) -> list[str]:
    """Return the last `count` lines of the log file at `path`, or [] if unreadable."""
    try:
        with path.open("rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _LOG_TAIL_BYTES))
            data = file.read()
    except OSError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-count:]


async def _is_healthy(client: httpx.AsyncClient, url: str, timeout: float) -> bool:
    try:
        response = await client.get(url, timeout=timeout)
    except httpx.TransportError:
        return False
    return response.status_code == 200


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal_group(process_group: int, signum: signal.Signals) -> None:
    try:
        os.killpg(process_group, signum)
    except ProcessLookupError:
        pass


async def _wait_for_group_exit(
    process: subprocess.Popen[bytes], timeout: float
) -> bool:
    deadline = time.monotonic() + timeout
    while _group_is_running(process):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_GROUP_POLL_INTERVAL)
    return True


def _group_is_running(process: subprocess.Popen[bytes]) -> bool:
    """Reap the child and report whether any process of its group still runs."""
    if process.poll() is None:
        return True
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _group_has_live_member(process.pid)


def _group_has_live_member(process_group: int) -> bool:
    # A grandchild whose parent exited is reparented to PID 1, and a container's
    # PID 1 may never reap it. kill(0) succeeds on such a zombie, so /proc is
    # read to tell zombies from live processes.
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces, so split after it.
        fields = stat.rpartition(")")[2].split()
        state, group = fields[0], int(fields[2])
        if group == process_group and state not in ("Z", "X"):
            return True
    return False
