"""The provider interface: one small protocol every secrets-store adapter implements.

A provider stores token *records* as versions and tracks two stages per tenant:

* ``current``: the version that was last delivered and promoted;
* ``pending``: a version written by a rotation that has not been promoted yet
  (the rotation may still be delivering it, or may have crashed).

The rotation protocol (``rotator.rotation``) is written once on top of these
primitives: ``write_pending`` -> deliver -> ``promote``. Stores with native stages
(AWS) map them directly; the others keep the stage pointers in store metadata.

Providers import only ``rotator.tokens`` and ``rotator.errors`` (the two leaves) and
their own SDK, lazily, inside the methods that need it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar, Protocol, runtime_checkable

from rotator.errors import StoreDataError, TokenError
from rotator.tokens import EnrollToken, format_timestamp, parse_timestamp, utcnow

RECORD_SCHEMA = "lg-rotate/v1"
DEFAULT_KEEP_VERSIONS = 5


class Stage(StrEnum):
    CURRENT = "current"
    PENDING = "pending"


@dataclass(frozen=True, kw_only=True)
class ProviderOption:
    """A setting a provider needs, exposed as ``--NAME`` / ``LG_ROTATE_NAME`` / YAML key.

    ``env`` lists the store's own conventional variables (``VAULT_ADDR`` ...), which
    are honoured after the ``LG_ROTATE_*`` one. Values reach providers as strings.

    ``secret`` marks an option whose value is, or leads to, the store credential (a token
    file, an AppRole role ID, the profile that picks the credentials): ``lg-rotate exec``
    never hands its variables (``LG_ROTATE_<NAME>`` and ``env``) to the command it starts,
    unless asked with ``--pass-env``. Credentials themselves are never options.
    """

    name: str  # flag spelling without the leading dashes, e.g. "vault-mount"
    help: str
    default: str | None = None
    env: tuple[str, ...] = ()
    required: bool = False
    secret: bool = False

    @property
    def env_names(self) -> tuple[str, ...]:
        """Every variable the option is read from: ``LG_ROTATE_<NAME>``, then ``env``."""
        return (f"LG_ROTATE_{self.key.upper()}", *self.env)

    @property
    def key(self) -> str:
        """The Python / YAML key: ``vault-mount`` -> ``vault_mount``."""
        return self.name.replace("-", "_")


@dataclass(frozen=True, kw_only=True)
class StoredRecord:
    """One stored version of a tenant's token. Its repr is redacted (the token's is)."""

    token: EnrollToken
    rotation_id: str
    version: str  # the store's own version id (Vault "7", AWS VersionId, GCP "3")
    stage: Stage | None  # the stage this record was read under, if any
    stored_at: datetime = field(default_factory=utcnow)

    @property
    def fingerprint(self) -> str:
        return self.token.fingerprint


@runtime_checkable
class Provider(Protocol):
    """What the rotator needs from a secrets store. All arguments are keyword-only."""

    name: ClassVar[str]

    def location(self, *, tenant: str) -> str:
        """Where the tenant's record lives, for humans (``vault:secret/linuxguard/acme``)."""
        ...

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        """Store ``token`` as a new version marked pending.

        Idempotent per ``rotation_id``: a retried call for the same rotation returns the
        version already written instead of adding another.
        """
        ...

    def promote(self, *, tenant: str, version: str) -> None:
        """Make ``version`` current (and clear pending). Raises if it does not exist."""
        ...

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        """The record at ``stage``, or ``None`` when the store has none (never an error)."""
        ...

    # Optional (not part of the runtime check, so older plugins still conform):
    # ``check(self, *, tenant: str) -> None`` proves the store reachable and usable for
    # ``tenant`` before a token is minted; see :func:`check_store`.

    def prune(self, *, tenant: str, keep: int) -> int:
        """Retire versions beyond the newest ``keep``, never current or pending.

        Returns how many versions were disabled/destroyed/deleted.
        """
        ...


def check_store(provider: Provider, *, tenant: str) -> None:
    """Prove the store reachable and usable for ``tenant`` before a token is minted.

    Calls the provider's optional ``check(*, tenant)`` (the built-ins have one: a cheap
    call proving reachability, authentication and, where the store can tell without a
    write, permission); a provider without one (a plugin written before it existed) is
    checked by reading its current record. Raises the provider's errors (``StoreError``,
    ``ConfigError``); a missing record is not an error.
    """
    check = getattr(provider, "check", None)
    if callable(check):
        check(tenant=tenant)
    else:
        provider.read(tenant=tenant, stage=Stage.CURRENT)


class ProviderFactory(Protocol):
    """The class-level side of a provider: how the registry describes and builds it."""

    name: ClassVar[str]
    summary: ClassVar[str]
    extra: ClassVar[str | None]  # pip extra that installs the SDK, None if none needed
    sdk_modules: ClassVar[tuple[str, ...]]  # modules that must import for it to work
    options: ClassVar[tuple[ProviderOption, ...]]

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> Provider: ...


# --- the record as stores keep it ----------------------------------------------------


def record_payload(*, token: EnrollToken, rotation_id: str, stored_at: datetime) -> dict[str, str]:
    """The JSON-able record every provider stores (Vault data, AWS SecretString, GCP payload)."""
    return {
        "schema": RECORD_SCHEMA,
        "token": token.value.reveal(),
        "tenantId": token.tenant_id,
        "expiresAt": format_timestamp(token.expires_at),
        "fingerprint": token.fingerprint,
        "rotationId": rotation_id,
        "storedAt": format_timestamp(stored_at),
    }


def record_from_payload(
    payload: Mapping[str, Any], *, version: str, stage: Stage | None, where: str
) -> StoredRecord:
    """Rebuild a record, validating it as strictly as a freshly minted token."""
    try:
        token = EnrollToken.parse(
            value=str(payload["token"]),
            tenant_id=str(payload["tenantId"]),
            expires_at=str(payload["expiresAt"]),
        )
        rotation_id = str(payload["rotationId"])
        stored_at = parse_timestamp(str(payload.get("storedAt") or payload["expiresAt"]))
    except (KeyError, TypeError, ValueError, TokenError) as exc:
        raise StoreDataError(
            f"the record at {where} (version {version}) is not a valid lg-rotate record "
            f"({type(exc).__name__})",
            fix="write a fresh one with lg-rotate rotate, or point the provider at another path",
        ) from None  # the cause may quote the stored value: do not chain it
    if payload.get("fingerprint") not in (None, token.fingerprint):
        raise StoreDataError(
            f"the record at {where} (version {version}) fails its fingerprint check",
            fix="the record was edited by hand or corrupted; rotate to replace it",
        )
    return StoredRecord(
        token=token, rotation_id=rotation_id, version=version, stage=stage, stored_at=stored_at
    )


def record_to_json(*, token: EnrollToken, rotation_id: str, stored_at: datetime) -> str:
    return json.dumps(
        record_payload(token=token, rotation_id=rotation_id, stored_at=stored_at),
        separators=(",", ":"),
        sort_keys=True,
    )


def record_from_json(
    text: str | bytes, *, version: str, stage: Stage | None, where: str
) -> StoredRecord:
    try:
        payload = json.loads(text)
    except ValueError:
        raise StoreDataError(
            f"the record at {where} (version {version}) is not JSON",
            fix="the secret was written by something other than lg-rotate; use another path",
        ) from None  # the decoder's message may quote the stored value
    if not isinstance(payload, dict):
        raise StoreDataError(f"the record at {where} (version {version}) is not a JSON object")
    return record_from_payload(payload, version=version, stage=stage, where=where)


def render_template(template: str, *, tenant: str) -> str:
    """Fill ``<tenant>`` / ``{tenant}`` in a path or name template."""
    return template.replace("<tenant>", tenant).replace("{tenant}", tenant)
