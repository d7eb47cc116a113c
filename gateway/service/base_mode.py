"""Base mode: chat requests served by a base model through /v1/completions.

The conversation is rendered as raw text by the prompt builder; these helpers
build the completion request, and turn completion results (whole or streamed)
back into chat completion objects with the framing trimmed off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from gateway.errors import InvalidRequestError, UpstreamError
from gateway.prompting import AnswerTrimmer, base_stop_strings, trim_answer

# Chat fields that have no meaning for /v1/completions; everything else the
# client sent (seed, penalties, logit_bias, user, vendor extensions) is kept.
CHAT_ONLY_FIELDS = frozenset(
    {
        "messages",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "logprobs",
        "top_logprobs",
        "max_completion_tokens",
        "max_tokens",
        "stream_options",
        "modalities",
        "audio",
        "prediction",
        "reasoning_effort",
        "store",
        "metadata",
        "web_search_options",
        "service_tier",
        "stop",
    }
)


def reject_tools(body: dict[str, Any]) -> None:
    """Raise InvalidRequestError when chat request `body` offers the model tools.

    A base model answers in plain text and cannot emit tool calls, so dropping
    the tools silently would hand the client an answer it did not ask for.
    """
    for name in ("tools", "functions"):
        if body.get(name):
            raise InvalidRequestError(
                f"'{name}' is set, but base mode renders the conversation as "
                "plain text and cannot call tools. Remove it, or serve this "
                "model in chat mode (DRPO_MODE or DRPO_MODEL_MODES).",
                param=name,
                code="unsupported_in_base_mode",
            )


def completion_request(
    body: dict[str, Any], prompt: str, default_max_tokens: int
) -> dict[str, Any]:
    """Build the /v1/completions body that serves chat request `body`."""
    request = {key: value for key, value in body.items() if key not in CHAT_ONLY_FIELDS}
    request["prompt"] = prompt
    request["stop"] = base_stop_strings(body.get("stop"))
    request["max_tokens"] = (
        body.get("max_completion_tokens")
        or body.get("max_tokens")
        or default_max_tokens
    )
    schema = _json_schema(body.get("response_format"))
    if schema is not None:
        # llama-server ignores response_format on /v1/completions but honours a
        # top-level json_schema; vLLM reads response_format and ignores it.
        request["json_schema"] = schema
    if body.get("logprobs"):
        # Completions take the number of alternatives; 0 is not accepted by
        # every server, so ask for 1 and drop it again when the client wants 0.
        request["logprobs"] = max(int(body.get("top_logprobs") or 0), 1)
    if body.get("stream"):
        request["stream_options"] = {"include_usage": True}
    return request


def completion_choices(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the choices of a completion result or event.

    Raises UpstreamError when they are not a list of objects with a string
    (or absent) text, so that a broken upstream gets a 502 and not a crash.
    """
    choices = payload.get("choices")
    if choices is None:
        return []
    if isinstance(choices, list) and all(_is_choice(choice) for choice in choices):
        return choices
    raise UpstreamError(
        "The upstream returned completion choices of an unexpected shape: "
        f"{str(choices)[:200]!r}. Check that DRPO_UPSTREAM is an "
        "OpenAI-compatible server.",
        code="invalid_response",
    )


def _is_choice(choice: object) -> bool:
    return isinstance(choice, dict) and isinstance(choice.get("text") or "", str)


def _json_schema(response_format: object) -> dict[str, Any] | None:
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return {"type": "object"}
    spec = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(spec, dict):
        schema = spec.get("schema")
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


def chat_completion_id(completion_id: object) -> str:
    text = str(completion_id or f"{time.time_ns():x}")
    return "chatcmpl-" + text.removeprefix("cmpl-").removeprefix("chatcmpl-")


def chat_response(
    payload: dict[str, Any], top_logprobs: int | None, prefill: str = ""
) -> dict[str, Any]:
    """Turn a /v1/completions response into a chat completion, framing trimmed.

    `prefill` is the text of a final assistant message that the answer continues.
    """
    choices = []
    for position, choice in enumerate(completion_choices(payload)):
        raw_text = choice.get("text") or ""
        text, cut = trim_answer(raw_text, prefill)
        finish_reason = "stop" if cut else choice.get("finish_reason")
        entry: dict[str, Any] = {
            "index": choice.get("index", position),
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
        if top_logprobs is not None:
            span = kept_span(raw_text, text)
            entry["logprobs"] = chat_logprobs(
                choice.get("logprobs"), top_logprobs, span
            )
        choices.append(entry)
    response: dict[str, Any] = {
        "id": chat_completion_id(payload.get("id")),
        "object": "chat.completion",
        "created": payload.get("created") or int(time.time()),
        "model": payload.get("model"),
        "choices": choices,
    }
    if payload.get("system_fingerprint"):
        response["system_fingerprint"] = payload["system_fingerprint"]
    if payload.get("usage") is not None:
        response["usage"] = payload["usage"]
    return response


def kept_span(raw_text: str, kept: str) -> tuple[int, int]:
    """Return where the trimmed answer lies in the raw completion text."""
    start = len(raw_text) - len(raw_text.lstrip())
    return start, start + len(kept)


def chat_logprobs(
    logprobs: object, top_logprobs: int, span: tuple[int, int] | None = None
) -> dict[str, Any] | None:
    """Convert completion logprobs to the chat shape `{"content": [...]}`.

    vLLM and OpenAI send the legacy completions shape (tokens, token_logprobs,
    top_logprobs, text_offset); llama-server sends the chat shape already.
    Tokens that lie wholly outside `span` (the framing that was trimmed) are
    left out. Malformed logprobs give None rather than an error, because they
    are an extra the answer does not depend on.
    """
    if not isinstance(logprobs, dict):
        return None
    try:
        if isinstance(logprobs.get("content"), list):
            entries = _chat_shape_entries(logprobs["content"], top_logprobs)
        else:
            entries = _legacy_entries(logprobs, top_logprobs)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError):
        return None
    content = []
    position = 0
    for entry in entries:
        start = position
        position += len(entry["token"])
        if span is not None and (position <= span[0] or start >= span[1]):
            continue
        content.append(entry)
    return {"content": content}


def _legacy_entries(
    logprobs: dict[str, Any], top_logprobs: int
) -> list[dict[str, Any]]:
    tokens = logprobs.get("tokens") or []
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    entries = []
    for index, token in enumerate(tokens):
        alternatives = tops[index] if index < len(tops) and tops[index] else {}
        ranked = sorted(alternatives.items(), key=lambda item: -float(item[1]))
        entries.append(
            {
                "token": str(token),
                "logprob": values[index] if index < len(values) else None,
                "bytes": list(str(token).encode()),
                "top_logprobs": [
                    {"token": name, "logprob": value, "bytes": list(name.encode())}
                    for name, value in ranked[:top_logprobs]
                ],
            }
        )
    return entries


def _chat_shape_entries(items: list[Any], top_logprobs: int) -> list[dict[str, Any]]:
    entries = []
    for item in items:
        token = str(item["token"])
        alternatives = item.get("top_logprobs") or []
        entries.append(
            {
                "token": token,
                "logprob": item.get("logprob"),
                "bytes": item.get("bytes") or list(token.encode()),
                "top_logprobs": [
                    {
                        "token": str(top["token"]),
                        "logprob": top.get("logprob"),
                        "bytes": top.get("bytes") or list(str(top["token"]).encode()),
                    }
                    for top in alternatives[:top_logprobs]
                ],
            }
        )
    return entries


@dataclass
class _ChoiceState:
    trimmer: AnswerTrimmer = field(default_factory=AnswerTrimmer)
    started: bool = False
    finished: bool = False
    cut_early: bool = False
    """The trimmer ended the answer while the upstream was still generating it."""
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)


class ChatChunkConverter:
    """Turn streamed completion events into chat completion chunks as they come."""

    def __init__(self, n: int, top_logprobs: int | None, prefill: str = "") -> None:
        self.n = n
        self.top_logprobs = top_logprobs
        self.prefill = prefill
        self.id = chat_completion_id(None)
        self.model: Any = None
        self.created = int(time.time())
        self.usage: dict[str, Any] | None = None
        self.content_seen = False
        self._choices: dict[int, _ChoiceState] = {}

    @property
    def all_finished(self) -> bool:
        return len(self._choices) >= self.n and all(
            state.finished for state in self._choices.values()
        )

    @property
    def upstream_still_generating(self) -> bool:
        """Whether every answer is finished but the upstream is still generating one.

        When the upstream finished every choice itself, its usage event and
        [DONE] still follow and are worth reading.
        """
        return self.all_finished and any(
            state.cut_early for state in self._choices.values()
        )

    def convert(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """Return the chat chunks for one completion event."""
        if self.model is None:
            self.model = payload.get("model")
            self.id = chat_completion_id(payload.get("id"))
            self.created = payload.get("created") or self.created
        if payload.get("usage"):
            self.usage = payload["usage"]
        chunks: list[dict[str, Any]] = []
        for position, choice in enumerate(completion_choices(payload)):
            index = choice.get("index", position)
            chunks.extend(self._convert_choice(index, choice))
        return chunks

    def finish(self) -> list[dict[str, Any]]:
        """Close every choice the upstream left open when its stream ended."""
        chunks: list[dict[str, Any]] = []
        for index in range(self.n):
            state = self._choices.setdefault(
                index, _ChoiceState(AnswerTrimmer(self.prefill))
            )
            if not state.finished:
                chunks.extend(self._close(index, state, "stop"))
        return chunks

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return self._chunk([], usage=usage)

    def _convert_choice(
        self, index: int, choice: dict[str, Any]
    ) -> list[dict[str, Any]]:
        state = self._choices.setdefault(
            index, _ChoiceState(AnswerTrimmer(self.prefill))
        )
        if state.finished:
            return []
        chunks = []
        if not state.started:
            state.started = True
            chunks.append(self._delta(index, {"role": "assistant", "content": ""}))
        if self.top_logprobs is not None:
            converted = chat_logprobs(choice.get("logprobs"), self.top_logprobs)
            if converted:
                state.pending_logprobs.extend(converted["content"])
        text = state.trimmer.feed(choice.get("text") or "")
        if text:
            chunks.append(self._content(index, state, text))
        if state.trimmer.stopped:
            state.cut_early = not choice.get("finish_reason")
            chunks.extend(self._close(index, state, "stop"))
        elif choice.get("finish_reason"):
            chunks.extend(self._close(index, state, choice["finish_reason"]))
        return chunks

    def _close(
        self, index: int, state: _ChoiceState, finish_reason: str
    ) -> list[dict[str, Any]]:
        state.finished = True
        chunks = []
        if not state.started:
            state.started = True
            chunks.append(self._delta(index, {"role": "assistant", "content": ""}))
        rest = state.trimmer.finish()
        if rest:
            chunks.append(self._content(index, state, rest))
        if state.trimmer.stopped:
            finish_reason = "stop"
        chunks.append(self._delta(index, {}, finish_reason=finish_reason))
        return chunks

    def _content(self, index: int, state: _ChoiceState, text: str) -> dict[str, Any]:
        self.content_seen = True
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = {"content": state.pending_logprobs}
            state.pending_logprobs = []
        return self._delta(index, {"content": text}, logprobs=logprobs)

    def _delta(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {
            "index": index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        return self._chunk([choice])

    def _chunk(
        self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk
