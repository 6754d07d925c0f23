"""Google Cloud Secret Manager provider: one secret per tenant, one version per token.

Layout: the tenant's record lives in ``projects/<project>/secrets/<secret id>`` (secret id
from a template, default ``linuxguard-<tenant>-enroll-token``); every token is a new
*version* whose payload is the lg-rotate JSON record (``providers.base.record_to_json``),
sent with its CRC32C (``data_crc32c``) so Google verifies it on the way in, and checked
against the CRC32C Google returns on the way out.

Stages are *version aliases* on the secret: ``pending`` and ``current`` map to version
numbers. Aliases rather than labels because:

* ``AccessSecretVersion`` reads an alias directly (``.../versions/current``): a read is one
  call, and the version it answers with is the one the alias pointed at *at that moment*
  (a label would need a ``GetSecret`` then an access, which can race a promotion);
* an alias points at a version by number and both aliases change in one ``UpdateSecret``
  (``update_mask: version_aliases``) that carries the etag we read, so promotion is
  atomic and a concurrent change is detected (etag mismatch -> re-read, retry, bounded)
  instead of silently overwritten.

Idempotency per rotation id: before adding a version, the versions under ``pending`` and
``latest`` are read; one that already carries this rotation id is returned (same token) or
refused with StoreConflictError (another token). A transient failure of
``AddSecretVersion`` itself is retried through the same check, so a write that reached
Google before the connection failed is not stored twice.

Errors: UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are retried with
exponential backoff and jitter within a bounded budget (StoreUnavailableError after);
PERMISSION_DENIED / UNAUTHENTICATED become StorePermissionError naming the IAM role that
grants the refused permission. Messages name resources and status codes, never payloads.

Credentials: Application Default Credentials (Workload Identity on GKE, the metadata
server, ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``)
through the client's own defaults; there are deliberately no key flags. ``--gcp-endpoint
HOST:PORT`` points the client elsewhere: plaintext only for a loopback host (tests, a local
proxy), TLS with ADC for any other host.

The client's own DEBUG logging of request and response payloads is switched off (its
transport logger is held at INFO) because those payloads carry the token.

``google.cloud``, ``grpc`` and ``tenacity`` are imported inside the methods that use them,
so listing providers or importing this module stays cheap.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from providers.base import (
    ProviderOption,
    Stage,
    StoredRecord,
    record_from_json,
    record_to_json,
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
from rotator.tokens import EnrollToken, utcnow

if TYPE_CHECKING:
    from google.cloud.secretmanager_v1 import SecretManagerServiceClient
    from google.cloud.secretmanager_v1.types import Secret as SecretProto

log = logging.getLogger("lg_rotate.gcp")

T = TypeVar("T")

DEFAULT_SECRET_ID = "linuxguard-<tenant>-enroll-token"  # noqa: S105 (a name, not a secret)
DEFAULT_LABELS: Mapping[str, str] = {"managed-by": "lg-rotate"}
ALIAS_BY_STAGE: Mapping[Stage, str] = {Stage.CURRENT: "current", Stage.PENDING: "pending"}

_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_PROJECT = re.compile(r"(?:[a-z0-9.-]+:)?[a-z0-9][a-z0-9-]{0,62}")
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_LOCATION = re.compile(r"[a-z][a-z0-9-]*[a-z0-9]")
_TRANSPORT_LOGGER = "google.cloud.secretmanager_v1.services.secret_manager_service.transports"
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")

# Which permission each call needs and the predefined role that grants it.
_IAM_HINTS: Mapping[str, tuple[str, str]] = {
    "CreateSecret": ("secretmanager.secrets.create", "roles/secretmanager.admin"),
    "GetSecret": ("secretmanager.secrets.get", "roles/secretmanager.viewer"),
    "UpdateSecret": (
        "secretmanager.secrets.update",
        "roles/secretmanager.admin (or a custom role with secretmanager.secrets.update)",
    ),
    "AddSecretVersion": ("secretmanager.versions.add", "roles/secretmanager.secretVersionAdder"),
    "AccessSecretVersion": (
        "secretmanager.versions.access",
        "roles/secretmanager.secretAccessor",
    ),
    "GetSecretVersion": ("secretmanager.versions.get", "roles/secretmanager.viewer"),
    "ListSecretVersions": ("secretmanager.versions.list", "roles/secretmanager.viewer"),
    "DestroySecretVersion": (
        "secretmanager.versions.destroy",
        "roles/secretmanager.secretVersionManager",
    ),
}
_ALL_ROLES = (
    "roles/secretmanager.admin covers everything; least privilege is "
    "secretVersionAdder + secretAccessor + secretVersionManager + viewer on the secret and "
    "a custom role with secretmanager.secrets.update (secrets.create on the project if "
    "lg-rotate creates the secret)"
)
_ADC_FIX = (
    "provide Application Default Credentials: Workload Identity on GKE, an attached service "
    "account, GOOGLE_APPLICATION_CREDENTIALS, or gcloud auth application-default login"
)


# --- settings parsing ------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """Where the client connects; ``plaintext`` only ever for a loopback host."""

    host: str
    port: int
    plaintext: bool

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``--gcp-endpoint``: ``HOST:PORT``, ``http://HOST:PORT`` or ``https://HOST[:PORT]``.

    A bare ``HOST:PORT`` is plaintext when HOST is loopback and TLS otherwise; ``http://``
    insists on plaintext and is refused for any non-loopback host (a token must never
    cross a network unencrypted); ``https://`` is always TLS.
    """
    fix = "use HOST:PORT (plaintext only for 127.0.0.1/::1/localhost) or https://HOST:PORT"
    raw = text.strip()
    scheme = ""
    if "://" in raw:
        scheme, _, raw = raw.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https"):
            raise ConfigError(f"--gcp-endpoint has an unsupported scheme {scheme!r}", fix=fix)
    raw = raw.rstrip("/")
    if raw.startswith("["):
        host, bracket, rest = raw[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ConfigError(f"--gcp-endpoint {text!r} is not HOST:PORT", fix=fix)
        port_text = rest[1:]
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
    elif ":" not in raw:
        host, port_text = raw, ""
    else:
        raise ConfigError(
            f"--gcp-endpoint {text!r} is not HOST:PORT (write IPv6 as [addr]:port)", fix=fix
        )
    if not port_text and scheme == "https":
        port_text = "443"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"--gcp-endpoint {text!r} needs a port number (1-65535)", fix=fix)
    if not host or (not _HOSTNAME.fullmatch(host) and not _is_ip(host)):
        raise ConfigError(f"--gcp-endpoint {text!r} has no valid host", fix=fix)
    loopback = _is_loopback(host)
    if scheme == "http" and not loopback:
        raise ConfigError(
            f"refusing a plaintext connection to {host}: only a loopback endpoint may skip TLS",
            fix="drop http:// (TLS with Application Default Credentials is used) or use a "
            "loopback address",
        )
    plaintext = loopback and scheme != "https"
    return Endpoint(host=host, port=int(port_text), plaintext=plaintext)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_labels(text: str | None) -> dict[str, str]:
    """Parse ``--gcp-labels k=v,k2=v2`` and check them against GCP's label rules."""
    labels: dict[str, str] = {}
    for raw_item in (text or "").split(","):
        item = raw_item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            raise ConfigError(f"--gcp-labels entry {key!r} has no '='", fix="write k=v,k2=v2")
        if key in labels:
            raise ConfigError(f"--gcp-labels names {key!r} twice")
        labels[key] = value
    check_labels(labels)
    return labels


def check_labels(labels: Mapping[str, str]) -> None:
    fix = "keys: a lowercase letter then up to 62 of a-z 0-9 _ -; values: up to 63 of those"
    for key, value in labels.items():
        if not _LABEL_KEY.fullmatch(key):
            raise ConfigError(f"{key!r} is not a valid GCP label key", fix=fix)
        if not _LABEL_VALUE.fullmatch(value):
            raise ConfigError(f"the value of label {key!r} is not a valid GCP label value", fix=fix)


def parse_replication(text: str) -> tuple[str, ...]:
    """``automatic`` -> ``()``; ``us-east1,europe-west1`` -> user-managed locations."""
    value = text.strip()
    if value.lower() == "automatic":
        return ()
    locations = tuple(part.strip() for part in value.split(",") if part.strip())
    if not locations:
        raise ConfigError(
            "--gcp-replication is empty", fix="use automatic or a list like us-east1,europe-west1"
        )
    for location in locations:
        if not _LOCATION.fullmatch(location):
            raise ConfigError(
                f"--gcp-replication location {location!r} is not a GCP location name",
                fix="use automatic or a list like us-east1,europe-west1",
            )
    return locations


# --- the provider ----------------------------------------------------------------------


class _AmbiguousWriteError(Exception):
    """AddSecretVersion failed transiently; it may or may not have been stored."""


class GcpProvider:
    """Stores each tenant's tokens as versions of one Secret Manager secret."""

    name: ClassVar[str] = "gcp"
    summary: ClassVar[str] = (
        "Google Cloud Secret Manager: a version per token, aliases current/pending"
    )
    extra: ClassVar[str | None] = "gcp"
    sdk_modules: ClassVar[tuple[str, ...]] = ("google.cloud.secretmanager", "google_crc32c")
    options: ClassVar[tuple[ProviderOption, ...]] = (
        ProviderOption(
            name="gcp-project",
            help="Google Cloud project that holds the secrets",
            env=("GOOGLE_CLOUD_PROJECT",),
            required=True,
        ),
        ProviderOption(
            name="gcp-secret-id",
            help="secret id template; <tenant> is replaced by the tenant id",
            default=DEFAULT_SECRET_ID,
        ),
        ProviderOption(
            name="gcp-replication",
            help="replication of secrets lg-rotate creates: automatic, or a comma-separated "
            "list of locations (user-managed)",
            default="automatic",
        ),
        ProviderOption(
            name="gcp-labels",
            help="labels for secrets lg-rotate creates, k=v,k2=v2 (managed-by=lg-rotate is added)",
        ),
        ProviderOption(
            name="gcp-endpoint",
            help="Secret Manager endpoint HOST:PORT (plaintext only for a loopback host, TLS "
            "with Application Default Credentials otherwise); default: Google's",
        ),
    )

    def __init__(
        self,
        *,
        project: str,
        secret_id: str = DEFAULT_SECRET_ID,
        replication: str = "automatic",
        labels: Mapping[str, str] | None = None,
        endpoint: str | None = None,
        client: SecretManagerServiceClient | None = None,
        timeout: float = 10.0,
        retry_attempts: int = 5,
        retry_deadline: float = 30.0,
        retry_initial_delay: float = 0.25,
        retry_max_delay: float = 4.0,
        conflict_attempts: int = 5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        project = project.strip()
        if not project or not _PROJECT.fullmatch(project):
            raise ConfigError(
                f"--gcp-project {project!r} is not a Google Cloud project id",
                fix="pass the project id (or number), e.g. --gcp-project my-project",
            )
        if "<tenant>" not in secret_id and "{tenant}" not in secret_id:
            log.warning(
                "the GCP secret id template %r has no <tenant>: tenants share it", secret_id
            )
        merged_labels = {**DEFAULT_LABELS, **(labels or {})}
        check_labels(merged_labels)
        self.project = project
        self.secret_id_template = secret_id
        self.replication_locations = parse_replication(replication)
        self.labels: Mapping[str, str] = merged_labels
        self.endpoint = parse_endpoint(endpoint) if endpoint else None
        self._client = client
        self._timeout = timeout
        self._retry_attempts = max(retry_attempts, 1)
        self._retry_deadline = retry_deadline
        self._retry_initial_delay = retry_initial_delay
        self._retry_max_delay = retry_max_delay
        self._conflict_attempts = max(conflict_attempts, 1)
        self._sleep = sleep

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> GcpProvider:
        project = (options.get("gcp_project") or "").strip()
        if not project:
            raise ConfigError(
                "provider 'gcp' needs --gcp-project",
                fix="pass --gcp-project, set LG_ROTATE_GCP_PROJECT or GOOGLE_CLOUD_PROJECT",
            )
        return cls(
            project=project,
            secret_id=options.get("gcp_secret_id") or DEFAULT_SECRET_ID,
            replication=options.get("gcp_replication") or "automatic",
            labels=parse_labels(options.get("gcp_labels")),
            endpoint=options.get("gcp_endpoint") or None,
        )

    def __repr__(self) -> str:
        where = self.endpoint.target if self.endpoint else "secretmanager.googleapis.com"
        return (
            f"GcpProvider(project={self.project!r}, "
            f"secret_id={self.secret_id_template!r}, endpoint={where!r})"
        )

    # --- names ---------------------------------------------------------------------

    def secret_id(self, *, tenant: str) -> str:
        secret_id = render_template(self.secret_id_template, tenant=tenant)
        if not _SECRET_ID.fullmatch(secret_id):
            raise ConfigError(
                f"tenant {tenant!r} gives the secret id {secret_id!r}, which Secret Manager "
                "does not accept (1-255 of A-Z a-z 0-9 _ -)",
                fix="change --gcp-secret-id so every tenant yields a valid id",
            )
        return secret_id

    def secret_name(self, *, tenant: str) -> str:
        return f"projects/{self.project}/secrets/{self.secret_id(tenant=tenant)}"

    def location(self, *, tenant: str) -> str:
        return f"gcp:{self.secret_name(tenant=tenant)}"

    # --- the client ----------------------------------------------------------------

    @property
    def client(self) -> SecretManagerServiceClient:
        """The Secret Manager client, built on first use (imports the SDK then)."""
        if self._client is None:
            self._client = self._build_client()
        _quiet_payload_logging()
        return self._client

    def _build_client(self) -> SecretManagerServiceClient:
        from google.auth import exceptions as auth_exceptions
        from google.cloud.secretmanager_v1 import SecretManagerServiceClient

        endpoint = self.endpoint
        try:
            if endpoint is None:
                return SecretManagerServiceClient()
            if endpoint.plaintext:
                import grpc
                from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (  # noqa: E501
                    SecretManagerServiceGrpcTransport,
                )

                channel = grpc.insecure_channel(endpoint.target)
                transport = SecretManagerServiceGrpcTransport(channel=channel)
                return SecretManagerServiceClient(transport=transport)
            from google.api_core.client_options import ClientOptions

            return SecretManagerServiceClient(
                client_options=ClientOptions(api_endpoint=endpoint.target)
            )
        except auth_exceptions.DefaultCredentialsError as exc:
            raise StorePermissionError(
                "no Google Cloud credentials found for Secret Manager", fix=_ADC_FIX
            ) from exc

    # --- calling Google ------------------------------------------------------------

    def _retrying(self, transient: tuple[type[BaseException], ...]) -> Any:
        import tenacity

        return tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(transient),
            stop=(
                tenacity.stop_after_attempt(self._retry_attempts)
                | tenacity.stop_after_delay(self._retry_deadline)
            ),
            wait=(
                tenacity.wait_exponential(
                    multiplier=self._retry_initial_delay, max=self._retry_max_delay
                )
                + tenacity.wait_random(0, self._retry_initial_delay)  # jitter
            ),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "GCP Secret Manager: transient failure (%s), attempt %d, retrying",
                type(state.outcome.exception()).__name__ if state.outcome else "?",
                state.attempt_number,
            ),
        )

    def _call(
        self,
        op: str,
        resource: str,
        invoke: Callable[[], T],
        *,
        expected: tuple[type[BaseException], ...] = (),
        retry: bool = True,
    ) -> T:
        """Run one RPC with the retry budget and map its failures to store errors.

        ``expected`` exceptions are re-raised for the caller to interpret. With
        ``retry=False`` a transient failure raises :class:`_AmbiguousWriteError`.
        """
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exceptions

        transient = (gexc.ServiceUnavailable, gexc.ResourceExhausted, gexc.DeadlineExceeded)
        # AddSecretVersion's request carries the token: keep its errors out of chains.
        sensitive = op == "AddSecretVersion"
        try:
            if retry:
                result: T = self._retrying(transient)(invoke)
                return result
            return invoke()
        except expected:
            raise
        except transient as exc:
            if not retry:
                raise _AmbiguousWriteError(type(exc).__name__) from None
            raise StoreUnavailableError(
                f"GCP Secret Manager kept failing {op} on {resource} "
                f"({_code(exc)}; retry budget of {self._retry_attempts} attempts / "
                f"{self._retry_deadline:g}s spent)",
                fix="check connectivity to Secret Manager and quota; the retry is safe",
            ) from (None if sensitive else exc)
        except gexc.Unauthenticated as exc:
            raise StorePermissionError(
                f"GCP Secret Manager rejected the credentials for {op} on {resource}",
                fix=_ADC_FIX,
            ) from (None if sensitive else exc)
        except gexc.PermissionDenied as exc:
            permission, role = _IAM_HINTS.get(op, ("?", "roles/secretmanager.admin"))
            raise StorePermissionError(
                f"GCP Secret Manager denied {op} on {resource} (needs {permission}; the "
                "project may also not exist or have the Secret Manager API disabled)",
                fix=f"grant {role} to lg-rotate's service account; {_ALL_ROLES}",
            ) from (None if sensitive else exc)
        except (auth_exceptions.DefaultCredentialsError, auth_exceptions.RefreshError) as exc:
            raise StorePermissionError(
                f"could not obtain Google Cloud credentials for {op} on {resource} "
                f"({type(exc).__name__})",
                fix=_ADC_FIX,
            ) from None  # auth library messages may quote credential material
        except gexc.GoogleAPICallError as exc:
            raise StoreError(
                f"GCP Secret Manager refused {op} on {resource} ({_code(exc)})",
                fix="see --debug for Google's message",
            ) from (None if sensitive else exc)

    def _get_secret(self, name: str) -> SecretProto:
        from google.api_core import exceptions as gexc

        return self._call(
            "GetSecret",
            name,
            partial(
                self.client.get_secret, request={"name": name}, retry=None, timeout=self._timeout
            ),
            expected=(gexc.NotFound,),
        )

    def _ensure_secret(self, *, tenant: str) -> SecretProto:
        """Read the tenant's secret, creating it when missing (a creation race is fine)."""
        from google.api_core import exceptions as gexc

        name = self.secret_name(tenant=tenant)
        try:
            return self._get_secret(name)
        except gexc.NotFound:
            pass
        replication: dict[str, Any] = (
            {
                "user_managed": {
                    "replicas": [{"location": loc} for loc in self.replication_locations]
                }
            }
            if self.replication_locations
            else {"automatic": {}}
        )
        request = {
            "parent": f"projects/{self.project}",
            "secret_id": self.secret_id(tenant=tenant),
            "secret": {"replication": replication, "labels": dict(self.labels)},
        }
        try:
            secret = self._call(
                "CreateSecret",
                name,
                partial(
                    self.client.create_secret, request=request, retry=None, timeout=self._timeout
                ),
                expected=(gexc.AlreadyExists, gexc.NotFound),
            )
        except gexc.AlreadyExists:
            log.info("GCP secret %s was created concurrently; using it", name)
            return self._get_secret(name)
        except gexc.NotFound as exc:
            raise StoreError(
                f"GCP project {self.project!r} was not found by Secret Manager",
                fix="check --gcp-project / GOOGLE_CLOUD_PROJECT and that the Secret Manager "
                "API is enabled there",
            ) from exc
        log.info("created GCP secret %s", name)
        return secret

    def _access(
        self, *, name: str, where: str, ref: str, stage: Stage | None
    ) -> StoredRecord | None:
        """The record at ``.../versions/<ref>``; None when missing or not ENABLED."""
        import google_crc32c
        from google.api_core import exceptions as gexc

        version_name = f"{name}/versions/{ref}"
        try:
            response = self._call(
                "AccessSecretVersion",
                version_name,
                partial(
                    self.client.access_secret_version,
                    request={"name": version_name},
                    retry=None,
                    timeout=self._timeout,
                ),
                expected=(gexc.NotFound, gexc.FailedPrecondition),
            )
        except gexc.NotFound:
            return None
        except gexc.FailedPrecondition:
            log.warning(
                "%s is not readable (disabled or destroyed); treating it as absent", version_name
            )
            return None
        version = str(response.name).rsplit("/", 1)[-1]
        data = bytes(response.payload.data)
        if "data_crc32c" in response.payload:
            if int(google_crc32c.value(data)) != response.payload.data_crc32c:
                raise StoreDataError(
                    f"version {version} of {where} failed its CRC32C check in transit",
                    fix="retry; if it persists the stored version is corrupt: rotate to replace it",
                )
        else:
            log.debug("%s came without data_crc32c; not verified", version_name)
        return record_from_json(data, version=version, stage=stage, where=where)

    def _update_aliases(
        self,
        *,
        name: str,
        secret: SecretProto,
        change: Callable[[dict[str, int]], dict[str, int]],
    ) -> None:
        """Apply ``change`` to the secret's aliases with the etag read (optimistic concurrency).

        An etag mismatch (FAILED_PRECONDITION as documented, or ABORTED) re-reads the
        secret and tries again, a bounded number of times.
        """
        from google.api_core import exceptions as gexc

        for attempt in range(1, self._conflict_attempts + 1):
            aliases = dict(secret.version_aliases)
            wanted = change(dict(aliases))
            if wanted == aliases:
                return
            sent_etag = secret.etag
            request = {
                "secret": {"name": name, "version_aliases": wanted, "etag": sent_etag},
                "update_mask": {"paths": ["version_aliases"]},
            }
            try:
                self._call(
                    "UpdateSecret",
                    name,
                    partial(
                        self.client.update_secret,
                        request=request,
                        retry=None,
                        timeout=self._timeout,
                    ),
                    expected=(gexc.FailedPrecondition, gexc.Aborted),
                )
                return
            except (gexc.FailedPrecondition, gexc.Aborted) as exc:
                secret = self._get_secret(name)
                if secret.etag == sent_etag:  # not a concurrent change: a real refusal
                    raise StoreConflictError(
                        f"GCP Secret Manager refused to move the aliases of {name} "
                        f"({_code(exc)}: {exc.message})",
                        fix="check the versions' states (an alias cannot point at a destroyed "
                        "version)",
                    ) from exc
                log.info(
                    "%s changed concurrently (etag mismatch); re-read, attempt %d", name, attempt
                )
        raise StoreConflictError(
            f"{name} kept changing while lg-rotate updated its aliases "
            f"({self._conflict_attempts} attempts)",
            fix="another writer is updating this secret; make sure one rotation runs at a time",
        )

    # --- Provider protocol ---------------------------------------------------------

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        retrying = self._retrying((_AmbiguousWriteError,))
        try:
            record: StoredRecord = retrying(
                lambda: self._write_pending_once(
                    tenant=tenant, token=token, rotation_id=rotation_id
                )
            )
        except _AmbiguousWriteError as exc:
            raise StoreUnavailableError(
                f"GCP Secret Manager kept failing AddSecretVersion on "
                f"{self.secret_name(tenant=tenant)} ({exc}; retry budget of "
                f"{self._retry_attempts} attempts / {self._retry_deadline:g}s spent)",
                fix="check connectivity to Secret Manager and quota; the retry is safe",
            ) from None
        return record

    def _write_pending_once(
        self, *, tenant: str, token: EnrollToken, rotation_id: str
    ) -> StoredRecord:
        import google_crc32c

        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        secret = self._ensure_secret(tenant=tenant)
        existing = self._find_rotation(
            name=name, where=where, secret=secret, rotation_id=rotation_id
        )
        if existing is not None:
            if existing.token.value != token.value:
                raise StoreConflictError(
                    f"rotation {rotation_id} already stored a different token at {where} "
                    f"(version {existing.version})",
                    fix="start a new rotation (a new rotation id)",
                )
            number = int(existing.version)
            log.info("rotation %s is already stored as version %d of %s", rotation_id, number, name)
            record = existing
        else:
            stored_at = utcnow().replace(microsecond=0)  # as the record stores it
            data = record_to_json(
                token=token, rotation_id=rotation_id, stored_at=stored_at
            ).encode()
            request = {
                "parent": name,
                "payload": {"data": data, "data_crc32c": int(google_crc32c.value(data))},
            }
            version = self._call(
                "AddSecretVersion",
                name,
                partial(
                    self.client.add_secret_version,
                    request=request,
                    retry=None,
                    timeout=self._timeout,
                ),
                retry=False,
            )
            number = int(str(version.name).rsplit("/", 1)[-1])
            # DEBUG: the rotation logs the stored version itself (once, with the fingerprint)
            log.debug(
                "stored token %s for rotation %s as version %d of %s",
                token.short_fingerprint,
                rotation_id,
                number,
                name,
            )
            record = StoredRecord(
                token=token,
                rotation_id=rotation_id,
                version=str(number),
                stage=Stage.PENDING,
                stored_at=stored_at,
            )

        pending_alias = ALIAS_BY_STAGE[Stage.PENDING]
        current_alias = ALIAS_BY_STAGE[Stage.CURRENT]

        def mark_pending(aliases: dict[str, int]) -> dict[str, int]:
            if aliases.get(current_alias) == number:
                return aliases  # a retry after promotion: already current, nothing pending
            newer = aliases.get(pending_alias, 0)
            if newer > number:
                raise StoreConflictError(
                    f"another rotation marked version {newer} of {where} pending while this "
                    f"one stored version {number}",
                    fix="make sure one rotation runs at a time per tenant",
                )
            aliases[pending_alias] = number
            return aliases

        self._update_aliases(name=name, secret=secret, change=mark_pending)
        return StoredRecord(
            token=record.token,
            rotation_id=record.rotation_id,
            version=record.version,
            stage=Stage.PENDING,
            stored_at=record.stored_at,
        )

    def _find_rotation(
        self, *, name: str, where: str, secret: SecretProto, rotation_id: str
    ) -> StoredRecord | None:
        """The version under ``pending``, ``latest`` or ``current`` written by ``rotation_id``.

        Those are where a retried rotation's version can be: just written (latest), marked
        pending, or already promoted by the crashed attempt (current).
        """
        pending = secret.version_aliases.get(ALIAS_BY_STAGE[Stage.PENDING])
        current = secret.version_aliases.get(ALIAS_BY_STAGE[Stage.CURRENT])
        refs = [str(pending)] if pending else []
        refs.append("latest")
        refs += [str(current)] if current else []
        seen: set[str] = set()
        for ref in refs:
            try:
                record = self._access(name=name, where=where, ref=ref, stage=None)
            except StoreDataError as exc:
                log.warning("skipping an unreadable version of %s: %s", name, exc.message)
                continue
            if record is None or record.version in seen:
                continue
            seen.add(record.version)
            if record.rotation_id == rotation_id:
                return record
        return None

    def promote(self, *, tenant: str, version: str) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud.secretmanager_v1.types import SecretVersion

        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        missing = StoreConflictError(f"{where} has no version {version} to promote")
        if not version.isdigit() or int(version) < 1:
            raise missing
        number = int(version)
        version_name = f"{name}/versions/{number}"
        try:
            found = self._call(
                "GetSecretVersion",
                version_name,
                partial(
                    self.client.get_secret_version,
                    request={"name": version_name},
                    retry=None,
                    timeout=self._timeout,
                ),
                expected=(gexc.NotFound,),
            )
        except gexc.NotFound:
            raise missing from None
        if found.state != SecretVersion.State.ENABLED:
            raise StoreConflictError(
                f"version {number} of {where} is {SecretVersion.State(found.state).name}; "
                "it cannot be promoted",
                fix="rotate to write a fresh version",
            )
        secret = self._get_secret(name)
        pending_alias = ALIAS_BY_STAGE[Stage.PENDING]

        def make_current(aliases: dict[str, int]) -> dict[str, int]:
            aliases[ALIAS_BY_STAGE[Stage.CURRENT]] = number
            if aliases.get(pending_alias, number + 1) <= number:
                del aliases[pending_alias]  # keep a pending written after this version
            return aliases

        self._update_aliases(name=name, secret=secret, change=make_current)
        log.info("promoted version %d of %s to current", number, name)

    def check(self, *, tenant: str) -> None:
        """Before a mint: Secret Manager answers GetSecret for the tenant's secret with these
        credentials (a missing secret is fine: the first write creates it)."""
        from google.api_core import exceptions as gexc

        try:
            self._get_secret(self.secret_name(tenant=tenant))
        except gexc.NotFound:
            return

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        name = self.secret_name(tenant=tenant)
        return self._access(
            name=name, where=self.location(tenant=tenant), ref=ALIAS_BY_STAGE[stage], stage=stage
        )

    def prune(self, *, tenant: str, keep: int) -> int:
        """Destroy live versions beyond the newest ``keep``, never an aliased one.

        Every aliased version is protected, not only current and pending: an alias set by
        a person is a statement that the version matters.
        """
        from google.api_core import exceptions as gexc
        from google.cloud.secretmanager_v1.types import SecretVersion

        if keep < 0:
            raise ConfigError(f"cannot keep {keep} versions", fix="use a number >= 0")
        name = self.secret_name(tenant=tenant)
        try:
            secret = self._get_secret(name)
        except gexc.NotFound:
            return 0
        protected = set(secret.version_aliases.values())
        live = [
            version
            for version in self._list_versions(name)
            if version.state in (SecretVersion.State.ENABLED, SecretVersion.State.DISABLED)
            and "scheduled_destroy_time" not in version  # destruction already under way
        ]
        live.sort(key=lambda v: int(str(v.name).rsplit("/", 1)[-1]), reverse=True)
        destroyed = 0
        for version in live[keep:]:
            number = int(str(version.name).rsplit("/", 1)[-1])
            if number in protected:
                continue
            version_name = f"{name}/versions/{number}"
            request = {"name": version_name, "etag": version.etag}
            try:
                self._call(
                    "DestroySecretVersion",
                    version_name,
                    partial(
                        self.client.destroy_secret_version,
                        request=request,
                        retry=None,
                        timeout=self._timeout,
                    ),
                    expected=(gexc.FailedPrecondition, gexc.Aborted, gexc.NotFound),
                )
            except (gexc.FailedPrecondition, gexc.Aborted, gexc.NotFound) as exc:
                log.info("left %s alone: it changed meanwhile (%s)", version_name, _code(exc))
                continue
            destroyed += 1
        if destroyed:
            log.info("destroyed %d old version(s) of %s", destroyed, name)
        return destroyed

    def _list_versions(self, name: str) -> list[Any]:
        from google.api_core import exceptions as gexc

        versions: list[Any] = []
        page_token = ""
        while True:
            request = {"parent": name, "page_size": 250, "page_token": page_token}
            try:
                page = self._call(
                    "ListSecretVersions",
                    name,
                    partial(
                        self.client.list_secret_versions,
                        request=request,
                        retry=None,
                        timeout=self._timeout,
                    ),
                    expected=(gexc.NotFound,),
                )
            except gexc.NotFound:
                return versions
            versions.extend(page.versions)
            page_token = page.next_page_token
            if not page_token:
                return versions


def _quiet_payload_logging() -> None:
    """Keep the client's DEBUG request/response logging off.

    The generated transports log every request and response *payload* (base64, beyond the
    reach of the token-shaped redaction filter) in the log record's extras when their
    logger is enabled for DEBUG, e.g. under ``--debug`` or GOOGLE_SDK_PYTHON_LOGGING_SCOPE.
    With their logger at INFO they never even serialise the payload.
    """
    logger = logging.getLogger(_TRANSPORT_LOGGER)
    if logger.level < logging.INFO:  # NOTSET (inherit) counts as lower
        logger.setLevel(logging.INFO)


def _code(exc: BaseException) -> str:
    """The gRPC status name of a google.api_core error (``UNAVAILABLE``), never its message."""
    code = getattr(exc, "grpc_status_code", None)
    name = getattr(code, "name", None)
    return str(name) if name else type(exc).__name__
