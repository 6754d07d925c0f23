"""The plumbing every Kubernetes module shares: connecting, one API call, its errors, names.

The official ``kubernetes`` client is imported inside the functions that use it, so
importing this package stays cheap (``lg-rotate --help`` and the Docker wrapper never pay
for it). Only its plumbing is used: ``kubernetes.config`` (kubeconfig contexts, exec
plugins, in-cluster), ``ApiClient`` (authentication headers, TLS, the connection pool) and
its REST layer. Every call is a plain JSON request, :func:`api_request` (method, path,
query, body), never a generated API class (``CoreV1Api`` and co.): importing one builds
pydantic models for the types its methods mention, over a second for ``CoreV1Api`` with
kubernetes 37, which a one-shot ``lg-rotate rotate`` would pay on every run.
:func:`official_client` also keeps ``kubernetes/__init__.py`` from importing the dynamic
client, the websocket streams and the rest on that path (``tests/test_cold_start.py``).

Answers are read as plain JSON rather than through the client's generated models: the
models' validation differs between client releases, and the JSON is exactly what the API
server documents.

Security: the token only ever travels in the ``data`` of a create/patch body. Errors from
write requests never quote the server's answer (an admission webhook or a validation error
may echo the request body), and are not chained to the client's exception (whose text
includes that answer).
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import quote

from rotator.errors import (
    ConfigError,
    KubernetesError,
)
from rotator.tokens import (
    parse_timestamp,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient
    from urllib3 import BaseHTTPResponse

logger = logging.getLogger("lg_rotate.kube")

DEFAULT_SECRET_NAME = "linuxguard-enroll"  # noqa: S105 - a name, not a secret
MAX_CONFLICTS = 5  # 409s re-read and retried before giving up
FIELD_MANAGER = "lg-rotate"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
DEFAULT_REQUEST_TIMEOUT = 30.0
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"  # RFC 6902: one field of a list item
JSON = "application/json"
# Metadata only (no data: never a token) for a Secret list or get: the API server's
# PartialObjectMetadata conversion, asked for in the Accept header.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;v=v1;g=meta.k8s.io"
METADATA_ONE = "application/json;as=PartialObjectMetadata;v=v1;g=meta.k8s.io"
# The API paths lg-rotate calls; {namespace} and {name} come from the call's ApiOp.
SECRETS_PATH = "/api/v1/namespaces/{namespace}/secrets"
SECRET_PATH = SECRETS_PATH + "/{name}"
PODS_PATH = "/api/v1/namespaces/{namespace}/pods"
POD_PATH = PODS_PATH + "/{name}"
EVENTS_PATH = "/api/v1/namespaces/{namespace}/events"
LEASES_PATH = "/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
LEASE_PATH = LEASES_PATH + "/{name}"


def workload_path(resource: str) -> str:
    """The path of an ``apps/v1`` workload: ``daemonsets``, ``deployments``, ``statefulsets``."""
    return f"/apis/apps/v1/namespaces/{{namespace}}/{resource}/{{name}}"


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")


# --- errors ----------------------------------------------------------------------------


class KubernetesNotFoundError(KubernetesError):
    """404: the object (or, for a create, its namespace) does not exist."""


class KubernetesConflictError(KubernetesError):
    """409: a concurrent writer changed the object (stale resourceVersion), or it exists."""


class KubernetesForbiddenError(KubernetesError):
    """403: RBAC (or an admission policy) refused the call."""


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
        if not self.namespace:  # cluster-scoped (a MutatingWebhookConfiguration)
            return f"{self.kind} {self.name}"
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
        where, role = (
            (f"in namespace {op.namespace!r}", "Role")
            if op.namespace
            else ("cluster-wide", "ClusterRole")  # a cluster-scoped object
        )
        return KubernetesForbiddenError(
            f"forbidden (403): lg-rotate may not {op.verb} {op.what}; it needs the RBAC verb "
            f"'{op.verb}' on '{op.resource}{group}' {where}",
            fix=f'add to its {role}: apiGroups: ["{op.group}"], resources: ["{op.resource}"], '
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


# --- the official client, without its generated API classes -----------------------------


@dataclass(frozen=True)
class OfficialClient:
    """The parts of the official ``kubernetes`` client lg-rotate uses."""

    config: Any  # the kubernetes.config module: kubeconfig, exec plugins, in-cluster
    api_client_type: type[ApiClient]
    configuration_type: Any  # kubernetes.client.Configuration
    api_exception: type[Exception]  # kubernetes.client.exceptions.ApiException


_official: OfficialClient | None = None
_official_lock = threading.Lock()


def official_client() -> OfficialClient:
    """Import ``kubernetes.config`` and ``kubernetes.client.api_client``, and nothing more.

    ``import kubernetes.<anything>`` first runs ``kubernetes/__init__.py``, which imports
    ``kubernetes.config`` and also the dynamic client (``kubernetes_validate`` and
    jsonschema when installed), the websocket streams, the informer, leader election and
    the utilities: a third of a second of CPU here that a one-shot rotation never uses. So,
    unless something in this process imported ``kubernetes`` already, the package is
    registered without running its ``__init__`` (:func:`_defer_package_init`); its
    submodules import as usual, and the first attribute asked of the package that is not
    there yet (``kubernetes.__version__``, ``from kubernetes import dynamic``) runs the real
    ``__init__``. ``kubernetes.client`` itself is lazy (kubernetes 37): its API classes and
    models are imported only when named, and lg-rotate never names them. google-auth, which
    ``kubernetes.config`` imports for the legacy ``gcp`` auth provider, is imported only
    when a kubeconfig uses that provider (:func:`_import_kube_config`).
    """
    global _official  # noqa: PLW0603 - a process-wide import, done once
    with _official_lock:
        if _official is None:
            _defer_package_init("kubernetes")
            try:
                config = _import_kube_config()
                api_client_module = importlib.import_module("kubernetes.client.api_client")
                configuration_module = importlib.import_module("kubernetes.client.configuration")
                exceptions_module = importlib.import_module("kubernetes.client.exceptions")
            except ImportError as exc:
                raise ConfigError(
                    f"the Kubernetes client is not usable: {exc}",
                    fix="pip install 'linuxguard-rotator' (from a clone: pip install .; it depends "
                    "on kubernetes), or pass "
                    "--target none to only mint and store",
                ) from exc
            _official = OfficialClient(
                config=config,
                api_client_type=api_client_module.ApiClient,
                configuration_type=configuration_module.Configuration,
                api_exception=exceptions_module.ApiException,
            )
        return _official


def _import_kube_config() -> ModuleType:
    """``kubernetes.config``, with google-auth imported only if a kubeconfig needs it.

    ``kubernetes.config.kube_config`` tries ``import google.auth`` (and its requests
    transport, which loads the ``cryptography`` primitives) at import, for kubeconfig users
    with ``auth-provider: {name: gcp}``, the provider kubectl dropped in 1.26 for the
    ``gke-gcloud-auth-plugin`` exec plugin. That is about 80 ms of CPU and 13 MiB per run
    where google-auth is installed (the image's GCP extra). So the module is imported with
    google.auth hidden, then given, in place of the ``google`` it would have imported, a
    stand-in that imports google.auth on first use; ``google_auth_available`` is set as
    the module would have set it. Those two globals are all it reads at refresh time.
    """
    if "kubernetes.config.kube_config" in sys.modules or "google.auth" in sys.modules:
        return importlib.import_module("kubernetes.config")
    sys.modules["google.auth"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        config = importlib.import_module("kubernetes.config")
    finally:
        if sys.modules.get("google.auth", False) is None:
            del sys.modules["google.auth"]
    kube_config = sys.modules["kubernetes.config.kube_config"]
    if not getattr(kube_config, "google_auth_available", True) and _installed("google.auth"):
        kube_config.google = _GoogleOnDemand()  # type: ignore[attr-defined]
        kube_config.google_auth_available = True  # type: ignore[attr-defined]
    return config


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package
        return False


class _GoogleOnDemand:
    """Stands for the ``google`` package in ``kube_config``: imports google-auth when used."""

    def __getattr__(self, name: str) -> Any:
        importlib.import_module("google.auth")
        importlib.import_module("google.auth.transport.requests")
        return getattr(sys.modules["google"], name)


def _defer_package_init(name: str) -> None:
    """Register package ``name`` in ``sys.modules`` without running its ``__init__`` yet.

    Its submodules import as usual (the module has the real ``__path__`` and spec). The
    first attribute looked up on it that it does not have runs the real ``__init__`` in
    it (a module ``__getattr__``, PEP 562), so code that imports the package the ordinary
    way later in the process (tests, ``lg-rotate audit --cluster``) sees the whole package.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed, or not a package: the import that follows says so
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.RLock()

    def complete(attribute: str) -> Any:
        with lock:
            if package.__dict__.get("__getattr__") is complete:
                del package.__dict__["__getattr__"]
                logger.debug("importing the whole %s package (for %s)", name, attribute)
                loader.exec_module(package)
        return ModuleType.__getattribute__(package, attribute)

    package.__dict__["__getattr__"] = complete
    sys.modules[name] = package


# --- one API call ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Refusal:
    """A non-2xx answer, shaped like the client's ``ApiException`` for :func:`api_error`."""

    status: int
    reason: str
    body: str


Query = Mapping[str, str | int | bool | None]


def api_path(path: str, op: ApiOp) -> str:
    """``path`` with ``{namespace}`` and ``{name}`` filled in from ``op``, URL-quoted."""
    if "{name}" in path and not op.name:  # else ".../secrets/": the whole collection
        raise ValueError(f"{path} needs an ApiOp with a name ({op.verb} {op.kind})")
    return path.format(namespace=quote(op.namespace, safe=""), name=quote(op.name or "", safe=""))


def _query_pairs(query: Query | None) -> list[tuple[str, str]]:
    pairs = []
    for key, value in (query or {}).items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        pairs.append((key, text))
    return pairs


def _send(
    api_client: ApiClient,
    op: ApiOp,
    method: str,
    path: str,
    *,
    query: Query | None,
    body: Any,
    content_type: str | None,
    accept: str,
    timeout: float | tuple[float, float] | None,
) -> Any:
    """Send one request through the client's ``ApiClient``; its ``RESTResponse`` if 2xx.

    ``param_serialize`` with the ``BearerToken`` auth setting is what the generated API
    classes call too: it adds the default headers and the bearer token, refreshed by the
    kubeconfig's exec plugin or the in-cluster token file when due.
    """
    from urllib3.exceptions import HTTPError as TransportError

    official = official_client()
    headers = {"Accept": accept}
    if body is not None:
        headers["Content-Type"] = content_type or JSON
    refused: KubernetesError | None = None
    try:
        request = api_client.param_serialize(
            method=method,
            resource_path=api_path(path, op),
            query_params=_query_pairs(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = api_client.call_api(*request, _request_timeout=timeout)
        if not 200 <= int(response.status) <= 299:
            try:
                answer = response.read() or b""  # type: ignore[no-untyped-call]
            finally:
                response.response.release_conn()
            refused = api_error(
                _Refusal(
                    status=int(response.status),
                    reason=str(response.reason or ""),
                    body=answer.decode("utf-8", "replace"),
                ),
                op,
            )
    except (TransportError, official.api_exception) as exc:
        # The REST layer turns TLS failures into an ApiException with status 0.
        host = getattr(getattr(api_client, "configuration", None), "host", "?")
        raise KubernetesError(
            f"cannot reach the Kubernetes API at {host} to {op.verb} {op.what}: "
            f"{transport_reason(exc)}",
            fix="check the cluster address (kubeconfig server or KUBERNETES_SERVICE_HOST), that "
            "the API server is up, and that a NetworkPolicy allows egress to it",
        ) from exc
    if refused is not None:
        # Raised outside any handler and chained to nothing: the answer to a write may echo
        # the request body (the token); api_error quotes it only for reads.
        raise refused
    return response


def api_request(
    api_client: ApiClient,
    op: ApiOp,
    method: str,
    path: str,
    /,
    *,
    query: Query | None = None,
    body: Any = None,
    content_type: str | None = None,
    accept: str = JSON,
    timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
) -> Any:
    """Send one request and return its JSON answer; raise lg-rotate errors only.

    ``path`` is the API path with ``{namespace}`` and ``{name}`` filled in from ``op``
    (``"/api/v1/namespaces/{namespace}/secrets/{name}"``); ``query`` the query parameters
    (``fieldManager``, ``dryRun``, ``labelSelector``...; None values are left out, booleans
    are ``true``/``false``); ``body`` a JSON-serialisable object, sent as ``content_type``
    (default ``application/json``; ``MERGE_PATCH`` for a merge patch); ``accept`` the
    answer's media type (``METADATA_LIST`` for metadata only).

    Errors: :func:`api_error` (with RBAC hints) for a refusal, a transport error naming the
    server, and never the server's answer to a write.
    """
    response = _send(
        api_client,
        op,
        method,
        path,
        query=query,
        body=body,
        content_type=content_type,
        accept=accept,
        timeout=timeout,
    )
    try:
        data = response.read()
    finally:
        response.response.release_conn()
    return _json_answer(data, op)


def api_stream(
    api_client: ApiClient,
    op: ApiOp,
    path: str,
    /,
    *,
    query: Query | None = None,
    timeout: float | tuple[float, float] | None = DEFAULT_REQUEST_TIMEOUT,
) -> BaseHTTPResponse:
    """A GET whose answer is read as it arrives (a watch): the open urllib3 response.

    The caller reads it (``stream()``) and releases it (``release_conn()``); errors as for
    :func:`api_request`.
    """
    response = _send(
        api_client,
        op,
        "GET",
        path,
        query=query,
        body=None,
        content_type=None,
        accept=JSON,
        timeout=timeout,
    )
    stream: BaseHTTPResponse = response.response
    return stream


def _json_answer(data: bytes | str | None, op: ApiOp) -> Any:
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


@dataclass(frozen=True, kw_only=True)
class Connection:
    """A connected ``ApiClient`` and what kubectl would take from its configuration."""

    api_client: ApiClient
    in_cluster: bool
    kubeconfig: str | None  # the kubeconfig file(s) read; None in-cluster
    context: str | None  # the context used (--context, else the current one)
    namespace: str | None  # that context's namespace, when it sets one

    def describe_context(self) -> str:
        return f"context {self.context} ({self.kubeconfig})"


def connect(*, kubeconfig: str | None = None, context: str | None = None) -> ApiClient:
    """An ``ApiClient`` for the cluster lg-rotate should talk to (see :func:`open_connection`)."""
    return open_connection(kubeconfig=kubeconfig, context=context).api_client


def open_connection(*, kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """Connect to the cluster lg-rotate should talk to, and say how.

    Inside a pod (``KUBERNETES_SERVICE_HOST`` is set) and with neither ``kubeconfig``,
    ``KUBECONFIG`` nor ``context`` given, the pod's ServiceAccount is used (in-cluster
    configuration). Otherwise the kubeconfig is loaded: ``kubeconfig`` if given, else the
    ``KUBECONFIG`` variable (colon-separated files are merged), else ``~/.kube/config``;
    ``context`` picks a context other than the current one. The connection carries the
    context's namespace (kubectl's default namespace when ``-n`` is not given).
    """
    official = official_client()
    config = official.config

    explicit = kubeconfig or os.environ.get("KUBECONFIG") or context
    if not explicit and os.environ.get("KUBERNETES_SERVICE_HOST"):
        configuration = type.__call__(official.configuration_type)
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            _raise_config(
                f"running in a pod, but the in-cluster Kubernetes configuration is unusable: {exc}",
                fix="mount a ServiceAccount token (automountServiceAccountToken: true), or pass "
                "--kubeconfig",
                cause=exc,
            )
        return Connection(
            api_client=official.api_client_type(configuration),
            in_cluster=True,
            kubeconfig=None,
            context=None,
            namespace=None,
        )

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
    chosen, namespace = _kubeconfig_context(paths, context)
    try:
        api_client: ApiClient = config.new_client_from_config(
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
    _warn_if_unverified(api_client)
    return Connection(
        api_client=api_client,
        in_cluster=False,
        kubeconfig=paths,
        context=chosen,
        namespace=namespace,
    )


_warned_unverified: set[str] = set()


def _warn_if_unverified(api_client: ApiClient) -> None:
    """One warning of lg-rotate's own for a kubeconfig with ``insecure-skip-tls-verify``.

    urllib3 would otherwise warn on every request (an InsecureRequestWarning, two lines of
    Python warning text each, in the middle of the JSON log stream): those are silenced,
    for that warning class only, and only when verification is off.
    """
    configuration = api_client.configuration
    if getattr(configuration, "verify_ssl", True):
        return
    import warnings

    from urllib3.exceptions import InsecureRequestWarning

    warnings.filterwarnings("ignore", category=InsecureRequestWarning)
    host = str(getattr(configuration, "host", "") or "the API server")
    if host in _warned_unverified:  # once per process and server, however many clients
        return
    _warned_unverified.add(host)
    logger.warning(
        "TLS verification of the Kubernetes API is off (insecure-skip-tls-verify in the "
        "kubeconfig): %s is not authenticated, and whoever can intercept the connection can "
        "read the token lg-rotate writes; put the cluster's CA in certificate-authority-data "
        "instead",
        host,
    )


def _kubeconfig_context(paths: str, context: str | None) -> tuple[str | None, str | None]:
    """The context to use (``context``, else the current one) and its namespace."""
    config = official_client().config
    try:
        contexts, current = config.list_kube_config_contexts(config_file=paths)
    except config.ConfigException as exc:
        if context is None:  # no current context either: new_client_from_config says more
            return None, None
        _raise_config(
            f"cannot read the kubeconfig {paths}: {exc}",
            fix="check the file (kubectl config view)",
            cause=exc,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return context, None  # left to new_client_from_config, which reports it
    by_name = {str(item.get("name")): item for item in contexts or [] if isinstance(item, dict)}
    if context is not None and context not in by_name:
        _raise_config(
            f"the kubeconfig {paths} has no context {context!r} (it has: "
            f"{', '.join(sorted(by_name)) or 'none'})",
            fix="pick one of those with --context (kubectl config get-contexts)",
        )
    name = context or (str(current.get("name")) if isinstance(current, dict) else None)
    entry = by_name.get(name or "") or {}
    namespace = (entry.get("context") or {}).get("namespace")
    return name, str(namespace) if namespace else None


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

    Never exactly on a whole second: a body that goes through the client's generated models
    (kubernetes 37's API classes turn it into a model and back; lg-rotate's own requests no
    longer do, tests and other tools may) loses a zero fraction to ``isoformat()``, which the
    API server's MicroTime parser (exactly six digits) rejects. One microsecond later is
    harmless.
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
