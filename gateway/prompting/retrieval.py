"""Per-query selection of the in-context examples most similar to a query.

Selection is optional. Static examples are the default because they keep the
base-mode prefix byte-identical across requests, so an upstream prefix cache
can reuse it. Both retrievers compare the user's query with the example
queries (not the answers) and return the chosen examples in their original
order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import bm25s
import httpx
import numpy as np
import numpy.typing as npt

from gateway.errors import UpstreamError, UpstreamTimeoutError
from gateway.instruction import Example

ExampleKey = tuple[Example, ...]
Vectors = npt.NDArray[np.float64]
Value = TypeVar("Value")


class ExampleRetriever(Protocol):
    """Strategy that chooses the in-context examples for one query."""

    async def select(
        self, query: str, examples: Sequence[Example], k: int
    ) -> list[Example]:
        """Return the `k` examples most similar to `query`, in original order."""
        ...


class _LruCache(Generic[Value]):
    """A small least-recently-used map keyed by an examples tuple."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"cache_size must be at least 1, got {max_size}.")
        self._max_size = max_size
        self._entries: OrderedDict[ExampleKey, Value] = OrderedDict()

    def get(self, key: ExampleKey) -> Value | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: ExampleKey, value: Value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


def _top_k_in_order(
    examples: ExampleKey, scores: Sequence[float], k: int
) -> list[Example]:
    """Return the `k` best-scoring examples in their original order.

    Ties go to the earlier example, so a query that matches nothing gets the
    first `k`.
    """
    ranked = sorted(range(len(examples)), key=lambda index: (-scores[index], index))
    return [examples[index] for index in sorted(ranked[:k])]


def _capped_k(k: int, examples: Sequence[Example]) -> int:
    if k < 0:
        raise ValueError(f"k must be 0 or more, got {k}.")
    return min(k, len(examples))


def _tokenize(texts: list[str]) -> list[list[str]]:
    tokens: list[list[str]] = bm25s.tokenize(
        texts, stopwords="en", return_ids=False, show_progress=False
    )
    return tokens


class BM25Retriever:
    """Retriever that ranks examples by the BM25 score of their queries.

    The index of an examples tuple is built on first use and kept in an LRU
    cache of `cache_size` tuples.
    """

    def __init__(self, *, cache_size: int = 16) -> None:
        self._indexes: _LruCache[Any] = _LruCache(cache_size)

    async def select(
        self, query: str, examples: Sequence[Example], k: int
    ) -> list[Example]:
        """Return the `k` examples most similar to `query`, in original order."""
        key = tuple(examples)
        k = _capped_k(k, key)
        if k == 0 or k == len(key):
            return list(key[:k])
        [query_tokens] = _tokenize([query])
        if not query_tokens:
            return list(key[:k])

        index = self._index(key)
        # get_scores skips tokens missing from the index vocabulary.
        scores = index.get_scores(query_tokens)
        return _top_k_in_order(key, [float(score) for score in scores], k)

    def _index(self, key: ExampleKey) -> Any:
        index = self._indexes.get(key)
        if index is None:
            index = bm25s.BM25()
            index.index(
                _tokenize([example.query for example in key]), show_progress=False
            )
            self._indexes.put(key, index)
        return index


class EmbeddingRetriever:
    """Retriever that ranks examples by cosine similarity of their embeddings.

    It calls an OpenAI-compatible ``POST {base_url}/embeddings``. The example
    embeddings of an examples tuple are requested once, together with the
    first query, and kept in an LRU cache of `cache_size` tuples.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        cache_size: int = 16,
    ) -> None:
        self._client = client
        self._url = f"{base_url.rstrip('/')}/embeddings"
        self._model = model
        self._api_key = api_key
        self._vectors: _LruCache[Vectors] = _LruCache(cache_size)

    async def select(
        self, query: str, examples: Sequence[Example], k: int
    ) -> list[Example]:
        """Return the `k` examples most similar to `query`, in original order.

        Raises UpstreamError when the embeddings request fails.
        """
        key = tuple(examples)
        k = _capped_k(k, key)
        if not query.strip() or k == 0 or k == len(key):
            return list(key[:k])

        example_vectors = self._vectors.get(key)
        if example_vectors is None:
            vectors = await self._embed([query, *(e.query for e in key)])
            query_vector, example_vectors = vectors[0], vectors[1:]
            self._vectors.put(key, example_vectors)
        else:
            query_vector = (await self._embed([query]))[0]

        if query_vector.shape[0] != example_vectors.shape[1]:
            raise self._failure(
                f"returned a query embedding of size {query_vector.shape[0]} "
                f"for examples embedded with size {example_vectors.shape[1]}"
            )
        similarity = _cosine_similarity(query_vector, example_vectors)
        return _top_k_in_order(key, similarity.tolist(), k)

    async def _embed(self, texts: list[str]) -> Vectors:
        headers = {}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        payload = {"model": self._model, "input": texts}
        try:
            response = await self._client.post(self._url, json=payload, headers=headers)
        except httpx.TimeoutException as error:
            raise UpstreamTimeoutError(
                f"The embeddings request to {self._url!r} timed out ({error!r}). "
                "Check that the upstream is running, or set "
                "DRPO_EXAMPLE_SELECTION=static."
            ) from error
        except httpx.HTTPError as error:
            raise self._failure(f"could not be sent ({error!r})") from error

        if not response.is_success:
            excerpt = response.text[:200]
            raise self._failure(
                f"returned HTTP {response.status_code} with body {excerpt!r}"
            )
        return self._parse(response, len(texts))

    def _parse(self, response: httpx.Response, expected: int) -> Vectors:
        try:
            items = sorted(response.json()["data"], key=lambda item: item["index"])
            vectors = np.array([item["embedding"] for item in items], dtype=np.float64)
        except (ValueError, KeyError, TypeError) as error:
            raise self._failure(
                f"returned a body that is not an embeddings list ({error!r})"
            ) from error

        if vectors.ndim != 2 or vectors.shape[0] != expected:
            count = vectors.shape[0] if vectors.ndim else 0
            raise self._failure(
                f"returned {count} embeddings of shape {vectors.shape} "
                f"for {expected} inputs"
            )
        return vectors

    def _failure(self, reason: str) -> UpstreamError:
        return UpstreamError(
            f"The embeddings request to {self._url!r} for model {self._model!r} "
            f"{reason}. Check that the upstream serves this model at "
            "/embeddings (DRPO_EMBEDDING_MODEL), or set "
            "DRPO_EXAMPLE_SELECTION=static."
        )


def _cosine_similarity(query: Vectors, examples: Vectors) -> Vectors:
    """Return the cosine similarity of `query` with each row of `examples`.

    A zero vector has similarity 0 with everything.
    """
    norms = np.linalg.norm(examples, axis=1) * np.linalg.norm(query)
    dots = examples @ query
    similarity: Vectors = np.divide(
        dots, norms, out=np.zeros_like(dots), where=norms > 0
    )
    return similarity
