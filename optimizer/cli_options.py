"""Command-line options shared by the `optimize` and `optimizer` commands."""

from __future__ import annotations

from typing import Annotated

import typer

from gateway.settings import InjectionMode

UpstreamOption = Annotated[
    str | None,
    typer.Option(help="Target server; without it the embedded model is started."),
]
ModeOption = Annotated[
    InjectionMode | None,
    typer.Option(help="How the gateway serves the target: auto, chat or base."),
]
HelpersOption = Annotated[
    str | None,
    typer.Option(
        help="Base URL of a stronger model for the selector, judge and optimizer "
        "roles (key in DRPO_HELPERS_API_KEY)."
    ),
]
HelpersModelOption = Annotated[
    str | None,
    typer.Option(help="Model name at --helpers. Default: the first it lists."),
]
JudgeOption = Annotated[
    str | None,
    typer.Option(
        help="Base URL for the judge role alone, over --helpers (key in "
        "DRPO_JUDGE_API_KEY)."
    ),
]
JudgeModelOption = Annotated[str | None, typer.Option(help="Model name at --judge.")]
