"""The floor for a Python proxy: starlette receives, httpx forwards, nothing else."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8080")
client: httpx.AsyncClient | None = None


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global client
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    client = httpx.AsyncClient(base_url=UPSTREAM, limits=limits)
    yield
    await client.aclose()


async def forward(request: Request) -> Response:
    assert client is not None
    upstream = await client.post(
        request.url.path,
        content=await request.body(),
        headers={"content-type": "application/json"},
    )
    return Response(
        upstream.content,
        status_code=upstream.status_code,
        media_type=upstream.headers.get("content-type"),
    )


app = Starlette(
    routes=[Route("/v1/chat/completions", forward, methods=["POST"])],
    lifespan=lifespan,
)
