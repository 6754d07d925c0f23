"""A pod simulator: the DaemonSet controller and the kubelets, against KubeSim.

:class:`PodSim` drives the Kubernetes emulator (tests/kubesim.py, through its real HTTP
API) the way a cluster would run the LinuxGuard agent DaemonSet:

* **the DaemonSet controller**: one pod per node for the DaemonSet ``linuxguard-agent``
  (labels ``app=linuxguard-agent``, an ownerReference, ``spec.nodeName``); a deleted pod
  is recreated on its node; nodes come (:meth:`PodSim.add_nodes`) and go
  (:meth:`PodSim.remove_node`); a template change (``kubectl rollout restart``, or
  :meth:`PodSim.rollout`) replaces the pods under ``RollingUpdate`` with
  ``maxUnavailable``; the DaemonSet's status (desired/updated/ready/available,
  observedGeneration) follows, so ``wait_for_rollout`` works against it;
* **the kubelet** of each node: when a pod's agent container starts, the simulated agent
  reads the Secret's token *at that instant* (a GET through the API, as the kubelet
  resolves ``secretKeyRef``), the pod status says the container is running
  (``startedAt``, a fresh ``containerID``, ``restartCount``), and the agent enrols against
  the LinuxGuard sandbox (``rotator.agent.enroll``, workload id = the pod UID). Enrolled:
  the container and the pod turn Ready. Refused: in ``restart`` mode the container
  exits and restarts after a short backoff (``CrashLoopBackOff``), reading the Secret
  again; in ``stuck`` mode the agent keeps retrying with the token it has (the vendor
  page allows both) and never turns Ready, until its pod is deleted.

**Bursts**: pods created in one reconcile of a burst rollout, a burst of node additions
or a burst of container crashes read the Secret together (a barrier after the read), so
they start under the same token: collisions happen for real.

Deletions by anyone (the lg-rotate controller, ``roll``) are seen at once through a
KubeSim write hook. Everything the agents did is in :attr:`PodSim.attempts`; tokens are
only ever held as fingerprints.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import kmock
from kubernetes import client

from fixtures.kube import KubeCluster
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

log = logging.getLogger("lg_rotate.tests.podsim")

AgentMode = Literal["restart", "stuck"]
TENANT = "acme"
SELECTOR = "app=linuxguard-agent"
APP_LABEL = {"app": "linuxguard-agent"}
CONTAINER = "agent"
HASH_LABEL = "controller-revision-hash"


def trim_kubesim_history(monkeypatch: Any) -> None:
    """Keep kmock's request history short while a test runs.

    kmock matches every request against its whole request history (KubeSim trims it to
    100-400 entries), which costs tens of milliseconds per request at 400: far too slow
    for thousands of requests. Nothing in these tests reads that history.
    """
    import kubesim

    monkeypatch.setattr(kubesim, "_HISTORY_HIGH", 24)
    monkeypatch.setattr(kubesim, "_HISTORY_LOW", 8)


def make_rotator(
    k8s: KubeCluster,
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
            retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=2),
            clock=clock,
        ),
        provider=MemoryProvider(store=MemoryStore()),
        tenant=TENANT,
        target=SecretTarget(api_client=api, namespace=namespace),
        lock=LeaseLock(api_client=api, namespace=namespace, wait=10, poll_interval=0.02),
        clock=clock,
    )


def make_controller(
    k8s: KubeCluster, namespace: str, sandbox: SandboxServer, **overrides: Any
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

    @property
    def enrolled(self) -> bool:
        return "enrolled" in self.results


@dataclass(eq=False, kw_only=True)
class SimPod:
    name: str
    uid: str
    node: str
    template_hash: str
    mode: AgentMode
    created: float
    barrier: threading.Barrier | None = None
    deleted: threading.Event = field(default_factory=threading.Event)
    wake: threading.Event = field(default_factory=threading.Event)
    crash_barrier: threading.Barrier | None = None
    crash_requested: bool = False
    ready: bool = False
    enrolled: bool = False
    restart_count: int = 0
    deleted_by_sim: bool = False
    thread: threading.Thread | None = None


class PodSim:
    """See the module docstring. Use as a context manager (``start``/``stop``)."""

    def __init__(
        self,
        *,
        k8s: KubeCluster,
        namespace: str,
        sandbox: SandboxServer,
        secret_name: str = "linuxguard-enroll",  # noqa: S107 - a name
        name: str = "linuxguard-agent",
        clock: Callable[[], datetime] = utcnow,
        max_unavailable: int = 1,
        restart_backoff: tuple[float, float] = (0.1, 0.35),
        stuck_retry: float = 0.4,
        start_delay: tuple[float, float] = (0.0, 0.03),
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
        self.stuck_retry = stuck_retry
        self.start_delay = start_delay
        self.random = random.Random(seed)
        self.api = k8s.api_client()
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.lock = threading.RLock()
        self.nodes: set[str] = set()
        self.modes: dict[str, AgentMode] = {}  # node -> agent mode (default: restart)
        self.pods: dict[str, SimPod] = {}  # uid -> pod (deleted ones stay, flagged)
        self.attempts: list[Attempt] = []
        self.errors: list[str] = []
        self.ds_uid = ""
        self.template_hash = ""
        self.burst_creates = False
        self.recreate = True  # False: deleted pods are not replaced (a stuck DaemonSet)
        self._poke = threading.Event()
        self._stopping = threading.Event()
        self._refresh_template = True
        self._reconciler: threading.Thread | None = None
        self._remove_hook: Callable[[], None] | None = None
        self._last_status: dict[str, Any] | None = None
        self.generation = 1

    # --- lifecycle ---

    def __enter__(self) -> PodSim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PodSim:
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
                        "containers": [
                            {
                                "name": CONTAINER,
                                "image": "linuxguard/agent:sim",
                                "env": [
                                    {
                                        "name": agent.ENROLL_TOKEN_ENV,
                                        "valueFrom": {
                                            "secretKeyRef": {
                                                "name": self.secret_name,
                                                "key": "token",
                                            }
                                        },
                                    },
                                    {
                                        "name": agent.TENANT_ENV,
                                        "valueFrom": {
                                            "secretKeyRef": {
                                                "name": self.secret_name,
                                                "key": "tenant-id",
                                            }
                                        },
                                    },
                                ],
                            }
                        ]
                    },
                },
            },
        }
        created = self.apps.create_namespaced_daemon_set(
            self.namespace, body, _preload_content=False
        )
        self.ds_uid = json.loads(created.data)["metadata"]["uid"]
        self._remove_hook = self.k8s.before_write(self._on_write)
        self._reconciler = threading.Thread(target=self._reconcile_loop, name="podsim-ds")
        self._reconciler.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._poke.set()
        if self._remove_hook is not None:
            self._remove_hook()
        if self._reconciler is not None:
            self._reconciler.join(timeout=10)
        with self.lock:
            pods = list(self.pods.values())
        for pod in pods:
            pod.wake.set()
        for pod in pods:
            if pod.thread is not None:
                pod.thread.join(timeout=10)

    # --- scenario controls ---

    def add_nodes(self, names: Iterable[str], *, burst: bool = False) -> None:
        """New nodes; with ``burst`` their agents start in the same instant."""
        with self.lock:
            self.burst_creates = burst
            self.nodes.update(names)
        self._poke.set()

    def remove_node(self, node: str) -> None:
        with self.lock:
            self.nodes.discard(node)
        self._poke.set()

    def set_recreate(self, value: bool) -> None:
        """False: the DaemonSet controller stops replacing deleted pods (True resumes)."""
        with self.lock:
            self.recreate = value
        self._poke.set()

    def set_mode(self, node: str, mode: AgentMode) -> None:
        """How the agent on ``node`` reacts to a refused enrolment (pods created from now)."""
        with self.lock:
            self.modes[node] = mode

    def rollout(self, *, max_unavailable: int | None = None, burst: bool = False) -> None:
        """``kubectl rollout restart``: a template change; the pods get replaced."""
        with self.lock:
            if max_unavailable is not None:
                self.max_unavailable = max_unavailable
            self.burst_creates = burst
            self._refresh_template = True
        restart_workload(
            api_client=self.api,
            namespace=self.namespace,
            kind="daemonset",
            name=self.name,
            at=utcnow(),
        )
        with self.lock:
            self._refresh_template = True
        self._poke.set()

    def crash(self, nodes: Iterable[str], *, burst: bool = False) -> int:
        """The agent containers on ``nodes`` exit and restart (re-reading the Secret)."""
        with self.lock:
            targets = [pod for pod in self.live_pods().values() if pod.node in set(nodes)]
        barrier = threading.Barrier(len(targets), timeout=5) if burst and targets else None
        for pod in targets:
            pod.crash_barrier = barrier
            pod.crash_requested = True
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
        """Every node has one current pod, enrolled and Ready; no other pod is left."""
        with self.lock:
            live = [pod for pod in self.pods.values() if not pod.deleted.is_set()]
            by_node = {pod.node: pod for pod in live}
            return (
                len(live) == len(self.nodes)
                and set(by_node) == set(self.nodes)
                and all(
                    pod.ready and pod.template_hash == self.template_hash
                    for pod in by_node.values()
                )
                and not self.errors
            )

    def wait(self, condition: Callable[[], bool], *, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.errors:
                raise AssertionError(f"the pod simulator failed: {self.errors[:3]}")
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")

    def starts(self) -> int:
        with self.lock:
            return len(self.attempts)

    def pods_created(self) -> int:
        with self.lock:
            return len(self.pods)

    # --- the KubeSim write hook: deletions by anyone ---

    def _on_write(self, request: Any) -> None:
        resource = request.resource
        if (
            resource is None
            or resource.plural != "pods"
            or request.namespace != self.namespace
            or request.action != kmock.action.DELETE
            or not request.name
        ):
            return
        with self.lock:
            for pod in self.pods.values():
                if pod.name == request.name and not pod.deleted.is_set():
                    pod.deleted.set()
                    pod.wake.set()
        self._poke.set()

    # --- the DaemonSet controller ---

    def _reconcile_loop(self) -> None:
        last_refresh = 0.0
        while not self._stopping.is_set():
            self._poke.wait(0.2)
            self._poke.clear()
            if self._stopping.is_set():
                return
            try:
                if self._refresh_template or time.monotonic() - last_refresh > 1.0:
                    self._read_template()
                    last_refresh = time.monotonic()
                self._reconcile()
                self._write_status()
            except Exception as exc:  # a broken simulator must fail the test, not hang it
                log.exception("pod simulator reconcile failed")
                self.errors.append(f"reconcile: {exc!r}")

    def _read_template(self) -> None:
        answer = self.apps.read_namespaced_daemon_set(
            self.name, self.namespace, _preload_content=False
        )
        ds = json.loads(answer.data)
        template = json.dumps(ds["spec"]["template"], sort_keys=True)
        with self.lock:
            self._refresh_template = False
            self.template_hash = hashlib.sha256(template.encode()).hexdigest()[:10]
            self.generation = int(ds["metadata"].get("generation") or 1)

    def _reconcile(self) -> None:
        with self.lock:
            live = self.live_pods()
            create = [node for node in sorted(self.nodes) if node not in live]
            if not self.recreate:
                create = []
            delete = [pod for node, pod in live.items() if node not in self.nodes]
            old = sorted(
                (
                    p
                    for n, p in live.items()
                    if n in self.nodes and p.template_hash != self.template_hash
                ),
                key=lambda p: p.node,
            )
            if old:
                unavailable = sum(
                    1 for node in self.nodes if node not in live or not live[node].ready
                )
                delete += old[: max(0, self.max_unavailable - unavailable)]
            burst = self.burst_creates and len(create) > 1
        barrier = threading.Barrier(len(create), timeout=5) if burst else None
        for node in create:
            self._create_pod(node, barrier)
        for pod in delete:
            pod.deleted_by_sim = True
            self._delete_pod(pod)

    def _create_pod(self, node: str, barrier: threading.Barrier | None) -> None:
        name = f"{self.name}-{uuid.uuid4().hex[:5]}"
        with self.lock:
            template_hash = self.template_hash
            mode = self.modes.get(node, "restart")
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {**APP_LABEL, HASH_LABEL: template_hash},
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "DaemonSet",
                        "name": self.name,
                        "uid": self.ds_uid,
                        "controller": True,
                    }
                ],
            },
            "spec": {"nodeName": node, "containers": [{"name": CONTAINER, "image": "sim"}]},
            "status": {"phase": "Pending"},
        }
        answer = self.core.create_namespaced_pod(self.namespace, body, _preload_content=False)
        uid = json.loads(answer.data)["metadata"]["uid"]
        pod = SimPod(
            name=name,
            uid=uid,
            node=node,
            template_hash=template_hash,
            mode=mode,
            created=time.monotonic(),
            barrier=barrier,
        )
        with self.lock:
            self.pods[uid] = pod
        pod.thread = threading.Thread(target=self._kubelet, args=(pod,), name=f"kubelet-{name}")
        pod.thread.daemon = True
        pod.thread.start()

    def _delete_pod(self, pod: SimPod) -> None:
        try:
            self.core.delete_namespaced_pod(pod.name, self.namespace, _preload_content=False)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
        pod.deleted.set()
        pod.wake.set()

    def _write_status(self) -> None:
        with self.lock:
            live = self.live_pods()
            scheduled = [pod for node, pod in live.items() if node in self.nodes]
            status = {
                "desiredNumberScheduled": len(self.nodes),
                "currentNumberScheduled": len(scheduled),
                "updatedNumberScheduled": sum(
                    1 for p in scheduled if p.template_hash == self.template_hash
                ),
                "numberReady": sum(1 for p in scheduled if p.ready),
                "numberAvailable": sum(1 for p in scheduled if p.ready),
                "numberUnavailable": len(self.nodes) - sum(1 for p in scheduled if p.ready),
                "observedGeneration": self.generation,
            }
            if status == self._last_status:
                return
            self._last_status = status
        self.apps.patch_namespaced_daemon_set(
            self.name, self.namespace, {"status": status}, _preload_content=False
        )

    # --- the kubelet and the agent ---

    def _read_secret(self) -> tuple[Secret, str, datetime | None] | None:
        try:
            answer = self.core.read_namespaced_secret(
                self.secret_name, self.namespace, _preload_content=False
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

    def _patch_status(self, pod: SimPod, status: dict[str, Any]) -> bool:
        if pod.deleted.is_set():
            return False
        try:
            self.core.patch_namespaced_pod(
                pod.name, self.namespace, {"status": status}, _preload_content=False
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _kubelet(self, pod: SimPod) -> None:
        try:
            self._run_agent(pod)
        except Exception as exc:
            if not pod.deleted.is_set() and not self._stopping.is_set():
                log.exception("kubelet for %s failed", pod.name)
                self.errors.append(f"kubelet {pod.name}: {exc!r}")

    def _sleep(self, pod: SimPod, seconds: float) -> bool:
        """Wait; True if the pod went away (or the simulation stops) meanwhile."""
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

    def _run_agent(self, pod: SimPod) -> None:  # noqa: PLR0911, PLR0912 - a kubelet's life
        if self._sleep(pod, self.random.uniform(*self.start_delay)):
            return
        barrier, pod.barrier = pod.barrier, None
        previous: dict[str, Any] | None = None  # lastState.terminated
        while not pod.deleted.is_set() and not self._stopping.is_set():
            read = self._read_secret()
            read_at = self.clock()  # the container starts with what it just read
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
            )
            with self.lock:
                self.attempts.append(attempt)
            not_ready = [{"type": "Ready", "status": "False"}]
            if not self._patch_status(
                pod,
                {"phase": "Running", "containerStatuses": [running], "conditions": not_ready},
            ):
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
                ready_status = dict(running, ready=True)
                if not self._patch_status(
                    pod,
                    {
                        "containerStatuses": [ready_status],
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                ):
                    return
                with self.lock:
                    pod.enrolled = pod.ready = True
                self._poke.set()
                while not pod.crash_requested:  # running, until deleted or crashed
                    if self._sleep(pod, 3600):
                        return
            # The container exits: enrolment refused, or a crash was requested.
            with self.lock:
                pod.ready = False
                crash, pod.crash_requested = pod.crash_requested, False
                barrier, pod.crash_barrier = pod.crash_barrier, None
            self._poke.set()
            previous = terminated
            if not crash:
                waiting = dict(
                    running,
                    containerID=container_id,
                    state={"waiting": {"reason": "CrashLoopBackOff"}},
                    lastState={"terminated": terminated},
                    ready=False,
                )
                if not self._patch_status(
                    pod, {"containerStatuses": [waiting], "conditions": not_ready}
                ):
                    return
                if self._sleep(pod, self.random.uniform(*self.restart_backoff)):
                    return
            pod.restart_count += 1
