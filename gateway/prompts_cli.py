"""The `drpo-gateway prompts` commands: list, show, activate, canary, import, export."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gateway.errors import ConfigurationError, GatewayError
from gateway.instruction import Example, Instruction, PromptVersion
from gateway.settings import load_settings
from gateway.store import DEFAULT_MODEL_KEY, ActivationEvent, Canary, PromptStore
from gateway.store.base import describe_pointer, model_key
from gateway.store.factory import open_prompt_store

prompts_app = typer.Typer(
    help="List, show, activate, roll back, canary, import and export prompt versions.",
    no_args_is_help=True,
    add_completion=False,
)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Gateway data directory; the prompt store is its prompts/ folder "
        "unless DRPO_STORE_BACKEND=redis. Default: DRPO_DATA_DIR, then the YAML "
        "config, then ~/.local/share/drpo-gateway.",
        show_default=False,
    ),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", envvar="DRPO_CONFIG", help="YAML settings file.", dir_okay=False
    ),
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", help="Model name of the pointer; the default pointer when omitted."
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]

_PROMPT_PREVIEW_CHARS = 50
_JSON_TYPE_NAMES: dict[type, str] = {
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class CommandError(ValueError):
    """A command cannot run with the given options or the store's state."""


class PromptFileError(CommandError):
    """An import or export file cannot be read or written, or fails validation."""


class InstructionFile(BaseModel):
    """One instruction object in an import file."""

    model_config = ConfigDict(extra="forbid")

    system_prompt: str
    examples: tuple[Example, ...] = ()
    scores: dict[str, float] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None


_EXPORT_ADAPTER = TypeAdapter(list[PromptVersion])


@prompts_app.command("list")
def list_command(
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """List the stored prompt versions, oldest first.

    ACTIVE FOR names the models whose pointer is the version; "default" (or
    "*" in JSON) is the pointer used by every other model. A running canary
    shows as "default (canary 10%)" on its version, and as "canary_for"
    (pointer to share) in JSON.
    """
    with _report_errors(), _open_store(data_dir, config) as store:
        versions = store.list_versions()
        pointers = store.active_pointers()
        canaries = store.canaries()

    active_for = _models_by_version(pointers)
    if json_output:
        rows = [
            {
                **_to_json(record),
                "active_for": active_for.get(record.version, []),
                "canary_for": _canary_shares(canaries, record.version),
            }
            for record in versions
        ]
        _echo_json(rows)
        return
    _echo_table(versions, active_for, canaries)


@prompts_app.command("show")
def show_command(
    version: Annotated[
        str, typer.Argument(help="A version id such as v3, or 'active'.")
    ],
    model: ModelOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Print one version record as JSON.

    `show active --model NAME` prints the version that NAME is served: its
    own pointer, else the default pointer. A running canary of the version,
    or of the pointer that `show active` reads, is named on stderr, so
    stdout stays a record that `prompts import` reads.
    """
    with _report_errors(), _open_store(data_dir, config) as store:
        if version != "active":
            if model is not None:
                raise CommandError(
                    "--model applies only to `show active`. "
                    f"Remove it to show {version!r}."
                )
            record = store.get(version)
            notes = _canary_notes_for_version(store.canaries(), version)
        else:
            record = store.get(_require_active(store, model))
            notes = _canary_notes_for_pointer(store, model)
    _echo_json(_to_json(record))
    for note in notes:
        typer.echo(note, err=True)


@prompts_app.command("activate")
def activate_command(
    version: Annotated[str, typer.Argument(help="Version id to activate, e.g. v3.")],
    model: ModelOption = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Point a model, or the default pointer without --model, at a version.

    Activating the version of the pointer's running canary promotes it: the
    canary ends and every client gets the version.
    """
    with _report_errors(), _open_store(data_dir, config) as store:
        pointers = store.active_pointers()
        canary = store.canaries().get(model_key(model))
        store.activate(version, model)
    promoted = canary if canary is not None and canary.version == version else None

    # NOTE: `previous` is read just before the activation. A change that
    # another process makes in between is missing from this message, but the
    # store's history records it.
    previous = pointers.get(DEFAULT_MODEL_KEY if model is None else model)
    if json_output:
        _echo_json(
            {
                "model": model,
                "version": version,
                "previous": previous,
                "changed": previous != version,
                "ended_canary": _canary_json(promoted),
            }
        )
        return
    typer.echo(_describe_activation(version, model, previous, pointers))
    if promoted is not None:
        typer.echo(
            f"Ended the canary of {version} ({_percent(promoted.share)} of "
            "clients); every client gets it now."
        )


@prompts_app.command("rollback")
def rollback_command(
    to: Annotated[
        str | None,
        typer.Option(help="Version to restore. Default: the one active before."),
    ] = None,
    model: ModelOption = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Restore the version that was active before the current one, or --to VERSION.

    Like `kubectl rollout undo`, a second rollback returns to the version the
    first one replaced. Running gateways serve the restored version within a
    second.
    """
    with _report_errors(), _open_store(data_dir, config) as store:
        pointers = store.active_pointers()
        current = pointers.get(DEFAULT_MODEL_KEY if model is None else model)
        fallback = None if model is None else pointers.get(DEFAULT_MODEL_KEY)
        target = to or _previous_version(store.history(model), current, model, fallback)
        store.activate(target, model)

    if json_output:
        _echo_json({"model": model, "version": target, "previous": current})
        return
    typer.echo(_describe_activation(target, model, current, pointers))


def _previous_version(
    history: list[ActivationEvent],
    current: str | None,
    model: str | None,
    fallback: str | None,
) -> str:
    """Return the version the pointer had before its last activation.

    A model pointer created by that activation had no version of its own: the
    model was served the default pointer's version, `fallback`, which is then
    the one to restore.
    """
    pointer = describe_pointer(model)
    last = history[-1] if history and history[-1].version == current else None
    if last is not None and last.previous is None and fallback not in (None, current):
        assert fallback is not None
        return fallback
    if last is None or last.previous is None:
        raise CommandError(
            f"There is no earlier version of {pointer} to roll back to. Pass "
            "--to VERSION, or see `drpo-gateway prompts list`."
        )
    return last.previous


@prompts_app.command("canary")
def canary_command(
    version: Annotated[
        str | None,
        typer.Argument(
            help="Version to serve to a share of clients, e.g. v3. Omit with --stop.",
            metavar="VERSION",
            show_default=False,
        ),
    ] = None,
    share: Annotated[
        float | None,
        typer.Option(
            "--share",
            help="Fraction of clients that get VERSION, strictly between 0 and "
            "1; 0.1 is 10%.",
            show_default=False,
        ),
    ] = None,
    stop: Annotated[
        bool,
        typer.Option("--stop", help="End the running canary instead of starting one."),
    ] = False,
    model: ModelOption = None,
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Serve a version to a share of clients, or end that canary with --stop.

    A client (its bearer key, else its IP) stays in one arm for the whole
    canary, and a new canary of the same version with a larger --share keeps
    the clients already in it. `prompts activate VERSION` promotes the canary
    and ends it. Running gateways follow every change within a second.
    """
    with _report_errors():
        if stop:
            _reject_start_options(version, share)
            with _open_store(data_dir, config) as store:
                ended = _stop_canary(store, model)
                active = store.active_version(model)
            _echo_canary_end(ended, active, json_output)
            return

        version, share = _require_start_options(version, share)
        with _open_store(data_dir, config) as store:
            earlier = store.canaries().get(model_key(model))
            started = store.set_canary(version, share, model)
            active = store.active_version(model)
            pointers = store.active_pointers()
    _echo_canary_start(started, earlier, active, json_output)
    shadowed = sorted(key for key in pointers if key != DEFAULT_MODEL_KEY)
    if model is None and shadowed and not json_output:
        # Models with their own pointer never use the default one, so the
        # canary does not reach them.
        typer.echo(
            "Note: models with their own pointer keep it and get no canary: "
            f"{', '.join(repr(name) for name in shadowed)}. Pass --model NAME "
            "to run a canary for one of them.",
            err=True,
        )


def _reject_start_options(version: str | None, share: float | None) -> None:
    if version is not None or share is not None:
        raise CommandError(
            "--stop ends the running canary and takes no VERSION or --share. "
            "Remove them, or remove --stop to start a canary."
        )


def _require_start_options(
    version: str | None, share: float | None
) -> tuple[str, float]:
    if version is None:
        raise CommandError(
            "Missing VERSION: pass the version to serve, e.g. `prompts canary v3 "
            "--share 0.1`, or --stop to end the running canary."
        )
    if share is None:
        raise CommandError(
            f"Missing --share: pass the fraction of clients that get {version}, "
            "e.g. --share 0.1 for 10%."
        )
    return version, share


def _stop_canary(store: PromptStore, model: str | None) -> Canary:
    ended = store.clear_canary(model)
    if ended is None:
        raise CommandError(
            f"No canary is running for {describe_pointer(model)}. "
            "`drpo-gateway prompts list` shows the running canaries."
        )
    return ended


def _echo_canary_start(
    canary: Canary, earlier: Canary | None, active: str | None, json_output: bool
) -> None:
    if json_output:
        _echo_json(
            {
                **canary.model_dump(mode="json"),
                "active": active,
                "replaced": _canary_json(earlier),
            }
        )
        return
    pointer = describe_pointer(canary.model)
    others = active or "no instruction"
    if earlier is not None and earlier.version == canary.version:
        typer.echo(
            f"The canary of {canary.version} for {pointer} now serves "
            f"{_percent(canary.share)} of clients (was {_percent(earlier.share)}); "
            f"the others get {others}."
        )
        return
    typer.echo(
        f"Started a canary of {canary.version} for {pointer}: "
        f"{_percent(canary.share)} of clients get it, the others get {others}."
    )
    if earlier is not None:
        typer.echo(
            f"It replaces the canary of {earlier.version} "
            f"({_percent(earlier.share)} of clients)."
        )


def _echo_canary_end(canary: Canary, active: str | None, json_output: bool) -> None:
    if json_output:
        _echo_json({**canary.model_dump(mode="json"), "active": active})
        return
    typer.echo(
        f"Ended the canary of {canary.version} for {describe_pointer(canary.model)} "
        f"({_percent(canary.share)} of clients); every client gets "
        f"{active or 'no instruction'} again."
    )


@prompts_app.command("import")
def import_command(
    file: Annotated[
        Path,
        typer.Argument(
            help="JSON file: one instruction object, one version record as "
            "`prompts show` prints it, or a list of version records as "
            "`prompts export` writes it."
        ),
    ],
    activate: Annotated[
        bool,
        typer.Option("--activate", help="Activate the last imported version."),
    ] = False,
    model: ModelOption = None,
    source: Annotated[
        str, typer.Option("--source", help="Source recorded on the new versions.")
    ] = "import",
    json_output: JsonOption = False,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create new versions from an instruction file or an export file.

    New versions always get new ids. For an export file, the original id is
    kept in metadata["imported_from"], and a parent that is also in the file
    is linked to its new id.
    """
    with _report_errors():
        if model is not None and not activate:
            raise CommandError("--model needs --activate.")
        entries = read_prompt_file(file)
        with _open_store(data_dir, config) as store:
            created = _create_versions(store, entries, source)
            pointers = store.active_pointers()
            if activate:
                store.activate(created[-1].version, model)

    if json_output:
        _echo_json([_to_json(record) for record in created])
        return
    for record in created:
        origin = record.metadata.get("imported_from")
        suffix = f" (imported from {origin})" if origin else ""
        typer.echo(f"Created {record.version}{suffix}.")
    if activate:
        previous = pointers.get(DEFAULT_MODEL_KEY if model is None else model)
        typer.echo(_describe_activation(created[-1].version, model, previous, pointers))


@prompts_app.command("export")
def export_command(
    versions: Annotated[
        list[str] | None,
        typer.Argument(help="Version ids to export; every version when omitted."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write to this file, not stdout."),
    ] = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Write version records as a JSON list that `prompts import` reads."""
    with _report_errors():
        with _open_store(data_dir, config) as store:
            if versions:
                records = [store.get(version) for version in versions]
            else:
                records = store.list_versions()
        text = _format_json([_to_json(record) for record in records])
        if output is None:
            typer.echo(text)
            return
        _write_text(output, text + "\n")
    noun = "version" if len(records) == 1 else "versions"
    typer.echo(f"Wrote {len(records)} {noun} to {output}.")


def read_prompt_file(path: Path) -> list[InstructionFile | PromptVersion]:
    """Read and validate an import file without touching the store.

    Raises PromptFileError naming the file and, for invalid content, the
    field, such as `[0].examples[1].answer`.
    """
    content = _read_json(path)
    if not isinstance(content, dict | list):
        raise PromptFileError(
            f"Prompt file {str(path)!r} must contain a JSON object (one "
            "instruction) or a list of version records, not a JSON "
            f"{_JSON_TYPE_NAMES.get(type(content), 'value')}."
        )
    if content == []:
        raise PromptFileError(f"Prompt file {str(path)!r} has no versions.")

    # An object with a "version" key is one record, as `prompts show` prints.
    if isinstance(content, dict) and "version" in content:
        content = [content]
    try:
        if isinstance(content, dict):
            return [InstructionFile.model_validate(content)]
        return list(_EXPORT_ADAPTER.validate_python(content))
    except ValidationError as error:
        raise PromptFileError(
            f"Invalid prompt file {str(path)!r}: {_describe_problems(error)}."
        ) from None


def _read_json(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(
            f"Cannot read prompt file {str(path)!r}: {error}."
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as error:
        raise PromptFileError(
            f"Prompt file {str(path)!r} is not valid JSON: {error}."
        ) from None


def _create_versions(
    store: PromptStore,
    entries: Sequence[InstructionFile | PromptVersion],
    source: str,
) -> list[PromptVersion]:
    """Store `entries` as new versions, linking parents that the file contains."""
    new_ids: dict[str, str] = {}
    created: list[PromptVersion] = []
    for entry in entries:
        if isinstance(entry, InstructionFile):
            record = store.create(
                entry.system_prompt,
                entry.examples,
                parent=entry.parent,
                source=source,
                scores=entry.scores,
                metadata=entry.metadata,
            )
        else:
            record = store.create(
                entry.system_prompt,
                entry.examples,
                parent=new_ids.get(entry.parent) if entry.parent else None,
                source=source,
                scores=entry.scores,
                metadata=_import_metadata(entry, new_ids),
            )
            new_ids[entry.version] = record.version
        created.append(record)
    return created


def _import_metadata(entry: PromptVersion, new_ids: dict[str, str]) -> dict[str, Any]:
    metadata = {
        **entry.metadata,
        "imported_from": entry.version,
        "imported_source": entry.source,
        "imported_created_at": entry.created_at.isoformat(),
    }
    # A parent outside the file is an id of the exporting store, which may
    # name an unrelated version here, so it is kept only as metadata.
    if entry.parent is not None and entry.parent not in new_ids:
        metadata["imported_parent"] = entry.parent
    return metadata


@contextmanager
def _open_store(data_dir: Path | None, config: Path | None) -> Iterator[PromptStore]:
    """Open the configured store and seed it with the default instruction if empty."""
    settings = load_settings(config_file=config, data_dir=data_dir)
    store = open_prompt_store(settings)
    try:
        # The default instruction is loaded only for a store that has never
        # had a version; ensure_seeded checks again inside its transaction.
        if store.generation() == 0:
            store.ensure_seeded(_default_instruction())
        yield store
    finally:
        store.close()


def _default_instruction() -> Instruction:
    # Imported here so that `gateway.prompting` and its data load only for
    # the commands that open a store.
    from gateway.prompting import load_default_instruction

    try:
        return load_default_instruction()
    except (OSError, ValueError) as error:
        raise ConfigurationError(
            f"Could not load the default instruction to seed the empty prompt "
            f"store: {error}. Reinstall drpo-gateway to restore its data files."
        ) from error


@contextmanager
def _report_errors() -> Iterator[None]:
    """Turn library errors into a one-line message on stderr and exit status 1."""
    try:
        yield
    except (GatewayError, ConfigurationError, ValueError) as error:
        message = " ".join(str(error).split())
        typer.echo(f"Error: {message}", err=True)
        raise typer.Exit(1) from None


def _require_active(store: PromptStore, model: str | None) -> str:
    version = store.active_version(model)
    if version is None:
        target = describe_pointer(model)
        raise CommandError(
            f"No prompt version is active for {target}. "
            "Run `drpo-gateway prompts activate VERSION` first."
        )
    return version


def _describe_activation(
    version: str, model: str | None, previous: str | None, pointers: dict[str, str]
) -> str:
    pointer = "The default pointer" if model is None else f"Model {model!r}"
    if previous == version:
        return f"{pointer} already points at {version}; nothing changed."
    if previous is None and model is not None:
        default = pointers.get(DEFAULT_MODEL_KEY)
        fallback = f", so the model used the default {default}" if default else ""
        return f"{pointer} now points at {version} (previously unset{fallback})."
    return f"{pointer} now points at {version} (previously {previous or 'unset'})."


def _percent(share: float) -> str:
    return f"{share * 100:.3g}%"


def _canary_json(canary: Canary | None) -> dict[str, Any] | None:
    return None if canary is None else canary.model_dump(mode="json")


def _canary_shares(canaries: dict[str, Canary], version: str) -> dict[str, float]:
    return {
        key: canary.share
        for key, canary in sorted(canaries.items())
        if canary.version == version
    }


def _canary_notes_for_version(canaries: dict[str, Canary], version: str) -> list[str]:
    return [
        f"Note: {version} is the canary of {describe_pointer(canary.model)}, "
        f"served to {_percent(canary.share)} of its clients."
        for _, canary in sorted(canaries.items())
        if canary.version == version
    ]


def _canary_notes_for_pointer(store: PromptStore, model: str | None) -> list[str]:
    # A model follows its own canary when it has its own pointer or canary,
    # and the default pointer's canary otherwise, as the gateway does.
    canaries = store.canaries()
    key = DEFAULT_MODEL_KEY
    if model is not None and (model in canaries or model in store.active_pointers()):
        key = model
    canary = canaries.get(key)
    if canary is None:
        return []
    return [
        f"Note: a canary of {canary.version} runs for "
        f"{describe_pointer(canary.model)}: {_percent(canary.share)} of clients get "
        "it instead of this version."
    ]


def _models_by_version(pointers: dict[str, str]) -> dict[str, list[str]]:
    models: dict[str, list[str]] = {}
    for model, version in sorted(pointers.items()):
        models.setdefault(version, []).append(model)
    return models


def _echo_table(
    versions: Sequence[PromptVersion],
    active_for: dict[str, list[str]],
    canaries: dict[str, Canary],
) -> None:
    header = (
        "VERSION",
        "CREATED (UTC)",
        "SOURCE",
        "PARENT",
        "ACTIVE FOR",
        "SYSTEM PROMPT",
    )
    rows = [header]
    for record in versions:
        models = active_for.get(record.version, [])
        serving = [_table_pointer(model) for model in models] + [
            f"{_table_pointer(key)} (canary {_percent(share)})"
            for key, share in _canary_shares(canaries, record.version).items()
        ]
        rows.append(
            (
                record.version,
                record.created_at.strftime("%Y-%m-%d %H:%M"),
                record.source,
                record.parent or "-",
                ",".join(serving) or "-",
                _preview(record.system_prompt),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        typer.echo("  ".join(cells).rstrip())


def _table_pointer(key: str) -> str:
    return "default" if key == DEFAULT_MODEL_KEY else key


def _preview(text: str) -> str:
    flat = " ".join(text.split())
    if len(flat) <= _PROMPT_PREVIEW_CHARS:
        return flat
    return flat[: _PROMPT_PREVIEW_CHARS - 3] + "..."


def _describe_problems(error: ValidationError, limit: int = 3) -> str:
    problems = [
        f"field {_field_path(problem['loc'])}: {problem['msg']}"
        for problem in error.errors()[:limit]
    ]
    hidden = error.error_count() - len(problems)
    if hidden > 0:
        problems.append(f"and {hidden} more")
    return "; ".join(problems)


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path.lstrip(".") or "(top level)"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


def _to_json(record: PromptVersion) -> dict[str, Any]:
    return record.model_dump(mode="json")


def _format_json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _echo_json(value: object) -> None:
    typer.echo(_format_json(value))


def _write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise PromptFileError(f"Cannot write {str(path)!r}: {error}.") from None
