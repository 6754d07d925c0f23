"""``exec`` and ``emit``: handing a token to a Docker/Podman launch without leaking it.

``exec`` puts the token into the *child's* environment only and replaces this process
with the command (``os.execvpe``): nothing is exported into the calling shell, the
token is never on a command line, and no wrapper process lingers holding it. The
intended use is ``lg-rotate exec --provider vault -- docker run -e
LINUXGUARD_ENROLL_TOKEN -e LINUXGUARD_TENANT_ID IMAGE``: ``-e NAME`` without a value
makes Docker copy the variable from its own environment.

The child gets lg-rotate's environment minus lg-rotate's own credentials: the
LinuxGuard API key, the store credentials the SDKs read from the environment
(:data:`CREDENTIAL_ENV`) and the variables of provider options marked ``secret``. A
command that needs one of them gets it only when asked (``--pass-env NAME``).

``emit`` writes the value to stdout for wrappers that need it, only into a pipe or a
socket (never a file, and never a terminal unless forced), and writes nothing at all
when anything fails.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Collection, Mapping, Sequence
from typing import IO, NoReturn

from rotator.errors import ConfigError, LaunchError
from rotator.tokens import TOKEN_SHAPED, EnrollToken, format_timestamp

log = logging.getLogger("lg_rotate.launch")

TOKEN_ENV = "LINUXGUARD_ENROLL_TOKEN"  # noqa: S105 (a variable name, not a secret)
TENANT_ENV = "LINUXGUARD_TENANT_ID"
EMIT_FORMATS = ("raw", "env", "json")
CONTAINER_RUNTIMES = frozenset({"docker", "podman", "nerdctl"})
API_KEY_ENV = "LINUXGUARD_API_KEY"

# Credentials lg-rotate or a store SDK reads from the environment. The command `exec`
# starts inherits none of them (nor the variables of provider options marked secret);
# `--pass-env NAME` hands one over on purpose. The API key is never handed over.
CREDENTIAL_ENV = frozenset(
    {
        API_KEY_ENV,
        "LG_ROTATE_API_KEY_FILE",
        # Vault / OpenBao (token auth, AppRole)
        "VAULT_TOKEN",
        "VAULT_ROLE_ID",
        "VAULT_SECRET_ID",
        # AWS: static keys, session tokens, web identity (IRSA), container credentials
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_ROLE_SESSION_NAME",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        # Google Cloud: Application Default Credentials and gcloud overrides
        "GOOGLE_APPLICATION_CREDENTIALS",
        "CLOUDSDK_AUTH_ACCESS_TOKEN",
        "CLOUDSDK_AUTH_CREDENTIAL_FILE_OVERRIDE",
    }
)
NEVER_PASSED = frozenset({API_KEY_ENV})
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

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


def check_pass_env(names: Sequence[str]) -> list[str]:
    """Validate ``--pass-env`` names (before minting): names only, never the API key."""
    for name in names:
        if not _ENV_NAME.fullmatch(name):
            raise ConfigError(
                f"--pass-env expects a variable name, got {name.partition('=')[0]!r}"
                + ("=..." if "=" in name else ""),
                fix="pass the name only (--pass-env VAULT_TOKEN): the value comes from the "
                "environment, never from the command line",
            )
        if name in NEVER_PASSED:
            raise ConfigError(
                f"--pass-env {name}: the LinuxGuard API key is never handed to the command",
                fix=f"drop --pass-env {name}; the command needs only {TOKEN_ENV}",
            )
    return list(dict.fromkeys(names))


def child_environment(
    token: EnrollToken,
    *,
    base: Mapping[str, str],
    withhold: Collection[str] = CREDENTIAL_ENV,
    pass_env: Collection[str] = (),
) -> dict[str, str]:
    """A copy of ``base`` minus the credentials in ``withhold`` (those in ``pass_env``
    excepted, never the API key), plus the token and tenant; ``base`` is not touched."""
    keep = set(pass_env) - NEVER_PASSED
    drop = (set(withhold) | NEVER_PASSED) - keep
    env = {k: v for k, v in base.items() if k not in drop}
    env[TOKEN_ENV] = token.value.reveal()
    env[TENANT_ENV] = token.tenant_id
    return env


def exec_with_token(
    argv: Sequence[str],
    *,
    executable: str,
    token: EnrollToken,
    withhold: Collection[str] = CREDENTIAL_ENV,
    pass_env: Collection[str] = (),
) -> NoReturn:
    """Replace this process with ``argv``, the token only in the new environment."""
    env = child_environment(token, base=os.environ, withhold=withhold, pass_env=pass_env)
    withheld = sorted(name for name in os.environ if name not in env)
    if withheld:  # names only, never values
        log.info(
            "not passing lg-rotate's credentials to %s: %s (--pass-env NAME hands one over)",
            os.path.basename(executable),
            ", ".join(withheld),
        )
    for name in pass_env:
        if name not in os.environ:
            log.warning("--pass-env %s: it is not set, so the command does not get it", name)
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


_PIPE_IT = "pipe it instead: docker run --env-file <(lg-rotate emit -o env ...) IMAGE"


def _is_dev_null(mode: os.stat_result) -> bool:
    try:
        null = os.stat(os.devnull)
    except OSError:
        return False
    return stat.S_ISCHR(null.st_mode) and mode.st_rdev == null.st_rdev


def describe_destination(mode: os.stat_result) -> str | None:
    """What kind of persistent place ``mode`` is, or None when a token may go there.

    Allowed: a pipe (``<(...)``, ``|``, ``$(...)``), a socket, and ``/dev/null`` (which
    keeps nothing). Refused: a regular file (``> tok.txt``: the token stays on disk in
    plain text), a directory, a block device, any other character device. Terminals are
    judged separately (:func:`check_emit_destination`).
    """
    kind = mode.st_mode
    if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind):
        return None
    if stat.S_ISCHR(kind):
        return None if _is_dev_null(mode) else "a character device"
    if stat.S_ISREG(kind):
        return "a regular file"
    if stat.S_ISDIR(kind):
        return "a directory"
    if stat.S_ISBLK(kind):
        return "a block device"
    return "neither a pipe nor a socket"


def check_emit_destination(stream: IO[str] | None, *, force: bool) -> None:
    """Refuse, before anything is minted, to write a token where it would persist.

    A terminal (scrollback, screen sharing) and a file, directory or device need
    ``--force``; a pipe, a socket and ``/dev/null`` do not. A stream with no file
    descriptor (an in-process caller's buffer) is that caller's business.
    """
    if stream is None:
        raise LaunchError(
            "refusing to emit the token: stdout is closed",
            fix=_PIPE_IT,
        )
    if stream.isatty():
        if not force:
            raise LaunchError(
                "refusing to write the token to a terminal",
                fix="pipe it (docker run --env-file <(lg-rotate emit -o env) ...) or pass --force",
            )
        return
    try:
        mode = os.fstat(stream.fileno())
    except (AttributeError, ValueError):  # io.UnsupportedOperation: no descriptor at all
        return
    except OSError as exc:  # EBADF: descriptor 1 was closed
        raise LaunchError(
            f"refusing to emit the token: stdout is unusable ({exc.strerror})",
            fix=_PIPE_IT,
        ) from None
    kind = describe_destination(mode)
    if kind is not None and not force:
        raise LaunchError(
            f"refusing to write the token to {kind} (stdout): only a pipe or a socket keeps "
            "it off disk, a redirected token stays there in plain text (nothing was minted)",
            fix=f"{_PIPE_IT}; or pass --force if that destination is what you want",
        )


def emit(token: EnrollToken, *, fmt: str, stream: IO[str]) -> None:
    text = render(token, fmt=fmt)  # render fully first: a failure writes nothing
    stream.write(text)
    stream.flush()
