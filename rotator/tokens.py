"""The LinuxGuard enrolment token: parse, validate, expiry, fingerprint, redaction.

A leaf module (imports only ``rotator.errors``), so ``providers`` may use it.

Normalisation (documented in the README, "Token format"):

* surrounding whitespace is stripped (tokens pasted from a console or read from a
  file often carry a newline); whitespace *inside* the token is an error;
* lowercase is accepted and upper-cased: base32 (RFC 4648) is case-insensitive,
  and LinuxGuard compares tokens case-insensitively;
* dashes are accepted only as separators between groups of four characters (the
  last group may be shorter) and are removed: the canonical form is the bare
  upper-case base32 string, 24-32 characters. That canonical form is what is
  stored, delivered and fingerprinted, so a token keeps one fingerprint however it
  was formatted.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from rotator.errors import TokenExpiredError, TokenFormatError, TokenTenantError

MIN_LENGTH = 24
MAX_LENGTH = 32
_BASE32 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")
_GROUPED = re.compile(r"[A-Z2-7]{4}(?:-[A-Z2-7]{4})*(?:-[A-Z2-7]{1,4})?")
# Anything that looks like a token, for the log redaction filter (second line of
# defence): 24-32 base32 characters, bare or in dash groups, not inside a longer word.
TOKEN_SHAPED = re.compile(
    r"(?<![A-Za-z0-9])(?:[A-Za-z2-7]{4}-){5,7}[A-Za-z2-7]{1,4}(?![A-Za-z0-9])"
    r"|(?<![A-Za-z0-9])[A-Z2-7]{24,32}(?![A-Za-z0-9])"
)
REDACTED = "<redacted>"


class Secret:
    """A string that will not show itself by accident.

    ``repr``, ``str`` and ``format`` are redacted; pickling is refused; the value is
    reached only through :meth:`reveal`, which makes every use greppable.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({REDACTED!r})"

    def __str__(self) -> str:
        return REDACTED

    def __format__(self, format_spec: str) -> str:
        return REDACTED

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(("Secret", fingerprint(self._value)))

    def __reduce__(self) -> NoReturn:
        raise TypeError("Secret values cannot be pickled")

    def __len__(self) -> int:
        return len(self._value)


def fingerprint(value: str) -> str:
    """SHA-256 hex digest of a canonical token value (safe for annotations and output)."""
    return hashlib.sha256(value.encode("ascii")).hexdigest()


def normalize(raw: str) -> Secret:
    """Validate a token as LinuxGuard prints it and return its canonical form.

    Error messages describe the problem (length, position of a bad character)
    without ever quoting the value.
    """
    text = raw.strip()
    for position, char in enumerate(text, start=1):
        # Before upper(): "ß".upper() is "SS" and the dotless i upper-cases to "I": they would turn
        # a foreign string into a valid-looking token.
        if not char.isascii():
            raise TokenFormatError(
                f"the token has a character outside base32 (A-Z, 2-7) at position {position}",
                fix="use the token exactly as LinuxGuard issued it",
            )
    text = text.upper()
    if not text:
        raise TokenFormatError(
            "the token is empty",
            fix="check where the token came from (LinuxGuard answer, store record)",
        )
    if "-" in text:
        if not _GROUPED.fullmatch(text):
            raise TokenFormatError(
                "the token's dashes are misplaced: dashes may only separate groups of four",
                fix="use the token exactly as LinuxGuard issued it",
            )
        text = text.replace("-", "")
    for position, char in enumerate(text, start=1):
        if char not in _BASE32:
            kind = "whitespace" if char.isspace() else "a character outside base32 (A-Z, 2-7)"
            raise TokenFormatError(
                f"the token has {kind} at position {position}",
                fix="use the token exactly as LinuxGuard issued it",
            )
    if not MIN_LENGTH <= len(text) <= MAX_LENGTH:
        raise TokenFormatError(
            f"the token has {len(text)} base32 characters; LinuxGuard tokens have "
            f"{MIN_LENGTH}-{MAX_LENGTH}",
            fix="use the token exactly as LinuxGuard issued it",
        )
    return Secret(text)


def utcnow() -> datetime:
    return datetime.now(UTC)


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset) into an aware UTC datetime."""
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if value.tzinfo is None:
        raise ValueError("timestamp has no time zone")
    return value.astimezone(UTC)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` and whole seconds, as annotations carry it."""
    return value.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, kw_only=True)
class EnrollToken:
    """A validated token with its tenant and expiry. Its repr is redacted."""

    value: Secret
    tenant_id: str
    expires_at: datetime

    @classmethod
    def parse(cls, *, value: str, tenant_id: str, expires_at: datetime | str) -> EnrollToken:
        if not tenant_id or not tenant_id.strip():
            raise TokenTenantError(
                "the token carries no tenant ID",
                fix="LinuxGuard rejects TOTP enrolment without a tenant; pass --tenant",
            )
        if isinstance(expires_at, str):
            try:
                expires_at = parse_timestamp(expires_at)
            except ValueError as exc:
                raise TokenFormatError(
                    "the token's expiry is not an RFC 3339 timestamp",
                    fix="check the LinuxGuard API version (expiresAt must be RFC 3339)",
                ) from exc
        elif expires_at.tzinfo is None:
            raise TokenFormatError("the token's expiry has no time zone")
        return cls(value=normalize(value), tenant_id=tenant_id.strip(), expires_at=expires_at)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.value.reveal())

    @property
    def short_fingerprint(self) -> str:
        """The first 12 hex digits: enough to tell tokens apart in a table."""
        return self.fingerprint[:12]

    def ttl_left(self, *, now: datetime | None = None) -> timedelta:
        return self.expires_at - (now or utcnow())

    def is_expired(self, *, now: datetime | None = None) -> bool:
        return self.ttl_left(now=now) <= timedelta(0)

    def check_usable(
        self, *, tenant_id: str, min_ttl: timedelta, now: datetime | None = None
    ) -> None:
        """Raise unless this token belongs to ``tenant_id`` and has ``min_ttl`` left."""
        if self.tenant_id != tenant_id:
            raise TokenTenantError(
                f"the token belongs to tenant {self.tenant_id!r}, not {tenant_id!r}",
                fix="check --tenant and the LinuxGuard API key's tenant",
            )
        left = self.ttl_left(now=now)
        if left <= timedelta(0):
            raise TokenExpiredError(
                f"the token {self.short_fingerprint} expired {format_timestamp(self.expires_at)}",
                fix="mint a fresh token (lg-rotate rotate)",
            )
        if left < min_ttl:
            raise TokenExpiredError(
                f"the token {self.short_fingerprint} has {int(left.total_seconds())}s left, "
                f"less than the minimum of {int(min_ttl.total_seconds())}s",
                fix="mint a fresh token, or lower --min-ttl",
            )
