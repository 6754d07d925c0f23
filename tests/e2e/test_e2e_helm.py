"""The Helm chart on a real node, with Helm 3 and Helm 4: `helm install --wait` (the pods
become Ready through their probes), a rotation by the CronJob's pod, `helm test` (its hook pod
runs `lg-rotate status --check`), and an uninstall that keeps the token the agents read."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fixtures.helm import HELM_VERSIONS
from realnode import ROOT, TENANT, RealNode

pytestmark = pytest.mark.node

CHART = ROOT / "charts" / "lg-rotate"


@pytest.mark.parametrize("version", HELM_VERSIONS)
def test_helm_install_wait_test_and_uninstall(
    real_node: RealNode, helm_dir: Path, version: str
) -> None:
    node, namespace = real_node, f"e2e-{version}"
    helm = str(helm_dir / version)
    node.namespace(namespace)
    repository, _, tag = node.images["lg-rotate-vault"].rpartition(":")
    values = {
        "provider": "vault",
        "tenant": TENANT,
        "linuxguard.url": node.sandbox.url,
        "vault.address": node.vault_addr,
        "image.repository": repository,
        "image.tag": tag,
        # Cluster-scoped and shared: the kustomize deployments of this suite created them.
        "admissionPolicies.create": "false",
    }
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [helm, *args, "-n", namespace],
            capture_output=True,
            text=True,
            env=node.env(),
            check=False,
            timeout=240,
        )

    installed = run("install", "lg", str(CHART), *sets, "--wait", "--timeout", "3m")
    assert installed.returncode == 0, installed.stderr + "\n" + node.diagnosis(namespace)
    assert f"kubectl -n {namespace} create job --from=cronjob/lg-rotate" in installed.stdout
    log = node.run_job_from_cronjob(namespace, "first")
    assert "rotated: minted a fresh token" in log
    tested = run("test", "lg", "--logs")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "Phase:          Succeeded" in tested.stdout
    assert "in sync: yes" in tested.stdout  # the hook pod's own report, from --logs
    removed = run("uninstall", "lg", "--wait")
    assert removed.returncode == 0, removed.stderr
    secret = node.get("secret", "-n", namespace, "linuxguard-enroll")
    assert secret["data"]["token"]  # kept by helm.sh/resource-policy: keep
    node.kubectl("delete", "namespace", namespace, "--wait=false")
