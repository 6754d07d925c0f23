"""Webhook certificates kept by lg-rotate itself, on a real node: the shipped per-pod and
webhook-certs components, two webhook replicas as real processes (`lg-rotate webhook
--tls-self-managed`), the kubelet delivering the Secret the keeper wrote into their volumes,
the API server trusting the caBundle the keeper set, and a leader change that admits on."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.cluster import wait_for
from realnode import PER_POD, WEBHOOK_CERTS, RealNode

pytestmark = pytest.mark.node

NS = "e2e-certs"
LEASE = "lg-rotate-webhook-certs"
TLS_SECRET = "lg-rotate-webhook-tls"
WEBHOOK = "app.kubernetes.io/component=webhook"


@pytest.fixture(scope="module")
def self_managed(real_node: RealNode) -> Iterator[tuple[RealNode, float]]:
    real_node.namespace(NS)
    started = time.monotonic()
    real_node.deploy(NS, components=[PER_POD, WEBHOOK_CERTS])
    # Ready only once a replica's mounted files hold the keeper's pair (the kubelet's sync).
    real_node.wait(NS, "--for=condition=available", "deployment/lg-rotate-webhook", timeout=240)
    real_node.wait(NS, "--for=condition=ready", "pod", "-l", WEBHOOK, timeout=240)
    yield real_node, time.monotonic() - started
    real_node.kubectl("delete", "namespace", NS, "--wait=false")
    real_node.kubectl("delete", "mutatingwebhookconfiguration", "lg-rotate-per-pod")


def holder(node: RealNode) -> str:
    return str(node.get("lease", "-n", NS, LEASE)["spec"].get("holderIdentity") or "")


def enrolled_agents(node: RealNode, count: int) -> list[dict[str, Any]] | None:
    pods = [p for p in node.pods(NS) if p["metadata"]["name"].startswith("linuxguard-agents-")]
    if len(pods) != count:
        return None
    for pod in pods:
        lines = node.logs(NS, pod["metadata"]["name"])
        if not any(line.startswith("enrolled") for _, line in lines):
            return None
    return pods


def test_the_webhook_keeps_its_own_certificates_and_admits_agents(
    self_managed: tuple[RealNode, float],
) -> None:
    node, ready_after = self_managed
    print(f"webhook ready {ready_after:.0f} s after kubectl apply")  # the closing note's figure
    secret = node.get("secret", "-n", NS, TLS_SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["data"]["tls.crt"]
    assert secret["data"]["tls.key"]
    assert secret["metadata"]["annotations"]["linuxguard.io/tls-phase"] == "stable"
    configuration = node.get("mutatingwebhookconfiguration", "lg-rotate-per-pod")
    bundle = configuration["webhooks"][0]["clientConfig"]["caBundle"]
    assert base64.b64decode(bundle) == base64.b64decode(secret["data"]["ca.crt"])
    assert "cert-manager.io/inject-ca-from" not in configuration["metadata"].get("annotations", {})
    replicas = [p["metadata"]["name"] for p in node.pods(NS, WEBHOOK)]
    assert len(replicas) == 2
    assert any(holder(node).startswith(name) for name in replicas)  # one writer
    node.apply(node.agent_documents(NS, replicas=4, args=["start"]))
    pods = wait_for(lambda: enrolled_agents(node, 4), timeout=90, what="4 agents enrolled")
    assert [p["status"]["containerStatuses"][0]["restartCount"] for p in pods] == [0] * 4
    assert len({p["metadata"]["annotations"]["linuxguard.io/enroll-secret"] for p in pods}) == 4


def test_a_leader_change_keeps_the_certificates_and_admits_on(
    self_managed: tuple[RealNode, float],
) -> None:
    node, _ = self_managed
    before = node.get("mutatingwebhookconfiguration", "lg-rotate-per-pod")
    leader = holder(node)
    replicas = [p["metadata"]["name"] for p in node.pods(NS, WEBHOOK)]
    assert len(replicas) == 2
    (leading,) = [name for name in replicas if leader.startswith(name)]
    node.kubectl("-n", NS, "delete", "pod", leading, "--wait=false")  # SIGTERM: it releases

    def new_leader() -> str | None:
        current = holder(node)
        return current if current and not current.startswith(leading) else None

    # The standby, or the Deployment's replacement pod, whichever takes the Lease first.
    wait_for(new_leader, timeout=60, what="another replica leading")
    node.kubectl("-n", NS, "scale", "deployment/linuxguard-agents", "--replicas=6")
    wait_for(lambda: enrolled_agents(node, 6), timeout=120, what="6 agents enrolled")
    after = node.get("mutatingwebhookconfiguration", "lg-rotate-per-pod")
    # A new leader continues the old one's certificates: no new CA, nothing to re-trust.
    assert (
        after["webhooks"][0]["clientConfig"]["caBundle"]
        == before["webhooks"][0]["clientConfig"]["caBundle"]
    )
