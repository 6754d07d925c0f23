"""The scheduler and the kubelets of fake Nodes, for the real control plane (fixture ``k8s``).

tests/fixtures/cluster.py runs a real kube-apiserver and kube-controller-manager, but no
scheduler and no kubelet: the DaemonSet controller creates one pod per Node, and the pods
stay Pending, unbound, for ever. :class:`FakeKubelet` plays the missing parts for the pods of
one namespace that match a label selector:

* **the scheduler**: binds an unbound pod (``pods/binding``) to the Node its DaemonSet
  targets (the ``nodeAffinity`` term on ``metadata.name`` the DaemonSet controller writes);
* **the kubelet** of each Node: starts a bound pod's container by resolving its env *at that
  instant*, ``valueFrom.secretKeyRef`` through a GET of the Secret (the token the container
  gets is the one the Secret held then) and ``fieldRef`` (``spec.nodeName``,
  ``metadata.uid``); reports the start through the **status subresource** (``phase:
  Running``, ``startTime``, ``containerStatuses`` with a fresh ``containerID``,
  ``startedAt``, ``restartCount``, ``lastState``); with a LinuxGuard sandbox, enrols the
  agent (workload id from the node name and pod UID, as the real agent derives it) and turns
  the container and the pod Ready once enrolled. A refused agent exits (``terminated``, then
  ``waiting: CrashLoopBackOff``) and restarts after ``restart_backoff`` seconds, reading the
  Secret again. Without a sandbox the container is Ready as soon as it started;
* **graceful deletion**: a pod deleted by anyone (``roll``, the controller, the DaemonSet
  controller during a rolling update) only gets a ``deletionTimestamp``; the kubelet stops it
  and removes it (grace period 0, UID precondition), and only then does the DaemonSet
  controller create its replacement.

:meth:`FakeKubelet.hold` takes one Node's kubelet down: its pods are neither bound, started
nor removed, so a deleted pod stays Terminating and the DaemonSet makes no replacement until
:meth:`FakeKubelet.release`.

Everything the agents did is in :attr:`FakeKubelet.attempts`; tokens are only ever kept as
fingerprints. The kubelet polls the pod list (``poll`` seconds), which is how a test waits
with deadlines, never with sleeps.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes import client

from rotator import agent
from rotator.sandbox import SandboxServer
from rotator.tokens import Secret, fingerprint, format_timestamp, normalize, utcnow

log = logging.getLogger("lg_rotate.tests.fakekubelet")

MERGE_PATCH = "application/merge-patch+json"
AGENT_SELECTOR = "app=linuxguard-agent"


@dataclass(kw_only=True)
class Attempt:
    """One start of an agent container and how its enrolment went."""

    pod_uid: str
    pod_name: str
    node: str
    restart_count: int
    container_id: str
    started_at: datetime  # the kubelet's clock, when it resolved the env
    token_fingerprint: str | None  # full SHA-256 of the canonical token read; None: no token
    results: list[str] = field(default_factory=list)  # agent.EnrollResult.result, per try

    @property
    def enrolled(self) -> bool:
        return "enrolled" in self.results


@dataclass(eq=False, kw_only=True)
class AgentPod:
    """A pod as its kubelet knows it (from the moment it was bound to a live Node)."""

    uid: str
    name: str
    node: str
    created: str  # metadata.creationTimestamp
    restart_count: int = 0
    started: bool = False  # the container started at least once
    ready: bool = False
    enrolled: bool = False
    backoff_until: float | None = None  # monotonic; the container waits in CrashLoopBackOff
    previous: dict[str, Any] | None = None  # lastState.terminated
    start_time: str | None = None
    terminating: bool = False
    gone: bool = False


class FakeKubelet:
    """See the module docstring. Use as a context manager (``start``/``stop``)."""

    def __init__(
        self,
        k8s: Any,  # tests/fixtures/cluster.py Cluster
        namespace: str,
        *,
        sandbox: SandboxServer | None = None,
        selector: str = AGENT_SELECTOR,
        clock: Callable[[], datetime] | None = None,
        restart_backoff: float = 1.0,
        poll: float = 0.02,
    ) -> None:
        self.namespace = namespace
        self.sandbox = sandbox
        self.selector = selector
        self.clock = clock or (sandbox.now if sandbox is not None else utcnow)
        self.restart_backoff = restart_backoff
        self.poll = poll
        self.core = client.CoreV1Api(k8s.api_client())
        self.lock = threading.Lock()
        self.pods: dict[str, AgentPod] = {}  # uid -> pod, every pod ever bound
        self.attempts: list[Attempt] = []
        self.errors: list[str] = []
        self.bindings = 0
        self.removals = 0
        self._held: set[str] = set()
        self._stopping = threading.Event()
        self._synced = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fake-kubelet", daemon=True)

    # --- lifecycle ---

    def __enter__(self) -> FakeKubelet:
        return self.start()

    def __exit__(self, kind: object, *rest: object) -> None:
        self.stop()
        if kind is None:
            assert not self.errors, f"the fake kubelet failed: {self.errors}"

    def start(self) -> FakeKubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    # --- controls and views ---

    def hold(self, nodes: Iterable[str]) -> None:
        """Take these Nodes' kubelets down: nothing is bound, started or removed there."""
        with self.lock:
            self._held.update(nodes)

    def release(self, nodes: Iterable[str]) -> None:
        with self.lock:
            self._held.difference_update(nodes)

    def live_pods(self) -> dict[str, AgentPod]:
        """node -> its pod that exists and is not terminating (the newest one)."""
        with self.lock:
            live: dict[str, AgentPod] = {}
            for pod in self.pods.values():
                if pod.gone or pod.terminating:
                    continue
                if pod.node not in live or pod.created >= live[pod.node].created:
                    live[pod.node] = pod
            return live

    def pods_on(self, node: str) -> list[AgentPod]:
        with self.lock:
            return [pod for pod in self.pods.values() if pod.node == node]

    def settled(self, nodes: Iterable[str]) -> bool:
        """Every one of ``nodes`` runs one Ready pod (and no pod of theirs is terminating)."""
        live = self.live_pods()
        with self.lock:
            busy = {pod.node for pod in self.pods.values() if pod.terminating and not pod.gone}
        return all(node in live and live[node].ready and node not in busy for node in nodes)

    def attempts_of(self, uid: str) -> list[Attempt]:
        with self.lock:
            return [a for a in self.attempts if a.pod_uid == uid]

    def wait(self, condition: Callable[[], object], *, timeout: float, what: str) -> None:
        """Poll ``condition`` with a deadline; fail early if the kubelet itself failed."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert not self.errors, f"the fake kubelet failed: {self.errors}"
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(self.poll)

    # --- the loop ---

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._sync()
            except Exception as exc:  # a broken kubelet must fail the test, not hang it
                log.exception("fake kubelet sync failed")
                self.errors.append(repr(exc))
                return
            self._stopping.wait(self.poll)

    def _sync(self) -> None:
        answer = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _preload_content=False
        )
        items = json.loads(answer.data)["items"]
        seen = set()
        with self.lock:
            held = set(self._held)
        for pod in items:
            metadata, spec = pod["metadata"], pod["spec"]
            uid, name, node = metadata["uid"], metadata["name"], spec.get("nodeName")
            seen.add(uid)
            record = self.pods.get(uid)
            if metadata.get("deletionTimestamp"):
                if record is not None:
                    with self.lock:
                        record.terminating, record.ready = True, False
                if node and node not in held:
                    self._remove(name, uid)
                continue
            if not node:
                target = _target_node(pod)
                if target and target not in held:
                    self._bind(name, target)
                continue
            if node in held:
                continue
            if record is None:
                record = AgentPod(
                    uid=uid, name=name, node=node, created=metadata["creationTimestamp"]
                )
                with self.lock:
                    self.pods[uid] = record
            due = record.backoff_until is None or time.monotonic() >= record.backoff_until
            if (not record.started or record.backoff_until is not None) and due:
                self._run_container(record, pod)
        with self.lock:
            for uid, record in self.pods.items():
                if uid not in seen:
                    record.gone, record.ready = True, False
        self._synced.set()

    # --- the scheduler ---

    def _bind(self, name: str, node: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            self.core.create_namespaced_pod_binding(
                name, self.namespace, body, _preload_content=False
            )
        except client.ApiException as exc:
            if exc.status not in (404, 409):  # gone, or bound meanwhile
                raise
            return
        self.bindings += 1

    # --- the kubelet ---

    def _remove(self, name: str, uid: str) -> None:
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        try:
            self.core.delete_namespaced_pod(name, self.namespace, body=body, _preload_content=False)
        except client.ApiException as exc:
            if exc.status not in (404, 409):  # gone already, or another pod by that name
                raise
            return
        self.removals += 1

    def _resolve_env(self, pod: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet builds it at start. KeyError: a Secret or key
        is missing (CreateContainerConfigError: nothing started, retried next sync)."""
        env: dict[str, str] = {}
        secrets: dict[str, dict[str, str]] = {}
        for item in container.get("env") or []:
            source = item.get("valueFrom") or {}
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                if ref["name"] not in secrets:
                    secrets[ref["name"]] = self._read_secret(ref["name"])
                env[item["name"]] = secrets[ref["name"]][ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                section, key = path.split(".", 1)
                env[item["name"]] = str(pod[section][key])
        return env

    def _read_secret(self, name: str) -> dict[str, str]:
        try:
            answer = self.core.read_namespaced_secret(name, self.namespace, _preload_content=False)
        except client.ApiException as exc:
            if exc.status == 404:
                raise KeyError(name) from None
            raise
        data = json.loads(answer.data).get("data") or {}
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def _patch_status(self, record: AgentPod, status: dict[str, Any]) -> bool:
        try:
            self.core.patch_namespaced_pod_status(
                record.name,
                self.namespace,
                {"status": status},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        except client.ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def _pod_status(
        self, record: AgentPod, container: dict[str, Any], *, ready: bool
    ) -> dict[str, Any]:
        now = format_timestamp(utcnow())
        truth = "True" if ready else "False"
        return {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "startTime": record.start_time,
            "conditions": [
                {"type": kind, "status": status, "lastTransitionTime": now}
                for kind, status in (
                    ("PodScheduled", "True"),
                    ("Initialized", "True"),
                    ("ContainersReady", truth),
                    ("Ready", truth),
                )
            ],
            "containerStatuses": [container],
        }

    def _run_container(self, record: AgentPod, pod: Mapping[str, Any]) -> None:
        spec_container = pod["spec"]["containers"][0]
        try:
            env = self._resolve_env(pod, spec_container)
        except KeyError:
            return  # CreateContainerConfigError: the kubelet retries
        started_at = self.clock()
        restart_count = record.restart_count + (1 if record.started else 0)
        container_id = f"fake://{uuid.uuid4().hex}"
        token = env.get(agent.ENROLL_TOKEN_ENV)
        attempt = Attempt(
            pod_uid=record.uid,
            pod_name=record.name,
            node=record.node,
            restart_count=restart_count,
            container_id=container_id,
            started_at=started_at,
            token_fingerprint=fingerprint(normalize(token).reveal()) if token else None,
        )
        with self.lock:
            self.attempts.append(attempt)
            record.started, record.restart_count, record.backoff_until = True, restart_count, None
            record.start_time = record.start_time or format_timestamp(started_at)
        running = {
            "name": spec_container["name"],
            "image": spec_container.get("image", ""),
            "imageID": "",
            "containerID": container_id,
            "restartCount": restart_count,
            "started": True,
            "ready": False,
            "state": {"running": {"startedAt": format_timestamp(started_at)}},
            "lastState": {"terminated": record.previous} if record.previous else {},
        }
        if not self._patch_status(record, self._pod_status(record, running, ready=False)):
            return
        ok = True
        if self.sandbox is not None:
            result = agent.enroll(
                url=self.sandbox.url,
                tenant_id=env.get(agent.TENANT_ENV, ""),
                token=Secret(token or ""),
                workload_id=agent.workload_id_from(
                    node_name=env.get(agent.NODE_NAME_ENV, record.node),
                    pod_uid=env.get(agent.POD_UID_ENV, record.uid),
                ),
                attempts=3,
                retry_delay=0.05,
            )
            attempt.results.append(result.result)
            ok = result.ok
        if ok:
            with self.lock:  # before the API says so: whoever sees Ready there finds it here
                record.ready, record.enrolled = True, self.sandbox is not None
            self._patch_status(
                record, self._pod_status(record, dict(running, ready=True), ready=True)
            )
            return
        # Refused: the agent exits, the kubelet backs off, then restarts the container.
        terminated = {
            "containerID": container_id,
            "exitCode": 1,
            "reason": "Error",
            "startedAt": format_timestamp(started_at),
            "finishedAt": format_timestamp(self.clock()),
        }
        waiting = dict(
            running,
            started=False,
            state={"waiting": {"reason": "CrashLoopBackOff"}},
            lastState={"terminated": terminated},
        )
        with self.lock:
            record.previous = terminated
            record.backoff_until = time.monotonic() + self.restart_backoff
        self._patch_status(record, self._pod_status(record, waiting, ready=False))


def _target_node(pod: Mapping[str, Any]) -> str | None:
    """The Node a DaemonSet pod is meant for (its ``metadata.name`` node-affinity term)."""
    affinity = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    for term in affinity.get("nodeSelectorTerms") or []:
        for match in term.get("matchFields") or []:
            if match.get("key") == "metadata.name" and match.get("values"):
                return str(match["values"][0])
    return None
