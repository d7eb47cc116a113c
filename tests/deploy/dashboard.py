"""The Grafana dashboard's panels and PromQL, and the metric names that exist."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.metrics import GatewayMetrics
from optimizer.sidecar.metrics import SidecarMetrics
from tests.deploy.support import DASHBOARD

# Names vLLM serves on its /metrics. Older vLLM releases name the KV-cache
# gauge vllm:gpu_cache_usage_perc, which later ones deprecate.
VLLM_METRICS = frozenset(
    {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
    }
)
PROMETHEUS_METRICS = frozenset({"up"})

# Values the live test gives Grafana's variables; $__range spans the test.
TEST_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "${model}": ".*",
    "$model": ".*",
}

_PROMQL_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    | {"and", "or", "unless", "offset", "inf", "nan"}
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    ref_id: str
    expr: str

    @property
    def id(self) -> str:
        return f"{self.panel} [{self.ref_id}]"


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Return every panel, rows included, and the panels of collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in all_panels(dashboard) if panel["type"] != "row"]


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(panel["title"], target["refId"], target["expr"])
        for panel in data_panels(dashboard)
        for target in panel.get("targets", [])
    ]


def substitute_variables(expr: str) -> str:
    """Replace the Grafana variables of `expr` with the live test's values."""
    for variable, value in TEST_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Return the metric names that a PromQL expression selects.

    Label matchers, range selectors, strings and `by (...)` groupings are
    removed first; what is left and not followed by "(" is a metric name.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def exported_families(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Return the series names of each metric family in `registry`."""
    families = {}
    for family in registry.collect():
        if family.type == "counter":
            families[family.name] = {family.name + "_total"}
        elif family.type == "histogram":
            suffixes = ("_bucket", "_sum", "_count")
            families[family.name] = {family.name + suffix for suffix in suffixes}
        else:
            families[family.name] = {family.name}
    return families


def drpo_families() -> dict[str, set[str]]:
    """Return the families of the gateway's and the sidecar's registries."""
    return {
        **exported_families(GatewayMetrics().registry),
        **exported_families(SidecarMetrics().registry),
    }


def known_metric_names() -> set[str]:
    drpo = set().union(*drpo_families().values())
    return drpo | VLLM_METRICS | PROMETHEUS_METRICS
