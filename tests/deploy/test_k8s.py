"""deploy/k8s/ against the Kubernetes API schemas and against each other.

kubernetes-validate checks every built-in kind in strict mode (no unknown
fields) against the bundled schemas of one fixed Kubernetes version. The
ServiceMonitor is a CRD of the Prometheus Operator that those schemas lack,
so it is checked with SERVICE_MONITOR_SCHEMA, a subset of the CRD's fields.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.settings import load_settings
from tests.deploy.support import K8S, setting_variable_names

KUBERNETES_VERSION = "1.31.0"
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

_ENDPOINT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["port"],
    "properties": {
        "port": {"type": "string"},
        "path": {"type": "string", "pattern": "^/"},
        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
        "scheme": {"enum": ["http", "https"]},
    },
}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "labels": {"type": "object"},
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        }
                    },
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": _ENDPOINT},
            },
        },
    },
}


def load_documents() -> list[tuple[str, dict[str, Any]]]:
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                documents.append((path.name, document))
    return documents


DOCUMENTS = load_documents()
BUILT_IN = [
    (name, doc)
    for name, doc in DOCUMENTS
    if (doc["apiVersion"], doc["kind"]) not in CUSTOM_KINDS
]


def document_id(entry: tuple[str, dict[str, Any]]) -> str:
    name, document = entry
    return f"{name}:{document['kind']}/{document['metadata']['name']}"


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in DOCUMENTS if document["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    (found,) = [doc for doc in of_kind(kind) if doc["metadata"]["name"] == name]
    return found


def workloads() -> list[dict[str, Any]]:
    return of_kind("Deployment") + of_kind("StatefulSet")


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"][
        "containers"
    ]
    return containers


def port_names(workload: dict[str, Any]) -> set[str]:
    return {
        port["name"]
        for container in containers(workload)
        for port in container["ports"]
    }


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("entry", BUILT_IN, ids=document_id)
def test_manifest_passes_strict_schema(entry: tuple[str, dict[str, Any]]) -> None:
    _, document = entry

    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_strict_schema_rejects_unknown_field() -> None:
    deployment = copy.deepcopy(named("Deployment", "drpo-gateway"))
    deployment["spec"]["replicaCount"] = 3

    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_only_known_kinds_are_custom() -> None:
    custom = {
        (doc["apiVersion"], doc["kind"])
        for _, doc in DOCUMENTS
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS
    }

    assert custom == CUSTOM_KINDS


@pytest.mark.parametrize(
    "monitor", of_kind("ServiceMonitor"), ids=lambda m: m["metadata"]["name"]
)
def test_service_monitor_matches_schema(monitor: dict[str, Any]) -> None:
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_service_monitor_schema_rejects_typo() -> None:
    monitor = copy.deepcopy(of_kind("ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"

    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)


def test_workload_selectors_match_templates() -> None:
    for workload in workloads():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels), workload["metadata"]["name"]


def test_services_select_one_workload() -> None:
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matching = [
            workload
            for workload in workloads()
            if selects(selector, workload["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matching) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names(matching[0])


def test_service_monitors_select_service_ports() -> None:
    for monitor in of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            service
            for service in of_kind("Service")
            if selects(selector, service["metadata"]["labels"])
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        ports = {port["name"] for port in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports


def test_environment_sources_exist() -> None:
    for workload in workloads():
        for container in containers(workload):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    named("ConfigMap", source["configMapRef"]["name"])
                if "secretRef" in source:
                    named("Secret", source["secretRef"]["name"])


def test_probes_use_container_ports() -> None:
    for workload in workloads():
        names = port_names(workload)
        for container in containers(workload):
            for probe_name in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = container.get(probe_name, {})
                action = probe.get("httpGet") or probe.get("tcpSocket")
                if action is not None:
                    assert action["port"] in names, f"{container['name']} {probe_name}"


def test_scrape_annotations_match_ports() -> None:
    for workload in workloads():
        annotations = workload["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") != "true":
            continue
        ports = {
            str(port["containerPort"])
            for container in containers(workload)
            for port in container["ports"]
        }
        assert annotations["prometheus.io/port"] in ports
        assert annotations["prometheus.io/path"] == "/metrics"


def test_gateway_and_sidecar_are_scraped() -> None:
    for name in ("drpo-gateway", "drpo-optimizer"):
        annotations = named("Deployment", name)["spec"]["template"]["metadata"][
            "annotations"
        ]
        assert annotations["prometheus.io/scrape"] == "true", name


def test_gateway_deployment_probes_and_replicas() -> None:
    deployment = named("Deployment", "drpo-gateway")
    (container,) = containers(deployment)

    assert deployment["spec"]["replicas"] == 2
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["args"] == ["serve"]


def test_containers_set_resources() -> None:
    for workload in workloads():
        for container in containers(workload):
            resources = container["resources"]
            assert resources["requests"]["cpu"], container["name"]
            assert resources["requests"]["memory"], container["name"]
            assert resources["limits"]["memory"], container["name"]


def test_sidecar_runs_single_replica_recreate() -> None:
    deployment = named("Deployment", "drpo-optimizer")
    (container,) = containers(deployment)

    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert container["args"] == ["optimizer"]


def test_autoscaler_targets_gateway() -> None:
    (autoscaler,) = of_kind("HorizontalPodAutoscaler")
    target = autoscaler["spec"]["scaleTargetRef"]

    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert target["kind"] == "Deployment"
    assert target["name"] == "drpo-gateway"
    assert autoscaler["spec"]["minReplicas"] >= 2


def test_redis_keeps_data_on_volume() -> None:
    (redis,) = of_kind("StatefulSet")
    (container,) = containers(redis)
    claims = [
        claim["metadata"]["name"] for claim in redis["spec"]["volumeClaimTemplates"]
    ]
    mounts = [mount["name"] for mount in container["volumeMounts"]]

    assert "--appendonly" in container["args"]
    assert mounts == claims


def config_environment() -> dict[str, str]:
    environment = dict(named("ConfigMap", "drpo-gateway-config")["data"])
    environment.update(named("Secret", "drpo-gateway-secrets")["stringData"])
    return environment


def test_config_keys_are_settings() -> None:
    known = setting_variable_names()
    for name in config_environment():
        assert name in known, f"unknown variable {name}"


def test_config_loads_as_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("DRPO_"):
            monkeypatch.delenv(name)
    for name, value in config_environment().items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert settings.store_backend == "redis"
    assert settings.redis_url is not None
    assert settings.host == "0.0.0.0"
    assert settings.optimizer.metrics_host == "0.0.0.0"
    assert settings.optimizer.judge is None


def test_redis_url_names_redis_service() -> None:
    url = config_environment()["DRPO_REDIS_URL"]
    service = named("Service", "redis")

    assert url == f"redis://redis:{service['spec']['ports'][0]['port']}/0"
