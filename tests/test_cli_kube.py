"""``lg-rotate watch``, ``roll`` and ``rotate --restart`` as subprocesses against real servers.

The controller's and roll's logic is tested in-process (test_controller.py, test_roll.py,
test_simulation.py); here the CLI wiring (flags, the health endpoint, SIGTERM, exit codes,
progress lines) against the real control plane of tests/fixtures/cluster.py: the shipped agent
DaemonSet on fake Nodes, its pods made and replaced by the real DaemonSet controller, bound
and run by tests/fakekubelet.py (whose agents enrol against the LinuxGuard sandbox).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fakekubelet import FakeKubelet
from fixtures.ports import free_port
from providers.base import Stage
from rotator.kube.secret import SecretTarget
from rotator.tokens import TOKEN_SHAPED

TENANT = "acme"
AGENT_DAEMONSET = Path(__file__).parent.parent / "cronjob" / "agent" / "daemonset.yaml"


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
            "--metrics-bind-address", f"127.0.0.1:{port}", "--leader-lease-duration", "5",
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


def lg(args, *, env, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "rotator.cli", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def store_args(sandbox, namespace):
    return [
        "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
        "--namespace", namespace,
    ]  # fmt: skip


def json_lines(text, **match):
    """The JSON objects among ``text``'s lines whose fields have the ``match`` values."""
    found = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and all(item.get(k) == v for k, v in match.items()):
            found.append(item)
    return found


def assert_not_leaked(token_value, *texts):
    for text in texts:
        assert token_value not in text
        assert not TOKEN_SHAPED.search(text)


def bring_up_agents(k8s, namespace, kubelet, nodes, *, before_each):
    """The shipped agent DaemonSet on ``nodes``, their kubelets released one by one (after
    ``before_each()``), each pod Ready before the next Node comes up."""
    kubelet.hold(nodes)
    k8s.create_nodes(nodes)
    k8s.apply(yaml.safe_load(AGENT_DAEMONSET.read_text()), namespace)
    for node in nodes:
        before_each()
        kubelet.release([node])
        kubelet.wait(lambda node=node: kubelet.settled([node]), timeout=30, what=f"{node}'s pod")


def rotate_in_process(k8s, namespace, sandbox, provider):
    """A rotation like the CLI's (same store and Secret), without a process start."""
    from rotator.kube.lease import LeaseLock
    from rotator.linuxguard import LinuxGuardClient
    from rotator.rotation import Rotator
    from rotator.tokens import Secret

    api = k8s.api_client()
    Rotator(
        minter=LinuxGuardClient(base_url=sandbox.url, api_key=Secret(sandbox.api_key)),
        provider=provider,
        tenant=TENANT,
        target=SecretTarget(api_client=api, namespace=namespace),
        lock=LeaseLock(api_client=api, namespace=namespace),
    ).rotate()


def test_roll_replaces_each_agent_pod_and_reports_json(
    cli_env, sandbox, k8s, k8s_namespace, vault_provider
):
    nodes = ["node-a", "node-b"]
    with FakeKubelet(k8s, k8s_namespace, sandbox=sandbox) as kubelet:
        bring_up_agents(
            k8s,
            k8s_namespace,
            kubelet,
            nodes,
            before_each=lambda: rotate_in_process(k8s, k8s_namespace, sandbox, vault_provider),
        )
        before = {node: pod.uid for node, pod in kubelet.live_pods().items()}
        started = len(kubelet.attempts)
        result = lg(
            ["roll", "daemonset/linuxguard-agent", *store_args(sandbox, k8s_namespace),
             "--timeout", "60s", "-o", "json"],
            env=cli_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        after = kubelet.live_pods()
        new_starts = kubelet.attempts[started:]

    report = json.loads(result.stdout)
    assert report["workload"] == "daemonset/linuxguard-agent"
    assert report["resumed"] is False
    assert [pod["node"] for pod in report["rolled"]] == nodes
    assert [pod["newPod"] for pod in report["rolled"]] == [after[node].name for node in nodes]
    assert all(after[node].uid != before[node] for node in nodes)
    assert all(pod.enrolled for pod in after.values())
    assert [a.results for a in new_starts] == [["enrolled"]] * len(nodes)
    assert len({a.token_fingerprint for a in new_starts}) == len(nodes)
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert report["finalFingerprint"] == current.fingerprint[:12]  # a token nobody read
    assert current.fingerprint not in {a.token_fingerprint for a in kubelet.attempts}
    phases = [line["phase"] for line in json_lines(result.stderr, event="roll")]
    assert phases[0] == "started"
    assert phases[-1] == "finished"
    assert phases.count("ready") == len(nodes)
    assert_not_leaked(current.token.value.reveal(), result.stdout, result.stderr)


def test_rotate_restart_wait_follows_the_real_rollout(
    cli_env, sandbox, k8s, k8s_namespace, vault_provider
):
    with FakeKubelet(k8s, k8s_namespace, sandbox=sandbox) as kubelet:
        bring_up_agents(
            k8s,
            k8s_namespace,
            kubelet,
            ["node-a"],
            before_each=lambda: rotate_in_process(k8s, k8s_namespace, sandbox, vault_provider),
        )
        old = kubelet.live_pods()["node-a"]
        result = lg(
            ["rotate", *store_args(sandbox, k8s_namespace), "--restart",
             "daemonset/linuxguard-agent", "--wait", "--timeout", "60s", "-o", "json"],
            env=cli_env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        new = kubelet.live_pods()["node-a"]

    report = json.loads(result.stdout)
    # No controller runs: every pod of the rollout would read this one token.
    assert "restarts with the same token" in result.stderr
    assert new.uid != old.uid
    assert new.enrolled
    (start,) = kubelet.attempts_of(new.uid)
    assert start.token_fingerprint == report["fingerprint"]  # it read the token just delivered
    rollout = json_lines(result.stderr, event="rollout")
    assert rollout[-1]["done"] is True
    assert rollout[-1]["available"] == rollout[-1]["desired"] == 1
    ds = k8s.get("apps/v1/daemonsets", k8s_namespace, "linuxguard-agent")
    restarted_at = ds["spec"]["template"]["metadata"]["annotations"]
    assert "kubectl.kubernetes.io/restartedAt" in restarted_at
    assert ds["status"]["observedGeneration"] == ds["metadata"]["generation"] == 2
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert_not_leaked(current.token.value.reveal(), result.stdout, result.stderr)


def metric(port, name):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
        text = answer.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_rotate_restart_with_the_controller_running_gives_each_new_pod_its_own_token(
    cli_env, sandbox, k8s, k8s_namespace, vault_provider, tmp_path
):
    nodes = ["node-a", "node-b", "node-c"]
    port = free_port()
    watch_log = tmp_path / "watch.log"  # a file, not a pipe: nobody reads it while it runs
    with watch_log.open("w") as log_file:
        watch = subprocess.Popen(
            [
                sys.executable, "-m", "rotator.cli", "watch",
                *store_args(sandbox, k8s_namespace),
                "--metrics-bind-address", f":{port}", "--leader-lease-duration", "5",
            ],
            env=cli_env, stdout=log_file, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    try:
        wait_for(lambda: healthz(port) or watch.poll() is not None, what="/healthz")
        assert watch.poll() is None, watch_log.read_text()
        target = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)
        wait_for(target.read_state, what="the controller's first rotation")
        # Restarts back off 0.3 s: an agent refused once is recovered by its own restart.
        with FakeKubelet(k8s, k8s_namespace, sandbox=sandbox, restart_backoff=0.3) as kubelet:
            # The controller hands each new pod a fresh token; wait for it after each start.
            def after_the_last_start_the_secret_changed():
                read = {a.token_fingerprint for a in kubelet.attempts}
                wait_for(
                    lambda: target.read_state().fingerprint not in read,
                    what="the controller's rotation after a start",
                )

            bring_up_agents(
                k8s,
                k8s_namespace,
                kubelet,
                nodes,
                before_each=after_the_last_start_the_secret_changed,
            )
            old = {node: pod.uid for node, pod in kubelet.live_pods().items()}
            started = len(kubelet.attempts)
            result = lg(
                ["rotate", *store_args(sandbox, k8s_namespace), "--restart",
                 "daemonset/linuxguard-agent", "--wait", "--timeout", "120s"],
                env=cli_env,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            live = kubelet.live_pods()
            new_starts = kubelet.attempts[started:]
            collisions = metric(port, "lg_rotate_collisions_total")
    finally:
        watch.send_signal(signal.SIGTERM)
        watch.wait(timeout=30)
    logged = watch_log.read_text()
    assert watch.returncode == 0, logged

    assert "restarts with the same token" not in result.stderr  # the controller is running
    assert set(live) == set(nodes)
    assert all(live[node].uid != old[node] for node in nodes)
    assert all(pod.enrolled for pod in live.values())
    enrolled = [a for a in new_starts if a.enrolled]
    assert len(enrolled) == len(nodes)
    assert len({a.token_fingerprint for a in enrolled}) == len(nodes)  # a token per new pod
    refused = [a for a in new_starts if "conflict" in a.results]
    assert collisions >= len(refused)  # every refused start was seen as a collision
    ok = [r for r in sandbox.enrolments() if r.result == "ok"]
    assert len({r.fingerprint for r in ok}) == len(ok)  # no token enrolled by two workloads
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert_not_leaked(current.token.value.reveal(), result.stdout, result.stderr, logged)


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
