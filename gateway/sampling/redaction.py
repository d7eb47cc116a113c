"""Replacement of personal data and secrets in sampled text with typed placeholders.

Rules run in a fixed order, so an earlier kind claims its text first: secrets,
e-mail addresses, payment cards, IP addresses, then phone numbers. A card
number is replaced only when its digits pass the Luhn check, and a phone
number needs a leading `+`, a bracketed area code or separators between digit
groups, so plain digit strings such as order numbers are kept.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from gateway.logs import SECRET_PATTERNS
from gateway.settings import RedactionKind

PLACEHOLDERS = {
    RedactionKind.SECRET: "[SECRET]",
    RedactionKind.EMAIL: "[EMAIL]",
    RedactionKind.CARD: "[CARD]",
    RedactionKind.IP: "[IP]",
    RedactionKind.PHONE: "[PHONE]",
}

# Runs of 32 or more base64 or hex characters. Only runs with a digit and a
# letter, the shape of generated keys, tokens and hashes, are redacted, so a
# long word or a path without digits is kept.
_LONG_RUN = re.compile(r"[A-Za-z0-9+/_-]{32,}={0,2}")
_DIGIT = re.compile(r"\d")
_LETTER = re.compile(r"[A-Za-z]")
_EMAIL = re.compile(
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
)
# 13 to 19 digits, optionally grouped by single spaces or dashes.
_CARD = re.compile(r"(?<![\d+-])\d(?:[ -]?\d){12,18}(?![\d-])")
# Candidates only: a match is an address when every octet is at most 255.
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
# Candidates only: each match is checked with the ipaddress module, so times
# such as 12:30:45 and C++ names such as std::vector are kept.
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f.]*(?![\w:])")
# The lookarounds reject a match inside a longer run of digit groups, such as
# a grouped 16-digit reference number that fails the Luhn check.
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[.-])(?<!\d{3} )(?:"
    # International: +44 20 7946 0958, +1-555-123-4567, +4915112345678.
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){1,5}"
    # Bracketed area code: (555) 123-4567, (030) 1234 5678.
    r"|\(\d{2,5}\)[ .-]?\d{2,4}(?:[ .-]?\d{2,4}){1,2}"
    # Separated groups: 555-123-4567, 555.123.4567, 020 7946 0958.
    r"|\d{2,5}[ .-]\d{3,4}[ .-]\d{3,4}"
    r")(?!\w)(?![.-]\d)(?! \d{3})"
)


def luhn_valid(digits: str) -> bool:
    """Return whether a string of digits passes the Luhn checksum."""
    total = 0
    for position, character in enumerate(reversed(digits)):
        value = int(character)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


class Redactor:
    """Redaction of the chosen kinds, counting each replacement by kind."""

    def __init__(self, kinds: Iterable[RedactionKind]) -> None:
        self.kinds = frozenset(kinds)
        self.counts: Counter[RedactionKind] = Counter()
        rules: list[tuple[RedactionKind, Callable[[str], str]]] = [
            (RedactionKind.SECRET, self._secrets),
            (RedactionKind.EMAIL, self._sub_all(RedactionKind.EMAIL, _EMAIL)),
            (RedactionKind.CARD, self._cards),
            (RedactionKind.IP, self._addresses),
            (RedactionKind.PHONE, self._phones),
        ]
        self._rules = [rule for kind, rule in rules if kind in self.kinds]

    def redact(self, text: str) -> str:
        """Return `text` with every chosen kind of personal data replaced."""
        for rule in self._rules:
            text = rule(text)
        return text

    def redact_tree(self, value: Any) -> Any:
        """Return a copy of a JSON value with every string value redacted.

        Object keys are kept, because they are field names such as "content".
        """
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, list):
            return [self.redact_tree(item) for item in value]
        if isinstance(value, dict):
            return {key: self.redact_tree(item) for key, item in value.items()}
        return value

    def _replace(self, kind: RedactionKind) -> str:
        self.counts[kind] += 1
        return PLACEHOLDERS[kind]

    def _sub_all(
        self, kind: RedactionKind, pattern: re.Pattern[str]
    ) -> Callable[[str], str]:
        return lambda text: pattern.sub(lambda _: self._replace(kind), text)

    def _secrets(self, text: str) -> str:
        kind = RedactionKind.SECRET
        for pattern in SECRET_PATTERNS:
            if pattern.groups:
                # The first group is the label, as in "Bearer " or "api_key=".
                text = pattern.sub(
                    lambda match: match.group(1) + self._replace(kind), text
                )
            else:
                text = pattern.sub(lambda _: self._replace(kind), text)

        def replace_run(match: re.Match[str]) -> str:
            run = match.group()
            if _DIGIT.search(run) is None or _LETTER.search(run) is None:
                return run
            return self._replace(kind)

        return _LONG_RUN.sub(replace_run, text)

    def _cards(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            digits = re.sub(r"[ -]", "", match.group())
            if not luhn_valid(digits):
                return match.group()
            return self._replace(RedactionKind.CARD)

        return _CARD.sub(replace, text)

    def _addresses(self, text: str) -> str:
        def replace_ipv4(match: re.Match[str]) -> str:
            if any(int(octet) > 255 for octet in match.group().split(".")):
                return match.group()
            return self._replace(RedactionKind.IP)

        text = _IPV4.sub(replace_ipv4, text)

        def replace_ipv6(match: re.Match[str]) -> str:
            try:
                ipaddress.IPv6Address(match.group())
            except ValueError:
                return match.group()
            return self._replace(RedactionKind.IP)

        return _IPV6.sub(replace_ipv6, text)

    def _phones(self, text: str) -> str:
        def replace(match: re.Match[str]) -> str:
            digit_count = sum(character.isdigit() for character in match.group())
            if not 7 <= digit_count <= 15:
                return match.group()
            return self._replace(RedactionKind.PHONE)

        return _PHONE.sub(replace, text)
