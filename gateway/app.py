"""The FastAPI application."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import __version__
from gateway.errors import ConfigurationError
from gateway.routes import routes
from gateway.settings import Settings
from gateway.state import GatewayState
from gateway.store import PromptStore
from gateway.upstream import UpstreamTarget

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings, target: UpstreamTarget, store: PromptStore | None = None
) -> FastAPI:
    """Build the gateway app for `target`; the store opens when the app starts."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await GatewayState.start(settings, target, store)
        app.state.gateway = state
        logger.info("Gateway ready in front of %s", target.base_url)
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(
        title="drpo-gateway",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.router.routes.extend(routes)
    app.add_exception_handler(HTTPException, _http_exception)
    return app


def create_worker_app() -> FastAPI:
    """Build the app of one worker of `drpo-gateway serve --workers N`.

    The settings and the upstream target come from the file that the parent
    process named in DRPO_GATEWAY_WORKER_CONFIG.
    """
    from uvicorn.config import STARTUP_FAILURE

    from gateway.logs import configure_logging
    from gateway.workers import read_worker_config

    try:
        settings, target = read_worker_config()
    except ConfigurationError as error:
        logger.error("Gateway worker failed to start: %s", error)
        # On this exit status uvicorn's supervisor stops every worker instead
        # of restarting this one.
        sys.exit(STARTUP_FAILURE)
    configure_logging(settings.log_level)
    return create_app(settings, target)


async def _http_exception(request: Request, error: Exception) -> Response:
    assert isinstance(error, HTTPException)
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    message = (
        f"No route {request.method} {request.url.path}."
        if error.status_code in (404, 405)
        else str(error.detail)
    )
    body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status_code=error.status_code)
