"""Thin routers: adapt HTTP to the service layer and back.

The routes are plain Starlette routes: they read no typed parameters, so
FastAPI's dependency resolution would only add time to every request.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import GatewayError
from gateway.http import (
    REQUEST_ID_HEADER,
    ClientDisconnected,
    check_api_key,
    error_response,
    internal_error_response,
    read_body,
    request_id,
    to_response,
    until_disconnect,
)
from gateway.service.context import Reply, RequestContext, StreamReply
from gateway.service.passthrough import forward
from gateway.service.streams import CLIENT_CLOSED_REQUEST
from gateway.state import GatewayState

logger = logging.getLogger(__name__)

Handler = Callable[
    [GatewayState, bytes, RequestContext], Awaitable[Reply | StreamReply]
]


async def handle(request: Request, route: str, handler: Handler) -> Response:
    """Run one API request: key check, body, service call, error mapping, metrics."""
    state: GatewayState = request.app.state.gateway
    parts = state.parts
    ctx = RequestContext(
        route=route, request_id=request_id(request), peer=request.scope.get("client")
    )
    in_flight = parts.metrics.in_flight.labels(route=route)
    in_flight.inc()

    def done() -> None:
        in_flight.dec()
        parts.finish(ctx)

    try:
        check_api_key(request, parts.settings)
        raw = await read_body(request, parts.settings.max_body_bytes)
        reply = await until_disconnect(request, handler(state, raw, ctx))
        response = to_response(reply, done)
    except GatewayError as error:
        ctx.status = error.status_code
        parts.count_upstream_error(error)
        logger.info("request_id=%s rejected: %s", ctx.request_id, error.message)
        response = error_response(error)
        done()
    except ClientDisconnected:
        ctx.status = CLIENT_CLOSED_REQUEST
        done()
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception:
        ctx.status = 500
        logger.exception(
            "request_id=%s failed with an unexpected error", ctx.request_id
        )
        done()
        response = internal_error_response()
    response.headers[REQUEST_ID_HEADER] = ctx.request_id
    return response


async def chat_completions(request: Request) -> Response:
    return await handle(
        request,
        "chat_completions",
        lambda state, raw, ctx: state.chat.create(raw, request.headers, ctx),
    )


async def completions(request: Request) -> Response:
    return await handle(
        request,
        "completions",
        lambda state, raw, ctx: state.completions.create(raw, request.headers, ctx),
    )


async def passthrough(request: Request) -> Response:
    path: str = request.path_params["path"]
    route = "models" if path == "models" else "passthrough"
    return await handle(
        request,
        route,
        lambda state, raw, ctx: forward(
            state.parts,
            request.method,
            "/" + path,
            request.query_params,
            raw,
            request.headers,
            ctx,
        ),
    )


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    upstream_ready = await state.parts.upstream.is_ready()
    active = {
        model: version.version for model, version in state.parts.prompts.active.items()
    }
    body = {
        "status": "ready" if upstream_ready and active else "not_ready",
        "upstream": "reachable" if upstream_ready else "unreachable",
        "prompt_versions": active,
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


async def metrics(request: Request) -> Response:
    state: GatewayState = request.app.state.gateway
    gateway_metrics = state.parts.metrics
    gateway_metrics.set_store_generation(state.parts.prompts.generation)
    return Response(gateway_metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route(
        "/v1/{path:path}",
        passthrough,
        methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    ),
    Route("/health", health, methods=["GET"]),
    Route("/ready", ready, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
