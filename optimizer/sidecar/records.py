"""Run reports of the sidecar: one JSON file per run, written atomically.

Reports go to `<data dir>/runs/sidecar/<UTC stamp>-<model slug>-<outcome>.json`.
They hold sampled query texts (already redacted by the gateway), endpoint
URLs and model names, but never an API key: endpoints are written as base URL
and model only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from gateway.instruction import Instruction
from optimizer.record import RunRecord
from optimizer.roles import RoleSet
from optimizer.sidecar.canary import CanaryReview
from optimizer.sidecar.gate import GateResult
from optimizer.types import Usage

Outcome = Literal[
    "published", "canary", "rejected", "failed", "skipped", "promoted",
    "rolled_back", "waiting",
]  # fmt: skip
OUTCOMES: tuple[Outcome, ...] = (
    "published", "canary", "rejected", "failed", "skipped", "promoted",
    "rolled_back", "waiting",
)  # fmt: skip

ALL_MODELS_SLUG = "all-models"
_SLUG_LENGTH = 48


@dataclass
class RunReport:
    """Record of one run, its outcome and its reason, filled in as the run goes.

    A run is one search-and-gate cycle for one model, one canary review, or a
    cycle skipped before it started (for example while another sidecar holds
    the lease, with `model` None).
    """

    run_id: str
    model: str | None
    trigger: str
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    outcome: Outcome = "failed"
    reason: str = ""
    resumed: bool = False
    finished_at: datetime | None = None
    starting_version: str | None = None
    published_version: str | None = None
    window: dict[str, Any] | None = None
    candidate: Instruction | None = None
    gate: GateResult | None = None
    search: RunRecord | None = None
    usage: Mapping[str, Usage] = field(default_factory=dict)
    roles: RoleSet | None = None
    canary: CanaryReview | None = None
    path: Path | None = None

    def finish(self, outcome: Outcome, reason: str) -> RunReport:
        self.outcome = outcome
        self.reason = reason
        self.finished_at = datetime.now(UTC)
        return self

    @property
    def seconds(self) -> float:
        end = self.finished_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()

    @property
    def cache_hits(self) -> int:
        return sum(item.cache_hits for item in self.usage.values())

    @property
    def calls(self) -> int:
        return sum(item.calls for item in self.usage.values())

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready dicts and lists."""
        return {
            "run_id": self.run_id,
            "model": self.model,
            "outcome": self.outcome,
            "reason": self.reason,
            "trigger": self.trigger,
            "resumed": self.resumed,
            "started_at": self.started_at.isoformat(),
            "finished_at": self.finished_at.isoformat() if self.finished_at else None,
            "seconds": round(self.seconds, 3),
            "starting_version": self.starting_version,
            "published_version": self.published_version,
            "window": self.window,
            "candidate": self.candidate.model_dump(mode="json")
            if self.candidate
            else None,
            "gate": self.gate.to_dict() if self.gate else None,
            "canary": self.canary.to_dict() if self.canary else None,
            "search": self.search.to_dict() if self.search else None,
            "usage": {role: asdict(item) for role, item in sorted(self.usage.items())},
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "roles": _roles_dict(self.roles),
        }


def new_run_id(now: datetime | None = None) -> str:
    """Return a run id: the UTC start time and a random suffix."""
    moment = now or datetime.now(UTC)
    return f"{moment.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(4)}"


def model_slug(model: str | None) -> str:
    """Return a file-name-safe form of `model`, unique per model name.

    A name that had to be changed gets a short hash of the original, so
    "org/model" and "org-model" never share a file.
    """
    if model is None:
        return ALL_MODELS_SLUG
    slug = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-.")[:_SLUG_LENGTH]
    if slug == model and slug:
        return slug
    digest = hashlib.sha256(model.encode("utf-8")).hexdigest()[:8]
    return f"{slug or 'model'}-{digest}"


def report_file(directory: Path, report: RunReport, outcome: str) -> Path:
    """Return where `report` is written if its run ends with `outcome`.

    The name starts with the run's UTC start time, so the path is known
    before the run ends, for the metadata of the version it publishes.
    """
    started = report.started_at.astimezone(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%S.") + f"{started.microsecond:06d}Z"
    return directory / f"{stamp}-{model_slug(report.model)}-{outcome}.json"


def write_report(directory: Path, report: RunReport) -> Path:
    """Write `report` to its file in `directory` and return the path."""
    path = report_file(directory, report, report.outcome)
    report.path = path
    write_json_atomic(path, report.to_dict())
    return path


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON to `path` through a synced temporary file.

    A reader, or a process started after a crash, sees the old file or the
    new one, never a part of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(value, indent=2, ensure_ascii=False)
    handle, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _roles_dict(roles: RoleSet | None) -> dict[str, dict[str, str]] | None:
    if roles is None:
        return None
    return {
        name: {"base_url": endpoint.base_url, "model": endpoint.model}
        for name, endpoint in vars(roles).items()
    }
