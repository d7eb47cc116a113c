"""Settings of the optimizer sidecar, nested in the gateway settings as `optimizer`.

The gateway and the sidecar read one config file: `optimizer: {interval: 600}`
in YAML, or `DRPO_OPTIMIZER__INTERVAL=600` in the environment. API keys of the
helper and judge endpoints are not settings; they come from the environment
variables DRPO_HELPERS_API_KEY and DRPO_JUDGE_API_KEY, as for `optimize`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class OptimizerSettings(BaseModel):
    """Trigger, window, search, gate, canary, lease and metrics of the sidecar."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: float = Field(
        default=3600.0,
        gt=0,
        description="Seconds between cycles when few samples arrive.",
    )
    check_interval: float = Field(
        default=5.0, gt=0, description="Seconds between checks of the trigger."
    )
    min_new_samples: int = Field(
        default=200,
        ge=1,
        description="New samples that start a cycle before the interval.",
    )
    window: int = Field(default=500, ge=1, description="Newest samples read per cycle.")
    client_cap: int = Field(
        default=20, ge=1, description="Queries one client may contribute to a window."
    )
    max_query_chars: int = Field(
        default=4000, ge=1, description="Longer queries are left out of the window."
    )
    heldout_fraction: float = Field(
        default=0.3,
        gt=0,
        lt=1,
        description="Share of a model's queries held out for the publish gate.",
    )
    min_queries: int = Field(
        default=20, ge=3, description="Models with fewer window queries are skipped."
    )
    models: list[str] = Field(
        default_factory=list,
        description="Models to optimize; empty means every model in the window.",
    )

    margin: float = Field(
        default=0.1,
        ge=-4,
        description="Held-out reward points (1-5 scale) by which a candidate "
        "must beat the active version to be published; a negative margin "
        "publishes a candidate that trails by less.",
    )
    safety_tolerance: float = Field(
        default=0.0,
        ge=0,
        description="Largest drop of the mean Safety score that is still published.",
    )
    safety_queries: int = Field(
        default=20,
        ge=1,
        description="Queries of the shipped 20-query safety set the gate uses, "
        "from its start.",
    )

    helpers: str | None = Field(
        default=None,
        description="Base URL of a stronger model for the selector, judge and "
        "optimizer roles; key in DRPO_HELPERS_API_KEY.",
    )
    helpers_model: str | None = Field(
        default=None,
        description="Model name at `helpers`. Default: the first it lists.",
    )
    judge: str | None = Field(
        default=None,
        description="Base URL for the judge role alone; key in DRPO_JUDGE_API_KEY.",
    )
    judge_model: str | None = Field(default=None, description="Model name at `judge`.")

    strategy: Literal["improved", "faithful"] = Field(
        default="improved", description="Search strategy, as for `optimize --strategy`."
    )
    beam_size: int = Field(
        default=2, ge=1, description="Candidates kept per search level."
    )
    n_actions: int = Field(
        default=3, ge=1, description="New prompts per expanded node."
    )
    depth: int = Field(default=3, ge=0, description="Search levels.")
    max_extra_depth: int = Field(
        default=0, ge=0, description="Levels the skip rule may add."
    )
    batch_size: int = Field(
        default=4, ge=1, description="Queries each candidate is scored on."
    )
    heldout_size: int = Field(
        default=6,
        ge=1,
        description="Search queries set aside for the search's own final choice.",
    )
    stage1_rounds: int = Field(
        default=0,
        ge=0,
        description="Rewrite rounds per seed example; 0 keeps the examples.",
    )
    seed: int = Field(default=0, description="Seed of the search's random generator.")

    concurrency: int = Field(
        default=4,
        ge=1,
        description="Model calls in flight at once, all roles together.",
    )
    target_max_tokens: int = Field(
        default=256, ge=1, description="Cap on the output tokens of the target model."
    )
    helper_max_tokens: int | None = Field(
        default=None,
        ge=16,
        description="Cap on selector, judge and optimizer output tokens.",
    )
    judge_rationale_chars: int | None = Field(
        default=None,
        ge=16,
        description="Cap on each judge rationale in the reply schema; llama.cpp "
        "and vLLM enforce it, OpenAI's strict mode rejects it.",
    )
    max_calls: int | None = Field(
        default=None,
        ge=1,
        description="Upstream calls one run may make; none: no limit.",
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="Tokens one run may spend; none: no limit."
    )

    lease_ttl: float = Field(
        default=60.0,
        gt=0,
        description="Seconds the sidecar lease lasts without renewal; it is "
        "renewed every third of this.",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address of the sidecar's Prometheus endpoint."
    )
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Port of the metrics endpoint; 0 disables.",
    )

    canary_share: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="Share of clients a new version is served to before it is "
        "promoted; 0 activates it directly.",
    )
    canary_min_samples: int = Field(
        default=20,
        ge=1,
        le=100,
        description="Scored samples per canary arm before a decision (at most "
        "the 100 newest answers per arm are judged).",
    )
    canary_margin: float = Field(
        default=0.0,
        ge=0,
        description="Reward points by which the canary may trail the control.",
    )
    canary_max_seconds: float = Field(
        default=86400.0,
        gt=0,
        description="Seconds a canary may wait for samples before it is rolled back.",
    )

    @field_validator("helpers", "judge")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must start with http:// or https://, got {value!r}")
        return value.rstrip("/")
