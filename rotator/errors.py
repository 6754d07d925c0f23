"""One error hierarchy for lg-rotate; every class knows its exit code.

A leaf module: it imports nothing from the project, so ``providers`` may use it.

Messages are one line, name the cause, and never contain a token value. The
``fix`` is printed after the message so that an operator knows what to do next.
Causes are chained (``raise X(...) from exc``) so ``--debug`` can show them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (README "Exit codes")."""

    OK = 0
    INTERNAL = 1  # a bug: an exception lg-rotate did not expect
    CONFIG = 2  # bad flags, missing or invalid configuration, provider not installed
    LINUXGUARD = 3  # LinuxGuard API unreachable or refused the request
    TOKEN = 4  # a token failed validation (format, tenant, expiry, remaining TTL)
    STORE = 5  # the secrets store failed or refused
    KUBERNETES = 6  # the Kubernetes API failed or refused; rollout did not complete
    LOCK = 7  # another rotation holds the lock for this Secret
    LAUNCH = 8  # exec/emit refused or could not start the command
    CHECK_FAILED = 9  # status --check found the store and target out of sync; audit findings
    INTERRUPTED = 130  # SIGINT / SIGTERM


# What each exit code means, for `lg-rotate --help` (pip users have no README) and the
# README table (tests/test_docs_drift.py keeps them in step).
EXIT_CODE_MEANINGS: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.INTERNAL: "internal error (a bug: please report it)",
    ExitCode.CONFIG: "configuration: bad flags, missing settings, unreadable config file, "
    "provider not installed",
    ExitCode.LINUXGUARD: "LinuxGuard: unreachable after retries, or refused (400/401/403/404)",
    ExitCode.TOKEN: "token rejected: malformed, another tenant's, expired or less than "
    "--min-ttl left",
    ExitCode.STORE: "secrets store: unreachable, permission denied, conflict, unreadable record",
    ExitCode.KUBERNETES: "Kubernetes: API unreachable or refused, rollout not complete in "
    "time; roll found no pods to roll; audit --cluster refused a list it needs",
    ExitCode.LOCK: "lock: another rotation of the same Secret is running (a crashed one is "
    "waited out)",
    ExitCode.LAUNCH: "launch: exec/emit refused or could not start the command",
    ExitCode.CHECK_FAILED: "check failed: status --check found problems, audit found anti-patterns",
    ExitCode.INTERRUPTED: "interrupted",
}


class LgRotateError(Exception):
    """Base of every error lg-rotate raises on purpose."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def one_line(self) -> str:
        """The message and its fix on one line, as the CLI prints it."""
        text = " ".join(self.message.split())
        if self.fix:
            text += f" (fix: {' '.join(self.fix.split())})"
        return text


# --- configuration -------------------------------------------------------------------


class ConfigError(LgRotateError):
    """Flags, environment or configuration file are wrong or incomplete."""

    exit_code = ExitCode.CONFIG


class UnknownProviderError(ConfigError):
    """No built-in or plugin provider has the requested name."""


class ProviderNotInstalledError(ConfigError):
    """The provider exists but its optional dependencies are not installed."""


# --- LinuxGuard (the source) ---------------------------------------------------------


class SourceError(LgRotateError):
    """The LinuxGuard API could not be used to mint a token."""

    exit_code = ExitCode.LINUXGUARD


class SourceUnavailableError(SourceError):
    """Transient failures (5xx, 429, timeouts, connection errors) outlasted the retry budget."""


class SourceRejectedError(SourceError):
    """LinuxGuard gave a final answer (400/401/403/404...)."""

    def __init__(self, message: str, *, status: int, fix: str | None = None) -> None:
        super().__init__(message, fix=fix)
        self.status = status


class TransientSourceError(SourceError):
    """One failed attempt that may succeed when retried (internal to the retry loop)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# --- tokens --------------------------------------------------------------------------


class TokenError(LgRotateError):
    """A token failed validation; it is neither stored nor delivered."""

    exit_code = ExitCode.TOKEN


class TokenFormatError(TokenError):
    """Not a base32 token of 24-32 characters."""


class TokenTenantError(TokenError):
    """The token belongs to another tenant than the one asked for."""


class TokenExpiredError(TokenError):
    """The token has expired or has less TTL left than the configured minimum."""


# --- secrets store (providers) -------------------------------------------------------


class StoreError(LgRotateError):
    """The secrets store failed or refused an operation."""

    exit_code = ExitCode.STORE


class StoreUnavailableError(StoreError):
    """The store could not be reached, or kept failing transiently."""


class StorePermissionError(StoreError):
    """The store refused: authentication or authorisation failed."""


class StoreConflictError(StoreError):
    """A concurrent writer changed the record (check-and-set, etag, stage mismatch)."""


class StoreDataError(StoreError):
    """The stored record is unreadable or not a lg-rotate record."""


# --- Kubernetes (the target) ---------------------------------------------------------


class TargetError(LgRotateError):
    """Delivering to the target failed."""

    exit_code = ExitCode.KUBERNETES


class KubernetesError(TargetError):
    """The Kubernetes API failed or refused."""


class CertificateError(KubernetesError):
    """The webhook's self-managed serving certificates cannot be kept (Secret, caBundle).

    Messages name objects and fingerprints only, never a certificate or key body.
    """


class RolloutTimeoutError(KubernetesError):
    """A restart or roll did not complete within its timeout."""


# --- lock, launch, checks ------------------------------------------------------------


class LockError(LgRotateError):
    """Another rotation holds the lock for this target."""

    exit_code = ExitCode.LOCK


class LaunchError(LgRotateError):
    """``exec`` / ``emit`` refused or could not start the command."""

    exit_code = ExitCode.LAUNCH


class CheckFailedError(LgRotateError):
    """A check (``status --check``, ``audit``) found problems."""

    exit_code = ExitCode.CHECK_FAILED
