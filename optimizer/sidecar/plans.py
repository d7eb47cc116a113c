"""Files that let a killed sidecar resume: cycle plans and the trigger state.

A cycle plan is written to `<data dir>/sidecar/pending-<model slug>.json`
before the cycle's first model call and deleted once its run is recorded. A
sidecar that finds one on start re-runs the same plan, so every model call
that finished before the kill is a cache hit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from optimizer.sidecar.records import model_slug, write_json_atomic
from optimizer.sidecar.window import SAMPLED_CATEGORY
from optimizer.types import Query, QueryKind

logger = logging.getLogger(__name__)

PLAN_PREFIX = "pending-"
STATE_FILE = "state.json"


@dataclass(frozen=True)
class CyclePlan:
    """Everything that fixes the model calls of one search cycle."""

    run_id: str
    model: str
    starting_version: str
    pointer: str | None
    """The model's own pointer when the run started; None when it had none."""
    search: tuple[Query, ...]
    heldout: tuple[Query, ...]
    seed: int
    created_at: datetime
    window: dict[str, Any] = field(default_factory=dict)
    """The window facts, copied into the report of a resumed run."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "model": self.model,
            "starting_version": self.starting_version,
            "pointer": self.pointer,
            "search": [_query_dict(query) for query in self.search],
            "heldout": [_query_dict(query) for query in self.heldout],
            "seed": self.seed,
            "created_at": self.created_at.isoformat(),
            "window": self.window,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> CyclePlan:
        """Rebuild a plan from `to_dict` output; raises KeyError or ValueError."""
        return cls(
            run_id=str(value["run_id"]),
            model=str(value["model"]),
            starting_version=str(value["starting_version"]),
            pointer=None if value["pointer"] is None else str(value["pointer"]),
            search=tuple(_query(item) for item in value["search"]),
            heldout=tuple(_query(item) for item in value["heldout"]),
            seed=int(value["seed"]),
            created_at=datetime.fromisoformat(value["created_at"]),
            window=dict(value.get("window") or {}),
        )


class PlanStore:
    """The pending plans in one directory, one file per model."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path_for(self, model: str) -> Path:
        return self.directory / f"{PLAN_PREFIX}{model_slug(model)}.json"

    def save(self, plan: CyclePlan) -> None:
        write_json_atomic(self.path_for(plan.model), plan.to_dict())

    def delete(self, plan: CyclePlan) -> None:
        self.path_for(plan.model).unlink(missing_ok=True)

    def load_all(self) -> list[CyclePlan]:
        """Return every readable pending plan; unreadable files are set aside.

        An unreadable plan is renamed to end in `.invalid` and logged, so it
        neither blocks later cycles nor disappears without a trace.
        """
        plans = []
        for path in sorted(self.directory.glob(f"{PLAN_PREFIX}*.json")):
            try:
                plans.append(CyclePlan.from_dict(json.loads(path.read_text("utf-8"))))
            except (OSError, KeyError, TypeError, ValueError) as error:
                invalid = path.with_suffix(".invalid")
                logger.warning(
                    "Pending plan %s is unreadable (%r); moved it to %s and "
                    "starting a new cycle instead",
                    path,
                    error,
                    invalid,
                )
                path.replace(invalid)
        return plans


@dataclass(frozen=True)
class TriggerState:
    """When the last cycle ran and the newest sample it had seen, kept on disk."""

    last_cycle_at: datetime | None = None
    newest_sample_at: datetime | None = None

    @classmethod
    def load(cls, directory: Path) -> TriggerState:
        """Read the state of `directory`, or an empty one if there is none."""
        path = directory / STATE_FILE
        try:
            value = json.loads(path.read_text("utf-8"))
            return cls(
                _time(value.get("last_cycle_at")), _time(value.get("newest_sample_at"))
            )
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, AttributeError) as error:
            logger.warning(
                "Trigger state %s is unreadable (%r); the next cycle runs now",
                path,
                error,
            )
            return cls()

    def save(self, directory: Path) -> None:
        write_json_atomic(
            directory / STATE_FILE,
            {
                "last_cycle_at": _iso(self.last_cycle_at),
                "newest_sample_at": _iso(self.newest_sample_at),
            },
        )


def _query_dict(query: Query) -> dict[str, str]:
    return {"id": query.id, "text": query.text}


def _query(value: dict[str, Any]) -> Query:
    return Query(
        str(value["id"]), str(value["text"]), SAMPLED_CATEGORY, QueryKind.GENERAL
    )


def _time(value: object) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
