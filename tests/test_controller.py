"""The controller (rotator.controller) and its metrics (rotator.metrics).

Pure parts first (the token timeline, start attribution, the collision rules, pod status
parsing, the deletion rate limit, the metrics exposition, the relist after 410 Gone), then
the controller against the real control plane (tests/fixtures/cluster.py) and the LinuxGuard
sandbox: leader election on a real Lease (an injected clock; two replicas racing), the HTTP
endpoints, real core/v1 Events on the Secret, expiry rotations, failures and backoff, the
startup check, real label selectors, watch renewals, and the shipped agent DaemonSet whose
pods the real DaemonSet controller makes (tests/fakekubelet.py binds them and plays their
kubelets). The full pod simulation is in test_simulation.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from fakekubelet import FakeKubelet
from fixtures.cluster import Cluster
from fixtures.controllers import Running
from podsim import make_controller, make_rotator
from rotator.errors import ConfigError, KubernetesError
from rotator.kube import controller as ctl
from rotator.kube.collisions import (
    UNKNOWN_TOKEN,
    CollisionTracker,
    TokenBucket,
    TokenTimeline,
    Verdict,
)
from rotator.kube.controller import (
    Controller,
    controller_lease_name,
    install_signal_handlers,
    is_running,
)
from rotator.kube.lease import LeaseLock
from rotator.kube.pods import ContainerView, PodStart, PodView, container_instances, pod_is_ready
from rotator.kube.secret import SecretTarget
from rotator.linuxguard import MINT_PATH
from rotator.metrics import Counter, Gauge, Histogram, MetricsServer, Registry
from rotator.sandbox import SandboxServer
from rotator.tokens import format_timestamp

T = TypeVar("T")
T0 = datetime(2030, 5, 6, 7, 8, 9, tzinfo=UTC)
TOLERANCE = timedelta(seconds=1)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- the token timeline ----------------------------------------------------------------


def timeline_abc() -> TokenTimeline:
    timeline = TokenTimeline()
    timeline.observe(fingerprint="A", earliest=at(10), latest=at(11), origin="controller")
    timeline.observe(fingerprint="B", earliest=at(20), latest=at(21), origin="controller")
    timeline.observe(fingerprint="C", earliest=at(30), latest=at(31), origin="controller")
    return timeline


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        ((22, 25), {"B"}),  # well inside B's time
        ((19, 22), {"A", "B"}),  # B arrived somewhere in [20, 21]
        ((20.5, 20.7), {"A", "B"}),  # inside the switch itself
        ((5, 9), {UNKNOWN_TOKEN}),  # before the first token the timeline knows
        ((9, 12), {UNKNOWN_TOKEN, "A"}),
        ((35, 40), {"C"}),  # the current token
        ((12, 35), {"A", "B", "C"}),
        ((None, 15), {UNKNOWN_TOKEN, "A"}),  # no lower bound
    ],
)
def test_timeline_candidates(window: tuple[float | None, float], expected: set[str]) -> None:
    earliest, latest = window
    found = timeline_abc().candidates(
        earliest=None if earliest is None else at(earliest), latest=at(latest)
    )
    assert found == expected


def test_empty_timeline_knows_nothing() -> None:
    assert TokenTimeline().candidates(earliest=at(0), latest=at(1)) == {UNKNOWN_TOKEN}


def test_timeline_observe_narrows_the_current_token_and_ignores_stale_reads() -> None:
    timeline = timeline_abc()
    # A read of the Secret saw C with its annotation: both bounds hold, keep the tighter.
    assert not timeline.observe(
        fingerprint="C", earliest=at(29), latest=at(30.5), origin="observed", rotation_id="r-c"
    )
    current = timeline.current
    assert current is not None
    assert (current.earliest, current.latest) == (at(30), at(30.5))
    assert current.origin == "controller"
    assert current.rotation_id == "r-c"
    # A slow reader that still saw B must not make B current again.
    assert not timeline.observe(fingerprint="B", earliest=at(40), latest=at(41), origin="observed")
    assert timeline.current is current
    # A new token never switches before the previous one did.
    assert timeline.observe(fingerprint="D", earliest=at(25), latest=at(26), origin="observed")
    assert timeline.current is not None
    assert timeline.current.earliest == at(30)
    assert timeline.current.latest == at(30)
    assert len(timeline) == 4


def test_timeline_prune_keeps_recent_and_current() -> None:
    timeline = timeline_abc()
    timeline.keep = timedelta(seconds=15)
    timeline.prune(now=at(40))  # B was replaced at 31 at the latest: kept; A (21) goes
    assert [e.fingerprint for e in timeline.entries()] == ["B", "C"]
    timeline.prune(now=at(10_000))
    assert [e.fingerprint for e in timeline.entries()] == ["C"]


# --- starts and collisions -------------------------------------------------------------


def start(
    pod: str,
    started: float | None,
    observed: float,
    *,
    key: str | None = None,
    historical: bool = False,
) -> PodStart:
    return PodStart(
        pod_uid=f"uid-{pod}",
        pod_name=pod,
        node=f"node-{pod}",
        container="agent",
        key=key or f"cid-{pod}",
        started_at=None if started is None else at(started),
        observed_at=at(observed),
        historical=historical,
    )


def test_start_window_is_seconds_wide_and_ends_when_observed() -> None:
    # startedAt has whole seconds and the kubelet's clock: [s - tol, s + 1 s + tol] ...
    assert start("p", 100, 200).window(TOLERANCE) == (at(99), at(102))
    # ... cut at the moment the controller saw it started (it read the Secret before).
    assert start("p", 100, 100.3).window(TOLERANCE) == (at(99), at(100.3))
    # A restart it only counted reaches back without bound.
    assert start("p", None, 100).window(TOLERANCE) == (None, at(100))


def burst_timeline() -> TokenTimeline:
    timeline = TokenTimeline()
    # X was delivered long ago; Y by the rotation the burst triggered, at 100.20-100.21.
    timeline.observe(fingerprint="X", earliest=at(0), latest=at(1), origin="controller")
    timeline.observe(fingerprint="Y", earliest=at(100.20), latest=at(100.21), origin="controller")
    return timeline


def test_a_burst_seen_before_the_rotation_is_a_certain_collision() -> None:
    timeline = burst_timeline()
    tracker = CollisionTracker(tolerance=TOLERANCE, grace=5)
    first, second = start("a", 100, 100.05), start("b", 100, 100.10)
    assert tracker.candidates(first, timeline) == {"X"}
    assert tracker.add(first, timeline, now=0) == []
    assert tracker.add(second, timeline, now=0) == [first]
    assert set(tracker.suspects) == {first.ident, second.ident}
    assert tracker.suspects[second.ident].certain == {first.ident}
    # A pod that started after Y landed read Y or... only Y: no collision with the burst.
    later = start("c", 101, 101.5)
    assert tracker.candidates(later, timeline) == {"X", "Y"}  # 101 - 1 s reaches the switch
    much_later = start("d", 103, 103.2)
    assert tracker.candidates(much_later, timeline) == {"Y"}
    assert tracker.add(much_later, timeline, now=0) == []


def test_starts_of_one_pod_never_collide_and_historical_ones_are_only_partners() -> None:
    timeline = burst_timeline()
    tracker = CollisionTracker(tolerance=TOLERANCE, grace=5)
    tracker.add(start("a", 100, 100.05, key="one"), timeline, now=0)
    assert tracker.add(start("a", 100, 100.08, key="two"), timeline, now=0) == []
    old = start("h", 100, 100.06, historical=True)
    newcomer = start("n", 100, 100.07)
    other = CollisionTracker(tolerance=TOLERANCE, grace=5)
    other.add(old, timeline, now=0)
    assert other.add(newcomer, timeline, now=0) == [old]
    assert set(other.suspects) == {newcomer.ident}


def container(key: str, *, ready: bool, current: bool = True) -> ContainerView:
    view = ContainerView(latest_key=key, current_key=key if current else None, ready=ready)
    view.seen.add(key)
    if ready:
        view.ready_keys.add(key)
    return view


def pods_of(**views: ContainerView) -> dict[str, PodView]:
    return {
        f"uid-{name}": PodView(uid=f"uid-{name}", name=name, node=None, containers={"agent": view})
        for name, view in views.items()
    }


def tracked_pair() -> tuple[CollisionTracker, PodStart, PodStart]:
    tracker = CollisionTracker(tolerance=TOLERANCE, grace=5)
    first, second = start("a", 100, 100.05), start("b", 100, 100.10)
    tracker.add(first, burst_timeline(), now=0)
    tracker.add(second, burst_timeline(), now=0)
    return tracker, first, second


def test_judge_an_unready_later_start_is_a_victim_after_the_grace() -> None:
    tracker, first, second = tracked_pair()
    pods = pods_of(a=container(first.key, ready=True), b=container(second.key, ready=False))
    suspect = tracker.suspects[second.ident]
    assert tracker.judge(suspect, pods, now=4.9) is Verdict.WAIT
    assert tracker.judge(suspect, pods, now=5.0) is Verdict.VICTIM
    assert "not Ready 5s" in suspect.reason
    assert tracker.judge(tracker.suspects[first.ident], pods, now=5) is Verdict.ENROLLED


def test_judge_the_earliest_gets_one_more_grace_when_nobody_is_ready() -> None:
    tracker, first, second = tracked_pair()
    pods = pods_of(a=container(first.key, ready=False), b=container(second.key, ready=False))
    assert tracker.judge(tracker.suspects[second.ident], pods, now=5) is Verdict.VICTIM
    earliest = tracker.suspects[first.ident]
    assert tracker.judge(earliest, pods, now=5) is Verdict.WAIT  # probably the owner, slow
    assert earliest.due == 10
    assert tracker.judge(earliest, pods, now=10) is Verdict.VICTIM  # ten seconds: stuck


def test_judge_the_earlier_unready_start_loses_to_a_ready_later_one() -> None:
    tracker, first, second = tracked_pair()
    pods = pods_of(a=container(first.key, ready=False), b=container(second.key, ready=True))
    assert tracker.judge(tracker.suspects[first.ident], pods, now=5) is Verdict.VICTIM
    assert tracker.judge(tracker.suspects[second.ident], pods, now=5) is Verdict.ENROLLED


def test_judge_both_ready_under_one_certain_token_means_readiness_lies() -> None:
    tracker, first, second = tracked_pair()
    pods = pods_of(a=container(first.key, ready=True), b=container(second.key, ready=True))
    later = tracker.suspects[second.ident]
    assert tracker.judge(later, pods, now=1) is Verdict.WAIT
    assert tracker.judge(later, pods, now=5) is Verdict.VICTIM
    assert "readiness probe" in later.reason


def test_judge_restarted_and_gone() -> None:
    tracker, first, second = tracked_pair()
    restarted = container("cid-b-2", ready=False)
    pods = pods_of(a=container(first.key, ready=True), b=restarted)
    assert tracker.judge(tracker.suspects[second.ident], pods, now=0) is Verdict.RESTARTED
    assert tracker.judge(tracker.suspects[first.ident], {}, now=0) is Verdict.GONE


# --- pod status parsing ----------------------------------------------------------------


def pod_doc(
    uid: str,
    *,
    name: str | None = None,
    node: str = "node-1",
    restarts: int = 0,
    running: tuple[str, datetime] | None = None,
    waiting: bool = False,
    last: tuple[str, datetime] | None = None,
    ready: bool = False,
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    if running:
        state["running"] = {"startedAt": format_timestamp(running[1])}
    elif waiting:
        state["waiting"] = {"reason": "CrashLoopBackOff"}
    status: dict[str, Any] = {
        "name": "agent",
        "restartCount": restarts,
        "ready": ready,
        "state": state,
        "lastState": {},
    }
    if running:
        status["containerID"] = running[0]
    if last:
        status["lastState"] = {
            "terminated": {"containerID": last[0], "startedAt": format_timestamp(last[1])}
        }
    return {
        "metadata": {"uid": uid, "name": name or f"pod-{uid}", "labels": {"app": "x"}},
        "spec": {"nodeName": node},
        "status": {
            "containerStatuses": [status],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_container_instances_and_readiness() -> None:
    pod = pod_doc("u", restarts=2, running=("c3", at(30)), last=("c2", at(20)), ready=True)
    (view,) = container_instances(pod)
    assert [(i.key, i.current, i.running) for i in view.instances] == [
        ("c2", False, False),
        ("c3", True, True),
    ]
    assert view.current_key == "c3"
    assert view.ready
    assert pod_is_ready(pod)
    assert container_instances(pod, container="sidecar") == []
    crashed = pod_doc("u", restarts=2, waiting=True, last=("c3", at(30)), ready=True)
    (view,) = container_instances(crashed)
    assert view.current_key is None
    assert not view.ready  # ready only while running
    no_id = pod_doc("u", running=("", at(40)))
    assert container_instances(no_id)[0].instances[0].key == f"@{format_timestamp(at(40))}"
    terminating = pod_doc("u", running=("c1", at(1)), ready=True)
    terminating["metadata"]["deletionTimestamp"] = format_timestamp(at(2))
    assert not pod_is_ready(terminating)


def offline_controller(**overrides: Any) -> Controller:
    """A controller that never talks to a cluster (for the pure parts of its loops)."""
    api: Any = object()
    return Controller(
        api_client=api,
        namespace="agents",
        selector="app=x",
        rotator=lambda: pytest.fail("no rotation expected"),  # type: ignore[arg-type,return-value]
        target=SecretTarget(api_client=api, namespace="agents"),
        clock=lambda: at(1000),
        **overrides,
    )


def test_every_new_container_instance_is_a_start_and_missed_restarts_count() -> None:
    controller = offline_controller()
    controller._apply_pod("ADDED", pod_doc("u1", running=("c1", at(900))))
    assert [(s.key, s.historical) for s in controller._new_starts] == [("c1", False)]
    controller._apply_pod("MODIFIED", pod_doc("u1", running=("c1", at(900)), ready=True))
    assert len(controller._new_starts) == 1  # the same instance: nothing new
    # Three restarts later; the status only shows the last two instances.
    controller._apply_pod(
        "MODIFIED", pod_doc("u1", restarts=3, running=("c4", at(960)), last=("c3", at(950)))
    )
    keys = [s.key for s in controller._new_starts]
    assert keys[1:] == ["unseen-3-0", "c3", "c4"]
    view = controller._pods["u1"].containers["agent"]
    assert (view.latest_key, view.current_key, view.ready) == ("c4", "c4", False)
    # Crash-looping: waiting, the last instance in lastState: nothing new.
    controller._apply_pod("MODIFIED", pod_doc("u1", restarts=3, waiting=True, last=("c4", at(960))))
    assert len(controller._new_starts) == 4
    assert (view.latest_key, view.current_key) == ("c4", None)
    controller._apply_pod("DELETED", pod_doc("u1"))
    assert "u1" not in controller._pods


def test_a_relist_marks_starts_historical_and_forgets_vanished_pods() -> None:
    controller = offline_controller()
    controller._apply_pod("ADDED", pod_doc("gone", running=("c0", at(1))))
    controller._apply_list([pod_doc("old", running=("c1", at(5)))], historical=True)
    assert set(controller._pods) == {"old"}
    assert [(s.pod_uid, s.historical) for s in controller._new_starts][-1] == ("old", True)


class ScriptedPods:
    """Stands in for PodApi: a list, then a watch that answers 410 Gone, then a quiet one."""

    def __init__(self, term: ctl._Term) -> None:
        self.term = term
        self.lists = 0
        self.watches: list[str | None] = []

    def list(self, *, selector: str) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return [pod_doc(f"p{self.lists}", running=(f"c{self.lists}", at(1)))], f"v{self.lists}"

    def watch(
        self, *, selector: str, resource_version: str | None, timeout_seconds: int
    ) -> Iterator[dict[str, Any]]:
        self.watches.append(resource_version)
        if len(self.watches) == 1:
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "v1b"}}}
            # What kube-apiserver's watch cache sends for a resourceVersion it no longer has.
            yield {
                "type": "ERROR",
                "object": {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Failure",
                    "message": "too old resource version: 1 (230)",
                    "reason": "Expired",
                    "code": 410,
                },
            }
        else:
            self.term.stop.set()

    def abort_watch(self) -> None:
        pass


def test_the_watcher_relists_after_410_gone() -> None:
    # Scripted, not the real server: its watch cache answers 410 only for a resourceVersion
    # older than its window, which starts at the (fresh) etcd's first revision and grows while
    # events are under 75 s old, so a test cannot make it expire one on demand.
    controller = offline_controller()
    term = ctl._Term(started=at(0))
    scripted = ScriptedPods(term)
    controller._pods_api = scripted  # type: ignore[assignment]
    controller._watch_loop(term)
    assert scripted.lists == 2
    assert scripted.watches == ["v1", "v2"]
    assert term.synced.is_set()
    assert set(controller._pods) == {"p2"}  # p1 vanished between the lists


# --- the rate limit and the settings ---------------------------------------------------


def test_token_bucket_bursts_then_paces() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=6, per=60, capacity=2, monotonic=lambda: now[0])
    assert bucket.try_take()
    assert bucket.try_take()
    assert not bucket.try_take()
    assert bucket.wait_time() == pytest.approx(10)
    now[0] = 9.9
    assert not bucket.try_take()
    now[0] = 10.0
    assert bucket.try_take()
    now[0] = 1000.0
    assert bucket.available == 2  # refills up to the burst, no further
    with pytest.raises(ConfigError):
        TokenBucket(rate=0)


@pytest.mark.parametrize(
    ("overrides", "complaint"),
    [
        ({"selector": " "}, "label selector"),
        ({"expiry_margin": 1.0}, "expiry margin"),
        ({"collision_grace": 0}, "must be positive"),
        ({"lease_duration": 1}, "lease duration"),
    ],
)
def test_controller_settings_are_checked(overrides: dict[str, Any], complaint: str) -> None:
    api: Any = object()
    settings: dict[str, Any] = {
        "api_client": api,
        "namespace": "agents",
        "selector": "app=x",
        "rotator": lambda: None,
        "target": SecretTarget(api_client=api, namespace="agents"),
    }
    settings.update(overrides)
    with pytest.raises(ConfigError, match=complaint):
        Controller(**settings)


# --- metrics ---------------------------------------------------------------------------


def samples(text: str) -> dict[str, float]:
    """``{'name{label="value"}': value}`` of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def test_metrics_exposition_format() -> None:
    """prometheus_client's text format, in registration order, no ``*_created`` series."""
    registry = Registry()
    rotations = registry.register(
        Counter("x_rotations_total", "Rotations.", ["result"], initial=[{"result": "failed"}])
    )
    registry.register(Gauge("x_ttl_seconds", 'TTL "left"\nnow.', collect=lambda: 12.5))
    registry.register(Gauge("x_unknown", "Nothing yet.", collect=lambda: None))
    latency = registry.register(Histogram("x_latency_seconds", "Latency.", buckets=(0.1, 1)))
    rotations.inc(result="minted")
    rotations.inc(2, result="minted")
    for value in (0.05, 0.5, 5):
        latency.observe(value)
    text = registry.render()
    assert text.splitlines() == [
        "# HELP x_rotations_total Rotations.",
        "# TYPE x_rotations_total counter",
        'x_rotations_total{result="failed"} 0.0',
        'x_rotations_total{result="minted"} 3.0',
        '# HELP x_ttl_seconds TTL "left"\\nnow.',
        "# TYPE x_ttl_seconds gauge",
        "x_ttl_seconds 12.5",
        "# HELP x_unknown Nothing yet.",
        "# TYPE x_unknown gauge",
        "# HELP x_latency_seconds Latency.",
        "# TYPE x_latency_seconds histogram",
        'x_latency_seconds_bucket{le="0.1"} 1.0',
        'x_latency_seconds_bucket{le="1.0"} 2.0',
        'x_latency_seconds_bucket{le="+Inf"} 3.0',
        "x_latency_seconds_count 3.0",
        "x_latency_seconds_sum 5.55",
    ]
    assert rotations.value(result="minted") == 3
    assert rotations.value(result="other") == 0
    assert (latency.count, latency.sum) == (3, 5.55)
    with pytest.raises(ValueError, match="takes labels"):
        rotations.inc(kind="x")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Counter("x_rotations_total", "again"))


def test_each_registry_is_its_own() -> None:
    """Two controllers in one process (tests) count apart: a CollectorRegistry each, and
    nothing in prometheus_client's global one."""
    from prometheus_client import REGISTRY

    first, second = Registry(), Registry()
    a = first.register(Counter("x_same_total", "Same name."))
    b = second.register(Counter("x_same_total", "Same name."))
    a.inc()
    assert (a.value(), b.value()) == (1, 0)
    assert REGISTRY.get_sample_value("x_same_total") is None
    # OpenMetrics for a scraper that asks for it (Prometheus does).
    body, kind = first.exposition("application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text")
    assert body.decode().endswith("# EOF\n")


def get(url: str, path: str) -> tuple[int, str, str]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read().decode()
    finally:
        connection.close()


def test_metrics_server_serves_metrics_and_health() -> None:
    registry = Registry()
    registry.register(Counter("x_total", "X."))
    healthy = [True]
    server = MetricsServer(
        registry=registry,
        liveness=lambda: (healthy[0], {"why": "test"}),
        readiness=lambda: (False, {}),
        host="127.0.0.1",
        port=0,
    ).start()
    try:
        status, kind, body = get(server.url, "/metrics")
        assert (status, kind.split(";")[0]) == (200, "text/plain")
        assert "x_total 0" in body
        assert get(server.url, "/healthz")[0] == 200
        assert json.loads(get(server.url, "/healthz")[2]) == {"ok": True, "why": "test"}
        healthy[0] = False
        assert get(server.url, "/healthz")[0] == 503
        assert get(server.url, "/readyz")[0] == 503
        assert get(server.url, "/nope")[0] == 404
    finally:
        server.stop()


# --- the controller against KubeSim and the sandbox ------------------------------------


class FakeClock:
    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += timedelta(seconds=seconds)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


def lease_holder(k8s: Cluster, namespace: str) -> str | None:
    lease = k8s.get(
        "coordination.k8s.io/v1/leases", namespace, controller_lease_name("linuxguard-enroll")
    )
    return None if lease is None else lease["spec"].get("holderIdentity")


def test_leader_election_one_leads_and_the_other_takes_over_after_expiry(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    clock = FakeClock(datetime.now(UTC))
    settings: dict[str, Any] = {
        "clock": clock,
        "lease_duration": 10,
        "lease_renew_period": 0.05,
        "lease_retry_period": 0.05,
        "metrics_port": None,
        "events": False,
    }
    replica_a = make_controller(
        k8s,
        k8s_namespace,
        sandbox,
        identity="replica-a",
        rotator=make_rotator(k8s, k8s_namespace, sandbox, clock=clock),
        **settings,
    )
    replica_b = make_controller(
        k8s,
        k8s_namespace,
        sandbox,
        identity="replica-b",
        rotator=make_rotator(k8s, k8s_namespace, sandbox, clock=clock),
        **settings,
    )
    assert controller_lease_name("linuxguard-enroll") == "lg-rotate-controller-linuxguard-enroll"
    a = running(replica_a)
    wait_for(lambda: replica_a.is_leader, timeout=10, what="replica a to lead")
    assert is_running(
        api_client=k8s.api_client(),
        namespace=k8s_namespace,
        secret_name="linuxguard-enroll",
        clock=clock,
    )
    b = running(replica_b)
    wait_for(lambda: replica_b.election_attempts >= 5, timeout=10, what="replica b to try")
    assert not replica_b.is_leader
    assert lease_holder(k8s, k8s_namespace) == "replica-a"

    # Replica a dies without releasing the Lease: b waits until it expires (fake clock).
    replica_a._release_on_stop = False
    a.stop()
    assert lease_holder(k8s, k8s_namespace) == "replica-a"
    attempts = replica_b.election_attempts
    wait_for(lambda: replica_b.election_attempts >= attempts + 5, timeout=10, what="b to retry")
    assert not replica_b.is_leader
    clock.advance(11)
    wait_for(lambda: replica_b.is_leader, timeout=10, what="replica b to take over")
    assert lease_holder(k8s, k8s_namespace) == "replica-b"
    wait_for(lambda: replica_b.status().synced, timeout=10, what="b to sync")

    # A graceful stop releases the Lease: a new replica leads at once, clock unchanged.
    replica_c = make_controller(
        k8s,
        k8s_namespace,
        sandbox,
        identity="replica-c",
        rotator=make_rotator(k8s, k8s_namespace, sandbox, clock=clock),
        **settings,
    )
    running(replica_c)
    wait_for(lambda: replica_c.election_attempts >= 3, timeout=10, what="c to try")
    assert not replica_c.is_leader
    b.stop()
    assert not replica_b.is_leader
    wait_for(lambda: replica_c.is_leader, timeout=10, what="replica c to take over")
    assert lease_holder(k8s, k8s_namespace) == "replica-c"


def test_controller_endpoints_events_and_graceful_shutdown(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    controller = make_controller(k8s, k8s_namespace, sandbox)
    runner = running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    url = controller.metrics_url
    assert url is not None

    status, _, body = get(url, "/healthz")
    assert status == 200
    assert json.loads(body)["leader"] is True
    status, _, body = get(url, "/readyz")
    assert status == 200
    assert json.loads(body)["status"]["synced"] is True
    status, _, metrics = get(url, "/metrics")
    assert status == 200
    values = samples(metrics)
    assert values['lg_rotate_rotations_total{result="minted"}'] == 1
    assert values["lg_rotate_controller_leader"] == 1
    assert values["lg_rotate_mint_latency_seconds_count"] == 1
    assert 500 < values["lg_rotate_token_ttl_seconds"] <= 600

    # Events on the Secret, with fingerprints and never the token.
    secret = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
    assert secret is not None
    token = base64.b64decode(secret["data"]["token"]).decode()

    def events() -> list[dict[str, Any]]:
        items = client.CoreV1Api(k8s.api_client()).list_namespaced_event(
            k8s_namespace, _preload_content=False
        )
        return json.loads(items.data)["items"]

    wait_for(
        lambda: {"LeaderElected", "Rotated"} <= {e["reason"] for e in events()},
        timeout=10,
        what="events",
    )
    for event in events():
        assert event["involvedObject"]["name"] == "linuxguard-enroll"
        assert event["source"]["component"] == "lg-rotate"
        assert token not in json.dumps(event)
    rotated = next(e for e in events() if e["reason"] == "Rotated")
    assert rotated["involvedObject"]["uid"] == secret["metadata"]["uid"]
    fingerprint = secret["metadata"]["annotations"]["linuxguard.io/token-sha256"]
    assert f"sha256:{fingerprint[:12]}" in rotated["message"]
    assert "the Secret does not exist" in rotated["message"]
    # Found the way kubectl finds an object's Events: field selectors on involvedObject.
    by_uid = k8s.list_objects(
        "v1/events", k8s_namespace, field_selector=f"involvedObject.uid={secret['metadata']['uid']}"
    )
    assert "Rotated" in {e["reason"] for e in by_uid}
    shown = k8s.kubectl("events", "-n", k8s_namespace, "--for", "secret/linuxguard-enroll").stdout
    assert "Rotated" in shown
    assert f"sha256:{fingerprint[:12]}" in shown
    assert token not in shown

    runner.stop()
    assert lease_holder(k8s, k8s_namespace) is None  # released for the next replica
    assert not is_running(
        api_client=k8s.api_client(), namespace=k8s_namespace, secret_name="linuxguard-enroll"
    )
    with pytest.raises(ConnectionRefusedError):
        get(url, "/healthz")


def test_controller_rotates_before_the_token_expires(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lg_rotate.kube")
    controller = make_controller(k8s, k8s_namespace, sandbox, metrics_port=None, events=False)
    running(controller)
    wait_for(
        lambda: controller.status().rotations == 1 and controller.status().idle,
        timeout=15,
        what="the first rotation",
    )
    first = controller.status().fingerprint
    sandbox.advance_clock(470)  # 130 s left of 600: more than the 20% margin
    cycles = controller.worker_cycles
    wait_for(lambda: controller.worker_cycles >= cycles + 5, timeout=10, what="worker cycles")
    assert controller.status().fingerprint == first  # not yet
    sandbox.advance_clock(20)  # 110 s left
    wait_for(
        lambda: controller.status().fingerprint != first, timeout=10, what="an expiry rotation"
    )
    status = controller.status()
    assert status.rotations == 2
    assert status.expires_at is not None
    assert (status.expires_at - sandbox.now()).total_seconds() > 590
    # The second rotation patched the existing Secret with the resourceVersion it read (the
    # API server refuses it with 409 if anyone changed the Secret in between).
    patched = [r.getMessage() for r in caplog.records if "patched Secret" in r.getMessage()]
    assert len(patched) == 1
    assert "(resourceVersion " in patched[0]
    assert "None ->" not in patched[0]
    assert "without a conflict check" not in caplog.text


def test_rotation_failures_are_counted_and_retried(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    sandbox.inject_fault(status=503, count=40, path=MINT_PATH)  # LinuxGuard is down a while
    controller = make_controller(k8s, k8s_namespace, sandbox, max_backoff=0.2)
    running(controller)
    wait_for(lambda: controller.status().failures >= 2, timeout=20, what="failed rotations")
    assert controller.status().fingerprint is None
    sandbox.clear_faults()
    wait_for(
        lambda: controller.status().rotations == 1, timeout=20, what="a rotation after recovery"
    )
    assert controller.status().idle
    url = controller.metrics_url
    assert url is not None
    metrics = get(url, "/metrics")[2]
    failures = controller.status().failures
    assert samples(metrics)["lg_rotate_rotation_failures_total"] == failures
    assert samples(metrics)['lg_rotate_rotations_total{result="failed"}'] == failures
    assert get(url, "/healthz")[0] == 200


def create_agent_pod(
    k8s: Cluster,
    namespace: str,
    name: str,
    started: datetime,
    *,
    labels: dict[str, str] | None = None,
    node: str = "node-1",
) -> None:
    """A pod whose agent container started at ``started`` and is Ready, as a kubelet
    reports it: the pod is created, then its status goes through the status subresource
    (the API server drops a ``status`` sent with the create). ``node`` must be a Node."""
    core = client.CoreV1Api(k8s.api_client())
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": "linuxguard-agent"}},
        "spec": {"nodeName": node, "containers": [{"name": "agent", "image": "agent"}]},
    }
    created = json.loads(core.create_namespaced_pod(namespace, body, _preload_content=False).data)
    assert "containerStatuses" not in created["status"]
    status = pod_doc("ignored", running=(f"fake://{name}", started), ready=True)["status"]
    status["phase"] = "Running"
    status["containerStatuses"][0].update(image="agent", imageID="", started=True)
    core.patch_namespaced_pod_status(
        name,
        namespace,
        {"status": status},
        _content_type="application/merge-patch+json",
        _preload_content=False,
    )


@pytest.mark.parametrize(("started_offset", "rotates"), [(-30, False), (+5, True)])
def test_at_startup_a_token_read_by_a_running_pod_is_replaced(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
    started_offset: int,
    rotates: bool,
) -> None:
    def a_minute_ago() -> datetime:
        return sandbox.now() - timedelta(minutes=1)

    rotator = make_rotator(k8s, k8s_namespace, sandbox, clock=a_minute_ago)
    delivered = rotator.rotate()  # a minute ago
    rotator.clock = sandbox.now
    target = rotator.target
    assert isinstance(target, SecretTarget)
    state = target.read_state()
    assert state is not None
    assert state.rotated_at is not None
    # A pod that started before the token was delivered read an older one; one that
    # started after it consumed it.
    k8s.create_nodes(["node-1"])
    create_agent_pod(
        k8s, k8s_namespace, "agent-1", state.rotated_at + timedelta(seconds=started_offset)
    )
    controller = make_controller(k8s, k8s_namespace, sandbox, rotator=rotator, metrics_port=None)
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().pods == 1,
        timeout=15,
        what="the controller to settle",
    )
    status = controller.status()
    assert status.rotations == (1 if rotates else 0)
    assert (status.fingerprint != delivered.fingerprint) is rotates
    assert controller.metrics.starts.value() == 0  # a pod seen at startup is not a new start


def test_signal_handlers_set_the_stop_event() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = threading.Event()
    restore = install_signal_handlers(stop)
    try:
        signal.raise_signal(signal.SIGTERM)
        assert stop.is_set()
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_is_running_without_a_lease(k8s: Cluster, k8s_namespace: str) -> None:
    assert not is_running(
        api_client=k8s.api_client(), namespace=k8s_namespace, secret_name="linuxguard-enroll"
    )
    # An expired holder is not running either.
    lease = LeaseLock(
        api_client=k8s.api_client(),
        namespace=k8s_namespace,
        secret_name="controller-linuxguard-enroll",
        duration=5,
        renew=False,
        clock=lambda: datetime.now(UTC) - timedelta(minutes=5),
    )
    assert lease.try_acquire() is None
    assert not is_running(
        api_client=k8s.api_client(), namespace=k8s_namespace, secret_name="linuxguard-enroll"
    )


def test_a_leader_that_cannot_renew_its_lease_steps_down(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    controller = make_controller(
        k8s,
        k8s_namespace,
        sandbox,
        lease_duration=2,
        lease_renew_period=0.05,
        lease_retry_period=0.05,
        metrics_port=None,
        events=False,
    )
    running(controller)
    wait_for(lambda: controller.status().rotations == 1, timeout=15, what="the first rotation")

    def api_unreachable() -> None:
        raise KubernetesError("cannot reach the Kubernetes API (test)")

    controller._lease.renew = api_unreachable  # type: ignore[method-assign]
    controller._lease.try_acquire = api_unreachable  # type: ignore[method-assign,assignment]
    lost_at = time.monotonic()
    wait_for(lambda: not controller.is_leader, timeout=10, what="the leader to step down")
    assert time.monotonic() - lost_at >= 1.5  # it kept leading while its Lease was valid
    assert controller.metrics.leader.value() == 0
    assert controller.status().running


def test_a_metrics_port_in_use_is_a_configuration_error(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer
) -> None:
    taken = MetricsServer(
        registry=Registry(),
        liveness=lambda: (True, {}),
        readiness=lambda: (True, {}),
        host="127.0.0.1",
        port=0,
    ).start()
    try:
        controller = make_controller(k8s, k8s_namespace, sandbox, metrics_port=taken.port)
        with pytest.raises(ConfigError, match="cannot serve metrics") as failure:
            controller.run(stop=threading.Event())
        assert "--metrics-bind-address" in (failure.value.fix or "")
        assert not controller.status().running
    finally:
        taken.stop()


def test_two_replicas_started_together_elect_exactly_one_leader(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    # Both find no Lease and create it at once: the API server lets one create win (409 for
    # the other, which re-reads and stands by).
    settings: dict[str, Any] = {
        "lease_duration": 10,
        "lease_renew_period": 0.05,
        "lease_retry_period": 0.02,
        "metrics_port": None,
        "events": False,
    }
    replicas = [
        make_controller(k8s, k8s_namespace, sandbox, identity=f"replica-{n}", **settings)
        for n in "ab"
    ]
    for replica in replicas:
        running(replica)
    wait_for(lambda: any(r.is_leader for r in replicas), timeout=10, what="a leader")
    (leader,) = [r for r in replicas if r.is_leader]
    (standby,) = [r for r in replicas if r is not leader]
    attempts = standby.election_attempts

    def standby_kept_standing_by() -> bool:
        assert not standby.is_leader
        assert leader.is_leader
        return standby.election_attempts >= attempts + 20

    wait_for(standby_kept_standing_by, timeout=10, what="the standby to retry 20 times")
    assert lease_holder(k8s, k8s_namespace) == leader.identity
    wait_for(lambda: leader.status().rotations == 1, timeout=15, what="the leader's rotation")
    assert standby.status().rotations == 0
    assert not standby.status().synced


def controller_for(
    k8s: Cluster, namespace: str, sandbox: SandboxServer, *, selector: str
) -> Controller:
    """make_controller's settings, with another label selector."""
    rotator = make_rotator(k8s, namespace, sandbox)
    return Controller(
        api_client=k8s.api_client(),
        namespace=namespace,
        selector=selector,
        rotator=rotator,
        target=rotator.target,  # type: ignore[arg-type]
        collision_grace=1.0,
        lease_retry_period=0.2,
        tick=0.1,
        max_backoff=1.0,
        clock=sandbox.now,
        events=False,
    )


def test_the_controller_sees_only_the_pods_its_label_selector_selects(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    k8s.create_nodes(["node-1"])
    canary = {"app": "linuxguard-agent", "track": "canary"}
    create_agent_pod(k8s, k8s_namespace, "listed-canary", sandbox.now(), labels=canary)
    controller = controller_for(
        k8s, k8s_namespace, sandbox, selector="app=linuxguard-agent,track!=canary"
    )
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    assert controller.status().pods == 0  # the list was filtered by the API server

    create_agent_pod(k8s, k8s_namespace, "watched-canary", sandbox.now(), labels=canary)
    other_app = {"app": "linuxguard-agent-v2"}
    create_agent_pod(k8s, k8s_namespace, "other-app", sandbox.now(), labels=other_app)
    stable = {"app": "linuxguard-agent", "track": "stable"}
    create_agent_pod(k8s, k8s_namespace, "agent", sandbox.now(), labels=stable)  # last
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 2,
        timeout=15,
        what="the rotation after the selected pod's start",
    )
    assert controller.status().pods == 1  # the watch was filtered too
    assert [pod.name for pod in controller._pods.values()] == ["agent"]
    assert controller.metrics.starts.value() == 1


def test_the_watch_is_renewed_from_its_last_resource_version_without_relisting(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    # resync_seconds=1: the API server ends every watch after a second (timeoutSeconds).
    controller = make_controller(
        k8s, k8s_namespace, sandbox, resync_seconds=1, metrics_port=None, events=False
    )
    pods_api = controller._pods_api
    listed: list[str | None] = []
    watched: list[str | None] = []
    original_list, original_watch = pods_api.list, pods_api.watch

    def spy_list(**kwargs: Any) -> tuple[list[dict[str, Any]], str | None]:
        items, version = original_list(**kwargs)
        listed.append(version)
        return items, version

    def spy_watch(**kwargs: Any) -> Iterator[dict[str, Any]]:
        watched.append(kwargs["resource_version"])
        yield from original_watch(**kwargs)

    pods_api.list = spy_list  # type: ignore[method-assign]
    pods_api.watch = spy_watch  # type: ignore[method-assign]
    k8s.create_nodes(["node-1"])
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    create_agent_pod(k8s, k8s_namespace, "agent-1", sandbox.now())
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 2,
        timeout=15,
        what="the rotation after agent-1 started",
    )
    renewed = len(watched)
    wait_for(lambda: len(watched) >= renewed + 2, timeout=15, what="two watch renewals")
    create_agent_pod(k8s, k8s_namespace, "agent-2", sandbox.now())
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 3,
        timeout=15,
        what="the rotation after agent-2 started",
    )
    assert len(listed) == 1  # never relisted: every watch went on from where the last one ended
    assert listed[0] is not None
    assert watched[0] == listed[0]
    assert None not in watched
    assert controller.status().pods == 2
    assert controller.metrics.starts.value() == 2  # a renewed watch replays no start


def test_a_broken_watch_connection_means_list_again(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    # The connection is cut on the client's side (the real server cannot be told to drop
    # it); what follows is against the real server: a relist, and nothing missed meanwhile.
    controller = make_controller(
        k8s, k8s_namespace, sandbox, resync_seconds=300, metrics_port=None, events=False
    )
    pods_api = controller._pods_api
    listed: list[str | None] = []
    original_list = pods_api.list

    def spy_list(**kwargs: Any) -> tuple[list[dict[str, Any]], str | None]:
        items, version = original_list(**kwargs)
        listed.append(version)
        return items, version

    pods_api.list = spy_list  # type: ignore[method-assign]
    k8s.create_nodes(["node-1"])
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    wait_for(lambda: pods_api._response is not None, timeout=10, what="the watch to be open")
    pods_api.abort_watch()
    create_agent_pod(k8s, k8s_namespace, "agent-1", sandbox.now())  # while it reconnects
    wait_for(lambda: len(listed) == 2, timeout=15, what="a relist")
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 2,
        timeout=15,
        what="the rotation after agent-1 started",
    )
    assert controller.status().pods == 1
    assert controller.metrics.starts.value() == 1  # a start, not a pod found at startup
    assert listed[1] != listed[0]


def secret_events(k8s: Cluster, namespace: str, reason: str) -> list[dict[str, Any]]:
    return [
        event
        for event in k8s.list_objects("v1/events", namespace)
        if event["reason"] == reason and event["involvedObject"]["name"] == "linuxguard-enroll"
    ]


def test_events_name_the_secret_by_its_uid_also_after_it_was_recreated(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    controller = make_controller(k8s, k8s_namespace, sandbox, metrics_port=None)
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    first = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
    assert first is not None
    wait_for(
        lambda: secret_events(k8s, k8s_namespace, "Rotated"), timeout=10, what="a Rotated Event"
    )
    (event,) = secret_events(k8s, k8s_namespace, "Rotated")
    assert event["involvedObject"]["uid"] == first["metadata"]["uid"]

    # Someone deletes the Secret; the next agent start finds it missing: it is recreated,
    # a new object with a new uid, and its Events must name that one.
    k8s.delete("v1/secrets", k8s_namespace, "linuxguard-enroll")
    k8s.create_nodes(["node-1"])
    create_agent_pod(k8s, k8s_namespace, "agent-1", sandbox.now())
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 2,
        timeout=15,
        what="the Secret to be recreated",
    )
    second = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
    assert second is not None
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    fingerprint = second["metadata"]["annotations"]["linuxguard.io/token-sha256"][:12]

    def rotated_again() -> list[dict[str, Any]]:
        return [
            e
            for e in secret_events(k8s, k8s_namespace, "Rotated")
            if f"sha256:{fingerprint}" in e["message"]
        ]

    (event,) = wait_for_value(rotated_again, timeout=10, what="the Rotated Event of the new Secret")
    assert event["involvedObject"]["uid"] == second["metadata"]["uid"]


def wait_for_value(probe: Callable[[], T], *, timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout:g}s waiting for {what}")


AGENT_DAEMONSET = Path(__file__).parent.parent / "cronjob" / "agent" / "daemonset.yaml"


def test_every_pod_of_the_agent_daemonset_gets_a_fresh_token(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[[Controller], Running],
) -> None:
    # The shipped DaemonSet; the real DaemonSet controller makes one pod per Node, the fake
    # kubelets start them (each reads the Secret at its start) and enrol their agents.
    nodes = ["node-a", "node-b", "node-c", "node-d"]
    controller = make_controller(k8s, k8s_namespace, sandbox, metrics_port=None)
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        timeout=15,
        what="the first rotation",
    )
    # Restarts back off 0.3 s, under the 1 s collision grace (a kubelet's 10 s under the
    # default 20 s), so a refused agent is recovered by its own restart.
    with FakeKubelet(k8s, k8s_namespace, sandbox=sandbox, restart_backoff=0.3) as kubelet:
        kubelet.hold(nodes)
        k8s.create_nodes(nodes)
        k8s.apply(yaml.safe_load(AGENT_DAEMONSET.read_text()), k8s_namespace)
        # Nodes coming up one by one: each start is followed by a rotation before the next.
        for rotations, node in enumerate(nodes[:2], start=2):
            kubelet.release([node])
            kubelet.wait(lambda node=node: kubelet.settled([node]), timeout=30, what=node)
            wait_for(
                lambda rotations=rotations: (
                    controller.status().idle and controller.status().rotations == rotations
                ),
                timeout=15,
                what=f"the rotation after the start on {node}",
            )
        assert [a.results for a in kubelet.attempts] == [["enrolled"], ["enrolled"]]
        assert len({a.token_fingerprint for a in kubelet.attempts}) == 2

        # Two Nodes together: their agents may start under one token; whatever happened,
        # the controller recovers every refused one.
        kubelet.release(nodes[2:])

        def settled() -> bool:
            with kubelet.lock:
                started = len(kubelet.attempts)
            return (
                kubelet.settled(nodes)
                and controller.status().idle
                and controller.metrics.starts.value() == started
            )

        kubelet.wait(settled, timeout=60, what="every agent Ready and the controller idle")

    live = kubelet.live_pods()
    assert set(live) == set(nodes)
    assert all(pod.enrolled for pod in live.values())
    refused = [a for a in kubelet.attempts if "conflict" in a.results]
    assert controller.status().collisions >= len(refused)
    assert controller.status().recoveries >= len(refused)
    enrolled = [r for r in sandbox.enrolments() if r.result == "ok"]
    assert len({r.fingerprint for r in enrolled}) == len(enrolled)  # no token enrolled twice
    state = controller.target.read_state()
    assert state is not None
    assert state.fingerprint not in {a.token_fingerprint for a in kubelet.attempts}
    assert controller.metrics.starts.value() == len(kubelet.attempts)
    daemonset = wait_for_value(
        lambda: (
            (ds := k8s.get("apps/v1/daemonsets", k8s_namespace, "linuxguard-agent"))
            and ds["status"].get("numberReady") == len(nodes)
            and ds
        ),
        timeout=15,
        what="the DaemonSet controller to count the Ready pods",
    )
    assert daemonset["status"]["desiredNumberScheduled"] == len(nodes)
