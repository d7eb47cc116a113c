"""Paths, binaries and setting names shared by the deployment tests."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from gateway.settings import Settings
from optimizer.sidecar.settings import OptimizerSettings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "drpo-gateway.json"
K8S = DEPLOY / "k8s"

# Read from the environment by the optimizer, not by the Settings object.
ENVIRONMENT_ONLY_NAMES = frozenset(
    {"DRPO_CONFIG", "DRPO_HELPERS_API_KEY", "DRPO_JUDGE_API_KEY"}
)


def setting_variable_names() -> frozenset[str]:
    """Return every DRPO_ variable that the gateway or the sidecar reads."""
    gateway = {f"DRPO_{name.upper()}" for name in Settings.model_fields}
    sidecar = {
        f"DRPO_OPTIMIZER__{name.upper()}" for name in OptimizerSettings.model_fields
    }
    return frozenset(gateway | sidecar | ENVIRONMENT_ONLY_NAMES)


_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<operator>:?[-?])(?P<default>[^}]*))?\})"
)


def interpolate(text: str, environment: Mapping[str, str]) -> str:
    """Expand compose variables: ${NAME}, ${NAME:-default}, ${NAME-default}, $$.

    Raises ValueError for ${NAME:?message} or ${NAME?message} when NAME is
    unset, as `docker compose` stops with that message. Nested defaults are
    not supported.
    """

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("name")
        operator = match.group("operator") or ""
        value = environment.get(name)
        unset = value is None or (operator.startswith(":") and value == "")
        if not unset:
            return str(value)
        if operator.endswith("?"):
            raise ValueError(f"{name} is required: {match.group('default')}")
        return match.group("default") or ""

    return _INTERPOLATION.sub(replace, text)
