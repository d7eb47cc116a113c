"""A small Dockerfile and .dockerignore reader for the deployment tests.

It covers what the repository's Dockerfile uses: comments, line
continuations, `FROM image AS name`, flags such as `--from=` and JSON or
shell forms. It is no full parser of the Dockerfile syntax.
"""

from __future__ import annotations

import fnmatch
import json
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str

    def words(self) -> list[str]:
        """Return the arguments split as a shell would, or the JSON form's list."""
        if self.arguments.startswith("["):
            return [str(word) for word in json.loads(self.arguments)]
        return shlex.split(self.arguments)

    def flags(self) -> dict[str, str]:
        """Return the leading `--name=value` flags, as for COPY --from=stage."""
        flags = {}
        for word in shlex.split(self.arguments):
            if not word.startswith("--"):
                break
            name, _, value = word[2:].partition("=")
            flags[name] = value
        return flags

    def operands(self) -> list[str]:
        """Return the arguments after the leading flags."""
        words = self.words()
        while words and words[0].startswith("--"):
            words.pop(0)
        return words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [item for item in self.instructions if item.keyword == keyword]


def read_instructions(path: Path) -> list[Instruction]:
    """Return the instructions of a Dockerfile, continuations joined."""
    instructions = []
    pending = ""
    for raw_line in path.read_text().splitlines():
        line = raw_line.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            # Docker drops comment lines inside a continued instruction.
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
    return instructions


def read_stages(path: Path) -> list[Stage]:
    """Return the build stages in order; ARGs before the first FROM are skipped."""
    stages: list[Stage] = []
    for instruction in read_instructions(path):
        if instruction.keyword == "FROM":
            words = instruction.operands()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return stages


def stage_chain(stages: list[Stage], name: str) -> list[Stage]:
    """Return the stage `name` and the stages it builds on, base first."""
    by_name = {stage.name: stage for stage in stages if stage.name}
    chain = [by_name[name]]
    while chain[0].base in by_name:
        chain.insert(0, by_name[chain[0].base])
    return chain


def image_environment(stages: list[Stage], target: str) -> dict[str, str]:
    """Return the ENV values that the image of `target` starts with."""
    environment: dict[str, str] = {}
    for stage in stage_chain(stages, target):
        for instruction in stage.all("ENV"):
            for word in instruction.words():
                name, _, value = word.partition("=")
                environment[name] = value
    return environment


def read_dockerignore(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def is_ignored(relative_path: str, patterns: Iterable[str]) -> bool:
    """Return whether .dockerignore `patterns` leave `relative_path` out.

    A path is left out when it or one of its parent folders matches; the
    last matching pattern wins, and `!` patterns bring paths back. fnmatch's
    `*` also matches `/`, which is looser than Docker's matching.
    """
    parts = Path(relative_path).parts
    candidates = ["/".join(parts[: end + 1]) for end in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = pattern[1:] if negated else pattern
        body = body.strip("/")
        if any(_matches(candidate, body) for candidate in candidates):
            ignored = not negated
    return ignored


def _matches(path: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(path, pattern):
        return True
    if pattern.startswith("**/"):
        tail = pattern[3:]
        parts = path.split("/")
        return any(
            fnmatch.fnmatchcase("/".join(parts[start:]), tail)
            for start in range(len(parts))
        )
    return False
