"""The shipped vault overlay with its CronJob and `watch`, and the example agent DaemonSet, on a
real node: rotation in a pod, enrolment read from `kubectl logs`, watch's probes and leader
election, a container restart, and every surface where a token must never be."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.cluster import wait_for
from realnode import ROOT, TENANT, RealNode, timestamp

pytestmark = pytest.mark.node

NS = "e2e-shared"
TOKEN_ANNOTATION = "linuxguard.io/token-sha256"
CONTROLLER_LEASE = "lg-rotate-controller-linuxguard-enroll"
AGENT_MARKER = "rotator.agent start"


@dataclass
class Deployed:
    node: RealNode
    job_log: str
    agent: dict[str, Any]  # the agent pod once it ran

    def secret_fingerprint(self) -> str:
        secret = self.node.get("secret", "-n", NS, "linuxguard-enroll")
        return str(secret["metadata"]["annotations"][TOKEN_ANNOTATION])


def running_agent(node: RealNode, *, restarts: int = 0) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        pods = node.pods(NS)
        statuses = [p.get("status", {}).get("containerStatuses") or [{}] for p in pods]
        if len(pods) == 1 and "running" in statuses[0][0].get("state", {}):
            return pods[0] if statuses[0][0].get("restartCount", 0) >= restarts else None
        return None

    return wait_for(ready, timeout=60, what=f"the agent pod running (restarts >= {restarts})")


def started_at(pod: dict[str, Any]) -> Any:
    return timestamp(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])


@pytest.fixture(scope="module")
def deployed(real_node: RealNode) -> Iterator[Deployed]:
    real_node.namespace(NS)
    real_node.deploy(NS)
    job_log = real_node.run_job_from_cronjob(NS, "first-rotation")
    real_node.apply(real_node.agent_documents(NS))
    yield Deployed(node=real_node, job_log=job_log, agent=running_agent(real_node))
    real_node.kubectl("delete", "namespace", NS, "--wait=false")


def test_the_cronjobs_pod_rotates_and_the_agent_enrols_within_20_seconds(
    deployed: Deployed,
) -> None:
    node, pod = deployed.node, deployed.agent
    assert "rotated: minted a fresh token for tenant acme" in deployed.job_log
    assert f"k8s:{NS}/linuxguard-enroll" in deployed.job_log
    # The vendor's verification rule: a line containing "enrol" within 20 s of the pod's start.
    when, line = node.wait_for_log(NS, pod["metadata"]["name"], "enrolled", timeout=20)
    assert when - started_at(pod) <= timedelta(seconds=20), (when, line)
    assert f"tenant {TENANT}" in line
    node.wait_for_log(NS, pod["metadata"]["name"], "heartbeat", timeout=20)


def test_watch_is_ready_leads_and_rotates_after_the_agent_started(deployed: Deployed) -> None:
    node, pod = deployed.node, deployed.agent
    node.wait(NS, "--for=condition=available", "deployment/lg-rotate-watch", timeout=60)
    (watch,) = node.pods(NS, "app.kubernetes.io/component=watch")
    conditions = {c["type"]: c["status"] for c in watch["status"]["conditions"]}
    assert conditions["Ready"] == "True"  # through its /readyz probe
    lease = node.get("lease", "-n", NS, CONTROLLER_LEASE)
    assert watch["metadata"]["name"] in lease["spec"]["holderIdentity"]
    _, line = node.wait_for_log(NS, pod["metadata"]["name"], "enrolled", timeout=20)
    consumed = line.rsplit("token ", 1)[1]

    def rotated() -> str | None:
        current = deployed.secret_fingerprint()
        return current if not current.startswith(consumed) else None

    wait_for(rotated, timeout=30, what="watch rotating the Secret after the agent's start")
    log = node.kubectl("-n", NS, "logs", watch["metadata"]["name"])
    assert f"after the start of pod {pod['metadata']['name']}" in log


def test_a_killed_agent_restarts_and_enrols_with_the_next_token(deployed: Deployed) -> None:
    node = deployed.node
    pod = running_agent(node)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    _, first = node.wait_for_log(NS, name, "enrolled", timeout=20)
    before = pod["status"]["containerStatuses"][0]["restartCount"]
    # watch has rotated after the start: the Secret holds the token the restart will read.
    wait_for(
        lambda: (
            True if not deployed.secret_fingerprint().startswith(first.rsplit(" ", 1)[1]) else None
        ),
        timeout=30,
        what="the rotation after the first start",
    )
    os.kill(node.process_of_pod(uid, AGENT_MARKER), signal.SIGKILL)
    restarted = running_agent(node, restarts=before + 1)
    assert restarted["metadata"]["uid"] == uid  # the same pod: a container restart
    # Seen once in CI: no "enrolled" within 30 s of the restart (cause unknown; the failure
    # message now carries the previous container's log and the namespace's events).
    _, again = node.wait_for_log(NS, name, "enrolled", timeout=60)
    assert again != first  # a fresh token, from the Secret as the kubelet re-read it
    assert again.rsplit(" ", 1)[1] != first.rsplit(" ", 1)[1]
    workload = first.split("workload ")[1].split()[0]
    results = [e.result for e in node.sandbox.enrolments() if e.workload_id == workload]
    assert results == ["ok", "ok"], results  # each start on a token nobody else used


def test_no_token_in_the_agents_environ_nor_in_any_object(deployed: Deployed) -> None:
    node = deployed.node
    pod = running_agent(node)
    node.wait_for_log(NS, pod["metadata"]["name"], "enrolled", timeout=20)
    pid = node.process_of_pod(pod["metadata"]["uid"], AGENT_MARKER)
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    entries = dict(e.partition(b"=")[::2] for e in environ.split(b"\0") if b"=" in e)
    assert entries[b"LINUXGUARD_ENROLL_TOKEN"] == b""  # scrubbed to NULs after reading
    assert node.tokens_in(environ.decode(errors="replace")) == []
    (watch,) = node.pods(NS, "app.kubernetes.io/component=watch")
    watch_pid = node.process_of_pod(watch["metadata"]["uid"], "lg-rotate watch")
    watch_environ = Path(f"/proc/{watch_pid}/environ").read_bytes().decode(errors="replace")
    assert node.tokens_in(watch_environ) == []
    # Every object kubectl shows, Secrets without their data, holds no minted token.
    kinds = "all,configmaps,events,leases,serviceaccounts,roles,rolebindings,networkpolicies"
    dump = node.kubectl("get", kinds, "-A", "-o", "yaml")
    secrets = node.get("secrets", "-A")["items"]
    for secret in secrets:
        secret.pop("data", None)
    dump += yaml.safe_dump(secrets)
    assert node.tokens_in(dump) == []
    # ... while the detector does find the one the Secret's data holds.
    data = node.get("secret", "-n", NS, "linuxguard-enroll")["data"]
    assert len(node.tokens_in(base64.b64decode(data["token"]).decode())) == 1


def test_audit_of_the_deployment_passes_and_events_show_rotated(
    deployed: Deployed, tmp_path: Path
) -> None:
    node = deployed.node
    events = node.kubectl("-n", NS, "events", "--for", "secret/linuxguard-enroll")
    assert "Rotated" in events
    # As docs/AUDIT.md runs it: the read-only auditor of cronjob/audit, a short-lived token.
    audit = node.kustomization(
        f"{NS}-audit", {"namespace": NS, "resources": [ROOT / "cronjob" / "audit"]}
    )
    node.kubectl("apply", "-k", str(audit))
    token = node.kubectl("-n", NS, "create", "token", "lg-rotate-audit", "--duration=10m")
    config = yaml.safe_load(node.kubectl("config", "view", "--raw", "-o", "yaml"))
    config["users"] = [{"name": "auditor", "user": {"token": token.strip()}}]
    config["contexts"][0]["context"]["user"] = "auditor"
    kubeconfig = tmp_path / "auditor.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    lg_rotate = Path(sysconfig.get_path("scripts")) / "lg-rotate"
    done = subprocess.run(
        [str(lg_rotate), "audit", "--cluster", "-n", NS, "-o", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["findings"] == []
    assert report["summary"]["complete"] is True  # no list refused to the auditor
    assert report["summary"]["objects"] >= 5  # CronJob, Deployment, DaemonSet, pods, Secret
