"""A pod simulator: the kubelets (and the scheduler) of fake Nodes on a real control plane.

:class:`PodSim` runs the LinuxGuard agent DaemonSet on the real API server and
kube-controller-manager of tests/fixtures/cluster.py (fixture ``k8s``):

* **the DaemonSet controller is the real one**: :class:`PodSim` creates the DaemonSet
  ``linuxguard-agent`` (``RollingUpdate``, ``maxUnavailable``) and fake Nodes
  (``k8s.create_nodes``); kube-controller-manager creates one pod per Node, recreates a
  deleted pod once it is really gone, replaces the pods after a template change
  (:meth:`PodSim.rollout` is ``kubectl rollout restart``) under its update strategy, and
  keeps the DaemonSet's status;
* **the scheduler**: a DaemonSet pod names its Node in a required node-affinity term; the
  simulator binds it there (the ``pods/binding`` subresource), which sets ``spec.nodeName``;
* **the kubelet** of each Node, one thread per pod: at each *container start* it resolves
  the pod's ``secretKeyRef`` env by reading the Secret *now* (that is the token the
  container gets; a missing Secret is ``CreateContainerConfigError``, retried), writes the
  pod status through the status subresource (``containerStatuses`` running with a fresh
  ``containerID``, ``startedAt``, ``restartCount``, ``lastState``), and the agent enrols
  with the LinuxGuard sandbox (workload id = the pod UID). Enrolled: the container and the
  pod turn Ready. Refused (409 / 400): in ``restart`` mode the container exits and the
  kubelet restarts it after a crash-loop back-off, compressed (``restart_backoff``: 0.3 s
  doubling to 3 s where a real kubelet does 10 s doubling to 5 min, plus a little jitter
  for its pod-worker resync), at most ``max_starts`` starts per pod; in ``stuck`` mode the
  agent keeps retrying the token it has and never turns Ready (the vendor page allows
  both). A deleted pod (``deletionTimestamp``: the lg-rotate controller's collision
  recovery, ``roll``, a rollout) has its container stopped, then the kubelet finishes the
  deletion (grace period 0, UID precondition), as a kubelet does.

Node additions (:meth:`PodSim.add_nodes`) create Nodes; a node removal
(:meth:`PodSim.remove_node`) deletes the Node and, playing the pod garbage collector
without its 40 s quarantine, the pods bound to it (the DaemonSet controller leaves the pods
of a deleted Node alone).

**Bursts**: pods that arrive while a burst is on (:meth:`add_nodes` / :meth:`rollout` with
``burst=True``), within ``burst_window`` seconds of each other, start together: each reads
the Secret, then waits until all of its group have read before it reports its start, so
they start under the same token and collide for real. :meth:`crash` with ``burst`` does
the same for container restarts.

Pod events come from the simulator's own list+watch of the agent pods. Everything the
agents did is in :attr:`PodSim.attempts`; tokens are only ever held as fingerprints.
:func:`burst_shared_secret` measures the shared-Secret burst (issue 9's baseline).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import urllib3
from kubernetes import client

from providers.memory import MemoryProvider, MemoryStore
from rotator import agent
from rotator.kube.controller import Controller
from rotator.kube.lease import LeaseLock
from rotator.kube.secret import SecretTarget
from rotator.kube.workloads import restart_workload
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Rotator
from rotator.sandbox import SandboxServer
from rotator.tokens import (
    Secret,
    fingerprint,
    format_timestamp,
    normalize,
    parse_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from fixtures.cluster import Cluster

log = logging.getLogger("lg_rotate.tests.podsim")
T = TypeVar("T")

AgentMode = Literal["restart", "stuck"]
TENANT = "acme"
SELECTOR = "app=linuxguard-agent"
APP_LABEL = {"app": "linuxguard-agent"}
CONTAINER = "agent"
IMAGE = "linuxguard/agent:sim"
HASH_LABEL = "controller-revision-hash"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = (15.0, 30.0)  # (connect, read): TLS handshakes are slow under a burst
TRANSIENT_STATUSES = {0, 429, 500, 502, 503, 504}  # 0: the client's own connection errors
NODE_BURST_WAIT = 10.0  # at most, for the pods of a burst of new Nodes to arrive
POOL_SIZE = 64  # kubelet threads share one client: keep their TLS connections


class HasApiClient(Protocol):
    """The real control plane (``k8s``) or the emulator (``kubesim``)."""

    def api_client(self) -> ApiClient: ...


def make_rotator(
    k8s: HasApiClient,
    namespace: str,
    sandbox: SandboxServer,
    *,
    clock: Callable[[], datetime] | None = None,
) -> Rotator:
    """A Rotator: the sandbox, a private memory store, the Secret and its Lease lock."""
    api = k8s.api_client()
    clock = clock or sandbox.now
    return Rotator(
        minter=LinuxGuardClient(
            base_url=sandbox.url,
            api_key=Secret(sandbox.api_key),
            # capped: a LinuxGuard outage fails rotations (the controller's retries are tested)
            retry=RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, budget=2),
            clock=clock,
        ),
        provider=MemoryProvider(store=MemoryStore()),
        tenant=TENANT,
        target=SecretTarget(api_client=api, namespace=namespace),
        lock=LeaseLock(api_client=api, namespace=namespace, wait=10, poll_interval=0.02),
        clock=clock,
    )


def make_controller(
    k8s: HasApiClient, namespace: str, sandbox: SandboxServer, **overrides: Any
) -> Controller:
    """A controller for tests: one clock for the sandbox, the rotator and the controller
    (``sandbox.now``, which ``advance_clock`` moves), short periods, metrics on a free
    loopback port."""
    clock = overrides.pop("clock", sandbox.now)
    rotator = overrides.pop("rotator", None) or make_rotator(k8s, namespace, sandbox, clock=clock)
    settings: dict[str, Any] = {
        "collision_grace": 1.0,
        "lease_duration": 10,
        "lease_retry_period": 0.2,
        "resync_seconds": 5,
        "tick": 0.1,
        "max_backoff": 1.0,
        "metrics_port": 0,
        "metrics_host": "127.0.0.1",
        "clock": clock,
    }
    settings.update(overrides)
    return Controller(
        api_client=k8s.api_client(),
        namespace=namespace,
        selector=SELECTOR,
        rotator=rotator,
        target=rotator.target,  # type: ignore[arg-type]
        **settings,
    )


@dataclass(kw_only=True)
class Attempt:
    """One start of an agent container and how its enrolment went."""

    pod_uid: str
    pod_name: str
    node: str
    restart_count: int
    container_id: str
    started_at: datetime
    token_fingerprint: str  # full SHA-256 of the canonical token (the sandbox's key)
    token_expires_at: datetime | None  # the Secret's expires-at annotation, when it was read
    read_at: datetime  # sandbox clock
    results: list[str] = field(default_factory=list)  # agent.EnrollResult.result, per try
    reported: bool = False  # the pod status showed this start (the pod was not gone yet)
    monotonic: float = 0.0  # when the container read the Secret (time.monotonic)

    @property
    def enrolled(self) -> bool:
        return "enrolled" in self.results


@dataclass(eq=False, kw_only=True)
class SimPod:
    """A DaemonSet pod as its kubelet knows it."""

    name: str
    uid: str
    node: str
    template_hash: str
    mode: AgentMode
    created: float  # monotonic, when the simulator first saw it
    gate: _Gate | None = None  # a burst: start together with the rest of the group
    deleted: threading.Event = field(default_factory=threading.Event)  # deleting or gone
    gone: threading.Event = field(default_factory=threading.Event)  # the API has no such pod
    wake: threading.Event = field(default_factory=threading.Event)
    crash_barrier: threading.Barrier | None = None
    crash_requested: bool = False
    ready: bool = False
    enrolled: bool = False
    enrolled_at: float | None = None  # monotonic
    restart_count: int = 0
    deleted_by_sim: bool = False  # the simulator deleted it (a node removal, the end)
    thread: threading.Thread | None = None
    start_time: str = ""


class _PodLeftError(Exception):
    """The pod is being deleted (or the simulation stops): its kubelet stops."""


class _Gate:
    """A burst group: pods that start together (those of ``nodes``, or arriving before
    ``closes``)."""

    def __init__(self, closes: float, nodes: Iterable[str] = ()) -> None:
        self.closes = closes  # monotonic; moved to "now" once every node of ``nodes`` joined
        self.nodes = set(nodes)  # still expected
        self.members = 0
        self.barrier: threading.Barrier | None = None


class PodSim:
    """See the module docstring. Use as a context manager (``start``/``stop``)."""

    def __init__(
        self,
        *,
        k8s: Cluster,
        namespace: str,
        sandbox: SandboxServer,
        secret_name: str = "linuxguard-enroll",  # noqa: S107 - a name
        name: str = "linuxguard-agent",
        clock: Callable[[], datetime] = utcnow,
        max_unavailable: int = 1,
        restart_backoff: tuple[float, float] = (0.3, 3.0),
        restart_jitter: float = 0.15,
        max_starts: int | None = None,
        stuck_retry: float = 0.4,
        start_delay: tuple[float, float] = (0.0, 0.03),
        burst_window: float = 0.3,
        seed: int = 4,
    ) -> None:
        self.k8s = k8s
        self.namespace = namespace
        self.sandbox = sandbox
        self.secret_name = secret_name
        self.name = name
        self.clock = clock
        self.max_unavailable = max_unavailable
        self.restart_backoff = restart_backoff
        self.restart_jitter = restart_jitter
        self.max_starts = max_starts
        self.stuck_retry = stuck_retry
        self.start_delay = start_delay
        self.burst_window = burst_window
        self.random = random.Random(seed)
        self.api = _api_client(k8s)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.lock = threading.RLock()
        self.nodes: set[str] = set()
        self.modes: dict[str, AgentMode] = {}  # node -> agent mode (default: restart)
        self.pods: dict[str, SimPod] = {}  # uid -> pod (deleted ones stay, flagged)
        self.attempts: list[Attempt] = []
        self.errors: list[str] = []
        self.ds_uid = ""
        self.burst_creates = False
        self._gate: _Gate | None = None  # the open burst window
        self._node_gate: _Gate | None = None  # a burst of new Nodes: waits for all their pods
        self._barriers: list[threading.Barrier] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watch_response: Any = None
        self._watch_synced = threading.Event()
        self._last_restart: datetime | None = None

    # --- lifecycle ---

    def __enter__(self) -> PodSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PodSim:
        env = [
            {
                "name": variable,
                "valueFrom": {"secretKeyRef": {"name": self.secret_name, "key": key}},
            }
            for variable, key in (
                (agent.ENROLL_TOKEN_ENV, "token"),
                (agent.TENANT_ENV, "tenant-id"),
            )
        ]
        body = {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": APP_LABEL},
            "spec": {
                "selector": {"matchLabels": APP_LABEL},
                "updateStrategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": self.max_unavailable},
                },
                "template": {
                    "metadata": {"labels": APP_LABEL},
                    "spec": {
                        "terminationGracePeriodSeconds": 5,
                        "containers": [{"name": CONTAINER, "image": IMAGE, "env": env}],
                    },
                },
            },
        }
        created = self.apps.create_namespaced_daemon_set(
            self.namespace, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
        )
        self.ds_uid = json.loads(created.data)["metadata"]["uid"]
        self._watcher = threading.Thread(target=self._watch_loop, name="podsim-watch", daemon=True)
        self._watcher.start()
        self.wait(self._watch_synced.is_set, timeout=15, what="the pod simulator's first pod list")
        return self

    def stop(self) -> None:
        """Stop the kubelets; delete the DaemonSet and its pods (grace period 0)."""
        self._stopping.set()
        self._abort_watch()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
        with self.lock:
            pods = list(self.pods.values())
            barriers = list(self._barriers)
        for barrier in barriers:
            barrier.abort()
        for pod in pods:
            pod.wake.set()
        for pod in pods:
            if pod.thread is not None:
                pod.thread.join(timeout=10)
        try:
            with contextlib.suppress(client.ApiException):
                self.apps.delete_namespaced_daemon_set(
                    self.name,
                    self.namespace,
                    body={"propagationPolicy": "Background"},
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            with contextlib.suppress(client.ApiException):
                self.core.delete_collection_namespaced_pod(
                    self.namespace,
                    label_selector=SELECTOR,
                    grace_period_seconds=0,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        finally:
            self.api.close()  # type: ignore[no-untyped-call]

    # --- scenario controls ---

    def add_nodes(self, names: Iterable[str], *, burst: bool = False) -> None:
        """New Nodes; with ``burst`` their agents start in the same instant."""
        names = [name for name in names if name not in self.nodes]
        with self.lock:
            self.burst_creates = burst
            self.nodes.update(names)
            if burst and len(names) > 1:  # the Nodes come one by one: wait for every pod
                self._node_gate = _Gate(time.monotonic() + NODE_BURST_WAIT, names)
        self.k8s.create_nodes(names)

    def remove_node(self, node: str) -> None:
        """The Node goes away; its pods are deleted (the pod GC, without its quarantine)."""
        with self.lock:
            self.nodes.discard(node)
            doomed = [p for p in self.pods.values() if p.node == node and not p.gone.is_set()]
        self.k8s.delete_nodes([node])
        for pod in doomed:
            pod.deleted_by_sim = True
            pod.deleted.set()
            pod.wake.set()
            self._finish_deletion(pod)

    def set_mode(self, node: str, mode: AgentMode) -> None:
        """How the agent on ``node`` reacts to a refused enrolment (pods created from now)."""
        with self.lock:
            self.modes[node] = mode

    def rollout(self, *, max_unavailable: int | None = None, burst: bool = False) -> None:
        """``kubectl rollout restart``: a template change; the DaemonSet controller replaces
        the pods, ``max_unavailable`` at a time."""
        with self.lock:
            self.burst_creates = burst
        if max_unavailable is not None and max_unavailable != self.max_unavailable:
            self.max_unavailable = max_unavailable
            self.k8s.modify(
                "apps/v1/daemonsets",
                self.namespace,
                self.name,
                {
                    "spec": {
                        "updateStrategy": {"rollingUpdate": {"maxUnavailable": max_unavailable}}
                    }
                },
            )
        at = utcnow()
        if self._last_restart is not None and at < self._last_restart + timedelta(seconds=1):
            at = self._last_restart + timedelta(seconds=1)  # the annotation has 1 s resolution
        self._last_restart = at
        restart_workload(
            api_client=self.api, namespace=self.namespace, kind="daemonset", name=self.name, at=at
        )

    def crash(self, nodes: Iterable[str], *, burst: bool = False) -> int:
        """The agent containers on ``nodes`` exit and restart (re-reading the Secret)."""
        wanted = set(nodes)
        with self.lock:
            targets = [pod for pod in self.live_pods().values() if pod.node in wanted]
            barrier = threading.Barrier(len(targets), timeout=5) if burst and targets else None
            if barrier is not None:
                self._barriers.append(barrier)
            for pod in targets:  # the container exits now: not Ready until it enrols again
                pod.crash_barrier = barrier
                pod.crash_requested = True
                pod.ready = False
        for pod in targets:
            pod.wake.set()
        return len(targets)

    # --- observation ---

    def live_pods(self) -> dict[str, SimPod]:
        """Node -> its (not deleted) pod."""
        with self.lock:
            return {
                pod.node: pod
                for pod in sorted(self.pods.values(), key=lambda p: p.created)
                if not pod.deleted.is_set()
            }

    def settled(self) -> bool:
        """Every Node has one pod, enrolled and Ready; no other pod is left; the DaemonSet
        controller agrees (its status: every pod current and available)."""
        with self.lock:
            if self.errors:
                return False
            pods = [pod for pod in self.pods.values() if not pod.gone.is_set()]
            by_node = {pod.node: pod for pod in pods}
            if not (
                len(pods) == len(self.nodes)
                and set(by_node) == self.nodes
                and all(pod.ready and not pod.deleted.is_set() for pod in pods)
            ):
                return False
            expected = len(self.nodes)
        ds = self.k8s.get("apps/v1/daemonsets", self.namespace, self.name) or {}
        status = ds.get("status") or {}
        generation = (ds.get("metadata") or {}).get("generation", 0)
        return (
            status.get("observedGeneration", -1) >= generation
            and status.get("desiredNumberScheduled") == expected
            and status.get("updatedNumberScheduled") == expected
            and status.get("numberAvailable") == expected
            and not status.get("numberMisscheduled")
        )

    @property
    def template_hash(self) -> str:
        """The DaemonSet's current revision (its ``controller-revision-hash``)."""
        revisions = self.k8s.list_objects(
            "apps/v1/controllerrevisions", self.namespace, label_selector=SELECTOR
        )
        if not revisions:
            return ""
        newest = max(revisions, key=lambda r: int(r.get("revision") or 0))
        return str(newest["metadata"].get("labels", {}).get(HASH_LABEL, ""))

    def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.errors:
                raise AssertionError(f"the pod simulator failed: {self.errors[:3]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")

    # --- the pod watch: new pods, deletions by anyone ---

    def _abort_watch(self) -> None:
        response = self._watch_response
        if response is not None:
            with contextlib.suppress(Exception):
                shutdown = getattr(response, "shutdown", None)
                if callable(shutdown):
                    shutdown()
                response.close()

    def _watch_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                version = self._list()
                self._watch_synced.set()
                self._watch(version)
            except Exception as exc:  # a broken watch is re-listed, as an informer does
                if self._stopping.is_set():
                    return
                log.debug("pod simulator watch broke (%r); listing again", exc)
                time.sleep(0.1)

    def _list(self) -> str:
        answer = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=SELECTOR,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        listing = json.loads(answer.data)
        seen = set()
        for item in listing.get("items") or []:
            seen.add(item["metadata"]["uid"])
            self._observe("MODIFIED", item)
        with self.lock:
            vanished = [
                p for uid, p in self.pods.items() if uid not in seen and not p.gone.is_set()
            ]
        for pod in vanished:
            self._observe_gone(pod)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> None:
        response = self.core.list_namespaced_pod(
            self.namespace,
            label_selector=SELECTOR,
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=60,
            _preload_content=False,
            _request_timeout=(5.0, 90.0),
        )
        self._watch_response = response
        buffer = b""
        try:
            for chunk in response.stream(65536, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind == "ERROR":
                        return  # 410 Gone and the like: list again
                    if kind == "BOOKMARK":
                        continue
                    self._observe(kind, obj)
                if self._stopping.is_set():
                    return
        finally:
            self._watch_response = None
            response.release_conn()

    def _observe(self, kind: str, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        uid = metadata.get("uid")
        if not uid:
            return
        with self.lock:
            pod = self.pods.get(uid)
        if kind == "DELETED":
            if pod is not None:
                self._observe_gone(pod)
            return
        if pod is None:
            if metadata.get("deletionTimestamp"):
                return  # deleted before its kubelet saw it: nothing ever started
            if not any(
                ref.get("uid") == self.ds_uid for ref in metadata.get("ownerReferences", [])
            ):
                return
            node = _target_node(obj)
            if not node:
                return
            pod = self._new_pod(metadata, node)
            if pod is None:
                return
        if metadata.get("deletionTimestamp") and not pod.deleted.is_set():
            pod.deleted.set()
            pod.wake.set()

    def _observe_gone(self, pod: SimPod) -> None:
        pod.gone.set()
        pod.deleted.set()
        pod.wake.set()

    def _new_pod(self, metadata: Mapping[str, Any], node: str) -> SimPod | None:
        with self.lock:
            if metadata["uid"] in self.pods or self._stopping.is_set():
                return None
            pod = SimPod(
                name=metadata["name"],
                uid=metadata["uid"],
                node=node,
                template_hash=(metadata.get("labels") or {}).get(HASH_LABEL, ""),
                mode=self.modes.get(node, "restart"),
                created=time.monotonic(),
            )
            now = time.monotonic()
            gate = self._node_gate
            if gate is not None and gate.barrier is None and node in gate.nodes:
                gate.nodes.discard(node)
                if not gate.nodes:
                    gate.closes = now
                    self._node_gate = None
            elif self.burst_creates:
                gate = self._gate
                if gate is None or now > gate.closes or gate.barrier is not None:
                    gate = self._gate = _Gate(now + self.burst_window)
            else:
                gate = None
            if gate is not None:
                gate.members += 1
                pod.gate = gate
            self.pods[pod.uid] = pod
        pod.thread = threading.Thread(target=self._kubelet, args=(pod,), name=f"kubelet-{pod.name}")
        pod.thread.daemon = True
        pod.thread.start()
        return pod

    # --- the scheduler and the kubelet ---

    def _api(self, pod: SimPod | None, call: Callable[[], T]) -> T:
        """One API request of a kubelet; a busy API server (timeouts, resets, 429, 5xx) is
        retried, as a kubelet does, until the pod goes (:class:`_PodLeftError`)."""
        delay = 0.1
        for _ in range(100):
            try:
                return call()
            except client.ApiException as exc:
                if exc.status not in TRANSIENT_STATUSES:
                    raise
                error: Exception = exc
            except urllib3.exceptions.HTTPError as exc:
                error = exc
            log.debug("the API server is busy (%r); retrying", error)
            if pod is None:
                if self._stopping.wait(delay):
                    raise _PodLeftError
            elif self._sleep(pod, delay):
                raise _PodLeftError
            delay = min(1.0, delay * 2)
        raise AssertionError(f"the API server stayed busy: {error!r}")

    def _bind(self, pod: SimPod) -> bool:
        """The scheduler's part: bind the pod to the Node its affinity names."""
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": pod.name, "uid": pod.uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": pod.node},
        }
        try:
            self._api(
                pod,
                lambda: self.core.create_namespaced_pod_binding(
                    pod.name,
                    self.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return False  # deleted meanwhile
            if exc.status != 409:  # 409: already bound (a relist saw it again)
                raise
        return True

    def _finish_deletion(self, pod: SimPod) -> None:
        """The kubelet stopped the containers: the pod may go now (grace period 0)."""
        try:
            self._api(
                None,
                lambda: self.core.delete_namespaced_pod(
                    pod.name,
                    self.namespace,
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": pod.uid}},
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or another pod by that name
                raise

    def _read_secret(self, pod: SimPod) -> tuple[Secret, str, datetime | None] | None:
        try:
            answer = self._api(
                pod,
                lambda: self.core.read_namespaced_secret(
                    self.secret_name,
                    self.namespace,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return None  # CreateContainerConfigError: retried, nothing consumed
            raise
        secret = json.loads(answer.data)
        data = secret.get("data") or {}
        if not data.get("token"):
            return None
        token = Secret(base64.b64decode(data["token"]).decode())
        tenant = base64.b64decode(data.get("tenant-id") or "").decode()
        annotations = secret["metadata"].get("annotations") or {}
        expires = annotations.get("linuxguard.io/expires-at")
        return token, tenant, parse_timestamp(expires) if expires else None

    def _patch_status(self, pod: SimPod, container: dict[str, Any], *, ready: bool) -> bool:
        """Write the pod's status (the status subresource, a merge patch: lists replaced)."""
        if pod.gone.is_set():
            return False
        condition = "True" if ready else "False"
        now = format_timestamp(self.clock())
        status = {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "startTime": pod.start_time,
            "conditions": [
                {"type": "PodReadyToStartContainers", "status": "True"},
                {"type": "Initialized", "status": "True"},
                {"type": "Ready", "status": condition, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": condition, "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True"},
            ],
            "containerStatuses": [container],
        }
        try:
            self._api(
                pod,
                lambda: self.core.patch_namespaced_pod_status(
                    pod.name,
                    self.namespace,
                    {"status": status},
                    _content_type=MERGE_PATCH,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _kubelet(self, pod: SimPod) -> None:
        try:
            if self._bind(pod):
                self._run_agent(pod)
        except _PodLeftError:
            pass
        except Exception as exc:
            if not pod.deleted.is_set() and not self._stopping.is_set():
                log.exception("kubelet for %s failed", pod.name)
                self.errors.append(f"kubelet {pod.name}: {exc!r}")
        finally:
            if pod.gate is not None and pod.gate.barrier is not None:
                pod.gate.barrier.abort()  # never leave a burst waiting for a pod that left
            if pod.deleted.is_set() and not self._stopping.is_set():
                with self.lock:
                    pod.ready = False
                if not pod.gone.is_set():
                    with contextlib.suppress(Exception):
                        self._finish_deletion(pod)

    def _sleep(self, pod: SimPod, seconds: float) -> bool:
        """Wait; True if the pod is being deleted (or the simulation stops) meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            if pod.deleted.is_set() or self._stopping.is_set():
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pod.wake.wait(remaining)
            pod.wake.clear()
            if pod.crash_requested:
                return False

    def _gate_barrier(self, gate: _Gate) -> threading.Barrier:
        with self.lock:
            if gate.barrier is None:
                gate.barrier = threading.Barrier(gate.members, timeout=5)
                self._barriers.append(gate.barrier)
            return gate.barrier

    def _backoff(self, failures: int) -> float:
        first, cap = self.restart_backoff
        return min(cap, first * 2 ** max(0, failures - 1)) + self.random.uniform(
            0, self.restart_jitter
        )

    def _run_agent(self, pod: SimPod) -> None:  # noqa: PLR0911, PLR0912 - a kubelet's life
        gate = pod.gate
        if gate is not None:  # a burst: wait for the rest of the group to arrive
            while (left := gate.closes - time.monotonic()) > 0:
                if self._sleep(pod, min(left, 0.02)):
                    return
            barrier: threading.Barrier | None = self._gate_barrier(gate)
        else:
            barrier = None
            if self._sleep(pod, self.random.uniform(*self.start_delay)):
                return
        pod.start_time = format_timestamp(self.clock())
        previous: dict[str, Any] | None = None  # lastState.terminated
        failures = 0
        while not pod.deleted.is_set() and not self._stopping.is_set():
            read = self._read_secret(pod)  # the container's env, resolved at its start
            read_at = self.clock()
            read_mono = time.monotonic()
            if read is None:
                if self._sleep(pod, 0.1):
                    return
                continue
            token, tenant, expires_at = read
            if barrier is not None:  # a burst: nobody reports a start before all have read
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()
                barrier = None
            container_id = f"sim://{uuid.uuid4().hex}"
            started_at = format_timestamp(read_at)
            running = {
                "name": CONTAINER,
                "image": IMAGE,
                "imageID": "",
                "containerID": container_id,
                "restartCount": pod.restart_count,
                "ready": False,
                "started": True,
                "state": {"running": {"startedAt": started_at}},
                "lastState": {"terminated": previous} if previous else {},
            }
            attempt = Attempt(
                pod_uid=pod.uid,
                pod_name=pod.name,
                node=pod.node,
                restart_count=pod.restart_count,
                container_id=container_id,
                started_at=read_at,
                token_fingerprint=fingerprint(normalize(token.reveal()).reveal()),
                token_expires_at=expires_at,
                read_at=read_at,
                monotonic=read_mono,
            )
            with self.lock:
                self.attempts.append(attempt)
            if pod.deleted.is_set() or not self._patch_status(pod, running, ready=False):
                return
            attempt.reported = True
            while True:
                result = agent.enroll(
                    url=self.sandbox.url,
                    tenant_id=tenant,
                    token=token,
                    workload_id=pod.uid,
                    attempts=3,
                    retry_delay=0.05,
                )
                attempt.results.append(result.result)
                if result.ok or pod.mode != "stuck" or pod.crash_requested:
                    break
                if self._sleep(pod, self.stuck_retry):  # stuck: retry with the same token
                    return
            terminated = {
                "containerID": container_id,
                "exitCode": 1,
                "startedAt": started_at,
                "finishedAt": format_timestamp(self.clock()),
                "reason": "Error",
            }
            if result.ok and not pod.crash_requested:
                failures = 0
                if not self._patch_status(pod, dict(running, ready=True), ready=True):
                    return
                with self.lock:
                    pod.enrolled = pod.ready = True
                    pod.enrolled_at = pod.enrolled_at or time.monotonic()
                while not pod.crash_requested:  # running, until deleted or crashed
                    if self._sleep(pod, 3600):
                        return
            # The container exits: enrolment refused, or a crash was requested.
            with self.lock:
                pod.ready = False
                crash, pod.crash_requested = pod.crash_requested, False
                barrier, pod.crash_barrier = pod.crash_barrier, None
            previous = terminated
            if not crash:
                failures += 1
                waiting = dict(
                    running,
                    state={"waiting": {"reason": "CrashLoopBackOff"}},
                    lastState={"terminated": terminated},
                )
                if not self._patch_status(pod, waiting, ready=False):
                    return
                if self.max_starts is not None and pod.restart_count + 1 >= self.max_starts:
                    while not self._sleep(pod, 3600):  # the kubelet gave up: deletion only
                        pod.crash_requested = False
                    return
                if self._sleep(pod, self._backoff(failures)):
                    return
            pod.restart_count += 1


def _target_node(pod: Mapping[str, Any]) -> str | None:
    """The pod's Node: ``spec.nodeName``, else the DaemonSet's node-affinity term."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    try:
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
    except (KeyError, TypeError):
        return None
    for term in terms:
        for expression in term.get("matchFields") or []:
            if expression.get("key") == "metadata.name" and expression.get("values"):
                return str(expression["values"][0])
    return None


def _api_client(k8s: Cluster) -> ApiClient:
    """An admin client with a connection pool big enough for every kubelet thread."""
    configuration = client.Configuration(
        host=k8s.url,
        api_key={"authorization": f"Bearer {k8s.admin_token}"},
        ssl_ca_cert=str(k8s.ca_file),
    )
    configuration.connection_pool_maxsize = POOL_SIZE
    return client.ApiClient(configuration)


# --- issue 9's baseline: the shared-Secret burst ---


@dataclass(frozen=True, kw_only=True)
class BurstReport:
    """How a burst of agent pods fared with one shared Secret and ``watch`` running."""

    nodes: int
    pods: int  # pods created (replacements of deleted pods included)
    starts: int  # container starts (token reads)
    first_try: int  # nodes whose first container start enrolled
    conflicts: int  # 409s the sandbox answered
    not_enrolled_after: int  # nodes still not enrolled after ``max_starts`` starts
    max_starts: int
    unenrolled: int  # nodes never enrolled before the deadline
    deletions: int  # pods the controller deleted to recover a collision
    rotations: int
    rotation_ms: float  # how long a rotation took, on average (the controller's reaction)
    seconds_to_all_enrolled: float | None  # from the DaemonSet's creation; None: never
    starts_per_node: dict[int, int]  # starts until enrolled -> how many nodes

    def as_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__}

    def describe(self) -> str:
        took = (
            f"{self.seconds_to_all_enrolled:.1f}s"
            if self.seconds_to_all_enrolled is not None
            else f"never ({self.unenrolled} left)"
        )
        return (
            f"{self.nodes} pods at once on one shared Secret: {self.first_try} enrolled at the "
            f"first start, {self.conflicts} 409s over {self.starts} starts, "
            f"{self.not_enrolled_after} not enrolled after {self.max_starts} starts, "
            f"{self.deletions} deleted by the controller, {self.rotations} rotations "
            f"({self.rotation_ms:.0f} ms each), all enrolled after {took}"
        )


def burst_shared_secret(
    k8s: Cluster,
    namespace: str,
    nodes: int = 100,
    *,
    sandbox: SandboxServer | None = None,
    max_starts: int = 8,
    timeout: float = 180.0,
    controller_settings: Mapping[str, Any] | None = None,
    start_delay: tuple[float, float] = (0.0, 0.03),
    node_prefix: str | None = None,
) -> BurstReport:
    """``nodes`` agent pods starting at once on one shared Secret, ``watch`` running.

    Creates ``nodes`` fake Nodes and, once ``watch`` leads and has put a token in the
    Secret, the agent DaemonSet: the real DaemonSet controller creates every pod at once
    (its slow-start batches: 1, 2, 4, ...), each kubelet starts its container as soon as
    the pod is bound (after ``start_delay``). Refused agents crash-loop (0.3 s doubling to
    3 s, at most ``max_starts`` starts; then only a deletion by the controller helps).
    ``watch`` runs with the simulation's fast settings (collision grace 1 s, 120 deletions
    a minute; ``controller_settings`` overrides them). Waits until every Node has had an
    enrolled pod, or ``timeout``; deletes the Nodes again. ``sandbox`` is started for the
    call when not given.
    """
    own_sandbox = sandbox is None
    if sandbox is None:
        sandbox = SandboxServer(host="127.0.0.1", port=0)
        sandbox.start()
    settings: dict[str, Any] = {
        "collision_grace": 1.0,
        "deletions_per_minute": 120,
        "deletion_burst": 6,
        "tick": 0.1,
        "max_backoff": 1.0,
        "resync_seconds": 120,
        **(controller_settings or {}),
    }
    controller = make_controller(k8s, namespace, sandbox, **settings)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, kwargs={"stop": stop}, name="burst-watch")
    prefix = node_prefix or f"burst-{uuid.uuid4().hex[:6]}-"
    names = [f"{prefix}{index:03d}" for index in range(nodes)]
    conflicts_before = sum(1 for r in sandbox.enrolments() if r.result == "conflict")
    try:
        thread.start()
        k8s.create_nodes(names)
        deadline = time.monotonic() + 30
        while not (controller.status().leader and controller.status().fingerprint):
            if time.monotonic() > deadline:
                raise AssertionError("watch did not lead and fill the Secret within 30s")
            time.sleep(0.05)
        sim = PodSim(
            k8s=k8s,
            namespace=namespace,
            sandbox=sandbox,
            clock=sandbox.now,
            max_starts=max_starts,
            start_delay=start_delay,
        )
        sim.nodes.update(names)
        began = time.monotonic()  # the DaemonSet is created in sim.start()
        with sim:
            while time.monotonic() - began < timeout:
                if len(_first_enrolments(sim)) == nodes:
                    break
                if sim.errors:
                    raise AssertionError(f"the pod simulator failed: {sim.errors[:3]}")
                time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=30)
        with contextlib.suppress(Exception):
            k8s.delete_nodes(names)
        if own_sandbox:
            sandbox.stop()
    enrolled = _first_enrolments(sim)
    until = _starts_until_enrolled(sim.attempts)
    status = controller.status()
    return BurstReport(
        nodes=nodes,
        pods=len(sim.pods),
        starts=len(sim.attempts),
        first_try=sum(1 for count in until.values() if count == 1),
        conflicts=sum(1 for r in sandbox.enrolments() if r.result == "conflict") - conflicts_before,
        not_enrolled_after=sum(1 for n in names if until.get(n, max_starts + 1) > max_starts),
        max_starts=max_starts,
        unenrolled=nodes - len(enrolled),
        deletions=int(controller.metrics.recoveries.value(action="delete")),
        rotations=status.rotations,
        rotation_ms=1000 * controller.metrics.rotation_duration.sum / max(1, status.rotations),
        seconds_to_all_enrolled=(
            max(enrolled.values()) - began if len(enrolled) == nodes else None
        ),
        starts_per_node=dict(sorted(collections.Counter(until.values()).items())),
    )


def _first_enrolments(sim: PodSim) -> dict[str, float]:
    """Node -> when a pod on it first enrolled (monotonic)."""
    first: dict[str, float] = {}
    with sim.lock:
        for pod in sim.pods.values():
            if pod.enrolled_at is not None:
                first[pod.node] = min(first.get(pod.node, pod.enrolled_at), pod.enrolled_at)
    return first


def _starts_until_enrolled(attempts: Iterable[Attempt]) -> dict[str, int]:
    """Node -> how many container starts (over all its pods) it took to enrol."""
    per_node: dict[str, list[Attempt]] = collections.defaultdict(list)
    for attempt in sorted(attempts, key=lambda a: a.monotonic):
        per_node[attempt.node].append(attempt)
    until = {}
    for node, starts in per_node.items():
        for index, attempt in enumerate(starts, 1):
            if attempt.enrolled:
                until[node] = index
                break
    return until
