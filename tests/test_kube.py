"""rotator.kube against a real Kubernetes control plane (tests/fixtures/cluster.py).

Every test that asserts Kubernetes behaviour runs on the real kube-apiserver and
kube-controller-manager (fixtures ``k8s`` / ``k8s_namespace``): optimistic concurrency (the
API server's own 409s), RBAC (ServiceAccounts bound to the shipped Role), admission (a
validating webhook the API server calls), the DaemonSet controller (fake Nodes; the test
plays the kubelet through the pods' status subresource), Events and kubeconfig/TLS.

kmock's emulator (``kubesim``) is kept only for faults a real server cannot produce on
demand (a read answering 503, latency): the last section, each test saying why, with the
emulator's own tests those fault tests rely on.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import secrets
import signal
import ssl
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kmock
import pytest
import yaml
from kubernetes import client

from fakekubelet import FakeKubelet
from fixtures.cluster import POLL_S, Cluster, wait_for
from fixtures.kube import KubeCluster
from fixtures.ports import free_port
from providers.base import Stage, StoredRecord
from rotator.errors import (
    ConfigError,
    ExitCode,
    KubernetesError,
    LockError,
    RolloutTimeoutError,
)
from rotator.kube.api import MERGE_PATCH, KubernetesConflictError, KubernetesNotFoundError, connect
from rotator.kube.events import record_event
from rotator.kube.lease import LeaseHolder, LeaseLock, lease_name_for
from rotator.kube.secret import SecretTarget
from rotator.kube.workloads import (
    RESTARTED_AT_ANNOTATION,
    RolloutProgress,
    parse_workload_ref,
    restart_workload,
    rollout_progress,
    wait_for_rollout,
)
from rotator.targets import Delivery
from rotator.tokens import EnrollToken, format_timestamp, parse_timestamp
from webhooksim import Pki

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)
REPO = Path(__file__).resolve().parents[1]
SECRETS = "v1/secrets"
LEASES = "coordination.k8s.io/v1/leases"
DAEMONSETS = "apps/v1/daemonsets"
LEASE = "lg-rotate-linuxguard-enroll"


def new_token_value() -> str:
    return "".join(secrets.choice(BASE32) for _ in range(32))


def make_delivery(
    *,
    value: str | None = None,
    tenant: str = "acme",
    rotation_id: str = "rot-1",
    version: str = "7",
) -> Delivery:
    token = EnrollToken.parse(
        value=value or new_token_value(), tenant_id=tenant, expires_at=NOW + timedelta(minutes=10)
    )
    record = StoredRecord(
        token=token, rotation_id=rotation_id, version=version, stage=Stage.PENDING, stored_at=NOW
    )
    return Delivery(record=record, source=f"memory:{version}", rotated_at=NOW)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def secret_texts(delivery: Delivery) -> tuple[str, str]:
    """The token as it must never appear: raw and base64 (as it sits in a request body)."""
    value = delivery.record.token.value.reveal()
    return value, b64(value)


def exception_chain_text(exc: BaseException) -> str:
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts += [str(current), repr(current), getattr(current, "fix", "") or ""]
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def assert_never_leaks(delivery: Delivery, *texts: str) -> None:
    for secret_text in secret_texts(delivery):
        for text in texts:
            assert secret_text not in text


@pytest.fixture
def api(k8s: Cluster) -> Any:
    return k8s.api_client()


@pytest.fixture
def core(api: Any) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def target(api: Any, k8s_namespace: str) -> SecretTarget:
    return SecretTarget(api_client=api, namespace=k8s_namespace)


@dataclass
class SentWrite:
    """One Secret write lg-rotate sent, and what the API server answered."""

    verb: str  # "create" or "patch"
    body: Any
    content_type: str | None
    status: int  # the API server's answer: 2xx, or the refusal's status
    answer: str  # the server's error body ("" on success)


@pytest.fixture
def secret_writes(monkeypatch: pytest.MonkeyPatch) -> list[SentWrite]:
    """Spy on lg-rotate's Secret creates and patches at ``ApiClient.call_api``, where every
    request of rotator.kube.api passes (the test's own requests, from other callers, are not
    recorded): the requests still go to the API server."""
    sent: list[SentWrite] = []
    verbs = {"POST": "create", "PATCH": "patch"}
    original = client.ApiClient.call_api

    def call_api(
        self: Any,
        method: str,
        url: str,
        header_params: dict[str, str] | None = None,
        body: Any = None,
        post_params: Any = None,
        _request_timeout: Any = None,
    ) -> Any:
        sent_body = copy.deepcopy(body)
        caller = sys._getframe(1).f_globals.get("__name__")
        response = original(self, method, url, header_params, body, post_params, _request_timeout)
        path = url.split("?", 1)[0]
        if caller == "rotator.kube.api" and method in verbs and "/secrets" in path:
            status = int(response.status)
            answer = "" if 200 <= status <= 299 else response.read().decode()
            content_type = (header_params or {}).get("Content-Type")
            sent.append(SentWrite(verbs[method], sent_body, content_type, status, answer))
        return response

    monkeypatch.setattr(client.ApiClient, "call_api", call_api)
    return sent


def another_writer_after_reads(
    monkeypatch: pytest.MonkeyPatch,
    k8s: Cluster,
    target: SecretTarget,
    *,
    times: int | None = None,
) -> list[str]:
    """After each of the target's reads (the first ``times``), another client changes the
    Secret on the real server, so the patch built from that read carries a stale
    resourceVersion. Returns the resourceVersions the other writer produced."""
    original = target._read_secret
    produced: list[str] = []

    def read_then_intrude() -> dict[str, Any] | None:
        secret = original()
        if secret is not None and (times is None or len(produced) < times):
            changed = k8s.modify(
                SECRETS,
                target.namespace,
                target.name,
                {"metadata": {"annotations": {"someone": f"else-{len(produced) + 1}"}}},
            )
            produced.append(changed["metadata"]["resourceVersion"])
        return secret

    monkeypatch.setattr(target, "_read_secret", read_then_intrude)
    return produced


def managers(obj: dict[str, Any]) -> set[str]:
    return {entry["manager"] for entry in obj["metadata"].get("managedFields") or []}


# --- SecretTarget ----------------------------------------------------------------------


def test_deliver_creates_missing_secret(
    k8s: Cluster, target: SecretTarget, k8s_namespace: str, secret_writes: list[SentWrite]
) -> None:
    assert target.read_state() is None
    assert target.read_token() is None
    delivery = make_delivery()
    state = target.deliver(delivery)

    stored = k8s.get(SECRETS, k8s_namespace, "linuxguard-enroll")
    assert stored is not None
    assert stored["type"] == "Opaque"
    assert stored["data"] == {
        "token": b64(delivery.record.token.value.reveal()),
        "tenant-id": b64("acme"),
    }
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "lg-rotate"}
    assert stored["metadata"]["annotations"] == {
        "linuxguard.io/token-sha256": delivery.record.fingerprint,
        "linuxguard.io/rotated-at": "2030-01-02T03:04:05Z",
        "linuxguard.io/expires-at": "2030-01-02T03:14:05Z",
        "linuxguard.io/source": "memory:7",
        "linuxguard.io/rotation-id": "rot-1",
    }
    assert managers(stored) == {"lg-rotate"}  # the field manager the API server recorded
    assert [(write.verb, write.status) for write in secret_writes] == [("create", 201)]
    assert state.revision == stored["metadata"]["resourceVersion"]
    assert state.fingerprint == delivery.record.fingerprint
    assert target.attempts == 1
    token = target.read_token()
    assert token is not None
    assert token.value == delivery.record.token.value
    assert token.tenant_id == "acme"
    assert token.expires_at == NOW + timedelta(minutes=10)
    assert target.location() == f"k8s:{k8s_namespace}/linuxguard-enroll"


def test_deliver_patches_existing_secret_with_read_version(
    k8s: Cluster,
    api: Any,
    core: client.CoreV1Api,
    k8s_namespace: str,
    secret_writes: list[SentWrite],
) -> None:
    core.create_namespaced_secret(
        k8s_namespace,
        {
            "metadata": {
                "name": "enroll",
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": "agents"},
            },
            "data": {"other": b64("kept"), "code": b64("old")},
        },
        field_manager="helm",
    )
    target = SecretTarget(
        api_client=api,
        namespace=k8s_namespace,
        name="enroll",
        token_key="code",
        tenant_key="tenant",
    )
    before = k8s.get(SECRETS, k8s_namespace, "enroll")
    assert before is not None
    secret_writes.clear()  # only lg-rotate's writes from here
    delivery = make_delivery(rotation_id="rot-2", version="9")
    state = target.deliver(delivery)

    stored = k8s.get(SECRETS, k8s_namespace, "enroll")
    assert stored is not None
    assert stored["data"] == {
        "other": b64("kept"),
        "code": b64(delivery.record.token.value.reveal()),
        "tenant": b64("acme"),
    }
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "Helm"}  # not ours
    annotations = stored["metadata"]["annotations"]
    assert annotations["meta.helm.sh/release-name"] == "agents"
    assert annotations["linuxguard.io/rotation-id"] == "rot-2"
    assert annotations["linuxguard.io/source"] == "memory:9"
    assert annotations["linuxguard.io/token-sha256"] == delivery.record.fingerprint
    assert state.rotation_id == "rot-2"
    assert state.revision == stored["metadata"]["resourceVersion"]
    assert state.revision != before["metadata"]["resourceVersion"]
    assert managers(stored) == {"helm", "lg-rotate"}  # both writers own their fields

    (patch,) = secret_writes
    assert (patch.verb, patch.status, patch.content_type) == ("patch", 200, MERGE_PATCH)
    assert patch.body["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_deliver_retries_after_a_real_409(
    k8s: Cluster,
    target: SecretTarget,
    k8s_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    secret_writes: list[SentWrite],
    caplog: pytest.LogCaptureFixture,
) -> None:
    target.deliver(make_delivery(rotation_id="rot-1"))
    read_version = k8s.get(SECRETS, k8s_namespace, target.name)["metadata"]["resourceVersion"]  # type: ignore[index]
    secret_writes.clear()
    # Another writer changes the Secret between lg-rotate's read and its patch, once.
    intruded = another_writer_after_reads(monkeypatch, k8s, target, times=1)
    delivery = make_delivery(rotation_id="rot-2")
    with caplog.at_level(logging.DEBUG, logger="lg_rotate"):
        state = target.deliver(delivery)

    assert target.attempts == 2
    # The API server itself refused the stale patch; the retry carried the re-read version.
    assert [(write.verb, write.status) for write in secret_writes] == [
        ("patch", 409),
        ("patch", 200),
    ]
    assert "the object has been modified" in secret_writes[0].answer
    assert secret_writes[0].body["metadata"]["resourceVersion"] == read_version
    assert secret_writes[1].body["metadata"]["resourceVersion"] == intruded[0] != read_version
    stored = k8s.get(SECRETS, k8s_namespace, target.name)
    assert stored is not None
    assert stored["metadata"]["annotations"]["someone"] == "else-1"  # the other change survives
    assert stored["metadata"]["annotations"]["linuxguard.io/rotation-id"] == "rot-2"
    assert stored["data"]["token"] == b64(delivery.record.token.value.reveal())
    assert state.rotation_id == "rot-2"
    assert "changed since it was read" in caplog.text
    assert_never_leaks(delivery, caplog.text)


def test_deliver_gives_up_when_the_secret_keeps_changing(
    k8s: Cluster,
    api: Any,
    k8s_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    secret_writes: list[SentWrite],
) -> None:
    target = SecretTarget(api_client=api, namespace=k8s_namespace, max_attempts=3)
    target.deliver(make_delivery(rotation_id="rot-1"))
    secret_writes.clear()
    # A real change every time: an empty merge patch is a no-op on a real API server (no new
    # resourceVersion), where the emulator bumped the version on any write.
    intruded = another_writer_after_reads(monkeypatch, k8s, target)
    delivery = make_delivery(rotation_id="rot-2")
    with pytest.raises(KubernetesConflictError) as failure:
        target.deliver(delivery)
    assert target.attempts == 3
    assert len(intruded) == 3
    assert [write.status for write in secret_writes] == [409, 409, 409]
    assert "kept changing" in failure.value.message
    assert failure.value.exit_code == ExitCode.KUBERNETES
    assert_never_leaks(delivery, exception_chain_text(failure.value))
    state = SecretTarget(api_client=api, namespace=k8s_namespace).read_state()
    assert state is not None
    assert state.rotation_id == "rot-1"


def test_deliver_when_another_writer_creates_the_secret_first(
    k8s: Cluster,
    target: SecretTarget,
    k8s_namespace: str,
    monkeypatch: pytest.MonkeyPatch,
    secret_writes: list[SentWrite],
) -> None:
    original = target._read_secret
    reads: list[bool] = []

    def read_then_someone_creates() -> dict[str, Any] | None:
        secret = original()
        if not reads:  # lg-rotate saw no Secret; someone creates it before lg-rotate does
            k8s.apply(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": target.name, "labels": {"team": "infra"}},
                    "stringData": {"other": "kept"},
                },
                k8s_namespace,
            )
        reads.append(secret is not None)
        return secret

    monkeypatch.setattr(target, "_read_secret", read_then_someone_creates)
    delivery = make_delivery()
    target.deliver(delivery)

    assert reads == [False, True]
    assert target.attempts == 2
    assert [(write.verb, write.status) for write in secret_writes] == [
        ("create", 409),  # AlreadyExists, from the API server
        ("patch", 200),
    ]
    stored = k8s.get(SECRETS, k8s_namespace, target.name)
    assert stored is not None
    assert stored["data"]["other"] == b64("kept")
    assert stored["data"]["token"] == b64(delivery.record.token.value.reveal())
    assert stored["metadata"]["labels"] == {"team": "infra"}


def test_read_state_parses_annotations(
    core: client.CoreV1Api, target: SecretTarget, k8s_namespace: str
) -> None:
    core.create_namespaced_secret(
        k8s_namespace,
        {
            "metadata": {
                "name": target.name,
                "annotations": {
                    "linuxguard.io/token-sha256": "ab" * 32,
                    "linuxguard.io/rotated-at": "2030-01-02T03:04:05Z",
                    "linuxguard.io/expires-at": "2030-01-02T04:04:05+01:00",
                    "linuxguard.io/source": "vault:12",
                    "linuxguard.io/rotation-id": "r-9",
                },
            }
        },
    )
    state = target.read_state()
    assert state is not None
    assert state.fingerprint == "ab" * 32
    assert state.rotated_at == NOW
    assert state.expires_at == NOW  # the offset is normalised to UTC
    assert state.source == "vault:12"
    assert state.rotation_id == "r-9"
    assert (
        state.revision
        == core.read_namespaced_secret(target.name, k8s_namespace).metadata.resource_version
    )


def test_read_state_tolerates_foreign_annotations(
    core: client.CoreV1Api,
    target: SecretTarget,
    k8s_namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    core.create_namespaced_secret(
        k8s_namespace,
        {"metadata": {"name": target.name, "annotations": {"linuxguard.io/expires-at": "soon"}}},
    )
    with caplog.at_level(logging.WARNING, logger="lg_rotate.kube"):
        state = target.read_state()
    assert state is not None
    assert (state.expires_at, state.fingerprint, state.rotation_id) == (None, None, None)
    assert "not an RFC 3339 timestamp" in caplog.text


def test_read_token_needs_the_expiry_annotation(
    core: client.CoreV1Api, target: SecretTarget, k8s_namespace: str
) -> None:
    core.create_namespaced_secret(
        k8s_namespace,
        {"metadata": {"name": target.name}, "data": {"token": b64(new_token_value())}},
    )
    with pytest.raises(KubernetesError, match="expires-at"):
        target.read_token()


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        # a real API server insists a kubernetes.io/tls Secret carries both keys
        (
            {"type": "kubernetes.io/tls", "data": {"tls.crt": b64("c"), "tls.key": b64("k")}},
            r"kubernetes\.io/tls, not Opaque",
        ),
        ({"type": "Opaque", "immutable": True, "data": {"token": b64("old")}}, "is immutable"),
    ],
)
def test_deliver_refuses_a_secret_it_must_not_write(
    k8s: Cluster,
    core: client.CoreV1Api,
    target: SecretTarget,
    k8s_namespace: str,
    secret: dict[str, Any],
    complaint: str,
    secret_writes: list[SentWrite],
) -> None:
    core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": target.name}, **secret})
    before = k8s.get(SECRETS, k8s_namespace, target.name)
    secret_writes.clear()
    with pytest.raises(KubernetesError, match=complaint):
        target.deliver(make_delivery())
    assert secret_writes == []
    assert k8s.get(SECRETS, k8s_namespace, target.name) == before


def test_deliver_into_missing_namespace(api: Any, k8s_namespace: str) -> None:
    target = SecretTarget(api_client=api, namespace=f"{k8s_namespace}-gone")
    with pytest.raises(KubernetesNotFoundError) as failure:
        target.deliver(make_delivery())
    assert f"namespace '{k8s_namespace}-gone' does not exist" in failure.value.message
    assert failure.value.fix
    assert "--namespace" in failure.value.fix


def test_unreachable_api_server_is_a_kubernetes_error() -> None:
    configuration = client.Configuration(host=f"http://127.0.0.1:{free_port()}")
    configuration.retries = 0
    target = SecretTarget(api_client=client.ApiClient(configuration), namespace="default")
    with pytest.raises(KubernetesError) as failure:
        target.read_state()
    assert "cannot reach the Kubernetes API" in failure.value.message
    assert "connection refused" in failure.value.message
    assert failure.value.fix
    assert "NetworkPolicy" in failure.value.fix


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [
        ({"namespace": "Bad_NS"}, "the namespace"),
        ({"namespace": "ok", "name": "no/slash"}, "the Secret name"),
        ({"namespace": "ok", "token_key": "bad key"}, "the token key"),
        ({"namespace": "ok", "token_key": "same", "tenant_key": "same"}, "both 'same'"),
    ],
)
def test_secret_target_validates_settings(kwargs: dict[str, str], complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        SecretTarget(api_client=None, **kwargs)  # type: ignore[arg-type]


# --- RBAC and admission: real refusals ---------------------------------------------------


def apply_role(
    k8s: Cluster, namespace: str, serviceaccount: str, rules: list[dict[str, Any]]
) -> None:
    k8s.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": serviceaccount},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": serviceaccount},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": serviceaccount,
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": serviceaccount, "namespace": namespace}
                ],
            },
        ],
        namespace,
    )


@contextmanager
def acting_as(k8s: Cluster, namespace: str, serviceaccount: str, folder: Path) -> Iterator[Any]:
    """An ApiClient made by ``connect`` from a kubeconfig holding the ServiceAccount's token.

    Waits until the authorizer has seen its RoleBinding (it may read the Secret)."""
    path = k8s.serviceaccount_kubeconfig(namespace, serviceaccount, folder / serviceaccount)
    api_client = connect(kubeconfig=str(path))
    try:

        def may_read_the_secret() -> bool:
            try:
                SecretTarget(api_client=api_client, namespace=namespace).read_state()
            except KubernetesError as exc:
                if "forbidden" not in exc.message:
                    raise
                return False
            return True

        wait_for(may_read_the_secret, what=f"the RoleBinding of {serviceaccount} to take effect")
        yield api_client
    finally:
        api_client.close()


def test_the_shipped_role_allows_a_rotation_and_refuses_the_rest(
    k8s: Cluster, api: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    k8s.require_controllers()  # the rollout wait needs the DaemonSet controller
    k8s.apply(
        list(yaml.safe_load_all((REPO / "cronjob/base/rbac.yaml").read_text())), k8s_namespace
    )
    k8s.apply(yaml.safe_load((REPO / "cronjob/base/secret.yaml").read_text()), k8s_namespace)
    create_daemonset(api, k8s_namespace, "linuxguard-agent")
    delivery = make_delivery()

    with acting_as(k8s, k8s_namespace, "lg-rotate", tmp_path) as cronjob:
        lock = LeaseLock(
            api_client=cronjob, namespace=k8s_namespace, identity="cronjob-pod", renew=False
        )
        with lock.hold():
            target = SecretTarget(api_client=cronjob, namespace=k8s_namespace)
            target.deliver(delivery)
            assert record_event(
                api_client=cronjob,
                namespace=k8s_namespace,
                secret_name=target.name,
                reason="TokenRotated",
                message="delivered",
            )
            restart_workload(
                api_client=cronjob,
                namespace=k8s_namespace,
                kind="daemonset",
                name="linuxguard-agent",
                at=NOW,
            )
            done = wait_for_rollout(  # no Nodes: done once the controller saw generation 2
                api_client=cronjob,
                namespace=k8s_namespace,
                kind="daemonset",
                name="linuxguard-agent",
                timeout=30,
                poll_interval=POLL_S,
            )
            assert done.done
            assert done.observed_generation == 2

        # What the Role does not grant, the API server refuses, and the error says which rule.
        other = SecretTarget(api_client=cronjob, namespace=k8s_namespace, name="other-secret")
        with pytest.raises(KubernetesError) as not_ours:
            other.read_state()
        assert (
            f"forbidden (403): lg-rotate may not get Secret {k8s_namespace}/other-secret"
            in not_ours.value.message
        )
        assert 'resourceNames: ["other-secret"]' in str(not_ours.value.fix)
        k8s.delete(SECRETS, k8s_namespace, "linuxguard-enroll")
        wait_for(
            lambda: k8s.get(SECRETS, k8s_namespace, "linuxguard-enroll") is None,
            what="the Secret to be deleted",
        )
        later = make_delivery()
        with pytest.raises(KubernetesError) as no_create:
            SecretTarget(api_client=cronjob, namespace=k8s_namespace).deliver(later)
        assert "may not create Secrets in namespace" in no_create.value.message
        assert "apply cronjob/base/secret.yaml" in str(no_create.value.fix)
        assert_never_leaks(later, exception_chain_text(no_create.value))

    assert lease(k8s, k8s_namespace)["spec"].get("holderIdentity") is None  # released
    events = k8s.list_objects("v1/events", k8s_namespace, field_selector="reason=TokenRotated")
    assert [event["involvedObject"]["name"] for event in events] == ["linuxguard-enroll"]
    daemonset = k8s.get(DAEMONSETS, k8s_namespace, "linuxguard-agent")
    assert daemonset is not None
    assert daemonset["spec"]["template"]["metadata"]["annotations"] == {
        RESTARTED_AT_ANNOTATION: "2030-01-02T03:04:05Z"
    }


def test_forbidden_names_the_rbac_rule_and_never_the_token(
    k8s: Cluster,
    target: SecretTarget,
    k8s_namespace: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = make_delivery()
    target.deliver(first)
    apply_role(
        k8s,
        k8s_namespace,
        "reader",
        [
            {
                "apiGroups": [""],
                "resources": ["secrets"],
                "resourceNames": [target.name],
                "verbs": ["get"],
            }
        ],
    )
    delivery = make_delivery()
    with acting_as(k8s, k8s_namespace, "reader", tmp_path) as reader:
        with pytest.raises(KubernetesError) as failure:
            SecretTarget(api_client=reader, namespace=k8s_namespace).deliver(delivery)
        with caplog.at_level(logging.WARNING, logger="lg_rotate.kube"):
            recorded = record_event(
                api_client=reader,
                namespace=k8s_namespace,
                secret_name=target.name,
                reason="TokenRotated",
                message="delivered",
            )
    error = failure.value
    assert f"may not patch Secret {k8s_namespace}/{target.name}" in error.message
    assert "'patch' on 'secrets'" in error.message
    assert error.fix
    assert f'resourceNames: ["{target.name}"]' in error.fix
    assert_never_leaks(delivery, exception_chain_text(error), caplog.text)
    assert error.__cause__ is None
    assert error.__context__ is None
    token = target.read_token()  # the refused patch changed nothing
    assert token is not None
    assert token.value == first.record.token.value
    assert recorded is False  # Events are best effort: a refusal is a warning
    assert "could not record the TokenRotated event" in caplog.text
    assert "forbidden (403)" in caplog.text


class AdmissionWebhook:
    """A validating admission webhook (HTTPS on loopback) the real API server calls for
    every Secret create/update in one namespace.

    ``decide(request)`` gets the AdmissionReview's ``request`` and returns None (allow) or
    the refusal's ``status`` (code, reason, message, details), which the API server passes
    to the client (Secrets named ``webhook-probe-*`` are always refused: the fixture's
    readiness probe).
    """

    PROBE = "webhook-probe-"

    def __init__(self, folder: Path) -> None:
        self.decide: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda request: None
        pki = Pki.create(folder)
        self.ca_pem = pki.ca_pem
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.cert_file, pki.key_file)
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                answer = json.dumps(webhook.review(review)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}/validate"
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": POLL_S}, daemon=True
        )
        self._thread.start()

    def review(self, review: dict[str, Any]) -> dict[str, Any]:
        request = review["request"]
        name = request.get("name") or request["object"]["metadata"].get("generateName", "")
        if name.startswith(self.PROBE):
            status: dict[str, Any] | None = {"code": 403, "message": "probe"}
        else:
            status = self.decide(request)
        response: dict[str, Any] = {"uid": request["uid"], "allowed": status is None}
        if status is not None:
            response["status"] = status
        return {
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": response,
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(10)


@pytest.fixture
def admission_webhook(
    k8s: Cluster, api: Any, k8s_namespace: str, tmp_path: Path
) -> Iterator[AdmissionWebhook]:
    webhook = AdmissionWebhook(tmp_path)
    name = f"lgr-tests-{k8s_namespace}"
    try:
        k8s.apply(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "ValidatingWebhookConfiguration",
                "metadata": {"name": name},
                "webhooks": [
                    {
                        "name": "secrets.tests.lg-rotate.io",
                        "clientConfig": {
                            "url": webhook.url,
                            "caBundle": base64.b64encode(webhook.ca_pem).decode(),
                        },
                        "rules": [
                            {
                                "operations": ["CREATE", "UPDATE"],
                                "apiGroups": [""],
                                "apiVersions": ["v1"],
                                "resources": ["secrets"],
                                "scope": "Namespaced",
                            }
                        ],
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": k8s_namespace}
                        },
                        "sideEffects": "None",
                        "admissionReviewVersions": ["v1"],
                        "failurePolicy": "Fail",
                        "timeoutSeconds": 5,
                    }
                ],
            }
        )
        core = client.CoreV1Api(api)

        def probe_refused() -> bool:  # a dry run: admitted or refused, never stored
            try:
                core.create_namespaced_secret(
                    k8s_namespace,
                    {"metadata": {"generateName": AdmissionWebhook.PROBE}},
                    dry_run="All",
                    _preload_content=False,
                )
            except client.ApiException as exc:
                if exc.status == 403 and "probe" in str(exc.body):
                    return True
                raise
            return False

        wait_for(probe_refused, what="the API server to call the admission webhook")
        yield webhook
    finally:
        k8s.delete("admissionregistration.k8s.io/v1/validatingwebhookconfigurations", None, name)
        webhook.stop()


def echo(request: dict[str, Any]) -> str:
    """What a careless webhook puts in its refusal: the object, and its data decoded."""
    obj = request["object"]
    decoded = {
        key: base64.b64decode(value).decode(errors="replace")
        for key, value in (obj.get("data") or {}).items()
    }
    return f"{json.dumps(obj)} {json.dumps(decoded)}"


def test_a_webhook_refusal_echoing_the_body_never_leaks_the_token(
    k8s: Cluster,
    target: SecretTarget,
    k8s_namespace: str,
    admission_webhook: AdmissionWebhook,
    secret_writes: list[SentWrite],
    caplog: pytest.LogCaptureFixture,
) -> None:
    target.deliver(make_delivery())
    admission_webhook.decide = lambda request: (
        {"code": 403, "reason": "Forbidden", "message": f"denied: {echo(request)}"}
        if request["operation"] == "UPDATE"
        else None
    )
    delivery = make_delivery()
    with (
        caplog.at_level(logging.DEBUG, logger="lg_rotate"),
        pytest.raises(KubernetesError) as failure,
    ):
        target.deliver(delivery)

    # The API server's answer really carried the token (raw and base64)...
    for secret_text in secret_texts(delivery):
        assert secret_text in secret_writes[-1].answer
    assert 'admission webhook \\"secrets.tests.lg-rotate.io\\" denied' in secret_writes[-1].answer
    # ...and lg-rotate's error names the refusal without quoting it.
    error = failure.value
    assert "may not patch Secret" in error.message
    assert_never_leaks(delivery, exception_chain_text(error), caplog.text)
    assert error.__cause__ is None
    assert error.__context__ is None


def test_invalid_write_reports_fields_not_values(
    target: SecretTarget,
    admission_webhook: AdmissionWebhook,
    secret_writes: list[SentWrite],
    caplog: pytest.LogCaptureFixture,
) -> None:
    admission_webhook.decide = lambda request: {
        "code": 422,
        "reason": "Invalid",
        "message": f"Secret is invalid: {echo(request)}",
        "details": {"causes": [{"field": "data[token]", "message": echo(request)}]},
    }
    delivery = make_delivery()
    with (
        caplog.at_level(logging.DEBUG, logger="lg_rotate"),
        pytest.raises(KubernetesError) as failure,
    ):
        target.deliver(delivery)
    assert [(write.verb, write.status) for write in secret_writes] == [("create", 422)]
    assert b64(delivery.record.token.value.reveal()) in secret_writes[0].answer
    assert "rejected the create of Secrets in namespace" in failure.value.message
    assert "(422 Invalid) (fields: data[token])" in failure.value.message
    assert_never_leaks(delivery, exception_chain_text(failure.value), caplog.text)


# --- LeaseLock -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: datetime = NOW) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def make_lock(api: Any, namespace: str, identity: str, **kwargs: Any) -> LeaseLock:
    kwargs.setdefault("renew", False)
    return LeaseLock(api_client=api, namespace=namespace, identity=identity, **kwargs)


def lease(k8s: Cluster | KubeCluster, namespace: str, name: str = LEASE) -> dict[str, Any]:
    stored = k8s.get(LEASES, namespace, name)
    assert stored is not None
    return stored


def test_lock_acquire_and_release(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    lock = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock, duration=45)
    with lock.hold():
        spec = lease(k8s, k8s_namespace)["spec"]
        assert spec["holderIdentity"] == "host-a-1-x"
        assert spec["leaseDurationSeconds"] == 45
        # MicroTime, never on a whole second (see micro_time): the API server parsed and
        # stored exactly six fraction digits
        assert spec["acquireTime"] == "2030-01-02T03:04:05.000001Z"
        assert parse_timestamp(spec["renewTime"]) == NOW + MICROSECOND
        assert spec["leaseTransitions"] == 0
        assert lock.read_holder() == LeaseHolder(
            identity="host-a-1-x",
            acquired_at=NOW + MICROSECOND,
            renewed_at=NOW + MICROSECOND,
            duration=timedelta(seconds=45),
        )
    assert "holderIdentity" not in lease(k8s, k8s_namespace)["spec"]
    assert lock.read_holder() is None
    with lock.hold():  # a released lock is taken again without waiting
        assert lease(k8s, k8s_namespace)["spec"]["holderIdentity"] == "host-a-1-x"


def test_lock_held_by_another_live_holder(api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    first = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock)

    def sleep(seconds: float) -> None:  # the holder is running: it renews meanwhile
        clock.now += timedelta(seconds=seconds)
        first.renew()

    second = make_lock(api, k8s_namespace, "host-b-2-y", clock=clock, sleep=sleep)
    first.acquire()
    clock.now = NOW + timedelta(seconds=2)
    with pytest.raises(LockError) as failure:
        second.acquire()  # a running holder: seen renewing once, then exit 7
    assert clock.now == NOW + timedelta(seconds=3)
    assert "locked by host-a-1-x" in failure.value.message
    assert format_timestamp(NOW + timedelta(seconds=63)) in failure.value.message
    assert f"Lease {k8s_namespace}/{LEASE}" in failure.value.message
    assert failure.value.exit_code == ExitCode.LOCK
    assert failure.value.fix
    assert "--lock-wait" in failure.value.fix


def test_lock_takeover_after_expiry(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    crashed = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock)
    successor = make_lock(api, k8s_namespace, "host-b-2-y", clock=clock)
    crashed.acquire()
    clock.now = NOW + timedelta(seconds=61)  # renewTime + 60 s < now: expired
    successor.acquire()
    spec = lease(k8s, k8s_namespace)["spec"]
    assert spec["holderIdentity"] == "host-b-2-y"
    assert spec["leaseTransitions"] == 1
    assert parse_timestamp(spec["acquireTime"]) == NOW + timedelta(seconds=61) + MICROSECOND
    # the old holder notices and does not clear the new holder's lock
    assert crashed.release() is False
    with pytest.raises(LockError, match="now held by host-b-2-y"):
        crashed.renew()
    assert crashed.lost
    with pytest.raises(LockError, match="lost the lock"):
        crashed.ensure_held()
    assert lease(k8s, k8s_namespace)["spec"]["holderIdentity"] == "host-b-2-y"


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


def test_a_killed_holders_lock_lapses_and_is_taken_over(
    k8s: Cluster, api: Any, k8s_namespace: str, tmp_path: Path
) -> None:
    duration = 2
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(kubeconfig), k8s_namespace, "doomed", str(duration)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:

        def holding_and_renewing() -> bool:
            assert holder.poll() is None, holder.communicate()[1]
            spec = (k8s.get(LEASES, k8s_namespace, LEASE) or {}).get("spec") or {}
            # taken, and renewed in the background at least once since (a live holder)
            return spec.get("holderIdentity") == "doomed" and (
                spec.get("renewTime") != spec.get("acquireTime")
            )

        wait_for(holding_and_renewing, what="the holder process to take and renew the lock")
        with pytest.raises(LockError, match="locked by doomed"):
            make_lock(api, k8s_namespace, "successor", duration=duration).acquire()

        holder.send_signal(signal.SIGKILL)
        assert holder.wait(10) == -signal.SIGKILL
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    last_renewal = parse_timestamp(lease(k8s, k8s_namespace)["spec"]["renewTime"])

    waiter = make_lock(
        api, k8s_namespace, "successor", duration=duration, wait=30, poll_interval=POLL_S
    )
    waiter.acquire()  # real clock: waits until the dead holder's lease lapses

    spec = lease(k8s, k8s_namespace)["spec"]
    assert spec["holderIdentity"] == "successor"
    assert spec["leaseTransitions"] == 1
    assert parse_timestamp(spec["acquireTime"]) >= last_renewal + timedelta(seconds=duration)
    assert waiter.release() is True


def test_lock_released_on_exception(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    lock = make_lock(api, k8s_namespace, "host-a-1-x")

    def rotate_and_fail() -> None:
        with lock.hold():
            assert lease(k8s, k8s_namespace)["spec"]["holderIdentity"] == "host-a-1-x"
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        rotate_and_fail()
    assert "holderIdentity" not in lease(k8s, k8s_namespace)["spec"]


def test_lock_waits_for_the_holder(api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    holder = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock)
    holder.acquire()
    pauses: list[float] = []

    def sleep(seconds: float) -> None:  # the holder finishes while we wait
        pauses.append(seconds)
        clock.now += timedelta(seconds=seconds)
        holder.release()

    waiter = make_lock(
        api, k8s_namespace, "host-b-2-y", clock=clock, wait=30, poll_interval=2, sleep=sleep
    )
    waiter.acquire()
    assert pauses == [2]
    assert waiter.read_holder() is not None
    assert waiter.read_holder().identity == "host-b-2-y"  # type: ignore[union-attr]


def test_lock_wait_runs_out(api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    holder = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock, duration=600)
    holder.acquire()

    def sleep(seconds: float) -> None:  # the holder is running: it renews meanwhile
        clock.now += timedelta(seconds=seconds)
        holder.renew()

    waiter = make_lock(api, k8s_namespace, "host-b-2-y", clock=clock, wait=5, sleep=sleep)
    with pytest.raises(LockError, match=r"locked by host-a-1-x after waiting 5s"):
        waiter.acquire()
    assert clock.now == NOW + timedelta(seconds=5)


def test_lock_race_has_one_winner(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    barrier = threading.Barrier(3)
    outcomes: dict[str, str] = {}
    decided = threading.Event()

    def contend(identity: str) -> None:
        lock = make_lock(api, k8s_namespace, identity)
        barrier.wait()
        try:
            lock.acquire()
        except LockError:
            outcomes[identity] = "lost"
            if len(outcomes) == 3:
                decided.set()
            return
        outcomes[identity] = "won"
        # A running winner renews, so the others see it alive (and do not wait it out).
        while not decided.wait(0.2) and len(outcomes) < 3:
            lock.renew()

    threads = [threading.Thread(target=contend, args=(f"host-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes.values()) == ["lost", "lost", "won"]
    (winner,) = [identity for identity, outcome in outcomes.items() if outcome == "won"]
    assert lease(k8s, k8s_namespace)["spec"]["holderIdentity"] == winner


def test_lock_renews_in_the_background(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    lock = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="host-a-1-x", duration=1, clock=clock
    )
    with lock.hold():
        clock.now = NOW + timedelta(seconds=30)
        wait_for(  # renewed every third of the duration
            lambda: (
                parse_timestamp(lease(k8s, k8s_namespace)["spec"]["renewTime"])
                == NOW + timedelta(seconds=30) + MICROSECOND
            ),
            timeout=5,
            what="a background renewal",
        )
        assert lease(k8s, k8s_namespace)["spec"]["holderIdentity"] == "host-a-1-x"
        assert not lock.lost
    assert "holderIdentity" not in lease(k8s, k8s_namespace)["spec"]


def test_lease_name_is_per_secret_and_bounded() -> None:
    assert lease_name_for("linuxguard-enroll") == "lg-rotate-linuxguard-enroll"
    long_name = lease_name_for("a" * 253)
    assert len(long_name) <= 253
    assert long_name.startswith("lg-rotate-aaa")
    assert long_name != lease_name_for("a" * 252 + "b")


# --- workloads -------------------------------------------------------------------------


def create_daemonset(api: Any, namespace: str, name: str) -> None:
    body: dict[str, Any] = {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "agent", "image": "linuxguard/agent"}]},
            },
        },
    }
    client.AppsV1Api(api).create_namespaced_daemon_set(namespace, body)


def create_nodes(k8s: Cluster, count: int) -> list[str]:
    """Fake Nodes (cluster-wide, so uniquely named); k8s_namespace deletes them afterwards."""
    k8s.require_controllers()
    names = [f"node-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    k8s.create_nodes(names)
    return names


def daemonset_status(k8s: Cluster, namespace: str, name: str) -> dict[str, Any]:
    stored = k8s.get(DAEMONSETS, namespace, name)
    assert stored is not None
    return dict(stored.get("status") or {})


def pods_of(k8s: Cluster, namespace: str, app: str) -> list[dict[str, Any]]:
    return k8s.list_objects("v1/pods", namespace, label_selector=f"app={app}")


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def test_restart_workload_sets_restarted_at(k8s: Cluster, api: Any, k8s_namespace: str) -> None:
    create_daemonset(api, k8s_namespace, "agent")
    restart_workload(api_client=api, namespace=k8s_namespace, kind="ds", name="agent", at=NOW)
    stored = k8s.get(DAEMONSETS, k8s_namespace, "agent")
    assert stored is not None
    annotations = stored["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {RESTARTED_AT_ANNOTATION: "2030-01-02T03:04:05Z"}
    assert stored["spec"]["template"]["metadata"]["labels"] == {"app": "agent"}
    assert stored["metadata"]["generation"] == 2  # a pod template change is a spec change
    assert "lg-rotate" in managers(stored)
    with pytest.raises(KubernetesNotFoundError, match=r"DaemonSet .*/missing not found"):
        restart_workload(
            api_client=api, namespace=k8s_namespace, kind="daemonset", name="missing", at=NOW
        )


def test_wait_for_rollout_times_out_while_pods_never_start(
    k8s: Cluster, api: Any, k8s_namespace: str
) -> None:
    create_nodes(k8s, 1)
    create_daemonset(api, k8s_namespace, "agent")  # no kubelet here: its pod never runs
    wait_for(
        lambda: daemonset_status(k8s, k8s_namespace, "agent").get("updatedNumberScheduled") == 1,
        what="the DaemonSet controller to place the pod and count it",
    )
    seen: list[RolloutProgress] = []
    with pytest.raises(RolloutTimeoutError) as failure:
        wait_for_rollout(
            api_client=api,
            namespace=k8s_namespace,
            kind="daemonset",
            name="agent",
            timeout=0.3,
            poll_interval=0.05,
            on_progress=seen.append,
        )
    assert "did not finish rolling out within 0.3s" in failure.value.message
    assert "1 of 1 pods updated, 0 available" in failure.value.message
    assert failure.value.exit_code == ExitCode.KUBERNETES
    assert [progress.done for progress in seen] == [False]  # reported once: it never changed


def test_wait_for_rollout_follows_a_real_restart(
    k8s: Cluster, api: Any, k8s_namespace: str
) -> None:
    nodes = create_nodes(k8s, 2)
    create_daemonset(api, k8s_namespace, "agent")
    seen: list[RolloutProgress] = []
    # The scheduler and the kubelets (binding, status subresource, graceful deletion).
    with FakeKubelet(k8s, k8s_namespace, selector="app=agent") as kubelet:
        kubelet.wait(lambda: kubelet.settled(nodes), timeout=30, what="both agent pods to run")
        wait_for(
            lambda: daemonset_status(k8s, k8s_namespace, "agent").get("numberAvailable") == 2,
            what="the DaemonSet controller to count both pods available",
        )
        first_pods = {pod.uid for pod in kubelet.live_pods().values()}
        kubelet.hold(nodes)  # no pod starts or goes before wait_for_rollout has looked once
        restart_workload(
            api_client=api, namespace=k8s_namespace, kind="daemonset", name="agent", at=NOW
        )

        def on_progress(progress: RolloutProgress) -> None:
            seen.append(progress)
            kubelet.release(nodes)

        final = wait_for_rollout(
            api_client=api,
            namespace=k8s_namespace,
            kind="daemonset",
            name="agent",
            timeout=60,
            poll_interval=POLL_S,
            on_progress=on_progress,
        )
        live = kubelet.live_pods()

    assert final.done
    assert final.updated == final.available == final.desired == 2
    assert final.observed_generation == final.generation == 2
    assert not seen[0].done
    assert seen[-1] == final
    assert kubelet.removals == 2  # each old pod went through graceful deletion
    assert sorted(live) == sorted(nodes)
    assert not {pod.uid for pod in live.values()} & first_pods  # every pod replaced
    pods = pods_of(k8s, k8s_namespace, "agent")
    assert sorted(pod["metadata"]["uid"] for pod in pods) == sorted(
        pod.uid for pod in live.values()
    )
    for pod in pods:
        assert pod["metadata"]["annotations"][RESTARTED_AT_ANNOTATION] == "2030-01-02T03:04:05Z"
        assert is_ready(pod)


def test_rollout_waits_for_the_controller_to_see_the_generation() -> None:
    obj = {
        "metadata": {"generation": 2},
        "status": {
            "observedGeneration": 1,
            "desiredNumberScheduled": 2,
            "updatedNumberScheduled": 2,
            "numberAvailable": 2,
        },
    }
    progress = rollout_progress("daemonset", "ns", "agent", obj)
    assert not progress.observed
    assert not progress.done
    assert "has not seen generation 2" in progress.describe()


@pytest.mark.parametrize(
    ("obj", "done"),
    [
        (
            {
                "metadata": {"generation": 3},
                "spec": {"replicas": 2},
                "status": {
                    "observedGeneration": 3,
                    "updatedReplicas": 2,
                    "replicas": 3,
                    "availableReplicas": 2,
                },
            },
            False,  # an old replica is still terminating
        ),
        (
            {
                "metadata": {"generation": 3},
                "spec": {"replicas": 2},
                "status": {
                    "observedGeneration": 3,
                    "updatedReplicas": 2,
                    "replicas": 2,
                    "availableReplicas": 2,
                },
            },
            True,
        ),
    ],
)
def test_deployment_rollout_rules(obj: dict[str, Any], done: bool) -> None:
    assert rollout_progress("deployment", "ns", "d", obj).done is done


def test_statefulset_rollout_rules() -> None:
    status = {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2}
    base = {"metadata": {"generation": 1}, "spec": {"replicas": 2}}
    pending = {**base, "status": {**status, "currentRevision": "a", "updateRevision": "b"}}
    complete = {**base, "status": {**status, "currentRevision": "b", "updateRevision": "b"}}
    assert not rollout_progress("statefulset", "ns", "s", pending).done
    assert rollout_progress("statefulset", "ns", "s", complete).done
    on_delete = {**complete, "spec": {"replicas": 2, "updateStrategy": {"type": "OnDelete"}}}
    with pytest.raises(KubernetesError, match="OnDelete"):
        rollout_progress("statefulset", "ns", "s", on_delete)


def test_deployment_progress_deadline_fails_fast() -> None:
    obj = {
        "metadata": {"generation": 1},
        "status": {"conditions": [{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}]},
    }
    with pytest.raises(KubernetesError, match="progress deadline"):
        rollout_progress("deployment", "ns", "d", obj)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("daemonset/agent", ("daemonset", "agent")),
        ("ds/agent", ("daemonset", "agent")),
        ("DaemonSets.apps/agent", ("daemonset", "agent")),
        ("deploy/web", ("deployment", "web")),
        ("deployments/web", ("deployment", "web")),
        ("sts/db-0.x", ("statefulset", "db-0.x")),
    ],
)
def test_parse_workload_ref(ref: str, expected: tuple[str, str]) -> None:
    assert parse_workload_ref(ref) == expected


@pytest.mark.parametrize("ref", ["agent", "pod/agent", "ds/", "ds/Agent", "/agent", "ds/a/b"])
def test_parse_workload_ref_rejects(ref: str) -> None:
    with pytest.raises(ConfigError):
        parse_workload_ref(ref)


# --- events ----------------------------------------------------------------------------


def test_record_event_on_the_secret(
    k8s: Cluster, api: Any, core: client.CoreV1Api, k8s_namespace: str
) -> None:
    delivery = make_delivery()
    token = delivery.record.token.value.reveal()
    secret = core.create_namespaced_secret(
        k8s_namespace, {"metadata": {"name": "linuxguard-enroll"}, "data": {"token": b64(token)}}
    )
    uid = secret.metadata.uid
    assert record_event(
        api_client=api,
        namespace=k8s_namespace,
        secret_name="linuxguard-enroll",
        reason="TokenRotated",
        message=f"delivered token {delivery.record.token.short_fingerprint}; oops {token}",
        clock=lambda: NOW,
    )
    # The API server indexes Events by the object they are about: kubectl finds them so.
    (event,) = k8s.list_objects(
        "v1/events", k8s_namespace, field_selector=f"involvedObject.uid={uid}"
    )
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Secret",
        "name": "linuxguard-enroll",
        "namespace": k8s_namespace,
        "uid": uid,
    }
    assert (event["reason"], event["type"], event["count"]) == ("TokenRotated", "Normal", 1)
    assert (
        event["message"]
        == f"delivered token {delivery.record.token.short_fingerprint}; oops <redacted>"
    )
    assert (
        parse_timestamp(event["firstTimestamp"]) == parse_timestamp(event["lastTimestamp"]) == NOW
    )
    assert event["source"]["component"] == event["reportingComponent"] == "lg-rotate"
    assert_never_leaks(delivery, json.dumps(event))
    # What an operator sees (kubectl describe secret shows no Events; kubectl events does).
    shown = k8s.kubectl("events", "-n", k8s_namespace, "--for", "secret/linuxguard-enroll").stdout
    assert "TokenRotated" in shown
    assert "<redacted>" in shown
    assert_never_leaks(delivery, shown)


def test_record_event_failure_is_swallowed(
    api: Any, k8s_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lg_rotate.kube"):
        recorded = record_event(
            api_client=api,
            namespace=f"{k8s_namespace}-gone",
            secret_name="linuxguard-enroll",
            reason="TokenRotated",
            message="hello",
            type="Warning",
        )
    assert recorded is False
    assert "could not record the TokenRotated event" in caplog.text
    assert f"namespace '{k8s_namespace}-gone' does not exist" in caplog.text


# --- connect ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_connect_with_kubeconfig(k8s: Cluster, clean_env: Path) -> None:
    path = k8s.write_kubeconfig(clean_env / "config")
    api_client = connect(kubeconfig=str(path), context="test")
    try:
        assert api_client.configuration.host == k8s.url
        # TLS against the cluster CA (inline in the kubeconfig) and the bearer token
        assert client.CoreV1Api(api_client).read_namespace("default").metadata.name == "default"
    finally:
        api_client.close()


def test_connect_with_kubeconfig_env_beats_in_cluster(
    k8s: Cluster, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(k8s.write_kubeconfig(clean_env / "config")))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    api_client = connect(kubeconfig=None, context=None)
    try:
        assert api_client.configuration.host == k8s.url
        assert client.CoreV1Api(api_client).read_namespace("default").metadata.name == "default"
    finally:
        api_client.close()


def test_connect_unknown_context(k8s: Cluster, clean_env: Path) -> None:
    path = k8s.write_kubeconfig(clean_env / "config")
    with pytest.raises(ConfigError, match=r"has no context 'prod' \(it has: test\)"):
        connect(kubeconfig=str(path), context="prod")


def test_connect_missing_kubeconfig(clean_env: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist") as failure:
        connect(kubeconfig=str(clean_env / "nope"), context=None)
    assert failure.value.exit_code == ExitCode.CONFIG
    with pytest.raises(ConfigError, match="no Kubernetes configuration found"):
        connect(kubeconfig=None, context=None)


def test_connect_in_cluster_without_service_account(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    with pytest.raises(ConfigError, match="in-cluster") as failure:
        connect(kubeconfig=None, context=None)
    assert failure.value.fix
    assert "ServiceAccount" in failure.value.fix


# --- layering --------------------------------------------------------------------------


def test_import_does_not_load_the_kubernetes_client() -> None:
    code = (
        "import sys, rotator.kube.secret, rotator.kube.lease, rotator.kube.controller; "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'urllib3')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- kmock: only the faults a real API server cannot produce on demand --------------------


@pytest.fixture
def sim_api(kubesim: KubeCluster) -> Any:
    return kubesim.api_client()


@pytest.fixture
def sim_core(sim_api: Any) -> client.CoreV1Api:
    return client.CoreV1Api(sim_api)


def fail_reads(
    kubesim: KubeCluster, resource: str, namespace: str, *, times: int, status: int = 503
) -> list[str]:
    """The next ``times`` GETs of ``resource`` in ``namespace`` answer ``status``; then the
    emulator serves them again. Returns the names whose reads failed."""
    failed: list[str] = []

    def answer(request: kmock.Request) -> Any:
        if request.namespace != namespace:
            raise NotImplementedError  # not ours: let the emulator serve it
        if len(failed) >= times:
            return NotImplemented  # done: this reaction retires, the emulator serves reads
        failed.append(str(request.name))
        raise kmock.KubernetesError(
            status=status, reason="ServiceUnavailable", message="etcdserver: leader changed"
        )

    kubesim.call(lambda emulator: emulator[kmock.method.GET, kmock.resource(resource)] << answer)
    return failed


def test_a_secret_read_answering_503_is_a_kubernetes_error(
    kubesim: KubeCluster, sim_api: Any, kubesim_namespace: str
) -> None:
    # kmock: admission webhooks only see writes; a real API server cannot fail a read on demand.
    failed = fail_reads(kubesim, SECRETS, kubesim_namespace, times=2)
    target = SecretTarget(api_client=sim_api, namespace=kubesim_namespace)
    with pytest.raises(KubernetesError) as failure:
        target.read_state()
    assert failure.value.message == (
        f"the Kubernetes API failed to get Secret {kubesim_namespace}/linuxguard-enroll "
        "(503 Service Unavailable): etcdserver: leader changed"  # a read's answer is quoted
    )
    assert failure.value.exit_code == ExitCode.KUBERNETES
    assert "retry later" in str(failure.value.fix)
    delivery = make_delivery()
    with pytest.raises(KubernetesError, match=r"failed to get Secret .*\(503") as again:
        target.deliver(delivery)  # a failed read is not a conflict: no blind create follows
    assert kubesim.emulator.writes(namespace=kubesim_namespace) == []
    assert failed == ["linuxguard-enroll", "linuxguard-enroll"]
    assert_never_leaks(delivery, exception_chain_text(again.value))
    assert target.read_state() is None  # served again: the Secret simply does not exist


def test_a_write_slower_than_the_request_timeout(
    kubesim: KubeCluster,
    sim_api: Any,
    kubesim_namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # kmock: a real API server cannot be made slow on demand.
    async def slow(request: kmock.Request) -> None:
        if request.namespace == kubesim_namespace and request.resource == kmock.resource(SECRETS):
            await asyncio.sleep(1.0)

    remove = kubesim.before_write(slow)
    target = SecretTarget(api_client=sim_api, namespace=kubesim_namespace, request_timeout=0.3)
    delivery = make_delivery()
    with (
        caplog.at_level(logging.DEBUG, logger="lg_rotate"),
        pytest.raises(KubernetesError) as failure,
    ):
        target.deliver(delivery)
    assert failure.value.message == (
        f"cannot reach the Kubernetes API at {kubesim.url} to create Secrets in namespace "
        f"'{kubesim_namespace}': timed out"
    )
    assert_never_leaks(delivery, exception_chain_text(failure.value), caplog.text)

    # Once the API server answers in time again, the next delivery goes through.
    remove()
    retry = make_delivery(rotation_id="rot-2")
    state = target.deliver(retry)
    assert state.rotation_id == "rot-2"
    token = target.read_token()
    assert token is not None
    assert token.value == retry.record.token.value


def test_lock_renewal_survives_a_slow_api_server(
    kubesim: KubeCluster,
    sim_api: Any,
    kubesim_namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # kmock: a real API server cannot be made slow on demand.
    slowed: list[str] = []

    async def slow_first_renewal(request: kmock.Request) -> None:
        data = request.data if isinstance(request.data, Mapping) else {}
        spec = data.get("spec") or {}
        if request.namespace == kubesim_namespace and set(spec) == {"renewTime"} and not slowed:
            slowed.append(spec["renewTime"])
            await asyncio.sleep(1.0)

    clock = FakeClock()
    lock = LeaseLock(
        api_client=sim_api,
        namespace=kubesim_namespace,
        identity="host-a-1-x",
        duration=1,  # renewed every 1/3 s
        clock=clock,
        request_timeout=0.3,
    )
    with caplog.at_level(logging.WARNING, logger="lg_rotate.kube"), lock.hold():
        kubesim.before_write(slow_first_renewal)
        clock.now = NOW + timedelta(seconds=30)
        wait_for(
            lambda: "could not renew lock Lease" in caplog.text,
            timeout=10,
            what="a renewal to time out",
        )
        clock.now = NOW + timedelta(seconds=60)
        wait_for(
            lambda: (
                parse_timestamp(lease(kubesim, kubesim_namespace)["spec"]["renewTime"])
                == NOW + timedelta(seconds=60) + MICROSECOND
            ),
            timeout=10,
            what="a later renewal to succeed",
        )
        assert not lock.lost
        lock.ensure_held()
    assert slowed
    assert "timed out" in caplog.text
    assert "lost the lock" not in caplog.text
    assert "holderIdentity" not in lease(kubesim, kubesim_namespace)["spec"]


# The emulator's own behaviour that the fault tests above rely on (the Lease lock's
# conflict checks on kmock): server fields on create and 409 on a stale resourceVersion.


def test_sim_create_sets_server_fields(sim_core: client.CoreV1Api, kubesim_namespace: str) -> None:
    first = sim_core.create_namespaced_secret(kubesim_namespace, {"metadata": {"name": "a"}})
    second = sim_core.create_namespaced_secret(
        kubesim_namespace, {"metadata": {"generateName": "b-"}, "stringData": {"k": "v"}}
    )
    assert first.metadata.uid
    assert second.metadata.uid not in (None, first.metadata.uid)
    assert first.metadata.creation_timestamp is not None
    assert first.metadata.namespace == kubesim_namespace
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert second.metadata.name.startswith("b-")
    assert len(second.metadata.name) > 2
    assert second.data == {"k": b64("v")}  # stringData folded into data
    assert second.string_data is None
    with pytest.raises(client.ApiException) as conflict:
        sim_core.create_namespaced_secret(kubesim_namespace, {"metadata": {"name": "a"}})
    assert conflict.value.status == 409


def test_sim_rejects_stale_resource_version(
    sim_core: client.CoreV1Api, kubesim_namespace: str
) -> None:
    namespace = kubesim_namespace
    created = sim_core.create_namespaced_secret(namespace, {"metadata": {"name": "s"}})
    read_version = created.metadata.resource_version
    patched = sim_core.patch_namespaced_secret(
        "s",
        namespace,
        {"metadata": {"resourceVersion": read_version, "labels": {"x": "1"}}},
        _content_type=MERGE_PATCH,
    )
    assert int(patched.metadata.resource_version) > int(read_version)
    for body, content_type in [
        ({"metadata": {"resourceVersion": read_version, "labels": {"x": "2"}}}, MERGE_PATCH),
        (
            [
                {"op": "replace", "path": "/metadata/resourceVersion", "value": read_version},
                {"op": "add", "path": "/metadata/labels/x", "value": "2"},
            ],
            "application/json-patch+json",
        ),
    ]:
        with pytest.raises(client.ApiException) as stale:
            sim_core.patch_namespaced_secret("s", namespace, body, _content_type=content_type)
        assert stale.value.status == 409
        assert "the object has been modified" in json.loads(stale.value.body)["message"]
    # a patch without a resourceVersion is unconditional, as on a real API server
    free = sim_core.patch_namespaced_secret(
        "s", namespace, {"metadata": {"labels": {"x": "3"}}}, _content_type=MERGE_PATCH
    )
    assert free.metadata.labels == {"x": "3"}
