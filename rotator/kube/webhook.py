"""``lg-rotate webhook``: a mutating admission webhook giving every agent pod a token of its own.

DESIGN.md §3 "Per-pod Secrets"; :mod:`rotator.kube.podsecrets` is the contract this module
shares with ``lg-rotate watch``. The map of this module:

**The review (pure functions).** :func:`parse_review` reads an ``admission.k8s.io/v1``
AdmissionReview; :func:`plan_admission` decides what to do with it; :func:`json_patch` and
:func:`review_response` write the answer. A pod is *ours* when it is created (``CREATE``) in
``--namespace``, matches ``--selector`` (when given), and one of its containers or
initContainers names the shared Secret in ``env[].valueFrom.secretKeyRef`` (or
``envFrom[].secretRef``). Its answer is a JSONPatch that points those references at the pod's
own Secret and adds the ``linuxguard.io/enroll-secret`` annotation. The token is never in the
pod, the patch, the response, a log line or a metric: the patch names only the Secret.

* **Reinvocation** (``reinvocationPolicy: IfNeeded``): a pod that already carries the
  annotation naming *this admission's* Secret is left unchanged, except for references to
  the shared Secret that another webhook added since, which are pointed at the same Secret
  (no mint).
* **A copied pod** (``kubectl get pod -o yaml`` fed back to ``kubectl create``) carries the
  annotation and references of *another* admission's Secret, whose token another pod has
  consumed: those references are treated like references to the shared Secret (a fresh
  Secret and token for this pod).
* **Dry run** (``dryRun: true``, ``sideEffects: NoneOnDryRun``): nothing is minted, stored or
  created. The answer is the same patch a real create would get, naming the Secret the real
  admission would create (named after the request uid, which the dry-run request has too),
  so ``kubectl create --dry-run=server -o yaml`` shows the pod as it would really be. That
  Secret does not exist.

**Naming and adoption.** The per-pod Secret is named after the admission request uid
(:func:`~rotator.kube.podsecrets.pod_secret_name`): the pod has no name (``generateName``) nor
UID yet. Before minting, the webhook reads that name: a retried admission (the API server
calls again with the same uid after a broken connection) finds its Secret (read as metadata
only: no existing token ever reaches the webhook), checks its
``linuxguard.io/admission-uid`` annotation and answers with the same patch, without minting. A
create that races such a retry gets ``409 AlreadyExists``, reads the Secret, checks the uid and
reuses it (the token it minted is then unused and expires). Adoption (the ownerReference to the
pod, once it has a UID), refreshing a token whose pod has not started before it expires, and
deleting Secrets no pod names within :data:`~rotator.kube.podsecrets.ADOPTION_GRACE` are the
work of ``lg-rotate watch``.

**Store records.** Every per-pod token is written to the store before its Secret is created
(the store stays the system of record), following the rotation protocol's order:
``write_pending`` -> create the Secret -> ``promote`` (the promotion runs after the answer,
off the admission's critical path). Records do not go to the tenant's own record (whose
*pending* version ``rotate``/``watch`` would deliver to the shared Secret, handing a pod's
token to everyone) but to ``--record-shards`` (default 16) records of their own,
``<tenant>-per-pod-<n>`` (:func:`per_pod_record_key`; a name every provider accepts; ``watch``
records the tokens it refreshes in ``<tenant>-per-pod``), the shard chosen by a hash of the
admission uid. Measured on OpenBao (Vault KV v2) with one record and no coordination, 16
concurrent writers lost 52 % of their writes after the provider's five check-and-set attempts
(4 writers: 15 %); one write + promote costs ~10 ms, so fully serialised a 500-pod burst would
queue ~5 s. So: writes to one shard are serialised within a replica (a lock per shard), shards
write in parallel, and the check-and-set conflicts that remain between replicas are retried
(jittered, bounded by the admission budget). Promotions coalesce: a shard's *current* becomes
its newest delivered version, promoted once by whoever holds the shard's lock next, so a burst
costs one ``write_pending`` per pod and a few promotions per shard. Growth is bounded: every
``--keep-versions`` deliveries a shard is pruned with the provider's
``prune(keep=--keep-versions)``, so a shard holds about ``2 x keep`` live versions (plus
admissions in flight), a tenant ``shards`` times that, whatever the number of pods. Each record
carries the token, its fingerprint, expiry and store time, and a fresh rotation id; the
per-pod Secret's annotations tie the rotation id, fingerprint and admission uid to the pod.

**Failures** within the admission budget (``--admission-budget``, default 8 s, below the
webhook's ``timeoutSeconds: 10``): the work runs in a worker thread, and the answer is given
when it ends or when the budget runs out. Either way a failure is a clear denial (HTTP 200,
``allowed: false``, ``status.code`` 503 for LinuxGuard/store unavailability and timeouts, 500
otherwise, and a message naming the cause; the DaemonSet controller retries), or, with
``--on-failure=admit``, the pod unchanged plus a warning: it falls back to the shared Secret
that ``watch`` keeps fresh. A worker that outlives the budget deletes the Secret it created
(nobody references it); a Secret whose answer was lost on the wire is an unadopted orphan
that ``watch`` deletes after the adoption grace.

**TLS.** The key pair is read from ``--tls-cert-file``/``--tls-private-key-file`` and reloaded
when either file changes (inode, size or mtime: cert-manager and the kubelet's atomic
projected-volume swap both change them): each new connection gets the current
``SSLContext``, checked against the files' ``stat`` first. A pair that does not load (say, the
certificate was replaced before the key) keeps the previous one in service until the files
change again. Established connections keep the certificate they shook hands with. With
``--tls-self-managed`` lg-rotate writes that Secret itself (:mod:`rotator.kube.webhook_certs`,
one writer through a Lease, CA rotation with overlap), and a replica whose files do not load
yet serves a throwaway certificate and reports not ready (``/readyz`` 503) until they do.

**Serving.** One HTTPS listener: ``POST /mutate``, ``GET /healthz``, ``/readyz`` and
``/metrics`` (Prometheus text; counts and seconds only). A thread per connection, so
concurrent admissions run concurrently; one mint per admitted pod. **Shutdown** (SIGTERM):
``/readyz`` turns 503, the listener closes (no new connections), admissions in flight finish
(and answer with ``Connection: close``), idle keep-alive connections are closed.

The ``kubernetes`` client is imported only inside the functions that call it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Literal, Protocol

from providers.base import DEFAULT_KEEP_VERSIONS, Provider, StoredRecord
from rotator.errors import (
    ConfigError,
    KubernetesError,
    LgRotateError,
    SourceUnavailableError,
    StoreConflictError,
    StoreError,
    StoreUnavailableError,
)
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    FIELD_MANAGER,
    SECRET_PATH,
    SECRETS_PATH,
    ApiOp,
    KubernetesConflictError,
    KubernetesNotFoundError,
    api_request,
    check_data_key,
    check_name,
)
from rotator.kube.podsecrets import (
    ENROLL_SECRET_ANNOTATION,
    PER_POD_LABEL,
    SHARED_SECRET_LABEL,
    PodSecretInfo,
    pod_secret_body,
    pod_secret_name,
)
from rotator.kube.secret import DEFAULT_TENANT_KEY, DEFAULT_TOKEN_KEY
from rotator.metrics import Counter, Gauge, Histogram, Registry
from rotator.targets import Delivery
from rotator.tokens import REDACTED, TOKEN_SHAPED, EnrollToken, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_LISTEN",
    "DEFAULT_RECORD_SHARDS",
    "MUTATE_PATH",
    "AdmissionRecords",
    "AdmissionRequest",
    "Admitter",
    "EnvRef",
    "LabelSelector",
    "Plan",
    "ReloadingTls",
    "ReviewError",
    "WebhookMetrics",
    "WebhookPolicy",
    "WebhookServer",
    "json_patch",
    "parse_listen",
    "parse_review",
    "per_pod_record_key",
    "plan_admission",
    "review_response",
]

log = logging.getLogger("lg_rotate.webhook")

MUTATE_PATH = "/mutate"
REVIEW_API_VERSION = "admission.k8s.io/v1"
DEFAULT_LISTEN = "0.0.0.0:9443"
DEFAULT_BUDGET = 8.0  # seconds; under the webhook configuration's timeoutSeconds: 10
DEFAULT_RECORD_SHARDS = 16
ON_FAILURE = ("deny", "admit")
OnFailure = Literal["deny", "admit"]
MAX_BODY = 8 * 1024 * 1024  # a pod is at most ~1.5 MiB in etcd; the review holds it twice
IDLE_TIMEOUT = 120.0  # seconds a keep-alive connection may sit idle (the API server reuses it)
HANDSHAKE_TIMEOUT = 10.0
STORE_CONFLICT_ATTEMPTS = 4  # check-and-set rounds lost to another replica before giving up
RECORD_KEY_INFIX = "-per-pod-"
_JSON = "application/json"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def _safe(text: str) -> str:
    """Second line of defence for anything that leaves the process (answers, logs)."""
    return TOKEN_SHAPED.sub(REDACTED, " ".join(text.split()))


# --- label selectors -------------------------------------------------------------------

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9_./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9_.-]*)"
    r"|\s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?\s*$"
)


@dataclass(frozen=True)
class _Requirement:
    key: str
    op: Literal["exists", "!exists", "=", "!=", "in", "notin"]
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # != and notin


@dataclass(frozen=True)
class LabelSelector:
    """A Kubernetes label selector string (``a=b,c!=d,e in (x,y),!f,g``), matched locally."""

    text: str
    requirements: tuple[_Requirement, ...]

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        parts, depth, current = [], 0, ""
        for char in text:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if char == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += char
        parts.append(current)
        requirements = []
        for part in parts:
            if not part.strip():
                continue
            found = _REQUIREMENT.match(part)
            if found is None or depth != 0:
                raise ConfigError(
                    f"the label selector {text!r} is not valid near {part.strip()!r}",
                    fix="use key=value, key!=value, key in (a,b), key notin (a,b), key or !key, "
                    "separated by commas",
                )
            key = found["key"]
            if found["setop"]:
                values = frozenset(v.strip() for v in found["values"].split(",") if v.strip())
                op: Any = found["setop"]
                requirements.append(_Requirement(key, op, values))
            elif found["op"]:
                if found["neg"]:
                    raise ConfigError(f"the label selector {text!r}: '!' goes before a bare key")
                op = "!=" if found["op"] == "!=" else "="
                requirements.append(_Requirement(key, op, frozenset({found["value"]})))
            else:
                requirements.append(_Requirement(key, "!exists" if found["neg"] else "exists"))
        return cls(text=text, requirements=tuple(requirements))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(requirement.matches(labels) for requirement in self.requirements)


# --- the review: pure functions --------------------------------------------------------


class ReviewError(ValueError):
    """The request is not an AdmissionReview this webhook can answer (HTTP 400)."""


@dataclass(frozen=True, kw_only=True)
class AdmissionRequest:
    """What an AdmissionReview asks, as far as this webhook cares."""

    uid: str
    kind: str  # request.kind.kind, e.g. "Pod"
    resource: str  # request.resource.resource, e.g. "pods"
    sub_resource: str
    operation: str  # CREATE, UPDATE, DELETE, CONNECT
    namespace: str
    name: str  # "" when the pod uses generateName
    dry_run: bool
    pod: Mapping[str, Any]  # request.object

    @property
    def pod_label(self) -> str:
        """The pod's name, else ``<generateName>*`` (what ``linuxguard.io/pod`` says)."""
        metadata = self.pod.get("metadata") or {}
        name = self.name or str(metadata.get("name") or "")
        return name or f"{metadata.get('generateName') or ''}*"


def parse_review(document: Any) -> AdmissionRequest:
    """An ``admission.k8s.io/v1`` AdmissionReview's request; :class:`ReviewError` otherwise."""
    if not isinstance(document, Mapping):
        raise ReviewError("the body is not a JSON object")
    if document.get("apiVersion") != REVIEW_API_VERSION or document.get("kind") != (
        "AdmissionReview"
    ):
        raise ReviewError(
            f"expected an {REVIEW_API_VERSION} AdmissionReview, got "
            f"{document.get('apiVersion')!r} {document.get('kind')!r} "
            "(set admissionReviewVersions: [v1])"
        )
    request = document.get("request")
    if not isinstance(request, Mapping):
        raise ReviewError("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise ReviewError("the AdmissionReview request has no uid")
    kind = request.get("kind") or {}
    resource = request.get("resource") or {}
    pod = request.get("object")
    return AdmissionRequest(
        uid=uid,
        kind=str(kind.get("kind") or "") if isinstance(kind, Mapping) else "",
        resource=str(resource.get("resource") or "") if isinstance(resource, Mapping) else "",
        sub_resource=str(request.get("subResource") or ""),
        operation=str(request.get("operation") or ""),
        namespace=str(request.get("namespace") or ""),
        name=str(request.get("name") or ""),
        dry_run=bool(request.get("dryRun")),
        pod=pod if isinstance(pod, Mapping) else {},
    )


@dataclass(frozen=True, kw_only=True)
class WebhookPolicy:
    """Which pods are ours and what they reference."""

    namespace: str
    shared_secret: str
    selector: LabelSelector | None = None

    def __post_init__(self) -> None:
        check_name(self.namespace, what="the namespace", label=True)
        check_name(self.shared_secret, what="the Secret name")


@dataclass(frozen=True, kw_only=True)
class EnvRef:
    """One reference to a Secret in a pod: the JSON pointer of its ``name`` field."""

    path: str
    container: str
    secret: str


@dataclass(frozen=True, kw_only=True)
class Plan:
    """What to do with one admission.

    ``skip``: answer allowed, unchanged. ``repoint``: patch ``refs`` to ``secret_name``, which
    already exists (reinvocation; no mint). ``provision``: mint, store and create
    ``secret_name``, then patch ``refs`` to it.
    """

    action: Literal["skip", "repoint", "provision"]
    reason: str
    secret_name: str | None = None
    refs: tuple[EnvRef, ...] = ()


def _pointer(*parts: object) -> str:
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in parts)


def find_refs(pod: Mapping[str, Any], names: set[str]) -> list[EnvRef]:
    """References to any of ``names`` in the containers' and initContainers' env/envFrom."""
    spec = pod.get("spec") or {}
    found: list[EnvRef] = []
    for group in ("initContainers", "containers"):
        containers = spec.get(group) or []
        if not isinstance(containers, list):
            continue
        for index, container in enumerate(containers):
            if not isinstance(container, Mapping):
                continue
            cname = str(container.get("name") or index)
            for position, env in enumerate(container.get("env") or []):
                ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
                if isinstance(ref, Mapping) and ref.get("name") in names:
                    path = _pointer("spec", group, index, "env", position, "valueFrom")
                    found.append(
                        EnvRef(
                            path=path + "/secretKeyRef/name", container=cname, secret=ref["name"]
                        )
                    )
            for position, source in enumerate(container.get("envFrom") or []):
                ref = (source or {}).get("secretRef") or {}
                if isinstance(ref, Mapping) and ref.get("name") in names:
                    path = _pointer("spec", group, index, "envFrom", position, "secretRef", "name")
                    found.append(EnvRef(path=path, container=cname, secret=ref["name"]))
    return found


def _is_per_pod_name(name: str, shared_secret: str) -> bool:
    base = shared_secret[: 253 - 13].rstrip("-.")
    return re.fullmatch(re.escape(base) + r"-[0-9a-f]{12}", name) is not None


def plan_admission(  # noqa: PLR0911 - one answer per rule
    request: AdmissionRequest, policy: WebhookPolicy
) -> Plan:
    """Decide what one admission needs (see the module docstring)."""
    if request.kind != "Pod" or request.resource != "pods" or request.sub_resource:
        return Plan(action="skip", reason="not a pod")
    if request.operation != "CREATE":
        return Plan(action="skip", reason=f"{request.operation or 'no'} operation, not CREATE")
    if request.namespace != policy.namespace:
        return Plan(action="skip", reason=f"namespace {request.namespace!r} is not watched")
    metadata = request.pod.get("metadata") or {}
    labels = {str(k): str(v) for k, v in (metadata.get("labels") or {}).items()}
    if policy.selector is not None and not policy.selector.matches(labels):
        return Plan(action="skip", reason=f"labels do not match {policy.selector.text!r}")
    try:
        own = pod_secret_name(policy.shared_secret, request.uid)
    except (ValueError, ConfigError) as exc:
        raise ReviewError(f"the request uid {request.uid!r} cannot name a Secret") from exc
    shared_refs = find_refs(request.pod, {policy.shared_secret})
    annotated = str((metadata.get("annotations") or {}).get(ENROLL_SECRET_ANNOTATION) or "")
    if annotated == own:  # this admission already ran (reinvocation)
        if not shared_refs:
            return Plan(action="skip", reason="already points at its own Secret")
        return Plan(
            action="repoint",
            reason="reinvoked: new references to the shared Secret",
            secret_name=own,
            refs=tuple(shared_refs),
        )
    stale: list[EnvRef] = []
    if annotated and _is_per_pod_name(annotated, policy.shared_secret):
        stale = find_refs(request.pod, {annotated})  # copied from another pod
    refs = sorted([*shared_refs, *stale], key=lambda ref: ref.path)
    if not refs:
        return Plan(action="skip", reason="does not reference the shared Secret")
    return Plan(
        action="provision",
        reason="copied from another pod's spec" if stale else "references the shared Secret",
        secret_name=own,
        refs=tuple(refs),
    )


def json_patch(pod: Mapping[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The RFC 6902 patch for a ``repoint``/``provision`` plan: references and annotation."""
    assert plan.secret_name is not None
    patch: list[dict[str, Any]] = [
        {"op": "replace", "path": ref.path, "value": plan.secret_name} for ref in plan.refs
    ]
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations")
    if not isinstance(annotations, Mapping):
        patch.append(
            {
                "op": "add",
                "path": "/metadata/annotations",
                "value": {ENROLL_SECRET_ANNOTATION: plan.secret_name},
            }
        )
    elif annotations.get(ENROLL_SECRET_ANNOTATION) != plan.secret_name:
        patch.append(
            {
                "op": "add",  # on an existing member, "add" replaces it (RFC 6902 4.1)
                "path": _pointer("metadata", "annotations", ENROLL_SECRET_ANNOTATION),
                "value": plan.secret_name,
            }
        )
    return patch


def review_response(
    uid: str,
    *,
    allowed: bool,
    patch: Sequence[Mapping[str, Any]] | None = None,
    code: int | None = None,
    message: str | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The AdmissionReview answer document (never a token: the patch names a Secret)."""
    response: dict[str, Any] = {"uid": uid, "allowed": allowed}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(list(patch), separators=(",", ":")).encode()
        ).decode("ascii")
    if code is not None or message is not None:
        status: dict[str, Any] = {}
        if code is not None:
            status["code"] = code
        if message is not None:
            status["message"] = _safe(message)
        if not allowed:
            status["status"] = "Failure"
            status["reason"] = "ServiceUnavailable" if code == 503 else "InternalError"
        response["status"] = status
    if warnings:
        response["warnings"] = [_safe(w)[:256] for w in warnings]
    return {"apiVersion": REVIEW_API_VERSION, "kind": "AdmissionReview", "response": response}


# --- store records ---------------------------------------------------------------------


def per_pod_record_key(tenant: str, shard: int) -> str:
    """The store record (the provider's ``tenant`` argument) of one shard of per-pod tokens."""
    return f"{tenant}{RECORD_KEY_INFIX}{shard}"


class AdmissionRecords:
    """Per-pod tokens in the store: ``shards`` records per tenant (see the module docstring).

    Writes to one shard are serialised in this process; check-and-set conflicts with other
    replicas are retried ``conflict_attempts`` times (jittered) within the caller's deadline.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        tenant: str,
        shards: int = DEFAULT_RECORD_SHARDS,
        keep: int = DEFAULT_KEEP_VERSIONS,
        conflict_attempts: int = STORE_CONFLICT_ATTEMPTS,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        on_conflict: Callable[[], None] | None = None,
    ) -> None:
        if shards < 1:
            raise ConfigError(f"--record-shards must be at least 1, not {shards}")
        self.provider = provider
        self.tenant = tenant
        self.shards = shards
        self.keep = max(1, keep)
        self.conflict_attempts = max(1, conflict_attempts)
        self._monotonic = monotonic
        self._sleep = sleep
        self._on_conflict = on_conflict
        self._locks = [threading.Lock() for _ in range(shards)]
        self._waiting_lock = threading.Lock()
        self._waiting: dict[int, StoredRecord] = {}  # shard -> newest delivery to promote
        self._since_prune = [0] * shards
        self._random = random.Random()  # noqa: S311 - jitter, not security

    def shard_of(self, admission_uid: str) -> int:
        digest = hashlib.sha256(admission_uid.encode()).digest()
        return int.from_bytes(digest[:4], "big") % self.shards

    def key_of(self, admission_uid: str) -> str:
        return per_pod_record_key(self.tenant, self.shard_of(admission_uid))

    def location(self, admission_uid: str) -> str:
        return self.provider.location(tenant=self.key_of(admission_uid))

    def _acquire(self, shard: int, deadline: float) -> threading.Lock:
        lock = self._locks[shard]
        if not lock.acquire(timeout=max(0.0, deadline - self._monotonic())):
            raise StoreUnavailableError(
                f"the store record {per_pod_record_key(self.tenant, shard)} was busy for the "
                "whole admission budget",
                fix="raise --record-shards (more records written in parallel) or "
                "--admission-budget",
            )
        return lock

    def write_pending(
        self, token: EnrollToken, *, admission_uid: str, rotation_id: str, deadline: float
    ) -> StoredRecord:
        shard = self.shard_of(admission_uid)
        key = per_pod_record_key(self.tenant, shard)
        for attempt in range(1, self.conflict_attempts + 1):
            lock = self._acquire(shard, deadline)
            try:
                return self.provider.write_pending(tenant=key, token=token, rotation_id=rotation_id)
            except StoreConflictError:
                if self._on_conflict is not None:
                    self._on_conflict()
                if attempt == self.conflict_attempts:
                    raise
            finally:
                lock.release()
            pause = self._random.uniform(0.01, 0.05) * attempt
            if self._monotonic() + pause >= deadline:
                raise StoreConflictError(
                    f"{self.provider.location(tenant=key)} kept changing under other writers "
                    "until the admission budget ran out",
                    fix="check how many webhook replicas write it; raise --record-shards",
                )
            log.debug("store conflict on %s (attempt %d); retrying", key, attempt)
            self._sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def promote(self, record: StoredRecord, *, admission_uid: str) -> int:
        """Record that ``record`` was delivered: its shard's *current* becomes the newest
        delivered version; the shard is pruned every ``keep`` deliveries.

        Promotions coalesce: whoever gets the shard's lock promotes the newest delivery
        waiting, and later callers find nothing left to do (a 500-pod burst makes a few
        dozen promote calls, not 500). Returns how many versions were pruned. Best-effort
        bookkeeping, after the admission was answered: errors are logged, never raised.
        """
        shard = self.shard_of(admission_uid)
        key = per_pod_record_key(self.tenant, shard)
        with self._waiting_lock:
            self._waiting[shard] = record  # deliveries finish in order of this call
            self._since_prune[shard] += 1
        pruned = 0
        with self._locks[shard]:
            with self._waiting_lock:
                newest = self._waiting.pop(shard, None)
                prune = self._since_prune[shard] >= self.keep
                if prune:
                    self._since_prune[shard] = 0
            if newest is not None:
                try:
                    self.provider.promote(tenant=key, version=newest.version)
                except LgRotateError as exc:
                    log.warning(
                        "could not promote version %s of %s: %s",
                        newest.version,
                        key,
                        exc.one_line(),
                    )
            if prune:
                try:
                    pruned = self.provider.prune(tenant=key, keep=self.keep)
                except LgRotateError as exc:
                    log.warning("could not prune %s: %s", key, exc.one_line())
        return pruned


# --- metrics ---------------------------------------------------------------------------

RESULTS = ("minted", "reused", "repointed", "skipped", "dry-run", "denied", "fallback", "invalid")


class WebhookMetrics:
    """The webhook's Prometheus metrics (names start with ``lg_rotate_webhook_``)."""

    def __init__(self, *, in_flight: Callable[[], float | None] | None = None) -> None:
        self.registry = Registry()
        r = self.registry
        self.admissions = r.register(
            Counter(
                "lg_rotate_webhook_admissions_total",
                "Admission reviews answered, by result (minted: a new per-pod Secret; reused: a "
                "retried admission's Secret; repointed: a reinvocation; skipped: not an agent "
                "pod; dry-run; denied; fallback: admitted unchanged after a failure; invalid).",
                ["result"],
                initial=[{"result": name} for name in RESULTS],
            )
        )
        self.duration = r.register(
            Histogram(
                "lg_rotate_webhook_admission_duration_seconds",
                "Time to answer one admission review that concerned an agent pod.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 8.0, 10.0),
            )
        )
        self.mints = r.register(
            Counter(
                "lg_rotate_webhook_mints_total",
                "Tokens minted from LinuxGuard for per-pod Secrets, by result.",
                ["result"],
                initial=[{"result": "ok"}, {"result": "failed"}],
            )
        )
        self.failures = r.register(
            Counter(
                "lg_rotate_webhook_failures_total",
                "Admissions that could not get a per-pod Secret, by cause.",
                ["cause"],
                initial=[
                    {"cause": c}
                    for c in ("linuxguard", "store", "kubernetes", "timeout", "internal")
                ],
            )
        )
        self.store_conflicts = r.register(
            Counter(
                "lg_rotate_webhook_store_conflicts_total",
                "Check-and-set conflicts on per-pod store records (retried).",
            )
        )
        self.orphans_deleted = r.register(
            Counter(
                "lg_rotate_webhook_orphan_secrets_deleted_total",
                "Per-pod Secrets the webhook deleted because its answer did not name them.",
            )
        )
        self.tls_reloads = r.register(
            Counter(
                "lg_rotate_webhook_tls_reloads_total",
                "Reloads of the serving key pair after its files changed, by result.",
                ["result"],
                initial=[{"result": "ok"}, {"result": "failed"}],
            )
        )
        self.in_flight = r.register(
            Gauge(
                "lg_rotate_webhook_in_flight",
                "Admissions (and their store bookkeeping) in progress.",
                collect=in_flight,
            )
        )


# --- the Kubernetes calls --------------------------------------------------------------


class _Secrets:
    """get / create / delete of per-pod Secrets (RBAC: those three verbs on secrets)."""

    def __init__(self, api_client: ApiClient, namespace: str) -> None:
        self.api_client = api_client
        self.namespace = namespace

    def _op(self, verb: str, name: str | None, *, writes: bool = False) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Secret",
            resource="secrets",
            group="",
            namespace=self.namespace,
            name=name,
            writes=writes,
        )

    def get(self, name: str, *, timeout: float) -> dict[str, Any] | None:
        """The Secret's metadata (``PartialObjectMetadata``: the API server leaves its data,
        the token, out), or None when there is no such Secret."""
        try:
            secret: dict[str, Any] = api_request(
                self.api_client,
                self._op("get", name),
                "GET",
                SECRET_PATH,
                accept=METADATA_ONLY,
                timeout=timeout,
            )
        except KubernetesNotFoundError:
            return None
        return secret

    def create(self, body: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
        created: dict[str, Any] = api_request(
            self.api_client,
            self._op("create", None, writes=True),
            "POST",
            SECRETS_PATH,
            query={"fieldManager": FIELD_MANAGER},
            body=dict(body),
            timeout=timeout,
        )
        return created

    def delete(self, name: str, *, uid: str, timeout: float) -> None:
        """Delete exactly the Secret with ``uid`` (a precondition); gone already is fine."""
        with contextlib.suppress(KubernetesNotFoundError, KubernetesConflictError):
            api_request(
                self.api_client,
                self._op("delete", name),
                "DELETE",
                SECRET_PATH,
                body={"preconditions": {"uid": uid}},
                timeout=timeout,
            )


def widen_connection_pool(api_client: ApiClient, size: int) -> None:
    """Let ``size`` admissions talk to the API server at once over kept-alive connections
    (the client's default pool holds 5 per CPU and discards the rest with a warning)."""
    from kubernetes.client import rest

    configuration = api_client.configuration
    if (configuration.connection_pool_maxsize or 0) >= size:
        return
    configuration.connection_pool_maxsize = size
    api_client.rest_client = rest.RESTClientObject(configuration)


# --- the admission -------------------------------------------------------------------


class Minter(Protocol):
    """``rotator.linuxguard.LinuxGuardClient``: mint within a monotonic deadline."""

    def mint(
        self,
        *,
        tenant_id: str,
        min_ttl: timedelta,
        ttl_seconds: int | None = None,
        deadline: float | None = None,
    ) -> EnrollToken: ...


@dataclass(eq=False)
class _Job:
    """One admission's side effects, run in a worker thread so the budget holds."""

    request: AdmissionRequest
    secret_name: str
    deadline: float
    step: str = "starting"
    timings: dict[str, float] = field(default_factory=dict)  # step -> ms, for the log
    outcome: Literal["minted", "reused"] | None = None
    error: BaseException | None = None
    created_uid: str | None = None
    fingerprint: str | None = None
    expires_at: datetime | None = None
    abandoned: bool = False
    _last_key: str = ""
    _last_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _cause_of(exc: BaseException) -> str:
    if isinstance(exc, LgRotateError):
        return exc.one_line()
    return f"{type(exc).__name__} (see the webhook's log)"


def _classify(exc: BaseException) -> tuple[str, int]:
    """(failure cause label, status code) of a failed admission."""
    from rotator.errors import SourceError, TokenError

    if isinstance(exc, SourceError | TokenError):
        return "linuxguard", 503 if isinstance(exc, SourceUnavailableError) else 500
    if isinstance(exc, StoreError):
        return "store", 503 if isinstance(exc, StoreUnavailableError | StoreConflictError) else 500
    if isinstance(exc, KubernetesError):
        return "kubernetes", 500
    return "internal", 500


class Admitter:
    """Answers AdmissionReviews: plan, then (for a new agent pod) mint, store, create.

    Thread-safe: the HTTP server calls :meth:`review` from one thread per connection.
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        policy: WebhookPolicy,
        tenant: str,
        minter: Minter,
        records: AdmissionRecords,
        provider_name: str,
        token_key: str = DEFAULT_TOKEN_KEY,
        tenant_key: str = DEFAULT_TENANT_KEY,
        min_ttl: timedelta = timedelta(seconds=60),
        ttl_seconds: int | None = None,
        budget: float = DEFAULT_BUDGET,
        on_failure: OnFailure = "deny",
        metrics: WebhookMetrics | None = None,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if on_failure not in ON_FAILURE:
            raise ConfigError(f"--on-failure must be deny or admit, not {on_failure!r}")
        if budget <= 0:
            raise ConfigError("--admission-budget must be positive", fix="e.g. 8s (below 10s)")
        self.policy = policy
        self.tenant = tenant
        self.minter = minter
        self.records = records
        self.provider_name = provider_name
        self.token_key = check_data_key(token_key, what="the token key")
        self.tenant_key = check_data_key(tenant_key, what="the tenant key")
        self.min_ttl = min_ttl
        self.ttl_seconds = ttl_seconds
        self.budget = budget
        self.on_failure: OnFailure = on_failure
        self.request_timeout = request_timeout
        self.clock = clock
        self.monotonic = monotonic
        self.metrics = metrics or WebhookMetrics()
        self._secrets = _Secrets(api_client, policy.namespace)
        self._idle = threading.Condition()
        self._in_flight = 0

    # --- bookkeeping of work in progress ---

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._in_flight

    def _enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            self._idle.notify_all()

    def warm_up(self) -> None:
        """Pay the start-up costs before the first admission does: the first TLS connection
        to the API server (and any lazy import on the request path, under the import lock
        every concurrent admission would wait on)."""
        probe = pod_secret_name(self.policy.shared_secret, "0" * 32)
        try:
            self._secrets.get(probe, timeout=self.request_timeout)
        except LgRotateError as exc:
            log.warning("the Kubernetes API is not usable yet: %s", exc.one_line())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no admission (nor its store bookkeeping) is in progress."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    # --- the review ---

    def review(self, document: Any) -> dict[str, Any]:
        """The answer to one AdmissionReview; :class:`ReviewError` if it is not one."""
        started = self.monotonic()
        try:
            request = parse_review(document)
            plan = plan_admission(request, self.policy)
        except ReviewError:
            self.metrics.admissions.inc(result="invalid")
            raise
        if plan.action == "skip":
            self.metrics.admissions.inc(result="skipped")
            log.debug(
                "admission %s of %s: unchanged (%s)", request.uid, request.pod_label, plan.reason
            )
            return review_response(request.uid, allowed=True)
        self._enter()
        try:
            answer = self._answer(request, plan, started)
        finally:
            self._leave()
            self.metrics.duration.observe(self.monotonic() - started)
        return answer

    def _answer(self, request: AdmissionRequest, plan: Plan, started: float) -> dict[str, Any]:
        assert plan.secret_name is not None
        patch = json_patch(request.pod, plan)
        where = f"{self.policy.namespace}/{request.pod_label}"
        if plan.action == "repoint":
            self.metrics.admissions.inc(result="repointed")
            log.info(
                "admission %s of pod %s (reinvoked): %d new reference(s) to %s",
                request.uid,
                where,
                len(plan.refs),
                plan.secret_name,
            )
            return review_response(request.uid, allowed=True, patch=patch)
        if request.dry_run:
            self.metrics.admissions.inc(result="dry-run")
            log.info(
                "admission %s of pod %s is a dry run: would create Secret %s (nothing minted)",
                request.uid,
                where,
                plan.secret_name,
            )
            return review_response(request.uid, allowed=True, patch=patch)
        job = _Job(request=request, secret_name=plan.secret_name, deadline=started + self.budget)
        self._enter()  # the worker leaves when its bookkeeping is done, maybe after the answer
        worker = threading.Thread(
            target=self._run_job, args=(job,), name=f"lg-rotate-admit-{request.uid[:8]}"
        )
        worker.daemon = True
        worker.start()
        finished = job.done.wait(max(0.0, job.deadline - self.monotonic()))
        with job.lock:
            if not finished and not job.done.is_set():
                job.abandoned = True
        if job.abandoned:
            cause = f"timed out after {self.budget:g}s (the admission budget) while {job.step}"
            self.metrics.failures.inc(cause="timeout")
            return self._failure(request, plan, cause=cause, code=503, started=started)
        if job.error is not None:
            label, code = _classify(job.error)
            self.metrics.failures.inc(cause=label)
            return self._failure(
                request,
                plan,
                cause=f"{job.step} failed: {_cause_of(job.error)}",
                code=code,
                started=started,
            )
        assert job.outcome is not None
        self.metrics.admissions.inc(result=job.outcome)
        expires = job.expires_at.isoformat() if job.expires_at else "?"
        took_ms = (self.monotonic() - started) * 1000
        log.info(
            "admission %s of pod %s: %s Secret %s (token %s, expires %s) in %.0f ms",
            request.uid,
            where,
            "created" if job.outcome == "minted" else "reused the existing",
            plan.secret_name,
            (job.fingerprint or "?")[:12],
            expires,
            took_ms,
            extra={
                "admission": job.outcome,
                "duration_ms": round(took_ms, 1),
                **{k: v for k, v in job.timings.items() if k != "done"},
            },
        )
        return review_response(request.uid, allowed=True, patch=patch)

    def _failure(
        self, request: AdmissionRequest, plan: Plan, *, cause: str, code: int, started: float
    ) -> dict[str, Any]:
        shared = self.policy.shared_secret
        where = f"{self.policy.namespace}/{request.pod_label}"
        took = self.monotonic() - started
        if self.on_failure == "admit":
            self.metrics.admissions.inc(result="fallback")
            log.warning(
                "admission %s of pod %s: no per-pod Secret (%s); admitted unchanged: it reads "
                "the shared Secret %s (--on-failure=admit) [%.1fs]",
                request.uid,
                where,
                cause,
                shared,
                took,
                extra={"admission": "fallback", "duration_ms": round(took * 1000, 1)},
            )
            warning = (
                f"lg-rotate: no per-pod enrolment Secret ({cause}); this pod reads the shared "
                f"Secret {shared} (--on-failure=admit)"
            )
            return review_response(request.uid, allowed=True, warnings=[warning])
        self.metrics.admissions.inc(result="denied")
        log.warning(
            "admission %s of pod %s denied (%d): %s [%.1fs]",
            request.uid,
            where,
            code,
            cause,
            took,
            extra={"admission": "denied", "duration_ms": round(took * 1000, 1)},
        )
        message = (
            f"lg-rotate webhook could not give this pod its own LinuxGuard enrolment token: "
            f"{cause}. The pod is refused (its controller retries); run the webhook with "
            f"--on-failure=admit to fall back to the shared Secret {shared} instead."
        )
        return review_response(request.uid, allowed=False, code=code, message=message)

    # --- the worker ---

    def _timeout(self, job: _Job) -> float:
        """The Kubernetes calls' own timeout: not the budget's remainder. The answer keeps
        the budget (the worker is abandoned then); a create cut short by a client timeout
        would leave a Secret the worker cannot know it made, while one that completes late
        is known, and deleted (see :meth:`_run_job`)."""
        return self.request_timeout

    def _run_job(self, job: _Job) -> None:
        record: StoredRecord | None = None
        try:
            record = self._provision(job)
        except BaseException as exc:  # reported in the answer; never raised in a bare thread
            job.error = exc
            if not isinstance(exc, LgRotateError):
                log.error("admission %s failed unexpectedly", job.request.uid, exc_info=True)
        finally:
            with job.lock:
                abandoned = job.abandoned
                job.done.set()
        try:
            if abandoned and job.created_uid is not None:
                self._delete_orphan(job)
            elif record is not None and job.outcome == "minted" and not abandoned:
                self.records.promote(record, admission_uid=job.request.uid)
        finally:
            self._leave()

    def _mark(self, job: _Job, key: str, step: str) -> None:
        """Enter ``step``; the time since the previous mark goes to ``job.timings``."""
        now = self.monotonic()
        if job.timings:
            job.timings[job._last_key] = round((now - job._last_at) * 1000, 1)
        job.timings.setdefault(key, 0.0)
        job._last_key, job._last_at, job.step = key, now, step

    def _provision(self, job: _Job) -> StoredRecord | None:
        request, name = job.request, job.secret_name
        self._mark(job, "read_ms", f"reading Secret {self.policy.namespace}/{name}")
        existing = self._secrets.get(name, timeout=self._timeout(job))
        if existing is not None:
            self._adopt_existing(job, existing)
            return None
        self._mark(job, "mint_ms", "minting a token from LinuxGuard")
        try:
            token = self.minter.mint(
                tenant_id=self.tenant,
                min_ttl=self.min_ttl,
                ttl_seconds=self.ttl_seconds,
                deadline=job.deadline,
            )
        except BaseException:
            self.metrics.mints.inc(result="failed")
            raise
        self.metrics.mints.inc(result="ok")
        self._mark(job, "store_ms", f"storing the token in {self.records.location(request.uid)}")
        rotation_id = str(uuid.uuid4())
        record = self.records.write_pending(
            token, admission_uid=request.uid, rotation_id=rotation_id, deadline=job.deadline
        )
        self._mark(job, "create_ms", f"creating Secret {self.policy.namespace}/{name}")
        token.check_usable(tenant_id=self.tenant, min_ttl=self.min_ttl, now=self.clock())
        body = pod_secret_body(
            name=name,
            namespace=self.policy.namespace,
            shared_secret=self.policy.shared_secret,
            delivery=Delivery(
                record=record,
                source=f"{self.provider_name}:{self.records.key_of(request.uid)}/{record.version}",
                rotated_at=self.clock(),
            ),
            token_key=self.token_key,
            tenant_key=self.tenant_key,
            admission_uid=request.uid,
            pod_label=request.pod_label,
        )
        try:
            created = self._secrets.create(body, timeout=self._timeout(job))
        except KubernetesConflictError:
            # A concurrent call for the same admission created it first: use that one.
            existing = self._secrets.get(name, timeout=self._timeout(job))
            if existing is None:
                raise KubernetesError(
                    f"Secret {self.policy.namespace}/{name} was reported to exist, then was gone",
                    fix="retry; if it keeps happening, something deletes per-pod Secrets",
                ) from None
            self._adopt_existing(job, existing)
            log.info(
                "admission %s: a concurrent call created %s first; token %s stays unused",
                request.uid,
                name,
                token.short_fingerprint,
            )
            return None
        self._mark(job, "done", "answering")
        job.created_uid = str((created.get("metadata") or {}).get("uid") or "") or None
        job.fingerprint = record.fingerprint
        job.expires_at = token.expires_at
        job.outcome = "minted"
        return record

    def _adopt_existing(self, job: _Job, secret: Mapping[str, Any]) -> None:
        info = PodSecretInfo.from_object(secret)
        labels = (secret.get("metadata") or {}).get("labels") or {}
        ours = (
            labels.get(PER_POD_LABEL) == "true"
            and labels.get(SHARED_SECRET_LABEL) == self.policy.shared_secret
            and info.admission_uid == job.request.uid
        )
        if not ours:
            raise KubernetesError(
                f"Secret {info.namespace}/{info.name} exists but was not created for admission "
                f"{job.request.uid}",
                fix="delete or rename that Secret: lg-rotate names per-pod Secrets "
                "<shared secret>-<12 hex of the admission uid>",
            )
        job.fingerprint = info.fingerprint
        job.expires_at = info.expires_at
        job.outcome = "reused"

    def _delete_orphan(self, job: _Job) -> None:
        assert job.created_uid is not None
        try:
            self._secrets.delete(job.secret_name, uid=job.created_uid, timeout=self.request_timeout)
        except LgRotateError as exc:
            log.warning(
                "could not delete Secret %s/%s, which the answer to admission %s does not name "
                "(watch deletes it after the adoption grace): %s",
                self.policy.namespace,
                job.secret_name,
                job.request.uid,
                exc.one_line(),
            )
            return
        self.metrics.orphans_deleted.inc()
        log.info(
            "deleted Secret %s/%s: admission %s was answered without it",
            self.policy.namespace,
            job.secret_name,
            job.request.uid,
        )


# --- TLS -------------------------------------------------------------------------------

_FileState = tuple[int, int, int, int] | None


def _file_state(path: str) -> _FileState:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


class ReloadingTls:
    """The serving ``SSLContext``, rebuilt when the certificate or key file changes.

    With ``wait_for_pair`` (``--tls-self-managed``: lg-rotate writes the pair itself, and a
    replica may start before the kubelet has delivered it), files that do not load yet are no
    error: a throwaway self-signed certificate (trusted by nobody) is served instead, so the
    probes get answers (``/healthz`` 200, ``/readyz`` 503: :attr:`has_pair` is False) rather
    than the container crash-looping, until the files change and load.
    """

    def __init__(
        self,
        cert_file: str,
        key_file: str,
        *,
        on_reload: Callable[[bool], None] | None = None,
        wait_for_pair: bool = False,
    ) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._on_reload = on_reload
        self._lock = threading.Lock()
        self._state = self._states()
        self.has_pair = True
        try:
            self._context, self.fingerprint = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            if not wait_for_pair:
                raise ConfigError(
                    f"cannot load the TLS key pair {cert_file} / {key_file}: {reason}",
                    fix="pass --tls-cert-file and --tls-private-key-file with a PEM certificate "
                    "(chain) and its private key (cert-manager: tls.crt and tls.key)",
                ) from None  # the cause may quote key material
            self._context, self.fingerprint = _placeholder_context(), "placeholder"
            self.has_pair = False
            log.warning(
                "the TLS key pair %s / %s does not load yet (%s): not ready until it does "
                "(with --tls-self-managed, lg-rotate's certificate keeper writes it into the "
                "Secret and the kubelet delivers it, within about a minute)",
                cert_file,
                key_file,
                reason,
            )
        self._failed_state: tuple[_FileState, _FileState] | None = None
        self.reloads = 0

    def _states(self) -> tuple[_FileState, _FileState]:
        return _file_state(self.cert_file), _file_state(self.key_file)

    def _load(self) -> tuple[ssl.SSLContext, str]:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_file, self.key_file)
        with open(self.cert_file, encoding="ascii", errors="replace") as handle:
            pem = handle.read()
        first = pem[: pem.find("-----END CERTIFICATE-----") + 25]
        fingerprint = hashlib.sha256(ssl.PEM_cert_to_DER_cert(first)).hexdigest()
        return context, fingerprint

    def context(self) -> ssl.SSLContext:
        """The current context; reloaded first if the files changed since it was loaded."""
        state = self._states()
        if state == self._state:
            return self._context
        with self._lock:
            if state in (self._state, self._failed_state):
                return self._context
            try:
                context, fingerprint = self._load()
            except (OSError, ssl.SSLError, ValueError) as exc:
                self._failed_state = state
                log.warning(
                    "the TLS key pair %s / %s changed but does not load (%s); still serving "
                    "certificate %s",
                    self.cert_file,
                    self.key_file,
                    getattr(exc, "reason", None) or type(exc).__name__,
                    self.fingerprint[:12],
                )
                if self._on_reload is not None:
                    self._on_reload(False)
                return self._context
            self._context, self._state, self._failed_state = context, state, None
            previous, self.fingerprint = self.fingerprint, fingerprint
            self.has_pair = True
            self.reloads += 1
            log.info(
                "reloaded the TLS key pair: certificate %s (was %s)",
                fingerprint[:12],
                previous[:12],
            )
            if self._on_reload is not None:
                self._on_reload(True)
            return self._context


def _placeholder_context() -> ssl.SSLContext:
    """A server context with a throwaway self-signed pair (see :class:`ReloadingTls`)."""
    import tempfile

    from rotator.kube.webhook_certs import placeholder_pair

    cert_pem, key_pem = placeholder_pair()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain reads files only: a private folder, gone right after.
    with tempfile.TemporaryDirectory(prefix="lg-rotate-placeholder-") as folder:
        cert_path, key_path = os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key")
        for path, data in ((cert_path, cert_pem), (key_path, key_pem)):
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
        context.load_cert_chain(cert_path, key_path)
    return context


# --- the HTTPS server ------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:9443`` for IPv6; ``:9443`` for all IPv4 addresses)."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ConfigError(
            f"--listen {text!r} is not HOST:PORT", fix="e.g. 0.0.0.0:9443 or [::]:9443"
        )
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - the API server calls from outside
    return host, int(port_text)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # a burst of API server connections

    def __init__(self, address: tuple[str, int], owner: WebhookServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.owner = owner
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        wrapped = self.owner.tls.context().wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        with self.connections_lock:
            self.connections.add(wrapped)
        return wrapped, address

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "lg-rotate-webhook"
    timeout = IDLE_TIMEOUT

    def setup(self) -> None:
        self.request.settimeout(HANDSHAKE_TIMEOUT)
        self.request.do_handshake()  # in this connection's thread, never in the accept loop
        super().setup()

    def do_GET(self) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, *owner.metrics.registry.exposition(self.headers.get("Accept")))
        elif path in ("/healthz", "/livez"):
            self._send_json(200, {"ok": True})
        elif path == "/readyz":
            ready, details = owner.readiness()
            self._send_json(200 if ready else 503, {"ok": ready, **details})
        else:
            self._send_json(404, {"error": "not found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != MUTATE_PATH:
            self._send_json(404, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or "")
        except ValueError:
            self._send_json(411, {"error": "Content-Length required"})
            return
        if length > MAX_BODY:
            self.close_connection = True
            self._send_json(413, {"error": "body too large"})
            return
        raw = self.rfile.read(length)
        with self.server.owner.request():  # until the answer is written (graceful shutdown)
            try:
                document = json.loads(raw)
                answer = self.server.owner.admitter.review(document)
            except (ValueError, ReviewError) as exc:
                reason = str(exc) if isinstance(exc, ReviewError) else "the body is not JSON"
                log.warning("refused a request to %s: %s", MUTATE_PATH, reason)
                self._send_json(400, {"error": reason})
                return
            self._send_json(200, answer)

    def _send_json(self, status: int, document: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(document, separators=(",", ":")).encode(), _JSON)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        if self.server.owner.draining:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class WebhookServer:
    """The HTTPS server: ``/mutate`` answered by ``admitter``, health and metrics beside it."""

    def __init__(
        self,
        *,
        admitter: Admitter,
        tls: ReloadingTls,
        host: str = "0.0.0.0",  # noqa: S104 - the API server calls from outside the pod
        port: int = 9443,
    ) -> None:
        self.admitter = admitter
        self.tls = tls
        self.metrics = admitter.metrics
        self.host = host
        self._requested_port = port
        self.draining = False
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests = 0
        self._requests_done = threading.Condition()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready: not draining, and serving a real key pair (not the placeholder)."""
        details = {"draining": self.draining, "tls": self.tls.has_pair}
        return not self.draining and self.tls.has_pair, details

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count a ``/mutate`` request from its body read to its answer written."""
        with self._requests_done:
            self._requests += 1
        try:
            yield
        finally:
            with self._requests_done:
                self._requests -= 1
                self._requests_done.notify_all()

    def start(self) -> WebhookServer:
        if self._http is not None:
            raise RuntimeError("the webhook server is already running")
        try:
            server = _HTTPServer((self.host, self._requested_port), self)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {self.host}:{self._requested_port}: {exc.strerror}",
                fix="pick a free port with --listen HOST:PORT",
            ) from exc
        self._http = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="lg-rotate-webhook",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "serving %s, /healthz, /readyz and /metrics on %s (certificate %s)",
            MUTATE_PATH,
            self.url,
            self.tls.fingerprint[:12],
        )
        return self

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the webhook server is not running")
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in {"0.0.0.0", ""} else self.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}"

    def stop(self, *, drain_timeout: float | None = None) -> bool:
        """Graceful: readiness off, stop accepting, let admissions in flight finish, close.

        Returns False if admissions were still in flight after ``drain_timeout`` (default:
        the admission budget plus 2 s).
        """
        server, thread = self._http, self._thread
        if server is None:
            return True
        self.draining = True
        log.info("shutting down: no new connections; finishing admissions in flight")
        server.shutdown()  # the accept loop ends
        server.socket.close()  # new connections are refused from here on
        timeout = self.admitter.budget + 2.0 if drain_timeout is None else drain_timeout
        deadline = time.monotonic() + timeout
        with self._requests_done:
            answered = self._requests_done.wait_for(
                lambda: self._requests == 0, timeout=max(0.0, deadline - time.monotonic())
            )
        # Then the store bookkeeping that runs after an answer (promotion, pruning, cleanup).
        drained = self.admitter.wait_idle(max(0.0, deadline - time.monotonic())) and answered
        if not drained:
            log.warning(
                "%d admission(s) still in flight after %.0fs; closing anyway",
                max(self._requests, self.admitter.in_flight),
                timeout,
            )
        with server.connections_lock:
            open_connections = list(server.connections)
        for connection in open_connections:  # idle keep-alive connections
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if thread is not None:
            thread.join(timeout=5)
        self._http = self._thread = None
        log.info("webhook stopped")
        return drained


def serve(server: WebhookServer, *, stop: threading.Event) -> None:
    """Run until ``stop`` is set (SIGTERM), then shut down gracefully."""
    server.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()


def build_server(
    *,
    api_client: ApiClient,
    namespace: str,
    shared_secret: str,
    tenant: str,
    minter: Minter,
    provider: Provider,
    cert_file: str,
    key_file: str,
    listen: str = DEFAULT_LISTEN,
    selector: str | None = None,
    token_key: str = DEFAULT_TOKEN_KEY,
    tenant_key: str = DEFAULT_TENANT_KEY,
    min_ttl: timedelta = timedelta(seconds=60),
    ttl_seconds: int | None = None,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    shards: int = DEFAULT_RECORD_SHARDS,
    budget: float = DEFAULT_BUDGET,
    on_failure: OnFailure = "deny",
    wait_for_pair: bool = False,
    clock: Callable[[], datetime] = utcnow,
) -> WebhookServer:
    """Everything ``lg-rotate webhook`` runs, from resolved settings (not started yet).

    ``wait_for_pair`` (``--tls-self-managed``): key pair files that do not load yet make the
    server unready instead of failing (:class:`ReloadingTls`).
    """
    from providers.base import Stage

    host, port = parse_listen(listen)
    policy = WebhookPolicy(
        namespace=namespace,
        shared_secret=shared_secret,
        selector=LabelSelector.parse(selector) if selector and selector.strip() else None,
    )
    admitter_box: list[Admitter] = []
    metrics = WebhookMetrics(in_flight=lambda: admitter_box[0].in_flight if admitter_box else 0)
    records = AdmissionRecords(
        provider,
        tenant=tenant,
        shards=shards,
        keep=keep_versions,
        on_conflict=metrics.store_conflicts.inc,
    )
    tls = ReloadingTls(
        cert_file,
        key_file,
        on_reload=lambda ok: metrics.tls_reloads.inc(result="ok" if ok else "failed"),
        wait_for_pair=wait_for_pair,
    )
    widen_connection_pool(api_client, 64)
    admitter = Admitter(
        api_client=api_client,
        policy=policy,
        tenant=tenant,
        minter=minter,
        records=records,
        provider_name=provider.name,
        token_key=token_key,
        tenant_key=tenant_key,
        min_ttl=min_ttl,
        ttl_seconds=ttl_seconds,
        budget=budget,
        on_failure=on_failure,
        metrics=metrics,
        clock=clock,
    )
    admitter_box.append(admitter)
    admitter.warm_up()
    # Log in to the store and warm its client before the first admission needs it.
    try:
        provider.read(tenant=per_pod_record_key(tenant, 0), stage=Stage.CURRENT)
    except StoreError as exc:
        log.warning("the store is not usable yet (%s); admissions will retry it", exc.one_line())
    return WebhookServer(admitter=admitter, tls=tls, host=host, port=port)
