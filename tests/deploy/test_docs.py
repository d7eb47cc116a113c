"""docs/deploy.md against the files it describes."""

from __future__ import annotations

import re
import shlex

import yaml

from tests.deploy.dockerfile import read_stages
from tests.deploy.support import COMPOSE_FILE, REPO

PAGE = REPO / "docs" / "deploy.md"
TEXT = PAGE.read_text()
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}")


def section(title: str) -> str:
    start = TEXT.index(f"## {title}\n")
    end = TEXT.find("\n## ", start + 1)
    return TEXT[start:] if end == -1 else TEXT[start:end]


def documented_variables() -> dict[str, str]:
    """Return the variables table: name to default, "empty" read as ""."""
    rows = {}
    for line in section("Variables").splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            default = "" if cells[1] == "empty" else cells[1].strip("`")
            rows[cells[0].strip("`")] = default
    return rows


def compose_variables() -> dict[str, str]:
    return dict(VARIABLE.findall(COMPOSE_FILE.read_text()))


def shell_commands() -> list[list[str]]:
    """Return the commands of the page's bash blocks, continuations joined."""
    blocks = re.findall(r"```bash\n(.*?)```", TEXT, flags=re.DOTALL)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def test_variables_table_matches_compose() -> None:
    assert documented_variables() == compose_variables()


def test_compose_commands_use_known_profiles() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    profiles = {
        profile
        for service in compose["services"].values()
        for profile in service.get("profiles", [])
    }
    commands = [
        words for words in shell_commands() if words[:2] == ["docker", "compose"]
    ]

    assert commands
    for words in commands:
        profile = words[words.index("--profile") + 1]
        assert profile in profiles, words
        services = words[words.index("-d") + 1 :] if "-d" in words else []
        for service in services:
            assert service in compose["services"], words


def test_build_commands_use_dockerfile_targets() -> None:
    stages = {stage.name for stage in read_stages(REPO / "Dockerfile")}
    commands = [words for words in shell_commands() if words[:2] == ["docker", "build"]]

    assert commands
    for words in commands:
        assert words[words.index("--target") + 1] in stages


def test_kubectl_files_exist() -> None:
    paths = [
        words[index + 1]
        for words in shell_commands()
        if words[0] == "kubectl"
        for index, word in enumerate(words)
        if word == "-f" and words[index + 1].startswith("deploy/")
    ]

    assert paths
    for path in paths:
        assert (REPO / path).is_file(), path


def test_mentioned_paths_exist() -> None:
    paths = set(re.findall(r"`((?:deploy|tests|scripts|docs)/[^`\s]*)`", TEXT))
    paths.discard("deploy/.env")

    assert paths
    for path in paths:
        assert (REPO / path).exists(), path


def test_loopback_urls_use_default_ports() -> None:
    defaults = compose_variables()
    published = {
        defaults["DRPO_GATEWAY_PORT"],
        defaults["PROMETHEUS_PORT"],
        defaults["GRAFANA_PORT"],
    }
    ports = set(re.findall(r"http://127\.0\.0\.1:(\d+)", TEXT))

    assert ports == published
