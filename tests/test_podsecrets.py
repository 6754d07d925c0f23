"""``lg-rotate watch`` and the per-pod Secrets of the admission webhook, on a real control plane.

The Secrets and pods are made as the webhook makes them (``podsecrets.pod_secret_body``, the
``linuxguard.io/enroll-secret`` annotation, ``secretKeyRef``s to the pod's own Secret); the test
plays the kubelet (pod status through the status subresource). What is shown, each on the real
API server (tests/fixtures/cluster.py): adoption by ownerReference and real garbage collection
with the pod; orphans deleted after the (injected) adoption grace, and nothing else; a token
refreshed before expiry while its pod's agent has not started, never once it has; per-pod pods
not counted as consumers of the shared Secret; and, under the real RBAC of cronjob/, a watch
without the per-pod rights that says so once and keeps the shared Secret, then manages the
per-pod Secrets once the component's Role is bound. Time moves with the sandbox's clock (the
controller's clock too), never with sleeps.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from fixtures.cluster import Cluster, wait_for
from fixtures.controllers import Running
from podsim import TENANT, make_controller, make_rotator
from providers.base import Stage, StoredRecord
from providers.memory import MemoryProvider, MemoryStore
from rotator import agent
from rotator.kube.api import connect
from rotator.kube.controller import Controller
from rotator.kube.lease import LeaseLock
from rotator.kube.podsecret_keeper import agent_started, per_pod_store_tenant, shared_consumers
from rotator.kube.podsecrets import (
    ANNOTATION_POD,
    ENROLL_SECRET_ANNOTATION,
    pod_secret_body,
    pod_secret_name,
)
from rotator.kube.secret import SecretTarget
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Rotator
from rotator.sandbox import SandboxServer
from rotator.targets import Delivery
from rotator.tokens import Secret, format_timestamp

ROOT = Path(__file__).resolve().parent.parent
SHARED = "linuxguard-enroll"
FINGERPRINT = "linuxguard.io/token-sha256"
APP = {"app": "linuxguard-agent"}


# --- building what the webhook builds ------------------------------------------------------


def mint(sandbox: SandboxServer, *, ttl: int = 600) -> StoredRecord:
    """A token from the sandbox, as the webhook would have stored it."""
    minter = LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=2),
        clock=sandbox.now,
    )
    token = minter.mint(tenant_id=TENANT, min_ttl=timedelta(0), ttl_seconds=ttl)
    return StoredRecord(token=token, rotation_id=str(uuid.uuid4()), version="0", stage=None)


def create_pod_secret(
    k8s: Cluster,
    namespace: str,
    sandbox: SandboxServer,
    *,
    pod_label: str = "linuxguard-agent-*",
    ttl: int = 600,
    shared: str = SHARED,
) -> str:
    admission_uid = str(uuid.uuid4())
    name = pod_secret_name(shared, admission_uid)
    record = mint(sandbox, ttl=ttl)
    body = pod_secret_body(
        name=name,
        namespace=namespace,
        shared_secret=shared,
        delivery=Delivery(record=record, source="memory:0", rotated_at=sandbox.now()),
        token_key="token",
        tenant_key="tenant-id",
        admission_uid=admission_uid,
        pod_label=pod_label,
    )
    client.CoreV1Api(k8s.api_client()).create_namespaced_secret(
        namespace, body, _preload_content=False
    )
    return name


def env_from(secret: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "LINUXGUARD_ENROLL_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
        },
        {
            "name": "LINUXGUARD_TENANT_ID",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "tenant-id"}},
        },
    ]


def create_pod(
    k8s: Cluster,
    namespace: str,
    name: str,
    *,
    secret: str | None,
    sidecar_reads: str | None = None,
    annotate: bool = True,
) -> str:
    """An agent pod as admitted: annotated and pointed at ``secret`` (None: the shared one,
    no annotation). A ``sidecar`` container reads ``sidecar_reads`` (or nothing). Unscheduled,
    so that a delete removes it at once (no kubelet here)."""
    metadata: dict[str, Any] = {"name": name, "labels": dict(APP)}
    if secret is not None and annotate:
        metadata["annotations"] = {ENROLL_SECRET_ANNOTATION: secret}
    sidecar: dict[str, Any] = {"name": "sidecar", "image": "busybox"}
    if sidecar_reads:
        sidecar["env"] = env_from(sidecar_reads)[:1]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "containers": [
                {"name": "agent", "image": "linuxguard-agent", "env": env_from(secret or SHARED)},
                sidecar,
            ]
        },
    }
    created = client.CoreV1Api(k8s.api_client()).create_namespaced_pod(
        namespace, body, _preload_content=False
    )
    return str(json.loads(created.data)["metadata"]["uid"])


def start(k8s: Cluster, namespace: str, pod: str, container: str = "agent") -> None:
    """Play the kubelet: ``container`` runs now (others are waiting for their image)."""
    now = format_timestamp(datetime.now().astimezone())
    statuses = []
    for name in ("agent", "sidecar"):
        state: dict[str, Any] = (
            {"running": {"startedAt": now}}
            if name == container
            else {"waiting": {"reason": "ContainerCreating"}}
        )
        statuses.append(
            {
                "name": name,
                "image": name,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": state,
                **(
                    {"containerID": f"containerd://{uuid.uuid4().hex}"}
                    if "running" in state
                    else {}
                ),
            }
        )
    client.CoreV1Api(k8s.api_client()).patch_namespaced_pod_status(
        pod,
        namespace,
        {"status": {"phase": "Pending", "containerStatuses": statuses}},
        _preload_content=False,
    )


def secret_of(k8s: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    return k8s.get("v1/secrets", namespace, name)


def fingerprint_of(k8s: Cluster, namespace: str, name: str) -> str:
    secret = secret_of(k8s, namespace, name)
    assert secret is not None, name
    return str(secret["metadata"]["annotations"][FINGERPRINT])


def owner_uids(k8s: Cluster, namespace: str, name: str) -> list[str]:
    secret = secret_of(k8s, namespace, name) or {}
    return [ref["uid"] for ref in secret.get("metadata", {}).get("ownerReferences") or []]


def keeper_of(controller: Controller) -> Any:
    keeper = controller.pod_secret_keeper
    assert keeper is not None
    return keeper


def passes(controller: Controller, more: int) -> None:
    """Wait until the per-pod thread has listed the Secrets ``more`` more times."""
    keeper = keeper_of(controller)
    target = keeper.status().passes + more
    wait_for(lambda: keeper.status().passes >= target, what=f"{more} per-pod passes")


def controller_for(
    k8s: Cluster, namespace: str, sandbox: SandboxServer, **overrides: Any
) -> Controller:
    settings: dict[str, Any] = {
        "metrics_port": None,
        "events": False,
        "pod_secret_resync": 0.1,
    }
    settings.update(overrides)
    return make_controller(k8s, namespace, sandbox, **settings)  # type: ignore[arg-type]


# --- the pure parts ---------------------------------------------------------------------------


def pod_doc(statuses: list[dict[str, Any]], *, phase: str = "Pending") -> dict[str, Any]:
    return {
        "metadata": {"annotations": {ENROLL_SECRET_ANNOTATION: "own"}},
        "spec": {
            "initContainers": [{"name": "init", "image": "x"}],
            "containers": [
                {"name": "agent", "image": "a", "env": env_from("own")},
                {"name": "helper", "image": "h", "envFrom": [{"secretRef": {"name": SHARED}}]},
            ],
        },
        "status": {"phase": phase, "containerStatuses": statuses},
    }


def test_which_containers_started_with_which_secret() -> None:
    waiting = {"name": "agent", "state": {"waiting": {"reason": "ContainerCreating"}}}
    helper_running = {"name": "helper", "state": {"running": {"startedAt": "2030-01-01T00:00:00Z"}}}
    assert not agent_started(pod_doc([waiting, helper_running]), "own")  # only the helper ran
    for started in (
        {"name": "agent", "state": {"running": {}}},
        {"name": "agent", "state": {"terminated": {"exitCode": 1}}},
        {"name": "agent", "state": {"waiting": {}}, "lastState": {"terminated": {}}},
        {"name": "agent", "state": {"waiting": {}}, "restartCount": 2},
    ):
        assert agent_started(pod_doc([started]), "own"), started
    assert agent_started(pod_doc([waiting], phase="Failed"), "own")
    # The shared Secret: only the helper still reads it (envFrom).
    assert shared_consumers(pod_doc([]), SHARED) == {"helper"}
    plain = pod_doc([])
    del plain["metadata"]["annotations"]
    assert shared_consumers(plain, SHARED) is None  # no annotation: every container, as before


# --- adoption and garbage collection -----------------------------------------------------------


def test_a_pod_adopts_its_secret_and_garbage_collection_takes_it_along(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, running: Callable[..., Running]
) -> None:
    k8s.require_controllers()
    secret = create_pod_secret(k8s, k8s_namespace, sandbox)
    before = secret_of(k8s, k8s_namespace, secret)
    assert before is not None
    controller = controller_for(k8s, k8s_namespace, sandbox)
    runner = running(controller)
    uid = create_pod(k8s, k8s_namespace, "linuxguard-agent-x7k2p", secret=secret)

    wait_for(lambda: owner_uids(k8s, k8s_namespace, secret) == [uid], what="the adoption")
    adopted = secret_of(k8s, k8s_namespace, secret)
    assert adopted is not None
    assert adopted["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "linuxguard-agent-x7k2p",
            "uid": uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }
    ]
    assert adopted["metadata"]["annotations"][ANNOTATION_POD] == "linuxguard-agent-x7k2p"
    assert adopted["data"] == before["data"]  # the token is the pod's, untouched
    assert controller.metrics.pod_secrets.value(action="adopted") == 1
    # The shared Secret is kept too (it was missing: a first rotation creates it).
    wait_for(lambda: controller.status().rotations == 1, what="the shared Secret's rotation")

    # The controller is gone: only the garbage collector can remove the Secret now.
    runner.stop()
    k8s.delete("v1/pods", k8s_namespace, "linuxguard-agent-x7k2p")
    wait_for(
        lambda: secret_of(k8s, k8s_namespace, secret) is None,
        timeout=60,
        what="garbage collection of the per-pod Secret",
    )


def test_a_secret_made_for_another_pod_or_owned_by_one_is_not_adopted(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, running: Callable[..., Running]
) -> None:
    made_for_other = create_pod_secret(k8s, k8s_namespace, sandbox, pod_label="other-agent-*")
    owned = create_pod_secret(k8s, k8s_namespace, sandbox)
    owner = create_pod(k8s, k8s_namespace, "linuxguard-agent-owner", secret=owned)
    controller = controller_for(k8s, k8s_namespace, sandbox)
    running(controller)
    wait_for(lambda: owner_uids(k8s, k8s_namespace, owned) == [owner], what="the owner's adoption")
    # Two more pods name Secrets that are not theirs (copied specs, forged annotations).
    create_pod(k8s, k8s_namespace, "linuxguard-agent-copy", secret=owned)
    create_pod(k8s, k8s_namespace, "linuxguard-agent-b", secret=made_for_other)
    passes(controller, 3)
    assert owner_uids(k8s, k8s_namespace, owned) == [owner]
    assert owner_uids(k8s, k8s_namespace, made_for_other) == []


# --- orphans ----------------------------------------------------------------------------------


def test_an_unadopted_secret_older_than_the_grace_is_deleted_and_nothing_else(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, running: Callable[..., Running]
) -> None:
    orphan = create_pod_secret(k8s, k8s_namespace, sandbox)
    named = create_pod_secret(k8s, k8s_namespace, sandbox)
    create_pod(k8s, k8s_namespace, "linuxguard-agent-n", secret=named)
    foreign = create_pod_secret(k8s, k8s_namespace, sandbox, shared="other-enroll")
    # Read by a pod (env) that does not name it (its annotation edited away): in use, kept.
    read = create_pod_secret(k8s, k8s_namespace, sandbox)
    create_pod(k8s, k8s_namespace, "edited", secret=read, annotate=False)
    k8s.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "unrelated"},
            "stringData": {"a": "b"},
        },
        k8s_namespace,
    )
    controller = controller_for(k8s, k8s_namespace, sandbox, adoption_grace=30)
    running(controller)
    passes(controller, 3)
    for name in (orphan, named, foreign, read, "unrelated"):
        assert secret_of(k8s, k8s_namespace, name) is not None, name  # within the grace

    sandbox.advance_clock(31)  # the controller's clock: the orphan is 31 s old now
    wait_for(lambda: secret_of(k8s, k8s_namespace, orphan) is None, what="the orphan's deletion")
    passes(controller, 2)
    for name in (named, foreign, read, "unrelated"):
        assert secret_of(k8s, k8s_namespace, name) is not None, name
    assert controller.metrics.pod_secrets.value(action="deleted") == 1
    assert keeper_of(controller).status().deleted == 1


# --- refresh ---------------------------------------------------------------------------------


def test_an_unstarted_pods_token_is_refreshed_before_expiry_and_a_started_ones_never(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, running: Callable[..., Running]
) -> None:
    slow = create_pod_secret(k8s, k8s_namespace, sandbox, ttl=60)  # image still pulling
    fast = create_pod_secret(k8s, k8s_namespace, sandbox, ttl=60)  # agent already running
    slow_uid = create_pod(k8s, k8s_namespace, "linuxguard-agent-slow", secret=slow)
    create_pod(k8s, k8s_namespace, "linuxguard-agent-fast", secret=fast)
    start(k8s, k8s_namespace, "linuxguard-agent-slow", container="sidecar")  # not the agent
    start(k8s, k8s_namespace, "linuxguard-agent-fast", container="agent")
    slow_first = fingerprint_of(k8s, k8s_namespace, slow)
    fast_first = fingerprint_of(k8s, k8s_namespace, fast)
    rotator = make_rotator(k8s, k8s_namespace, sandbox)  # type: ignore[arg-type]
    controller = controller_for(k8s, k8s_namespace, sandbox, rotator=rotator)
    running(controller)
    wait_for(
        lambda: (
            owner_uids(k8s, k8s_namespace, slow) == [slow_uid]
            and owner_uids(k8s, k8s_namespace, fast) != []
        ),
        what="both adoptions",
    )

    sandbox.advance_clock(40)  # 20 s of 60 left: more than the 20 % margin
    passes(controller, 3)
    assert fingerprint_of(k8s, k8s_namespace, slow) == slow_first
    mints = len(sandbox.minted())

    sandbox.advance_clock(10)  # 10 s left: due
    wait_for(lambda: fingerprint_of(k8s, k8s_namespace, slow) != slow_first, what="the refresh")
    refreshed = secret_of(k8s, k8s_namespace, slow)
    assert refreshed is not None
    annotations = refreshed["metadata"]["annotations"]
    expires = datetime.fromisoformat(annotations["linuxguard.io/expires-at"].replace("Z", "+00:00"))
    assert (expires - sandbox.now()).total_seconds() > 500  # a fresh 600 s token
    assert annotations[ANNOTATION_POD] == "linuxguard-agent-slow"  # the tie to its pod stays
    assert len(sandbox.minted()) == mints + 1
    # The store recorded it, on the per-pod chain, not the shared Secret's.
    provider = rotator.provider
    stored = provider.read(tenant=per_pod_store_tenant(TENANT), stage=Stage.CURRENT)
    assert stored is not None
    assert stored.fingerprint == annotations[FINGERPRINT]
    assert annotations["linuxguard.io/source"] == f"memory:{TENANT}-per-pod/{stored.version}"
    shared = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert shared is not None
    assert shared.fingerprint == fingerprint_of(k8s, k8s_namespace, SHARED)
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None  # nothing to resume
    # The agent enrols with what its Secret now holds.
    token = base64.b64decode(refreshed["data"]["token"]).decode()
    enrolled = agent.enroll(
        url=sandbox.url, tenant_id=TENANT, token=Secret(token), workload_id=slow_uid
    )
    assert enrolled.result == "enrolled"

    # The started pod's token is never touched, not even once it has expired.
    sandbox.advance_clock(30)
    passes(controller, 3)
    assert fingerprint_of(k8s, k8s_namespace, fast) == fast_first
    # Once the slow agent starts, its (refreshed) token stays too, however old it gets.
    start(k8s, k8s_namespace, "linuxguard-agent-slow", container="agent")
    slow_second = fingerprint_of(k8s, k8s_namespace, slow)
    passes(controller, 2)
    sandbox.advance_clock(590)
    passes(controller, 3)
    assert fingerprint_of(k8s, k8s_namespace, slow) == slow_second
    assert controller.metrics.pod_secrets.value(action="refreshed") == 1


# --- the shared Secret ------------------------------------------------------------------------


def test_per_pod_pods_do_not_trigger_shared_rotations(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, running: Callable[..., Running]
) -> None:
    controller = controller_for(k8s, k8s_namespace, sandbox)
    running(controller)
    wait_for(
        lambda: controller.status().idle and controller.status().rotations == 1,
        what="the shared Secret's first rotation",
    )
    shared_first = fingerprint_of(k8s, k8s_namespace, SHARED)

    own = create_pod_secret(k8s, k8s_namespace, sandbox)
    own_uid = create_pod(k8s, k8s_namespace, "linuxguard-agent-own", secret=own)
    start(k8s, k8s_namespace, "linuxguard-agent-own")
    wait_for(lambda: owner_uids(k8s, k8s_namespace, own) == [own_uid], what="the adoption")
    passes(controller, 2)
    wait_for(lambda: controller.status().idle, what="the controller to settle")
    assert controller.status().rotations == 1
    assert controller.metrics.starts.value() == 0
    assert fingerprint_of(k8s, k8s_namespace, SHARED) == shared_first

    # A pod that still reads the shared Secret (here a sidecar of an annotated pod, then a
    # plain pod) keeps today's rule: its start consumes the shared token, which is rotated.
    mixed = create_pod_secret(k8s, k8s_namespace, sandbox)
    create_pod(k8s, k8s_namespace, "linuxguard-agent-mixed", secret=mixed, sidecar_reads=SHARED)
    start(k8s, k8s_namespace, "linuxguard-agent-mixed", container="sidecar")
    wait_for(lambda: controller.status().rotations == 2, what="a rotation after the sidecar")
    create_pod(k8s, k8s_namespace, "linuxguard-agent-plain", secret=None)
    start(k8s, k8s_namespace, "linuxguard-agent-plain")
    wait_for(lambda: controller.status().rotations == 3, what="a rotation after the plain pod")
    assert controller.metrics.starts.value() == 2


# --- RBAC: the base watch Role alone, then with the per-pod component ---------------------------


def manifest(path: str, kind: str, name: str, namespace: str) -> dict[str, Any]:
    """One object of a file of cronjob/, put in ``namespace`` (kustomize would)."""
    for doc in yaml.safe_load_all((ROOT / path).read_text()):
        if doc and doc["kind"] == kind and doc["metadata"]["name"] == name:
            doc["metadata"]["namespace"] = namespace
            for subject in doc.get("subjects") or []:
                subject["namespace"] = namespace
            return dict(doc)
    raise AssertionError(f"{kind}/{name} not in {path}")


def test_without_the_per_pod_rights_watch_says_so_once_and_keeps_the_shared_secret(
    k8s: Cluster,
    k8s_namespace: str,
    sandbox: SandboxServer,
    running: Callable[..., Running],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # cronjob/base's watch Role and binding, and the empty shared Secret (it has no create).
    for path, kind, name in (
        ("cronjob/base/rbac.yaml", "Role", "lg-rotate-watch"),
        ("cronjob/base/rbac.yaml", "RoleBinding", "lg-rotate-watch"),
        ("cronjob/base/secret.yaml", "Secret", SHARED),
    ):
        k8s.apply(manifest(path, kind, name, k8s_namespace))
    kubeconfig = k8s.serviceaccount_kubeconfig(k8s_namespace, "lg-rotate-watch", tmp_path / "kc")
    api = connect(kubeconfig=str(kubeconfig))
    wait_for(
        lambda: (
            k8s.kubectl(
                "auth", "can-i", "list", "pods", kubeconfig=kubeconfig, check=False
            ).returncode
            == 0
        ),
        what="the watch Role to take effect",
    )
    rotator = Rotator(
        minter=LinuxGuardClient(
            base_url=sandbox.url,
            api_key=Secret(sandbox.api_key),
            retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=2),
            clock=sandbox.now,
        ),
        provider=MemoryProvider(store=MemoryStore()),
        tenant=TENANT,
        target=SecretTarget(api_client=api, namespace=k8s_namespace),
        lock=LeaseLock(api_client=api, namespace=k8s_namespace, wait=10, poll_interval=0.02),
        clock=sandbox.now,
    )
    controller = Controller(
        api_client=api,
        namespace=k8s_namespace,
        selector="app=linuxguard-agent",
        rotator=rotator,
        target=rotator.target,  # type: ignore[arg-type]
        lease_retry_period=0.2,
        tick=0.1,
        max_backoff=1.0,
        metrics_port=None,
        events=False,
        clock=sandbox.now,
        pod_secret_resync=0.1,
    )
    keeper = keeper_of(controller)
    keeper.forbidden_retry = 0.2
    caplog.set_level(logging.INFO, logger="lg_rotate.controller")

    def said() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "per-pod Secrets are not managed" in r.getMessage()]

    running(controller)
    wait_for(
        lambda: controller.status().rotations == 1 and keeper.status().forbidden,
        what="the shared rotation and the refused list",
    )
    wait_for(lambda: len(said()) == 1, what="the message")
    assert said()[0].levelno == logging.INFO  # no per-pod pod yet: nothing is lost
    # A pod admitted by the webhook shows up: now it matters, said once more as a warning.
    secret = create_pod_secret(k8s, k8s_namespace, sandbox)
    uid = create_pod(k8s, k8s_namespace, "linuxguard-agent-w", secret=secret)
    wait_for(lambda: len(said()) == 2, what="the warning")
    assert said()[1].levelno == logging.WARNING
    refusals = keeper.status().refusals
    wait_for(lambda: keeper.status().refusals >= refusals + 3, what="refused retries")
    assert len(said()) == 2  # retried quietly
    assert controller.status().failures == 0

    # The optional component's Role for watch: the Secret is adopted, as that ServiceAccount.
    for kind in ("Role", "RoleBinding"):
        k8s.apply(
            manifest(
                "cronjob/components/per-pod/rbac.yaml",
                kind,
                "lg-rotate-watch-per-pod",
                k8s_namespace,
            )
        )
    wait_for(
        lambda: owner_uids(k8s, k8s_namespace, secret) == [uid],
        timeout=30,
        what="the adoption under the component's Role",
    )
    assert not keeper.status().forbidden
    assert len(said()) == 2


# --- the component's objects on the real API server ---------------------------------------------


def rendered_variant() -> list[dict[str, Any]]:
    """cronjob/overlays/vault with the per-pod component, as .ci/manifests.py renders it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ci_manifests", ROOT / ".ci" / "manifests.py")
    assert spec is not None
    assert spec.loader is not None
    manifests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manifests)
    return list(manifests.documents(manifests.render_variant("cronjob/overlays/vault+per-pod")))


def test_the_components_objects_are_accepted_by_the_api_server(
    k8s: Cluster, k8s_namespace: str
) -> None:
    """Server-side dry run of the overlay with the component (all but cert-manager's objects:
    no CRDs here) in a test namespace: field validation, the webhook configuration's rules,
    the admission policies' CEL."""
    docs = [d for d in rendered_variant() if not d["apiVersion"].startswith("cert-manager.io/")]
    for doc in docs:
        if doc["metadata"].get("namespace"):
            doc["metadata"]["namespace"] = k8s_namespace
    text = "\n---\n".join(yaml.safe_dump(d) for d in docs)
    result = k8s.kubectl(
        "apply", "--dry-run=server", "--server-side", "--field-manager=test", "-f", "-",
        input=text, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    for name in (
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/lg-rotate-per-pod",
        "validatingadmissionpolicy.admissionregistration.k8s.io/lg-rotate-per-pod-secrets",
        "deployment.apps/lg-rotate-webhook",
        "service/lg-rotate-webhook",
    ):
        assert name in result.stdout


def test_the_admission_policy_limits_the_per_pod_secret_writes(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """RBAC lets both ServiceAccounts write any Secret of the namespace; the component's
    ValidatingAdmissionPolicy takes that back for everything but per-pod Secrets (and, for
    watch, the shared Secret)."""
    from kubernetes.client.exceptions import ApiException

    policy = "cronjob/components/per-pod/admission-policy.yaml"
    for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"):
        doc = manifest(policy, kind, "lg-rotate-per-pod-secrets", k8s_namespace)
        del doc["metadata"]["namespace"]  # cluster-scoped
        k8s.apply(doc)
    try:
        for path, kind, name in (
            ("cronjob/base/rbac.yaml", "Role", "lg-rotate-watch"),
            ("cronjob/base/rbac.yaml", "RoleBinding", "lg-rotate-watch"),
            ("cronjob/components/per-pod/rbac.yaml", "Role", "lg-rotate-watch-per-pod"),
            ("cronjob/components/per-pod/rbac.yaml", "RoleBinding", "lg-rotate-watch-per-pod"),
            ("cronjob/components/per-pod/rbac.yaml", "Role", "lg-rotate-webhook"),
            ("cronjob/components/per-pod/rbac.yaml", "RoleBinding", "lg-rotate-webhook"),
        ):
            k8s.apply(manifest(path, kind, name, k8s_namespace))
        apis = {}
        for account in ("lg-rotate-webhook", "lg-rotate-watch"):
            kubeconfig = k8s.serviceaccount_kubeconfig(k8s_namespace, account, tmp_path / account)
            apis[account] = client.CoreV1Api(connect(kubeconfig=str(kubeconfig)))
            wait_for(
                lambda kc=kubeconfig: (
                    k8s.kubectl(  # type: ignore[misc]
                        "auth", "can-i", "delete", "secrets", kubeconfig=kc, check=False
                    ).returncode
                    == 0
                ),
                what=f"the Role of {account} to take effect",
            )
        as_webhook, as_watch = apis["lg-rotate-webhook"], apis["lg-rotate-watch"]

        def denial(call: Callable[[], Any]) -> str:
            """The policy's refusal (the call must fail with it)."""
            with pytest.raises(ApiException) as refused:
                call()
            assert refused.value.status in (403, 422), refused.value.status
            return str(refused.value.body)

        plain = {"metadata": {"name": "not-per-pod"}, "stringData": {"k": "v"}}

        def in_force() -> bool:  # the policy's informer takes a moment too
            try:
                as_webhook.create_namespaced_secret(k8s_namespace, plain)
            except ApiException as exc:
                return "lg-rotate-per-pod-secrets" in str(exc.body)
            k8s.delete("v1/secrets", k8s_namespace, "not-per-pod")
            return False

        wait_for(in_force, what="the admission policy to be in force")

        # The webhook creates and deletes per-pod Secrets.
        own = create_pod_secret(k8s, k8s_namespace, sandbox)
        copy = json.loads(json.dumps(secret_of(k8s, k8s_namespace, own)))
        copy["metadata"] = {key: copy["metadata"][key] for key in ("labels", "annotations")}
        copy["metadata"]["name"] = f"{own}x"
        as_webhook.create_namespaced_secret(k8s_namespace, copy)
        as_webhook.delete_namespaced_secret(f"{own}x", k8s_namespace)
        # Nothing else: RBAC allows each of these, the policy refuses them.
        k8s.apply(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-db"}},
            k8s_namespace,
        )
        take_over = {
            "metadata": {
                "labels": {"linuxguard.io/per-pod": "true", "linuxguard.io/shared-secret": SHARED}
            }
        }
        for call in (
            lambda: as_webhook.delete_namespaced_secret("app-db", k8s_namespace),
            lambda: as_watch.delete_namespaced_secret("app-db", k8s_namespace),
            lambda: as_watch.patch_namespaced_secret(
                "app-db", k8s_namespace, {"metadata": {"annotations": {"x": "y"}}}
            ),
            lambda: as_watch.patch_namespaced_secret("app-db", k8s_namespace, take_over),
            lambda: as_watch.patch_namespaced_secret(  # a per-pod Secret stays one
                own, k8s_namespace, {"metadata": {"labels": {"linuxguard.io/per-pod": None}}}
            ),
        ):
            assert "lg-rotate-per-pod-secrets" in denial(call)
        assert secret_of(k8s, k8s_namespace, "app-db") is not None
        # watch's own work passes: per-pod Secrets, and the shared Secret.
        as_watch.patch_namespaced_secret(
            own, k8s_namespace, {"metadata": {"annotations": {"linuxguard.io/pod": "p"}}}
        )
        k8s.apply(manifest("cronjob/base/secret.yaml", "Secret", SHARED, k8s_namespace))
        as_watch.patch_namespaced_secret(
            SHARED, k8s_namespace, {"metadata": {"annotations": {"linuxguard.io/rotation-id": "r"}}}
        )
        as_watch.delete_namespaced_secret(own, k8s_namespace)
    finally:
        for kind in ("validatingadmissionpolicybindings", "validatingadmissionpolicies"):
            k8s.delete(f"admissionregistration.k8s.io/v1/{kind}", None, "lg-rotate-per-pod-secrets")
