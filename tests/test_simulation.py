"""End-to-end: the controller keeps a DaemonSet of agents enrolled, one token per start.

A real control plane (tests/fixtures/cluster.py: etcd, kube-apiserver and
kube-controller-manager, whose DaemonSet controller creates, recreates and rolls the agent
pods on fake Nodes), the LinuxGuard sandbox and the pod simulator (tests/podsim.py: the
scheduler's binding and the kubelets) run for real; the controller (``lg-rotate watch``)
runs in a thread against them with a fast clock configuration. The scenario covers initial
scheduling, full rollouts (one pod at a time and in bursts), node additions (staggered and
in a burst), container restarts (staggered and in a burst), agents that keep retrying a
refused token ("stuck": only a pod deletion recovers them), tokens nearing expiry (the
sandbox clock is advanced), and node removals.

Asserted: at least 100 container starts; every pod ends enrolled and Ready; no agent read
an expired token or was refused as expired; every refused enrolment (409) was detected
by the controller as a collision and recovered (the pod restarted with a fresh token, or
its replacement enrolled); the Secret never holds a consumed token once things settle.
The figures are printed (``pytest -s``) as one summary line and the time of each step.

``test_shared_secret_burst_baseline`` is issue 9's baseline at CI size: agent pods all
starting at once on one shared Secret (``podsim.burst_shared_secret``, which
benchmarks/webhook.py runs with 100 and 500 pods).
"""

from __future__ import annotations

import collections
import http.client
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.cluster import Cluster
from podsim import BurstReport, PodSim, burst_shared_secret, make_controller
from rotator.kube.controller import Controller
from rotator.sandbox import SandboxServer

pytestmark = pytest.mark.slow

# A fast controller: decide about a suspect after 1 s, wake up every 0.1 s.
SIMULATION_SETTINGS: dict[str, Any] = {
    "collision_grace": 1.0,
    "deletions_per_minute": 120,
    "deletion_burst": 6,
    "tick": 0.1,
    "max_backoff": 1.0,
    "resync_seconds": 30,
}


@pytest.fixture
def running_controller(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer
) -> Iterator[Controller]:
    k8s.require_controllers()  # the DaemonSet controller makes the pods
    controller = make_controller(k8s, k8s_namespace, sandbox, **SIMULATION_SETTINGS)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, kwargs={"stop": stop}, name="controller")
    thread.start()
    try:
        yield controller
    finally:
        stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the controller did not shut down"


def scrape(controller: Controller) -> dict[str, float]:
    url = controller.metrics_url
    assert url is not None
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/metrics")
        answer = connection.getresponse()
        text = answer.read().decode()
    finally:
        connection.close()
    assert answer.status == 200
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def explain(attempt: Any, attempts: list[Any], controller: Controller) -> str:
    """Why a refused start was not detected: the starts involved, as the controller saw them."""
    tracker = controller._tracker
    lines = [f"undetected: {attempt}"]
    same_token = [a for a in attempts if a.token_fingerprint == attempt.token_fingerprint]
    for other in same_token:
        start = tracker.start((other.pod_uid, "agent", other.container_id))
        candidates = (
            sorted(c[:8] for c in tracker.candidates(start, controller._timeline))
            if start
            else None
        )
        lines.append(
            f"  same token: {other.pod_name} read {other.read_at.time()} {other.results} "
            f"start={start} candidates={candidates} "
            f"judged={start is not None and start.ident in tracker.judged}"
        )
    lines.append(
        "  timeline: "
        + ", ".join(
            f"{e.fingerprint[:8]}[{e.earliest.time()}..{e.latest.time()}]"
            for e in controller._timeline.entries()
            if abs((e.earliest - attempt.read_at).total_seconds()) < 5
        )
    )
    return "\n".join(lines)


class Scenario:
    """The simulation's steps and the checks between them."""

    def __init__(self, sim: PodSim, controller: Controller, sandbox: SandboxServer) -> None:
        self.sim = sim
        self.controller = controller
        self.sandbox = sandbox
        self.secret_expiry_checks = 0
        self.steps: list[tuple[str, float]] = []  # (what, seconds since the previous settle)
        self._mark = time.monotonic()

    def quiet(self) -> bool:
        if not self.sim.settled():
            return False
        status = self.controller.status()
        if not status.idle or status.fingerprint is None:
            return False
        # The Secret holds a token nobody enrolled with: the next start gets a fresh one.
        return status.fingerprint not in self.sandbox.owners()

    def settle(self, what: str, *, timeout: float = 30.0) -> None:
        try:
            self.sim.wait(self.quiet, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe()}") from None
        self.check_secret_not_expired()
        now = time.monotonic()
        self.steps.append((what, now - self._mark))
        self._mark = now

    def describe(self) -> str:
        status = self.controller.status()
        lines = [f"controller: {status.as_dict()}"]
        with self.controller._cond:
            for suspect in self.controller._tracker.suspects.values():
                lines.append(f"  suspect {suspect.start.describe()} due {suspect.due:.1f}")
            lines.append(f"  reasons {self.controller._reasons}")
        owned = status.fingerprint in self.sandbox.owners()
        lines.append(f"secret token owned: {owned}; settled: {self.sim.settled()}")
        current = self.sim.template_hash
        for node, pod in sorted(self.sim.live_pods().items()):
            lines.append(
                f"  {node}: {pod.name} ready={pod.ready} enrolled={pod.enrolled} "
                f"mode={pod.mode} restarts={pod.restart_count} "
                f"current={pod.template_hash == current}"
            )
            if not pod.ready:
                for attempt in self.sim.attempts:
                    if attempt.pod_uid == pod.uid:
                        lines.append(
                            f"    attempt {attempt.container_id[-6:]} token "
                            f"{attempt.token_fingerprint[:12]} at {attempt.read_at} "
                            f"{attempt.results[:3]}"
                        )
                for record in self.controller.collision_log:
                    if record.pod_uid == pod.uid:
                        lines.append(f"    collision {record}")
                with self.controller._cond:
                    view = self.controller._pods.get(pod.uid)
                    lines.append(f"    controller view {view}")
                    for start in self.controller._tracker._starts.values():
                        if start.pod_uid == pod.uid:
                            lines.append(
                                f"    start {start} judged={start.ident in self.controller._tracker.judged}"
                            )
        lines.append(
            "timeline: "
            + ", ".join(
                f"{e.fingerprint[:8]}[{e.earliest.time()}..{e.latest.time()}]"
                for e in self.controller._timeline.entries()[-12:]
            )
        )
        return "\n".join(lines)

    def check_secret_not_expired(self) -> None:
        status = self.controller.status()
        assert status.expires_at is not None
        left = (status.expires_at - self.sandbox.now()).total_seconds()
        assert left > 0, "the Secret holds an expired token"
        self.secret_expiry_checks += 1


def test_every_pod_start_gets_its_own_token(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running_controller: Controller,
) -> None:
    controller = running_controller
    began = time.monotonic()
    nodes = [f"node-{index:02d}" for index in range(1, 17)]
    with PodSim(k8s=k8s, namespace=k8s_namespace, sandbox=sandbox, clock=sandbox.now) as sim:
        run = Scenario(sim, controller, sandbox)
        sim.wait(
            lambda: controller.status().leader and controller.status().fingerprint is not None,
            timeout=15,
            what="the controller to lead and create the Secret",
        )

        # 1. The DaemonSet is scheduled on eight nodes.
        sim.add_nodes(nodes[:8])
        run.settle("the first eight pods to enrol")

        # 2. A full rollout, one pod at a time (maxUnavailable 1).
        sim.rollout(max_unavailable=1)
        run.settle("the one-by-one rollout")

        # 3. Node additions: four, then a burst of four whose agents start in the same
        #    instant (two of them keep retrying a refused token: only a deletion helps).
        sim.add_nodes(nodes[8:12])
        run.settle("four new nodes")
        sim.set_mode(nodes[12], "stuck")
        sim.set_mode(nodes[13], "stuck")
        sim.add_nodes(nodes[12:16], burst=True)
        run.settle("a burst of four new nodes")

        # 4. Container restarts: six one after the other, then eight at the same instant.
        for node in nodes[:6]:
            sim.crash([node])
            sim.wait(sim.settled, timeout=15, what="a restarted container")
        run.settle("six container restarts")
        sim.crash(nodes[4:12], burst=True)
        run.settle("a burst of eight container restarts")

        # 5. A full rollout in bursts of four pods, some agents of the stuck kind.
        for node in nodes[::3]:
            sim.set_mode(node, "stuck")
        sim.rollout(max_unavailable=4, burst=True)
        run.settle("the burst rollout", timeout=45)

        # 6. Time passes (the sandbox clock): the controller replaces the token before it
        #    expires, then pods start again in a burst.
        tokens_seen = {controller.status().fingerprint}
        for _ in range(7):
            sandbox.advance_clock(100)
            # 20% of the 600 s TTL: the controller keeps at least 120 s on the Secret's token.
            sim.wait(
                lambda: (controller.status().expires_at - sandbox.now()).total_seconds() > 120,
                timeout=15,
                what="the controller to rotate a token nearing expiry",
            )
            run.check_secret_not_expired()
            tokens_seen.add(controller.status().fingerprint)
        assert len(tokens_seen) >= 2, "700 s passed: the token must have been replaced"
        sim.crash(nodes[:10], burst=True)
        run.settle("a burst of ten container restarts after the clock moved")

        # 7. Two nodes go away; a last burst rollout on the rest.
        sim.remove_node(nodes[0])
        sim.remove_node(nodes[1])
        sim.rollout(max_unavailable=5, burst=True)
        run.settle("the last burst rollout", timeout=45)

        attempts = list(sim.attempts)
        pods = dict(sim.pods)
        live = sim.live_pods()
    elapsed = time.monotonic() - began
    metrics = scrape(controller)
    status = controller.status()
    enrolments = sandbox.enrolments()
    collisions = list(controller.collision_log)

    # At least 100 token consumptions, every pod enrolled and Ready at the end.
    assert len(attempts) >= 100
    assert len(live) == 14
    assert all(pod.enrolled and pod.ready for pod in live.values())

    # Nobody read an expired token, nobody was refused for expiry.
    assert not [a for a in attempts if a.token_expires_at and a.token_expires_at <= a.read_at]
    results = collections.Counter(record.result for record in enrolments)
    assert results["expired"] == 0
    assert results["unknown-token"] == 0

    # Collisions happened, were detected, and recovered.
    refused = [a for a in attempts if "conflict" in a.results]
    assert refused, "the bursts should have made pods collide"
    detected = {(record.pod_uid, record.key) for record in collisions}
    # A pod the controller deleted for an earlier refused start takes its later ones along
    # (seen when the machine is so loaded that the watch lags seconds behind).
    deleted_as_victims = {r.pod_uid for r in collisions if r.action == "delete"}
    for attempt in refused:
        pod = pods[attempt.pod_uid]
        if pod.deleted_by_sim or (pod.deleted.is_set() and pod.uid not in deleted_as_victims):
            continue  # a node removal or the DaemonSet's rollout replaced it first
        assert (
            attempt.pod_uid,
            attempt.container_id,
        ) in detected or attempt.pod_uid in deleted_as_victims, explain(
            attempt, attempts, controller
        )
        later = [
            a
            for a in attempts
            if a.pod_uid == attempt.pod_uid and a.restart_count > attempt.restart_count
        ]
        recovered_by_restart = any(a.enrolled for a in later)
        replaced = pod.deleted.is_set() and (
            attempt.node not in live or live[attempt.node].enrolled
        )
        assert recovered_by_restart or replaced, attempt
    deleted_by_controller = [r for r in collisions if r.action == "delete"]
    restarted = [r for r in collisions if r.action == "restart"]
    assert deleted_by_controller, "stuck agents need their pods deleted"
    assert restarted, "crash-looping agents recover by themselves once the Secret is fresh"
    # (a victim whose pod a rollout replaced first needs no deletion)
    assert 1 <= metrics['lg_rotate_recoveries_total{action="delete"}'] <= len(deleted_by_controller)
    assert metrics['lg_rotate_recoveries_total{action="restart"}'] == len(restarted)
    assert metrics["lg_rotate_collisions_total"] == len(collisions)
    # Every start the API showed was counted (a pod deleted before its status said it
    # started never showed one).
    assert metrics["lg_rotate_pod_starts_total"] == sum(1 for a in attempts if a.reported)
    assert metrics['lg_rotate_rotations_total{result="minted"}'] == status.rotations
    assert metrics["lg_rotate_token_ttl_seconds"] > 400
    assert metrics["lg_rotate_mint_latency_seconds_count"] == status.rotations

    # Each token was enrolled by one workload at most (single use held).
    owners = collections.Counter(
        r.fingerprint for r in enrolments if r.result == "ok" and r.fingerprint
    )
    assert max(owners.values()) == 1

    first_try = sum(1 for a in attempts if a.results[:1] == ["enrolled"])
    print(
        f"\nsimulation: {len(nodes)} nodes, {len(pods)} pods, {len(attempts)} container starts, "
        f"{len(refused)} refused (409) starts, {len(collisions)} collisions detected, "
        f"{len(deleted_by_controller)} recovered by pod deletion, {len(restarted)} by "
        f"container restart, {status.rotations} rotations, enrolment rate "
        f"{first_try}/{len(attempts)} ({first_try / len(attempts):.0%}) on the first try, "
        f"{results['ok'] / elapsed:.1f} enrolments/s, {elapsed:.1f}s, rotations took "
        f"{metrics['lg_rotate_rotation_duration_seconds_sum'] / status.rotations * 1000:.0f} ms"
        " on average\n  steps: "
        + ", ".join(f"{what} {seconds:.1f}s" for what, seconds in run.steps)
    )


# Issue 9's baseline at CI size (benchmarks/webhook.py runs it with 100 and 500 pods).
BURST_NODES = 24


def test_shared_secret_burst_baseline(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer
) -> None:
    """Agent pods starting at once on one shared Secret: they collide, ``watch`` recovers
    every one (crash-loop restarts and pod deletions), single use holds throughout."""
    k8s.require_controllers()
    report: BurstReport = burst_shared_secret(
        k8s, k8s_namespace, BURST_NODES, sandbox=sandbox, timeout=50
    )
    print(f"\nshared-Secret burst: {report.describe()}\n  {report.as_dict()}")

    assert report.unenrolled == 0, report.describe()
    assert report.pods >= BURST_NODES
    assert report.starts >= BURST_NODES
    # One Secret for many simultaneous starts: most of them read a token another pod used.
    assert report.conflicts > 0
    assert report.first_try < BURST_NODES
    enrolments = sandbox.enrolments()
    owners = collections.Counter(
        r.fingerprint for r in enrolments if r.result == "ok" and r.fingerprint
    )
    assert max(owners.values()) == 1  # a token enrolled one workload at most
    results = collections.Counter(r.result for r in enrolments)
    assert results["expired"] == 0
    assert results["unknown-token"] == 0
