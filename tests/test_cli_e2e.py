"""``lg-rotate`` end to end, as a subprocess, against real servers.

LinuxGuard sandbox -> OpenBao / moto / the GCP gRPC fake -> a real kube-apiserver
(tests/fixtures/cluster.py). For every provider: a rotation leaves the same valid token in
the store and in the Secret, with the documented annotations; final errors change nothing
(not even the Secret's resourceVersion); nothing printed contains the token; a held Lease is
exit 7; a second rotation patches the Secret under the resourceVersion it read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from providers.base import Stage
from rotator.kube.lease import LeaseLock
from rotator.kube.secret import SecretTarget
from rotator.tokens import TOKEN_SHAPED

TENANT = "acme"
PROVIDERS = ["vault", "aws", "gcp"]


@pytest.fixture(params=PROVIDERS)
def store(request):
    """(name, provider object for reading back, env for the CLI) sharing one location."""
    name = request.param
    return name, request.getfixturevalue(f"{name}_provider"), request.getfixturevalue(f"{name}_env")


@pytest.fixture
def cluster(k8s, k8s_namespace, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    target = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)
    return {"kubeconfig": str(kubeconfig), "namespace": k8s_namespace, "target": target, "k8s": k8s}


def lg(args, *, env):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LG_ROTATE_", "LINUXGUARD_", "VAULT_", "AWS_"))
    }
    base.update(env)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rotator.cli", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    result.seconds = time.monotonic() - started
    return result


def rotate_args(name, sandbox, cluster, *extra):
    return [
        "--provider", name, "--tenant", TENANT, "--linuxguard-url", sandbox.url,
        "--namespace", cluster["namespace"], *extra,
    ]  # fmt: skip


def cli_env(store_env, sandbox, cluster, **extra):
    return {
        **store_env,
        "LINUXGUARD_API_KEY": sandbox.api_key,
        "KUBECONFIG": cluster["kubeconfig"],
        **extra,
    }


def assert_not_leaked(token_value, *texts):
    for text in texts:
        assert token_value not in text
        assert not TOKEN_SHAPED.search(text)


def test_rotation_leaves_the_same_token_in_store_and_secret(store, sandbox, cluster):
    name, provider, env = store
    result = lg(
        [*rotate_args(name, sandbox, cluster), "-o", "json"], env=cli_env(env, sandbox, cluster)
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    in_secret = cluster["target"].read_token()
    state = cluster["target"].read_state()
    assert current is not None
    assert in_secret is not None
    assert in_secret.value == current.token.value
    assert in_secret.tenant_id == TENANT
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert state.fingerprint == current.fingerprint == report["fingerprint"]
    assert state.rotation_id == current.rotation_id == report["rotationId"]
    assert state.source == f"{name}:{current.version}"
    assert state.expires_at is not None
    assert abs((state.expires_at - current.token.expires_at).total_seconds()) < 1
    assert [m.fingerprint for m in sandbox.minted()] == [current.fingerprint]
    assert_not_leaked(current.token.value.reveal(), result.stdout, result.stderr)
    print(f"\n[figure] one CLI rotation with {name}: {result.seconds:.2f}s wall, "
          f"{report['durationSeconds']:.3f}s in the protocol")  # fmt: skip

    status = lg(
        [
            "status",
            "--provider",
            name,
            "--tenant",
            TENANT,
            "--namespace",
            cluster["namespace"],
            "-o",
            "json",
            "--check",
        ],
        env=cli_env(env, sandbox, cluster),
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout)["inSync"] is True


@pytest.mark.parametrize(
    ("fault", "code"),
    [("wrong-tenant", 4), ("malformed", 4), ("expired", 4), ("401", 3), ("400", 3)],
)
def test_final_errors_change_nothing(store, sandbox, cluster, fault, code):
    name, provider, env = store
    first = lg(rotate_args(name, sandbox, cluster), env=cli_env(env, sandbox, cluster))
    assert first.returncode == 0, first.stderr
    before_store = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    before_secret = cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll")

    if fault.isdigit():
        sandbox.inject_fault(status=int(fault), path="/api/tokens/new")
    else:
        sandbox.set_mint_mode(fault)
    result = lg(rotate_args(name, sandbox, cluster), env=cli_env(env, sandbox, cluster))

    assert result.returncode == code, result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400
    after_store = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert after_store.version == before_store.version
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    after_secret = cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll")
    assert (
        after_secret["metadata"]["resourceVersion"] == before_secret["metadata"]["resourceVersion"]
    )
    assert after_secret["data"] == before_secret["data"]
    assert_not_leaked(before_store.token.value.reveal(), result.stdout, result.stderr)


def test_transient_errors_are_retried_then_succeed(sandbox, cluster, vault_env):
    sandbox.inject_fault(status=503, count=2, path="/api/tokens/new")
    sandbox.inject_fault(status=429, count=1, path="/api/tokens/new", retry_after=1)
    result = lg(rotate_args("vault", sandbox, cluster), env=cli_env(vault_env, sandbox, cluster))
    assert result.returncode == 0, result.stderr
    assert sandbox.requests("/api/tokens/new") == 4
    assert len(sandbox.minted()) == 1


def test_a_held_lock_is_exit_7_and_changes_nothing(sandbox, cluster, vault_env, vault_provider):
    other = LeaseLock(
        api_client=cluster["k8s"].api_client(),
        namespace=cluster["namespace"],
        identity="cronjob-pod-1",
    )
    with other.hold():
        result = lg(
            rotate_args("vault", sandbox, cluster), env=cli_env(vault_env, sandbox, cluster)
        )
    assert result.returncode == 7
    assert "cronjob-pod-1" in result.stderr
    assert sandbox.minted() == []
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None


def test_store_down_is_exit_5_and_the_secret_is_untouched(sandbox, cluster):
    from fixtures.ports import free_port

    env = {"VAULT_ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": "root"}
    result = lg(rotate_args("vault", sandbox, cluster), env=cli_env(env, sandbox, cluster))
    assert result.returncode == 5, result.stderr
    assert cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll") is None


def test_the_cli_removes_the_api_key_and_never_logs_the_token(
    sandbox, cluster, vault_env, vault_provider
):
    result = lg(
        [*rotate_args("vault", sandbox, cluster), "--log-level", "debug", "--log-format", "json"],
        env=cli_env(vault_env, sandbox, cluster),
    )
    assert result.returncode == 0, result.stderr
    token = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT).token.value.reveal()
    assert_not_leaked(token, result.stdout, result.stderr)
    assert sandbox.api_key not in result.stdout + result.stderr
    secret = cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll")
    assert token not in json.dumps(secret["metadata"])  # annotations carry fingerprints only


def test_a_second_rotation_patches_the_secret_under_the_version_it_read(
    sandbox, cluster, vault_env, vault_provider
):
    env = cli_env(vault_env, sandbox, cluster)
    args = [*rotate_args("vault", sandbox, cluster), "--log-level", "info", "--log-format", "json"]
    first = lg(args, env=env)
    assert first.returncode == 0, first.stderr
    before = cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll")
    second = lg(args, env=env)
    assert second.returncode == 0, second.stderr
    after = cluster["k8s"].get("v1/secrets", cluster["namespace"], "linuxguard-enroll")

    version_before = before["metadata"]["resourceVersion"]
    version_after = after["metadata"]["resourceVersion"]
    assert version_after != version_before
    assert after["metadata"]["uid"] == before["metadata"]["uid"]  # patched, not recreated
    patched = [line for line in second.stderr.splitlines() if "patched Secret" in line]
    assert len(patched) == 1
    assert f"(resourceVersion {version_before} -> {version_after})" in patched[0]
    assert "without a conflict check" not in first.stderr + second.stderr
    # The API server records who wrote what: lg-rotate is the manager of the fields it sets.
    managers = {entry["manager"] for entry in after["metadata"]["managedFields"]}
    assert "lg-rotate" in managers
    token = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT).token.value.reveal()
    assert_not_leaked(token, first.stdout, first.stderr, second.stdout, second.stderr)
