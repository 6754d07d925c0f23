"""Least privilege, proven on a real API server rather than asserted in a manifest.

For each shipped overlay (vault, aws, gcp) the module renders it with the real
``kubectl kustomize``, moves it into a fresh namespace under the ``restricted`` Pod Security
Standard, and applies it with the example agent DaemonSet (cronjob/agent) and the optional
auditor (cronjob/audit). Then every entry point runs as a real ``lg-rotate`` subprocess, with
the arguments of the shipped pod specs, as its own ServiceAccount (a kubeconfig holding a
TokenRequest token): nothing but the shipped RBAC stands between it and the API server.

* the CronJob's ``lg-rotate``: ``rotate`` (and its Event on the Secret), ``rotate --restart
  daemonset/linuxguard-agent``, ``status``;
* the watch Deployment's ``lg-rotate-watch``: ``watch`` (leads, rotates, stops on SIGTERM) and
  ``roll daemonset/linuxguard-agent`` over a real DaemonSet on two fake Nodes (the
  kube-controller-manager's DaemonSet controller makes the pods; :class:`Kubelet` below binds
  them, as a scheduler would, and reports them Running/Ready, as a kubelet would);
* the auditor's ``lg-rotate-audit``: ``audit --cluster``; and ``audit --cluster`` as the
  other two, which may list nothing, or only pods: it must fail, not pass on what it did not see.

Each ServiceAccount is also refused (403, real requests) what it must not do, and the
ValidatingAdmissionPolicy of cronjob/base/admission-policy.yaml refuses both rotators any
change to the DaemonSet but the restart. The LinuxGuard side is the project's sandbox; the
store is the in-memory provider (the store is not what is under test here).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from fixtures.cluster import Cluster, wait_for
from fixtures.ports import free_port
from rotator.kube.roll import ROLL_STATE_ANNOTATION
from rotator.kube.workloads import RESTARTED_AT_ANNOTATION
from rotator.tokens import fingerprint

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from rotator.sandbox import SandboxServer

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ("vault", "aws", "gcp")
SHIPPED_NAMESPACE = "linuxguard"
SECRET = "linuxguard-enroll"
API_KEY_SECRET = "linuxguard-api-key"
DAEMONSET = "linuxguard-agent"
CRONJOB_SA = "lg-rotate"
WATCH_SA = "lg-rotate-watch"
AUDIT_SA = "lg-rotate-audit"
POLICY = "lg-rotate-daemonset-restart-only"
TENANT = "acme"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
FINGERPRINT = "linuxguard.io/token-sha256"
ONE_TOKEN_WARNING = "only the first to enrol"  # cli._restart without a leading controller


# --- the installation ------------------------------------------------------------------------


@dataclass
class Install:
    """One overlay, applied in its own namespace; kubeconfigs of its ServiceAccounts."""

    overlay: str
    namespace: str
    kubeconfigs: dict[str, Path]
    docs: list[dict[str, Any]]
    clients: dict[str, ApiClient] = field(default_factory=dict)

    def doc(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [
            d for d in self.docs if d["kind"] == kind and d["metadata"]["name"].startswith(name)
        ]
        return found

    def container_args(self, kind: str, name: str) -> list[str]:
        """The args of the shipped pod spec (the image's ENTRYPOINT is lg-rotate)."""
        spec = self.doc(kind, name)["spec"]
        pod = spec["jobTemplate"]["spec"]["template"] if kind == "CronJob" else spec["template"]
        return list(pod["spec"]["containers"][0]["args"])

    def settings(self) -> dict[str, str]:
        data: dict[str, str] = self.doc("ConfigMap", "lg-rotate-settings")["data"]
        return data

    def client(self, serviceaccount: str) -> ApiClient:
        """An official-client ApiClient acting as the ServiceAccount."""
        if serviceaccount not in self.clients:
            from kubernetes import config

            self.clients[serviceaccount] = config.new_client_from_config(
                config_file=str(self.kubeconfigs[serviceaccount]), persist_config=False
            )
        return self.clients[serviceaccount]


def rendered(k8s: Cluster, kustomization: str) -> list[dict[str, Any]]:
    text = k8s.kubectl("kustomize", str(ROOT / kustomization)).stdout
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def moved(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The rendered objects with the shipped namespace replaced (RoleBinding subjects too)."""
    for doc in docs:
        metadata = doc["metadata"]
        if metadata.get("namespace") == SHIPPED_NAMESPACE:
            metadata["namespace"] = namespace
        for subject in doc.get("subjects") or []:
            if subject.get("namespace") == SHIPPED_NAMESPACE:
                subject["namespace"] = namespace
    text = json.dumps(docs)
    assert f'"namespace": "{SHIPPED_NAMESPACE}"' not in text, "a namespace reference was left"
    return docs


@pytest.fixture(scope="module")
def admission_policy(k8s: Cluster) -> Iterator[None]:
    """The shipped policy is cluster-scoped and shared by every install: removed at the end."""
    yield
    k8s.delete("admissionregistration.k8s.io/v1/validatingadmissionpolicybindings", None, POLICY)
    k8s.delete("admissionregistration.k8s.io/v1/validatingadmissionpolicies", None, POLICY)


@pytest.fixture(scope="module", params=OVERLAYS)
def install(
    request: pytest.FixtureRequest,
    k8s: Cluster,
    admission_policy: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Install]:
    k8s.require_controllers()  # DaemonSet pods, default ServiceAccounts
    overlay = str(request.param)
    namespace = f"rbac-{overlay}-{uuid.uuid4().hex[:6]}"
    k8s.create_namespace(namespace, labels=RESTRICTED)
    k8s.wait_for_default_serviceaccount(namespace)
    docs = moved(
        [
            *rendered(k8s, f"cronjob/overlays/{overlay}"),
            *rendered(k8s, "cronjob/agent"),
            *rendered(k8s, "cronjob/audit"),
        ],
        namespace,
    )
    applied = k8s.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    assert "Warning" not in applied.stderr, applied.stderr  # e.g. a Pod Security violation
    # What the CronJob mounts, and a Secret none of the ServiceAccounts may read.
    k8s.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": API_KEY_SECRET},
            "stringData": {"api-key": "not-a-real-key"},
        },
        namespace,
    )
    folder = tmp_path_factory.mktemp(f"rbac-{overlay}")
    kubeconfigs = {
        sa: k8s.serviceaccount_kubeconfig(namespace, sa, folder / f"{sa}.kubeconfig")
        for sa in (CRONJOB_SA, WATCH_SA, AUDIT_SA)
    }
    # The authorizer learns of new RoleBindings through its informers: wait until they count.
    for sa, verb in ((CRONJOB_SA, "patch"), (WATCH_SA, "patch"), (AUDIT_SA, "get")):
        wait_for(
            lambda sa=sa, verb=verb: (
                k8s.kubectl(
                    "auth",
                    "can-i",
                    verb,
                    f"secrets/{SECRET}",
                    kubeconfig=kubeconfigs[sa],
                    check=False,
                ).stdout.strip()
                == "yes"
            ),
            what=f"the RoleBinding of {sa} to take effect",
        )
    installed = Install(overlay=overlay, namespace=namespace, kubeconfigs=kubeconfigs, docs=docs)
    try:
        yield installed
    finally:
        for api_client in installed.clients.values():
            api_client.close()  # type: ignore[no-untyped-call]
        k8s.delete("v1/namespaces", None, namespace)


# --- running lg-rotate as a ServiceAccount -----------------------------------------------------


def cli_env(install: Install, serviceaccount: str, sandbox: SandboxServer) -> dict[str, str]:
    """The pod's environment, as far as it matters here: the settings ConfigMap's Secret name
    and log format, the namespace (Downward API in the manifests), the API key, the kubeconfig
    of the ServiceAccount (the pod's mounted token). The store is the in-memory provider."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LG_ROTATE_", "LINUXGUARD_", "KUBECONFIG", "VAULT_", "AWS_"))
    }
    settings = install.settings()
    return {
        **base,
        "LG_ROTATE_SECRET": settings["LG_ROTATE_SECRET"],
        "LG_ROTATE_LOG_FORMAT": settings["LG_ROTATE_LOG_FORMAT"],
        "LG_ROTATE_NAMESPACE": install.namespace,
        "LG_ROTATE_PROVIDER": "memory",
        "LG_ROTATE_TENANT": TENANT,
        "LG_ROTATE_LINUXGUARD_URL": sandbox.url,
        "LINUXGUARD_API_KEY": sandbox.api_key,
        "KUBECONFIG": str(install.kubeconfigs[serviceaccount]),
    }


def lg_rotate(
    install: Install,
    serviceaccount: str,
    sandbox: SandboxServer,
    *args: str,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rotator.cli", *args],
        env=cli_env(install, serviceaccount, sandbox),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_never_refused(*texts: str) -> None:
    for text in texts:
        assert "forbidden" not in text.lower(), text
        assert "(403)" not in text, text


def secret_token(k8s: Cluster, namespace: str) -> str | None:
    secret = k8s.get("v1/secrets", namespace, SECRET)
    assert secret is not None
    value = (secret.get("data") or {}).get("token")
    return base64.b64decode(value).decode() if value else None


def fingerprint_of(k8s: Cluster, namespace: str) -> str | None:
    secret = k8s.get("v1/secrets", namespace, SECRET)
    assert secret is not None
    return str((secret["metadata"].get("annotations") or {}).get(FINGERPRINT) or "") or None


def rotate(install: Install, sandbox: SandboxServer) -> subprocess.CompletedProcess[str]:
    """The CronJob's own command line, as its ServiceAccount."""
    args = install.container_args("CronJob", "lg-rotate")
    assert args == ["rotate"]
    result = lg_rotate(install, CRONJOB_SA, sandbox, *args)
    assert result.returncode == 0, result.stderr
    return result


# --- the entry points, each as its own ServiceAccount ------------------------------------------


def test_rotate_as_the_cronjob_records_an_event_on_the_secret(
    install: Install, k8s: Cluster, sandbox: SandboxServer
) -> None:
    result = rotate(install, sandbox)
    assert_never_refused(result.stdout, result.stderr)
    token = secret_token(k8s, install.namespace)
    assert token is not None
    secret = k8s.get("v1/secrets", install.namespace, SECRET)
    assert secret is not None
    assert secret["metadata"]["annotations"][FINGERPRINT] == fingerprint(token)

    # The Event of this rotation, on the Secret (its uid: kubectl describe finds it).
    def rotated() -> list[dict[str, Any]]:
        return [
            event
            for event in k8s.list_objects("v1/events", install.namespace)
            if event["reason"] == "Rotated"
            and fingerprint(token)[:12] in event["message"]
            and event["involvedObject"].get("uid") == secret["metadata"]["uid"]
        ]

    (event,) = wait_for(rotated, timeout=10, what="the Rotated Event")
    assert event["involvedObject"]["kind"] == "Secret"
    assert event["involvedObject"]["name"] == SECRET
    assert event["type"] == "Normal"
    assert event["source"]["component"] == "lg-rotate"
    # Never the token, in any form, in any Event of the namespace; nor in the output.
    canonical = token.replace("-", "")
    for any_event in k8s.list_objects("v1/events", install.namespace):
        text = json.dumps(any_event)
        assert token not in text
        assert canonical not in text
        assert fingerprint(token) not in text  # the prefix only
    assert token not in result.stdout + result.stderr


def test_status_as_the_cronjob(install: Install, k8s: Cluster, sandbox: SandboxServer) -> None:
    rotate(install, sandbox)
    result = lg_rotate(install, CRONJOB_SA, sandbox, "status", "-o", "json")
    assert result.returncode == 0, result.stderr
    assert_never_refused(result.stderr)
    report = json.loads(result.stdout)
    current = fingerprint_of(k8s, install.namespace)
    assert current is not None
    assert report["target"]["state"]["fingerprint"] == current


def test_rotate_restart_as_the_cronjob(
    install: Install, k8s: Cluster, sandbox: SandboxServer
) -> None:
    before = k8s.get("apps/v1/daemonsets", install.namespace, DAEMONSET)
    assert before is not None
    result = lg_rotate(
        install, CRONJOB_SA, sandbox, "rotate", "--restart", f"daemonset/{DAEMONSET}"
    )
    assert result.returncode == 0, result.stderr
    assert_never_refused(result.stderr)
    after = k8s.get("apps/v1/daemonsets", install.namespace, DAEMONSET)
    assert after is not None
    annotations = after["spec"]["template"]["metadata"].get("annotations") or {}
    assert RESTARTED_AT_ANNOTATION in annotations
    assert after["metadata"]["generation"] == before["metadata"]["generation"] + 1
    # Nobody leads: the one-token-for-every-pod warning is right here (see the watch test).
    assert ONE_TOKEN_WARNING in result.stderr


def test_watch_leads_rotates_and_stops_on_sigterm(
    install: Install, k8s: Cluster, sandbox: SandboxServer
) -> None:
    # The Secret as shipped (empty, no lg-rotate annotations): a leader fills it at once.
    secret = k8s.get("v1/secrets", install.namespace, SECRET)
    assert secret is not None
    lg_annotations = [
        a for a in secret["metadata"].get("annotations") or {} if "linuxguard.io/" in a
    ]
    k8s.modify(
        "v1/secrets",
        install.namespace,
        SECRET,
        {
            "data": {"token": None, "tenant-id": None},
            "metadata": {"annotations": dict.fromkeys(lg_annotations)},
        },
    )
    args = install.container_args("Deployment", "lg-rotate-watch")
    assert args[0] == "watch"
    assert "--selector" in args
    port = free_port()
    args[args.index("--metrics-bind-address") + 1] = f"127.0.0.1:{port}"
    watch = subprocess.Popen(
        [sys.executable, "-m", "rotator.cli", *args, "--leader-lease-duration", "5"],
        env=cli_env(install, WATCH_SA, sandbox),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def leading() -> dict[str, Any] | None:
            assert watch.poll() is None, watch.communicate()[1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as answer:
                    status: dict[str, Any] = json.loads(answer.read())["status"]
            except OSError:
                return None
            return status if status.get("leader") and status.get("fingerprint") else None

        status = wait_for(leading, timeout=60, what="the controller to lead and fill the Secret")
        token = wait_for(
            lambda: secret_token(k8s, install.namespace), what="the controller's rotation"
        )
        assert fingerprint(token).startswith(status["fingerprint"])
        assert k8s.get(
            "coordination.k8s.io/v1/leases", install.namespace, f"lg-rotate-controller-{SECRET}"
        )

        # With a controller leading, the CronJob's `rotate --restart` knows it (it may read the
        # controller's Lease) and does not warn that every pod would get one token.
        restart = lg_rotate(
            install, CRONJOB_SA, sandbox, "rotate", "--restart", f"daemonset/{DAEMONSET}"
        )
        assert restart.returncode == 0, restart.stderr
        assert ONE_TOKEN_WARNING not in restart.stderr
        assert_never_refused(restart.stderr)
    finally:
        watch.send_signal(signal.SIGTERM)
        out, err = watch.communicate(timeout=60)
    assert watch.returncode == 0, err
    assert_never_refused(out, err)
    assert token not in out + err


def test_roll_as_the_watch_serviceaccount(
    install: Install, k8s: Cluster, sandbox: SandboxServer
) -> None:
    nodes = [f"{install.namespace}-node-{index}" for index in range(2)]
    k8s.create_nodes(nodes)
    kubelet = Kubelet(k8s, install.namespace, nodes)
    kubelet.start()
    try:
        rotate(install, sandbox)  # the token the pods start with
        wait_for(kubelet.all_ready, timeout=60, what="one Ready agent pod per node")
        first = {kubelet.read[uid] for uid in kubelet.ready_uids()}
        result = lg_rotate(
            install, WATCH_SA, sandbox, "roll", f"daemonset/{DAEMONSET}", "-o", "json",
            "--timeout", "60",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_never_refused(result.stderr)
        report = json.loads(result.stdout)
        assert sorted(pod["node"] for pod in report["rolled"]) == nodes
        # One fresh token per replacement pod: what each read at its start, all different.
        replaced = [kubelet.read[kubelet.uid_of(pod["newPod"])] for pod in report["rolled"]]
        assert len(set(replaced)) == len(nodes)
        assert not set(replaced) & first
        assert [pod["fingerprint"] for pod in report["rolled"]] == [fp[:12] for fp in replaced]
        daemonset = k8s.get("apps/v1/daemonsets", install.namespace, DAEMONSET)
        assert daemonset is not None
        state = json.loads(daemonset["metadata"]["annotations"][ROLL_STATE_ANNOTATION])
        assert state["completed"] is True
        assert sorted(state["done"]) == nodes
    finally:
        kubelet.stop()
        k8s.delete_nodes(nodes)


def test_audit_cluster_as_the_auditor(
    install: Install, k8s: Cluster, sandbox: SandboxServer
) -> None:
    rotate(install, sandbox)  # a fresh token in the Secret: nothing to find
    result = lg_rotate(
        install, AUDIT_SA, sandbox, "audit", "--cluster", "-n", install.namespace, "-o", "json"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert_never_refused(result.stderr)
    summary = json.loads(result.stdout)["summary"]
    assert summary["complete"] is True
    assert summary["findings"] == 0
    # The CronJob, the watch Deployment, the agent DaemonSet, the ConfigMaps.
    assert summary["objects"] >= 4


def test_audit_cluster_that_may_list_nothing_fails(
    install: Install, sandbox: SandboxServer
) -> None:
    result = lg_rotate(install, CRONJOB_SA, sandbox, "audit", "--cluster", "-n", install.namespace)
    assert result.returncode == 6, result.stdout + result.stderr
    assert result.stdout == ""  # no "no findings in 0 object(s)"
    (error,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert "audit --cluster read nothing" in error
    for resource in ("pods", "configmaps", "deployments.apps", "daemonsets.apps", "cronjobs.batch"):
        assert resource in error
    assert "HTTP 403" in error
    assert "cronjob/audit/" in error  # the fix


def test_audit_cluster_that_may_list_only_pods_is_incomplete(
    install: Install, sandbox: SandboxServer
) -> None:
    argv = ("audit", "--cluster", "-n", install.namespace, "-o", "json")
    result = lg_rotate(install, WATCH_SA, sandbox, *argv)
    assert result.returncode == 6, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["complete"] is False
    assert summary["failed"] is True
    refused = " ".join(summary["refused"])
    assert "list configmaps" in refused
    assert "list pods" not in refused  # the watch controller may list pods
    assert "incomplete" in result.stderr

    accepted = lg_rotate(install, WATCH_SA, sandbox, *argv, "--allow-partial")
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert json.loads(accepted.stdout)["summary"]["complete"] is False


# --- what each ServiceAccount must be refused ------------------------------------------------


def forbidden(call: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """Make a real request that RBAC must refuse; its Status message."""
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        call(*args, _preload_content=False, **kwargs)
    assert refused.value.status == 403, refused.value.body
    return str(json.loads(refused.value.body)["message"])


@pytest.mark.parametrize("serviceaccount", [CRONJOB_SA, WATCH_SA, AUDIT_SA])
def test_each_serviceaccount_is_refused_the_rest(install: Install, serviceaccount: str) -> None:
    from kubernetes import client

    api_client = install.client(serviceaccount)
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    coordination = client.CoordinationV1Api(api_client)
    ns = install.namespace
    other = "default"  # another namespace: nothing of lg-rotate's is granted there
    lease = {"metadata": {"name": f"lg-rotate-{SECRET}"}}
    secret = {"metadata": {"name": "anything"}, "stringData": {"a": "b"}}
    delete = {"propagationPolicy": "Background"}
    checks: list[tuple[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = [
        ("list Secrets", core.list_namespaced_secret, (ns,), {}),
        ("watch Secrets", core.list_namespaced_secret, (ns,), {"watch": True, "timeout_seconds": 1}),
        ("get another Secret", core.read_namespaced_secret, (API_KEY_SECRET, ns), {}),
        ("create a Secret", core.create_namespaced_secret, (ns, secret), {}),
        ("delete the Secret", core.delete_namespaced_secret, (SECRET, ns), {"body": delete}),
        ("list Events", core.list_namespaced_event, (ns,), {}),
        ("list Leases", coordination.list_namespaced_lease, (ns,), {}),
        ("delete the lock", coordination.delete_namespaced_lease, (lease["metadata"]["name"], ns), {}),
        ("delete the DaemonSet", apps.delete_namespaced_daemon_set, (DAEMONSET, ns), {}),
        ("patch another DaemonSet", apps.patch_namespaced_daemon_set, ("other", ns, {}), {}),
        ("get the Secret elsewhere", core.read_namespaced_secret, (SECRET, other), {}),
        ("patch the Secret elsewhere", core.patch_namespaced_secret, (SECRET, other, {}), {}),
        ("create a Lease elsewhere", coordination.create_namespaced_lease, (other, lease), {}),
        ("list pods elsewhere", core.list_namespaced_pod, (other,), {}),
    ]  # fmt: skip
    if serviceaccount != AUDIT_SA:  # the rotators get their one DaemonSet by name
        checks.append(("list DaemonSets", apps.list_namespaced_daemon_set, (ns,), {}))
    if serviceaccount == CRONJOB_SA:  # only the watch controller (and the auditor) see pods
        checks.append(("list pods", core.list_namespaced_pod, (ns,), {}))
    if serviceaccount != WATCH_SA:  # only the watch controller (and roll) delete pods
        checks.append(("delete a pod", core.delete_namespaced_pod, ("any", ns), {}))
    if serviceaccount == AUDIT_SA:  # read-only: not even what the rotators may write
        checks += [
            ("patch the Secret", core.patch_namespaced_secret, (SECRET, ns, {}), {}),
            ("patch the DaemonSet", apps.patch_namespaced_daemon_set, (DAEMONSET, ns, {}), {}),
            ("create a Lease", coordination.create_namespaced_lease, (ns, lease), {}),
        ]
    user = f"system:serviceaccount:{ns}:{serviceaccount}"
    for what, call, args, kwargs in checks:
        message = forbidden(call, *args, **kwargs)
        assert user in message, (what, message)


# --- the admission policy: `patch` on the DaemonSet means restart, nothing else ----------------


def dry_run_patch(api_client: ApiClient, namespace: str, patch: Any) -> tuple[int, str]:
    """A server-side dry run of a patch of the agent DaemonSet: (HTTP status, message)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    content_type = (
        "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
    )
    try:
        client.AppsV1Api(api_client).patch_namespaced_daemon_set(
            DAEMONSET, namespace, patch, dry_run="All", _content_type=content_type,
            _preload_content=False,
        )  # fmt: skip
    except ApiException as exc:
        return int(exc.status), str(json.loads(exc.body).get("message"))
    return 200, ""


SNEAKY_PATCHES = {
    "another image": [
        {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:1"}
    ],
    "a Secret volume": [
        {
            "op": "add",
            "path": "/spec/template/spec/volumes/-",
            "value": {"name": "loot", "secret": {"secretName": API_KEY_SECRET}},
        }
    ],
    "a pod annotation": {"spec": {"template": {"metadata": {"annotations": {"x": "y"}}}}},
    "a pod label": {"spec": {"template": {"metadata": {"labels": {"x": "y"}}}}},
    "the update strategy": {"spec": {"updateStrategy": {"rollingUpdate": {"maxUnavailable": 3}}}},
    "a DaemonSet annotation": {"metadata": {"annotations": {"x": "y"}}},
}


@pytest.mark.parametrize("serviceaccount", [CRONJOB_SA, WATCH_SA])
def test_the_admission_policy_allows_only_the_restart(
    install: Install, k8s: Cluster, serviceaccount: str
) -> None:
    api_client = install.client(serviceaccount)
    ns = install.namespace
    image = SNEAKY_PATCHES["another image"]
    # A new policy takes effect once the API server has compiled it: wait for the first refusal.
    wait_for(
        lambda: dry_run_patch(api_client, ns, image)[0] != 200,
        what="the ValidatingAdmissionPolicy to take effect",
    )
    for what, patch in SNEAKY_PATCHES.items():
        status, message = dry_run_patch(api_client, ns, patch)
        assert status == 422, (what, status, message)
        assert f"ValidatingAdmissionPolicy '{POLICY}'" in message, (what, message)
        assert "lg-rotate's ServiceAccounts may" in message, (what, message)
    # What lg-rotate itself writes passes (and really works: the restart and roll tests).
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    restart = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT_ANNOTATION: now}}}}}
    assert dry_run_patch(api_client, ns, restart) == (200, "")
    progress = {"metadata": {"annotations": {ROLL_STATE_ANNOTATION: "{}"}}}
    assert dry_run_patch(api_client, ns, progress) == (200, "")
    # Only lg-rotate's ServiceAccounts are held to it: the administrator is not.
    assert dry_run_patch(k8s.api_client(), ns, image) == (200, "")


# --- the kubelet (and scheduler) the control plane does not have -------------------------------


class Kubelet:
    """Plays the scheduler and the kubelet for the agent DaemonSet's pods on fake Nodes.

    Binds each new pod to the Node its DaemonSet node-affinity names, then "starts" it:
    records the token its container would read from the Secret (fingerprint), and reports it
    Running and Ready through the status subresource. A deleted pod is finalised (the
    kubelet's grace-period-0 delete), so the DaemonSet controller replaces it.
    """

    def __init__(self, k8s: Cluster, namespace: str, nodes: list[str]) -> None:
        from kubernetes import client

        self.k8s = k8s
        self.namespace = namespace
        self.nodes = nodes
        self.core = client.CoreV1Api(k8s.api_client())
        self.read: dict[str, str] = {}  # pod uid -> fingerprint of the token it started with
        self.names: dict[str, str] = {}  # pod name -> uid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kubelet", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self._error is not None:
            raise self._error

    def pods(self) -> list[dict[str, Any]]:
        return self.k8s.list_objects(
            "v1/pods", self.namespace, label_selector="app=linuxguard-agent"
        )

    def ready_uids(self) -> list[str]:
        return [
            pod["metadata"]["uid"]
            for pod in self.pods()
            if not pod["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in (pod.get("status") or {}).get("conditions") or []
            )
        ]

    def all_ready(self) -> bool:
        return len(self.ready_uids()) == len(self.nodes) and all(
            uid in self.read for uid in self.ready_uids()
        )

    def uid_of(self, name: str) -> str:
        return self.names[name]

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for pod in self.pods():
                    self._step(pod)
                self._stop.wait(0.05)
        except BaseException as exc:  # surfaced by stop()
            self._error = exc

    def _step(self, pod: dict[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        metadata, spec = pod["metadata"], pod["spec"]
        name, uid = metadata["name"], metadata["uid"]
        try:
            if metadata.get("deletionTimestamp"):
                self.core.delete_namespaced_pod(
                    name, self.namespace, _preload_content=False,
                    body={"gracePeriodSeconds": 0, "preconditions": {"uid": uid}},
                )  # fmt: skip
            elif not spec.get("nodeName"):
                terms = spec["affinity"]["nodeAffinity"][
                    "requiredDuringSchedulingIgnoredDuringExecution"
                ]["nodeSelectorTerms"]
                node = terms[0]["matchFields"][0]["values"][0]
                if node in self.nodes:
                    self.core.create_namespaced_pod_binding(
                        name, self.namespace,
                        {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": node}},
                        _preload_content=False,
                    )  # fmt: skip
            elif uid not in self.read and spec["nodeName"] in self.nodes:
                token = secret_token(self.k8s, self.namespace)
                if token is None:
                    return  # CreateContainerConfigError until the Secret has a token
                self.read[uid] = fingerprint(token)
                self.names[name] = uid
                self.core.patch_namespaced_pod_status(
                    name, self.namespace, running_status(pod),
                    _content_type="application/merge-patch+json", _preload_content=False,
                )  # fmt: skip
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone or changed meanwhile: the next pass sees it
                raise


def running_status(pod: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    container = pod["spec"]["containers"][0]
    conditions = [
        {"type": kind, "status": "True", "lastTransitionTime": now}
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    return {
        "status": {
            "phase": "Running",
            "startTime": now,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "conditions": conditions,
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "containerID": f"containerd://{uuid.uuid4().hex}",
                    "ready": True,
                    "started": True,
                    "restartCount": 0,
                    "state": {"running": {"startedAt": now}},
                }
            ],
        }
    }
