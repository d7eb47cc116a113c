"""The Dockerfile, read statically: no Docker engine runs in the test suite."""

from __future__ import annotations

import subprocess
import tomllib

import pytest

from tests.deploy.dockerfile import (
    Instruction,
    Stage,
    image_environment,
    is_ignored,
    read_dockerignore,
    read_stages,
    stage_chain,
)
from tests.deploy.support import REPO

DOCKERFILE = REPO / "Dockerfile"
IMAGE_TARGETS = ("gateway", "gateway-cpu")


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_stages(DOCKERFILE)


def copies_from_context(stages: list[Stage]) -> list[Instruction]:
    return [
        item
        for stage in stages
        for item in stage.all("COPY") + stage.all("ADD")
        if "from" not in item.flags()
    ]


def last_in_chain(stages: list[Stage], target: str, keyword: str) -> Instruction:
    found = [
        item for stage in stage_chain(stages, target) for item in stage.all(keyword)
    ]
    assert found, f"the {target} image has no {keyword}"
    return found[-1]


def test_copy_sources_exist_in_repo(stages: list[Stage]) -> None:
    sources = [
        source
        for item in copies_from_context(stages)
        for source in item.operands()[:-1]
    ]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY source {source!r} is not in the repo"


def test_copy_sources_not_dockerignored(stages: list[Stage]) -> None:
    patterns = read_dockerignore(REPO / ".dockerignore")
    for item in copies_from_context(stages):
        for source in item.operands()[:-1]:
            assert not is_ignored(source, patterns), f"{source!r} is in .dockerignore"


def test_dockerignore_leaves_out_venv_and_tests() -> None:
    patterns = read_dockerignore(REPO / ".dockerignore")
    for path in (".venv/bin/python", "tests/conftest.py", "gateway/__pycache__/x.pyc"):
        assert is_ignored(path, patterns), f"{path!r} reaches the build context"


def test_copy_from_names_earlier_stage(stages: list[Stage]) -> None:
    seen: set[str] = set()
    for stage in stages:
        for item in stage.all("COPY"):
            source_stage = item.flags().get("from")
            if source_stage is not None:
                assert source_stage in seen, f"COPY --from={source_stage} is unknown"
        if stage.name:
            seen.add(stage.name)


def test_entrypoint_is_project_script(stages: list[Stage]) -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for target in IMAGE_TARGETS:
        entrypoint = last_in_chain(stages, target, "ENTRYPOINT")
        assert entrypoint.arguments.startswith("["), "use the exec (JSON) form"
        assert entrypoint.words()[0] in scripts


def test_default_command_is_serve(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        assert last_in_chain(stages, target, "CMD").words() == ["serve"]


def test_images_run_as_non_root(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        user = last_in_chain(stages, target, "USER").words()[0]
        assert user not in ("root", "0"), f"{target} runs as {user}"


def test_images_listen_on_all_interfaces(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        environment = image_environment(stages, target)
        assert environment["DRPO_HOST"] == "0.0.0.0"
        assert environment["DRPO_PORT"] == "8000"


def test_data_dir_is_volume(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        environment = image_environment(stages, target)
        volumes = [
            word
            for stage in stage_chain(stages, target)
            for item in stage.all("VOLUME")
            for word in item.words()
        ]
        assert environment["DRPO_DATA_DIR"] == "/data"
        assert "/data" in volumes


def test_images_expose_gateway_port(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        assert "8000" in last_in_chain(stages, target, "EXPOSE").words()


def test_healthcheck_requests_health(stages: list[Stage]) -> None:
    for target in IMAGE_TARGETS:
        healthcheck = last_in_chain(stages, target, "HEALTHCHECK")
        assert "/health" in healthcheck.arguments


def test_gateway_image_has_no_engine_build(stages: list[Stage]) -> None:
    chain = [stage.name for stage in stage_chain(stages, "gateway")]
    copied_from = [
        item.flags().get("from")
        for stage in stage_chain(stages, "gateway")
        for item in stage.all("COPY")
    ]
    assert "engine-build" not in chain
    assert "engine-build" not in copied_from


def test_cpu_image_copies_engine_build(stages: list[Stage]) -> None:
    copied_from = [
        item.flags().get("from")
        for stage in stage_chain(stages, "gateway-cpu")
        for item in stage.all("COPY")
    ]
    assert "engine-build" in copied_from


def test_install_engine_never_builds_native() -> None:
    script = (REPO / "scripts" / "install-engine").read_text()
    assert "-DGGML_NATIVE=OFF" in script
    assert "DRPO_EXTRA_CMAKE_ARGS" in script


def engine_feature_flags(stages: list[Stage], features: str | None) -> list[str]:
    """Run the engine-build RUN step with install-engine replaced by an echo.

    Returns the DRPO_EXTRA_CMAKE_ARGS words it would pass to install-engine.
    """
    (stage,) = [stage for stage in stages if stage.name == "engine-build"]
    (step,) = [item for item in stage.all("RUN") if "install-engine" in item.arguments]
    (argument,) = [
        item.arguments
        for item in stage.all("ARG")
        if item.arguments.startswith("GGML_CPU_FEATURES=")
    ]
    default = argument.partition("=")[2].strip('"')
    # A child shell, so that it reads the variables the step sets for the
    # install-engine command.
    script = step.arguments.replace(
        "scripts/install-engine /opt/venv", """sh -c 'echo "$DRPO_EXTRA_CMAKE_ARGS"'"""
    )
    environment = {"GGML_CPU_FEATURES": default if features is None else features}
    result = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": "/usr/bin:/bin", **environment},
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.split()


def test_engine_default_features_are_portable(stages: list[Stage]) -> None:
    flags = engine_feature_flags(stages, None)
    for feature in ("AVX", "AVX2", "FMA", "F16C"):
        assert f"-DGGML_{feature}=ON" in flags
    for feature in ("AVX512", "AVX512_VNNI", "AVX512_BF16"):
        assert f"-DGGML_{feature}=OFF" in flags


def test_engine_features_follow_build_arg(stages: list[Stage]) -> None:
    flags = engine_feature_flags(stages, "AVX AVX2 FMA F16C AVX512")
    assert "-DGGML_AVX512=ON" in flags
    assert "-DGGML_AVX512_VNNI=OFF" in flags
