"""Replay the Dockerfile's build stage for real, without a Docker engine.

    python .ci/dockerfile_check.py build [Dockerfile] [--build-arg NAME=VALUE ...] [--keep DIR]

Linting is hadolint's job (``hadolint --config .hadolint.yaml Dockerfile``, in
.ci/check-manifests); hadolint does not run anything, so this replays the stage that the
final stage copies from, step by step, in a temporary directory standing in for the image's
root: ARG/ENV/WORKDIR/COPY are applied, absolute paths in ENV and WORKDIR are re-pointed under
that root, and each RUN runs under ``sh -c`` with the same environment, so a broken install
recipe fails CI as it would fail ``docker build``. ``apt-get`` RUN steps are skipped (the CI
machine brings python3 and venv itself). A RUN that names an absolute path literally is
refused: it could not be re-pointed, and the Dockerfile says build steps use ENV paths.
Finally the files the runtime stage copies and its ENTRYPOINT must exist in the result.

The parser (``parse``, ``stages``, ``exec_form``, ``key_values``) is also what
tests/test_manifests.py uses for the project's own image rules that hadolint has no
equivalent for.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.body.split()
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


# --- build (replay the build stage) ------------------------------------------------------


class BuildError(Exception):
    pass


@dataclass
class Replay:
    root: Path  # stands in for the image's /
    env: dict[str, str]
    workdir: str = "/"

    def host(self, image_path: str) -> Path:
        path = image_path if image_path.startswith("/") else f"{self.workdir}/{image_path}"
        return self.root / os.path.normpath(path).lstrip("/")


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: env.get(match.group(1), match.group(0)), value)


def _repoint(value: str, root: Path) -> str:
    """Absolute paths in ENV values move under the replay root (PATH-like lists too)."""
    parts = value.split(":")
    if all(part.startswith("/") for part in parts if part) and any(parts):
        return ":".join(str(root / part.lstrip("/")) if part else part for part in parts)
    return value


# A slash that starts a word ("/opt", '/src', =/x): "$VENV"/bin is a variable's path.
LITERAL_ABSOLUTE = re.compile(r"(?:^|[\s=:;|&(])[\"']?/(?!dev/null\b)[A-Za-z]")


def build(dockerfile: Path, *, build_args: dict[str, str], root: Path, context: Path) -> None:
    """Replay the build stage under ``root`` (an empty directory standing in for /)."""
    _, found = stages(parse(dockerfile.read_text()))
    final = found[-1]
    sources = [i for i in final.instructions if i.keyword == "COPY" and "from" in i.flags]
    if not sources:
        raise BuildError("the final stage copies nothing from a build stage")
    stage_ref = sources[0].flags["from"]
    stage = next((s for s in found if s.name == stage_ref or str(s.index) == stage_ref), None)
    if stage is None:
        raise BuildError(f"COPY --from={stage_ref}: no such stage")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(root)),
        "LANG": "C.UTF-8",
    }
    # The caller's pip settings (index, cache, constraints) carry over; the Dockerfile's ENV
    # lines come later and win, as they would in the image.
    env.update({name: value for name, value in os.environ.items() if name.startswith("PIP_")})
    replay = Replay(root=root, env=env)
    for instruction in stage.instructions:
        _replay_one(replay, instruction, build_args=build_args, context=context)
    _check_result(replay, final=final, stage=stage)


def _replay_one(
    replay: Replay, instruction: Instruction, *, build_args: dict[str, str], context: Path
) -> None:
    keyword, body = instruction.keyword, instruction.body
    where = f"Dockerfile:{instruction.line}"
    if keyword == "ARG":
        for name, default in key_values(body).items():
            replay.env[name] = build_args.get(name, default)
    elif keyword == "ENV":
        for name, value in key_values(body).items():
            replay.env[name] = _repoint(_expand(value, replay.env), replay.root)
    elif keyword == "WORKDIR":
        target = _expand(body, replay.env)
        replay.workdir = os.path.normpath(
            target if target.startswith("/") else f"{replay.workdir}/{target}"
        )
        replay.host(replay.workdir).mkdir(parents=True, exist_ok=True)
    elif keyword == "COPY":
        if "from" in instruction.flags:
            raise BuildError(f"{where}: COPY --from inside the build stage is not replayable")
        _replay_copy(replay, body, where=where, context=context)
    elif keyword == "RUN":
        _replay_run(replay, body, where=where)
    elif keyword not in ("LABEL", "EXPOSE", "STOPSIGNAL", "HEALTHCHECK"):
        raise BuildError(f"{where}: {keyword} in the build stage is not replayable")


def _replay_copy(replay: Replay, body: str, *, where: str, context: Path) -> None:
    *sources, dest = shlex.split(body)
    target = replay.host(_expand(dest, replay.env))
    into_directory = dest.endswith("/") or len(sources) > 1
    for source in sources:
        path = context / source
        if not path.exists():
            raise BuildError(f"{where}: COPY source {source} does not exist")
        if path.is_dir():
            # Docker copies a directory's contents, whatever the slashes say.
            shutil.copytree(
                path,
                target,
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        elif into_directory:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target / path.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _replay_run(replay: Replay, body: str, *, where: str) -> None:
    command = exec_form(body)
    script = " ".join(shlex.quote(word) for word in command) if command else body
    if re.search(r"\bapt-get\b|\bapk\b|\bdnf\b|\byum\b", script):
        print(f"-- {where}: skipped (system packages): {script[:70]}...", flush=True)
        return
    literal = LITERAL_ABSOLUTE.search(script)
    if literal:
        raise BuildError(
            f"{where}: RUN names an absolute path literally ({script[literal.start() :][:30]}"
            "...); reach it through an ENV variable so CI can replay the step"
        )
    print(f"-- {where}: RUN {' '.join(script.split())[:100]}...", flush=True)
    cwd = replay.host(replay.workdir)
    # Docker's default shell for the shell form.
    result = subprocess.run(["/bin/sh", "-c", script], cwd=cwd, env=replay.env, check=False)
    if result.returncode != 0:
        raise BuildError(f"{where}: RUN failed with exit code {result.returncode}")


def _check_result(replay: Replay, *, final: Stage, stage: Stage) -> None:
    copied: list[tuple[str, str]] = []
    for instruction in final.instructions:
        if instruction.keyword == "COPY" and "from" in instruction.flags:
            *sources, dest = shlex.split(instruction.body)
            for source in sources:
                if not replay.host(source).exists():
                    raise BuildError(
                        f"Dockerfile:{instruction.line}: the runtime stage copies {source} from "
                        f"stage {stage.name or stage.index}, which did not produce it"
                    )
                copied.append((source.rstrip("/"), dest.rstrip("/")))
    env: dict[str, str] = {}
    for instruction in final.instructions:
        if instruction.keyword == "ENV":
            env.update(key_values(instruction.body))
    entrypoints = [i for i in final.instructions if i.keyword == "ENTRYPOINT"]
    argv = exec_form(entrypoints[-1].body) if entrypoints else None
    if not argv:
        raise BuildError("the runtime stage has no exec-form ENTRYPOINT")
    program = argv[0]
    candidates = [program] if program.startswith("/") else [f"{d}/{program}" for d in _path(env)]
    for candidate in candidates:
        for source, dest in copied:
            if candidate == dest or candidate.startswith(dest + "/"):
                built = replay.host(source + candidate[len(dest) :])
                if built.is_file() and os.access(built, os.X_OK):
                    print(f"-- ENTRYPOINT {program} -> {candidate} (built)", flush=True)
                    return
    raise BuildError(
        f"ENTRYPOINT {program!r} is not among the files the runtime stage copies from "
        f"the build stage (PATH {':'.join(_path(env))})"
    )


def _path(env: dict[str, str]) -> list[str]:
    return [part for part in env.get("PATH", "/usr/bin:/bin").split(":") if part]


# --- command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=("build",))
    parser.add_argument("dockerfile", nargs="?", default=str(ROOT / "Dockerfile"))
    parser.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--keep", type=Path, help="build under this directory and keep it")
    args = parser.parse_args(argv)
    dockerfile = Path(args.dockerfile)
    build_args = dict(arg.partition("=")[::2] for arg in args.build_arg)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="image-root-", dir=args.keep))
    try:
        build(dockerfile, build_args=build_args, root=root, context=dockerfile.parent)
    except BuildError as exc:
        print(f"dockerfile build: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print("dockerfile build: the build stage replayed cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
