"""A Dockerfile parser for the project's own image rules (tests/test_manifests.py).

Linting is hadolint's job (``hadolint --config .hadolint.yaml Dockerfile``, in
.ci/check-manifests), and CI builds the image for real and checks the result
(.ci/image/build.sh, .ci/image/check.py). This parser (``parse``, ``stages``, ``exec_form``,
``key_values``) serves the rules hadolint has no equivalent for, among them that each base
image is pinned and trusted: the bases are build arguments (``ARG BUILD_BASE=...`` before the
first ``FROM``), which hadolint does not resolve, so ``stages`` resolves their defaults.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int  # first line of the instruction, 1-based
    keyword: str  # upper case
    value: str  # the rest, continuation lines joined

    @property
    def flags(self) -> dict[str, str]:
        """Leading ``--name=value`` flags (FROM --platform, COPY --from, RUN --mount)."""
        found: dict[str, str] = {}
        for word in self.value.split():
            if not word.startswith("--"):
                break
            name, _, val = word[2:].partition("=")
            found[name] = val
        return found

    @property
    def body(self) -> str:
        """The value without its leading ``--flags``."""
        words = self.value.split(" ")
        while words and (words[0].startswith("--") or words[0] == ""):
            words.pop(0)
        return " ".join(words).strip()


@dataclass
class Stage:
    index: int
    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)


def parse(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions (comments dropped, ``\\`` continuations joined)."""
    escape = "\\"
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    in_directives = True
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if in_directives:
            directive = re.match(r"#\s*(\w+)\s*=\s*(\S+)", stripped)
            if directive:
                if directive.group(1).lower() == "escape":
                    escape = directive.group(2)
                continue
            in_directives = False
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if "<<" in stripped and re.search(r"<<-?\s*['\"]?[A-Z_]+", stripped) and not pending:
            raise ValueError(f"line {number}: heredocs are not supported by this checker")
        if not pending:
            start = number
        if stripped.endswith(escape):
            pending.append(stripped[: -len(escape)].strip())
            continue
        pending.append(stripped)
        joined = " ".join(part for part in pending if part)
        keyword, _, value = joined.partition(" ")
        instructions.append(Instruction(start, keyword.upper(), value.strip()))
        pending = []
    if pending:
        raise ValueError(f"line {start}: the file ends inside a continued instruction")
    return instructions


def stages(instructions: list[Instruction]) -> tuple[list[Instruction], list[Stage]]:
    """Global instructions (ARGs before the first FROM) and the stages."""
    head: list[Instruction] = []
    found: list[Stage] = []
    defaults: dict[str, str] = {}  # global ARGs: what FROM may name
    for instruction in instructions:
        if instruction.keyword == "ARG" and not found:
            defaults.update(key_values(instruction.body))
        if instruction.keyword == "FROM":
            words = _expand(instruction.body, defaults).split()
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            found.append(Stage(len(found), words[0] if words else "", name, instruction.line))
        elif found:
            found[-1].instructions.append(instruction)
        else:
            head.append(instruction)
    return head, found


def exec_form(value: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    if not value.startswith("["):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return None
    if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
        return parsed
    return None


def key_values(value: str) -> dict[str, str]:
    """``ENV``/``LABEL``/``ARG`` pairs (``a=b c="d e"``, or the legacy ``ENV a b``)."""
    words = shlex.split(value, posix=True)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    pairs: dict[str, str] = {}
    for word in words:
        name, sep, val = word.partition("=")
        pairs[name] = val if sep else ""
    return pairs


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match.group(1), match.group(0)), value)
