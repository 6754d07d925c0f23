"""``lg-rotate roll daemonset/NAME``: an orchestrated rollout, a fresh token for every pod.

``kubectl rollout restart`` replaces the pods of a DaemonSet as fast as its update
strategy allows, and every replacement reads the Secret when it starts: without the
controller (``lg-rotate watch``) they would all read the same single-use token.
:func:`roll` instead goes pod by pod (node by node):

1. rotate (mint, store, deliver: the Secret now holds a token nobody has read);
2. delete that one pod (with its UID as a precondition); the DaemonSet controller
   recreates it on the same node, and the new container reads the fresh token;
3. wait until the replacement is Ready (``timeout_per_pod``); if its container exits
   meanwhile (it read a token someone else consumed), rotate again so its restart gets
   a fresh one;
4. record the node as done and go on.

A last rotation leaves the Secret with a token no pod has read.

**Resuming.** Progress is recorded on the DaemonSet itself, in the annotation
``linuxguard.io/roll-state`` (JSON: the roll ID, when it started, the DaemonSet's
``metadata.generation``, the nodes done, the pod being replaced, whether it completed;
never a token). A rerun of the same command after an interruption (Ctrl-C, a failed
pod, a lost connection) continues that roll: nodes already done are skipped, the pod
that was being replaced is only waited for if its replacement exists, and any pod
created after the roll started is skipped too (it already read a token of its own).
A rerun after the DaemonSet's template changed (another generation), after the roll
completed, or with ``restart=True`` starts a new roll.

A DaemonSet with no scheduled pods is an error (NoPodsToRollError, exit 6), raised before
anything is minted or recorded: "0 pods rolled" would hide a wrong name, namespace or
nodeSelector.

RBAC: ``get`` and ``patch`` on ``daemonsets.apps``, ``list`` and ``delete`` on ``pods``,
plus what the rotation needs. Only DaemonSets are supported: a Deployment's or
StatefulSet's replacement pods are not tied to a node (use ``rotate --restart`` with the
controller running).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    ConfigError,
    ExitCode,
    KubernetesError,
    LgRotateError,
    LockError,
    RolloutTimeoutError,
)
from rotator.kube.pods import PodApi, container_instances, pod_is_ready
from rotator.kube.workloads import parse_workload_ref
from rotator.rotation import RotationReport, Rotator
from rotator.tokens import format_timestamp, parse_timestamp, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "ROLL_STATE_ANNOTATION",
    "NoPodsToRollError",
    "RollInterruptedError",
    "RollProgress",
    "RollReport",
    "RolledPod",
    "roll",
]

log = logging.getLogger("lg_rotate.roll")

ROLL_STATE_ANNOTATION = "linuxguard.io/roll-state"
DEFAULT_TIMEOUT_PER_POD = 300.0


class RollInterruptedError(LgRotateError):
    """The roll was stopped before it finished; rerunning it resumes."""

    exit_code = ExitCode.INTERRUPTED


class NoPodsToRollError(KubernetesError):
    """The DaemonSet has no scheduled pods: a roll would do nothing (exit 6)."""


@dataclass(frozen=True, kw_only=True)
class RollProgress:
    """Where a roll stands, for a progress bar or a JSON line.

    ``phase``: ``started``, ``skipped`` (a node already done), ``rotated``, ``deleted``,
    ``waiting`` (the replacement is not Ready yet), ``ready``, ``finished``.
    """

    roll_id: str
    workload: str
    namespace: str
    phase: str
    total: int
    done: int
    node: str | None
    pod: str | None
    new_pod: str | None
    resumed: bool
    elapsed_seconds: float

    def describe(self) -> str:
        where = f" {self.node}" if self.node else ""
        pod = f" ({self.new_pod or self.pod})" if (self.new_pod or self.pod) else ""
        return (
            f"{self.workload}: {self.done}/{self.total} pods rolled, {self.phase}{where}{pod}, "
            f"{self.elapsed_seconds:.0f}s"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "event": "roll",
            "rollId": self.roll_id,
            "workload": self.workload,
            "namespace": self.namespace,
            "phase": self.phase,
            "total": self.total,
            "done": self.done,
            "node": self.node,
            "pod": self.pod,
            "newPod": self.new_pod,
            "resumed": self.resumed,
            "elapsedSeconds": round(self.elapsed_seconds, 1),
        }


@dataclass(frozen=True, kw_only=True)
class RolledPod:
    node: str
    old_pod: str
    new_pod: str
    fingerprint: str | None  # the token delivered for it (first 12 hex digits)
    rotations: int  # 1, or more when the replacement had to restart
    seconds: float


@dataclass(frozen=True, kw_only=True)
class RollReport:
    roll_id: str
    workload: str
    namespace: str
    resumed: bool
    rolled: tuple[RolledPod, ...]
    skipped: tuple[str, ...]  # nodes done before (a resumed roll) or already fresh
    final_fingerprint: str | None
    duration_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "rollId": self.roll_id,
            "workload": self.workload,
            "namespace": self.namespace,
            "resumed": self.resumed,
            "rolled": [
                {
                    "node": pod.node,
                    "oldPod": pod.old_pod,
                    "newPod": pod.new_pod,
                    "fingerprint": pod.fingerprint,
                    "rotations": pod.rotations,
                    "seconds": round(pod.seconds, 1),
                }
                for pod in self.rolled
            ],
            "skipped": list(self.skipped),
            "finalFingerprint": self.final_fingerprint,
            "durationSeconds": round(self.duration_seconds, 1),
        }


@dataclass(kw_only=True)
class _RollState:
    roll_id: str
    started_at: datetime
    generation: int | None
    done: list[str] = field(default_factory=list)
    inflight: dict[str, str] | None = None  # {"node", "pod", "uid"}: being deleted/replaced
    completed: bool = False

    def dump(self) -> str:
        return json.dumps(
            {
                "id": self.roll_id,
                "startedAt": format_timestamp(self.started_at),
                "generation": self.generation,
                "done": self.done,
                "inflight": self.inflight,
                "completed": self.completed,
            },
            separators=(",", ":"),
        )

    @classmethod
    def load(cls, text: str | None) -> _RollState | None:
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(
                roll_id=str(data["id"]),
                started_at=parse_timestamp(str(data["startedAt"])),
                generation=int(data["generation"]) if data.get("generation") is not None else None,
                done=[str(node) for node in data.get("done") or []],
                inflight={str(k): str(v) for k, v in data["inflight"].items()}
                if isinstance(data.get("inflight"), dict)
                else None,
                completed=bool(data.get("completed")),
            )
        except (ValueError, KeyError, TypeError):
            log.warning(
                "ignoring an unreadable %s annotation: starting a new roll", ROLL_STATE_ANNOTATION
            )
            return None


def _selector(spec: Mapping[str, Any], *, what: str) -> str:
    """A label selector string from a workload's ``spec.selector``."""
    selector = spec.get("selector") or {}
    parts = [f"{key}={value}" for key, value in sorted((selector.get("matchLabels") or {}).items())]
    for expression in selector.get("matchExpressions") or []:
        key, operator = expression.get("key"), expression.get("operator")
        values = ",".join(expression.get("values") or [])
        if operator == "In":
            parts.append(f"{key} in ({values})")
        elif operator == "NotIn":
            parts.append(f"{key} notin ({values})")
        elif operator == "Exists":
            parts.append(str(key))
        elif operator == "DoesNotExist":
            parts.append(f"!{key}")
    if not parts:
        raise KubernetesError(
            f"{what} has no pod selector", fix="check the workload's spec.selector"
        )
    return ",".join(parts)


def _created(pod: Mapping[str, Any]) -> datetime | None:
    text = (pod.get("metadata") or {}).get("creationTimestamp")
    try:
        return parse_timestamp(str(text)) if text else None
    except ValueError:
        return None


def _exited(pod: Mapping[str, Any]) -> set[str]:
    """The container instances of a pod that started and exited (their keys)."""
    return {
        instance.key
        for view in container_instances(pod)
        for instance in view.instances
        if not instance.running
    }


class _Roller:
    def __init__(
        self,
        *,
        api: PodApi,
        namespace: str,
        name: str,
        rotator: Rotator,
        timeout_per_pod: float,
        on_progress: Callable[[RollProgress], None] | None,
        poll_interval: float,
        stop: threading.Event | None,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float],
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.workload = f"daemonset/{name}"
        self.rotator = rotator
        self.timeout_per_pod = timeout_per_pod
        self.on_progress = on_progress
        self.poll_interval = poll_interval
        self.stop = stop or threading.Event()
        self.clock = clock
        self.monotonic = monotonic
        self.began = monotonic()
        self.state: _RollState | None = None
        self.resumed = False
        self.total = 0
        self.selector = ""
        self.owner_uid: str | None = None

    # --- plumbing ---

    def progress(
        self,
        phase: str,
        *,
        node: str | None = None,
        pod: str | None = None,
        new_pod: str | None = None,
    ) -> None:
        assert self.state is not None
        update = RollProgress(
            roll_id=self.state.roll_id,
            workload=self.workload,
            namespace=self.namespace,
            phase=phase,
            total=self.total,
            done=len(self.state.done),
            node=node,
            pod=pod,
            new_pod=new_pod,
            resumed=self.resumed,
            elapsed_seconds=self.monotonic() - self.began,
        )
        log.info("roll %s", update.describe())
        if self.on_progress is not None:
            self.on_progress(update)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise RollInterruptedError(
                f"the roll of {self.workload} was interrupted after "
                f"{len(self.state.done) if self.state else 0} of {self.total} pods",
                fix="rerun the same command: it resumes where it stopped",
            )

    def save(self) -> None:
        assert self.state is not None
        self.api.annotate_workload(
            kind="DaemonSet", name=self.name, annotations={ROLL_STATE_ANNOTATION: self.state.dump()}
        )

    def pods_by_node(self) -> dict[str, list[dict[str, Any]]]:
        items, _ = self.api.list(selector=self.selector)
        by_node: dict[str, list[dict[str, Any]]] = {}
        for pod in items:
            owners = (pod.get("metadata") or {}).get("ownerReferences") or []
            if not any(owner.get("uid") == self.owner_uid for owner in owners):
                continue
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                by_node.setdefault(str(node), []).append(pod)
        return by_node

    @staticmethod
    def current(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        if not live:
            return None
        return max(live, key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp")))

    def rotate(self, deadline: float) -> RotationReport:
        while True:
            self.check_stop()
            try:
                return self.rotator.rotate()
            except LockError as exc:  # the controller or the CronJob is rotating: wait
                if self.monotonic() >= deadline:
                    raise
                log.info("waiting for the rotation lock: %s", exc.one_line())
                self.stop.wait(self.poll_interval)

    # --- the roll ---

    def prepare(self, *, restart: bool) -> None:
        workload = self.api.read_workload(kind="DaemonSet", name=self.name)
        metadata = workload.get("metadata") or {}
        self.owner_uid = metadata.get("uid")
        self.selector = _selector(workload.get("spec") or {}, what=f"{self.workload}")
        generation = metadata.get("generation")
        generation = int(generation) if generation is not None else None
        previous = _RollState.load((metadata.get("annotations") or {}).get(ROLL_STATE_ANNOTATION))
        resumable = (
            previous is not None
            and not restart
            and not previous.completed
            and previous.generation == generation
        )
        if not self.pods_by_node() and not (resumable and previous and previous.inflight):
            # Checked before any state is written: a roll started now would record a start
            # time that makes the pods created later look already rolled.
            desired = (workload.get("status") or {}).get("desiredNumberScheduled")
            wanted = f", {desired} desired" if desired is not None else ""
            raise NoPodsToRollError(
                f"{self.workload} in namespace {self.namespace!r} has no scheduled pods "
                f"(selector {self.selector}{wanted}): nothing to roll",
                fix=f"check its pods (kubectl -n {self.namespace} get pods -l '{self.selector}' "
                "-o wide), its nodeSelector and tolerations, and --namespace; to refresh only "
                "the Secret, run lg-rotate rotate",
            )
        if resumable and previous is not None:
            self.state, self.resumed = previous, True
            log.info(
                "resuming roll %s of %s started %s (%d nodes done)",
                previous.roll_id,
                self.workload,
                format_timestamp(previous.started_at),
                len(previous.done),
            )
        else:
            self.state = _RollState(
                roll_id=str(uuid.uuid4()), started_at=self.clock(), generation=generation
            )
            self.save()

    def run(self) -> RollReport:
        assert self.state is not None
        state = self.state
        inflight = state.inflight or {}
        nodes = sorted(set(self.pods_by_node()) | ({inflight["node"]} if inflight else set()))
        self.total = len(nodes)
        self.progress("started")
        rolled: list[RolledPod] = []
        skipped: list[str] = []
        for node in nodes:
            self.check_stop()
            pod = self.current(self.pods_by_node().get(node, []))
            was_inflight = inflight.get("node") == node
            if pod is None and not was_inflight:
                log.warning("node %s has no pod of %s any more: skipping it", node, self.workload)
                continue
            uid = str(pod["metadata"].get("uid")) if pod is not None else None
            created = _created(pod) if pod is not None else None
            pod_name = str(pod["metadata"]["name"]) if pod is not None else inflight["pod"]
            replaced = was_inflight and uid != inflight.get("uid")
            if (
                node in state.done
                or replaced
                or (created is not None and created > state.started_at)
            ):
                if pod is None or not pod_is_ready(pod):
                    # The interrupted replacement: wait for it (it may not exist yet).
                    old = {inflight["uid"]} if was_inflight and inflight.get("uid") else set()
                    pod_name = self.wait_ready(node, old_uids=old, pod_name=pod_name)[0]
                if node not in state.done:
                    state.done.append(node)
                    state.inflight = None
                    self.save()
                skipped.append(node)
                self.progress("skipped", node=node, pod=pod_name)
                continue
            assert pod is not None
            rolled.append(self.roll_one(node, pod))
        final = None
        if rolled:
            report = self.rotate(self.monotonic() + self.timeout_per_pod)
            final = (report.fingerprint or "")[:12] or None
        state.completed = True
        self.save()
        self.progress("finished")
        return RollReport(
            roll_id=state.roll_id,
            workload=self.workload,
            namespace=self.namespace,
            resumed=self.resumed,
            rolled=tuple(rolled),
            skipped=tuple(skipped),
            final_fingerprint=final,
            duration_seconds=self.monotonic() - self.began,
        )

    def roll_one(self, node: str, pod: dict[str, Any]) -> RolledPod:
        assert self.state is not None
        started = self.monotonic()
        deadline = started + self.timeout_per_pod
        name = str(pod["metadata"]["name"])
        uid = str(pod["metadata"].get("uid") or "")
        old_uids = {str(p["metadata"].get("uid")) for p in self.pods_by_node().get(node, [])}
        report = self.rotate(deadline)
        self.progress("rotated", node=node, pod=name)
        self.check_stop()
        self.state.inflight = {"node": node, "pod": name, "uid": uid}
        self.save()
        self.api.delete(name=name, uid=uid or None)
        self.progress("deleted", node=node, pod=name)
        new_pod, rotations = self.wait_ready(
            node, old_uids=old_uids, pod_name=name, started=started
        )
        self.state.done.append(node)
        self.state.inflight = None
        self.save()
        self.progress("ready", node=node, pod=name, new_pod=new_pod)
        return RolledPod(
            node=node,
            old_pod=name,
            new_pod=new_pod,
            fingerprint=(report.fingerprint or "")[:12] or None,
            rotations=1 + rotations,
            seconds=self.monotonic() - started,
        )

    def wait_ready(
        self, node: str, *, old_uids: set[str], pod_name: str, started: float | None = None
    ) -> tuple[str, int]:
        """Wait for a Ready pod on ``node`` other than ``old_uids``; (its name, rotations)."""
        deadline = (started if started is not None else self.monotonic()) + self.timeout_per_pod
        handled: set[str] = set()
        rotations = 0
        announced = False
        while True:
            self.check_stop()
            candidates = [
                p
                for p in self.pods_by_node().get(node, [])
                if str(p["metadata"].get("uid")) not in old_uids
                and not p["metadata"].get("deletionTimestamp")
            ]
            pod = max(
                candidates, key=lambda p: str(p["metadata"].get("creationTimestamp")), default=None
            )
            if pod is not None:
                new_name = str(pod["metadata"]["name"])
                if pod_is_ready(pod):
                    return new_name, rotations
                exited = _exited(pod) - handled
                if exited:
                    # It exited before it was Ready (it read a token someone else had used,
                    # most likely): its restart must find a fresh token.
                    handled |= exited
                    log.info("%s exited before it was Ready: rotating again", new_name)
                    self.rotate(deadline)
                    rotations += 1
                if not announced:
                    self.progress("waiting", node=node, pod=pod_name, new_pod=new_name)
                    announced = True
            if self.monotonic() >= deadline:
                raise RolloutTimeoutError(
                    f"the pod replacing {pod_name} on node {node} was not Ready within "
                    f"{self.timeout_per_pod:g}s",
                    fix=f"check it (kubectl -n {self.namespace} get pods -o wide "
                    f"--field-selector spec.nodeName={node}); rerun the roll to resume, or raise "
                    "the per-pod timeout",
                )
            self.stop.wait(min(self.poll_interval, max(0.0, deadline - self.monotonic())))


def roll(
    *,
    api_client: ApiClient,
    namespace: str,
    kind: str,
    name: str,
    rotator: Rotator,
    timeout_per_pod: float = DEFAULT_TIMEOUT_PER_POD,
    on_progress: Callable[[RollProgress], None] | None = None,
    restart: bool = False,
    poll_interval: float = 1.0,
    stop: threading.Event | None = None,
    request_timeout: float = 30.0,
    clock: Callable[[], datetime] = utcnow,
    monotonic: Callable[[], float] = time.monotonic,
) -> RollReport:
    """Roll a DaemonSet pod by pod, a fresh token for each (see the module docstring).

    ``kind``/``name`` as in ``daemonset/NAME`` (``ds`` accepted). ``restart`` ignores a
    recorded unfinished roll and starts a new one. ``stop`` interrupts between steps
    (RollInterruptedError; a rerun resumes). Raises NoPodsToRollError (exit 6) when the
    DaemonSet has no scheduled pods, before anything is minted or recorded;
    RolloutTimeoutError when a replacement is not Ready within ``timeout_per_pod`` seconds
    (the roll stays resumable); and the rotation's own errors.
    """
    canonical, name = parse_workload_ref(f"{kind}/{name}")
    if canonical != "daemonset":
        raise ConfigError(
            f"roll works on DaemonSets, not on a {canonical}",
            fix="for a Deployment or StatefulSet use `lg-rotate rotate --restart KIND/NAME` "
            "with `lg-rotate watch` running (one fresh token per pod start)",
        )
    if timeout_per_pod <= 0:
        raise ConfigError("the per-pod timeout must be positive", fix="pass e.g. 300 seconds")
    roller = _Roller(
        api=PodApi(api_client=api_client, namespace=namespace, request_timeout=request_timeout),
        namespace=namespace,
        name=name,
        rotator=rotator,
        timeout_per_pod=timeout_per_pod,
        on_progress=on_progress,
        poll_interval=max(0.01, poll_interval),
        stop=stop,
        clock=clock,
        monotonic=monotonic,
    )
    roller.prepare(restart=restart)
    return roller.run()
