"""The vLLM engine: `vllm serve` for a Hugging Face model, run by the gateway."""

from __future__ import annotations

from pathlib import Path

from gateway.engines.process import (
    LOOPBACK_HOST,
    ManagedServer,
    child_environment,
    find_executable,
    pick_free_port,
)
from gateway.errors import EngineError
from gateway.settings import Settings

_INSTALL_ADVICE = (
    "Install it with `pip install 'drpo-gateway[vllm]'` on a GPU host, or "
    "point --upstream at a running server."
)

# vLLM requires an API key when VLLM_API_KEY is set. The server listens on
# loopback only and the gateway does the client authentication, so the child
# runs without one.
_REMOVED_ENVIRONMENT_PREFIXES = ("VLLM_API_KEY",)


def vllm_server(settings: Settings, *, port: int | None = None) -> ManagedServer:
    """Build the `vllm serve` process for `settings.model`. Call start() to run it."""
    if not settings.model:
        raise EngineError(
            "The vllm engine needs a model: pass --model NAME or set DRPO_MODEL."
        )
    executable = locate_vllm(settings)
    if port is None:
        port = pick_free_port()
    command = vllm_command(executable, settings.model, settings, port)
    return ManagedServer(
        command,
        name="vllm",
        port=port,
        log_dir=settings.data_dir / "logs",
        startup_timeout=settings.engine_startup_timeout,
        environment=child_environment(_REMOVED_ENVIRONMENT_PREFIXES),
    )


def vllm_command(
    executable: Path, model: str, settings: Settings, port: int
) -> list[str]:
    """Return the `vllm serve` command line, which serves `model` under its own name."""
    command = [
        str(executable),
        "serve",
        model,
        "--host",
        LOOPBACK_HOST,
        "--port",
        str(port),
    ]
    return command + settings.engine_args


def locate_vllm(settings: Settings) -> Path:
    """Return the configured vllm executable or the one on PATH.

    Raises EngineError when it is not installed.
    """
    name = settings.engine_executable or "vllm"
    found = find_executable(name)
    if found is None:
        raise EngineError(
            f"vLLM is not installed: {name!r} is not an executable file or a "
            f"command on PATH. {_INSTALL_ADVICE}"
        )
    return found
