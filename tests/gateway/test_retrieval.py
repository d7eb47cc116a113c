"""Tests of per-query example selection with BM25 and with upstream embeddings."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import bm25s
import httpx
import pytest

from gateway.errors import UpstreamError, UpstreamTimeoutError
from gateway.instruction import Example
from gateway.prompting import BM25Retriever, EmbeddingRetriever

SORT = Example(query="How do I sort a list in Python?", answer="Use sorted().")
WEATHER = Example(query="What is the weather in Paris today?", answer="No live data.")
BREAD = Example(query="How do I bake sourdough bread?", answer="Feed a starter.")
REVERSE = Example(query="Reverse a Python string", answer="Use s[::-1].")
EXAMPLES = (SORT, WEATHER, BREAD, REVERSE)

# Fixed embeddings: the query is closest to SORT, then REVERSE.
QUERY = "Order my Python list"
VECTORS = {
    SORT.query: [1.0, 0.0, 0.0],
    WEATHER.query: [0.0, 1.0, 0.0],
    BREAD.query: [0.0, 0.0, 1.0],
    REVERSE.query: [0.8, 0.0, 0.6],
    QUERY: [0.95, 0.0, 0.3],
    "zero": [0.0, 0.0, 0.0],
}


def embeddings_body(
    texts: list[str], vectors: dict[str, list[float]] = VECTORS
) -> dict[str, Any]:
    # Reversed on purpose: clients must order the items by "index".
    data = [
        {"object": "embedding", "index": index, "embedding": vectors[text]}
        for index, text in enumerate(texts)
    ]
    return {"object": "list", "data": data[::-1], "model": "embedder"}


class RecordingUpstream:
    """An httpx.MockTransport handler that serves VECTORS and records requests."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.vectors = VECTORS

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = embeddings_body(self.inputs(-1), self.vectors)
        return httpx.Response(200, json=body)

    def inputs(self, position: int) -> list[str]:
        payload = json.loads(self.requests[position].content)
        texts: list[str] = payload["input"]
        return texts


def mock_retriever(
    handler: Any, api_key: str | None = None
) -> tuple[EmbeddingRetriever, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    retriever = EmbeddingRetriever(
        client, "http://upstream.test/v1/", "embedder", api_key
    )
    return retriever, client


async def test_bm25_selects_matching_examples_in_order() -> None:
    chosen = await BM25Retriever().select("reverse a python list", EXAMPLES, 2)

    assert chosen == [SORT, REVERSE]


async def test_bm25_ranks_best_match_first_when_k_one() -> None:
    chosen = await BM25Retriever().select("sourdough starter bread", EXAMPLES, 1)

    assert chosen == [BREAD]


async def test_bm25_caps_k_at_example_count() -> None:
    assert await BM25Retriever().select("python", EXAMPLES, 10) == list(EXAMPLES)


async def test_bm25_empty_query_returns_first_k() -> None:
    assert await BM25Retriever().select("   ", EXAMPLES, 2) == [SORT, WEATHER]


async def test_bm25_unmatched_query_returns_first_k() -> None:
    assert await BM25Retriever().select("zebra giraffe", EXAMPLES, 2) == [SORT, WEATHER]


async def test_bm25_zero_k_returns_nothing() -> None:
    assert await BM25Retriever().select("python", EXAMPLES, 0) == []


async def test_bm25_rejects_negative_k() -> None:
    with pytest.raises(ValueError, match="k must be 0 or more"):
        await BM25Retriever().select("python", EXAMPLES, -1)


async def test_bm25_indexes_stopword_only_example() -> None:
    examples = (Example(query="the of and", answer="Nothing."), *EXAMPLES)

    chosen = await BM25Retriever().select("bake bread", examples, 1)

    assert chosen == [BREAD]


async def test_bm25_builds_index_once_per_tuple(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real_index = bm25s.BM25.index

    def counting_index(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_index(self, *args, **kwargs)

    monkeypatch.setattr(bm25s.BM25, "index", counting_index)
    retriever = BM25Retriever()

    await retriever.select("python list", EXAMPLES, 2)
    await retriever.select("bread", list(EXAMPLES), 2)
    await retriever.select("bread", EXAMPLES[:3], 2)

    assert len(calls) == 2


async def test_embeddings_select_nearest_in_order() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        chosen = await retriever.select(QUERY, EXAMPLES, 2)

    assert chosen == [SORT, REVERSE]


async def test_embeddings_request_has_openai_shape() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream, api_key="secret-key")
    async with client:
        await retriever.select(QUERY, EXAMPLES, 2)

    request = upstream.requests[0]
    assert request.method == "POST"
    assert str(request.url) == "http://upstream.test/v1/embeddings"
    assert request.headers["authorization"] == "Bearer secret-key"
    assert json.loads(request.content)["model"] == "embedder"
    assert upstream.inputs(0) == [QUERY, *(example.query for example in EXAMPLES)]


async def test_embeddings_omit_authorization_without_key() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        await retriever.select(QUERY, EXAMPLES, 2)

    assert "authorization" not in upstream.requests[0].headers


async def test_embeddings_cache_example_vectors() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        await retriever.select(QUERY, EXAMPLES, 2)
        chosen = await retriever.select(QUERY, list(EXAMPLES), 2)

    assert len(upstream.requests) == 2
    assert upstream.inputs(1) == [QUERY]
    assert chosen == [SORT, REVERSE]


async def test_embeddings_skip_call_when_all_chosen() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        chosen = await retriever.select(QUERY, EXAMPLES, 9)

    assert chosen == list(EXAMPLES)
    assert upstream.requests == []


async def test_embeddings_empty_query_returns_first_k() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        chosen = await retriever.select("", EXAMPLES, 2)

    assert chosen == [SORT, WEATHER]
    assert upstream.requests == []


async def test_embeddings_zero_query_vector_returns_first_k() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        chosen = await retriever.select("zero", EXAMPLES, 2)

    assert chosen == [SORT, WEATHER]


def failing_status(request: httpx.Request) -> httpx.Response:
    return httpx.Response(500, text="model not loaded")


def failing_connection(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def malformed_body(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, text="not json")


def missing_items(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"data": [{"index": 0, "embedding": [1.0]}]})


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (failing_status, "returned HTTP 500 with body 'model not loaded'"),
        (failing_connection, "could not be sent"),
        (malformed_body, "not an embeddings list"),
        (missing_items, "returned 1 embeddings"),
    ],
)
async def test_embeddings_failure_raises_upstream_error(
    handler: Any, expected: str
) -> None:
    retriever, client = mock_retriever(handler)
    async with client:
        with pytest.raises(UpstreamError) as caught:
            await retriever.select(QUERY, EXAMPLES, 2)

    assert expected in caught.value.message
    assert "'http://upstream.test/v1/embeddings'" in caught.value.message
    assert "DRPO_EXAMPLE_SELECTION=static" in caught.value.message


async def test_embeddings_timeout_raises_timeout_error() -> None:
    def timing_out(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    retriever, client = mock_retriever(timing_out)
    async with client:
        with pytest.raises(UpstreamTimeoutError):
            await retriever.select(QUERY, EXAMPLES, 2)


async def test_embeddings_size_change_raises_upstream_error() -> None:
    upstream = RecordingUpstream()
    retriever, client = mock_retriever(upstream)
    async with client:
        await retriever.select(QUERY, EXAMPLES, 2)
        upstream.vectors = {QUERY: [1.0, 0.0, 0.0, 0.0]}
        with pytest.raises(UpstreamError, match="size 4"):
            await retriever.select(QUERY, EXAMPLES, 2)


class EmbeddingsHandler(BaseHTTPRequestHandler):
    """Serves POST /v1/embeddings from VECTORS, like an OpenAI-compatible server."""

    def do_POST(self) -> None:
        if self.path != "/v1/embeddings":
            self.send_error(404)
            return
        length = int(self.headers["Content-Length"])
        payload = json.loads(self.rfile.read(length))
        body = json.dumps(embeddings_body(payload["input"])).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def embeddings_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EmbeddingsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


async def test_embeddings_against_real_server(embeddings_server: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        retriever = EmbeddingRetriever(client, embeddings_server, "embedder")
        chosen = await retriever.select(QUERY, EXAMPLES, 2)

    assert chosen == [SORT, REVERSE]


async def test_embeddings_real_server_wrong_path(embeddings_server: str) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        retriever = EmbeddingRetriever(client, embeddings_server + "/v2", "embedder")
        with pytest.raises(UpstreamError, match="HTTP 404"):
            await retriever.select(QUERY, EXAMPLES, 2)
