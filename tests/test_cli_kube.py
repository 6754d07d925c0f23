"""``lg-rotate watch`` and ``lg-rotate roll`` as subprocesses against the real servers.

The controller's and roll's logic is tested in-process (test_controller.py, test_roll.py,
test_simulation.py); here the CLI wiring: flags, the health endpoint, SIGTERM, exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from fixtures.ports import free_port
from providers.base import Stage
from rotator.kube.secret import SecretTarget

TENANT = "acme"


@pytest.fixture
def cli_env(sandbox, k8s, vault_env, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    return {
        **base,
        **vault_env,
        "LINUXGUARD_API_KEY": sandbox.api_key,
        "KUBECONFIG": str(kubeconfig),
    }


def wait_for(condition, *, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def healthz(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_watch_fills_the_secret_serves_health_and_stops_on_sigterm(
    cli_env, sandbox, k8s, k8s_namespace, vault_provider
):
    port = free_port()
    watch = subprocess.Popen(
        [
            sys.executable, "-m", "rotator.cli", "watch", "--provider", "vault", "--tenant", TENANT,
            "--linuxguard-url", sandbox.url, "--namespace", k8s_namespace,
            "--metrics-port", str(port), "--leader-lease-duration", "5",
        ],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: healthz(port) or watch.poll() is not None, what="/healthz")
        assert watch.poll() is None, watch.stderr.read()
        target = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)
        # No token in the Secret yet: the leader fills it at once (it must never be empty/expired).
        state = wait_for(target.read_state, what="the controller's first rotation")
        current = wait_for(
            lambda: vault_provider.read(tenant=TENANT, stage=Stage.CURRENT), what="store"
        )
        assert state.fingerprint == current.fingerprint
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
            metrics = answer.read().decode()
        assert "rotations_total" in metrics
        assert current.token.value.reveal() not in metrics
    finally:
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=30)
    assert watch.returncode == 0, err
    assert current.token.value.reveal() not in out + err


def test_roll_of_an_empty_daemonset_finishes_and_reports_json(cli_env, sandbox, k8s, k8s_namespace):
    from kubernetes import client  # create the DaemonSet through the API, as kubectl would

    apps = client.AppsV1Api(k8s.api_client())
    apps.create_namespaced_daemon_set(
        k8s_namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "linuxguard-agent"},
            "spec": {
                "selector": {"matchLabels": {"app": "linuxguard-agent"}},
                "template": {
                    "metadata": {"labels": {"app": "linuxguard-agent"}},
                    "spec": {"containers": [{"name": "agent", "image": "linuxguard/agent:1"}]},
                },
            },
        },
    )
    result = subprocess.run(
        [
            sys.executable, "-m", "rotator.cli", "roll", "daemonset/linuxguard-agent",
            "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
            "--namespace", k8s_namespace, "-o", "json",
        ],
        env=cli_env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["workload"].endswith("linuxguard-agent")
    assert report["rolled"] == []


def test_roll_refuses_a_deployment(cli_env, sandbox, k8s_namespace):
    result = subprocess.run(
        [
            sys.executable, "-m", "rotator.cli", "roll", "deployment/x", "--provider", "vault",
            "--tenant", TENANT, "--linuxguard-url", sandbox.url, "--namespace", k8s_namespace,
        ],
        env=cli_env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "roll works on DaemonSets" in result.stderr
