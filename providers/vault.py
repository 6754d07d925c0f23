"""HashiCorp Vault / OpenBao KV v2 provider.

Each tenant's records live in one KV v2 secret (``<mount>/data/<path>``); every write
is a new version made with check-and-set, so history is never overwritten blindly.
The two stages are pointers kept in the secret's ``custom_metadata``::

    lg-rotate-current = "<version>"    lg-rotate-pending = "<version>"

``custom_metadata`` is replaced whole on every update, so pointer updates read the
metadata, change only these keys and write it back; on OpenBao the write carries
``metadata_cas`` (its metadata check-and-set), elsewhere the field is ignored.

Authentication: a token (``--vault-token-file`` or ``VAULT_TOKEN``, never a flag
value), AppRole, or Kubernetes service-account login. A provider built by
``from_options`` logs in on first use and once more when Vault refuses a token that
may have expired. hvac (and requests) are imported only inside the methods that
need them, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from providers.base import (
    RECORD_SCHEMA,
    ProviderOption,
    Stage,
    StoredRecord,
    record_from_payload,
    record_payload,
    render_template,
)
from rotator.errors import (
    ConfigError,
    StoreConflictError,
    StoreDataError,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from rotator.tokens import EnrollToken, parse_timestamp, utcnow

if TYPE_CHECKING:
    import hvac

logger = logging.getLogger("lg_rotate.vault")

DEFAULT_MOUNT = "secret"
DEFAULT_PATH_TEMPLATE = "linuxguard/<tenant>"
DEFAULT_JWT_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/token"
CURRENT_KEY = "lg-rotate-current"
PENDING_KEY = "lg-rotate-pending"
_STAGE_KEYS = {Stage.CURRENT: CURRENT_KEY, Stage.PENDING: PENDING_KEY}
AUTH_METHODS = ("token", "approle", "kubernetes")

T = TypeVar("T")


# --- authentication ------------------------------------------------------------------


class VaultLogin(Protocol):
    """How a provider gets its Vault token. ``login`` sets ``client.token``."""

    method: ClassVar[str]

    def login(self, client: hvac.Client) -> None: ...


@dataclass(frozen=True, kw_only=True)
class TokenLogin:
    """A ready token from a file (``--vault-token-file``) or ``VAULT_TOKEN``."""

    method: ClassVar[str] = "token"
    token_file: Path | None = None

    def login(self, client: hvac.Client) -> None:
        if self.token_file is not None:
            token = _read_secret_file(self.token_file, what="Vault token file")
        else:
            token = os.environ.get("VAULT_TOKEN", "").strip()
            if not token:
                raise ConfigError(
                    "no Vault token: VAULT_TOKEN is not set",
                    fix="set VAULT_TOKEN, pass --vault-token-file, "
                    "or use --vault-auth approle|kubernetes",
                )
        client.token = token


@dataclass(frozen=True, kw_only=True)
class AppRoleLogin:
    """AppRole: role ID from an option, secret ID from a file or ``VAULT_SECRET_ID``."""

    method: ClassVar[str] = "approle"
    role_id: str
    secret_id_file: Path | None = None
    mount: str = "approle"

    def login(self, client: hvac.Client) -> None:
        if self.secret_id_file is not None:
            secret_id = _read_secret_file(self.secret_id_file, what="AppRole secret ID file")
        else:
            secret_id = os.environ.get("VAULT_SECRET_ID", "").strip()
            if not secret_id:
                raise ConfigError(
                    "no AppRole secret ID: VAULT_SECRET_ID is not set",
                    fix="pass --vault-secret-id-file or set VAULT_SECRET_ID",
                )
        client.auth.approle.login(role_id=self.role_id, secret_id=secret_id, mount_point=self.mount)


@dataclass(frozen=True, kw_only=True)
class KubernetesLogin:
    """Kubernetes auth with the pod's service-account token (re-read at every login)."""

    method: ClassVar[str] = "kubernetes"
    role: str
    jwt_file: Path = Path(DEFAULT_JWT_FILE)
    mount: str = "kubernetes"

    def login(self, client: hvac.Client) -> None:
        jwt = _read_secret_file(self.jwt_file, what="service-account token file")
        client.auth.kubernetes.login(role=self.role, jwt=jwt, mount_point=self.mount)


def _read_secret_file(path: Path, *, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the {what} {path} ({type(exc).__name__})",
            fix=f"check that {path} exists and is readable by lg-rotate",
        ) from None  # the OS message names only the path, but keep secrets' files quiet
    if not value:
        raise ConfigError(f"the {what} {path} is empty", fix=f"write the credential to {path}")
    return value


# --- the metadata we read ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Metadata:
    exists: bool
    current_version: int = 0
    metadata_version: int | None = None  # OpenBao's metadata check-and-set counter
    custom: Mapping[str, str] | None = None
    versions: Mapping[int, Mapping[str, Any]] | None = None

    def pointer(self, key: str, *, where: str) -> int | None:
        raw = (self.custom or {}).get(key)
        if raw in (None, ""):
            return None
        try:
            return int(str(raw))
        except ValueError:
            raise StoreDataError(
                f"the stage pointer {key}={raw!r} at {where} is not a version number",
                fix=f"fix or remove {key} in the secret's custom_metadata",
            ) from None

    def is_live(self, version: int) -> bool:
        info = (self.versions or {}).get(version)
        if info is None or info.get("destroyed"):
            return False
        deleted_at = info.get("deletion_time") or ""
        if not deleted_at:
            return True
        # delete_version_after schedules deletions in the future.
        return _timestamp_after_now(str(deleted_at))

    def live_versions(self) -> list[int]:
        return sorted(v for v in (self.versions or {}) if self.is_live(v))


def _timestamp_after_now(text: str) -> bool:
    try:
        moment: datetime = parse_timestamp(text)
    except ValueError:
        return False
    return moment > utcnow()


# --- the provider --------------------------------------------------------------------


class VaultProvider:
    """Token records in a Vault/OpenBao KV v2 secret, one secret per tenant."""

    name: ClassVar[str] = "vault"
    summary: ClassVar[str] = (
        "HashiCorp Vault / OpenBao KV v2 (check-and-set versions, stages in custom_metadata)"
    )
    extra: ClassVar[str | None] = "vault"
    sdk_modules: ClassVar[tuple[str, ...]] = ("hvac",)
    options: ClassVar[tuple[ProviderOption, ...]] = (
        ProviderOption(
            name="vault-addr",
            help="Vault address, e.g. https://vault.example:8200",
            env=("VAULT_ADDR",),
            required=True,
        ),
        ProviderOption(
            name="vault-namespace",
            help="Vault Enterprise / OpenBao namespace",
            env=("VAULT_NAMESPACE",),
        ),
        ProviderOption(
            name="vault-cacert",
            help="CA bundle (PEM file) that signed Vault's TLS certificate",
            env=("VAULT_CACERT",),
        ),
        ProviderOption(name="vault-mount", help="KV v2 mount path", default=DEFAULT_MOUNT),
        ProviderOption(
            name="vault-path",
            help="secret path inside the mount; <tenant> is replaced",
            default=DEFAULT_PATH_TEMPLATE,
        ),
        ProviderOption(
            name="vault-auth",
            help="authentication method: token, approle or kubernetes",
            default="token",
        ),
        ProviderOption(
            name="vault-token-file",
            help="file holding the Vault token (token auth; else VAULT_TOKEN is used)",
            secret=True,
        ),
        ProviderOption(name="vault-role-id", help="AppRole role ID (approle auth)", secret=True),
        ProviderOption(
            name="vault-secret-id-file",
            help="file holding the AppRole secret ID (else VAULT_SECRET_ID is used)",
            secret=True,
        ),
        ProviderOption(
            name="vault-auth-mount",
            help="auth method mount path (default: approle or kubernetes, per method)",
        ),
        ProviderOption(name="vault-role", help="Vault role for kubernetes auth"),
        ProviderOption(
            name="vault-jwt-file",
            help="service-account token for kubernetes auth",
            default=DEFAULT_JWT_FILE,
            secret=True,
        ),
    )

    def __init__(
        self,
        *,
        client: hvac.Client | None = None,
        addr: str | None = None,
        namespace: str | None = None,
        verify: bool | str = True,
        timeout: float = 10.0,
        login: VaultLogin | None = None,
        mount: str = DEFAULT_MOUNT,
        path_template: str = DEFAULT_PATH_TEMPLATE,
        cas_attempts: int = 5,
        transient_attempts: int = 3,
    ) -> None:
        """Use an injected hvac ``client`` as is, or build one for ``addr`` on first use.

        ``login`` (token, AppRole, Kubernetes) runs on first use and again once when
        Vault answers 403, in case the token expired. With neither an injected client
        nor a login, the client keeps whatever token hvac finds (``VAULT_TOKEN``).
        """
        if client is None and not addr:
            raise ConfigError(
                "the vault provider needs an address",
                fix="pass --vault-addr or set VAULT_ADDR",
            )
        if not mount.strip("/"):
            raise ConfigError("the Vault mount is empty", fix="pass --vault-mount, e.g. secret")
        self._client_obj = client
        self._addr = (addr or str(client.url if client is not None else "")).rstrip("/")
        self._namespace = namespace or None
        self._verify = verify
        self._timeout = timeout
        self._login = login
        self._logged_in = login is None
        self._mount_checked = False
        self.mount = mount.strip("/")
        self.path_template = path_template
        self._cas_attempts = max(cas_attempts, 1)
        self._transient_attempts = max(transient_attempts, 1)

    def __repr__(self) -> str:
        auth = self._login.method if self._login is not None else "client"
        return f"VaultProvider(addr={self._addr!r}, mount={self.mount!r}, auth={auth!r})"

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> VaultProvider:
        def get(key: str) -> str | None:
            value = options.get(key)
            if value is None or not str(value).strip():
                return next((o.default for o in cls.options if o.key == key), None)
            return str(value).strip()

        addr = get("vault_addr")
        if not addr:
            raise ConfigError(
                "the vault provider needs --vault-addr",
                fix="pass --vault-addr, set LG_ROTATE_VAULT_ADDR or VAULT_ADDR",
            )
        cacert = get("vault_cacert")
        if cacert and not Path(cacert).exists():
            raise ConfigError(
                f"the Vault CA bundle {cacert} does not exist",
                fix="pass --vault-cacert / VAULT_CACERT with the path of a PEM file",
            )
        return cls(
            addr=addr,
            namespace=get("vault_namespace"),
            verify=cacert or True,
            login=_login_from_options(get),
            mount=get("vault_mount") or DEFAULT_MOUNT,
            path_template=get("vault_path") or DEFAULT_PATH_TEMPLATE,
        )

    # --- the Provider protocol -------------------------------------------------------

    def location(self, *, tenant: str) -> str:
        namespace = f"{self._namespace.strip('/')}/" if self._namespace else ""
        return f"vault:{self._addr}/{namespace}{self.mount}/{self._path(tenant)}"

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        path = self._path(tenant)
        where = self.location(tenant=tenant)
        for attempt in range(1, self._cas_attempts + 1):
            meta = self._metadata(path)
            existing = self._find_rotation(path, meta, rotation_id=rotation_id, where=where)
            if existing is not None:
                if existing.token.value != token.value:
                    raise StoreConflictError(
                        f"rotation {rotation_id} already stored a different token at {where} "
                        f"(version {existing.version})",
                        fix="start a new rotation (a new rotation id)",
                    )
                logger.info(
                    "rotation %s already stored version %s at %s; reusing it",
                    rotation_id,
                    existing.version,
                    where,
                )
                number = int(existing.version)
                if meta.pointer(CURRENT_KEY, where=where) != number:
                    self._set_pending(path, number, where=where)
                return _at(existing, Stage.PENDING)
            stored_at = utcnow()
            payload = record_payload(token=token, rotation_id=rotation_id, stored_at=stored_at)
            version = self._write_version(path, payload, cas=meta.current_version)
            if version is None:
                logger.info(
                    "check-and-set conflict at %s (expected version %s, attempt %s/%s); re-reading",
                    where,
                    meta.current_version,
                    attempt,
                    self._cas_attempts,
                )
                continue
            # DEBUG: the rotation logs the stored version itself (once, with the fingerprint)
            logger.debug("stored version %s at %s (rotation %s)", version, where, rotation_id)
            self._set_pending(path, version, where=where)
            return StoredRecord(
                token=token,
                rotation_id=rotation_id,
                version=str(version),
                stage=Stage.PENDING,
                stored_at=stored_at,
            )
        raise StoreConflictError(
            f"{where} kept changing under concurrent writers ({self._cas_attempts} check-and-set "
            "conflicts in a row)",
            fix="make sure only one rotation runs per tenant (the rotation lock), then retry",
        )

    def promote(self, *, tenant: str, version: str) -> None:
        path = self._path(tenant)
        where = self.location(tenant=tenant)
        try:
            number = int(version)
        except ValueError:
            raise StoreConflictError(f"{where} has no version {version!r} to promote") from None

        def plan(meta: _Metadata) -> dict[str, str | None]:
            if not meta.exists or not meta.is_live(number):
                raise StoreConflictError(
                    f"{where} has no live version {number} to promote",
                    fix="the version was deleted, destroyed or never written; rotate again",
                )
            changes: dict[str, str | None] = {CURRENT_KEY: str(number)}
            pending = meta.pointer(PENDING_KEY, where=where)
            if pending is not None and pending <= number:
                changes[PENDING_KEY] = None
            return changes

        self._update_pointers(path, plan, where=where)
        logger.info("promoted version %s to current at %s", number, where)

    def check(self, *, tenant: str) -> None:
        """Before a mint: Vault is reachable, the login works, the mount is KV v2 and the
        secret's metadata is readable; then the token's write capabilities on the data and
        metadata paths, as ``sys/capabilities-self`` reports them (nothing is written).

        A token that may not ask ``sys/capabilities-self`` (no ``default`` policy) skips
        that second part: the writes themselves will tell.
        """
        path = self._path(tenant)
        meta = self._metadata(path)
        needed = {
            f"{self.mount}/data/{path}": ("update" if meta.exists else "create", "read"),
            f"{self.mount}/metadata/{path}": ("read", "update"),
        }
        client = self._client()
        try:
            answer = self._retrying(
                lambda: client.adapter.post(
                    "/v1/sys/capabilities-self", json={"paths": list(needed)}
                )
            )
        except Exception as exc:  # an optional check: it never fails the run itself
            logger.debug("cannot ask Vault for this token's capabilities (%s)", type(exc).__name__)
            return
        granted = answer.get("data") if isinstance(answer, Mapping) else None
        if not isinstance(granted, Mapping):
            granted = answer if isinstance(answer, Mapping) else {}
        missing = [
            f"{capability} on {where}"
            for where, capabilities in needed.items()
            for capability in capabilities
            if "root" not in (granted.get(where) or ())
            and capability not in (granted.get(where) or ())
        ]
        if missing:
            raise StorePermissionError(
                f"Vault's policies for this token do not allow {', '.join(missing)} "
                f"(checked before minting; nothing was written to {self.location(tenant=tenant)})",
                fix=self._policy_fix(path),
            )

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        path = self._path(tenant)
        where = self.location(tenant=tenant)
        meta = self._metadata(path)
        if not meta.exists:
            logger.debug("no secret at %s", where)
            return None
        number = meta.pointer(_STAGE_KEYS[stage], where=where)
        if number is None:
            logger.debug("no %s version at %s", stage.value, where)
            return None
        payload = self._read_version(path, number)
        if payload is None:
            logger.warning(
                "the %s pointer at %s names version %s, which is deleted or destroyed",
                stage.value,
                where,
                number,
            )
            return None
        logger.debug("read %s version %s at %s", stage.value, number, where)
        return record_from_payload(payload, version=str(number), stage=stage, where=where)

    def prune(self, *, tenant: str, keep: int) -> int:
        if keep < 0:
            raise ConfigError(f"cannot keep {keep} versions", fix="keep 0 or more versions")
        path = self._path(tenant)
        where = self.location(tenant=tenant)
        meta = self._metadata(path)
        if not meta.exists:
            return 0
        protected = {meta.pointer(CURRENT_KEY, where=where), meta.pointer(PENDING_KEY, where=where)}
        live = meta.live_versions()
        doomed = [v for v in live[: max(len(live) - keep, 0)] if v not in protected]
        if not doomed:
            return 0
        self._call(
            f"destroying versions {doomed} of",
            path,
            lambda c: c.secrets.kv.v2.destroy_secret_versions(
                path=path, versions=doomed, mount_point=self.mount
            ),
            kind="destroy",
        )
        logger.info("destroyed versions %s at %s (keeping %s)", doomed, where, keep)
        return len(doomed)

    # --- KV v2 building blocks -------------------------------------------------------

    def _path(self, tenant: str) -> str:
        if not tenant or "/" in tenant or tenant.strip() in (".", "..") or tenant != tenant.strip():
            raise ConfigError(
                f"the tenant {tenant!r} cannot be used in a Vault path",
                fix="use a tenant ID without slashes or surrounding whitespace",
            )
        path = render_template(self.path_template, tenant=tenant).strip("/")
        segments = path.split("/")
        if not path or any(s in ("", ".", "..") for s in segments):
            raise ConfigError(
                f"the Vault path template {self.path_template!r} gives an invalid path {path!r}",
                fix="pass --vault-path like linuxguard/<tenant>",
            )
        return path

    def _metadata(self, path: str) -> _Metadata:
        import hvac.exceptions

        try:
            response = self._call(
                "reading metadata of",
                path,
                lambda c: c.secrets.kv.v2.read_secret_metadata(path=path, mount_point=self.mount),
                kind="metadata",
                passthrough=(hvac.exceptions.InvalidPath,),
            )
        except hvac.exceptions.InvalidPath:
            return _Metadata(exists=False)
        data = _data_of(response, what=f"metadata of {self.mount}/{path}")
        versions: dict[int, Mapping[str, Any]] = {}
        for key, info in (data.get("versions") or {}).items():
            try:
                versions[int(key)] = info if isinstance(info, Mapping) else {}
            except ValueError:
                continue
        custom = data.get("custom_metadata") or {}
        metadata_version = data.get("current_metadata_version")
        return _Metadata(
            exists=True,
            current_version=int(data.get("current_version") or 0),
            metadata_version=int(metadata_version) if metadata_version is not None else None,
            custom={str(k): str(v) for k, v in custom.items()},
            versions=versions,
        )

    def _read_version(self, path: str, version: int) -> Mapping[str, Any] | None:
        """The data of ``version``, or None when it is deleted, destroyed or gone."""
        import hvac.exceptions

        try:
            response = self._call(
                f"reading version {version} of",
                path,
                lambda c: c.secrets.kv.v2.read_secret_version(
                    path=path,
                    version=version,
                    mount_point=self.mount,
                    raise_on_deleted_version=False,
                ),
                kind="data",
                passthrough=(hvac.exceptions.InvalidPath,),
            )
        except hvac.exceptions.InvalidPath:  # destroyed versions and unknown ones answer 404
            return None
        data = _data_of(response, what=f"version {version} of {self.mount}/{path}")
        payload = data.get("data")
        return payload if isinstance(payload, Mapping) else None

    def _write_version(self, path: str, payload: Mapping[str, str], *, cas: int) -> int | None:
        """Write a new version with check-and-set; None on a check-and-set conflict."""
        import hvac.exceptions

        try:
            response = self._call(
                "writing",
                path,
                lambda c: c.secrets.kv.v2.create_or_update_secret(
                    path=path, secret=dict(payload), cas=cas, mount_point=self.mount
                ),
                kind="data",
                passthrough=(hvac.exceptions.InvalidRequest,),
            )
        except hvac.exceptions.InvalidRequest as exc:
            if _is_cas_conflict(exc):
                return None
            raise StoreError(
                f"Vault refused to write {self.mount}/{path} ({_reason(exc)})",
                fix="check the mount's KV v2 settings (cas_required, max_versions)",
            ) from exc
        # KV v1 answers 204 with no body (and would have stored the record unversioned).
        data = response.get("data") if isinstance(response, Mapping) else None
        version = data.get("version") if isinstance(data, Mapping) else None
        if not isinstance(version, int):
            raise ConfigError(
                f"Vault's answer to a write at {self.mount}/{path} carries no version: "
                f"{self.mount} is not a KV v2 mount",
                fix=f"enable KV v2 (bao secrets enable -path={self.mount} kv-v2) or pass "
                "--vault-mount with a KV v2 mount",
            )
        return version

    def _find_rotation(
        self, path: str, meta: _Metadata, *, rotation_id: str, where: str
    ) -> StoredRecord | None:
        """The version a rotation already wrote (pending, latest or current), if any.

        A retry comes right after its own write, so these three cover it without reading
        the whole history.

        Also refuses to bury a secret that lg-rotate did not write under a new version.
        """
        if not meta.exists:
            return None
        candidates: list[int] = []
        for number in (
            meta.pointer(PENDING_KEY, where=where),
            meta.current_version,
            meta.pointer(CURRENT_KEY, where=where),
        ):
            if number and number not in candidates and meta.is_live(number):
                candidates.append(number)
        for number in candidates:
            payload = self._read_version(path, number)
            if payload is None:
                continue
            if number == meta.current_version and payload.get("schema") != RECORD_SCHEMA:
                raise StoreDataError(
                    f"the latest version ({number}) at {where} is not a lg-rotate record",
                    fix="point --vault-path at a path lg-rotate owns, or delete that secret",
                )
            if payload.get("rotationId") == rotation_id:
                return record_from_payload(
                    payload, version=str(number), stage=Stage.PENDING, where=where
                )
        return None

    def _set_pending(self, path: str, version: int, *, where: str) -> None:
        self._update_pointers(path, lambda meta: {PENDING_KEY: str(version)}, where=where)
        logger.debug("marked version %s pending at %s", version, where)

    def _update_pointers(
        self,
        path: str,
        plan: Callable[[_Metadata], Mapping[str, str | None]],
        *,
        where: str,
    ) -> None:
        """Read-modify-write of custom_metadata, keeping keys lg-rotate does not own."""
        import hvac.exceptions

        for _ in range(self._cas_attempts):
            meta = self._metadata(path)
            custom = dict(meta.custom or {})
            for key, value in plan(meta).items():
                if value is None:
                    custom.pop(key, None)
                else:
                    custom[key] = value
            if meta.exists and custom == dict(meta.custom or {}):
                return
            body: dict[str, Any] = {"custom_metadata": custom}
            if meta.metadata_version is not None:
                body["metadata_cas"] = meta.metadata_version
            try:
                self._call(
                    "updating metadata of",
                    path,
                    partial(_post_metadata, mount=self.mount, path=path, body=body),
                    kind="metadata",
                    passthrough=(hvac.exceptions.InvalidRequest,),
                )
            except hvac.exceptions.InvalidRequest as exc:
                if _is_cas_conflict(exc):
                    logger.debug("metadata check-and-set conflict at %s; re-reading", where)
                    continue
                raise StoreError(
                    f"Vault refused the stage pointers at {where} ({_reason(exc)})",
                    fix="check the mount's KV v2 settings",
                ) from exc
            return
        raise StoreConflictError(
            f"the stage pointers at {where} kept changing under concurrent writers",
            fix="make sure only one rotation runs per tenant (the rotation lock), then retry",
        )

    # --- the client, login, retries and error translation ----------------------------

    def _client(self) -> hvac.Client:
        if self._client_obj is None:
            import hvac

            # token="" keeps hvac from picking up ~/.vault-token behind our back.
            self._client_obj = hvac.Client(
                url=self._addr,
                token="" if self._login is not None else None,
                namespace=self._namespace,
                verify=self._verify,
                timeout=self._timeout,
            )
        client = self._client_obj
        if not self._logged_in:
            self._do_login(client)
        if not self._mount_checked:
            self._check_mount(client)
        return client

    def _do_login(self, client: hvac.Client) -> None:
        assert self._login is not None
        login = self._login
        mount = getattr(login, "mount", login.method)
        try:
            self._retrying(lambda: login.login(client))
        except (StoreError, ConfigError):
            raise
        except Exception as exc:
            translated = self._translate(
                exc, what="logging in at", path=f"auth/{mount}", kind="auth"
            )
            if isinstance(translated, StoreUnavailableError | ConfigError):
                raise translated from exc
            raise StorePermissionError(
                f"Vault {login.method} login at auth/{mount} failed ({_reason(exc)})",
                fix=_login_fix(login),
            ) from exc
        self._logged_in = True
        logger.info("logged in to %s with %s auth (mount auth/%s)", self._addr, login.method, mount)

    def _check_mount(self, client: hvac.Client) -> None:
        """Fail early and clearly when the mount is missing or not KV v2."""
        import hvac.exceptions

        try:
            response = self._retrying(
                lambda: client.adapter.get(f"/v1/sys/internal/ui/mounts/{self.mount}")
            )
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidPath):
            # Ambiguous (no access, or no such mount): the data paths will tell.
            self._mount_checked = True
            return
        except Exception as exc:
            raise self._translate(
                exc,
                what="checking the mount",
                path=f"sys/internal/ui/mounts/{self.mount}",
                kind="auth",
            ) from exc
        data = response.get("data") if isinstance(response, Mapping) else None
        if isinstance(data, Mapping):
            kind = data.get("type")
            version = (data.get("options") or {}).get("version")
            if kind not in ("kv", "generic") or str(version) != "2":
                raise ConfigError(
                    f"the Vault mount {self.mount} is {kind or 'unknown'} "
                    f"(version {version or 1}), not KV v2",
                    fix=f"enable KV v2 (bao secrets enable -path={self.mount} kv-v2) or pass "
                    "--vault-mount with a KV v2 mount",
                )
        self._mount_checked = True

    def _call(
        self,
        what: str,
        path: str,
        operation: Callable[[hvac.Client], T],
        *,
        kind: str,
        passthrough: tuple[type[Exception], ...] = (),
    ) -> T:
        """Run one Vault call: retry transient failures, re-login once on 403, translate."""
        import hvac.exceptions

        relogged = False
        while True:
            client = self._client()
            try:
                return self._retrying(partial(operation, client))
            except hvac.exceptions.Forbidden as exc:
                if self._login is not None and not relogged:
                    logger.info("Vault refused the token at %s; logging in again", self._addr)
                    relogged = True
                    self._logged_in = False
                    continue
                raise self._translate(exc, what=what, path=path, kind=kind) from exc
            except passthrough as exc:
                if _is_missing_mount(exc):
                    raise self._translate(exc, what=what, path=path, kind=kind) from exc
                raise
            except (StoreError, ConfigError):
                raise
            except Exception as exc:
                raise self._translate(exc, what=what, path=path, kind=kind) from exc

    def _retrying(self, operation: Callable[[], T]) -> T:
        """A few quick, bounded retries on transient failures (sealed, 5xx, network)."""
        from tenacity import (
            Retrying,
            retry_if_exception,
            stop_after_attempt,
            wait_exponential,
            wait_random,
        )

        def log_retry(state: Any) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.debug(
                "Vault at %s failed transiently (%s); retry %s/%s",
                self._addr,
                type(exc).__name__,
                state.attempt_number,
                self._transient_attempts - 1,
            )

        retrying = Retrying(
            stop=stop_after_attempt(self._transient_attempts),
            wait=wait_exponential(multiplier=0.1, max=1.0) + wait_random(0, 0.1),
            retry=retry_if_exception(_is_transient),
            before_sleep=log_retry,
            reraise=True,
        )
        return retrying(operation)

    def _translate(
        self, exc: BaseException, *, what: str, path: str, kind: str = "data"
    ) -> StoreError | ConfigError:
        """The lg-rotate error for an hvac/requests failure (messages name no secret)."""
        import hvac.exceptions
        import requests

        target = f"{self.mount}/{kind}/{path}" if kind != "auth" else path
        if isinstance(exc, requests.exceptions.SSLError):
            return ConfigError(
                f"TLS verification of Vault at {self._addr} failed while {what} {target}",
                fix="pass --vault-cacert / VAULT_CACERT with the CA that signed Vault's "
                "certificate",
            )
        if _is_transient(exc) or isinstance(
            exc, requests.exceptions.RequestException | hvac.exceptions.VaultNotInitialized
        ):
            return StoreUnavailableError(
                f"Vault at {self._addr} is unavailable ({_reason(exc)}) while {what} {target}, "
                f"after {self._transient_attempts} attempts",
                fix="check --vault-addr / VAULT_ADDR, the network path, and that Vault is "
                "unsealed and active",
            )
        if isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
            return StorePermissionError(
                f"Vault denied {what} {target} ({_reason(exc)})",
                fix=self._policy_fix(path),
            )
        if _is_missing_mount(exc):
            return ConfigError(
                f"Vault has no KV v2 mount at {self.mount}/ ({_reason(exc)})",
                fix=f"enable it (bao secrets enable -path={self.mount} kv-v2) or pass "
                "--vault-mount with an existing KV v2 mount",
            )
        return StoreError(
            f"Vault failed while {what} {target} ({_reason(exc)})",
            fix="see the Vault server log for this request",
        )

    def _policy_fix(self, path: str) -> str:
        m = self.mount
        return (
            "check that the token is valid, then grant its policy: "
            f'path "{m}/data/{path}" {{ capabilities = ["create", "update", "read"] }}, '
            f'path "{m}/metadata/{path}" {{ capabilities = ["read", "update"] }}, '
            f'path "{m}/destroy/{path}" {{ capabilities = ["update"] }}'
        )


def _login_from_options(get: Callable[[str], str | None]) -> VaultLogin:
    method = (get("vault_auth") or "token").lower()
    auth_mount = get("vault_auth_mount")
    if method == "token":
        token_file = get("vault_token_file")
        if token_file is None and not os.environ.get("VAULT_TOKEN", "").strip():
            raise ConfigError(
                "token auth needs a Vault token, and none is configured",
                fix="set VAULT_TOKEN or pass --vault-token-file (never the token itself as a flag)",
            )
        return TokenLogin(token_file=Path(token_file) if token_file else None)
    if method == "approle":
        role_id = get("vault_role_id")
        if not role_id:
            raise ConfigError(
                "approle auth needs --vault-role-id",
                fix="pass --vault-role-id (or LG_ROTATE_VAULT_ROLE_ID)",
            )
        secret_id_file = get("vault_secret_id_file")
        if secret_id_file is None and not os.environ.get("VAULT_SECRET_ID", "").strip():
            raise ConfigError(
                "approle auth needs a secret ID, and none is configured",
                fix="pass --vault-secret-id-file or set VAULT_SECRET_ID",
            )
        return AppRoleLogin(
            role_id=role_id,
            secret_id_file=Path(secret_id_file) if secret_id_file else None,
            mount=(auth_mount or "approle").strip("/"),
        )
    if method == "kubernetes":
        role = get("vault_role")
        if not role:
            raise ConfigError(
                "kubernetes auth needs --vault-role",
                fix="pass --vault-role with the Vault role bound to lg-rotate's service account",
            )
        return KubernetesLogin(
            role=role,
            jwt_file=Path(get("vault_jwt_file") or DEFAULT_JWT_FILE),
            mount=(auth_mount or "kubernetes").strip("/"),
        )
    raise ConfigError(
        f"unknown Vault auth method {method!r}",
        fix=f"pass --vault-auth {' | '.join(AUTH_METHODS)}",
    )


def _login_fix(login: VaultLogin) -> str:
    if isinstance(login, AppRoleLogin):
        return (
            f"check --vault-role-id and the secret ID (unexpired, not used up) for the AppRole "
            f"at auth/{login.mount}"
        )
    if isinstance(login, KubernetesLogin):
        return (
            f"check that Vault role {login.role!r} at auth/{login.mount} binds this service "
            "account and namespace, and that Vault can reach the TokenReview API"
        )
    return "check the Vault token (expired or revoked?)"


def _post_metadata(client: hvac.Client, *, mount: str, path: str, body: Mapping[str, Any]) -> Any:
    # Not hvac's update_metadata: it always sends delete_version_after="0s", which
    # would silently reset a setting the operator chose for this secret.
    return client.adapter.post(f"/v1/{mount}/metadata/{path}", json=dict(body))


def _is_transient(exc: BaseException) -> bool:
    import hvac.exceptions
    import requests

    if isinstance(exc, requests.exceptions.SSLError):
        return False
    return isinstance(
        exc,
        hvac.exceptions.VaultDown  # 503: sealed, standby, or starting
        | hvac.exceptions.InternalServerError
        | hvac.exceptions.BadGateway
        | hvac.exceptions.RateLimitExceeded
        | hvac.exceptions.PreconditionFailed  # 412: a performance standby is catching up
        | requests.exceptions.ConnectionError
        | requests.exceptions.Timeout,
    )


def _is_cas_conflict(exc: BaseException) -> bool:
    return "check-and-set" in " ".join(getattr(exc, "errors", None) or [])


def _is_missing_mount(exc: BaseException) -> bool:
    import hvac.exceptions

    return isinstance(exc, hvac.exceptions.InvalidPath) and "no handler for route" in " ".join(
        exc.errors or []
    )


def _reason(exc: BaseException) -> str:
    """A short, secret-free reason: Vault's error list or the exception type."""
    errors = getattr(exc, "errors", None)
    if errors:
        text = "; ".join(str(e) for e in errors)
        return " ".join(text.split())[:200]
    return type(exc).__name__


def _data_of(response: Any, *, what: str) -> Mapping[str, Any]:
    data = response.get("data") if isinstance(response, Mapping) else None
    if not isinstance(data, Mapping):
        raise StoreError(f"Vault's answer for {what} has no data", fix="check the Vault version")
    return data


def _at(record: StoredRecord, stage: Stage) -> StoredRecord:
    return StoredRecord(
        token=record.token,
        rotation_id=record.rotation_id,
        version=record.version,
        stage=stage,
        stored_at=record.stored_at,
    )
