"""Prompt building shared by the gateway and the optimizer.

`PromptBuilder` injects an instruction into chat messages or renders a
base-model prompt, `framing` contains the base-mode text layout and the
answer trimmer, and `retrieval` selects per-query examples.
"""

from __future__ import annotations

import json
from importlib import resources

from gateway.instruction import Instruction
from gateway.prompting.builder import PromptBuilder
from gateway.prompting.framing import (
    END,
    START,
    AnswerTrimmer,
    base_stop_strings,
    trim_answer,
)
from gateway.prompting.retrieval import (
    BM25Retriever,
    EmbeddingRetriever,
    ExampleRetriever,
)

__all__ = [
    "END",
    "START",
    "AnswerTrimmer",
    "BM25Retriever",
    "EmbeddingRetriever",
    "ExampleRetriever",
    "PromptBuilder",
    "base_stop_strings",
    "load_default_instruction",
    "trim_answer",
]


def load_default_instruction() -> Instruction:
    """Load the instruction shipped in gateway/data/default_instruction.json."""
    source = resources.files("gateway").joinpath("data/default_instruction.json")
    data = json.loads(source.read_text(encoding="utf-8"))
    return Instruction.model_validate(data)
