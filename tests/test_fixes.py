"""Issue 10, items 3 and 4: behaviour fixes, tested through the CLI where they are about it.

* a crashed holder's rotation lock is waited out (a running holder still gives exit 7);
* ``roll`` of a DaemonSet without pods is an error (exit 6);
* ``status --target none``: ``inSync`` is not applicable, ``--check`` judges the store;
* the report says when there was no Secret before (no "was" fingerprint);
* ``--mint-budget`` is the bound of the retries, not an attempt count;
* ``--ttl`` is checked locally (300-900 s);
* the stored version is logged once per rotation;
* an ``insecure-skip-tls-verify`` kubeconfig gives one warning, not one per request.

Real servers throughout: the control plane (tests/fixtures/cluster.py), OpenBao, the
LinuxGuard sandbox. Timing bounds are generous (the machine may be loaded): they tell
"waited a lease out" from "did not", never measure speed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.cluster import Cluster, wait_for
from rotator.errors import LockError, TransientSourceError
from rotator.kube.lease import (
    RENEW_INTERVAL_ANNOTATION,
    LeaseLock,
    renew_interval_for,
    stale_after,
)
from rotator.retrying import RetriesExhausted, RetryPolicy
from rotator.sandbox import SandboxServer

REPO = Path(__file__).resolve().parents[1]
TENANT = "acme"
LEASES = "coordination.k8s.io/v1/leases"
LEASE = "lg-rotate-linuxguard-enroll"
MINT_PATH = "/api/tokens/new"
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
STALE_LINE = "has not renewed it since"
INSECURE_LINE = "TLS verification of the Kubernetes API is off"


# --- helpers ---------------------------------------------------------------------------


def run(
    args: list[str], *, env: dict[str, str], timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """``lg-rotate ARGS`` as a subprocess, with only the variables given (plus PATH etc.)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    base.pop("KUBECONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "rotator.cli", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=REPO,
    )


def log_messages(stderr: str) -> list[str]:
    """The ``msg`` of each JSON log line on stderr (lg-rotate logs JSON when not on a TTY)."""
    messages = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            messages.append(str(json.loads(line)["msg"]))
    return messages


def stored(k8s: Cluster, resource: str, namespace: str, name: str) -> dict[str, Any]:
    found = k8s.get(resource, namespace, name)
    assert found is not None, f"{resource} {namespace}/{name} does not exist"
    return found


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.fixture
def kubeconfig(k8s: Cluster, tmp_path: Path) -> Path:
    return k8s.write_kubeconfig(tmp_path / "kubeconfig")


def cli_env(sandbox: SandboxServer, kubeconfig: Path | None = None) -> dict[str, str]:
    env = {"LINUXGUARD_API_KEY": sandbox.api_key}
    if kubeconfig is not None:
        env["KUBECONFIG"] = str(kubeconfig)
    return env


def rotate_args(sandbox: SandboxServer, *more: str, provider: str = "memory") -> list[str]:
    return [
        "rotate",
        "--provider",
        provider,
        "--tenant",
        TENANT,
        "--linuxguard-url",
        sandbox.url,
        *more,
    ]


# --- item 3: a crashed holder's lock is waited out -------------------------------------

HOLDER = """
import sys, threading
from rotator.kube.api import connect
from rotator.kube.lease import LeaseLock

kubeconfig, namespace, identity, duration = sys.argv[1:]
lock = LeaseLock(api_client=connect(kubeconfig=kubeconfig), namespace=namespace,
                 identity=identity, duration=float(duration))
with lock.hold():  # renewed in the background until the process is killed
    print("holding", flush=True)
    threading.Event().wait()
"""


def start_holder(
    k8s: Cluster, kubeconfig: Path, namespace: str, identity: str, duration: float
) -> subprocess.Popen[str]:
    """A process holding the Secret's lock and renewing it (checked: renewed at least once)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(kubeconfig), namespace, identity, str(duration)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )

    def holding_and_renewing() -> bool:
        assert holder.poll() is None, holder.communicate()[1]
        spec = (k8s.get(LEASES, namespace, LEASE) or {}).get("spec") or {}
        return spec.get("holderIdentity") == identity and (
            spec.get("renewTime") != spec.get("acquireTime")
        )

    try:
        wait_for(holding_and_renewing, timeout=90, what=f"{identity} to hold and renew the lock")
    except BaseException:
        holder.kill()
        holder.wait(10)
        raise
    return holder


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_a_retry_after_a_killed_holder_waits_it_out_and_succeeds(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, kubeconfig: Path
) -> None:
    duration = 6  # renews every 2 s; judged stopped after 4 s of silence
    holder = start_holder(k8s, kubeconfig, k8s_namespace, "crashed-cronjob-pod", duration)
    try:
        holder.send_signal(signal.SIGKILL)  # no release: the Lease stays held
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        stop(holder)
    assert (
        stored(k8s, LEASES, k8s_namespace, LEASE)["spec"]["holderIdentity"] == "crashed-cronjob-pod"
    )

    # The retry, right away and without flags: it waits for the lease to lapse.
    result = run(
        rotate_args(sandbox, "--namespace", k8s_namespace, "-o", "json"),
        env=cli_env(sandbox, kubeconfig),
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["action"] == "minted"
    stale = [m for m in log_messages(result.stderr) if STALE_LINE in m]
    assert len(stale) == 1, result.stderr  # one line, not one per poll
    assert "crashed-cronjob-pod" in stale[0]  # who
    assert re.search(r"since \d{4}-\d\d-\d\dT[\d:]+Z \(\d+s ago", stale[0])  # since when
    assert re.search(r"waiting up to \d+s \(until \d{4}-", stale[0])  # how long
    assert len(sandbox.minted()) == 1
    spec = stored(k8s, LEASES, k8s_namespace, LEASE)["spec"]
    assert spec.get("holderIdentity") is None  # taken over, then released
    assert spec["leaseTransitions"] >= 1


def test_a_running_holder_still_gives_exit_7_without_waiting_out_its_lease(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, kubeconfig: Path
) -> None:
    duration = 60  # the default: it renews every 5 s
    holder = start_holder(k8s, kubeconfig, k8s_namespace, "running-pipeline", duration)
    try:
        started = time.monotonic()
        result = run(
            rotate_args(sandbox, "--namespace", k8s_namespace), env=cli_env(sandbox, kubeconfig)
        )
        elapsed = time.monotonic() - started
        assert holder.poll() is None  # it was running all along
    finally:
        stop(holder)

    assert result.returncode == 7, result.stderr
    error = last_line(result.stderr)
    assert error.startswith("lg-rotate: error: ")
    assert "locked by running-pipeline" in error
    assert "which is running" in error
    assert "--lock-wait" in error
    assert elapsed < duration  # it did not wait the lease out
    assert sandbox.minted() == []


class OldRelease(LeaseLock):
    """A holder from a release that renewed every third of the duration and said nothing."""

    def _announcement(self) -> dict[str, str]:
        return {}


def test_a_holders_own_renew_interval_is_used(
    k8s: Cluster, k8s_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    api = k8s.api_client()
    now = [NOW]
    old = OldRelease(
        api_client=api, namespace=k8s_namespace, identity="old", renew=False, clock=lambda: now[0]
    )
    old.acquire()
    lease = stored(k8s, LEASES, k8s_namespace, LEASE)
    assert RENEW_INTERVAL_ANNOTATION not in (lease["metadata"].get("annotations") or {})

    renewed: list[datetime] = []

    def sleep(seconds: float) -> None:  # it renews on its own cadence: every 20 s
        now[0] += timedelta(seconds=seconds)
        if now[0] >= NOW + timedelta(seconds=20) and not renewed:
            old.renew()
            renewed.append(now[0])

    waiter = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="new", clock=lambda: now[0], sleep=sleep
    )
    now[0] = NOW + timedelta(seconds=15)  # silent for 15 s: long for 5 s, not for 20 s
    with caplog.at_level(logging.INFO, logger="lg_rotate"), pytest.raises(LockError):
        waiter.acquire()
    assert renewed  # it was seen renewing, then refused
    assert STALE_LINE not in caplog.text  # never judged stopped
    assert now[0] < NOW + timedelta(seconds=60)


def test_a_silent_holder_is_waited_for_until_its_lease_lapses(
    k8s: Cluster, k8s_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    api = k8s.api_client()
    now = [NOW]
    crashed = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="gone", renew=False, clock=lambda: now[0]
    )
    crashed.acquire()
    lease = stored(k8s, LEASES, k8s_namespace, LEASE)
    assert lease["metadata"]["annotations"][RENEW_INTERVAL_ANNOTATION] == "5"

    def sleep(seconds: float) -> None:
        now[0] += timedelta(seconds=seconds)

    waiter = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="next", clock=lambda: now[0], sleep=sleep
    )
    now[0] = NOW + timedelta(seconds=30)
    with caplog.at_level(logging.INFO, logger="lg_rotate"):
        waiter.acquire()  # no --lock-wait needed
    assert NOW + timedelta(seconds=60) <= now[0] < NOW + timedelta(seconds=62)
    stale = [r for r in caplog.records if STALE_LINE in r.getMessage()]
    assert len(stale) == 1
    assert stale[0].levelno == logging.WARNING
    assert "held by gone" in stale[0].getMessage()
    assert "(30s ago; a running holder renews every 5s)" in stale[0].getMessage()
    assert "waiting up to 30s" in stale[0].getMessage()
    assert "took over the expired lock" in caplog.text
    assert stored(k8s, LEASES, k8s_namespace, LEASE)["spec"]["holderIdentity"] == "next"


def test_a_holder_that_dies_during_lock_wait_is_waited_out_too(
    k8s: Cluster, k8s_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    api = k8s.api_client()
    now = [NOW]
    holder = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="dies", renew=False, clock=lambda: now[0]
    )
    holder.acquire()

    def sleep(seconds: float) -> None:  # it renews for 3 s, then dies
        now[0] += timedelta(seconds=seconds)
        if now[0] <= NOW + timedelta(seconds=3):
            holder.renew()

    waiter = LeaseLock(
        api_client=api,
        namespace=k8s_namespace,
        identity="next",
        wait=15,  # it is judged stopped (silent 10 s) within the wait, then waited out
        clock=lambda: now[0],
        sleep=sleep,
    )
    with caplog.at_level(logging.INFO, logger="lg_rotate"):
        waiter.acquire()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("which is running; waiting" in m for m in messages) == 1
    assert sum(STALE_LINE in m for m in messages) == 1
    assert NOW + timedelta(seconds=63) <= now[0] < NOW + timedelta(seconds=65)
    assert stored(k8s, LEASES, k8s_namespace, LEASE)["spec"]["holderIdentity"] == "next"


def test_renew_cadence_and_staleness_thresholds() -> None:
    assert renew_interval_for(60) == 5  # the default lock: renewed every 5 s
    assert renew_interval_for(6) == 2  # short leases: a third, as before
    assert stale_after(5) == 10  # silent for twice the interval
    assert stale_after(1) == 3  # ... and at least 2 s beyond it


# --- item 4: roll without pods ---------------------------------------------------------


def test_roll_of_a_daemonset_without_pods_is_an_error(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, kubeconfig: Path
) -> None:
    k8s.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "agent"},
            "spec": {
                "selector": {"matchLabels": {"app": "agent"}},
                "template": {
                    "metadata": {"labels": {"app": "agent"}},
                    "spec": {
                        "nodeSelector": {"lgr-test/no-such-node": "true"},
                        "containers": [{"name": "agent", "image": "linuxguard/agent:1"}],
                    },
                },
            },
        },
        k8s_namespace,
    )
    args = ["roll", "daemonset/agent", "--provider", "memory", "--tenant", TENANT]
    args += ["--linuxguard-url", sandbox.url, "--namespace", k8s_namespace]

    result = run(args, env=cli_env(sandbox, kubeconfig))

    assert result.returncode == 6, result.stdout + result.stderr
    assert result.stdout == ""  # no "0 pods rolled"
    error = last_line(result.stderr)
    assert error.startswith("lg-rotate: error: daemonset/agent in namespace")
    assert "has no scheduled pods (selector app=agent" in error
    assert "nothing to roll" in error
    assert "(fix: check its pods (kubectl" in error
    assert sandbox.minted() == []  # nothing minted, nothing recorded
    daemonset = stored(k8s, "apps/v1/daemonsets", k8s_namespace, "agent")
    assert "linuxguard.io/roll-state" not in (daemonset["metadata"].get("annotations") or {})


# --- item 4: status --target none ------------------------------------------------------


def status_args(*more: str) -> list[str]:
    return ["status", "--provider", "vault", "--tenant", TENANT, "--target", "none", *more]


def test_status_without_a_target_has_no_in_sync_to_judge(
    sandbox: SandboxServer, vault_env: dict[str, str]
) -> None:
    env = {**vault_env, **cli_env(sandbox)}
    empty = run(status_args("-o", "json", "--check"), env=env)
    assert empty.returncode == 9, empty.stderr  # the store has no token: a real problem
    data = json.loads(empty.stdout)
    assert data["inSync"] is None
    assert data["problems"] == ["the store holds no current token: run lg-rotate rotate"]

    rotated = run(rotate_args(sandbox, "--target", "none", provider="vault"), env=env)
    assert rotated.returncode == 0, rotated.stderr

    checked = run(status_args("-o", "json", "--check"), env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    data = json.loads(checked.stdout)
    assert data["inSync"] is None  # not false: there is nothing to be in sync with
    assert data["problems"] == []
    assert data["target"] == {"location": None, "state": None}

    table = run(status_args("--check"), env=env)
    assert table.returncode == 0, table.stderr
    assert "in sync: n/a (--target none" in table.stdout
    assert "in sync: NO" not in table.stdout


# --- item 4: "was" when there was no Secret ---------------------------------------------


def test_the_report_says_when_the_secret_was_created(
    k8s_namespace: str, sandbox: SandboxServer, kubeconfig: Path
) -> None:
    env = cli_env(sandbox, kubeconfig)
    first = run(rotate_args(sandbox, "--namespace", k8s_namespace, "-o", "json"), env=env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["previousFingerprint"] is None
    assert report["targetExisted"] is False

    second = run(rotate_args(sandbox, "--namespace", k8s_namespace), env=env)
    assert second.returncode == 0, second.stderr
    assert f"(was {report['fingerprint'][:12]})" in second.stdout

    other = run(
        rotate_args(sandbox, "--namespace", k8s_namespace, "--secret", "other-enroll"), env=env
    )
    assert other.returncode == 0, other.stderr
    line = next(x for x in other.stdout.splitlines() if "fingerprint" in x)
    assert line.endswith("(was none: the Secret did not exist, created)")

    again = run(
        rotate_args(
            sandbox, "--namespace", k8s_namespace, "--secret", "other-enroll", "-o", "json"
        ),
        env=env,
    )
    assert json.loads(again.stdout)["targetExisted"] is True


def test_the_report_has_no_was_without_a_target(sandbox: SandboxServer) -> None:
    env = cli_env(sandbox)
    text = run(rotate_args(sandbox, "--target", "none"), env=env)
    assert text.returncode == 0, text.stderr
    assert "(was" not in text.stdout
    data = run(rotate_args(sandbox, "--target", "none", "-o", "json"), env=env)
    report = json.loads(data.stdout)
    assert report["previousFingerprint"] is None
    assert report["targetExisted"] is None


# --- item 4: --mint-budget is the bound -------------------------------------------------


def test_the_mint_budget_bounds_the_retries_not_an_attempt_count(
    sandbox: SandboxServer,
) -> None:
    budget = 3.0
    sandbox.inject_fault(status=503, count=10_000, path=MINT_PATH)
    result = run(
        rotate_args(sandbox, "--target", "none", "--mint-budget", f"{budget:g}"),
        env=cli_env(sandbox),
    )
    assert result.returncode == 3, result.stderr
    error = last_line(result.stderr)
    found = re.search(r"after (\d+) attempt\(s\) in ([\d.]+)s \(retry budget spent\)", error)
    assert found, error
    attempts, elapsed = int(found.group(1)), float(found.group(2))
    # It tried until the budget was (about) spent: gave up no earlier than its final
    # reserve (0.3 s of a 3 s budget) before the end, whatever the jitter drew.
    assert elapsed >= budget - 0.3 - 0.05, error
    assert attempts == sandbox.requests(MINT_PATH)
    retries = [m for m in log_messages(result.stderr) if "retrying in" in m]
    assert len(retries) == attempts - 1
    assert all(" of 5)" not in m for m in retries)  # no attempt cap any more


def test_the_default_policy_retries_until_the_budget_is_spent() -> None:
    now = [1000.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    policy = RetryPolicy(budget=60, sleep=sleep, clock=lambda: now[0], random=lambda: 1.0)
    calls = 0

    def down() -> None:
        nonlocal calls
        calls += 1
        raise TransientSourceError("HTTP 503")

    with pytest.raises(RetriesExhausted) as caught:
        policy.call(down, is_transient=lambda e: isinstance(e, TransientSourceError), describe="x")
    # 0.5, 1, 2, 4, then 8 s waits (the cap) until the last one, cut to leave the final
    # reserve (1 s): 12 attempts over 59 s, where the old 5-attempt cap stopped at 7.5 s.
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 3.5]
    assert calls == caught.value.attempts == 12
    assert caught.value.reason == "retry budget spent"
    assert sum(sleeps) == 59.0


def test_an_attempt_cap_is_still_available_as_a_safety() -> None:
    policy = RetryPolicy(max_attempts=2, budget=60, sleep=lambda s: None, random=lambda: 0.0)

    def down() -> None:
        raise TransientSourceError("x")

    with pytest.raises(RetriesExhausted, match="2 attempts made"):
        policy.call(down, is_transient=lambda e: True, describe="x")


# --- item 4: --ttl is checked locally ---------------------------------------------------


@pytest.mark.parametrize(
    ("how", "value"),
    [("flag", "120"), ("flag", "16m"), ("flag", "0"), ("env", "3600"), ("flag", "600.5")],
)
def test_a_ttl_outside_300_to_900_seconds_is_refused_before_anything_happens(
    sandbox: SandboxServer, how: str, value: str
) -> None:
    env = cli_env(sandbox)
    args = rotate_args(sandbox, "--target", "none")
    if how == "flag":
        args += ["--ttl", value]
    else:
        env["LG_ROTATE_TTL"] = value
    result = run(args, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, before any log
    assert lines[0].startswith("lg-rotate: error: ttl from ")
    assert "300 to 900" in lines[0]
    assert sandbox.requests(MINT_PATH) == 0


def test_a_ttl_in_range_reaches_linuxguard(sandbox: SandboxServer) -> None:
    result = run(rotate_args(sandbox, "--target", "none", "--ttl", "10m"), env=cli_env(sandbox))
    assert result.returncode == 0, result.stderr
    assert [m.ttl_seconds for m in sandbox.minted()] == [600]


# --- item 4: the stored version is logged once ------------------------------------------


def test_the_stored_version_is_logged_once(
    sandbox: SandboxServer, vault_env: dict[str, str]
) -> None:
    result = run(
        rotate_args(sandbox, "--target", "none", provider="vault"),
        env={**vault_env, **cli_env(sandbox)},
    )
    assert result.returncode == 0, result.stderr
    stored = [m for m in log_messages(result.stderr) if re.search(r"\bstored\b", m)]
    assert len(stored) == 1, stored
    assert "as version 1 of vault:" in stored[0]


# --- item 4: an insecure kubeconfig warns once -------------------------------------------


def test_an_insecure_kubeconfig_gives_one_warning_not_one_per_request(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    config: dict[str, Any] = k8s.kubeconfig()
    for entry in config["clusters"]:
        entry["cluster"].pop("certificate-authority-data", None)
        entry["cluster"]["insecure-skip-tls-verify"] = True
    path = tmp_path / "insecure-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)

    result = run(rotate_args(sandbox, "--namespace", k8s_namespace), env=cli_env(sandbox, path))

    assert result.returncode == 0, result.stderr
    assert result.stderr.count(INSECURE_LINE) == 1, result.stderr
    assert "InsecureRequestWarning" not in result.stderr
    assert "warnings.warn" not in result.stderr
    for line in result.stderr.strip().splitlines():  # the JSON log stream stays JSON
        json.loads(line)
    [warning] = [m for m in log_messages(result.stderr) if INSECURE_LINE in m]
    assert k8s.url in warning
