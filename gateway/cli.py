"""The drpo-gateway command line."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from gateway.errors import ConfigurationError
from gateway.prompts_cli import prompts_app
from gateway.settings import Engine, InjectionMode, Settings, load_settings
from gateway.store.factory import check_stores
from gateway.upstream import UpstreamTarget
from optimizer.cli import optimize
from optimizer.sidecar_cli import optimizer as sidecar

logger = logging.getLogger(__name__)

app = typer.Typer(
    name="drpo-gateway",
    help="OpenAI-compatible gateway that aligns a model at inference time with a "
    "DRPO-optimized instruction (system prompt plus in-context examples).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(prompts_app, name="prompts")
app.command("optimize")(optimize)
app.command("optimizer")(sidecar)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="DRPO_CONFIG",
        help="YAML file with settings.",
        dir_okay=False,
    ),
]


@app.command()
def serve(
    config: ConfigOption = None,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Base URL of an OpenAI-compatible server, e.g. "
            "http://127.0.0.1:8080/v1. Without it the embedded model is served."
        ),
    ] = None,
    engine: Annotated[
        Engine | None,
        typer.Option(help="upstream, embedded or vllm (starts `vllm serve`)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model for --engine vllm, or the embedded model's name."),
    ] = None,
    host: Annotated[
        str | None, typer.Option(help="Address to bind. Default 127.0.0.1.")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help="Port to bind. Default 8000.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Number of gateway worker processes, all in front of one "
            "upstream. Default 1."
        ),
    ] = None,
    mode: Annotated[
        InjectionMode | None,
        typer.Option(help="Injection mode: auto, chat or base. Default auto."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Directory of the prompt store and engine logs."),
    ] = None,
    log_level: Annotated[
        str | None, typer.Option(help="debug, info, warning or error.")
    ] = None,
) -> None:
    """Start the gateway, and the model server it manages if any."""
    from gateway.logs import configure_logging

    settings = _load(
        config,
        upstream=upstream,
        engine=engine,
        model=model,
        host=host,
        port=port,
        workers=workers,
        mode=mode,
        data_dir=data_dir,
        log_level=log_level,
    )
    configure_logging(settings.log_level)
    stop_on_sigterm()
    try:
        check_stores(settings)
        check_port_free(settings.host, settings.port)
        if settings.workers > 1:
            run_workers(settings)
        else:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(run_gateway(settings))
    except ConfigurationError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        pass


async def run_gateway(settings: Settings) -> None:
    """Serve the gateway until uvicorn receives a shutdown signal."""
    import uvicorn

    from gateway.app import create_app

    async with upstream_target(settings) as target:
        app_ = create_app(settings, target)
        config = uvicorn.Config(
            app_,
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)
        await server.serve()


def run_workers(settings: Settings) -> None:
    """Start the upstream target once, then serve it from `settings.workers` processes.

    The engine, if any, runs in this process's event loop only while it starts
    and stops, and is stopped after the last worker has exited.
    """
    from gateway.workers import serve_workers

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        stack = contextlib.AsyncExitStack()
        target = runner.run(stack.enter_async_context(upstream_target(settings)))
        try:
            serve_workers(settings, target)
        finally:
            runner.run(stack.aclose())


@contextlib.asynccontextmanager
async def upstream_target(settings: Settings) -> AsyncIterator[UpstreamTarget]:
    """Yield where the gateway sends requests, running a managed engine meanwhile."""
    from gateway.engines import (
        DEFAULT_ALIAS,
        embedded_model_info,
        embedded_server,
        vllm_server,
    )
    from gateway.engines.embedded import resolve_model_path

    if settings.engine is Engine.UPSTREAM:
        assert settings.upstream is not None
        key = settings.upstream_api_key
        yield UpstreamTarget(settings.upstream, key.get_secret_value() if key else None)
        return
    served_name = settings.model or DEFAULT_ALIAS
    if settings.engine is Engine.EMBEDDED:
        model_path = resolve_model_path(settings)
        info = embedded_model_info(model_path)
        server = embedded_server(settings, model_path=model_path)
        mode = InjectionMode.CHAT if info.has_chat_template else InjectionMode.BASE
        logger.info(
            "Embedded model %s (%s, chat template: %s): injection mode %s",
            info.name,
            info.architecture,
            info.has_chat_template,
            mode.value,
        )
    else:
        server = vllm_server(settings)
        mode = InjectionMode.CHAT
    async with server:
        yield UpstreamTarget(
            server.base_url,
            None,
            default_mode=mode,
            health_url=server.base_url.removesuffix("/v1") + "/health",
            served_models=(served_name,),
        )


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigurationError when `host:port` is taken, before any engine starts."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigurationError(
                f"Cannot listen on {host}:{port}: {error.strerror}. Stop the other "
                "server or pass another --port."
            ) from None


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the process like Ctrl-C, so managed engines are stopped.

    uvicorn handles SIGTERM itself while it serves, then raises the signal
    again once it has shut down. Without this handler, that second signal
    would end the process before the engine is stopped.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Return uvloop's loop factory when it is installed, as uvicorn itself would."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _load(config: Path | None, **overrides: object) -> Settings:
    try:
        return load_settings(config, **overrides)
    except ConfigurationError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)
