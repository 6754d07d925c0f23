"""The failure the vendor page warns about, made real: the shared Secret without `watch`, two
agent pods, the second refused with 409 and put in CrashLoopBackOff by the kubelet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.cluster import wait_for
from realnode import RealNode

pytestmark = pytest.mark.node

NS = "e2e-no-watch"
# No watch to rotate after each start, and no scheduled run that could hand the second pod a
# token of its own by chance: only the one rotation the test makes.
WITHOUT_WATCH = [
    {
        "target": {"kind": "Deployment", "name": "lg-rotate-watch"},
        "patch": '[{"op": "replace", "path": "/spec/replicas", "value": 0}]',
    },
    {
        "target": {"kind": "CronJob", "name": "lg-rotate"},
        "patch": '[{"op": "add", "path": "/spec/suspend", "value": true}]',
    },
]


@pytest.fixture(scope="module")
def two_agents(real_node: RealNode) -> Iterator[RealNode]:
    real_node.namespace(NS)
    real_node.deploy(NS, patches=WITHOUT_WATCH)
    real_node.run_job_from_cronjob(NS, "only-rotation")
    real_node.apply(real_node.agent_documents(NS, replicas=2))
    yield real_node
    real_node.kubectl("delete", "namespace", NS, "--wait=false")


def restarts(pod: dict[str, Any]) -> int:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return int(statuses[0].get("restartCount", 0))


def test_the_second_pod_gets_409_and_crash_loops(two_agents: RealNode) -> None:
    node = two_agents

    def one_refused_twice() -> tuple[dict[str, Any], dict[str, Any]] | None:
        pods = sorted(node.pods(NS), key=restarts)
        return (pods[0], pods[1]) if len(pods) == 2 and restarts(pods[1]) >= 2 else None

    # Back-off 10 s then 20 s: the second restart comes about 15 s after the first start.
    enrolled, refused = wait_for(one_refused_twice, timeout=90, what="a pod restarted twice")
    assert restarts(enrolled) == 0
    node.wait_for_log(NS, enrolled["metadata"]["name"], "enrolled", timeout=10)
    name = refused["metadata"]["name"]
    log = node.logs(NS, name) + node.logs(NS, name, previous=True)
    assert any("enrolment failed: 409 conflict" in line for _, line in log), log
    assert not any(line.startswith("enrolled") for _, line in log)
    # The kubelet's own back-off, as `kubectl events` shows it.
    events = node.kubectl("-n", NS, "events", "--for", f"pod/{name}")
    assert "BackOff" in events
    assert "Back-off restarting failed container" in events
    results = [e.result for e in node.sandbox.enrolments()]
    assert results.count("conflict") >= 2
