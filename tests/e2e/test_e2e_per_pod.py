"""Per-pod mode on a real node: the webhook Deployment (2 replicas behind its Service, TLS as
docs/PER-POD.md "Without cert-manager" makes it, failurePolicy Fail) admits agent pods through
the real API server, and ten agents enrol ten out of ten at their first start."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

import docblocks
from fixtures.cluster import wait_for
from realnode import PER_POD, RealNode
from rotator.agent import workload_id_from

pytestmark = pytest.mark.node

NS = "linuxguard"  # the docs' commands name it; the component's default
AGENTS = 10
ENROLL_SECRET = "linuxguard.io/enroll-secret"


@pytest.fixture(scope="module")
def per_pod(real_node: RealNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    patches, script = docblocks.without_cert_manager()
    real_node.namespace(NS)
    real_node.deploy(NS, components=[PER_POD], component_patches=patches)
    real_node.run_script(script, cwd=tmp_path_factory.mktemp("tls"))
    real_node.wait(NS, "--for=condition=available", "deployment/lg-rotate-webhook")
    # No agent before both replicas serve: with failurePolicy Fail the create would be refused.
    real_node.wait(NS, "--for=condition=ready", "pod", "-l", "app.kubernetes.io/component=webhook")
    yield real_node
    real_node.kubectl("delete", "namespace", NS, "--wait=false")
    real_node.kubectl("delete", "mutatingwebhookconfiguration", "lg-rotate-per-pod")


def agent_pods(node: RealNode) -> list[dict[str, Any]]:
    return [p for p in node.pods(NS) if p["metadata"]["name"].startswith("linuxguard-agents-")]


def test_ten_agents_enrol_ten_out_of_ten_first_try(per_pod: RealNode) -> None:
    node = per_pod
    webhooks = node.get("mutatingwebhookconfiguration", "lg-rotate-per-pod")["webhooks"]
    assert [w["failurePolicy"] for w in webhooks] == ["Fail"]
    assert webhooks[0]["clientConfig"]["service"]["namespace"] == NS
    replicas = node.pods(NS, "app.kubernetes.io/component=webhook")
    assert len(replicas) == 2
    node.apply(node.agent_documents(NS, replicas=AGENTS, args=["start"]))

    def all_enrolled() -> list[dict[str, Any]] | None:
        pods = agent_pods(node)
        if len(pods) != AGENTS:
            return None
        for pod in pods:
            if not any(
                line.startswith("enrolled") for _, line in node.logs(NS, pod["metadata"]["name"])
            ):
                return None
        return pods

    pods = wait_for(all_enrolled, timeout=120, what=f"{AGENTS} agents enrolled")
    assert [p["status"]["containerStatuses"][0]["restartCount"] for p in pods] == [0] * AGENTS
    secrets = {p["metadata"]["annotations"][ENROLL_SECRET] for p in pods}
    assert len(secrets) == AGENTS  # a Secret of its own for every pod
    for pod in pods:
        env = pod["spec"]["containers"][0]["env"]
        refs = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in env
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs == {pod["metadata"]["annotations"][ENROLL_SECRET]}
    # What LinuxGuard saw: one enrolment per pod, each first try, each on its own token.
    enrolments = node.sandbox.enrolments()
    seen = {}
    for pod in pods:
        workload = workload_id_from(
            node_name=pod["spec"]["nodeName"], pod_uid=pod["metadata"]["uid"]
        )
        attempts = [e for e in enrolments if e.workload_id == workload]
        assert [e.result for e in attempts] == ["ok"], attempts
        seen[workload] = attempts[0].fingerprint
    assert len(set(seen.values())) == AGENTS


def test_a_restarted_agent_replays_its_own_token(per_pod: RealNode) -> None:
    node = per_pod
    pod = agent_pods(node)[0]
    name = pod["metadata"]["name"]
    _, first = node.wait_for_log(NS, name, "enrolled", timeout=20)
    os.kill(node.process_of_pod(pod["metadata"]["uid"], "rotator.agent start"), signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        current = node.get("pod", "-n", NS, name)
        status = current["status"]["containerStatuses"][0]
        return current if status["restartCount"] >= 1 and "running" in status["state"] else None

    wait_for(restarted, timeout=60, what=f"{name} restarted")
    _, again = node.wait_for_log(NS, name, "enrolled", timeout=30)
    # Same pod, same Secret, same token: the same identity, by replay (no 409).
    assert again.split("identity ")[1].split()[0] == first.split("identity ")[1].split()[0]
    assert again.rsplit(" ", 1)[1] == first.rsplit(" ", 1)[1]
    workload = first.split("workload ")[1].split()[0]
    results = [e.result for e in node.sandbox.enrolments() if e.workload_id == workload]
    assert results == ["ok", "replay"], results
