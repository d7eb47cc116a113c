"""Stage 2 of DRPO: beam search over system prompts."""

from optimizer.search.beam import BeamSearch
from optimizer.search.queries import QuerySplit, split_queries
from optimizer.search.result import (
    FinalChoice,
    LevelRecord,
    MergeEvent,
    SafetyRejection,
    SearchResult,
    SkipEvent,
)
from optimizer.search.settings import SearchSettings, Strategy

__all__ = [
    "BeamSearch",
    "FinalChoice",
    "LevelRecord",
    "MergeEvent",
    "QuerySplit",
    "SafetyRejection",
    "SearchResult",
    "SearchSettings",
    "SkipEvent",
    "Strategy",
    "split_queries",
]
