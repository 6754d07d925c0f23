"""The plumbing every Kubernetes module shares: connecting, one API call, its errors, names.

The official ``kubernetes`` client is imported inside the functions that use it, so
importing this package stays cheap (``lg-rotate --help`` and the Docker wrapper never pay
for it).

Answers are read as plain JSON (``_preload_content=False``) rather than through the
client's generated models: the models' validation differs between client releases, and
the JSON is exactly what the API server documents.

Security: the token only ever travels in the ``data`` of a create/patch body. Errors from
write requests never quote the server's answer (an admission webhook or a validation error
may echo the request body), and are not chained to the client's exception (whose text
includes that answer).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from rotator.errors import (
    ConfigError,
    KubernetesError,
)
from rotator.tokens import (
    parse_timestamp,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger("lg_rotate.kube")

DEFAULT_SECRET_NAME = "linuxguard-enroll"  # noqa: S105 - a name, not a secret
MAX_CONFLICTS = 5  # 409s re-read and retried before giving up
FIELD_MANAGER = "lg-rotate"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
DEFAULT_REQUEST_TIMEOUT = 30.0
MERGE_PATCH = "application/merge-patch+json"
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")


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


def check_name(value: str, *, what: str, label: bool = False) -> str:
    pattern, limit = (_DNS_LABEL, 63) if label else (_DNS_SUBDOMAIN, 253)
    if not value or len(value) > limit or not pattern.fullmatch(value):
        kind = "DNS label" if label else "DNS subdomain"
        raise ConfigError(
            f"{what} {value!r} is not a valid Kubernetes name",
            fix=f"use a {kind}: lowercase letters, digits and '-', at most {limit} characters",
        )
    return value


def check_data_key(value: str, *, what: str) -> str:
    if not value or len(value) > 253 or not _DATA_KEY.fullmatch(value):
        raise ConfigError(
            f"{what} {value!r} is not a valid Secret key",
            fix="use letters, digits, '-', '_' and '.' only",
        )
    return value


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def micro_time(value: datetime) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, in UTC.

    Never exactly on a whole second: kubernetes client 37 turns a create body into its model
    and back, and ``isoformat()`` then drops a zero fraction, which the API server's
    MicroTime parser (exactly six digits) rejects. One microsecond later is harmless.
    """
    value = value.astimezone(UTC)
    if value.microsecond == 0:
        value = value.replace(microsecond=1)
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def optional_timestamp(value: Any, *, what: str) -> datetime | None:
    if not value:
        return None
    try:
        return parse_timestamp(str(value))
    except ValueError:
        logger.warning("ignoring %s: %r is not an RFC 3339 timestamp", what, value)
        return None
