"""Injection of an instruction into chat messages or a base-model prompt.

The gateway (serving) and the optimizer (DRPO search) both build prompts
here, so the text that is optimized is the text that is served.

Messages are OpenAI chat messages as plain dicts. Keys other than ``role``
and ``content`` (``tool_calls``, ``tool_call_id``, ``name``) are passed
through untouched in chat mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.errors import InvalidRequestError
from gateway.instruction import Example, Instruction
from gateway.prompting import framing
from gateway.settings import SystemMessagePolicy

# A message with its position in the client's list, for error params.
IndexedMessage = tuple[int, Mapping[str, Any]]

_SYSTEM_ROLES = frozenset({"system", "developer"})
_TOOL_ROLES = frozenset({"tool", "function"})
_SEPARATOR = "\n\n"
_CHAT_MODE_HINT = "or serve this model in chat mode (DRPO_MODE or DRPO_MODEL_MODES)."


@dataclass(frozen=True)
class _ClientMessages:
    """A client's messages with our earlier injection removed."""

    system_text: str
    conversation: list[IndexedMessage]


@dataclass
class _Turn:
    """One query of a base-mode conversation and its answer, if any yet."""

    query: str
    answer: str | None = None

    def add_answer(self, text: str) -> None:
        if self.answer is None:
            self.answer = text
        else:
            self.answer += _SEPARATOR + text


class PromptBuilder:
    """Builder of chat messages and base-model prompts that carry an instruction.

    `system_policy` decides what happens to the client's system and developer
    messages. Both modes are idempotent: messages that already start with our
    injected system message and examples are stripped of them first, so
    injecting twice gives the same result as injecting once.
    """

    def __init__(
        self, system_policy: SystemMessagePolicy = SystemMessagePolicy.APPEND
    ) -> None:
        self.system_policy = system_policy

    def chat_messages(
        self,
        instruction: Instruction,
        messages: Sequence[Mapping[str, Any]],
        examples: Sequence[Example] | None = None,
    ) -> list[dict[str, Any]]:
        """Return the messages with our system prompt and examples injected.

        The result has at most one system message, first, then the examples
        as user and assistant pairs, then the client's conversation without
        its system and developer messages. `examples=None` means
        `instruction.examples`.
        """
        chosen = _chosen_examples(instruction, examples)
        client = self._client_messages(instruction, messages, chosen)
        system_text = self._system_text(instruction, client.system_text)

        injected: list[dict[str, Any]] = []
        if system_text:
            injected.append({"role": "system", "content": system_text})
        for example in chosen:
            injected.append({"role": "user", "content": example.query})
            injected.append({"role": "assistant", "content": example.answer})
        return injected + [dict(message) for _, message in client.conversation]

    def base_prompt(
        self,
        instruction: Instruction,
        messages: Sequence[Mapping[str, Any]],
        examples: Sequence[Example] | None = None,
    ) -> str:
        """Render the whole base-mode prompt, ending with an open answer.

        Earlier user and assistant turns become closed query and answer
        sections after the examples, and the last user message is the open
        query. Consecutive messages of the same role are joined with a blank
        line. When the conversation ends with an assistant message, that text
        is a prefill: the prompt ends with it, unchanged, inside the open
        answer section, and the model continues it (pass it as `prefill` to
        `AnswerTrimmer`).

        The prompt starts with `base_prefix(instruction, examples)` unless
        the client sends a system or developer message that the policy merges
        into the instructions section.

        Raises InvalidRequestError, naming the param, for tool messages and
        tool calls, non-text content parts, an assistant message before any
        user message, and a conversation without a user message.
        """
        chosen = _chosen_examples(instruction, examples)
        client = self._client_messages(instruction, messages, chosen)
        system_text = self._system_text(instruction, client.system_text)

        turns = _base_turns(client.conversation)
        parts = [_render_prefix(system_text, chosen)]
        for turn in turns[:-1]:
            parts.append(framing.render_query(turn.query.strip()))
            parts.append(framing.render_answer((turn.answer or "").strip()))
        last = turns[-1]
        parts.append(framing.render_query(last.query.strip()))
        parts.append(framing.render_open_answer(last.answer or ""))
        return "".join(parts)

    def base_prefix(
        self, instruction: Instruction, examples: Sequence[Example] | None = None
    ) -> str:
        """Render the base-mode text before the first conversation query.

        The prefix depends only on the instruction and the examples, so it is
        byte-identical across requests and an upstream prefix cache can reuse
        it.
        """
        chosen = _chosen_examples(instruction, examples)
        return _render_prefix(_our_system_text(instruction), chosen)

    def injected_text(
        self, instruction: Instruction, examples: Sequence[Example] | None = None
    ) -> str:
        """Return the text chat mode adds, joined by blank lines.

        It is the system prompt and every example query and answer, for token
        counting. In base mode the added text is `base_prefix`.
        """
        chosen = _chosen_examples(instruction, examples)
        texts = [_our_system_text(instruction)]
        for example in chosen:
            texts += [example.query, example.answer]
        return _SEPARATOR.join(text for text in texts if text)

    def _system_text(self, instruction: Instruction, client_text: str) -> str:
        ours = _our_system_text(instruction)
        if not client_text:
            return ours
        if self.system_policy is SystemMessagePolicy.DROP:
            return ours
        if self.system_policy is SystemMessagePolicy.REPLACE or not ours:
            return client_text
        if self.system_policy is SystemMessagePolicy.PREPEND:
            return f"{client_text}{_SEPARATOR}{ours}"
        return f"{ours}{_SEPARATOR}{client_text}"

    def _client_messages(
        self,
        instruction: Instruction,
        messages: Sequence[Mapping[str, Any]],
        chosen: Sequence[Example],
    ) -> _ClientMessages:
        indexed = _validate_roles(messages)
        ours = _our_system_text(instruction)
        system_texts: list[str] = []
        conversation: list[IndexedMessage] = []
        for index, message in indexed:
            if message["role"] not in _SYSTEM_ROLES:
                conversation.append((index, message))
                continue
            text = _content_text(message, index, _SYSTEM_PART_HINT, allow_none=True)
            if index == 0 and message["role"] == "system":
                text = _remove_our_system_text(text, ours)
            if text.strip():
                system_texts.append(text)

        known = {*instruction.examples, *chosen}
        return _ClientMessages(
            system_text=_SEPARATOR.join(system_texts),
            conversation=_strip_example_pairs(conversation, known),
        )


_SYSTEM_PART_HINT = (
    "system and developer messages accept only text parts. "
    "Move the part to a user message."
)
_BASE_PART_HINT = (
    "base mode renders plain text and accepts only text parts. "
    f"Send text only, {_CHAT_MODE_HINT}"
)


def _chosen_examples(
    instruction: Instruction, examples: Sequence[Example] | None
) -> Sequence[Example]:
    return instruction.examples if examples is None else examples


def _our_system_text(instruction: Instruction) -> str:
    return instruction.system_prompt.strip()


def _render_prefix(system_text: str, examples: Sequence[Example]) -> str:
    parts = [framing.render_instructions(system_text.strip())]
    for example in examples:
        parts.append(framing.render_query(example.query.strip()))
        parts.append(framing.render_answer(example.answer.strip()))
    return "".join(parts)


def _remove_our_system_text(text: str, ours: str) -> str:
    """Return the client's part of a system message that we injected before.

    APPEND produces "ours, blank line, theirs" and PREPEND the reverse, and
    either may reach us again when a client sends back a conversation.
    """
    if not ours:
        return text
    if text == ours:
        return ""
    if text.startswith(ours + _SEPARATOR):
        return text[len(ours) + len(_SEPARATOR) :]
    if text.endswith(_SEPARATOR + ours):
        return text[: -len(ours) - len(_SEPARATOR)]
    return text


def _strip_example_pairs(
    conversation: list[IndexedMessage], known: set[Example]
) -> list[IndexedMessage]:
    """Remove the leading user and assistant pairs that are known examples.

    Each example is removed at most once, so a conversation that repeats an
    example keeps the repetition. A pair counts only when both messages have
    exactly the keys we inject, role and a string content.

    NOTE: a client conversation whose first turn is a verbatim copy of an
    example loses that turn, because it cannot be told apart from our own
    injection sent back without the system message.
    """
    remaining = set(known)
    start = 0
    while start + 1 < len(conversation):
        pair = _example_pair(conversation[start][1], conversation[start + 1][1])
        if pair is None or pair not in remaining:
            break
        remaining.discard(pair)
        start += 2
    return conversation[start:]


def _example_pair(
    user: Mapping[str, Any], assistant: Mapping[str, Any]
) -> Example | None:
    if set(user) != {"role", "content"} or set(assistant) != {"role", "content"}:
        return None
    if user["role"] != "user" or assistant["role"] != "assistant":
        return None
    query, answer = user["content"], assistant["content"]
    if not isinstance(query, str) or not isinstance(answer, str):
        return None
    if not query or not answer:
        return None
    return Example(query=query, answer=answer)


def _base_turns(conversation: list[IndexedMessage]) -> list[_Turn]:
    """Group a conversation into query and answer turns for base mode."""
    turns: list[_Turn] = []
    for index, message in conversation:
        role = message["role"]
        if role == "user":
            text = _content_text(message, index, _BASE_PART_HINT)
            if turns and turns[-1].answer is None:
                turns[-1].query += _SEPARATOR + text
            else:
                turns.append(_Turn(query=text))
        elif role == "assistant":
            _reject_tool_calls(message, index)
            if not turns:
                raise InvalidRequestError(
                    f"messages[{index}] is an assistant message before any user "
                    "message, but base mode renders each assistant message as "
                    "the answer to the user message before it. Start the "
                    "conversation with a user message.",
                    param=f"messages[{index}]",
                )
            text = _content_text(message, index, _BASE_PART_HINT, allow_none=True)
            turns[-1].add_answer(text)
        else:
            _reject_role(role, index)

    if not turns:
        raise InvalidRequestError(
            "messages contains no user message, but base mode needs one as the "
            "query to answer. Add a message with role 'user'.",
            param="messages",
        )
    return turns


def _reject_tool_calls(message: Mapping[str, Any], index: int) -> None:
    for key in ("tool_calls", "function_call"):
        if message.get(key):
            raise InvalidRequestError(
                f"messages[{index}].{key} is set, but tools are not supported in "
                f"base mode. Remove the tool calls, {_CHAT_MODE_HINT}",
                param=f"messages[{index}].{key}",
            )


def _reject_role(role: str, index: int) -> None:
    if role in _TOOL_ROLES:
        reason = "tools are not supported in base mode"
    else:
        reason = "base mode renders only user and assistant messages"
    raise InvalidRequestError(
        f"messages[{index}].role is {role!r}, but {reason}. Remove the message, "
        f"{_CHAT_MODE_HINT}",
        param=f"messages[{index}].role",
    )


def _validate_roles(messages: Sequence[Mapping[str, Any]]) -> list[IndexedMessage]:
    indexed: list[IndexedMessage] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{index}] must be an object with a role and content, "
                f"got {type(message).__name__}.",
                param=f"messages[{index}]",
            )
        if not isinstance(message.get("role"), str):
            raise InvalidRequestError(
                f"messages[{index}].role must be a string such as 'user', "
                f"got {message.get('role')!r}.",
                param=f"messages[{index}].role",
            )
        indexed.append((index, message))
    return indexed


def _content_text(
    message: Mapping[str, Any], index: int, hint: str, *, allow_none: bool = False
) -> str:
    """Return the text of a message, joining text parts with newlines.

    `hint` completes the error message for a part that is not text.
    """
    content = message.get("content")
    param = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if content is None and allow_none:
        return ""
    if content is None:
        raise InvalidRequestError(
            f"{param} is missing. Send the message text as a string or a list "
            "of text parts.",
            param=param,
        )
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{param} must be a string or a list of content parts, "
            f"got {type(content).__name__}.",
            param=param,
        )

    texts: list[str] = []
    for part in content:
        is_mapping = isinstance(part, Mapping)
        kind = part.get("type") if is_mapping else type(part).__name__
        if not is_mapping or kind != "text":
            raise InvalidRequestError(
                f"{param} contains a part of type {kind!r}, but {hint}", param=param
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"{param} contains a text part whose text is {text!r}. Send the "
                "text of each part as a string.",
                param=param,
            )
        texts.append(text)
    return "\n".join(texts)
