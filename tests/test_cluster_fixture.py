"""The ``k8s`` fixture is a real control plane: what only a real one does, shown quickly.

Each test proves one thing the emulator cannot: optimistic concurrency, RBAC, garbage
collection, the DaemonSet controller, and the real kubectl talking to it. The last tests run
pytest itself to show the CI rules (no KUBEBUILDER_ASSETS fails in CI; any skip fails in CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fixtures.cluster import Cluster, wait_for

TESTS = Path(__file__).resolve().parent


def test_stale_resource_version_is_a_conflict(k8s: Cluster, k8s_namespace: str) -> None:
    secret = k8s.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"a": "1"}},
        k8s_namespace,
    )
    stale = secret["metadata"]["resourceVersion"]
    k8s.modify("v1/secrets", k8s_namespace, "s", {"stringData": {"a": "2"}})

    with pytest.raises(ApiException) as refused:
        k8s.modify(
            "v1/secrets",
            k8s_namespace,
            "s",
            {"metadata": {"resourceVersion": stale}, "stringData": {"a": "3"}},
        )

    assert refused.value.status == 409
    current = k8s.get("v1/secrets", k8s_namespace, "s")
    assert current is not None
    assert current["data"]["a"] == "Mg=="  # "2": the stale write changed nothing


def test_rbac_refuses_a_serviceaccount_what_its_role_does_not_grant(
    k8s: Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    k8s.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "configmap-reader"},
                "rules": [
                    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "configmap-reader",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "reader", "namespace": k8s_namespace}
                ],
            },
        ],
        k8s_namespace,
    )
    kubeconfig = k8s.serviceaccount_kubeconfig(k8s_namespace, "reader", tmp_path / "reader")

    # The authorizer learns of a new binding through its informers: wait until it is granted.
    wait_for(
        lambda: (
            k8s.kubectl("get", "configmaps", kubeconfig=kubeconfig, check=False).returncode == 0
        ),
        what="the RoleBinding to take effect",
    )
    refused = k8s.kubectl("get", "secrets", kubeconfig=kubeconfig, check=False)

    assert refused.returncode != 0
    assert "forbidden" in refused.stderr
    assert f"system:serviceaccount:{k8s_namespace}:reader" in refused.stderr


def test_garbage_collector_deletes_what_a_deleted_owner_owned(
    k8s: Cluster, k8s_namespace: str
) -> None:
    k8s.require_controllers()
    owner = k8s.apply(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, k8s_namespace
    )
    owned: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                }
            ],
        },
    }
    k8s.apply(owned, k8s_namespace)

    k8s.delete("v1/configmaps", k8s_namespace, "owner")

    wait_for(
        lambda: k8s.get("v1/secrets", k8s_namespace, "owned") is None,
        what="the garbage collector to delete the owned Secret",
    )


def test_daemonset_controller_makes_a_pod_per_node(k8s: Cluster, k8s_namespace: str) -> None:
    k8s.require_controllers()
    nodes = [f"node-{uuid.uuid4().hex[:6]}-{index}" for index in range(3)]
    k8s.create_nodes(nodes)
    labels = {"app": "agent"}
    k8s.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [{"name": "agent", "image": "registry.k8s.io/pause:3.10"}]
                    },
                },
            },
        },
        k8s_namespace,
    )

    def pods_by_node() -> dict[str, str] | None:
        # No scheduler: a DaemonSet pod names its node in a required node-affinity term.
        placed = {}
        for pod in k8s.list_objects("v1/pods", k8s_namespace, label_selector="app=agent"):
            terms = pod["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"]
            placed[terms[0]["matchFields"][0]["values"][0]] = pod["metadata"]["name"]
        return placed if len(placed) == len(nodes) else None

    placed = wait_for(pods_by_node, what="one agent pod per node")

    assert sorted(placed) == sorted(nodes)


def test_kubectl_reaches_the_cluster(k8s: Cluster, k8s_namespace: str) -> None:
    listed = k8s.kubectl("get", "namespaces", "-o", "name")

    assert f"namespace/{k8s_namespace}" in listed.stdout.split()
    assert "namespace/kube-system" in listed.stdout.split()


# --- the CI rules, shown by running pytest on a one-line test file ---


def _pytest(tmp_path: Path, test: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the project's addopts out
    (tmp_path / "test_it.py").write_text(test)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "fixtures.cluster", "-q", "-rs", "test_it.py"],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(TESTS)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _env_without(*names: str) -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key not in names}


@pytest.mark.parametrize(
    ("ci", "exit_status", "says"),
    [
        ("", 0, "needs a real Kubernetes API server: export KUBEBUILDER_ASSETS"),
        ("1", 1, "CI must set KUBEBUILDER_ASSETS"),
    ],
)
def test_without_assets_skips_locally_but_fails_in_ci(
    tmp_path: Path, ci: str, exit_status: int, says: str
) -> None:
    env = _env_without("KUBEBUILDER_ASSETS", "CI")
    if ci:
        env["CI"] = ci

    result = _pytest(tmp_path, "def test_needs_it(k8s):\n    pass\n", env)

    assert result.returncode == exit_status, result.stdout + result.stderr
    assert says in result.stdout


@pytest.mark.parametrize(("ci", "exit_status"), [("", 0), ("1", 1)])
def test_any_skip_fails_the_session_in_ci(tmp_path: Path, ci: str, exit_status: int) -> None:
    env = _env_without("CI")
    if ci:
        env["CI"] = ci
    test = (
        "import pytest\n\n"
        "def test_skips():\n    pytest.skip('not here')\n\n"
        "@pytest.mark.xfail(strict=True)\ndef test_xfails():\n    assert False\n"
    )

    result = _pytest(tmp_path, test, env)

    assert result.returncode == exit_status, result.stdout + result.stderr
    assert ("skipped test(s) fail this run" in result.stdout) == bool(ci)
