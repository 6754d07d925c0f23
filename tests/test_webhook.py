"""``lg-rotate webhook``: the review logic in isolation, then the real API server calling it.

The first part tests the pure functions (plan, patch, selector, answer) and the store records
(sharding, pruning, two replicas on a real OpenBao). The rest runs on the real control plane
(tests/fixtures/cluster.py): a MutatingWebhookConfiguration points the API server at the
webhook served in this process (or as a ``lg-rotate webhook`` subprocess) over HTTPS with a
test CA, and the tests create pods through the API server, which calls the webhook itself.
The kubelet is played by :class:`webhooksim.Kubelet` (resolve the env from the pod's
``secretKeyRef``s at container start, enrol with the sandbox as the pod's UID).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from fixtures.cluster import Cluster
from fixtures.ports import free_port
from providers.base import Stage
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import ConfigError, StoreUnavailableError
from rotator.kube import webhook
from rotator.kube.podsecrets import (
    ANNOTATION_ADMISSION_UID,
    ANNOTATION_POD,
    ENROLL_SECRET_ANNOTATION,
    PER_POD_LABEL,
    SHARED_SECRET_LABEL,
    per_pod_selector,
    pod_secret_name,
)
from rotator.kube.webhook import (
    AdmissionRecords,
    LabelSelector,
    ReloadingTls,
    ReviewError,
    WebhookPolicy,
    json_patch,
    parse_review,
    plan_admission,
)
from rotator.sandbox import SandboxServer
from rotator.tokens import EnrollToken, utcnow
from webhooksim import (
    SHARED_SECRET,
    TENANT,
    Kubelet,
    Pki,
    RoundRobinProxy,
    agent_daemonset,
    agent_pod,
    read_json,
    shared_secret,
    start_webhook,
    wait_for,
    wait_until_mutating,
    webhook_configuration,
    widen_pool,
)

NAMESPACE = "agents"
UID = "6f1c9b1e-2a4d-4c1e-9d7a-0123456789ab"


# --- pure functions -----------------------------------------------------------------------


def review(pod: dict[str, Any], **request: Any) -> dict[str, Any]:
    body = {
        "uid": UID,
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "operation": "CREATE",
        "namespace": NAMESPACE,
        "object": pod,
        "dryRun": False,
    }
    body.update(request)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": body}


def apply_patch(document: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/replace, enough for the webhook's patches (a reference implementation)."""
    result = json.loads(json.dumps(document))
    for op in patch:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = result
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if op["op"] == "replace":
            key: Any = int(last) if isinstance(parent, list) else last
            assert key in range(len(parent)) if isinstance(parent, list) else key in parent
            parent[key] = op["value"]
        elif op["op"] == "add":
            parent[last] = op["value"]
        else:  # pragma: no cover
            raise AssertionError(op)
    return result


def secret_refs(pod: dict[str, Any]) -> list[str]:
    spec = pod["spec"]
    names = []
    for container in [*(spec.get("initContainers") or []), *spec["containers"]]:
        for var in container.get("env") or []:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                names.append(ref["name"])
        for source in container.get("envFrom") or []:
            if source.get("secretRef"):
                names.append(source["secretRef"]["name"])
    return names


POLICY = WebhookPolicy(namespace=NAMESPACE, shared_secret=SHARED_SECRET)
OWN = pod_secret_name(SHARED_SECRET, UID)


def test_an_agent_pod_gets_its_own_secret_in_every_reference_and_an_annotation() -> None:
    pod = agent_pod()
    pod["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": SHARED_SECRET}}]
    pod["spec"]["containers"].append({"name": "sidecar", "image": "x", "env": []})

    plan = plan_admission(parse_review(review(pod)), POLICY)
    patched = apply_patch(pod, json_patch(pod, plan))

    assert plan.action == "provision"
    assert plan.secret_name == OWN == f"{SHARED_SECRET}-6f1c9b1e2a4d"
    assert secret_refs(patched) == [OWN] * 5  # initContainer (2), container env (2) + envFrom
    assert patched["metadata"]["annotations"] == {ENROLL_SECRET_ANNOTATION: OWN}
    assert patched["spec"]["containers"][1] == pod["spec"]["containers"][1]


def test_existing_annotations_are_kept() -> None:
    pod = agent_pod()
    pod["metadata"]["annotations"] = {"team": "sec"}
    plan = plan_admission(parse_review(review(pod)), POLICY)
    patched = apply_patch(pod, json_patch(pod, plan))
    assert patched["metadata"]["annotations"] == {"team": "sec", ENROLL_SECRET_ANNOTATION: OWN}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"namespace": "elsewhere"}, "namespace"),
        ({"operation": "UPDATE"}, "UPDATE"),
        ({"kind": {"kind": "Secret"}, "resource": {"resource": "secrets"}}, "not a pod"),
        ({"subResource": "ephemeralcontainers"}, "not a pod"),
    ],
)
def test_other_requests_pass_unchanged(change: dict[str, Any], reason: str) -> None:
    plan = plan_admission(parse_review(review(agent_pod(), **change)), POLICY)
    assert plan.action == "skip"
    assert reason in plan.reason


def test_a_pod_without_a_reference_to_the_shared_secret_is_left_alone() -> None:
    pod = agent_pod()
    for container in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
        for var in container["env"]:
            if "secretKeyRef" in var["valueFrom"]:
                var["valueFrom"]["secretKeyRef"]["name"] = "something-else"
    assert plan_admission(parse_review(review(pod)), POLICY).action == "skip"


def test_the_selector_limits_which_pods_are_ours() -> None:
    policy = WebhookPolicy(
        namespace=NAMESPACE,
        shared_secret=SHARED_SECRET,
        selector=LabelSelector.parse("app=linuxguard-agent,tier notin (canary)"),
    )
    pod = agent_pod()
    assert plan_admission(parse_review(review(pod)), policy).action == "provision"
    pod["metadata"]["labels"]["tier"] = "canary"
    assert plan_admission(parse_review(review(pod)), policy).action == "skip"


@pytest.mark.parametrize(
    ("selector", "labels", "matches"),
    [
        ("app=a", {"app": "a"}, True),
        ("app==a", {"app": "b"}, False),
        ("app!=a", {}, True),
        ("app in (a, b),env", {"app": "b", "env": "x"}, True),
        ("app in (a,b),!env", {"app": "b", "env": "x"}, False),
        ("app notin (a)", {"app": "a"}, False),
        ("example.com/role", {"example.com/role": ""}, True),
        ("", {"anything": "x"}, True),
    ],
)
def test_label_selectors(selector: str, labels: dict[str, str], matches: bool) -> None:
    assert LabelSelector.parse(selector).matches(labels) is matches


@pytest.mark.parametrize("selector", ["app in (a", "app=a=b", "!app=a", "=a"])
def test_a_malformed_selector_is_a_config_error(selector: str) -> None:
    with pytest.raises(ConfigError):
        LabelSelector.parse(selector)


def test_a_reinvocation_changes_nothing_and_mints_nothing() -> None:
    pod = agent_pod()
    first = plan_admission(parse_review(review(pod)), POLICY)
    admitted = apply_patch(pod, json_patch(pod, first))

    again = plan_admission(parse_review(review(admitted)), POLICY)

    assert again.action == "skip"
    assert "already" in again.reason


def test_a_reinvocation_repoints_references_another_webhook_added() -> None:
    pod = agent_pod()
    admitted = apply_patch(pod, json_patch(pod, plan_admission(parse_review(review(pod)), POLICY)))
    admitted["spec"]["containers"].append(
        {"name": "late", "image": "x", "envFrom": [{"secretRef": {"name": SHARED_SECRET}}]}
    )

    plan = plan_admission(parse_review(review(admitted)), POLICY)
    patched = apply_patch(admitted, json_patch(admitted, plan))

    assert plan.action == "repoint"  # no mint: the Secret exists since the first call
    assert set(secret_refs(patched)) == {OWN}


def test_a_pod_copied_from_another_pod_gets_a_fresh_secret() -> None:
    pod = agent_pod()
    other_uid = str(uuid.uuid4())
    admitted = apply_patch(
        pod, json_patch(pod, plan_admission(parse_review(review(pod, uid=other_uid)), POLICY))
    )

    plan = plan_admission(parse_review(review(admitted)), POLICY)  # same spec, new admission
    patched = apply_patch(admitted, json_patch(admitted, plan))

    assert plan.action == "provision"
    assert set(secret_refs(patched)) == {OWN}
    assert patched["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION] == OWN


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {}},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}},
    ],
)
def test_what_is_not_a_v1_admission_review_is_refused(document: Any) -> None:
    with pytest.raises(ReviewError):
        parse_review(document)


def test_a_denial_and_a_fallback_say_why() -> None:
    denied = webhook.review_response(UID, allowed=False, code=503, message="LinuxGuard down")
    assert denied["response"]["status"] == {
        "code": 503,
        "message": "LinuxGuard down",
        "status": "Failure",
        "reason": "ServiceUnavailable",
    }
    assert "patch" not in denied["response"]


# --- store records --------------------------------------------------------------------------


def token(n: int) -> EnrollToken:
    value = base64.b32encode(n.to_bytes(15, "big")).decode()
    return EnrollToken.parse(
        value=value, tenant_id=TENANT, expires_at=utcnow() + timedelta(minutes=10)
    )


def test_records_go_to_bounded_shards_never_to_the_tenant_record() -> None:
    store = MemoryStore()
    records = AdmissionRecords(MemoryProvider(store=store), tenant=TENANT, shards=4, keep=3)
    deadline = time.monotonic() + 30
    for n in range(200):
        uid = str(uuid.uuid4())
        record = records.write_pending(
            token(n), admission_uid=uid, rotation_id=str(uuid.uuid4()), deadline=deadline
        )
        records.promote(record, admission_uid=uid)

    assert TENANT not in store.tenants  # the shared Secret's record is untouched
    assert set(store.tenants) == {f"{TENANT}-per-pod-{n}" for n in range(4)}
    for history in store.tenants.values():
        live = set(history.versions) - history.retired
        assert 3 <= len(live) <= 2 * 3  # pruned every `keep` promotions


def test_two_replicas_write_one_vault_without_losing_a_record(openbao: Any) -> None:
    """Issue 9: concurrent writers must not fight over one record. Two "replicas" (own
    clients, own locks) x 12 threads each write 120 records to OpenBao at once."""
    from providers.vault import VaultProvider

    template = f"lgtest/{uuid.uuid4().hex}/<tenant>"
    conflicts: list[int] = []
    replicas = [
        AdmissionRecords(
            VaultProvider(client=openbao.client(), path_template=template),
            tenant=TENANT,
            shards=4,
            keep=5,
            on_conflict=lambda: conflicts.append(1),
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 60

    def write(n: int) -> str:
        records = replicas[n % 2]
        uid = str(uuid.uuid4())
        record = records.write_pending(
            token(n), admission_uid=uid, rotation_id=str(uuid.uuid4()), deadline=deadline
        )
        records.promote(record, admission_uid=uid)
        return record.fingerprint

    with ThreadPoolExecutor(max_workers=24) as pool:
        written = list(pool.map(write, range(120)))

    assert len(set(written)) == 120  # every write landed (no StoreConflictError raised)
    reader = VaultProvider(client=openbao.client(), path_template=template)
    for shard in range(4):
        assert reader.read(tenant=f"{TENANT}-per-pod-{shard}", stage=Stage.CURRENT) is not None
    assert reader.read(tenant=TENANT, stage=Stage.CURRENT) is None
    # Conflicts between the replicas happen (and are retried); within one replica, never.
    assert len(conflicts) < 120


def test_a_busy_shard_gives_up_at_the_deadline() -> None:
    records = AdmissionRecords(MemoryProvider(store=MemoryStore()), tenant=TENANT, shards=1)
    with records._locks[0], pytest.raises(StoreUnavailableError, match="busy"):
        records.write_pending(
            token(1), admission_uid=UID, rotation_id="r", deadline=time.monotonic() + 0.05
        )


# --- TLS reload (no cluster) ----------------------------------------------------------------


def test_tls_files_are_reloaded_when_they_change_and_a_broken_pair_is_not(tmp_path: Path) -> None:
    pki = Pki.create(tmp_path)
    reloads: list[bool] = []
    tls = ReloadingTls(str(pki.cert_file), str(pki.key_file), on_reload=reloads.append)
    first = tls.context()
    assert tls.context() is first  # unchanged files: the same context

    fingerprint = pki.rotate()
    second = tls.context()
    assert second is not first
    assert tls.fingerprint == fingerprint
    assert reloads == [True]

    pki.key_file.write_text("not a key\n")  # half-way through a (non-atomic) update
    assert tls.context() is second
    assert tls.context() is second  # tried once per change, not per connection
    assert reloads == [True, False]


def test_a_missing_key_pair_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TLS key pair"):
        ReloadingTls(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"))


# --- on the real control plane --------------------------------------------------------------


@dataclass
class Env:
    """One test's cluster namespace, sandbox, PKI, webhooks and their configurations."""

    k8s: Cluster
    namespace: str
    sandbox: SandboxServer
    pki: Pki
    core: client.CoreV1Api
    servers: list[webhook.WebhookServer] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)

    def start(self, *, register: bool = True, failure_policy: str = "Fail", **settings: Any):
        settings.setdefault("provider", MemoryProvider(store=MemoryStore()))
        server = start_webhook(
            api_client=self.k8s.api_client(),
            namespace=self.namespace,
            sandbox=self.sandbox,
            pki=self.pki,
            **settings,
        )
        self.servers.append(server)
        if register:
            self.register(server.url, failure_policy=failure_policy)
        return server

    def register(self, url: str, *, failure_policy: str = "Fail") -> None:
        name = f"lgr-{self.namespace}"
        self.k8s.apply(
            webhook_configuration(
                name=name,
                url=url,
                ca_pem=self.pki.ca_pem,
                namespace=self.namespace,
                failure_policy=failure_policy,
            )
        )
        if name not in self.configs:
            self.configs.append(name)
        wait_until_mutating(self.core, self.namespace)

    def create_pod(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return read_json(self.core.create_namespaced_pod, self.namespace, body or agent_pod())

    def per_pod_secrets(self) -> list[dict[str, Any]]:
        return self.k8s.list_objects(
            "v1/secrets", self.namespace, label_selector=per_pod_selector(SHARED_SECRET)
        )

    def kubelet(self) -> Kubelet:
        return Kubelet(self.core, self.namespace, self.sandbox.url)

    def tokens(self) -> list[str]:
        """Every token in the namespace's per-pod Secrets (to prove it leaked nowhere)."""
        return [
            base64.b64decode(secret["data"]["token"]).decode() for secret in self.per_pod_secrets()
        ]


@pytest.fixture
def env(k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, tmp_path: Path) -> Iterator[Env]:
    k8s.apply(shared_secret(), k8s_namespace)
    state = Env(
        k8s=k8s,
        namespace=k8s_namespace,
        sandbox=sandbox,
        pki=Pki.create(tmp_path / "tls"),
        core=client.CoreV1Api(widen_pool(k8s.api_client())),
    )
    try:
        yield state
    finally:
        for name in state.configs:
            k8s.delete("admissionregistration.k8s.io/v1/mutatingwebhookconfigurations", None, name)
        for server in state.servers:
            server.stop(drain_timeout=5)


def assert_no_leak(tokens: list[str], *texts: str) -> None:
    assert tokens
    for value in tokens:
        bare = value.replace("-", "")
        b64 = base64.b64encode(value.encode()).decode()
        for text in texts:
            assert value not in text
            assert bare not in text
            assert b64 not in text


@pytest.mark.slow  # ~30 s: 100 fake Nodes for the real DaemonSet controller
def test_a_daemonset_burst_on_100_nodes_gives_every_pod_its_own_first_try_token(
    env: Env, k8s: Cluster
) -> None:
    """The real DaemonSet controller creates 100 pods at once (its slow-start batches); the
    API server calls the webhook for each; every pod reads its own Secret at container start
    and enrols at the first try. One mint per pod, no expired token."""
    env.start()
    nodes = [f"{env.namespace}-n{index:03d}" for index in range(100)]
    k8s.create_nodes(nodes)
    minted_before = len(env.sandbox.minted())

    k8s.apply(agent_daemonset(), env.namespace)
    pods = wait_for(
        lambda: (
            items
            if len(items := env.k8s.list_objects("v1/pods", env.namespace, label_selector="app"))
            == 100
            else None
        ),
        timeout=120,
        what="the DaemonSet controller to create 100 pods",
    )
    starts = env.kubelet().start_all([pod["metadata"]["name"] for pod in pods])

    assert len(env.sandbox.minted()) - minted_before == 100  # one mint per admitted pod
    secrets = {secret["metadata"]["name"]: secret for secret in env.per_pod_secrets()}
    assert len(secrets) == 100
    for pod in pods:
        own = pod["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION]
        assert set(secret_refs(pod)) == {own}  # nothing left pointing at the shared Secret
        labels = secrets[own]["metadata"]["labels"]
        assert labels[PER_POD_LABEL] == "true"
        assert labels[SHARED_SECRET_LABEL] == SHARED_SECRET
        annotations = secrets[own]["metadata"]["annotations"]
        assert annotations[ANNOTATION_POD] == "linuxguard-agent-*"
        assert own == pod_secret_name(SHARED_SECRET, annotations[ANNOTATION_ADMISSION_UID])
    assert all(start.first_try for start in starts), [s.results for s in starts]
    assert len({start.token_fingerprint for start in starts}) == 100
    assert {start.secret for start in starts} == set(secrets)
    assert not [e for e in env.sandbox.enrolments() if e.result in ("expired", "conflict")]


def test_concurrent_admissions_through_two_replicas_mint_exactly_one_token_each(
    env: Env, openbao: Any
) -> None:
    """80 pods created at once from 16 threads; the API server's calls are spread over two
    webhook replicas (a round-robin pass-through, as a Service does) sharing one Vault."""
    from providers.vault import VaultProvider

    template = f"lgtest/{uuid.uuid4().hex}/<tenant>"
    replicas = [
        env.start(
            register=False,
            provider=VaultProvider(client=openbao.client(), path_template=template),
        )
        for _ in range(2)
    ]
    proxy = RoundRobinProxy([("127.0.0.1", server.port) for server in replicas]).start()
    try:
        env.register(proxy.url)
        minted_before = len(env.sandbox.minted())
        with ThreadPoolExecutor(max_workers=16) as pool:
            pods = list(pool.map(lambda _: env.create_pod(), range(80)))
    finally:
        proxy.stop()

    minted = len(env.sandbox.minted()) - minted_before
    assert minted == 80
    assert len({pod["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION] for pod in pods}) == 80
    assert len(env.per_pod_secrets()) == 80
    answered = [
        server.metrics.admissions.value(result="minted") for server in replicas
    ]  # both replicas did real work
    assert sum(answered) == 80
    assert min(answered) > 0, answered
    assert all(server.metrics.failures.value(cause="store") == 0 for server in replicas)
    starts = env.kubelet().start_all([pod["metadata"]["name"] for pod in pods])
    assert all(start.first_try for start in starts)


def test_server_side_dry_run_mints_nothing_and_creates_no_secret(env: Env, k8s: Cluster) -> None:
    server = env.start()
    minted_before = len(env.sandbox.minted())
    manifest = json.dumps(agent_pod(name="dry"))

    answer = k8s.kubectl(
        "create", "--dry-run=server", "-o", "json", "-n", env.namespace, "-f", "-", input=manifest
    )

    pod = json.loads(answer.stdout)
    name = pod["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION]  # the shape a real create gets
    assert set(secret_refs(pod)) == {name}
    assert len(env.sandbox.minted()) == minted_before
    assert env.per_pod_secrets() == []
    assert k8s.get("v1/secrets", env.namespace, name) is None
    assert k8s.get("v1/pods", env.namespace, "dry") is None
    assert server.metrics.admissions.value(result="dry-run") >= 1


def post_review(server: webhook.WebhookServer, pki: Pki, document: Any) -> tuple[int, Any]:
    request = urllib.request.Request(  # noqa: S310 - our own loopback URL
        f"{server.url}{webhook.MUTATE_PATH}",
        data=json.dumps(document).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, context=pki.client_context(), timeout=30) as answer:  # noqa: S310
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def decode_patch(answer: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads(base64.b64decode(answer["response"]["patch"]))


def test_a_retried_admission_finds_its_secret_and_mints_nothing(env: Env) -> None:
    """The API server calls again with the same request uid (e.g. after a broken connection):
    the second call reuses the Secret the first one created."""
    server = env.start(register=False)
    document = review(agent_pod(), uid=str(uuid.uuid4()), namespace=env.namespace)

    first_status, first = post_review(server, env.pki, document)
    second_status, second = post_review(server, env.pki, document)

    assert (first_status, second_status) == (200, 200)
    assert first["response"]["allowed"]
    assert second["response"]["allowed"]
    assert decode_patch(first) == decode_patch(second)
    assert len(env.sandbox.minted()) == 1
    assert len(env.per_pod_secrets()) == 1
    assert server.metrics.admissions.value(result="reused") == 1
    assert_no_leak(env.tokens(), json.dumps(first), json.dumps(second))


def test_a_foreign_secret_under_the_admission_name_is_not_taken_over(env: Env) -> None:
    server = env.start(register=False)
    uid = str(uuid.uuid4())
    env.k8s.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": pod_secret_name(SHARED_SECRET, uid)},
            "stringData": {"token": "x"},
        },
        env.namespace,
    )
    _, answer = post_review(server, env.pki, review(agent_pod(), uid=uid, namespace=env.namespace))
    assert answer["response"]["allowed"] is False
    assert "was not created for admission" in answer["response"]["status"]["message"]
    assert env.sandbox.minted() == []


def test_post_requests_that_are_not_reviews_get_400(env: Env) -> None:
    server = env.start(register=False)
    status, body = post_review(server, env.pki, {"kind": "Pod"})
    assert status == 400
    assert "AdmissionReview" in body


def test_linuxguard_down_denies_the_pod_and_says_why(env: Env) -> None:
    env.start(budget=2.0)
    env.sandbox.inject_fault(status=503, count=1000, path="/api/tokens/new")

    with pytest.raises(client.ApiException) as refused:
        env.create_pod(agent_pod(name="refused"))

    message = json.loads(refused.value.body)["message"]
    assert refused.value.status == 503
    assert "could not give this pod its own LinuxGuard enrolment token" in message
    assert "minting a token from LinuxGuard failed" in message
    assert "503" in message
    assert env.k8s.get("v1/pods", env.namespace, "refused") is None
    assert env.per_pod_secrets() == []


def test_linuxguard_down_with_on_failure_admit_falls_back_to_the_shared_secret(
    env: Env, k8s: Cluster
) -> None:
    server = env.start(budget=2.0, on_failure="admit")
    env.sandbox.inject_fault(status=503, count=1000, path="/api/tokens/new")

    created = k8s.kubectl(
        "create", "-n", env.namespace, "-f", "-", input=json.dumps(agent_pod(name="fallback"))
    )

    assert "Warning: lg-rotate: no per-pod enrolment Secret" in created.stderr
    pod = k8s.get("v1/pods", env.namespace, "fallback")
    assert pod is not None
    assert set(secret_refs(pod)) == {SHARED_SECRET}
    assert ENROLL_SECRET_ANNOTATION not in (pod["metadata"].get("annotations") or {})
    assert server.metrics.admissions.value(result="fallback") == 1
    assert env.per_pod_secrets() == []


class SlowStore(MemoryProvider):
    """Stores after a delay: the admission budget runs out before the Secret exists."""

    def __init__(self, delay: float) -> None:
        super().__init__(store=MemoryStore())
        self.delay = delay

    def write_pending(self, **kwargs: Any) -> Any:
        time.sleep(self.delay)
        return super().write_pending(**kwargs)


def test_a_secret_created_after_the_budget_ran_out_is_deleted_again(env: Env) -> None:
    server = env.start(budget=1.0, provider=SlowStore(delay=1.5))

    with pytest.raises(client.ApiException) as refused:
        env.create_pod(agent_pod(name="late"))

    message = json.loads(refused.value.body)["message"]
    assert "timed out after 1s (the admission budget) while storing the token" in message
    wait_for(
        lambda: server.metrics.orphans_deleted.value() == 1 and not env.per_pod_secrets(),
        timeout=15,
        what="the webhook to delete the Secret its answer did not name",
    )
    assert server.admitter.in_flight == 0


def test_tls_key_pair_rotation_is_picked_up_by_new_connections(env: Env) -> None:
    server = env.start()
    env.create_pod()

    def served_certificate() -> str:
        import hashlib

        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw,
            env.pki.client_context().wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return hashlib.sha256(der).hexdigest()

    before = served_certificate()
    rotated = env.pki.rotate()  # cert-manager renews; the kubelet swaps the files

    assert rotated != before
    assert served_certificate() == rotated
    assert server.metrics.tls_reloads.value(result="ok") == 1
    env.create_pod()  # the API server (trusting the same CA) still gets answers
    assert len(env.per_pod_secrets()) == 2


def https_get(server: webhook.WebhookServer, pki: Pki, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own loopback URL
            f"{server.url}{path}", context=pki.client_context(), timeout=5
        ) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_metrics_and_no_token_in_answers_logs_or_metrics(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lg_rotate")
    server = env.start()
    answers: list[dict[str, Any]] = []
    original = server.admitter.review

    def recording(document: Any) -> dict[str, Any]:
        answer = original(document)
        answers.append(answer)
        return answer

    server.admitter.review = recording  # type: ignore[method-assign]
    for _ in range(5):
        env.create_pod()

    assert https_get(server, env.pki, "/healthz")[0] == 200
    assert https_get(server, env.pki, "/readyz")[0] == 200
    status, metrics = https_get(server, env.pki, "/metrics")
    assert status == 200
    values = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert values[("lg_rotate_webhook_admissions_total", (("result", "minted"),))] == 5
    assert values[("lg_rotate_webhook_mints_total", (("result", "ok"),))] == 5
    # and the dry runs that proved the webhook active:
    assert values[("lg_rotate_webhook_admission_duration_seconds_count", ())] >= 5
    assert len(answers) == 5
    logs = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("lg_rotate"))
    assert "admission" in logs
    assert_no_leak(env.tokens(), json.dumps(answers), logs, metrics)


def test_sigterm_style_shutdown_finishes_admissions_in_flight(env: Env) -> None:
    server = env.start(register=False)
    env.sandbox.inject_fault(status=None, latency_ms=1500, count=1, path="/api/tokens/new")
    document = review(agent_pod(), uid=str(uuid.uuid4()), namespace=env.namespace)
    result: dict[str, Any] = {}

    def admit() -> None:
        result["answer"] = post_review(server, env.pki, document)

    worker = threading.Thread(target=admit)
    worker.start()
    wait_for(lambda: server.admitter.in_flight > 0, timeout=10, what="an admission in flight")
    port = server.port
    stopped = server.stop()  # what the CLI does on SIGTERM
    worker.join(timeout=10)

    assert stopped
    status, answer = result["answer"]
    assert status == 200
    assert answer["response"]["allowed"] is True
    assert "patch" in answer["response"]
    with pytest.raises(ConnectionRefusedError):  # no new connections once shutting down
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert len(env.per_pod_secrets()) == 1


def test_the_cli_serves_admissions_and_stops_on_sigterm(
    env: Env, k8s: Cluster, vault_env: dict[str, str], vault_provider: Any, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    process = subprocess.Popen(
        [
            sys.executable, "-m", "rotator.cli", "webhook", "--provider", "vault",
            "--tenant", TENANT, "--linuxguard-url", env.sandbox.url,
            "--namespace", env.namespace, "--selector", "app=linuxguard-agent",
            "--listen", f"127.0.0.1:{port}", "--tls-cert-file", str(env.pki.cert_file),
            "--tls-private-key-file", str(env.pki.key_file), "--log-format", "json",
        ],
        env={
            **base,
            **vault_env,
            "LINUXGUARD_API_KEY": env.sandbox.api_key,
            "KUBECONFIG": str(kubeconfig),
            "LG_ROTATE_ADMISSION_BUDGET": "5s",
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(  # noqa: S310 - loopback
                f"{url}/healthz", context=env.pki.client_context(), timeout=1
            ) as answer:
                return answer.status == 200
        except OSError:
            return process.poll() is not None

    try:
        wait_for(healthy, timeout=60, what="the webhook's /healthz")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        env.register(url)
        pods = [env.create_pod() for _ in range(3)]
        starts = env.kubelet().start_all([pod["metadata"]["name"] for pod in pods])
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr
    assert all(start.first_try for start in starts)
    stored = [
        vault_provider.read(tenant=f"{TENANT}-per-pod-{shard}", stage=Stage.CURRENT)
        for shard in range(webhook.DEFAULT_RECORD_SHARDS)
    ]
    assert sum(record is not None for record in stored) >= 1  # recorded in the store
    assert {r.fingerprint for r in stored if r} <= {s.token_fingerprint for s in starts}
    assert '"shutting down' in stderr
    assert_no_leak(env.tokens(), stderr)


# --- with `watch` (rotator/kube/podsecret_keeper.py) --------------------------------------


def start_controller(env: Env) -> tuple[Any, Callable[[], None]]:
    from podsim import make_controller

    controller = make_controller(env.k8s, env.namespace, env.sandbox, pod_secret_resync=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=controller.run, kwargs={"stop": stop}, daemon=True)
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join(timeout=30)

    wait_for(lambda: controller.status().leader, timeout=30, what="watch to lead")
    return controller, stopper


def test_a_pod_that_starts_after_its_token_expired_still_enrols_first_try(env: Env) -> None:
    """The pod is admitted, then its container does not start for longer than the token's
    TTL (a slow image pull): `watch` replaces the unstarted pod's token before it expires."""
    env.start()
    _, stop = start_controller(env)
    try:
        pod = env.create_pod()
        name = pod["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION]

        def fingerprint() -> str:
            secret = env.k8s.get("v1/secrets", env.namespace, name)
            assert secret is not None
            return str(secret["metadata"]["annotations"]["linuxguard.io/token-sha256"])

        admitted_with = fingerprint()
        env.sandbox.advance_clock(11 * 60)  # past the 600 s TTL of the admission's token
        wait_for(
            lambda: fingerprint() != admitted_with,
            timeout=30,
            what="watch to refresh the unstarted pod's token",
        )
        start = env.kubelet().start(pod["metadata"]["name"])
    finally:
        stop()

    assert start.first_try, start.results
    assert start.secret == name


def test_deleting_a_pod_deletes_its_secret(env: Env) -> None:
    env.start()
    _, stop = start_controller(env)
    try:
        pod = env.create_pod()
        name = pod["metadata"]["annotations"][ENROLL_SECRET_ANNOTATION]

        def owner() -> str | None:
            secret = env.k8s.get("v1/secrets", env.namespace, name) or {}
            refs = secret.get("metadata", {}).get("ownerReferences") or []
            return next((ref["uid"] for ref in refs if ref["kind"] == "Pod"), None)

        assert (
            wait_for(owner, timeout=30, what="watch to adopt the Secret") == pod["metadata"]["uid"]
        )
    finally:
        stop()
    env.k8s.delete("v1/pods", env.namespace, pod["metadata"]["name"])

    wait_for(
        lambda: env.k8s.get("v1/secrets", env.namespace, name) is None,
        timeout=60,
        what="garbage collection to delete the pod's Secret",
    )
