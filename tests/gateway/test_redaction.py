"""Redaction of personal data and secrets in traffic samples."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sampling import Redactor
from gateway.sampling.redaction import luhn_valid
from gateway.settings import RedactionKind
from tests.conftest import GatewayFactory
from tests.fakes.upstream import FakeUpstream, Scripted, chat_body, chat_events

ALL_KINDS = list(RedactionKind)

# Each value and the placeholder that replaces it.
PERSONAL_DATA = [
    ("jane.doe+work@example.co.uk", "[EMAIL]"),
    ("ops@mail.example.org", "[EMAIL]"),
    ("+1 (555) 123-4567", "[PHONE]"),
    ("555-123-4567", "[PHONE]"),
    ("555.123.4567", "[PHONE]"),
    ("(030) 1234 5678", "[PHONE]"),
    ("+44 20 7946 0958", "[PHONE]"),
    ("+4915112345678", "[PHONE]"),
    ("4111 1111 1111 1111", "[CARD]"),
    ("5500-0000-0000-0004", "[CARD]"),
    ("378282246310005", "[CARD]"),
    ("192.168.10.20", "[IP]"),
    ("2001:db8::8a2e:370:7334", "[IP]"),
    ("fe80::1", "[IP]"),
    ("sk-proj-Abc123Def456Ghi789", "[SECRET]"),
    ("d41d8cd98f00b204e9800998ecf8427e", "[SECRET]"),
    ("QWxhZGRpbjpvcGVuIHNlc2FtZQ1234567890==", "[SECRET]"),
]

# Text that looks close to personal data but is not, kept unchanged.
KEPT = [
    "Order number 12345678901234 ships today.",
    "Reference 1234 5678 9012 3456 is not a card.",
    "Meet on 2024-01-15 at 12:30:45, or on 15.01.2024.",
    "Use std::vector and version 1.2.3 with 1,234,567 rows.",
    "It costs $1234.56 in total.",
    "Build 300.1.2.3 is not an address.",
    "See /usr/local/lib/python/site-packages/some/long/path for details.",
]


@pytest.mark.parametrize(("value", "placeholder"), PERSONAL_DATA)
def test_personal_data_replaced_by_placeholder(value: str, placeholder: str) -> None:
    redactor = Redactor(ALL_KINDS)

    redacted = redactor.redact(f"Contact: {value}, thanks.")

    assert redacted == f"Contact: {placeholder}, thanks."


@pytest.mark.parametrize("text", KEPT)
def test_lookalike_text_kept(text: str) -> None:
    redactor = Redactor(ALL_KINDS)

    assert redactor.redact(text) == text
    assert not redactor.counts


def test_bearer_token_keeps_scheme() -> None:
    redactor = Redactor(ALL_KINDS)

    redacted = redactor.redact("Authorization: Bearer abc.def-123")

    assert redacted == "Authorization: Bearer [SECRET]"


def test_luhn_checks_card_digits() -> None:
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("12345678901234")


def test_counts_recorded_by_kind() -> None:
    redactor = Redactor(ALL_KINDS)

    redactor.redact("a@example.com b@example.com 10.0.0.1")

    assert redactor.counts[RedactionKind.EMAIL] == 2
    assert redactor.counts[RedactionKind.IP] == 1


def test_chosen_kinds_only_redacted() -> None:
    redactor = Redactor([RedactionKind.EMAIL])

    redacted = redactor.redact("a@example.com from 10.0.0.1")

    assert redacted == "[EMAIL] from 10.0.0.1"


def test_tree_redacts_values_not_keys() -> None:
    redactor = Redactor(ALL_KINDS)
    tree = {"content": ["a@example.com", {"email": "b@example.com"}], "n": 3}

    redacted = redactor.redact_tree(tree)

    assert redacted == {"content": ["[EMAIL]", {"email": "[EMAIL]"}], "n": 3}


SEEDED = [value for value, _ in PERSONAL_DATA] + ["Bearer tok_9f8e7d6c5b4a"]
SEEDED_TEXT = "My details: " + "; ".join(SEEDED) + ". Order 12345678901234."


def stored_bytes(directory: Path) -> bytes:
    return b"".join(
        path.read_bytes() for path in directory.rglob("*") if path.is_file()
    )


def test_seeded_data_never_reaches_store(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(sample_rate=1.0)
    fake_upstream.queue(
        "/chat/completions",
        Scripted(body=chat_body("Sure. " + SEEDED_TEXT)),
        Scripted(events=chat_events(["Noted: ", *(value + "; " for value in SEEDED)])),
    )
    messages = [{"role": "user", "content": SEEDED_TEXT}]
    client = gateway.client()

    client.chat.completions.create(model="fake-model", messages=messages)
    stream = client.chat.completions.create(
        model="fake-model", messages=messages, stream=True
    )
    for _ in stream:
        pass
    samples = gateway.stored_samples(2)
    raw = stored_bytes(tmp_path / "data" / "samples")

    for value in SEEDED:
        assert value.encode() not in raw, value
        for sample in samples:
            assert value not in sample.model_dump_json(), value
    assert b"[EMAIL]" in raw
    assert b"[CARD]" in raw
    assert b"12345678901234" in raw
    assert samples[0].answer.startswith("Sure. My details: [EMAIL]")
    assert samples[1].answer.startswith("Noted: [EMAIL]")
    assert gateway.metric("drpo_samples_redacted_total", kind="card") == 12


def test_redaction_off_keeps_text(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(sample_rate=1.0, sample_redaction=False)
    fake_upstream.queue("/chat/completions", Scripted(body=chat_body(SEEDED_TEXT)))
    messages = [{"role": "user", "content": SEEDED_TEXT}]

    gateway.client().chat.completions.create(model="fake-model", messages=messages)
    [sample] = gateway.stored_samples(1)

    assert sample.messages == messages
    assert sample.answer == SEEDED_TEXT
    assert not sample.redacted
    assert gateway.metric("drpo_samples_redacted_total") == 0


def test_redact_setting_chooses_kinds(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(sample_rate=1.0, sample_redact=["email"])
    text = "Mail a@example.com from 10.0.0.1"

    gateway.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": text}]
    )
    [sample] = gateway.stored_samples(1)

    assert sample.messages == [
        {"role": "user", "content": "Mail [EMAIL] from 10.0.0.1"}
    ]
