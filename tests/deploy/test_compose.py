"""deploy/docker-compose.yml against the compose specification and the repository.

There is no Docker engine in the test suite: the file is checked with the
compose-spec JSON schema that check-jsonschema ships, and its references
(profiles, dependencies, mounts, build targets, settings) are checked here.
`docker compose config` runs too where a compose plugin is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import Settings, load_settings
from tests.deploy.dockerfile import image_environment, read_stages
from tests.deploy.support import (
    COMPOSE_FILE,
    DEPLOY,
    PROMETHEUS_CONFIG,
    REPO,
    interpolate,
    setting_variable_names,
)

PROFILES = {
    "gpu": {"vllm", "gateway", "optimizer", "redis", "prometheus", "grafana"},
    "cpu": {"gateway-cpu", "optimizer-cpu", "redis", "prometheus", "grafana"},
}


def load_compose(environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Return the compose file with its variables expanded from `environment`."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    compose: dict[str, Any] = expand(raw, environment or {})
    return compose


def expand(value: Any, environment: dict[str, str]) -> Any:
    if isinstance(value, str):
        return interpolate(value, environment)
    if isinstance(value, dict):
        return {key: expand(item, environment) for key, item in value.items()}
    if isinstance(value, list):
        return [expand(item, environment) for item in value]
    return value


def active_services(compose: dict[str, Any], profile: str) -> dict[str, Any]:
    """Return the services that `--profile PROFILE up` starts."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or profile in service["profiles"]
    }


def network_names(name: str, service: dict[str, Any]) -> set[str]:
    """Return the host names that resolve to a service: its name and its aliases."""
    names = {name}
    for network in (service.get("networks") or {}).values():
        names.update((network or {}).get("aliases", []))
    return names


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    schema = ["--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", *schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_matches_compose_spec() -> None:
    result = check_compose_schema(COMPOSE_FILE)

    assert result.returncode == 0, result.stdout + result.stderr


def test_schema_check_rejects_invalid_compose(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    compose["services"]["gateway"]["depends_on"]["vllm"]["condition"] = "healthy"
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(compose))

    result = check_compose_schema(broken)

    assert result.returncode != 0
    assert "condition" in result.stdout + result.stderr


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_starts_expected_services(profile: str) -> None:
    services = active_services(load_compose(), profile)

    assert set(services) == PROFILES[profile]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_dependencies_run_in_same_profile(profile: str) -> None:
    services = active_services(load_compose(), profile)
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} needs {dependency}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_healthy_dependencies_have_healthchecks(profile: str) -> None:
    stages = {stage.name for stage in read_stages(REPO / "Dockerfile")}
    services = active_services(load_compose(), profile)
    for service in services.values():
        for dependency, rule in (service.get("depends_on") or {}).items():
            if rule.get("condition") != "service_healthy":
                continue
            target = services[dependency]
            # A gateway image brings the HEALTHCHECK of the Dockerfile.
            built_with_healthcheck = target.get("build", {}).get("target") in stages
            assert "healthcheck" in target or built_with_healthcheck, dependency


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_prometheus_targets_resolve_in_profile(profile: str) -> None:
    services = active_services(load_compose(), profile)
    hosts = {
        host for name, item in services.items() for host in network_names(name, item)
    }
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            for target in group["targets"]:
                host = target.partition(":")[0]
                if profile == "cpu" and job["job_name"] == "vllm":
                    continue
                assert host in hosts, f"{job['job_name']} scrapes {target}"


def test_gateway_and_sidecar_aliases_are_unique_per_profile() -> None:
    compose = load_compose()
    for profile in PROFILES:
        services = active_services(compose, profile)
        for host in ("gateway", "optimizer"):
            answering = [
                name
                for name, item in services.items()
                if host in network_names(name, item)
            ]
            assert len(answering) == 1, f"{profile}: {host} is {answering}"


def test_bind_mount_sources_exist() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}"


def test_named_volumes_are_declared() -> None:
    compose = load_compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in compose["volumes"], f"{name} uses {source}"


def test_build_targets_are_dockerfile_stages() -> None:
    stages = {stage.name for stage in read_stages(REPO / "Dockerfile")}
    compose = load_compose()
    builds = [item["build"] for item in compose["services"].values() if "build" in item]
    assert builds
    for build in builds:
        assert (DEPLOY / build["context"]).resolve() == REPO
        assert build["target"] in stages


def test_services_sharing_image_build_alike() -> None:
    compose = load_compose()
    by_image: dict[str, list[dict[str, Any]]] = {}
    for service in compose["services"].values():
        if "build" in service:
            by_image.setdefault(service["image"], []).append(service["build"])
    for image, builds in by_image.items():
        assert all(build == builds[0] for build in builds), image


def test_published_ports_bind_loopback_by_default() -> None:
    compose = load_compose()
    ports = [
        port
        for service in compose["services"].values()
        for port in service.get("ports", [])
    ]
    assert ports
    for port in ports:
        assert port.startswith("127.0.0.1:"), port


def test_bind_address_variable_applies() -> None:
    compose = load_compose({"DRPO_BIND_ADDRESS": "0.0.0.0"})

    assert compose["services"]["gateway"]["ports"] == ["0.0.0.0:8000:8000"]


def test_vllm_serves_base_model_by_name() -> None:
    vllm = load_compose()["services"]["vllm"]
    command = vllm["command"]
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]

    assert command[command.index("--model") + 1] == "google/gemma-3-1b-pt"
    assert command[command.index("--served-model-name") + 1] == "gemma-3-1b-pt"
    assert devices[0]["capabilities"] == ["gpu"]


def test_model_variable_reaches_vllm() -> None:
    command = load_compose({"DRPO_MODEL": "org/other"})["services"]["vllm"]["command"]

    assert command[command.index("--model") + 1] == "org/other"


@pytest.mark.parametrize(
    "service", ["gateway", "optimizer", "gateway-cpu", "optimizer-cpu"]
)
def test_service_variables_are_settings(service: str) -> None:
    environment = load_compose()["services"][service]["environment"]
    known = setting_variable_names()
    for name in environment:
        if name.startswith("DRPO_"):
            assert name in known, f"{service} sets unknown variable {name}"


def service_settings(
    service: str,
    monkeypatch: pytest.MonkeyPatch,
    variables: dict[str, str] | None = None,
) -> Settings:
    """Load the settings a compose service starts with: image ENV, then its own."""
    compose = load_compose(variables)
    item = compose["services"][service]
    environment = image_environment(
        read_stages(REPO / "Dockerfile"), item["build"]["target"]
    )
    environment.update({key: str(value) for key, value in item["environment"].items()})
    for name in list(os.environ):
        if name.startswith("DRPO_"):
            monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith("DRPO_"):
            monkeypatch.setenv(name, value)
    return load_settings()


def test_gpu_gateway_uses_vllm_and_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings("gateway", monkeypatch)

    assert settings.upstream == "http://vllm:8000/v1"
    assert settings.mode == "base"
    assert settings.store_backend == "redis"
    assert settings.host == "0.0.0.0"
    assert str(settings.data_dir) == "/data"


def test_cpu_gateway_uses_embedded_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings("gateway-cpu", monkeypatch)

    assert settings.engine == "embedded"
    assert settings.upstream is None
    assert settings.store_backend == "redis"


@pytest.mark.parametrize("service", ["optimizer", "optimizer-cpu"])
def test_sidecar_metrics_reachable_by_prometheus(
    service: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = service_settings(service, monkeypatch)

    assert settings.optimizer.metrics_host == "0.0.0.0"
    assert settings.optimizer.metrics_port == 9464


def test_sidecar_judge_defaults_to_target(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = service_settings("optimizer", monkeypatch)

    assert settings.optimizer.judge is None
    assert not settings.optimizer.judge_model
    assert settings.optimizer.helpers is None


def test_judge_variables_reach_sidecar(monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {
        "DRPO_JUDGE_URL": "https://judge.example/v1",
        "DRPO_JUDGE_MODEL": "big-judge",
        "DRPO_OPTIMIZER_INTERVAL": "600",
    }
    settings = service_settings("optimizer-cpu", monkeypatch, variables)

    assert settings.optimizer.judge == "https://judge.example/v1"
    assert settings.optimizer.judge_model == "big-judge"
    assert settings.optimizer.interval == 600


def docker_compose_available() -> bool:
    try:
        result = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_docker_compose_config_accepts_profile(profile: str) -> None:
    if not docker_compose_available():
        pytest.skip("docker compose is not installed; the schema check covers the file")
    result = subprocess.run(
        [
            "docker",
            "compose",
            "-f",
            str(COMPOSE_FILE),
            "--profile",
            profile,
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
