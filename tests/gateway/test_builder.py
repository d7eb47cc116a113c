"""Tests of the prompt builder in chat and base mode, and the default instruction."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from gateway.errors import InvalidRequestError
from gateway.instruction import Example, Instruction
from gateway.prompting import PromptBuilder, load_default_instruction
from gateway.settings import SystemMessagePolicy

ARITHMETIC = Example(query="What is 2 + 2?", answer="4.")
COLOUR = Example(query="Name a colour.", answer="Blue.")
INSTRUCTION = Instruction(
    system_prompt="Be helpful and honest.", examples=(ARITHMETIC, COLOUR)
)
NO_SYSTEM_PROMPT = Instruction(system_prompt="", examples=(ARITHMETIC,))
NO_EXAMPLES = Instruction(system_prompt="Be brief.")

TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "lookup", "arguments": "{}"},
}

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
    ],
    [
        {"role": "developer", "content": "Use metric units."},
        {"role": "user", "content": "How tall is Everest?"},
        {"role": "assistant", "content": "8,849 m."},
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "And K2?"},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "Describe"}]},
        {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{}"},
    ],
    [
        {"role": "system", "content": [{"type": "text", "text": "Part one"}]},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Again?"},
    ],
    [],
]

BASE_CONVERSATIONS = [
    conversation
    for conversation in CONVERSATIONS
    if conversation and all(message["role"] != "tool" for message in conversation)
]

POLICIES = list(SystemMessagePolicy)
INSTRUCTIONS = [INSTRUCTION, NO_SYSTEM_PROMPT, NO_EXAMPLES]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def system_contents(messages: list[dict[str, Any]]) -> list[Any]:
    return [message["content"] for message in messages if message["role"] == "system"]


def test_chat_puts_system_then_examples_first() -> None:
    result = PromptBuilder().chat_messages(INSTRUCTION, [user("Hi")])

    assert result == [
        {"role": "system", "content": "Be helpful and honest."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Hi"},
    ]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (SystemMessagePolicy.APPEND, "Be helpful and honest.\n\nAnswer in French."),
        (SystemMessagePolicy.PREPEND, "Answer in French.\n\nBe helpful and honest."),
        (SystemMessagePolicy.REPLACE, "Answer in French."),
        (SystemMessagePolicy.DROP, "Be helpful and honest."),
    ],
)
def test_chat_merges_client_system_by_policy(
    policy: SystemMessagePolicy, expected: str
) -> None:
    result = PromptBuilder(policy).chat_messages(INSTRUCTION, CONVERSATIONS[1])

    assert system_contents(result) == [expected]
    assert result[0]["role"] == "system"


def test_chat_replace_still_injects_examples() -> None:
    builder = PromptBuilder(SystemMessagePolicy.REPLACE)
    result = builder.chat_messages(INSTRUCTION, CONVERSATIONS[1])

    assert result[1:5] == builder.chat_messages(INSTRUCTION, [])[1:5]


def test_chat_joins_system_and_developer_messages() -> None:
    result = PromptBuilder().chat_messages(INSTRUCTION, CONVERSATIONS[2])

    assert system_contents(result) == [
        "Be helpful and honest.\n\nUse metric units.\n\nBe terse."
    ]
    assert [m["role"] for m in result[5:]] == ["user", "assistant", "user"]


def test_chat_joins_system_text_parts() -> None:
    messages = [
        {
            "role": "developer",
            "content": [
                {"type": "text", "text": "Line one"},
                {"type": "text", "text": "Line two"},
            ],
        },
        user("Hi"),
    ]
    result = PromptBuilder(SystemMessagePolicy.REPLACE).chat_messages(
        INSTRUCTION, messages
    )

    assert system_contents(result) == ["Line one\nLine two"]


def test_chat_rejects_image_in_system_message() -> None:
    messages = [
        user("Hi"),
        {
            "role": "system",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}],
        },
    ]
    with pytest.raises(InvalidRequestError) as caught:
        PromptBuilder().chat_messages(INSTRUCTION, messages)

    assert caught.value.param == "messages[1].content"
    assert "image_url" in caught.value.message


def test_chat_rejects_message_without_role() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        PromptBuilder().chat_messages(INSTRUCTION, [{"content": "Hi"}])

    assert caught.value.param == "messages[0].role"


def test_chat_passes_other_messages_untouched() -> None:
    conversation = CONVERSATIONS[3]
    result = PromptBuilder().chat_messages(INSTRUCTION, conversation)

    assert result[5:] == conversation


def test_chat_does_not_mutate_input() -> None:
    conversation = copy.deepcopy(CONVERSATIONS[2])
    PromptBuilder().chat_messages(INSTRUCTION, conversation)

    assert conversation == CONVERSATIONS[2]


def test_chat_without_system_prompt_adds_none() -> None:
    result = PromptBuilder().chat_messages(NO_SYSTEM_PROMPT, [user("Hi")])

    assert system_contents(result) == []
    assert result[0] == user("What is 2 + 2?")


def test_chat_without_system_prompt_keeps_client_one() -> None:
    result = PromptBuilder().chat_messages(NO_SYSTEM_PROMPT, CONVERSATIONS[1])

    assert system_contents(result) == ["Answer in French."]


def test_chat_uses_given_example_subset() -> None:
    result = PromptBuilder().chat_messages(INSTRUCTION, [user("Hi")], [COLOUR])

    assert result[1:3] == [
        user("Name a colour."),
        {"role": "assistant", "content": "Blue."},
    ]
    assert len(result) == 4


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_chat_injection_is_idempotent(
    policy: SystemMessagePolicy, instruction: Instruction
) -> None:
    builder = PromptBuilder(policy)

    for conversation in CONVERSATIONS:
        once = builder.chat_messages(instruction, conversation)
        twice = builder.chat_messages(instruction, once)
        assert twice == once, conversation


@pytest.mark.parametrize("policy", POLICIES)
def test_chat_reinjection_swaps_example_subset(policy: SystemMessagePolicy) -> None:
    builder = PromptBuilder(policy)
    conversation = CONVERSATIONS[1]
    first = builder.chat_messages(INSTRUCTION, conversation, [ARITHMETIC])

    again = builder.chat_messages(INSTRUCTION, first, [COLOUR])

    assert again == builder.chat_messages(INSTRUCTION, conversation, [COLOUR])


def test_chat_keeps_example_repeated_after_injection() -> None:
    repeat = [user("What is 2 + 2?"), {"role": "assistant", "content": "4."}]
    builder = PromptBuilder()
    injected = builder.chat_messages(INSTRUCTION, [])
    messages = [*injected, *repeat, user("Hi")]

    assert builder.chat_messages(INSTRUCTION, messages) == messages


def test_chat_keeps_example_repeated_later() -> None:
    conversation = [
        user("Hi"),
        {"role": "assistant", "content": "Hello."},
        user("What is 2 + 2?"),
        {"role": "assistant", "content": "4."},
    ]
    result = PromptBuilder().chat_messages(INSTRUCTION, conversation)

    assert result[5:] == conversation


def test_base_renders_documented_layout() -> None:
    prompt = PromptBuilder().base_prompt(INSTRUCTION, [user("Hi there")])

    assert prompt == (
        "# Instructions\n\nBe helpful and honest.\n\n"
        "# Query:\nWhat is 2 + 2?\n\n# Answer:\n<START>\n4.\n<END>\n\n"
        "# Query:\nName a colour.\n\n# Answer:\n<START>\nBlue.\n<END>\n\n"
        "# Query:\nHi there\n\n# Answer:\n<START>\n"
    )


def test_base_prompt_starts_with_prefix() -> None:
    builder = PromptBuilder()

    for conversation in BASE_CONVERSATIONS:
        messages = [m for m in conversation if m["role"] not in ("system", "developer")]
        prompt = builder.base_prompt(INSTRUCTION, messages)
        assert prompt.startswith(builder.base_prefix(INSTRUCTION)), conversation


def test_base_prefix_ends_before_first_query() -> None:
    prefix = PromptBuilder().base_prefix(INSTRUCTION)

    assert prefix.endswith("Blue.\n<END>\n\n")


def test_base_renders_earlier_turns_as_sections() -> None:
    prompt = PromptBuilder().base_prompt(NO_EXAMPLES, CONVERSATIONS[2])

    assert prompt == (
        "# Instructions\n\nBe brief.\n\nUse metric units.\n\nBe terse.\n\n"
        "# Query:\nHow tall is Everest?\n\n# Answer:\n<START>\n8,849 m.\n<END>\n\n"
        "# Query:\nAnd K2?\n\n# Answer:\n<START>\n"
    )


def test_base_final_assistant_is_prefill() -> None:
    messages = [user("Name a fruit."), {"role": "assistant", "content": "An app"}]
    prompt = PromptBuilder().base_prompt(NO_EXAMPLES, messages)

    assert prompt.endswith("# Query:\nName a fruit.\n\n# Answer:\n<START>\nAn app")


def test_base_joins_consecutive_user_messages() -> None:
    prompt = PromptBuilder().base_prompt(NO_EXAMPLES, [user("One"), user("Two")])

    assert prompt.endswith("# Query:\nOne\n\nTwo\n\n# Answer:\n<START>\n")


def test_base_joins_user_text_parts() -> None:
    content = [{"type": "text", "text": "Look"}, {"type": "text", "text": "here"}]
    prompt = PromptBuilder().base_prompt(
        NO_EXAMPLES, [{"role": "user", "content": content}]
    )

    assert "# Query:\nLook\nhere\n\n" in prompt


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (
            [
                user("Hi"),
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
            ],
            "messages[1].tool_calls",
        ),
        (
            [user("Hi"), {"role": "tool", "tool_call_id": "call_1", "content": "{}"}],
            "messages[1].role",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "x"}}],
                }
            ],
            "messages[0].content",
        ),
        ([{"role": "system", "content": "Only rules."}], "messages"),
        ([], "messages"),
        ([{"role": "assistant", "content": "First"}, user("Hi")], "messages[0]"),
        ([{"role": "user", "content": None}], "messages[0].content"),
    ],
)
def test_base_rejects_unsupported_messages(
    messages: list[dict[str, Any]], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        PromptBuilder().base_prompt(INSTRUCTION, messages)

    assert caught.value.param == param


def test_base_param_counts_stripped_prefix() -> None:
    builder = PromptBuilder()
    injected = builder.chat_messages(INSTRUCTION, [user("Hi")])
    injected.append({"role": "tool", "tool_call_id": "call_1", "content": "{}"})

    with pytest.raises(InvalidRequestError) as caught:
        builder.base_prompt(INSTRUCTION, injected)

    assert caught.value.param == f"messages[{len(injected) - 1}].role"


@pytest.mark.parametrize(
    ("policy", "instructions"),
    [
        (SystemMessagePolicy.APPEND, "Be helpful and honest.\n\nAnswer in French."),
        (SystemMessagePolicy.PREPEND, "Answer in French.\n\nBe helpful and honest."),
        (SystemMessagePolicy.REPLACE, "Answer in French."),
        (SystemMessagePolicy.DROP, "Be helpful and honest."),
    ],
)
def test_base_merges_client_system_by_policy(
    policy: SystemMessagePolicy, instructions: str
) -> None:
    prompt = PromptBuilder(policy).base_prompt(INSTRUCTION, CONVERSATIONS[1])

    assert prompt.startswith(f"# Instructions\n\n{instructions}\n\n# Query:\n")


def test_base_without_system_text_skips_instructions() -> None:
    prompt = PromptBuilder().base_prompt(NO_SYSTEM_PROMPT, [user("Hi")])

    assert prompt.startswith("# Query:\nWhat is 2 + 2?\n\n")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("instruction", INSTRUCTIONS)
def test_base_strips_injected_chat_prefix(
    policy: SystemMessagePolicy, instruction: Instruction
) -> None:
    builder = PromptBuilder(policy)

    for conversation in BASE_CONVERSATIONS:
        injected = builder.chat_messages(instruction, conversation)
        expected = builder.base_prompt(instruction, conversation)
        assert builder.base_prompt(instruction, injected) == expected, conversation


def test_injected_text_lists_system_and_examples() -> None:
    text = PromptBuilder().injected_text(INSTRUCTION, [COLOUR])

    assert text == "Be helpful and honest.\n\nName a colour.\n\nBlue."


def test_default_instruction_loads() -> None:
    instruction = load_default_instruction()

    assert instruction.system_prompt
    assert len(instruction.examples) == 8


def test_default_answers_stay_short() -> None:
    for example in load_default_instruction().examples:
        words = len(example.answer.split())
        assert 40 <= words <= 120, example.query


def test_default_prefix_fits_token_budget() -> None:
    prefix = PromptBuilder().base_prefix(load_default_instruction())

    # Estimate of about 4 characters per token for English text.
    assert len(prefix) / 4 < 2000
