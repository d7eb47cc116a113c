"""The FastAPI application."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway import __version__
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
