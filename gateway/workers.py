"""Several uvicorn worker processes in front of one upstream target.

The parent process starts the upstream target once, writes the settings and
the target to a file that only its user can read, and runs uvicorn's process
supervisor. Each worker builds its app from that file in `create_worker_app`.
The file's path reaches the workers in an environment variable, so no secret
appears on a command line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client.multiprocess import mark_process_dead
from pydantic import SecretStr, ValidationError
from pydantic_core import to_jsonable_python
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from gateway.errors import ConfigurationError
from gateway.metrics import MULTIPROC_DIR_VARIABLE
from gateway.settings import InjectionMode, Settings
from gateway.upstream import UpstreamTarget

logger = logging.getLogger(__name__)

WORKER_CONFIG_VARIABLE = "DRPO_GATEWAY_WORKER_CONFIG"
WORKER_APP = "gateway.app:create_worker_app"


def serve_workers(settings: Settings, target: UpstreamTarget) -> None:
    """Serve `target` from `settings.workers` processes until SIGINT or SIGTERM.

    Raises ConfigurationError when a worker fails before it starts serving.
    """
    with worker_environment(settings, target) as metrics_dir:
        config = uvicorn.Config(
            WORKER_APP,
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        supervisor = WorkerSupervisor(config, [config.bind_socket()], metrics_dir)
        supervisor.run()
    if supervisor.startup_failed:
        raise ConfigurationError(
            "A gateway worker failed to start, so every worker was stopped. "
            "Its error is in the log above."
        )


class WorkerSupervisor(Multiprocess):
    """uvicorn's process supervisor, which also marks exited workers dead.

    `mark_process_dead` removes the files of a worker's live gauges, so the
    in-flight count drops the requests of a worker that crashed.
    """

    def __init__(
        self, config: uvicorn.Config, sockets: list[socket.socket], metrics_dir: Path
    ) -> None:
        super().__init__(config, sockets)
        self.metrics_dir = metrics_dir
        self.startup_failed = False

    def keep_subprocess_alive(self) -> None:
        self._retire_replaced(super().keep_subprocess_alive)

    def handle_signals(self) -> None:
        # SIGHUP restarts the workers and SIGTTOU removes one.
        self._retire_replaced(super().handle_signals)

    def join_all(self) -> None:
        super().join_all()
        for process in self.processes:
            self._retire(process)

    def _retire_replaced(self, step: Callable[[], None]) -> None:
        before = list(self.processes)
        step()
        for process in before:
            if process not in self.processes:
                self._retire(process)

    def _retire(self, process: Process) -> None:
        if process.exitcode == STARTUP_FAILURE:
            self.startup_failed = True
        if process.pid is not None:
            mark_process_dead(process.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]


@contextlib.contextmanager
def worker_environment(settings: Settings, target: UpstreamTarget) -> Iterator[Path]:
    """Write the worker file and set the variables that the workers read.

    Yields the Prometheus multiprocess directory. It is PROMETHEUS_MULTIPROC_DIR
    when that is set, and otherwise a new one, removed with the worker file on
    exit.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="drpo-gateway-"))
    try:
        config_path = run_dir / "worker.json"
        write_worker_config(config_path, settings, target)
        metrics_dir = multiprocess_dir(run_dir / "metrics")
        variables = {
            WORKER_CONFIG_VARIABLE: str(config_path),
            MULTIPROC_DIR_VARIABLE: str(metrics_dir),
        }
        with _environment(variables):
            yield metrics_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def multiprocess_dir(default: Path) -> Path:
    """Return PROMETHEUS_MULTIPROC_DIR if it is set, else create `default`."""
    configured = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if not configured:
        default.mkdir()
        logger.info("Prometheus multiprocess directory: %s", default)
        return default

    path = Path(configured)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigurationError(
            f"Failed to create {MULTIPROC_DIR_VARIABLE}={configured!r}: "
            f"{error.strerror}. Point it at a writable directory, or unset it."
        ) from None
    stale = sorted(path.glob("*.db"))
    if stale:
        logger.warning(
            "%s=%s contains %d metric files of earlier processes, and /metrics "
            "adds their counts to this run's. Empty it before the gateway starts",
            MULTIPROC_DIR_VARIABLE,
            path,
            len(stale),
        )
    logger.info("Prometheus multiprocess directory: %s", path)
    return path


def write_worker_config(path: Path, settings: Settings, target: UpstreamTarget) -> None:
    """Write `settings` and `target`, secrets included, to a new file of mode 0600."""
    document = {
        "settings": to_jsonable_python(_reveal_secrets(settings.model_dump())),
        "target": to_jsonable_python(dataclasses.asdict(target)),
    }
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(document, file)


def read_worker_config(path: Path | None = None) -> tuple[Settings, UpstreamTarget]:
    """Read the settings and target from `path`, by default the variable's file.

    Raises ConfigurationError when the variable is unset or the file is
    unreadable or invalid.
    """
    if path is None:
        configured = os.environ.get(WORKER_CONFIG_VARIABLE)
        if not configured:
            raise ConfigurationError(
                f"{WORKER_CONFIG_VARIABLE} is not set. gateway.app:create_worker_app "
                "runs in the workers of `drpo-gateway serve --workers N`; start "
                "the gateway with that command."
            )
        path = Path(configured)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return _parse_worker_config(document)
    except (OSError, KeyError, TypeError, ValueError) as error:
        raise ConfigurationError(
            f"Failed to read the worker settings file {str(path)!r}: "
            f"{_describe(error)}. Restart `drpo-gateway serve`, which writes it."
        ) from None


def _parse_worker_config(document: Any) -> tuple[Settings, UpstreamTarget]:
    settings = Settings.model_validate(document["settings"])
    fields = document["target"]
    target = UpstreamTarget(
        base_url=fields["base_url"],
        api_key=fields["api_key"],
        default_mode=InjectionMode(fields["default_mode"]),
        health_url=fields["health_url"],
        served_models=tuple(fields["served_models"]),
    )
    return settings, target


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        # The message of a ValidationError contains the input, which may be a key.
        fields = ", ".join(
            ".".join(str(part) for part in item["loc"])
            for item in error.errors(include_input=False)
        )
        return f"invalid settings {fields}"
    return f"{type(error).__name__}: {error}"


def _reveal_secrets(value: object) -> object:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, Mapping):
        return {key: _reveal_secrets(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_reveal_secrets(item) for item in value]
    return value


@contextlib.contextmanager
def _environment(variables: Mapping[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
