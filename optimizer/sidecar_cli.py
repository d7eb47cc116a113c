"""`drpo-gateway optimizer`: the sidecar that keeps the served instruction optimized."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gateway.errors import ConfigurationError, GatewayError
from gateway.settings import Settings, load_settings
from optimizer.cli_options import (
    HelpersModelOption,
    HelpersOption,
    JudgeModelOption,
    JudgeOption,
    ModeOption,
    UpstreamOption,
)
from optimizer.errors import OptimizerError
from optimizer.sidecar.records import RunReport
from optimizer.sidecar.service import Sidecar

logger = logging.getLogger(__name__)

Option = typer.Option

INTERRUPTED_EXIT = 130


def optimizer(
    config: Annotated[
        Path | None,
        Option(
            "--config",
            envvar="DRPO_CONFIG",
            help="YAML file with the gateway settings; sidecar settings go "
            "under `optimizer:`.",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        Option(help="Gateway data directory: samples, prompt store, cache, reports."),
    ] = None,
    upstream: UpstreamOption = None,
    model: Annotated[
        str | None,
        Option(help="Optimize only this model. Default: every model in the samples."),
    ] = None,
    mode: ModeOption = None,
    once: Annotated[bool, Option("--once", help="Run one cycle now and exit.")] = False,
    interval: Annotated[
        float | None, Option(min=0.001, help="Seconds between cycles. Default 3600.")
    ] = None,
    min_new_samples: Annotated[
        int | None,
        Option(min=1, help="New samples that start a cycle early. Default 200."),
    ] = None,
    window: Annotated[
        int | None, Option(min=1, help="Newest samples read per cycle. Default 500.")
    ] = None,
    margin: Annotated[
        float | None,
        Option(
            min=-4,
            help="Held-out reward gain (1-5 scale) needed to publish; negative "
            "publishes a candidate that trails by less. Default 0.1.",
        ),
    ] = None,
    helpers: HelpersOption = None,
    helpers_model: HelpersModelOption = None,
    judge: JudgeOption = None,
    judge_model: JudgeModelOption = None,
    canary_share: Annotated[
        float | None,
        Option(
            min=0,
            max=0.99,
            help="Share of clients a new version is served to first; 0 (the "
            "default) activates it directly.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        Option(
            min=0,
            max=65535,
            help="Port of the sidecar's metrics; 0 disables. Default 9464.",
        ),
    ] = None,
    lease_ttl: Annotated[
        float | None,
        Option(
            min=0.001, help="Seconds the sidecar lease lasts unrenewed. Default 60."
        ),
    ] = None,
    log_level: Annotated[
        str | None, Option(help="debug, info, warning or error.")
    ] = None,
) -> None:
    """Optimize the instruction from sampled traffic and publish candidates that win."""
    from gateway.cli import stop_on_sigterm
    from gateway.logs import configure_logging

    flags: dict[str, Any] = {
        "interval": interval, "min_new_samples": min_new_samples, "window": window,
        "margin": margin, "helpers": helpers, "helpers_model": helpers_model,
        "judge": judge, "judge_model": judge_model, "canary_share": canary_share,
        "metrics_port": metrics_port, "lease_ttl": lease_ttl,
        "models": [model] if model else None,
    }  # fmt: skip
    options = {name: value for name, value in flags.items() if value is not None}
    try:
        settings = load_settings(
            config,
            upstream=upstream,
            model=model,
            mode=mode,
            data_dir=data_dir,
            log_level=log_level,
            optimizer=options or None,
        )
    except ConfigurationError as error:
        _fail(str(error))
    configure_logging(settings.log_level)
    stop_on_sigterm()
    try:
        code = asyncio.run(serve(settings, once))
    except KeyboardInterrupt:
        typer.echo("Interrupted while starting or stopping the target.", err=True)
        code = INTERRUPTED_EXIT
    except (ConfigurationError, GatewayError, OptimizerError) as error:
        _fail(str(error))
    except OSError as error:
        _fail(
            f"Could not serve the sidecar metrics on {settings.optimizer.metrics_host}:"
            f"{settings.optimizer.metrics_port}: {error.strerror or error}. Pass "
            "another --metrics-port, or 0 to turn the metrics off."
        )
    raise typer.Exit(code)


async def serve(settings: Settings, once: bool) -> int:
    """Run the sidecar until stopped, or one cycle with `once`; return the exit code."""
    from gateway.cli import upstream_target

    async with upstream_target(settings) as target:
        sidecar = Sidecar(settings, target)
        server = None
        try:
            server = _start_metrics(sidecar, settings)
            with _stop_on_signals(sidecar):
                if once:
                    return _once_exit_code(sidecar, await sidecar.run_once())
                await sidecar.run_forever()
                return 0
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()
            sidecar.close()


def _start_metrics(sidecar: Sidecar, settings: Settings) -> Any:
    options = settings.optimizer
    if options.metrics_port == 0:
        return None
    server, _ = sidecar.metrics.serve(options.metrics_host, options.metrics_port)
    logger.info(
        "Serving sidecar metrics on http://%s:%d/metrics",
        options.metrics_host,
        options.metrics_port,
    )
    return server


@contextlib.contextmanager
def _stop_on_signals(sidecar: Sidecar) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM stop the sidecar instead of the process.

    Outside it, as while the embedded engine starts or stops, both raise
    KeyboardInterrupt, so that the engine is still stopped.
    """
    from gateway.cli import stop_on_sigterm

    loop = asyncio.get_running_loop()
    numbers = (signal.SIGINT, signal.SIGTERM)
    for number in numbers:
        loop.add_signal_handler(number, sidecar.stop, number.name)
    try:
        yield
    finally:
        for number in numbers:
            loop.remove_signal_handler(number)
        stop_on_sigterm()


def _once_exit_code(sidecar: Sidecar, reports: list[RunReport]) -> int:
    if sidecar.stopped:
        typer.echo(
            "Interrupted. The cycle's plan is kept, and every finished model "
            "call is cached: the next start resumes it.",
            err=True,
        )
        return INTERRUPTED_EXIT
    for report in reports:
        version = f" {report.published_version}" if report.published_version else ""
        typer.echo(
            f"{report.model or 'all models'}: {report.outcome}{version} "
            f"({report.reason}). Report: {report.path}"
        )
    failed = [report for report in reports if report.outcome == "failed"]
    if not failed:
        return 0
    details = "; ".join(
        f"run {report.run_id} for {report.model or 'all models'}: {report.reason}"
        for report in failed
    )
    typer.echo(
        f"Error: {len(failed)} of {len(reports)} runs failed ({details}). "
        "The reports under the data directory's runs/sidecar folder have the details.",
        err=True,
    )
    return 1


def _fail(message: str) -> NoReturn:
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)
