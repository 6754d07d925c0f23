"""Kubernetes: the Secret target, the Lease lock, workload restarts, rollouts and events.

Everything lg-rotate does with the Kubernetes API lives here, through the official
``kubernetes`` client. The client is imported inside the functions that use it, so
``import rotator.kube`` stays cheap (the CLI's ``--help`` and the Docker wrapper never pay
for it).

Answers are read as plain JSON (``_preload_content=False``) rather than through the
client's generated models: the models' validation differs between client releases, and
the JSON is exactly what the API server documents.

Security: the token only ever travels in the ``data`` of a create/patch body. Errors from
write requests never quote the server's answer (an admission webhook or a validation error
may echo the request body), and are not chained to the client's exception (whose text
includes that answer). Annotations and Events carry fingerprints, never the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from rotator.errors import (
    ConfigError,
    KubernetesError,
    LgRotateError,
    LockError,
    RolloutTimeoutError,
)
from rotator.targets import Delivery, TargetState
from rotator.tokens import (
    REDACTED,
    TOKEN_SHAPED,
    EnrollToken,
    format_timestamp,
    parse_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "ANNOTATION_EXPIRES_AT",
    "ANNOTATION_FINGERPRINT",
    "ANNOTATION_ROTATED_AT",
    "ANNOTATION_ROTATION_ID",
    "ANNOTATION_SOURCE",
    "DEFAULT_SECRET_NAME",
    "MANAGED_BY_LABEL",
    "KubernetesConflictError",
    "KubernetesNotFoundError",
    "LeaseHolder",
    "LeaseLock",
    "RolloutProgress",
    "SecretTarget",
    "WorkloadKind",
    "connect",
    "parse_workload_ref",
    "record_event",
    "restart_workload",
    "wait_for_rollout",
]

logger = logging.getLogger("lg_rotate.kube")

DEFAULT_SECRET_NAME = "linuxguard-enroll"  # noqa: S105 - a name, not a secret
DEFAULT_TOKEN_KEY = "token"  # noqa: S105 - a key name, not a secret
DEFAULT_TENANT_KEY = "tenant-id"
FIELD_MANAGER = "lg-rotate"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
ANNOTATION_FINGERPRINT = "linuxguard.io/token-sha256"
ANNOTATION_ROTATED_AT = "linuxguard.io/rotated-at"
ANNOTATION_EXPIRES_AT = "linuxguard.io/expires-at"
ANNOTATION_SOURCE = "linuxguard.io/source"
ANNOTATION_ROTATION_ID = "linuxguard.io/rotation-id"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
LEASE_PREFIX = "lg-rotate-"
DEFAULT_LEASE_DURATION = 60.0
DEFAULT_REQUEST_TIMEOUT = 30.0
MERGE_PATCH = "application/merge-patch+json"
_MAX_CONFLICTS = 5
_EVENT_MESSAGE_LIMIT = 1024

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")

WorkloadKind = Literal["daemonset", "deployment", "statefulset"]
_ALIASES_BY_KIND: dict[WorkloadKind, tuple[str, ...]] = {
    "daemonset": ("ds", "daemonset", "daemonsets"),
    "deployment": ("deploy", "deployment", "deployments"),
    "statefulset": ("sts", "statefulset", "statefulsets"),
}
_WORKLOAD_ALIASES: dict[str, WorkloadKind] = {
    alias: kind
    for kind, aliases in _ALIASES_BY_KIND.items()
    for name in aliases
    for alias in (name, f"{name}.apps")
}
_WORKLOAD_API: dict[WorkloadKind, str] = {
    "daemonset": "daemon_set",
    "deployment": "deployment",
    "statefulset": "stateful_set",
}


# --- errors ----------------------------------------------------------------------------


class KubernetesNotFoundError(KubernetesError):
    """404: the object (or, for a create, its namespace) does not exist."""


class KubernetesConflictError(KubernetesError):
    """409: a concurrent writer changed the object (stale resourceVersion), or it exists."""


@dataclass(frozen=True, kw_only=True)
class ApiOp:
    """One API operation, described for error messages and RBAC hints."""

    verb: str  # the RBAC verb: get, create, patch, list
    kind: str  # "Secret", "Lease", "DaemonSet"...
    resource: str  # the RBAC resource: "secrets", "leases"...
    group: str  # the API group: "" (core), "apps", "coordination.k8s.io"
    namespace: str
    name: str | None
    writes: bool  # the body may carry a token: never quote the server's answer

    @property
    def what(self) -> str:
        if self.name is None:
            return f"{self.kind}s in namespace {self.namespace!r}"
        return f"{self.kind} {self.namespace}/{self.name}"


def _status_body(exc: Any) -> dict[str, Any]:
    try:
        body = json.loads(getattr(exc, "body", None) or "{}")
    except (TypeError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def api_error(exc: Any, op: ApiOp) -> KubernetesError:  # noqa: PLR0911 - one answer per status
    """Translate a kubernetes ``ApiException`` into lg-rotate's error, with a fix."""
    status = int(getattr(exc, "status", 0) or 0)
    reason = str(getattr(exc, "reason", "") or "").strip()
    body = _status_body(exc)
    # The Status "message" of a read is safe and useful; a write's may echo its body.
    detail = "" if op.writes else str(body.get("message") or "").strip()
    suffix = f": {detail}" if detail else ""
    if status == 401:
        return KubernetesError(
            f"the Kubernetes API rejected lg-rotate's credentials (401) trying to {op.verb} "
            f"{op.what}",
            fix="check the kubeconfig user, or that the ServiceAccount token is mounted and valid",
        )
    if status == 403:
        group = f".{op.group}" if op.group else ""
        scope = (
            f', resourceNames: ["{op.name}"]'
            if op.name and op.verb not in ("create", "list", "watch")
            else ""
        )
        return KubernetesError(
            f"forbidden (403): lg-rotate may not {op.verb} {op.what}; it needs the RBAC verb "
            f"'{op.verb}' on '{op.resource}{group}' in namespace {op.namespace!r}",
            fix=f'add to its Role: apiGroups: ["{op.group}"], resources: ["{op.resource}"], '
            f'verbs: ["{op.verb}"]{scope} (see cronjob/base/rbac.yaml)'
            + (
                "; the shipped Role grants no create on Secrets: apply cronjob/base/secret.yaml"
                if op.resource == "secrets" and op.verb == "create"
                else ""
            ),
        )
    if status == 404:
        if op.verb == "create":
            return KubernetesNotFoundError(
                f"namespace {op.namespace!r} does not exist (creating {op.what})",
                fix="create the namespace first, or pass the right --namespace",
            )
        return KubernetesNotFoundError(f"{op.what} not found", fix="check the name and namespace")
    if status == 409:
        if op.verb == "create":
            return KubernetesConflictError(f"{op.what} already exists")
        return KubernetesConflictError(
            f"{op.what} was changed by someone else (409 Conflict on its resourceVersion)",
            fix="re-read and retry; if it keeps happening, another writer is fighting lg-rotate",
        )
    if status in (400, 422):
        fields = sorted(
            str(cause.get("field"))
            for cause in (body.get("details") or {}).get("causes") or []
            if isinstance(cause, dict) and cause.get("field")
        )
        where = f" (fields: {', '.join(fields)})" if fields else ""
        return KubernetesError(
            f"the Kubernetes API rejected the {op.verb} of {op.what} as invalid "
            f"({status} {body.get('reason') or reason}){where}{suffix}",
            fix="check admission policies and webhooks on this resource, and the key names "
            "(--token-key, --tenant-key)",
        )
    if status == 429 or status >= 500:
        return KubernetesError(
            f"the Kubernetes API failed to {op.verb} {op.what} ({status} {reason}){suffix}",
            fix="retry later; check the API server's health and any admission webhooks",
        )
    return KubernetesError(
        f"the Kubernetes API answered {status} {reason} to {op.verb} {op.what}{suffix}",
        fix="check the cluster and lg-rotate's permissions",
    )


def transport_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "connection refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in text:
        return "timed out"
    if "name or service not known" in text or "nodename nor servname" in text:
        return "unknown host name"
    if "certificate" in text or "ssl" in text:
        return "TLS error (certificate?)"
    return type(getattr(exc, "reason", None) or exc).__name__


def api_request(
    api_client: ApiClient, op: ApiOp, call: Callable[..., Any], /, **kwargs: Any
) -> Any:
    """Run one API call and return its JSON answer; raise lg-rotate errors only."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError as TransportError

    refused: KubernetesError | None = None
    try:
        response = call(_preload_content=False, **kwargs)
        try:
            data = response.data
        finally:
            release = getattr(response, "release_conn", None)
            if callable(release):
                release()
    except ApiException as exc:
        refused = api_error(exc, op)
        if not op.writes:
            raise refused from exc
    except TransportError as exc:
        host = getattr(getattr(api_client, "configuration", None), "host", "?")
        raise KubernetesError(
            f"cannot reach the Kubernetes API at {host} to {op.verb} {op.what}: "
            f"{transport_reason(exc)}",
            fix="check the cluster address (kubeconfig server or KUBERNETES_SERVICE_HOST), that "
            "the API server is up, and that a NetworkPolicy allows egress to it",
        ) from exc
    if refused is not None:
        # Raised outside the handler: no __context__ either, since the client's exception
        # text quotes the server's answer, which may echo the request body (the token).
        raise refused
    try:
        return json.loads(data) if data else {}
    except ValueError:
        raise KubernetesError(
            f"the Kubernetes API answered {op.verb} {op.what} with something that is not JSON",
            fix="check that the kubeconfig server points at a Kubernetes API server",
        ) from None


def _raise_config(message: str, *, fix: str, cause: BaseException | None = None) -> NoReturn:
    raise ConfigError(message, fix=fix) from cause


# --- connection ------------------------------------------------------------------------


def connect(*, kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ``ApiClient`` for the cluster lg-rotate should talk to.

    Inside a pod (``KUBERNETES_SERVICE_HOST`` is set) and with neither ``kubeconfig``,
    ``KUBECONFIG`` nor ``context`` given, the pod's ServiceAccount is used (in-cluster
    configuration). Otherwise the kubeconfig is loaded: ``kubeconfig`` if given, else the
    ``KUBECONFIG`` variable (colon-separated files are merged), else ``~/.kube/config``;
    ``context`` picks a context other than the current one.
    """
    from kubernetes import client, config

    explicit = kubeconfig or os.environ.get("KUBECONFIG") or context
    if not explicit and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = type.__call__(client.Configuration)
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except config.ConfigException as exc:
            _raise_config(
                f"running in a pod, but the in-cluster Kubernetes configuration is unusable: {exc}",
                fix="mount a ServiceAccount token (automountServiceAccountToken: true), or pass "
                "--kubeconfig",
                cause=exc,
            )
        return client.ApiClient(configuration)

    paths = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    files = [path for path in paths.split(os.pathsep) if path]
    if not any(os.path.isfile(path) for path in files):
        origin = (
            "--kubeconfig" if kubeconfig else "KUBECONFIG" if os.environ.get("KUBECONFIG") else ""
        )
        if origin:
            _raise_config(
                f"the kubeconfig file {paths} ({origin}) does not exist",
                fix="pass an existing file with --kubeconfig or fix KUBECONFIG",
            )
        _raise_config(
            "no Kubernetes configuration found: not running in a pod, no KUBECONFIG, and no "
            f"{paths}",
            fix="pass --kubeconfig FILE (and --context NAME), or run lg-rotate inside the cluster",
        )
    if context is not None:
        try:
            contexts, _ = config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
                config_file=paths
            )
        except config.ConfigException as exc:
            _raise_config(
                f"cannot read the kubeconfig {paths}: {exc}",
                fix="check the file (kubectl config view)",
                cause=exc,
            )
        names = sorted(str(item.get("name")) for item in contexts or [])
        if context not in names:
            _raise_config(
                f"the kubeconfig {paths} has no context {context!r} (it has: "
                f"{', '.join(names) or 'none'})",
                fix="pick one of those with --context (kubectl config get-contexts)",
            )
    try:
        api_client: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=paths, context=context, persist_config=False
        )
    except config.ConfigException as exc:
        _raise_config(
            f"cannot use the kubeconfig {paths}: {exc}",
            fix="check the file and its current context (kubectl config view --minify)",
            cause=exc,
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _raise_config(
            f"cannot load the kubeconfig {paths}: {type(exc).__name__}",
            fix="check the file (kubectl config view)",
            cause=exc,
        )
    return api_client


# --- names -----------------------------------------------------------------------------


def _check_name(value: str, *, what: str, label: bool = False) -> str:
    pattern, limit = (_DNS_LABEL, 63) if label else (_DNS_SUBDOMAIN, 253)
    if not value or len(value) > limit or not pattern.fullmatch(value):
        kind = "DNS label" if label else "DNS subdomain"
        raise ConfigError(
            f"{what} {value!r} is not a valid Kubernetes name",
            fix=f"use a {kind}: lowercase letters, digits and '-', at most {limit} characters",
        )
    return value


def _check_data_key(value: str, *, what: str) -> str:
    if not value or len(value) > 253 or not _DATA_KEY.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not a valid Secret key",
            fix="use letters, digits, '-', '_' and '.' only",
        )
    return value


def parse_workload_ref(ref: str) -> tuple[WorkloadKind, str]:
    """``"daemonset/NAME"`` -> ``("daemonset", "NAME")``, as ``kubectl rollout`` spells it.

    Accepted kinds (case-insensitive, optionally with ``.apps``): ``ds``, ``daemonset``,
    ``daemonsets``, ``deploy``, ``deployment``, ``deployments``, ``sts``, ``statefulset``,
    ``statefulsets``.
    """
    kind_text, slash, name = ref.strip().partition("/")
    kind = _WORKLOAD_ALIASES.get(kind_text.strip().lower())
    if not slash or kind is None or not name.strip():
        raise ConfigError(
            f"{ref!r} is not a workload reference",
            fix="use daemonset/NAME, deployment/NAME or statefulset/NAME (ds/, deploy/, sts/)",
        )
    return kind, _check_name(name.strip(), what="the workload name")


def _workload_kind(kind: str) -> WorkloadKind:
    canonical = _WORKLOAD_ALIASES.get(kind.strip().lower())
    if canonical is None:
        raise ConfigError(
            f"{kind!r} is not a workload kind lg-rotate can restart",
            fix="use daemonset, deployment or statefulset",
        )
    return canonical


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _micro_time(value: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, in UTC.

    Never exactly on a whole second: kubernetes client 37 turns a create body into its model
    and back, and ``isoformat()`` then drops a zero fraction, which the API server's
    MicroTime parser (exactly six digits) rejects. One microsecond later is harmless.
    """
    value = value.astimezone(UTC)
    if value.microsecond == 0:
        value = value.replace(microsecond=1)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _optional_timestamp(value: Any, *, what: str) -> datetime | None:
    if not value:
        return None
    try:
        return parse_timestamp(str(value))
    except ValueError:
        logger.warning("ignoring %s: %r is not an RFC 3339 timestamp", what, value)
        return None


# --- the Secret target -----------------------------------------------------------------


def delivery_annotations(delivery: Delivery) -> dict[str, str]:
    """The ``linuxguard.io/*`` annotations for a delivery (DESIGN.md §3; never the token)."""
    record = delivery.record
    return {
        ANNOTATION_FINGERPRINT: record.fingerprint,
        ANNOTATION_ROTATED_AT: format_timestamp(delivery.rotated_at),
        ANNOTATION_EXPIRES_AT: format_timestamp(record.token.expires_at),
        ANNOTATION_SOURCE: delivery.source,
        ANNOTATION_ROTATION_ID: record.rotation_id,
    }


class SecretTarget:
    """The Kubernetes Secret the LinuxGuard agents read their token from.

    The Secret (type ``Opaque``) holds the token under ``token_key`` and the tenant ID
    under ``tenant_key``; its ``linuxguard.io/*`` annotations describe the delivery
    (fingerprint, rotation ID, times, source), never the token.

    :meth:`deliver` reads the Secret, then creates it if it is missing (labelled
    ``app.kubernetes.io/managed-by=lg-rotate``) or sends a JSON merge patch carrying the
    ``metadata.resourceVersion`` it read, so the API server refuses it with 409 if anyone
    changed the Secret in between. A 409 is re-read and retried (at most ``max_attempts``
    times in all), never overwritten blindly. An existing Secret keeps its labels and its
    other keys: only the two keys and the five annotations change.

    RBAC: ``get``, ``patch`` (``resourceNames``-scoped) and ``create`` on ``secrets``.
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        name: str = DEFAULT_SECRET_NAME,
        token_key: str = DEFAULT_TOKEN_KEY,
        tenant_key: str = DEFAULT_TENANT_KEY,
        field_manager: str = FIELD_MANAGER,
        max_attempts: int = _MAX_CONFLICTS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.namespace = _check_name(namespace, what="the namespace", label=True)
        self.name = _check_name(name, what="the Secret name")
        self.token_key = _check_data_key(token_key, what="the token key")
        self.tenant_key = _check_data_key(tenant_key, what="the tenant key")
        if self.token_key == self.tenant_key:
            raise ConfigError(
                f"the token key and the tenant key are both {token_key!r}",
                fix="give --token-key and --tenant-key different values",
            )
        self.field_manager = field_manager
        self.max_attempts = max(1, max_attempts)
        self.request_timeout = request_timeout
        self.attempts = 0  # write attempts made by the last deliver(), for reports and tests

    def __repr__(self) -> str:
        return f"SecretTarget({self.location()!r})"

    def location(self) -> str:
        return f"k8s:{self.namespace}/{self.name}"

    def _op(self, verb: str, *, writes: bool = False) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Secret",
            resource="secrets",
            group="",
            namespace=self.namespace,
            name=None if verb == "create" else self.name,
            writes=writes,
        )

    def _core(self) -> Any:
        from kubernetes import client

        return client.CoreV1Api(self.api_client)

    def _read_secret(self) -> dict[str, Any] | None:
        """The Secret as JSON, or None if it does not exist. Its ``data`` holds the token
        (base64): keep the dict inside this class, never log or return it."""
        try:
            secret: dict[str, Any] = api_request(
                self.api_client,
                self._op("get"),
                self._core().read_namespaced_secret,
                name=self.name,
                namespace=self.namespace,
                _request_timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return None
        return secret

    def read_state(self) -> TargetState | None:
        secret = self._read_secret()
        return None if secret is None else self._state(secret)

    def _state(self, secret: Mapping[str, Any]) -> TargetState:
        metadata = secret.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        return TargetState(
            fingerprint=annotations.get(ANNOTATION_FINGERPRINT) or None,
            rotation_id=annotations.get(ANNOTATION_ROTATION_ID) or None,
            expires_at=_optional_timestamp(
                annotations.get(ANNOTATION_EXPIRES_AT), what=ANNOTATION_EXPIRES_AT
            ),
            rotated_at=_optional_timestamp(
                annotations.get(ANNOTATION_ROTATED_AT), what=ANNOTATION_ROTATED_AT
            ),
            source=annotations.get(ANNOTATION_SOURCE) or None,
            revision=metadata.get("resourceVersion") or None,
        )

    def read_token(self) -> EnrollToken | None:
        """The token the agents would read now, or None if the Secret or its key is missing.

        The expiry comes from the ``linuxguard.io/expires-at`` annotation (the Secret's
        data holds only the token and the tenant). Raises TokenError for a malformed token.
        """
        secret = self._read_secret()
        if secret is None:
            return None
        data = secret.get("data") or {}
        if not data.get(self.token_key):
            return None
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        expires_at = annotations.get(ANNOTATION_EXPIRES_AT)
        if not expires_at:
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} holds a token but no "
                f"{ANNOTATION_EXPIRES_AT} annotation",
                fix="it was not written by lg-rotate: run lg-rotate rotate to replace it",
            )
        try:
            value = base64.b64decode(data[self.token_key], validate=True).decode("ascii")
            tenant = base64.b64decode(data.get(self.tenant_key) or "", validate=True).decode()
        except (binascii.Error, ValueError):
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} has data that is not valid base64 text",
                fix="run lg-rotate rotate to rewrite it",
            ) from None
        return EnrollToken.parse(value=value, tenant_id=tenant, expires_at=str(expires_at))

    def _check_writable(self, secret: Mapping[str, Any]) -> None:
        declared = secret.get("type") or "Opaque"
        if declared != "Opaque":
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} has type {declared}, not Opaque",
                fix="recreate it as an empty Opaque Secret (cronjob/base/secret.yaml) "
                "or pass another --secret name",
            )
        if secret.get("immutable"):
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} is immutable",
                fix="recreate it mutable and empty (cronjob/base/secret.yaml) "
                "or pass another --secret name",
            )

    def deliver(self, delivery: Delivery) -> TargetState:
        token = delivery.record.token
        annotations = delivery_annotations(delivery)
        core = self._core()
        self.attempts = 0
        for attempt in range(1, self.max_attempts + 1):
            current = self._read_secret()
            self.attempts = attempt
            if current is None:
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                        "annotations": annotations,
                    },
                    "data": {
                        self.token_key: _b64(token.value.reveal()),
                        self.tenant_key: _b64(token.tenant_id),
                    },
                }
                try:
                    written = api_request(
                        self.api_client,
                        self._op("create", writes=True),
                        core.create_namespaced_secret,
                        namespace=self.namespace,
                        body=body,
                        field_manager=self.field_manager,
                        _request_timeout=self.request_timeout,
                    )
                except KubernetesConflictError:
                    logger.info(
                        "Secret %s/%s was created concurrently; re-reading (attempt %d of %d)",
                        self.namespace,
                        self.name,
                        attempt,
                        self.max_attempts,
                    )
                    continue
                logger.info(
                    "created Secret %s/%s with token %s",
                    self.namespace,
                    self.name,
                    token.short_fingerprint,
                )
                return self._state(written)

            self._check_writable(current)
            metadata: dict[str, Any] = {"annotations": annotations}
            read_version = (current.get("metadata") or {}).get("resourceVersion")
            if read_version:
                metadata["resourceVersion"] = read_version
            else:  # every real API server sets it; without it there is no concurrency check
                logger.warning(
                    "Secret %s/%s has no resourceVersion: patching without a conflict check",
                    self.namespace,
                    self.name,
                )
            patch = {
                "metadata": metadata,
                "data": {
                    self.token_key: _b64(token.value.reveal()),
                    self.tenant_key: _b64(token.tenant_id),
                },
            }
            try:
                written = api_request(
                    self.api_client,
                    self._op("patch", writes=True),
                    core.patch_namespaced_secret,
                    name=self.name,
                    namespace=self.namespace,
                    body=patch,
                    field_manager=self.field_manager,
                    _content_type=MERGE_PATCH,
                    _request_timeout=self.request_timeout,
                )
            except (KubernetesConflictError, KubernetesNotFoundError) as exc:
                logger.info(
                    "Secret %s/%s changed since it was read (resourceVersion %s: %s); "
                    "re-reading (attempt %d of %d)",
                    self.namespace,
                    self.name,
                    read_version,
                    type(exc).__name__,
                    attempt,
                    self.max_attempts,
                )
                continue
            logger.info(
                "patched Secret %s/%s with token %s (resourceVersion %s -> %s)",
                self.namespace,
                self.name,
                token.short_fingerprint,
                read_version,
                (written.get("metadata") or {}).get("resourceVersion"),
            )
            return self._state(written)
        raise KubernetesConflictError(
            f"Secret {self.namespace}/{self.name} kept changing: {self.max_attempts} attempts "
            "to update it conflicted with other writers",
            fix="another writer (a second lg-rotate, a GitOps tool, an operator) is updating "
            "this Secret; make lg-rotate its only writer",
        )


# --- the Lease lock --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LeaseHolder:
    """Who holds a Lease, as read from it."""

    identity: str
    acquired_at: datetime | None
    renewed_at: datetime | None
    duration: timedelta

    @property
    def expires_at(self) -> datetime:
        """When the lock lapses unless renewed (``renewTime + leaseDurationSeconds``)."""
        base = self.renewed_at or self.acquired_at or datetime.min.replace(tzinfo=UTC)
        return base + self.duration


def default_identity() -> str:
    """``<hostname>-<pid>-<random>``: unique per process, readable in ``kubectl get lease``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def lease_name_for(secret_name: str) -> str:
    """``lg-rotate-<secret>``, shortened with a hash suffix if it would exceed 253 chars."""
    name = LEASE_PREFIX + secret_name
    if len(name) <= 253:
        return name
    digest = uuid.uuid5(uuid.NAMESPACE_DNS, secret_name).hex[:10]
    return f"{name[: 253 - 11].rstrip('.-')}-{digest}"


class LeaseLock:
    """A lock per Secret, so two rotations never deliver to the same Secret at once.

    **What it is.** A ``coordination.k8s.io/v1`` Lease named ``lg-rotate-<secret name>``
    in the Secret's namespace (``kubectl get lease -n NS lg-rotate-linuxguard-enroll``).
    Its ``spec.holderIdentity`` names the holder (``<hostname>-<pid>-<random>``: in a
    CronJob pod, the pod name), ``spec.renewTime`` says when the holder last proved it is
    alive, ``spec.leaseDurationSeconds`` (default 60) how long that proof lasts, and
    ``spec.acquireTime`` / ``spec.leaseTransitions`` when it changed hands and how often.

    **Acquiring.** lg-rotate reads the Lease. If it does not exist, lg-rotate creates it
    holding itself (a concurrent creator makes one of the two get 409 and re-read). If it
    exists and is free (no holder), expired (``renewTime + leaseDurationSeconds`` is in
    the past) or already ours, lg-rotate patches itself in, carrying the
    ``resourceVersion`` it read: the API server answers 409 if anyone else changed the
    Lease meanwhile, and lg-rotate re-reads instead of overwriting. Otherwise the lock is
    held by a live holder: lg-rotate fails with exit code 7 (LockError) naming the holder
    and when its lock expires, or, with ``wait`` (``--lock-wait SECONDS``), polls until the
    holder releases it, it expires, or the wait runs out.

    **Holding.** While the lock is held, a background thread renews it every third of its
    duration (``renewTime`` = now), so long operations (a rollout wait) keep it. If a
    renewal finds someone else holding the Lease, the lock is *lost*: this is logged as an
    error and :meth:`ensure_held` raises LockError from then on.

    **Releasing.** On leaving the ``with lock.hold():`` block, normally or by an exception,
    lg-rotate clears ``holderIdentity`` (only if it still holds the Lease), so the next
    rotation need not wait for the expiry. The Lease object itself stays. If lg-rotate
    dies without releasing (SIGKILL, node loss), the lock expires ``leaseDurationSeconds``
    after its last renewal and the next rotation takes it over.

    **Caveat.** Expiry is judged with the local clock against the holder's ``renewTime``:
    keep node clocks in sync (NTP), as for any Kubernetes lease.

    RBAC: ``get``, ``create`` and ``patch`` on ``leases`` (``coordination.k8s.io``) in the
    Secret's namespace (``patch`` may be scoped with ``resourceNames``).
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        secret_name: str = DEFAULT_SECRET_NAME,
        duration: float = DEFAULT_LEASE_DURATION,
        wait: float = 0.0,
        poll_interval: float = 1.0,
        identity: str | None = None,
        renew: bool = True,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if duration < 1:
            raise ConfigError(
                f"the lock duration must be at least 1 second, not {duration:g}",
                fix="pass --lock-duration SECONDS (default 60)",
            )
        if wait < 0:
            raise ConfigError(f"the lock wait cannot be negative ({wait:g})", fix="pass 0 or more")
        self.api_client = api_client
        self.namespace = _check_name(namespace, what="the namespace", label=True)
        self.secret_name = _check_name(secret_name, what="the Secret name")
        self.name = lease_name_for(secret_name)
        self.duration_seconds = max(1, round(duration))
        self.wait = wait
        self.poll_interval = max(poll_interval, 0.01)
        self.identity = identity or default_identity()
        self.renew_in_background = renew
        self.clock = clock
        self.sleep = sleep
        self.request_timeout = request_timeout
        self._lost = threading.Event()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LeaseLock({self.namespace}/{self.name}, identity={self.identity!r})"

    # --- API plumbing ---

    def _op(self, verb: str) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Lease",
            resource="leases",
            group="coordination.k8s.io",
            namespace=self.namespace,
            name=None if verb == "create" else self.name,
            writes=False,
        )

    def _api(self) -> Any:
        from kubernetes import client

        return client.CoordinationV1Api(self.api_client)

    def _read(self) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = api_request(
                self.api_client,
                self._op("get"),
                self._api().read_namespaced_lease,
                name=self.name,
                namespace=self.namespace,
                _request_timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return None
        return lease

    def _patch(self, lease: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        body: dict[str, Any] = {"spec": dict(spec)}
        if version:
            body["metadata"] = {"resourceVersion": version}
        result: dict[str, Any] = api_request(
            self.api_client,
            self._op("patch"),
            self._api().patch_namespaced_lease,
            name=self.name,
            namespace=self.namespace,
            body=body,
            field_manager=FIELD_MANAGER,
            _content_type=MERGE_PATCH,
            _request_timeout=self.request_timeout,
        )
        return result

    def _holder(self, lease: Mapping[str, Any]) -> LeaseHolder | None:
        spec = lease.get("spec") or {}
        identity = spec.get("holderIdentity")
        if not identity:
            return None
        seconds = spec.get("leaseDurationSeconds") or self.duration_seconds
        return LeaseHolder(
            identity=str(identity),
            acquired_at=_optional_timestamp(spec.get("acquireTime"), what="Lease acquireTime"),
            renewed_at=_optional_timestamp(spec.get("renewTime"), what="Lease renewTime"),
            duration=timedelta(seconds=int(seconds)),
        )

    # --- public ---

    def read_holder(self) -> LeaseHolder | None:
        """The current holder (live or expired), or None if the lock is free or absent."""
        lease = self._read()
        return None if lease is None else self._holder(lease)

    @property
    def lost(self) -> bool:
        """True once a renewal found that someone else took the Lease over."""
        return self._lost.is_set()

    def ensure_held(self) -> None:
        """Raise LockError if the lock was lost while held (call before irreversible steps)."""
        if self._lost.is_set():
            raise LockError(
                f"lost the lock on Secret {self.namespace}/{self.secret_name}: Lease "
                f"{self.namespace}/{self.name} was taken over",
                fix="a renewal was missed for longer than --lock-duration; raise it, or check "
                "the API server's latency",
            )

    def try_acquire(self) -> LeaseHolder | None:
        """One attempt: None when the lock is ours now, else the live holder."""
        for _ in range(_MAX_CONFLICTS):
            lease = self._read()
            now = self.clock()
            spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration_seconds,
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
            }
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                    },
                    "spec": {**spec, "leaseTransitions": 0},
                }
                try:
                    api_request(
                        self.api_client,
                        self._op("create"),
                        self._api().create_namespaced_lease,
                        namespace=self.namespace,
                        body=body,
                        field_manager=FIELD_MANAGER,
                        _request_timeout=self.request_timeout,
                    )
                except KubernetesConflictError:
                    continue  # created by someone else meanwhile: look at it
                return None
            holder = self._holder(lease)
            if holder is not None and holder.identity != self.identity and holder.expires_at >= now:
                return holder
            transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0)
            if holder is None or holder.identity != self.identity:
                transitions += 1
            try:
                self._patch(lease, {**spec, "leaseTransitions": transitions})
            except (KubernetesConflictError, KubernetesNotFoundError):
                continue  # changed or deleted meanwhile: look again
            if holder is not None and holder.identity != self.identity:
                logger.warning(
                    "took over the expired lock Lease %s/%s from %s (expired %s)",
                    self.namespace,
                    self.name,
                    holder.identity,
                    format_timestamp(holder.expires_at),
                )
            return None
        raise LockError(
            f"Lease {self.namespace}/{self.name} kept changing while lg-rotate tried to take it",
            fix="several rotations are starting at once; retry, or pass --lock-wait SECONDS",
        )

    def acquire(self) -> None:
        """Take the lock, waiting up to ``wait`` seconds for a live holder; else LockError."""
        deadline = self.clock() + timedelta(seconds=self.wait)
        while True:
            holder = self.try_acquire()
            if holder is None:
                self._lost.clear()
                logger.info(
                    "holding lock Lease %s/%s as %s", self.namespace, self.name, self.identity
                )
                return
            now = self.clock()
            if now >= deadline:
                waited = f" after waiting {self.wait:g}s" if self.wait else ""
                raise LockError(
                    f"Secret {self.namespace}/{self.secret_name} is locked by {holder.identity}"
                    f"{waited} (Lease {self.namespace}/{self.name}, expires "
                    f"{format_timestamp(holder.expires_at)} unless renewed)",
                    fix="another rotation is running: let it finish, or pass --lock-wait SECONDS; "
                    "a crashed holder's lock lapses by itself at that time",
                )
            remaining = (deadline - now).total_seconds()
            until_expiry = max((holder.expires_at - now).total_seconds(), 0.0)
            logger.info(
                "lock Lease %s/%s is held by %s; waiting (up to %.0fs more)",
                self.namespace,
                self.name,
                holder.identity,
                remaining,
            )
            self.sleep(max(min(self.poll_interval, remaining, until_expiry + 0.01), 0.0))

    def renew(self) -> None:
        """Refresh ``renewTime``; LockError if someone else holds the Lease now."""
        for _ in range(_MAX_CONFLICTS):
            lease = self._read()
            holder = None if lease is None else self._holder(lease)
            if lease is None or holder is None or holder.identity != self.identity:
                self._lost.set()
                other = holder.identity if holder else "nobody"
                raise LockError(
                    f"lost the lock Lease {self.namespace}/{self.name}: it is now held by {other}",
                    fix="a renewal was missed for longer than --lock-duration; raise it",
                )
            try:
                self._patch(lease, {"renewTime": _micro_time(self.clock())})
            except KubernetesConflictError:
                continue
            return
        raise LockError(
            f"Lease {self.namespace}/{self.name} kept changing while lg-rotate renewed it",
            fix="another process is writing this Lease; check for a second lg-rotate",
        )

    def release(self) -> bool:
        """Clear the holder if it is still us; True if released. The Lease object stays."""
        for _ in range(_MAX_CONFLICTS):
            lease = self._read()
            holder = None if lease is None else self._holder(lease)
            if lease is None or holder is None or holder.identity != self.identity:
                logger.warning(
                    "not releasing lock Lease %s/%s: it is held by %s, not by us",
                    self.namespace,
                    self.name,
                    holder.identity if holder else "nobody",
                )
                return False
            try:
                self._patch(lease, {"holderIdentity": None, "renewTime": _micro_time(self.clock())})
            except KubernetesConflictError:
                continue
            logger.info("released lock Lease %s/%s", self.namespace, self.name)
            return True
        logger.warning(
            "could not release lock Lease %s/%s: it kept changing", self.namespace, self.name
        )
        return False

    def _renew_forever(self) -> None:
        interval = self.duration_seconds / 3
        while not self._stop_renewing.wait(interval):
            try:
                self.renew()
            except LockError as exc:
                logger.error("%s", exc.one_line())
                return
            except LgRotateError as exc:  # transient: the next renewal may work
                logger.warning(
                    "could not renew lock Lease %s/%s: %s",
                    self.namespace,
                    self.name,
                    exc.one_line(),
                )

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block (renewed in the background); always release."""
        self.acquire()
        if self.renew_in_background:
            self._stop_renewing.clear()
            self._renewer = threading.Thread(
                target=self._renew_forever, name=f"lease-renew-{self.name}", daemon=True
            )
            self._renewer.start()
        try:
            yield
        finally:
            self._stop_renewing.set()
            if self._renewer is not None:
                self._renewer.join(timeout=self.request_timeout + 5)
                self._renewer = None
            try:
                self.release()
            except LgRotateError as exc:
                logger.warning(
                    "could not release lock Lease %s/%s (it lapses by itself in %ds): %s",
                    self.namespace,
                    self.name,
                    self.duration_seconds,
                    exc.one_line(),
                )


# --- workloads -------------------------------------------------------------------------


def _workload_op(verb: str, kind: WorkloadKind, namespace: str, name: str) -> ApiOp:
    return ApiOp(
        verb=verb,
        kind={"daemonset": "DaemonSet", "deployment": "Deployment", "statefulset": "StatefulSet"}[
            kind
        ],
        resource=f"{kind}s",
        group="apps",
        namespace=namespace,
        name=name,
        writes=False,
    )


def restart_workload(
    *,
    api_client: ApiClient,
    namespace: str,
    kind: str,
    name: str,
    at: datetime,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> None:
    """Restart a DaemonSet, Deployment or StatefulSet like ``kubectl rollout restart``.

    Sets ``spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]`` to
    ``at``, which changes the pod template, so the controller replaces the pods under
    the workload's update strategy. RBAC: ``patch`` on the workload (``apps``).
    """
    from kubernetes import client

    canonical = _workload_kind(kind)
    body = {
        "spec": {
            "template": {
                "metadata": {"annotations": {RESTARTED_AT_ANNOTATION: format_timestamp(at)}}
            }
        }
    }
    apps = client.AppsV1Api(api_client)
    api_request(
        api_client,
        _workload_op("patch", canonical, namespace, name),
        getattr(apps, f"patch_namespaced_{_WORKLOAD_API[canonical]}"),
        name=name,
        namespace=namespace,
        body=body,
        field_manager=FIELD_MANAGER,
        _content_type=MERGE_PATCH,
        _request_timeout=request_timeout,
    )
    logger.info(
        "restarted %s %s/%s (restartedAt %s)", canonical, namespace, name, format_timestamp(at)
    )


@dataclass(frozen=True, kw_only=True)
class RolloutProgress:
    """Where a workload's rollout stands, from its status (the numbers are pods)."""

    kind: WorkloadKind
    namespace: str
    name: str
    generation: int | None
    observed_generation: int | None
    desired: int
    updated: int
    ready: int
    available: int
    done: bool

    def describe(self) -> str:
        if not self.observed:
            return (
                f"{self.kind} {self.namespace}/{self.name}: the controller has not seen "
                f"generation {self.generation} yet"
            )
        return (
            f"{self.kind} {self.namespace}/{self.name}: {self.updated} of {self.desired} pods "
            f"updated, {self.available} available"
        )

    @property
    def observed(self) -> bool:
        if self.generation is None:
            return True
        return self.observed_generation is not None and self.observed_generation >= self.generation


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def _rollout_progress(
    kind: WorkloadKind, namespace: str, name: str, obj: Mapping[str, Any]
) -> RolloutProgress:
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation = metadata.get("generation")
    observed_generation = status.get("observedGeneration")
    strategy = (spec.get("updateStrategy") or {}).get("type")
    if kind in ("daemonset", "statefulset") and strategy == "OnDelete":
        raise KubernetesError(
            f"{kind} {namespace}/{name} uses the OnDelete update strategy: a restart does not "
            "replace its pods",
            fix="switch it to RollingUpdate, or delete its pods yourself",
        )
    if kind == "daemonset":
        desired = _int(status.get("desiredNumberScheduled"))
        updated = _int(status.get("updatedNumberScheduled"))
        ready = _int(status.get("numberReady"))
        available = _int(status.get("numberAvailable"))
        complete = updated == desired and available == desired
    elif kind == "deployment":
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Progressing" and (
                condition.get("reason") == "ProgressDeadlineExceeded"
            ):
                raise KubernetesError(
                    f"deployment {namespace}/{name} exceeded its progress deadline",
                    fix=f"check its pods: kubectl -n {namespace} describe deployment {name}",
                )
        desired = _int(spec.get("replicas"), 1)
        updated = _int(status.get("updatedReplicas"))
        ready = _int(status.get("readyReplicas"))
        available = _int(status.get("availableReplicas"))
        total = _int(status.get("replicas"))
        complete = updated >= desired and total <= updated and available >= updated
    else:
        desired = _int(spec.get("replicas"), 1)
        updated = _int(status.get("updatedReplicas"))
        ready = _int(status.get("readyReplicas"))
        available = _int(status.get("availableReplicas"), ready)
        partition = _int(
            ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition")
        )
        if partition:
            complete = ready >= desired and updated >= desired - partition
        else:
            revisions = status.get("currentRevision"), status.get("updateRevision")
            same_revision = None in revisions or revisions[0] == revisions[1]
            complete = ready >= desired and updated >= desired and same_revision
    progress = RolloutProgress(
        kind=kind,
        namespace=namespace,
        name=name,
        generation=_int(generation) if generation is not None else None,
        observed_generation=_int(observed_generation) if observed_generation is not None else None,
        desired=desired,
        updated=updated,
        ready=ready,
        available=available,
        done=False,
    )
    return replace(progress, done=progress.observed and complete)


def wait_for_rollout(
    *,
    api_client: ApiClient,
    namespace: str,
    kind: str,
    name: str,
    timeout: float,
    on_progress: Callable[[RolloutProgress], None] | None = None,
    poll_interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> RolloutProgress:
    """Poll a workload until its rollout is complete, like ``kubectl rollout status``.

    Complete means the controller has observed the latest generation and, for a
    DaemonSet, every scheduled pod is updated and available (``updatedNumberScheduled``
    and ``numberAvailable`` equal ``desiredNumberScheduled``); for a Deployment, the
    updated replicas reach ``spec.replicas``, no old replicas remain and the updated ones
    are available; for a StatefulSet, the replicas are ready and on the update revision.
    ``on_progress`` is called with each new state. RolloutTimeoutError after ``timeout``
    seconds. RBAC: ``get`` on the workload.
    """
    from kubernetes import client

    canonical = _workload_kind(kind)
    apps = client.AppsV1Api(api_client)
    read = getattr(apps, f"read_namespaced_{_WORKLOAD_API[canonical]}")
    deadline = clock() + timeout
    last: RolloutProgress | None = None
    while True:
        obj = api_request(
            api_client,
            _workload_op("get", canonical, namespace, name),
            read,
            name=name,
            namespace=namespace,
            _request_timeout=request_timeout,
        )
        progress = _rollout_progress(canonical, namespace, name, obj)
        if progress != last:
            logger.info("rollout: %s", progress.describe())
            if on_progress is not None:
                on_progress(progress)
            last = progress
        if progress.done:
            return progress
        remaining = deadline - clock()
        if remaining <= 0:
            raise RolloutTimeoutError(
                f"{canonical} {namespace}/{name} did not finish rolling out within "
                f"{timeout:g}s ({progress.describe()})",
                fix=f"check its pods (kubectl -n {namespace} rollout status {canonical}/{name}; "
                "an agent that cannot enrol crash-loops), or raise the rollout timeout",
            )
        sleep(min(poll_interval, remaining))


# --- events ----------------------------------------------------------------------------


def read_secret_uid(api_client: ApiClient, namespace: str, name: str, timeout: float) -> str | None:
    from kubernetes import client

    op = ApiOp(
        verb="get",
        kind="Secret",
        resource="secrets",
        group="",
        namespace=namespace,
        name=name,
        writes=False,
    )
    try:
        secret = api_request(
            api_client,
            op,
            client.CoreV1Api(api_client).read_namespaced_secret,
            name=name,
            namespace=namespace,
            _request_timeout=timeout,
        )
    except LgRotateError:
        return None
    uid = (secret.get("metadata") or {}).get("uid")
    return str(uid) if uid else None


def record_event(
    *,
    api_client: ApiClient,
    namespace: str,
    secret_name: str,
    reason: str,
    message: str,
    type: str = "Normal",  # the Event field's own name
    secret_uid: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    request_timeout: float = 10.0,
) -> bool:
    """Record a core/v1 Event on the Secret (``kubectl describe secret`` shows it).

    Best effort: a failure is logged and swallowed (returns False). Anything token-shaped
    in ``message`` is redacted before it leaves the process. RBAC: ``create`` on
    ``events``.
    """
    from kubernetes import client

    safe_message = TOKEN_SHAPED.sub(REDACTED, message)[:_EVENT_MESSAGE_LIMIT]
    now = format_timestamp(clock())
    host = socket.gethostname()
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "name": secret_name,
        "namespace": namespace,
    }
    if secret_uid is None:
        secret_uid = read_secret_uid(api_client, namespace, secret_name, request_timeout)
    if secret_uid:  # kubectl describe matches events by the object's uid
        involved["uid"] = secret_uid
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{secret_name}.{uuid.uuid4().hex[:16]}",
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
        },
        "involvedObject": involved,
        "reason": reason,
        "message": safe_message,
        "type": type,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": FIELD_MANAGER, "host": host},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": host,
    }
    op = ApiOp(
        verb="create",
        kind="Event",
        resource="events",
        group="",
        namespace=namespace,
        name=None,
        writes=True,
    )
    try:
        api_request(
            api_client,
            op,
            client.CoreV1Api(api_client).create_namespaced_event,
            namespace=namespace,
            body=body,
            _request_timeout=request_timeout,
        )
    except LgRotateError as exc:
        logger.warning(
            "could not record the %s event on Secret %s/%s: %s",
            reason,
            namespace,
            secret_name,
            exc.one_line(),
        )
        return False
    except Exception as exc:  # events are best effort: never fail a rotation for one
        logger.warning(
            "could not record the %s event on Secret %s/%s: %s",
            reason,
            namespace,
            secret_name,
            exc.__class__.__name__,
        )
        return False
    return True
