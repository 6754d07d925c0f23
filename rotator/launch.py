"""``exec`` and ``emit``: handing a token to a Docker/Podman launch without leaking it.

``exec`` puts the token into the *child's* environment only and replaces this process
with the command (``os.execvpe``): nothing is exported into the calling shell, the
token is never on a command line, and no wrapper process lingers holding it. The
intended use is ``lg-rotate exec --provider vault -- docker run -e
LINUXGUARD_ENROLL_TOKEN -e LINUXGUARD_TENANT_ID IMAGE``: ``-e NAME`` without a value
makes Docker copy the variable from its own environment.

``emit`` writes the value to stdout for wrappers that need it, only into a pipe (never
a terminal unless forced), and writes nothing at all when anything fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import IO, NoReturn

from rotator.errors import LaunchError
from rotator.tokens import TOKEN_SHAPED, EnrollToken, format_timestamp

log = logging.getLogger("lg_rotate.launch")

TOKEN_ENV = "LINUXGUARD_ENROLL_TOKEN"  # noqa: S105 (a variable name, not a secret)
TENANT_ENV = "LINUXGUARD_TENANT_ID"
EMIT_FORMATS = ("raw", "env", "json")
CONTAINER_RUNTIMES = frozenset({"docker", "podman", "nerdctl"})

_CMDLINE_LEAK = (
    "a value on a command line is readable by every local user in /proc/<pid>/cmdline "
    "and lands in shell history and runtime audit logs"
)
_ENV_WITH_VALUE = re.compile(rf"^(?:-e|--env=?)?\s*{TOKEN_ENV}=.+", re.DOTALL)


def check_command_line(argv: Sequence[str], *, token: EnrollToken | None = None) -> None:
    """Refuse a command line that carries a token value (before anything is minted)."""
    if not argv:
        raise LaunchError(
            "no command to run",
            fix="put the command after --: lg-rotate exec ... -- docker run ...",
        )
    value = token.value.reveal() if token else None
    for position, arg in enumerate(argv):
        previous = argv[position - 1] if position else ""
        problem = None
        if _ENV_WITH_VALUE.match(arg) or (
            previous in ("-e", "--env") and arg.startswith(f"{TOKEN_ENV}=")
        ):
            problem = f"argument {position} sets {TOKEN_ENV} to a value"
        elif arg == "--enroll-token" or arg.startswith("--enroll-token="):
            problem = f"argument {position} passes the token with --enroll-token"
        elif (value and value in arg.replace("-", "").upper()) or TOKEN_SHAPED.search(arg):
            problem = f"argument {position} looks like an enrolment token"
        if problem:
            raise LaunchError(
                f"refusing to run: {problem}; {_CMDLINE_LEAK}",
                fix=f"pass the name only (-e {TOKEN_ENV} -e {TENANT_ENV}); "
                "lg-rotate exec puts the value in the command's environment",
            )


def resolve_executable(argv: Sequence[str]) -> str:
    """The program's path, checked before a token is minted for a launch that cannot run."""
    path = shutil.which(argv[0])
    if path is None:
        raise LaunchError(
            f"command not found: {argv[0]}", fix="check the command after -- and your PATH"
        )
    return path


def warn_if_token_not_forwarded(argv: Sequence[str]) -> None:
    """``docker run`` without ``-e LINUXGUARD_ENROLL_TOKEN`` never hands the token over."""
    if os.path.basename(argv[0]) not in CONTAINER_RUNTIMES or "run" not in argv[1:]:
        return
    forwarded = any(
        arg in (TOKEN_ENV, f"--env={TOKEN_ENV}")
        and (arg != TOKEN_ENV or argv[i - 1] in ("-e", "--env"))
        for i, arg in enumerate(argv)
    )
    if not forwarded:
        log.warning(
            "%s run has no -e %s: the container will not see the token (add -e %s -e %s)",
            os.path.basename(argv[0]),
            TOKEN_ENV,
            TOKEN_ENV,
            TENANT_ENV,
        )


def child_environment(token: EnrollToken, *, base: Mapping[str, str]) -> dict[str, str]:
    """A copy of ``base`` plus the token and tenant; ``base`` itself is not touched."""
    env = {k: v for k, v in base.items() if k != "LINUXGUARD_API_KEY"}
    env[TOKEN_ENV] = token.value.reveal()
    env[TENANT_ENV] = token.tenant_id
    return env


def exec_with_token(argv: Sequence[str], *, executable: str, token: EnrollToken) -> NoReturn:
    """Replace this process with ``argv``, the token only in the new environment."""
    env = child_environment(token, base=os.environ)
    log.info(
        "exec %s with %s (%s)", os.path.basename(executable), TOKEN_ENV, token.short_fingerprint
    )
    try:
        os.execve(executable, list(argv), env)  # noqa: S606 (no shell, on purpose)
    except OSError as exc:
        raise LaunchError(
            f"could not start {argv[0]}: {exc.strerror}", fix="check the command after --"
        ) from None  # the OSError carries no token, but its frame locals hold env


def render(token: EnrollToken, *, fmt: str) -> str:
    """The text ``emit`` writes, in one of :data:`EMIT_FORMATS`."""
    value = token.value.reveal()
    if fmt == "raw":
        return value + "\n"
    if fmt == "env":
        # docker --env-file format: NAME=value, no quoting, one per line.
        return f"{TOKEN_ENV}={value}\n{TENANT_ENV}={token.tenant_id}\n"
    if fmt == "json":
        return (
            json.dumps(
                {
                    "token": value,
                    "tenantId": token.tenant_id,
                    "expiresAt": format_timestamp(token.expires_at),
                    "fingerprint": token.fingerprint,
                }
            )
            + "\n"
        )
    raise LaunchError(f"unknown emit format {fmt!r}", fix=f"use one of {', '.join(EMIT_FORMATS)}")


def check_emit_destination(stream: IO[str], *, force: bool) -> None:
    """Refuse to print a token to a terminal (scrollback, screen sharing) unless forced."""
    if stream.isatty() and not force:
        raise LaunchError(
            "refusing to write the token to a terminal",
            fix="pipe it (docker run --env-file <(lg-rotate emit -f env) ...) or pass --force",
        )


def emit(token: EnrollToken, *, fmt: str, stream: IO[str]) -> None:
    text = render(token, fmt=fmt)  # render fully first: a failure writes nothing
    stream.write(text)
    stream.flush()
