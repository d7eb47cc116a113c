"""Every PromQL expression of the dashboard, evaluated by a real Prometheus.

The stack runs on loopback. FakeModels is the upstream and plays every
optimizer role, and a fake vLLM serves /metrics. A `drpo-gateway serve`
process samples every request, and a `drpo-gateway optimizer` process runs
one cycle that publishes for one model and rejects for the other. A
prometheus process scrapes all three every second with the jobs of
deploy/prometheus/prometheus.yml. After two rounds of traffic and a canary,
each dashboard expression must parse and return at least one finite value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.deploy.dashboard import (
    PanelQuery,
    load_dashboard,
    panel_queries,
    substitute_variables,
)
from tests.deploy.prometheus import (
    PrometheusServer,
    check_config,
    deploy_job_names,
    finite_values,
    render_test_config,
)
from tests.deploy.stack import (
    MODEL_A,
    FakeVllmMetrics,
    HeldJudge,
    scrape,
    send_traffic,
    stack_models,
    start_canary,
    start_gateway,
    start_sidecar,
)
from tests.deploy.support import PROMETHEUS_CONFIG
from tests.fakes.upstream import closed_port
from tests.optimizer.fake_models import FakeModels
from tests.optimizer.sidecar.scripted import QUESTIONS
from tests.services import require_binary

pytestmark = pytest.mark.timeout(240)

QUERIES = panel_queries(load_dashboard())
CANARY_SHARE = 0.5
MIN_SCRAPES = 5


@dataclass
class ObservedStack:
    prometheus: PrometheusServer
    config: Path
    promtool: str
    canary_version: str


def start_prometheus(
    binary: str, root: Path, targets: dict[str, str], cleanup: ExitStack
) -> tuple[PrometheusServer, Path]:
    config = render_test_config(targets, root / "prometheus.yml")
    prometheus = PrometheusServer(binary, config, root / "prometheus", closed_port())
    cleanup.callback(prometheus.stop)
    prometheus.wait_ready()
    return prometheus, config


def run_sidecar_cycle(
    models: FakeModels,
    judge: HeldJudge,
    prometheus: PrometheusServer,
    data_dir: Path,
    port: int,
    cleanup: ExitStack,
) -> None:
    """Start the sidecar and wait for its first cycle to publish and reject."""
    sidecar = start_sidecar(models.base_url, data_dir, port)
    cleanup.callback(sidecar.stop)
    url = f"http://127.0.0.1:{port}/metrics"
    sidecar.wait_until(
        lambda: scrape(url, "drpo_optimizer_lease_held") == 1,
        "the sidecar to serve its metrics",
    )
    # Prometheus must see the counters at zero before the run ends, or
    # increase() and rate() over the run would be empty.
    prometheus.wait_for('up{job="drpo-optimizer"} == 1', timeout=20)
    prometheus.wait_for("drpo_optimizer_runs_total", timeout=20)
    judge.release()
    for outcome in ("published", "rejected"):

        def finished(outcome: str = outcome) -> bool:
            return scrape(url, "drpo_optimizer_runs_total", outcome=outcome) >= 1

        sidecar.wait_until(finished, f"a {outcome} run", timeout=90)


def wait_for_stack_data(prometheus: PrometheusServer, requests: float) -> None:
    """Wait until Prometheus contains the last traffic, the runs and a few scrapes."""
    prometheus.wait_for(f"sum(drpo_requests_total) >= {requests}")
    prometheus.wait_for('drpo_optimizer_runs_total{outcome="published"} > 0')
    prometheus.wait_for(f'drpo_active_prompt_info{{model="{MODEL_A}"}}')
    for job in deploy_job_names():
        prometheus.wait_for(
            f'count_over_time(up{{job="{job}"}}[1m]) >= {MIN_SCRAPES}', timeout=20
        )


def build_stack(root: Path, cleanup: ExitStack) -> ObservedStack:
    prometheus_binary = require_binary("prometheus", "prometheus")
    promtool = require_binary("promtool", "prometheus")
    data_dir = root / "data"
    gateway_port, sidecar_port = closed_port(), closed_port()
    models, judge = stack_models()
    cleanup.enter_context(models)
    vllm = FakeVllmMetrics(models).start()
    cleanup.callback(vllm.stop)

    gateway = start_gateway(models.base_url, data_dir, gateway_port)
    cleanup.callback(gateway.stop)
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    metrics_url = gateway_url + "/metrics"
    gateway.wait_until(
        lambda: httpx.get(gateway_url + "/ready").status_code == 200,
        "the gateway to be ready",
    )
    targets = {
        "drpo-gateway": f"127.0.0.1:{gateway_port}",
        "drpo-optimizer": f"127.0.0.1:{sidecar_port}",
        "vllm": f"127.0.0.1:{vllm.port}",
    }
    prometheus, config = start_prometheus(prometheus_binary, root, targets, cleanup)

    canary_version = start_canary(data_dir, CANARY_SHARE)
    gateway.wait_until(
        lambda: scrape(metrics_url, "drpo_canary_prompt_share") > 0,
        "the gateway to load the canary",
    )
    client = cleanup.enter_context(httpx.Client(base_url=gateway_url, timeout=30))
    send_traffic(client, QUESTIONS, "first")
    stored = 2 * len(QUESTIONS)
    gateway.wait_until(
        lambda: scrape(metrics_url, "drpo_samples_stored_total") >= stored,
        f"{stored} stored samples",
    )

    run_sidecar_cycle(models, judge, prometheus, data_dir, sidecar_port, cleanup)
    send_traffic(client, QUESTIONS[:3], "second")
    wait_for_stack_data(prometheus, scrape(metrics_url, "drpo_requests_total"))
    return ObservedStack(prometheus, config, promtool, canary_version)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObservedStack]:
    with ExitStack() as cleanup:
        yield build_stack(tmp_path_factory.mktemp("observed"), cleanup)


def test_promtool_accepts_test_config(stack: ObservedStack) -> None:
    result = check_config(stack.promtool, stack.config)

    assert result.returncode == 0, result.stdout + result.stderr


def test_test_config_keeps_deploy_jobs(stack: ObservedStack) -> None:
    deploy = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    test = yaml.safe_load(stack.config.read_text())

    assert [job["job_name"] for job in test["scrape_configs"]] == deploy_job_names()
    assert [job["metrics_path"] for job in test["scrape_configs"]] == [
        job["metrics_path"] for job in deploy["scrape_configs"]
    ]


def test_every_target_is_up(stack: ObservedStack) -> None:
    result = stack.prometheus.query("up")["data"]["result"]
    health = {sample["metric"]["job"]: sample["value"][1] for sample in result}

    assert health == dict.fromkeys(deploy_job_names(), "1")


@pytest.mark.parametrize("query", QUERIES, ids=lambda query: query.id)
def test_dashboard_query_returns_data(stack: ObservedStack, query: PanelQuery) -> None:
    expression = substitute_variables(query.expr)

    body = stack.prometheus.query(expression)

    assert "$" not in expression, f"a Grafana variable is left in {expression!r}"
    assert body["status"] == "success", body.get("error")
    assert body["data"]["result"], f"{query.id} returned nothing: {expression}"
    assert finite_values(body["data"]), f"{query.id} returned only NaN: {expression}"


def test_sidecar_runs_published_and_rejected(stack: ObservedStack) -> None:
    for outcome in ("published", "rejected"):
        data = stack.prometheus.query(
            f'drpo_optimizer_runs_total{{outcome="{outcome}"}}'
        )["data"]
        assert finite_values(data) == [1.0], outcome


def test_canary_share_is_scraped(stack: ObservedStack) -> None:
    data = stack.prometheus.query(
        f'drpo_canary_prompt_share{{version="{stack.canary_version}"}}'
    )["data"]

    assert finite_values(data) == [CANARY_SHARE]


def test_alert_rules_load_and_evaluate(stack: ObservedStack) -> None:
    rules = stack.prometheus.rules()
    names = yaml.safe_load((PROMETHEUS_CONFIG.parent / "alerts.yml").read_text())
    expected = [rule["alert"] for group in names["groups"] for rule in group["rules"]]

    assert [rule["name"] for rule in rules] == expected
    for rule in rules:
        assert rule["health"] == "ok", rule
        body = stack.prometheus.query(rule["query"])
        assert body["status"] == "success", rule["name"]
