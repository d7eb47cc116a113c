"""Tests of the `prompts` sub-commands through typer's CliRunner."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

import gateway.prompting
from gateway.instruction import Example, Instruction
from gateway.prompts_cli import prompts_app
from gateway.store import DiskPromptStore

SHIPPED_LOADER = gateway.prompting.load_default_instruction
SEED = Instruction(
    system_prompt="Answer helpfully, honestly and harmlessly.",
    examples=(Example(query="Hi", answer="Hello! How can I help?"),),
)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove DRPO_ variables of the calling shell and fix the default instruction."""
    for name in list(os.environ):
        if name.startswith("DRPO_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(gateway.prompting, "load_default_instruction", lambda: SEED)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def invoke(runner: CliRunner, data_dir: Path, *args: str) -> Result:
    return runner.invoke(prompts_app, [*args, "--data-dir", str(data_dir)])


def invoke_json(runner: CliRunner, data_dir: Path, *args: str) -> Any:
    result = invoke(runner, data_dir, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_json(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


@pytest.fixture
def store(data_dir: Path) -> Iterator[DiskPromptStore]:
    """The store the CLI uses, seeded the way the CLI seeds it."""
    with DiskPromptStore(data_dir / "prompts") as opened:
        opened.ensure_seeded(SEED)
        yield opened


# list


def test_list_json_seeds_builtin_version(runner: CliRunner, data_dir: Path) -> None:
    rows = invoke_json(runner, data_dir, "list", "--json")

    assert len(rows) == 1
    assert rows[0]["version"] == "v1"
    assert rows[0]["source"] == "builtin"
    assert rows[0]["system_prompt"] == SEED.system_prompt
    assert rows[0]["active_for"] == ["*"]


def test_list_seeds_shipped_default_instruction(
    runner: CliRunner, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway.prompting, "load_default_instruction", SHIPPED_LOADER)

    rows = invoke_json(runner, data_dir, "list", "--json")

    assert len(rows) == 1
    assert rows[0]["system_prompt"] == SHIPPED_LOADER().system_prompt
    assert rows[0]["source"] == "builtin"


def test_list_table_shows_active_models(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("Be terse.\nVery terse.", [], parent="v1")
    store.activate("v2", model="gemma-3-270m")

    result = invoke(runner, data_dir, "list")

    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert lines[0].split() == [
        "VERSION",
        "CREATED",
        "(UTC)",
        "SOURCE",
        "PARENT",
        "ACTIVE",
        "FOR",
        "SYSTEM",
        "PROMPT",
    ]
    assert "default" in lines[1]
    assert lines[2].startswith("v2")
    assert "gemma-3-270m" in lines[2]
    assert "Be terse. Very terse." in lines[2]


def test_list_reads_data_dir_from_environment(
    runner: CliRunner, data_dir: Path
) -> None:
    result = runner.invoke(
        prompts_app, ["list", "--json"], env={"DRPO_DATA_DIR": str(data_dir)}
    )

    assert result.exit_code == 0, result.output
    assert (data_dir / "prompts" / "cache.db").is_file()


def test_list_reads_data_dir_from_config(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(f"data_dir: {data_dir}\n", encoding="utf-8")

    result = runner.invoke(prompts_app, ["list", "--config", str(config)])

    assert result.exit_code == 0, result.output
    assert (data_dir / "prompts" / "cache.db").is_file()


def test_unusable_data_dir_exits_1(runner: CliRunner, tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file, not a directory")

    result = invoke(runner, blocker, "list")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Could not open the prompt store")
    assert str(blocker / "prompts") in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output


# show


def test_show_version_prints_record(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    record = invoke_json(runner, data_dir, "show", "v1")

    assert record["version"] == "v1"
    assert record["examples"] == [{"query": "Hi", "answer": "Hello! How can I help?"}]


def test_show_active_falls_back_to_default(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("gemma only", [])
    store.activate("v2", model="gemma")

    gemma = invoke_json(runner, data_dir, "show", "active", "--model", "gemma")
    other = invoke_json(runner, data_dir, "show", "active", "--model", "llama")
    default = invoke_json(runner, data_dir, "show", "active")

    assert gemma["version"] == "v2"
    assert other["version"] == "v1"
    assert default["version"] == "v1"


def test_show_unknown_version_exits_1(runner: CliRunner, data_dir: Path) -> None:
    result = invoke(runner, data_dir, "show", "v9")

    assert result.exit_code == 1
    assert "'v9' does not exist" in result.stderr
    assert result.stdout == ""


def test_show_model_with_version_id_exits_1(runner: CliRunner, data_dir: Path) -> None:
    result = invoke(runner, data_dir, "show", "v1", "--model", "gemma")

    assert result.exit_code == 1
    assert "--model applies only to `show active`" in result.stderr


# activate


def test_activate_sets_model_pointer(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("gemma only", [])

    result = invoke(runner, data_dir, "activate", "v2", "--model", "gemma")

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Model 'gemma' now points at v2 "
        "(previously unset, so the model used the default v1).\n"
    )
    assert store.active_pointers() == {"*": "v1", "gemma": "v2"}


def test_activate_json_reports_change(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("next", [])

    changed = invoke_json(runner, data_dir, "activate", "v2", "--json")
    unchanged = invoke_json(runner, data_dir, "activate", "v2", "--json")

    assert changed == {
        "model": None,
        "version": "v2",
        "previous": "v1",
        "changed": True,
        "ended_canary": None,
    }
    assert unchanged["changed"] is False
    assert store.active_version() == "v2"


def test_activate_same_version_reports_no_change(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    result = invoke(runner, data_dir, "activate", "v1")

    assert result.exit_code == 0, result.output
    assert (
        result.stdout == "The default pointer already points at v1; nothing changed.\n"
    )
    assert len(store.history()) == 1


def test_activate_unknown_version_exits_1(runner: CliRunner, data_dir: Path) -> None:
    result = invoke(runner, data_dir, "activate", "v5")

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Prompt version 'v5' does not exist.")
    assert len(result.stderr.splitlines()) == 1


# import


def test_import_instruction_creates_version(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    path = write_json(
        tmp_path / "instruction.json",
        {
            "system_prompt": "Be kind.",
            "examples": [{"query": "q", "answer": "a"}],
            "scores": {"reward": 4.25},
            "metadata": {"run": "local"},
            "parent": "v1",
        },
    )

    result = invoke(runner, data_dir, "import", str(path))

    record = store.get("v2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Created v2.\n"
    assert record.source == "import"
    assert record.parent == "v1"
    assert record.scores == {"reward": 4.25}
    assert record.metadata == {"run": "local"}
    assert store.active_version() == "v1"


def test_import_activate_for_model(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    path = write_json(tmp_path / "one.json", {"system_prompt": "Be kind."})

    created = invoke_json(
        runner,
        data_dir,
        "import",
        str(path),
        "--activate",
        "--model",
        "gemma",
        "--source",
        "drpo",
        "--json",
    )

    assert [record["version"] for record in created] == ["v2"]
    assert created[0]["source"] == "drpo"
    assert store.active_pointers() == {"*": "v1", "gemma": "v2"}


def test_import_missing_field_names_field_and_file(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    path = write_json(
        tmp_path / "broken.json",
        {"system_prompt": "x", "examples": [{"query": "q"}]},
    )

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 1
    assert "examples[0].answer" in result.stderr
    assert "broken.json" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_import_export_record_names_index(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    good = {"version": "v1", "system_prompt": "fine"}
    bad = {"version": "v2", "system_prompt": 7}
    path = write_json(tmp_path / "export.json", [good, bad])

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 1
    assert "[1].system_prompt" in result.stderr


def test_import_bad_file_creates_nothing(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    path = write_json(
        tmp_path / "export.json",
        [{"version": "v1", "system_prompt": "fine"}, {"version": "v2"}],
    )

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 1
    assert len(store.list_versions()) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"system_prompt": "x", "scores": {"r": NaN}}', "NaN"),
        ('"a string"', "not a JSON string"),
        ("null", "not a JSON null"),
        ("[]", "has no versions"),
        ('{"system_prompt": "x", "extra": 1}', "field extra"),
    ],
)
def test_import_invalid_content_exits_1(
    runner: CliRunner, data_dir: Path, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 1
    assert message in result.stderr
    assert str(path) in result.stderr


def test_import_missing_file_exits_1(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    result = invoke(runner, data_dir, "import", str(tmp_path / "absent.json"))

    assert result.exit_code == 1
    assert "Cannot read prompt file" in result.stderr


def test_import_unknown_parent_exits_1(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "child.json", {"system_prompt": "x", "parent": "v8"})

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 1
    assert "'v8' does not exist" in result.stderr


def test_import_model_without_activate_exits_1(
    runner: CliRunner, data_dir: Path, tmp_path: Path
) -> None:
    path = write_json(tmp_path / "one.json", {"system_prompt": "x"})

    result = invoke(runner, data_dir, "import", str(path), "--model", "gemma")

    assert result.exit_code == 1
    assert "--model needs --activate" in result.stderr


# export


def test_export_import_round_trip(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    store.create(
        "child", [Example(query="q", answer="a")], parent="v1", scores={"r": 1.0}
    )
    store.create("unrelated", [], parent="v1")
    export_file = tmp_path / "export.json"
    exported = invoke(
        runner, data_dir, "export", "v2", "v3", "--output", str(export_file)
    )
    other_dir = tmp_path / "other"
    with DiskPromptStore(other_dir / "prompts") as other:
        other.ensure_seeded(SEED)
        other.create("already here", [])

    imported = invoke(runner, other_dir, "import", str(export_file))

    assert exported.exit_code == 0, exported.output
    assert imported.exit_code == 0, imported.output
    assert imported.stdout == (
        "Created v3 (imported from v2).\nCreated v4 (imported from v3).\n"
    )
    with DiskPromptStore(other_dir / "prompts") as other:
        child, unrelated = other.get("v3"), other.get("v4")
    assert child.instruction == store.get("v2").instruction
    assert child.scores == {"r": 1.0}
    assert child.parent is None
    assert child.metadata["imported_from"] == "v2"
    assert child.metadata["imported_parent"] == "v1"
    assert child.metadata["imported_source"] == "manual"
    assert unrelated.metadata["imported_from"] == "v3"


def test_export_links_parents_inside_file(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    store.create("child", [], parent="v1")
    exported = invoke(runner, data_dir, "export")
    export_file = tmp_path / "all.json"
    export_file.write_text(exported.stdout, encoding="utf-8")

    result = invoke(runner, data_dir, "import", str(export_file))

    assert exported.exit_code == 0, exported.output
    assert result.exit_code == 0, result.output
    assert store.get("v3").metadata["imported_from"] == "v1"
    assert store.get("v4").parent == "v3"
    assert "imported_parent" not in store.get("v4").metadata


def test_import_reads_show_output(
    runner: CliRunner, data_dir: Path, tmp_path: Path, store: DiskPromptStore
) -> None:
    shown = invoke(runner, data_dir, "show", "v1")
    path = tmp_path / "shown.json"
    path.write_text(shown.stdout, encoding="utf-8")

    result = invoke(runner, data_dir, "import", str(path))

    assert result.exit_code == 0, result.output
    assert result.stdout == "Created v2 (imported from v1).\n"
    assert store.get("v2").instruction == store.get("v1").instruction


def test_export_stdout_lists_all_versions(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("second", [])

    records = invoke_json(runner, data_dir, "export")

    assert [record["version"] for record in records] == ["v1", "v2"]
    assert "active_for" not in records[0]


def test_export_unknown_version_exits_1(runner: CliRunner, data_dir: Path) -> None:
    result = invoke(runner, data_dir, "export", "v1", "v7")

    assert result.exit_code == 1
    assert "'v7' does not exist" in result.stderr
    assert result.stdout == ""


def test_no_arguments_prints_help(runner: CliRunner) -> None:
    result = runner.invoke(prompts_app, [])

    for command in ("list", "show", "activate", "import", "export"):
        assert command in result.output


# canary


def test_canary_starts_for_default_pointer(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])

    result = invoke(runner, data_dir, "canary", "v2", "--share", "0.1")

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Started a canary of v2 for the default pointer: 10% of clients get it, "
        "the others get v1.\n"
    )
    canary = store.canaries()["*"]
    assert canary.version == "v2"
    assert canary.share == 0.1
    assert store.active_version() == "v1"


def test_canary_json_for_model_pointer(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])

    started = invoke_json(
        runner,
        data_dir,
        "canary",
        "v2",
        "--share",
        "0.25",
        "--model",
        "gemma",
        "--json",
    )

    assert started["model"] == "gemma"
    assert started["version"] == "v2"
    assert started["share"] == 0.25
    assert started["active"] == "v1"
    assert started["replaced"] is None
    assert "started_at" in started
    assert list(store.canaries()) == ["gemma"]


def test_canary_replacement_names_earlier_canary(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.create("other", [])
    store.set_canary("v2", 0.1)

    grown = invoke(runner, data_dir, "canary", "v2", "--share", "0.5")
    replaced = invoke(runner, data_dir, "canary", "v3", "--share", "0.2")

    assert grown.exit_code == 0, grown.output
    assert "now serves 50% of clients (was 10%)" in grown.stdout
    assert replaced.exit_code == 0, replaced.output
    assert "It replaces the canary of v2 (50% of clients)." in replaced.stdout
    assert store.canaries()["*"].version == "v3"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("v2", "--share", "1.5"), "strictly between 0 and 1"),
        (("v2", "--share", "0"), "strictly between 0 and 1"),
        (("v9", "--share", "0.1"), "'v9' does not exist"),
        (("v1", "--share", "0.1"), "already active"),
        (("v2",), "Missing --share"),
        (("--share", "0.1"), "Missing VERSION"),
        (("v2", "--stop"), "--stop ends the running canary"),
        (("--stop",), "No canary is running for the default pointer"),
        (("--stop", "--model", "gemma"), "No canary is running for model 'gemma'"),
    ],
    ids=[
        "share-above-one",
        "share-zero",
        "unknown-version",
        "active-version",
        "missing-share",
        "missing-version",
        "stop-with-version",
        "stop-without-canary",
        "stop-model-without-canary",
    ],
)
def test_canary_invalid_request_exits_1(
    runner: CliRunner,
    data_dir: Path,
    store: DiskPromptStore,
    args: tuple[str, ...],
    message: str,
) -> None:
    store.create("candidate", [])

    result = invoke(runner, data_dir, "canary", *args)

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: ")
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stdout == ""
    assert store.canaries() == {}


def test_canary_stop_prints_ended_canary(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)

    result = invoke(runner, data_dir, "canary", "--stop")

    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "Ended the canary of v2 for the default pointer (10% of clients); "
        "every client gets v1 again.\n"
    )
    assert store.canaries() == {}


def test_canary_stop_json_for_model(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)
    store.set_canary("v2", 0.3, model="gemma")

    ended = invoke_json(
        runner, data_dir, "canary", "--stop", "--model", "gemma", "--json"
    )

    assert ended["model"] == "gemma"
    assert ended["version"] == "v2"
    assert ended["share"] == 0.3
    assert ended["active"] == "v1"
    assert list(store.canaries()) == ["*"]


def test_activate_canary_version_reports_promotion(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)

    result = invoke(runner, data_dir, "activate", "v2")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "The default pointer now points at v2 (previously v1).",
        "Ended the canary of v2 (10% of clients); every client gets it now.",
    ]
    assert store.canaries() == {}


def test_activate_json_names_ended_canary(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)

    activated = invoke_json(runner, data_dir, "activate", "v2", "--json")

    assert activated["ended_canary"]["version"] == "v2"
    assert activated["ended_canary"]["share"] == 0.1


def test_list_marks_canary_version(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)
    store.set_canary("v2", 0.05, model="gemma")

    table = invoke(runner, data_dir, "list")
    rows = invoke_json(runner, data_dir, "list", "--json")

    lines = table.stdout.splitlines()
    assert table.exit_code == 0, table.output
    assert lines[2].startswith("v2")
    assert "default (canary 10%),gemma (canary 5%)" in lines[2]
    assert "canary" not in lines[1]
    assert rows[0]["canary_for"] == {}
    assert rows[1]["canary_for"] == {"*": 0.1, "gemma": 0.05}
    assert rows[1]["active_for"] == []


def test_show_names_canary_on_stderr(
    runner: CliRunner, data_dir: Path, store: DiskPromptStore
) -> None:
    store.create("candidate", [])
    store.set_canary("v2", 0.1)

    canary = invoke(runner, data_dir, "show", "v2")
    active = invoke(runner, data_dir, "show", "active", "--model", "llama")
    plain = invoke(runner, data_dir, "show", "v1")

    assert json.loads(canary.stdout)["version"] == "v2"
    assert canary.stderr == (
        "Note: v2 is the canary of the default pointer, served to 10% of its clients.\n"
    )
    assert json.loads(active.stdout)["version"] == "v1"
    assert "a canary of v2 runs for the default pointer" in active.stderr
    assert plain.stderr == ""


def test_help_lists_canary_command(runner: CliRunner) -> None:
    result = runner.invoke(prompts_app, ["canary", "--help"])

    assert result.exit_code == 0
    assert "--share" in result.output
    assert "--stop" in result.output


def test_default_canary_names_shadowing_models(tmp_path: Path) -> None:
    store = DiskPromptStore(tmp_path / "prompts")
    store.ensure_seeded(gateway.prompting.load_default_instruction())
    store.create("For one model.", [])
    store.create("Candidate.", [])
    store.activate("v2", "gemma")
    store.close()

    result = CliRunner().invoke(
        prompts_app, ["canary", "v3", "--share", "0.5", "--data-dir", str(tmp_path)]
    )

    assert result.exit_code == 0, result.output
    assert "get no canary: 'gemma'" in result.output
