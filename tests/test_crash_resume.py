"""Kill the rotator process (SIGKILL) at each step boundary, run it again, check the result.

For every persistent provider (vault on OpenBao, aws on moto, gcp on the gRPC fake) with
the Kubernetes Secret on a real kube-apiserver as target (tests/fixtures/cluster.py): the
store and the Secret end consistent, nothing is delivered twice (the Secret's
resourceVersion, which the real server bumps on every write, is unchanged), no valid token is
lost, and the dead process's Lease expires.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from providers.base import Stage
from rotator.kube.secret import SecretTarget

TENANT = "acme"
CRASHRUN = Path(__file__).parent / "crashrun.py"


@pytest.fixture(params=["vault", "aws", "gcp"])
def store(request):
    name = request.param
    return name, request.getfixturevalue(f"{name}_provider"), request.getfixturevalue(f"{name}_env")


def run(argv, *, env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    return subprocess.run(
        argv, env={**base, **env}, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("step", ["minted", "stored", "delivered"])
def test_sigkill_at_a_step_then_rerun(store, sandbox, k8s, k8s_namespace, tmp_path, step):
    name, provider, store_env = store
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    env = {**store_env, "LINUXGUARD_API_KEY": sandbox.api_key, "KUBECONFIG": str(kubeconfig)}
    args = [
        "--provider", name, "--tenant", TENANT, "--linuxguard-url", sandbox.url,
        "--namespace", k8s_namespace, "--lock-duration", "2", "--lock-wait", "15", "-o", "json",
    ]  # fmt: skip
    target = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)

    killed = run([sys.executable, str(CRASHRUN), step, "rotate", *args], env=env)
    assert killed.returncode == -9, killed.stderr
    secret_before = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")

    rerun = run([sys.executable, "-m", "rotator.cli", "rotate", *args], env=env)
    assert rerun.returncode == 0, rerun.stderr  # the dead holder's lock expired
    report = json.loads(rerun.stdout)

    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert target.read_token().value == current.token.value
    minted = [m.fingerprint for m in sandbox.minted()]
    if step == "minted":  # never stored: that token is unused and a new one is minted
        assert report["action"] == "minted"
        assert len(minted) == 2
    elif step == "stored":  # stored, not delivered: the rerun delivers the same token
        assert report["action"] == "resumed"
        assert minted == [current.fingerprint]
        assert secret_before is None
    else:  # delivered, not promoted: the rerun only promotes, the Secret is not rewritten
        assert report["action"] == "promoted-only"
        assert minted == [current.fingerprint]
        secret_after = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
        assert (
            secret_after["metadata"]["resourceVersion"]
            == secret_before["metadata"]["resourceVersion"]
        )
