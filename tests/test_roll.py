"""``roll``: pod by pod, a fresh token each, resumable.

Against the real control plane (tests/fixtures/cluster.py): the shipped agent DaemonSet
(cronjob/agent/daemonset.yaml) on fake Nodes, whose pods the real DaemonSet controller
creates and recreates; tests/fakekubelet.py binds them and plays their kubelets (env
resolved from the Secret at container start, status through the status subresource,
graceful deletion) and their agents (enrolment against the LinuxGuard sandbox).
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakekubelet import FakeKubelet
from fixtures.cluster import Cluster
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import ConfigError, ExitCode, RolloutTimeoutError
from rotator.kube.lease import LeaseLock
from rotator.kube.roll import ROLL_STATE_ANNOTATION, RollInterruptedError, RollProgress, roll
from rotator.kube.secret import SecretTarget
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Rotator
from rotator.sandbox import ENROLL_PATH, SandboxServer
from rotator.tokens import Secret

TENANT = "acme"
NODES = ["node-a", "node-b", "node-c", "node-d"]
AGENT_DAEMONSET = Path(__file__).parent.parent / "cronjob" / "agent" / "daemonset.yaml"


@pytest.fixture
def rotator(k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer) -> Rotator:
    api = k8s.api_client()
    return Rotator(
        minter=LinuxGuardClient(
            base_url=sandbox.url,
            api_key=Secret(sandbox.api_key),
            retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=5),
        ),
        provider=MemoryProvider(store=MemoryStore()),
        tenant=TENANT,
        target=SecretTarget(api_client=api, namespace=k8s_namespace),
        lock=LeaseLock(api_client=api, namespace=k8s_namespace, wait=5, poll_interval=0.02),
    )


@pytest.fixture
def cluster(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, rotator: Rotator
) -> Iterator[FakeKubelet]:
    """The agent DaemonSet on four Nodes, each pod enrolled with its own token.

    The Nodes' kubelets start held; each is released after a rotation, so every pod's
    first start reads a token nobody read before.
    """
    with FakeKubelet(k8s, k8s_namespace, sandbox=sandbox) as kubelet:
        kubelet.hold(NODES)
        k8s.create_nodes(NODES)
        k8s.apply(yaml.safe_load(AGENT_DAEMONSET.read_text()), k8s_namespace)
        for node in NODES:
            rotator.rotate()
            kubelet.release([node])
            kubelet.wait(
                lambda node=node: kubelet.settled([node]) and kubelet.live_pods()[node].enrolled,
                timeout=30,
                what=f"the pod on {node} to enrol",
            )
        rotator.rotate()  # the Secret holds an unread token, as after any rotation
        yield kubelet


def roll_state(k8s: Cluster, namespace: str) -> dict[str, Any]:
    ds = k8s.get("apps/v1/daemonsets", namespace, "linuxguard-agent")
    assert ds is not None
    return json.loads(ds["metadata"]["annotations"][ROLL_STATE_ANNOTATION])


def pods_on(k8s: Cluster, namespace: str, node: str) -> list[dict[str, Any]]:
    """The agent pods the API server has on ``node`` (terminating ones included)."""
    return [
        pod
        for pod in k8s.list_objects("v1/pods", namespace, label_selector="app=linuxguard-agent")
        if pod["spec"].get("nodeName") == node
    ]


def roll_agents(k8s: Cluster, namespace: str, rotator: Rotator, **options: Any) -> Any:
    """``roll`` of the simulated agent DaemonSet (the settings every test shares)."""
    return roll(
        api_client=k8s.api_client(),
        namespace=namespace,
        kind="daemonset",
        name="linuxguard-agent",
        rotator=rotator,
        **options,
    )


def test_roll_replaces_every_pod_with_a_fresh_token_each(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, rotator: Rotator, cluster: FakeKubelet
) -> None:
    before = {node: pod.uid for node, pod in cluster.live_pods().items()}
    attempts_before = len(cluster.attempts)
    updates: list[RollProgress] = []

    report = roll(
        api_client=k8s.api_client(),
        namespace=k8s_namespace,
        kind="ds",
        name="linuxguard-agent",
        rotator=rotator,
        timeout_per_pod=15,
        poll_interval=0.02,
        on_progress=updates.append,
    )

    after = cluster.live_pods()
    assert {node: pod.uid for node, pod in after.items()}.keys() == set(NODES)
    assert all(after[node].uid != before[node] for node in NODES)
    assert all(pod.enrolled and pod.ready for pod in after.values())
    new_attempts = cluster.attempts[attempts_before:]
    assert len(new_attempts) == len(NODES)  # one start each: nobody had to retry
    assert all(a.results == ["enrolled"] for a in new_attempts)
    assert len({a.token_fingerprint for a in new_attempts}) == len(NODES)
    assert not [r for r in sandbox.enrolments() if r.result == "conflict"]

    assert report.resumed is False
    assert [pod.node for pod in report.rolled] == NODES
    assert [pod.new_pod for pod in report.rolled] == [after[node].name for node in NODES]
    assert all(pod.rotations == 1 for pod in report.rolled)
    assert len({pod.fingerprint for pod in report.rolled}) == len(NODES)
    # The last rotation leaves a token nobody read.
    assert report.final_fingerprint not in {a.token_fingerprint[:12] for a in cluster.attempts}
    json.dumps(report.as_dict())

    phases = [u.phase for u in updates]
    assert phases[0] == "started"
    assert phases[-1] == "finished"
    assert phases.count("rotated") == phases.count("deleted") == phases.count("ready") == 4
    assert [u.done for u in updates if u.phase == "ready"] == [1, 2, 3, 4]
    assert all(u.total == 4 for u in updates)
    assert "4/4 pods rolled" in updates[-1].describe()
    json.dumps([u.as_dict() for u in updates])

    state = roll_state(k8s, k8s_namespace)
    assert state["id"] == report.roll_id
    assert state["done"] == NODES
    assert state["completed"] is True
    assert state["inflight"] is None


class InterruptError(Exception):
    """Stands in for Ctrl-C in the middle of a roll."""


def test_interrupted_roll_resumes_where_it_stopped(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, rotator: Rotator, cluster: FakeKubelet
) -> None:
    api = k8s.api_client()
    original = {node: pod.uid for node, pod in cluster.live_pods().items()}
    created_before = len(cluster.pods)

    def interrupt_after_third_delete(update: RollProgress) -> None:
        if update.phase == "rotated" and update.node == NODES[2]:
            cluster.hold([NODES[2]])  # its kubelet is down: the pod stays Terminating
        if update.phase == "deleted" and update.node == NODES[2]:
            raise InterruptError

    with pytest.raises(InterruptError):
        roll(
            api_client=api,
            namespace=k8s_namespace,
            kind="daemonset",
            name="linuxguard-agent",
            rotator=rotator,
            timeout_per_pod=15,
            poll_interval=0.02,
            on_progress=interrupt_after_third_delete,
        )
    state = roll_state(k8s, k8s_namespace)
    assert state["done"] == NODES[:2]
    assert state["completed"] is False
    assert state["inflight"]["node"] == NODES[2]
    assert state["inflight"]["uid"] == original[NODES[2]]

    # Deleted, but its kubelet never confirmed it: Terminating, so no replacement yet.
    (terminating,) = pods_on(k8s, k8s_namespace, NODES[2])
    assert terminating["metadata"]["uid"] == original[NODES[2]]
    assert terminating["metadata"].get("deletionTimestamp")

    updates: list[RollProgress] = []

    def replacement_arrives_late(update: RollProgress) -> None:
        updates.append(update)
        if update.phase == "started":  # the rerun starts while node-c has no live pod
            assert update.total == len(NODES)
            cluster.release([NODES[2]])

    report = roll(
        api_client=api,
        namespace=k8s_namespace,
        kind="daemonset",
        name="linuxguard-agent",
        rotator=rotator,
        timeout_per_pod=15,
        poll_interval=0.02,
        on_progress=replacement_arrives_late,
    )
    assert report.resumed is True
    assert report.roll_id == state["id"]
    assert list(report.skipped) == NODES[:3]  # two done, the third already replaced
    assert [pod.node for pod in report.rolled] == NODES[3:]
    assert all(u.resumed for u in updates)

    # Each node's pod was replaced exactly once over both runs.
    assert len(cluster.pods) == created_before + len(NODES)
    live = cluster.live_pods()
    assert all(live[node].uid != original[node] for node in NODES)
    assert all(pod.enrolled for pod in live.values())
    per_node = collections.Counter(pod.node for pod in cluster.pods.values())
    assert set(per_node.values()) == {2}
    assert not [r for r in sandbox.enrolments() if r.result == "conflict"]
    assert roll_state(k8s, k8s_namespace)["completed"] is True

    # A completed roll is not resumed: the next run is a new one.
    again = roll(
        api_client=api,
        namespace=k8s_namespace,
        kind="daemonset",
        name="linuxguard-agent",
        rotator=rotator,
        timeout_per_pod=15,
        poll_interval=0.02,
    )
    assert again.resumed is False
    assert again.roll_id != report.roll_id
    assert len(again.rolled) == len(NODES)


def test_a_replacement_that_restarts_gets_another_rotation(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, rotator: Rotator, cluster: FakeKubelet
) -> None:
    # The first replacement's enrolment is refused (409) once: it crash-loops, reading the
    # Secret again on restart; roll rotates so that restart finds a fresh token.
    sandbox.inject_fault(status=409, count=1, path=ENROLL_PATH)
    report = roll_agents(
        k8s,
        k8s_namespace,
        rotator,
        timeout_per_pod=15,
        poll_interval=0.02,
    )
    assert report.rolled[0].rotations == 2
    assert all(pod.rotations == 1 for pod in report.rolled[1:])
    first = cluster.live_pods()[NODES[0]]
    tries = [a for a in cluster.attempts if a.pod_uid == first.uid]
    assert [a.results for a in tries] == [["conflict"], ["enrolled"]]
    assert tries[0].token_fingerprint != tries[1].token_fingerprint


def test_roll_times_out_when_no_replacement_gets_ready_and_stays_resumable(
    k8s: Cluster, k8s_namespace: str, rotator: Rotator, cluster: FakeKubelet
) -> None:
    cluster.hold([NODES[0]])  # its kubelet is down: the deleted pod stays Terminating, so
    # the DaemonSet controller makes no replacement
    started = time.monotonic()
    with pytest.raises(RolloutTimeoutError) as failure:
        roll_agents(
            k8s,
            k8s_namespace,
            rotator,
            timeout_per_pod=0.5,
            poll_interval=0.02,
        )
    assert time.monotonic() - started < 10
    assert f"on node {NODES[0]}" in failure.value.message
    assert "rerun the roll to resume" in (failure.value.fix or "")
    assert failure.value.exit_code == ExitCode.KUBERNETES
    state = roll_state(k8s, k8s_namespace)
    assert state["done"] == []
    assert state["completed"] is False
    assert state["inflight"]["node"] == NODES[0]

    (terminating,) = pods_on(k8s, k8s_namespace, NODES[0])
    assert terminating["metadata"]["uid"] == state["inflight"]["uid"]
    assert terminating["metadata"].get("deletionTimestamp")

    cluster.release([NODES[0]])
    report = roll_agents(
        k8s,
        k8s_namespace,
        rotator,
        timeout_per_pod=15,
        poll_interval=0.02,
    )
    assert report.resumed is True
    assert report.skipped == (NODES[0],)
    assert [pod.node for pod in report.rolled] == NODES[1:]


def test_roll_stops_between_steps_when_asked(
    k8s: Cluster, k8s_namespace: str, rotator: Rotator, cluster: FakeKubelet
) -> None:
    stop = threading.Event()

    def stop_after_first(update: RollProgress) -> None:
        if update.phase == "ready":
            stop.set()

    with pytest.raises(RollInterruptedError) as interrupted:
        roll_agents(
            k8s,
            k8s_namespace,
            rotator,
            timeout_per_pod=15,
            poll_interval=0.02,
            on_progress=stop_after_first,
            stop=stop,
        )
    assert interrupted.value.exit_code == ExitCode.INTERRUPTED
    assert "after 1 of 4 pods" in interrupted.value.message
    assert roll_state(k8s, k8s_namespace)["done"] == NODES[:1]


@pytest.mark.parametrize("kind", ["deployment", "sts"])
def test_roll_is_for_daemonsets(k8s: Cluster, rotator: Rotator, kind: str) -> None:
    with pytest.raises(ConfigError, match="roll works on DaemonSets"):
        roll(
            api_client=k8s.api_client(),
            namespace="default",
            kind=kind,
            name="agents",
            rotator=rotator,
        )
