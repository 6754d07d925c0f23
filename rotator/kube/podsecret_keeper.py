"""``lg-rotate watch`` looks after the per-pod Secrets the admission webhook creates.

The contract (names, labels, annotations, the body) is :mod:`rotator.kube.podsecrets`; this
module is what the controller (:mod:`rotator.kube.controller`) does with those Secrets, in a
thread of its own while it leads. docs/PER-POD.md is the operator's guide.

**Adoption.** A pod admitted by the webhook carries ``linuxguard.io/enroll-secret: <name>``.
Once the pod exists, its Secret gets an ownerReference to it (``v1``/``Pod``, name, UID,
``controller: false``, ``blockOwnerDeletion: false``) and its ``linuxguard.io/pod`` annotation
becomes the pod's name: garbage collection then deletes the Secret with the pod. Only a Secret
that is really a per-pod Secret of *this* shared Secret (labels ``linuxguard.io/per-pod=true``
and ``linuxguard.io/shared-secret=<shared>``), whose ``linuxguard.io/pod`` annotation matches the
pod (``<generateName>*`` or the name), and that no other pod owns, is adopted: a pod annotation
alone must never make lg-rotate tie (and so, through garbage collection, delete) an arbitrary
Secret to a pod.

**Orphans.** A per-pod Secret that no pod names, created more than ``adoption_grace`` ago (an
admission that never became a pod: a later webhook or a quota refused it), or owned by a pod
that is gone (garbage collection's job, done here too), is deleted, after a namespace-wide pod
list (not only the watched selector) confirmed that no pod names it, reads it (env) or owns it,
with the Secret's UID and resourceVersion as preconditions (a Secret changed in between is left
for the next pass).

**Refresh.** Until the agent container that reads the Secret has started (no running or
terminated state, no restart: slow image pulls, a pod Pending for want of resources), the token
is replaced before it expires, at ``expires_at - expiry_margin * lifetime`` like the shared
Secret's: a fresh token is minted, stored (:class:`PodTokenIssuer`), and written into the Secret
(data and delivery annotations) with the resourceVersion read (409: re-read, retry). The pod is
read again just before, and nothing is written once a container has started: a container
restart re-presents the pod's own token (same workload identity, a replay LinuxGuard accepts,
even after expiry), so a token consumed by a pod must stay in its Secret.

**Reading Secrets without their data.** Secrets are listed and read as
``PartialObjectMetadata`` (``Accept: ...;as=PartialObjectMetadataList``): the API server answers
with metadata only, so no token of any Secret of the namespace ever reaches this process through
a list (RBAC's ``list`` would allow the data; lg-rotate does not ask for it).

**Without the rights** (the optional component cronjob/components/per-pod not applied), listing
Secrets is refused (403): the keeper says so once (a warning when pods with the annotation exist,
else an info line) and tries again every ``forbidden_retry`` seconds; the shared Secret is not
affected.

The store: a per-pod token is recorded in the provider under its own record chain,
``<tenant>-per-pod`` (:func:`per_pod_store_tenant`), written and promoted at once. It never
shares the tenant's chain, whose *pending* version a shared-Secret rotation would resume and
deliver to the shared Secret (the same token in two Secrets is the collision this mode exists to
prevent), and whose *current* version ``exec --from-store`` hands out.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from providers.base import DEFAULT_KEEP_VERSIONS, Provider, StoredRecord
from rotator.errors import LgRotateError
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    MAX_CONFLICTS,
    MERGE_PATCH,
    PODS_PATH,
    SECRET_PATH,
    SECRETS_PATH,
    ApiOp,
    KubernetesConflictError,
    KubernetesForbiddenError,
    KubernetesNotFoundError,
    api_request,
)
from rotator.kube.pods import PodApi
from rotator.kube.podsecrets import (
    ADOPTION_GRACE,
    ANNOTATION_POD,
    ENROLL_SECRET_ANNOTATION,
    PER_POD_LABEL,
    SHARED_SECRET_LABEL,
    PodSecretInfo,
    per_pod_selector,
)
from rotator.kube.secret import delivery_annotations, secret_data
from rotator.targets import Delivery
from rotator.tokens import EnrollToken, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from rotator.rotation import Minter, Rotator

log = logging.getLogger("lg_rotate.controller")

PER_POD_STORE_SUFFIX = "-per-pod"
# Metadata only: the API server leaves out data (and so every token) of the Secrets it lists.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_ONE = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
FORBIDDEN_RETRY = 300.0
MIN_LIST_INTERVAL = 1.0  # a burst of pod events lists the Secrets at most this often (or resync)

# Actions counted (lg_rotate_pod_secrets_total{action}).
ADOPTED = "adopted"
DELETED = "deleted"
REFRESHED = "refreshed"
FAILED = "failed"


def per_pod_store_tenant(tenant: str) -> str:
    """The provider record chain of a tenant's per-pod tokens: ``<tenant>-per-pod``."""
    return f"{tenant}{PER_POD_STORE_SUFFIX}"


# --- which containers read which Secret ---------------------------------------------------


def secret_readers(pod: Mapping[str, Any], secret_name: str) -> set[str]:
    """Names of the pod's containers (init containers too) whose environment comes from
    ``secret_name`` (``env[].valueFrom.secretKeyRef`` or ``envFrom[].secretRef``)."""
    spec = pod.get("spec") or {}
    readers = set()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        refs = [
            ((var.get("valueFrom") or {}).get("secretKeyRef") or {}).get("name")
            for var in container.get("env") or []
        ]
        refs += [
            (source.get("secretRef") or {}).get("name") for source in container.get("envFrom") or []
        ]
        if secret_name in refs:
            readers.add(str(container.get("name") or ""))
    return readers


def enroll_secret(pod: Mapping[str, Any]) -> str | None:
    """The per-pod Secret a pod names (``linuxguard.io/enroll-secret``), if any."""
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    name = annotations.get(ENROLL_SECRET_ANNOTATION)
    return str(name) if name else None


def shared_consumers(pod: Mapping[str, Any], shared_secret: str) -> set[str] | None:
    """Which containers of a pod consume the *shared* Secret's token, for the controller.

    None: every container (a pod without ``linuxguard.io/enroll-secret``: today's rule, by
    label selector). A pod admitted by the webhook consumes only through the containers that
    still reference the shared Secret (normally none: its starts rotate nothing).
    """
    if enroll_secret(pod) is None:
        return None
    return secret_readers(pod, shared_secret)


def agent_started(pod: Mapping[str, Any], secret_name: str) -> bool:
    """Has a container that reads ``secret_name`` started (it read the token)?

    Started: a ``running`` or ``terminated`` state, a ``lastState.terminated`` or a restart
    count, for the containers whose env refers to the Secret (every container when none
    does); a pod that finished (Succeeded/Failed) counts as started.
    """
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return True
    readers = secret_readers(pod, secret_name)
    for item in [
        *(status.get("initContainerStatuses") or []),
        *(status.get("containerStatuses") or []),
    ]:
        if readers and item.get("name") not in readers:
            continue
        state = item.get("state") or {}
        if state.get("running") is not None or state.get("terminated") is not None:
            return True
        if (item.get("lastState") or {}).get("terminated") is not None:
            return True
        try:
            if int(item.get("restartCount") or 0) > 0:
                return True
        except (TypeError, ValueError):
            return True
    return False


def _pod_label_matches(label: str | None, pod_name: str) -> bool:
    """The Secret's ``linuxguard.io/pod``: ``<generateName>*`` before adoption, then the name."""
    if not label:
        return True  # written by an older webhook: the annotation on the pod is the tie
    if label.endswith("*"):
        return pod_name.startswith(label[:-1])
    return label == pod_name


# --- minting and storing a per-pod token --------------------------------------------------


class PodTokenIssuer:
    """Mints a token for one pod and records it in the store (the system of record).

    The record goes to the chain :func:`per_pod_store_tenant` (see the module docstring),
    written as a new version and promoted at once (a per-pod token is never resumed by
    anything); older versions beyond ``keep_versions`` are pruned, best effort.
    """

    def __init__(
        self,
        *,
        minter: Minter,
        provider: Provider,
        tenant: str,
        min_ttl: timedelta,
        ttl_seconds: int | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
    ) -> None:
        self.minter = minter
        self.provider = provider
        self.tenant = tenant
        self.min_ttl = min_ttl
        self.ttl_seconds = ttl_seconds
        self.keep_versions = keep_versions

    @classmethod
    def from_rotator(cls, rotator: Rotator) -> PodTokenIssuer:
        return cls(
            minter=rotator.minter,
            provider=rotator.provider,
            tenant=rotator.tenant,
            min_ttl=rotator.min_ttl,
            ttl_seconds=rotator.ttl_seconds,
            keep_versions=rotator.keep_versions,
        )

    @property
    def store_tenant(self) -> str:
        return per_pod_store_tenant(self.tenant)

    def issue(self, *, rotation_id: str | None = None) -> StoredRecord:
        token: EnrollToken = self.minter.mint(
            tenant_id=self.tenant, min_ttl=self.min_ttl, ttl_seconds=self.ttl_seconds
        )
        rotation_id = rotation_id or str(uuid.uuid4())
        record = self.provider.write_pending(
            tenant=self.store_tenant, token=token, rotation_id=rotation_id
        )
        self.provider.promote(tenant=self.store_tenant, version=record.version)
        try:
            self.provider.prune(tenant=self.store_tenant, keep=self.keep_versions)
        except LgRotateError as exc:
            log.warning("could not prune old per-pod versions: %s", exc.one_line())
        return record

    def source(self, record: StoredRecord) -> str:
        """``linuxguard.io/source``: ``<provider>:<store tenant>/<version>``."""
        return f"{self.provider.name}:{self.store_tenant}/{record.version}"


# --- the keeper -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _PodRef:
    uid: str
    name: str
    secret: str
    started: bool
    deleting: bool


@dataclass(frozen=True, kw_only=True)
class _Held:
    """One per-pod Secret as listed: what it says, and its raw ownerReferences."""

    info: PodSecretInfo
    owners: tuple[dict[str, Any], ...]
    labels: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class KeeperStatus:
    synced: bool
    forbidden: bool
    pods: int  # pods naming a per-pod Secret, as the watch shows them
    secrets: int  # per-pod Secrets at the last list
    adopted: int
    deleted: int
    refreshed: int
    failures: int
    passes: int  # lists done
    refusals: int  # lists refused (403: no per-pod rights)


class PodSecretKeeper:
    """Adopts, refreshes and cleans up the per-pod Secrets of one shared Secret.

    Fed with the agent pods by the controller's watch (:meth:`observe`, :meth:`replace`);
    :meth:`run_once`, called in a loop by the controller's per-pod thread while it leads,
    does the work and says when it wants to run again. ``issuer`` mints and stores a fresh
    token (a :class:`PodTokenIssuer`, or a callable returning one for each refresh).

    RBAC (the optional component cronjob/components/per-pod): ``list``, ``get``, ``patch``,
    ``delete`` on ``secrets`` in the namespace (none can be narrowed by name: the names are
    chosen at admission), ``get``/``list`` on ``pods`` (the watch Role has them).
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        shared_secret: str,
        token_key: str,
        tenant_key: str,
        issuer: PodTokenIssuer | Callable[[], PodTokenIssuer],
        expiry_margin: float = 0.2,
        adoption_grace: timedelta | float = ADOPTION_GRACE,
        resync: float = 30.0,
        forbidden_retry: float = FORBIDDEN_RETRY,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        on_action: Callable[[str], None] | None = None,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.shared_secret = shared_secret
        self.token_key = token_key
        self.tenant_key = tenant_key
        self._issuer_source = issuer
        self.expiry_margin = expiry_margin
        self.adoption_grace = (
            adoption_grace
            if isinstance(adoption_grace, timedelta)
            else timedelta(seconds=adoption_grace)
        )
        self.resync = resync
        self.forbidden_retry = forbidden_retry
        self.request_timeout = request_timeout
        self.clock = clock
        self.monotonic = monotonic
        self.on_action = on_action
        self.selector = per_pod_selector(shared_secret)
        self._pods_api = PodApi(
            api_client=api_client, namespace=namespace, request_timeout=request_timeout
        )
        self._lock = threading.Lock()
        self.wake = threading.Event()  # set when a pod that names a Secret changes
        self._counts = {ADOPTED: 0, DELETED: 0, REFRESHED: 0, FAILED: 0}
        self._passes = 0
        self._refusals = 0
        self._said_forbidden = ""  # "", "info" or "warning": what was logged about 403
        self._warned: set[tuple[str, str]] = set()
        self._listed_at = float("-inf")
        self.reset()

    # --- the pod feed (the controller's watch thread) ---

    def reset(self) -> None:
        """Forget the pods (a new leadership term lists them again)."""
        with self._lock:
            self._pods: dict[str, _PodRef] = {}
            self._synced = False
            self._dirty = True
            self._secrets_seen = 0
            self._next_list = 0.0
            self._forbidden_until = 0.0
            self._forbidden = False
            self._finished: set[str] = set()  # Secrets whose pod started: never refreshed

    def observe(self, kind: str, pod: Mapping[str, Any]) -> None:
        """A watch event (``ADDED``, ``MODIFIED``, ``DELETED``) for an agent pod."""
        metadata = pod.get("metadata") or {}
        uid = str(metadata.get("uid") or "")
        if not uid:
            return
        secret = enroll_secret(pod)
        with self._lock:
            if kind == "DELETED" or secret is None:
                if self._pods.pop(uid, None) is not None:
                    self._dirty = True
                return
            ref = _PodRef(
                uid=uid,
                name=str(metadata.get("name") or ""),
                secret=secret,
                started=agent_started(pod, secret),
                deleting=bool(metadata.get("deletionTimestamp")),
            )
            previous = self._pods.get(uid)
            self._pods[uid] = ref
            if previous is None or previous.started != ref.started:
                self._dirty = True
                self.wake.set()

    def replace(self, pods: Iterable[Mapping[str, Any]]) -> None:
        """A (re)list of the agent pods: the full picture; marks the feed synced."""
        fresh: dict[str, _PodRef] = {}
        for pod in pods:
            metadata = pod.get("metadata") or {}
            secret = enroll_secret(pod)
            uid = str(metadata.get("uid") or "")
            if secret is None or not uid:
                continue
            fresh[uid] = _PodRef(
                uid=uid,
                name=str(metadata.get("name") or ""),
                secret=secret,
                started=agent_started(pod, secret),
                deleting=bool(metadata.get("deletionTimestamp")),
            )
        with self._lock:
            self._pods = fresh
            self._synced = True
            self._dirty = True
        self.wake.set()

    # --- introspection ---

    def status(self) -> KeeperStatus:
        with self._lock:
            return KeeperStatus(
                synced=self._synced,
                forbidden=self._forbidden,
                pods=len(self._pods),
                secrets=self._secrets_seen,
                adopted=self._counts[ADOPTED],
                deleted=self._counts[DELETED],
                refreshed=self._counts[REFRESHED],
                failures=self._counts[FAILED],
                passes=self._passes,
                refusals=self._refusals,
            )

    # --- the work (the controller's per-pod thread) ---

    def run_once(self, *, acting: bool = True) -> float:
        """One pass if one is due; returns the seconds until the next one wants to run.

        ``acting`` False (a leader whose Lease may have lapsed): nothing is written.
        """
        mono = self.monotonic()
        with self._lock:
            wait = self._wait_time(mono, acting=acting)
            if wait > 0:
                return wait
            self._dirty = False
            self._listed_at = mono
            pods = list(self._pods.values())
        held = self._list_secrets(any_named=bool(pods))
        if held is None:  # refused (retried after forbidden_retry) or failed (soon)
            return self.forbidden_retry if self._forbidden else min(self.resync, 5.0)
        next_due = self._reconcile(held, pods)
        with self._lock:
            self._passes += 1
            self._secrets_seen = len(held)
            self._next_list = self.monotonic() + min(self.resync, max(next_due, 0.05))
            return max(0.0, self._next_list - self.monotonic())

    def _wait_time(self, mono: float, *, acting: bool) -> float:
        """Seconds until a pass is due (0: now); called under the lock."""
        if not self._synced:
            return 0.1
        if self._forbidden and mono < self._forbidden_until:
            return self._forbidden_until - mono
        if not acting:
            return min(self.resync, 1.0)
        if not self._dirty and mono < self._next_list:
            return self._next_list - mono
        return max(0.0, self._listed_at + min(MIN_LIST_INTERVAL, self.resync) - mono)

    def _count(self, action: str) -> None:
        with self._lock:
            self._counts[action] += 1
        if self.on_action is not None:
            self.on_action(action)

    # --- API calls ---

    def _op(self, verb: str, name: str | None = None, *, writes: bool = False) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Secret",
            resource="secrets",
            group="",
            namespace=self.namespace,
            name=name,
            writes=writes,
        )

    def _list_secrets(self, *, any_named: bool) -> list[_Held] | None:
        try:
            answer = api_request(
                self.api_client,
                self._op("list"),
                "GET",
                SECRETS_PATH,
                query={"labelSelector": self.selector},
                accept=METADATA_LIST,
                timeout=self.request_timeout,
            )
        except KubernetesForbiddenError:
            self._say_forbidden(any_named=any_named)
            with self._lock:
                self._forbidden = True
                self._refusals += 1
                self._forbidden_until = self.monotonic() + self.forbidden_retry
            return None
        except LgRotateError as exc:
            log.warning("could not list the per-pod Secrets: %s", exc.one_line())
            with self._lock:
                self._dirty = True
            return None
        with self._lock:
            if self._forbidden:
                log.info("per-pod Secrets of %s are managed now", self.shared_secret)
            self._forbidden = False
            self._said_forbidden = ""
        return [self._held(item) for item in answer.get("items") or [] if isinstance(item, dict)]

    def _say_forbidden(self, *, any_named: bool) -> None:
        level = "warning" if any_named else "info"
        if self._said_forbidden in (level, "warning"):
            log.debug("still no permission to list Secrets for the per-pod Secrets")
            return
        self._said_forbidden = level
        text = (
            "per-pod Secrets are not managed: the ServiceAccount may not list Secrets in "
            f"namespace {self.namespace!r} (no adoption, refresh or clean-up of the webhook's "
            "Secrets; the shared Secret is not affected). Apply the optional component "
            "cronjob/components/per-pod (docs/PER-POD.md) to grant it"
        )
        if any_named:
            log.warning("%s; pods that name a per-pod Secret exist", text)
        else:
            log.info("%s; fine if you do not run the webhook", text)

    def _read_meta(self, name: str) -> _Held | None:
        try:
            item = api_request(
                self.api_client,
                self._op("get", name),
                "GET",
                SECRET_PATH,
                accept=METADATA_ONE,
                timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return None
        return self._held(item)

    @staticmethod
    def _held(item: Mapping[str, Any]) -> _Held:
        metadata = item.get("metadata") or {}
        return _Held(
            info=PodSecretInfo.from_object(item),
            owners=tuple(metadata.get("ownerReferences") or ()),
            labels=dict(metadata.get("labels") or {}),
        )

    def _patch(self, name: str, body: Mapping[str, Any], *, writes: bool) -> _Held:
        """A merge patch; the Secret's metadata as the API server answers it (never data)."""
        item = api_request(
            self.api_client,
            self._op("patch", name, writes=writes),
            "PATCH",
            SECRET_PATH,
            query={"fieldManager": "lg-rotate"},
            body=dict(body),
            content_type=MERGE_PATCH,
            accept=METADATA_ONE,
            timeout=self.request_timeout,
        )
        return self._held(item)

    def _read_pod(self, name: str) -> dict[str, Any] | None:
        """The pod as it is now (a list by name: the watch Role has list, not get, on pods)."""
        answer = api_request(
            self.api_client,
            ApiOp(
                verb="list",
                kind="Pod",
                resource="pods",
                group="",
                namespace=self.namespace,
                name=None,
                writes=False,
            ),
            "GET",
            PODS_PATH,
            query={"fieldSelector": f"metadata.name={name}"},
            timeout=self.request_timeout,
        )
        items = [item for item in answer.get("items") or [] if isinstance(item, dict)]
        return items[0] if items else None

    # --- one pass ---

    def _belongs(self, held: _Held) -> bool:
        return (
            held.labels.get(PER_POD_LABEL) == "true"
            and held.labels.get(SHARED_SECRET_LABEL) == self.shared_secret
        )

    def _reconcile(self, held: list[_Held], pods: list[_PodRef]) -> float:
        """Adopt, refresh and collect orphans; returns seconds until a refresh is due."""
        now = self.clock()
        naming: dict[str, list[_PodRef]] = {}
        for pod in pods:
            naming.setdefault(pod.secret, []).append(pod)
        next_due = self.resync
        orphans: list[_Held] = []
        for item in held:
            if not self._belongs(item):
                continue
            info = item.info
            named_by = [p for p in naming.get(info.name, []) if not p.deleting] or naming.get(
                info.name, []
            )
            if not named_by:
                if self._orphan(item, now=now):
                    orphans.append(item)
                elif info.created_at is not None and info.owner_pod_uid is None:
                    left = (info.created_at + self.adoption_grace - now).total_seconds()
                    next_due = min(next_due, max(left, 0.0))
                continue
            if len(named_by) > 1:
                self._warn_once(
                    ("shared", info.name),
                    "pods %s all name per-pod Secret %s: none is adopted or refreshed (a pod "
                    "spec copied from another pod?)",
                    ", ".join(sorted(p.name for p in named_by)),
                    info.name,
                )
                continue
            pod = named_by[0]
            try:
                current = self._adopt(item, pod)
                if current is not None:
                    due = self._maybe_refresh(current, pod, now=now)
                    next_due = min(next_due, due)
            except LgRotateError as exc:
                self._count(FAILED)
                log.warning("per-pod Secret %s (pod %s): %s", info.name, pod.name, exc.one_line())
        if orphans:
            self._collect(orphans, now=now)
        self._finished &= {item.info.name for item in held}
        return next_due

    def _orphan(self, item: _Held, *, now: datetime) -> bool:
        info = item.info
        if info.owner_pod_uid is not None:
            return True  # its pod is gone (we watch every pod that names one): GC's, and ours
        if info.created_at is None:
            return False
        return now - info.created_at >= self.adoption_grace

    def _warn_once(self, key: tuple[str, str], message: str, *args: object) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        log.warning(message, *args)

    def _adopt(self, item: _Held, pod: _PodRef) -> _Held | None:  # noqa: PLR0911 - per outcome
        """Set the ownerReference to ``pod`` unless it is there; the Secret as it is now
        (None: gone, or not this pod's to adopt)."""
        if any(o.get("uid") == pod.uid for o in item.owners):
            return item
        if not self._may_adopt(item, pod):
            return None
        info = item.info
        current = item
        for _attempt in range(MAX_CONFLICTS):
            owners = [
                *current.owners,
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": pod.name,
                    "uid": pod.uid,
                    "controller": False,
                    "blockOwnerDeletion": False,
                },
            ]
            body = {
                "metadata": {
                    "resourceVersion": current.info.resource_version,
                    "ownerReferences": owners,
                    "annotations": {ANNOTATION_POD: pod.name},
                }
            }
            try:
                adopted = self._patch(info.name, body, writes=False)
            except KubernetesConflictError:
                fresh = self._read_meta(info.name)
                if fresh is None:
                    return None
                if any(o.get("uid") == pod.uid for o in fresh.owners):
                    return fresh
                if not self._may_adopt(fresh, pod):
                    return None
                current = fresh
                continue
            except KubernetesNotFoundError:
                return None
            self._count(ADOPTED)
            log.info(
                "per-pod Secret %s now belongs to pod %s (uid %s)", info.name, pod.name, pod.uid
            )
            return adopted
        raise KubernetesConflictError(
            f"Secret {self.namespace}/{info.name} kept changing while lg-rotate adopted it",
            fix="another writer is fighting lg-rotate over it",
        )

    def _may_adopt(self, item: _Held, pod: _PodRef) -> bool:
        """Not owned by another pod, and made for this one (``linuxguard.io/pod``)."""
        info = item.info
        pod_owners = [
            o for o in item.owners if o.get("kind") == "Pod" and o.get("apiVersion") == "v1"
        ]
        if pod_owners:
            self._warn_once(
                ("owned", info.name),
                "pod %s names per-pod Secret %s, which belongs to another pod (uid %s): not "
                "adopted; that pod's token is not this pod's to use",
                pod.name,
                info.name,
                pod_owners[0].get("uid"),
            )
            return False
        if not _pod_label_matches(info.pod, pod.name):
            self._warn_once(
                ("label", info.name),
                "pod %s names per-pod Secret %s, which was made for %s: not adopted",
                pod.name,
                info.name,
                info.pod,
            )
            return False
        return True

    def refresh_deadline(self, info: PodSecretInfo) -> datetime | None:
        """When the Secret's token is due for replacement (None: it says nothing about it)."""
        if info.expires_at is None:
            return None
        born = info.rotated_at or info.created_at or info.expires_at
        lifetime = max(timedelta(0), info.expires_at - born)
        return info.expires_at - lifetime * self.expiry_margin

    def _maybe_refresh(self, item: _Held, pod: _PodRef, *, now: datetime) -> float:
        info = item.info
        if pod.started or pod.deleting or info.name in self._finished:
            self._finished.add(info.name)
            return self.resync
        deadline = self.refresh_deadline(info)
        if deadline is None:
            return self.resync
        if now < deadline:
            return (deadline - now).total_seconds()
        # Read the pod again: its status in the watch may be a moment old.
        fresh = self._read_pod(pod.name)
        uid = ((fresh or {}).get("metadata") or {}).get("uid")
        if fresh is None or uid != pod.uid:
            return self.resync
        if agent_started(fresh, info.name):
            self._finished.add(info.name)
            log.info(
                "pod %s started with its token: per-pod Secret %s is left as it is",
                pod.name,
                info.name,
            )
            return self.resync
        self._refresh(item, pod)
        return self.resync

    def _issuer(self) -> PodTokenIssuer:
        source = self._issuer_source
        return source if isinstance(source, PodTokenIssuer) else source()

    def _refresh(self, item: _Held, pod: _PodRef) -> None:
        issuer = self._issuer()
        record = issuer.issue()
        token = record.token
        delivery = Delivery(record=record, source=issuer.source(record), rotated_at=self.clock())
        current = item
        for _attempt in range(MAX_CONFLICTS):
            if current.info.expires_at is not None and current.info.expires_at >= token.expires_at:
                return  # somebody wrote a token at least as fresh in the meantime
            body = {
                "metadata": {
                    "resourceVersion": current.info.resource_version,
                    "annotations": delivery_annotations(delivery),
                },
                "data": secret_data(token, token_key=self.token_key, tenant_key=self.tenant_key),
            }
            try:
                self._patch(item.info.name, body, writes=True)
            except KubernetesConflictError:
                fresh = self._read_meta(item.info.name)
                if fresh is None:
                    return
                current = fresh
                continue
            except KubernetesNotFoundError:
                return
            self._count(REFRESHED)
            log.info(
                "refreshed per-pod Secret %s of pod %s (not started yet): token %s, store "
                "version %s, expires %s",
                item.info.name,
                pod.name,
                token.short_fingerprint,
                record.version,
                token.expires_at.isoformat(),
            )
            return
        raise KubernetesConflictError(
            f"Secret {self.namespace}/{item.info.name} kept changing while lg-rotate refreshed it",
            fix="another writer is fighting lg-rotate over it",
        )

    def _collect(self, orphans: list[_Held], *, now: datetime) -> None:
        """Delete orphans, once a namespace-wide pod list shows that no pod uses them: none
        names one (annotation), reads it (env), or is its owner (its annotation edited away)."""
        try:
            everything, _ = self._pods_api.list(selector="")
        except LgRotateError as exc:
            log.warning(
                "could not list pods to confirm orphaned per-pod Secrets: %s", exc.one_line()
            )
            return
        uids = {str((pod.get("metadata") or {}).get("uid") or "") for pod in everything}
        for item in orphans:
            info = item.info
            naming = [pod for pod in everything if enroll_secret(pod) == info.name]
            if not naming and info.owner_pod_uid not in uids:
                if any(secret_readers(pod, info.name) for pod in everything):
                    self._warn_once(
                        ("reader", info.name),
                        "per-pod Secret %s is read by a pod that does not name it "
                        "(linuxguard.io/enroll-secret): kept, never refreshed",
                        info.name,
                    )
                    continue
                self._delete(item, now=now)
                continue
            if not naming:
                continue  # its owner lives on: garbage collection will take it with it
            # A live pod names it, but the watch's selector does not show that pod.
            meta = naming[0].get("metadata") or {}
            self._warn_once(
                ("selector", info.name),
                "pod %s names per-pod Secret %s but the watch's --selector does not match it: "
                "the Secret is adopted but never refreshed (make the selector match the "
                "webhook's objectSelector)",
                meta.get("name"),
                info.name,
            )
            if info.owner_pod_uid is not None:
                continue  # adopted already
            ref = _PodRef(
                uid=str(meta.get("uid") or ""),
                name=str(meta.get("name") or ""),
                secret=info.name,
                started=True,  # not watched: never refreshed
                deleting=bool(meta.get("deletionTimestamp")),
            )
            try:
                self._adopt(item, ref)
            except LgRotateError as exc:
                self._count(FAILED)
                log.warning("per-pod Secret %s: %s", info.name, exc.one_line())

    def _delete(self, item: _Held, *, now: datetime) -> None:
        info = item.info
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": info.uid, "resourceVersion": info.resource_version},
        }
        try:
            api_request(
                self.api_client,
                self._op("delete", info.name),
                "DELETE",
                SECRET_PATH,
                body=body,
                timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return
        except KubernetesConflictError:
            log.info(
                "per-pod Secret %s changed since it was listed: left for the next pass", info.name
            )
            return
        except LgRotateError as exc:
            self._count(FAILED)
            log.warning("could not delete per-pod Secret %s: %s", info.name, exc.one_line())
            return
        self._count(DELETED)
        if info.owner_pod_uid is not None:
            why = f"its pod (uid {info.owner_pod_uid}) is gone"
        else:
            age = (now - info.created_at).total_seconds() if info.created_at else 0.0
            why = f"no pod named it within {age:.0f}s of its creation"
        log.info("deleted per-pod Secret %s: %s", info.name, why)
