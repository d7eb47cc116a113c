"""The alignment instruction: a system prompt plus in-context examples."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Example(BaseModel):
    """One in-context example: a query and the answer the model should give."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class Instruction(BaseModel):
    """What the gateway injects: the optimized system prompt and its examples."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    system_prompt: str
    examples: tuple[Example, ...] = ()


class PromptVersion(Instruction):
    """An immutable, stored version of an instruction."""

    version: str
    parent: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    source: str = "manual"
    scores: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def instruction(self) -> Instruction:
        return Instruction(system_prompt=self.system_prompt, examples=self.examples)
