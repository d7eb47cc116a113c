"""The Grafana dashboard and its provisioning, read statically.

test_dashboard_queries.py evaluates the same expressions in a real Prometheus.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.dashboard import (
    PanelQuery,
    all_panels,
    data_panels,
    drpo_families,
    known_metric_names,
    load_dashboard,
    metric_names,
    panel_queries,
)
from tests.deploy.support import COMPOSE_FILE, DEPLOY

PROVISIONING = DEPLOY / "grafana" / "provisioning"
ROWS = [
    "Traffic",
    "Latency",
    "Tokens",
    "Prompt versions",
    "Optimizer",
    "Samples",
    "Upstream (vLLM)",
]
DASHBOARD = load_dashboard()
QUERIES = panel_queries(DASHBOARD)


def query_id(query: PanelQuery) -> str:
    return query.id


@pytest.mark.parametrize("query", QUERIES, ids=query_id)
def test_query_uses_existing_metrics(query: PanelQuery) -> None:
    names = metric_names(query.expr)
    unknown = names - known_metric_names()

    assert names, f"no metric found in {query.expr!r}"
    assert not unknown, f"{query.id} uses unknown metrics {sorted(unknown)}"


def test_metric_extraction_ignores_functions_and_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(x_bucket{route=~"a|b"}'
        "[$__rate_interval]))) / on (route) group_left y_total or vector(0)"
    )

    assert metric_names(expr) == {"x_bucket", "y_total"}


def test_every_exported_metric_is_charted() -> None:
    charted = set().union(*(metric_names(query.expr) for query in QUERIES))
    uncharted = [
        name for name, series in drpo_families().items() if not series & charted
    ]

    assert not uncharted


def test_vllm_queue_and_cache_charted() -> None:
    charted = set().union(*(metric_names(query.expr) for query in QUERIES))
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert name in charted


def test_dashboard_header_fields() -> None:
    assert DASHBOARD["uid"] == "drpo-gateway"
    assert 36 <= DASHBOARD["schemaVersion"] <= 41
    assert DASHBOARD["title"]


def test_rows_group_dashboard_areas() -> None:
    rows = [panel["title"] for panel in DASHBOARD["panels"] if panel["type"] == "row"]

    assert rows == ROWS


def test_first_panel_is_row() -> None:
    assert DASHBOARD["panels"][0]["type"] == "row"


def test_panels_use_datasource_variable() -> None:
    for panel in data_panels(DASHBOARD):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]


def test_datasource_variable_defaults_to_provisioned() -> None:
    variables = {item["name"]: item for item in DASHBOARD["templating"]["list"]}
    provisioned = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"]

    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == provisioned[0]["uid"]


def test_model_variable_defaults_to_all() -> None:
    variables = {item["name"]: item for item in DASHBOARD["templating"]["list"]}

    assert variables["model"]["includeAll"] is True
    assert variables["model"]["allValue"] == ".*"
    assert "drpo_requests_total" in variables["model"]["definition"]


def test_panels_set_units() -> None:
    for panel in data_panels(DASHBOARD):
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]


def test_panels_have_descriptions() -> None:
    for panel in data_panels(DASHBOARD):
        assert panel.get("description"), panel["title"]


def test_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in all_panels(DASHBOARD)]

    assert len(ids) == len(set(ids))


def test_ref_ids_unique_per_panel() -> None:
    for panel in data_panels(DASHBOARD):
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    grid = panel["gridPos"]
    return {
        (x, y)
        for x in range(grid["x"], grid["x"] + grid["w"])
        for y in range(grid["y"], grid["y"] + grid["h"])
    }


def test_panels_fit_grid_without_overlap() -> None:
    occupied: dict[tuple[int, int], str] = {}
    for panel in all_panels(DASHBOARD):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for cell in cells(panel):
            assert cell not in occupied, f"{panel['title']} overlaps {occupied[cell]}"
            occupied[cell] = panel["title"]


def test_provider_loads_mounted_dashboards() -> None:
    provider = yaml.safe_load(
        (PROVISIONING / "dashboards" / "drpo-gateway.yml").read_text()
    )["providers"][0]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    mounts = compose["services"]["grafana"]["volumes"]

    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_datasource_points_at_compose_prometheus() -> None:
    provisioned = yaml.safe_load(
        (PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )["datasources"][0]
    compose = yaml.safe_load(COMPOSE_FILE.read_text())

    assert provisioned["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
