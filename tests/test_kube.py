"""rotator.kube against the Kubernetes emulator (tests/kubesim.py), and the emulator itself.

The emulator's additions over kmock (resourceVersion, 409 on a stale one, selectors,
namespaces, PUT, watch timeouts) are tested first: the Secret target and the Lease lock
are only as trustworthy as the conflicts they are tested against.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client, watch

from fixtures.kube import KubeCluster
from fixtures.ports import free_port
from kubesim import label_selector_matches, merge_diff
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
    RolloutProgress,
    parse_workload_ref,
    restart_workload,
    rollout_progress,
    wait_for_rollout,
)
from rotator.targets import Delivery
from rotator.tokens import EnrollToken, format_timestamp, parse_timestamp

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
NOW = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
MICROSECOND = timedelta(microseconds=1)


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


@pytest.fixture
def api(k8s: KubeCluster) -> Any:
    return k8s.api_client()


@pytest.fixture
def core(api: Any) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def target(api: Any, k8s_namespace: str) -> SecretTarget:
    return SecretTarget(api_client=api, namespace=k8s_namespace)


# --- the emulator's additions ----------------------------------------------------------


def test_sim_create_sets_server_fields(core: client.CoreV1Api, k8s_namespace: str) -> None:
    first = core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "a"}})
    second = core.create_namespaced_secret(
        k8s_namespace, {"metadata": {"generateName": "b-"}, "stringData": {"k": "v"}}
    )
    assert first.metadata.uid
    assert second.metadata.uid not in (None, first.metadata.uid)
    assert first.metadata.creation_timestamp is not None
    assert first.metadata.namespace == k8s_namespace
    assert int(second.metadata.resource_version) > int(first.metadata.resource_version)
    assert second.metadata.name.startswith("b-")
    assert len(second.metadata.name) > 2
    assert second.data == {"k": b64("v")}  # stringData folded into data
    assert second.string_data is None
    with pytest.raises(client.ApiException) as conflict:
        core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "a"}})
    assert conflict.value.status == 409


def test_sim_rejects_stale_resource_version(core: client.CoreV1Api, k8s_namespace: str) -> None:
    created = core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "s"}})
    read_version = created.metadata.resource_version
    patched = core.patch_namespaced_secret(
        "s",
        k8s_namespace,
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
            core.patch_namespaced_secret("s", k8s_namespace, body, _content_type=content_type)
        assert stale.value.status == 409
        assert "the object has been modified" in json.loads(stale.value.body)["message"]
    # a patch without a resourceVersion is unconditional, as on a real API server
    free = core.patch_namespaced_secret(
        "s", k8s_namespace, {"metadata": {"labels": {"x": "3"}}}, _content_type=MERGE_PATCH
    )
    assert free.metadata.labels == {"x": "3"}
    # PUT (replace) follows the same rule
    with pytest.raises(client.ApiException) as stale_put:
        core.replace_namespaced_secret(
            "s", k8s_namespace, {"metadata": {"name": "s", "resourceVersion": read_version}}
        )
    assert stale_put.value.status == 409
    replaced = core.replace_namespaced_secret(
        "s",
        k8s_namespace,
        {"metadata": {"name": "s", "resourceVersion": free.metadata.resource_version}},
    )
    assert replaced.metadata.labels is None
    assert replaced.metadata.uid == created.metadata.uid


def test_sim_modify_acts_as_another_writer(
    k8s: KubeCluster, core: client.CoreV1Api, k8s_namespace: str
) -> None:
    created = core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "s"}})
    changed = k8s.modify("v1/secrets", k8s_namespace, "s", {"metadata": {"labels": {"by": "x"}}})
    assert int(changed["metadata"]["resourceVersion"]) > int(created.metadata.resource_version)
    with pytest.raises(client.ApiException) as stale:
        core.patch_namespaced_secret(
            "s",
            k8s_namespace,
            {"metadata": {"resourceVersion": created.metadata.resource_version}},
            _content_type=MERGE_PATCH,
        )
    assert stale.value.status == 409
    assert core.read_namespaced_secret("s", k8s_namespace).metadata.labels == {"by": "x"}


def test_sim_generation_follows_spec(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
    create_daemonset(api, k8s_namespace, "agent")
    apps = client.AppsV1Api(api)
    apps.patch_namespaced_daemon_set(
        "agent", k8s_namespace, {"metadata": {"labels": {"a": "b"}}}, _content_type=MERGE_PATCH
    )
    assert k8s.get("apps/v1/daemonsets", k8s_namespace, "agent")["metadata"]["generation"] == 1
    apps.patch_namespaced_daemon_set(
        "agent", k8s_namespace, {"spec": {"minReadySeconds": 5}}, _content_type=MERGE_PATCH
    )
    assert k8s.get("apps/v1/daemonsets", k8s_namespace, "agent")["metadata"]["generation"] == 2


def test_sim_namespaces(core: client.CoreV1Api, k8s_namespace: str) -> None:
    assert core.read_namespace(k8s_namespace).metadata.name == k8s_namespace
    names = {item.metadata.name for item in core.list_namespace().items}
    assert {"default", "kube-system", k8s_namespace} <= names
    missing = f"{k8s_namespace}-missing"
    with pytest.raises(client.ApiException) as answer:
        core.create_namespaced_secret(missing, {"metadata": {"name": "s"}})
    assert answer.value.status == 404
    assert json.loads(answer.value.body)["message"] == f'namespaces "{missing}" not found'


def test_sim_selectors_on_list(core: client.CoreV1Api, k8s_namespace: str) -> None:
    for name, labels in [("a", {"app": "x", "tier": "1"}), ("b", {"app": "y"}), ("c", {})]:
        core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": name, "labels": labels}})

    def names(**selectors: str) -> list[str]:
        items = core.list_namespaced_secret(k8s_namespace, **selectors).items
        return sorted(item.metadata.name for item in items)

    assert names() == ["a", "b", "c"]
    assert names(label_selector="app=x") == ["a"]
    assert names(label_selector="app!=x") == ["b", "c"]
    assert names(label_selector="app") == ["a", "b"]
    assert names(label_selector="app in (x, y),!tier") == ["b"]
    assert names(field_selector="metadata.name=c") == ["c"]
    with pytest.raises(client.ApiException) as bad:
        names(label_selector="app=(")
    assert bad.value.status == 400


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ("a=b", {"a": "b"}, True),
        ("a==b", {"a": "c"}, False),
        ("a!=b", {}, True),
        ("a,b", {"a": "1"}, False),
        ("!a", {"b": "1"}, True),
        ("a in (1,2)", {"a": "2"}, True),
        ("a notin (1,2)", {"a": "2"}, False),
        ("a notin (1,2)", {}, True),
        ("", {"a": "1"}, True),
    ],
)
def test_sim_label_selector_semantics(
    selector: str, labels: dict[str, str], expected: bool
) -> None:
    assert label_selector_matches(selector, labels) is expected


def test_sim_merge_diff_round_trips() -> None:
    old = {"a": {"b": 1, "c": [1]}, "d": 1, "gone": {"x": 1}}
    new = {"a": {"b": 2, "c": [1]}, "d": 1, "new": {"y": None}}
    patched = kmock.Object(old)
    patched.patch(merge_diff(old, new))
    assert patched.raw == {"a": {"b": 2, "c": [1]}, "d": 1, "new": {}}


def test_sim_watch_filters_and_times_out(core: client.CoreV1Api, k8s_namespace: str) -> None:
    core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "in", "labels": {"w": "1"}}})
    core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "out"}})
    stream = watch.Watch().stream(
        core.list_namespaced_secret,
        k8s_namespace,
        label_selector="w=1",
        timeout_seconds=1,
        _request_timeout=10,
    )
    events = [(event["type"], event["object"].metadata.name) for event in stream]
    assert events == [("ADDED", "in")]  # and the stream ended on the server's timeout


# --- SecretTarget ----------------------------------------------------------------------


def test_deliver_creates_missing_secret(
    k8s: KubeCluster, target: SecretTarget, k8s_namespace: str
) -> None:
    assert target.read_state() is None
    assert target.read_token() is None
    delivery = make_delivery()
    state = target.deliver(delivery)

    stored = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
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
    k8s: KubeCluster, api: Any, core: client.CoreV1Api, k8s_namespace: str
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
    )
    target = SecretTarget(
        api_client=api,
        namespace=k8s_namespace,
        name="enroll",
        token_key="code",
        tenant_key="tenant",
    )
    before = k8s.get("v1/secrets", k8s_namespace, "enroll")
    assert before is not None
    delivery = make_delivery(rotation_id="rot-2", version="9")
    state = target.deliver(delivery)

    stored = k8s.get("v1/secrets", k8s_namespace, "enroll")
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
    assert int(state.revision or 0) > int(before["metadata"]["resourceVersion"])

    patches = k8s.emulator.writes(resource="v1/secrets", namespace=k8s_namespace, name="enroll")
    assert len(patches) == 1
    assert patches[0].headers["Content-Type"] == MERGE_PATCH
    assert patches[0].data["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_deliver_retries_after_a_concurrent_change(
    k8s: KubeCluster, target: SecretTarget, k8s_namespace: str
) -> None:
    target.deliver(make_delivery(rotation_id="rot-1"))
    intruded: list[str] = []

    async def intrude(request: kmock.Request) -> None:
        # Another writer changes the Secret after lg-rotate read it, before its patch lands.
        if request.method == kmock.method.PATCH and request.name == target.name and not intruded:
            changed = await k8s.emulator.modify(
                kmock.resource("v1/secrets"),
                k8s_namespace,
                target.name,
                {"metadata": {"annotations": {"someone": "else"}}},
            )
            intruded.append(changed["metadata"]["resourceVersion"])

    k8s.before_write(intrude)
    delivery = make_delivery(rotation_id="rot-2")
    state = target.deliver(delivery)

    assert target.attempts == 2
    patches = [
        request
        for request in k8s.emulator.writes(resource="v1/secrets", name=target.name, method="PATCH")
        if request.namespace == k8s_namespace
    ]
    assert len(patches) == 2
    first_version = patches[0].data["metadata"]["resourceVersion"]
    second_version = patches[1].data["metadata"]["resourceVersion"]
    assert second_version == intruded[0] != first_version  # re-read, not overwritten blindly
    stored = k8s.get("v1/secrets", k8s_namespace, target.name)
    assert stored is not None
    assert stored["metadata"]["annotations"]["someone"] == "else"  # the other change survives
    assert stored["metadata"]["annotations"]["linuxguard.io/rotation-id"] == "rot-2"
    assert stored["data"]["token"] == b64(delivery.record.token.value.reveal())
    assert state.rotation_id == "rot-2"


def test_deliver_gives_up_when_the_secret_keeps_changing(
    k8s: KubeCluster, api: Any, k8s_namespace: str
) -> None:
    target = SecretTarget(api_client=api, namespace=k8s_namespace, max_attempts=3)
    target.deliver(make_delivery(rotation_id="rot-1"))

    async def intrude(request: kmock.Request) -> None:
        if request.method == kmock.method.PATCH and request.name == target.name:
            await k8s.emulator.modify(
                kmock.resource("v1/secrets"), k8s_namespace, target.name, {"metadata": {}}
            )

    k8s.before_write(intrude)
    delivery = make_delivery(rotation_id="rot-2")
    with pytest.raises(KubernetesConflictError) as failure:
        target.deliver(delivery)
    assert target.attempts == 3
    assert "kept changing" in failure.value.message
    assert failure.value.exit_code == ExitCode.KUBERNETES
    state = target.read_state()
    assert state is not None
    assert state.rotation_id == "rot-1"


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


def test_deliver_refuses_non_opaque_secret(
    core: client.CoreV1Api, target: SecretTarget, k8s_namespace: str
) -> None:
    core.create_namespaced_secret(
        k8s_namespace, {"metadata": {"name": target.name}, "type": "kubernetes.io/tls"}
    )
    with pytest.raises(KubernetesError, match=r"kubernetes\.io/tls, not Opaque"):
        target.deliver(make_delivery())


def test_deliver_into_missing_namespace(api: Any, k8s_namespace: str) -> None:
    target = SecretTarget(api_client=api, namespace=f"{k8s_namespace}-gone")
    with pytest.raises(KubernetesNotFoundError) as failure:
        target.deliver(make_delivery())
    assert f"namespace '{k8s_namespace}-gone' does not exist" in failure.value.message
    assert failure.value.fix
    assert "--namespace" in failure.value.fix


def test_forbidden_names_the_rbac_rule_and_never_the_token(
    k8s: KubeCluster, target: SecretTarget
) -> None:
    target.deliver(make_delivery())

    def forbid(request: kmock.Request) -> None:
        # A server (or webhook) that echoes the request body in its refusal.
        if request.method == kmock.method.PATCH and request.name == target.name:
            raise kmock.KubernetesError(
                status=403, reason="Forbidden", message=f"denied: {request.text}"
            )

    k8s.before_write(forbid)
    delivery = make_delivery()
    with pytest.raises(KubernetesError) as failure:
        target.deliver(delivery)
    error = failure.value
    assert "may not patch Secret" in error.message
    assert "'patch' on 'secrets'" in error.message
    assert error.fix
    assert f'resourceNames: ["{target.name}"]' in error.fix
    text = exception_chain_text(error)
    for secret_text in secret_texts(delivery):
        assert secret_text not in text
    assert error.__cause__ is None
    assert error.__context__ is None


def test_invalid_write_reports_fields_not_values(k8s: KubeCluster, target: SecretTarget) -> None:
    def reject(request: kmock.Request) -> None:
        if request.method == kmock.method.POST:
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message=f"Secret is invalid: {request.text}",
                details={"causes": [{"field": "data[token]", "message": request.text}]},
            )

    k8s.before_write(reject)
    delivery = make_delivery()
    with pytest.raises(KubernetesError) as failure:
        target.deliver(delivery)
    assert "fields: data[token]" in failure.value.message
    text = exception_chain_text(failure.value)
    for secret_text in secret_texts(delivery):
        assert secret_text not in text


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


# --- LeaseLock -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: datetime = NOW) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def make_lock(api: Any, namespace: str, identity: str, **kwargs: Any) -> LeaseLock:
    kwargs.setdefault("renew", False)
    return LeaseLock(api_client=api, namespace=namespace, identity=identity, **kwargs)


def lease(
    k8s: KubeCluster, namespace: str, name: str = "lg-rotate-linuxguard-enroll"
) -> dict[str, Any]:
    stored = k8s.get("coordination.k8s.io/v1/leases", namespace, name)
    assert stored is not None
    return stored


def test_lock_acquire_and_release(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    lock = make_lock(api, k8s_namespace, "host-a-1-x", clock=clock, duration=45)
    with lock.hold():
        spec = lease(k8s, k8s_namespace)["spec"]
        assert spec["holderIdentity"] == "host-a-1-x"
        assert spec["leaseDurationSeconds"] == 45
        # MicroTime, never on a whole second (see micro_time)
        assert parse_timestamp(spec["acquireTime"]) == NOW + MICROSECOND
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
    second = make_lock(api, k8s_namespace, "host-b-2-y", clock=clock)
    first.acquire()
    clock.now = NOW + timedelta(seconds=59)
    with pytest.raises(LockError) as failure:
        second.acquire()
    assert "locked by host-a-1-x" in failure.value.message
    assert format_timestamp(NOW + timedelta(seconds=60)) in failure.value.message
    assert f"Lease {k8s_namespace}/lg-rotate-linuxguard-enroll" in failure.value.message
    assert failure.value.exit_code == ExitCode.LOCK
    assert failure.value.fix
    assert "--lock-wait" in failure.value.fix


def test_lock_takeover_after_expiry(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
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


def test_lock_released_on_exception(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
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
    make_lock(api, k8s_namespace, "host-a-1-x", clock=clock, duration=600).acquire()

    def sleep(seconds: float) -> None:
        clock.now += timedelta(seconds=seconds)

    waiter = make_lock(api, k8s_namespace, "host-b-2-y", clock=clock, wait=5, sleep=sleep)
    with pytest.raises(LockError, match=r"locked by host-a-1-x after waiting 5s"):
        waiter.acquire()
    assert clock.now == NOW + timedelta(seconds=5)


def test_lock_race_has_one_winner(api: Any, k8s_namespace: str) -> None:
    barrier = threading.Barrier(3)
    outcomes: dict[str, str] = {}

    def contend(identity: str) -> None:
        lock = make_lock(api, k8s_namespace, identity)
        barrier.wait()
        try:
            lock.acquire()
            outcomes[identity] = "won"
        except LockError:
            outcomes[identity] = "lost"

    threads = [threading.Thread(target=contend, args=(f"host-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes.values()) == ["lost", "lost", "won"]


def test_lock_renews_in_the_background(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
    clock = FakeClock()
    lock = LeaseLock(
        api_client=api, namespace=k8s_namespace, identity="host-a-1-x", duration=1, clock=clock
    )
    renewed = threading.Event()

    def watch_renewal(request: kmock.Request) -> None:
        if request.method == kmock.method.PATCH and "renewTime" in (request.data or {}).get(
            "spec", {}
        ):
            renewed.set()

    with lock.hold():
        clock.now = NOW + timedelta(seconds=30)
        k8s.before_write(watch_renewal)
        assert renewed.wait(5), "the lease was not renewed within 5 s"
        renewed_at = parse_timestamp(lease(k8s, k8s_namespace)["spec"]["renewTime"])
        assert renewed_at == NOW + timedelta(seconds=30) + MICROSECOND
        assert not lock.lost
    assert "holderIdentity" not in lease(k8s, k8s_namespace)["spec"]


def test_lease_name_is_per_secret_and_bounded() -> None:
    assert lease_name_for("linuxguard-enroll") == "lg-rotate-linuxguard-enroll"
    long_name = lease_name_for("a" * 253)
    assert len(long_name) <= 253
    assert long_name.startswith("lg-rotate-aaa")
    assert long_name != lease_name_for("a" * 252 + "b")


# --- workloads -------------------------------------------------------------------------


def create_daemonset(api: Any, namespace: str, name: str, **status: Any) -> None:
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
    if status:
        body["status"] = status
    client.AppsV1Api(api).create_namespaced_daemon_set(namespace, body)


def set_status(api: Any, namespace: str, name: str, status: dict[str, Any]) -> None:
    # raw JSON: client 37's models reject a partial status
    client.AppsV1Api(api).patch_namespaced_daemon_set_status(
        name, namespace, {"status": status}, _content_type=MERGE_PATCH, _preload_content=False
    )


def test_restart_workload_sets_restarted_at(k8s: KubeCluster, api: Any, k8s_namespace: str) -> None:
    create_daemonset(api, k8s_namespace, "agent")
    restart_workload(api_client=api, namespace=k8s_namespace, kind="ds", name="agent", at=NOW)
    stored = k8s.get("apps/v1/daemonsets", k8s_namespace, "agent")
    assert stored is not None
    annotations = stored["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"kubectl.kubernetes.io/restartedAt": "2030-01-02T03:04:05Z"}
    assert stored["spec"]["template"]["metadata"]["labels"] == {"app": "agent"}
    assert stored["metadata"]["generation"] == 2
    with pytest.raises(KubernetesNotFoundError, match=r"DaemonSet .*/missing not found"):
        restart_workload(
            api_client=api, namespace=k8s_namespace, kind="daemonset", name="missing", at=NOW
        )


def test_wait_for_rollout_times_out(api: Any, k8s_namespace: str) -> None:
    create_daemonset(api, k8s_namespace, "agent")
    set_status(
        api,
        k8s_namespace,
        "agent",
        {
            "observedGeneration": 1,
            "desiredNumberScheduled": 3,
            "updatedNumberScheduled": 1,
            "numberAvailable": 2,
        },
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
    assert "1 of 3 pods updated, 2 available" in failure.value.message
    assert failure.value.exit_code == ExitCode.KUBERNETES
    assert [progress.done for progress in seen] == [False]  # reported once: it never changed


def test_wait_for_rollout_succeeds_when_status_catches_up(api: Any, k8s_namespace: str) -> None:
    create_daemonset(api, k8s_namespace, "agent")
    restart_workload(api_client=api, namespace=k8s_namespace, kind="ds", name="agent", at=NOW)
    set_status(  # the controller has not seen the restart (generation 2) yet
        api,
        k8s_namespace,
        "agent",
        {
            "observedGeneration": 1,
            "desiredNumberScheduled": 2,
            "updatedNumberScheduled": 2,
            "numberAvailable": 2,
        },
    )
    steps = iter(
        [
            {"observedGeneration": 2, "updatedNumberScheduled": 1, "numberAvailable": 1},
            {"updatedNumberScheduled": 2, "numberAvailable": 1},
            {"numberAvailable": 2},
        ]
    )
    controller_threads: list[threading.Thread] = []

    def on_progress(progress: RolloutProgress) -> None:
        seen.append(progress)
        step = next(steps, None)
        if step is not None:  # a "controller" thread moves the status on
            thread = threading.Thread(target=set_status, args=(api, k8s_namespace, "agent", step))
            controller_threads.append(thread)
            thread.start()

    seen: list[RolloutProgress] = []
    final = wait_for_rollout(
        api_client=api,
        namespace=k8s_namespace,
        kind="daemonset",
        name="agent",
        timeout=10,
        poll_interval=0.02,
        on_progress=on_progress,
    )
    for thread in controller_threads:
        thread.join(5)
    assert final.done
    assert final.updated == final.available == final.desired == 2
    assert [progress.done for progress in seen] == [False, False, False, True]
    assert not seen[0].observed
    assert "has not seen generation 2" in seen[0].describe()


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


def events_in(k8s: KubeCluster, namespace: str) -> list[dict[str, Any]]:
    def collect(emulator: Any) -> list[dict[str, Any]]:
        return [
            dict(obj.raw)
            for (resource, obj_namespace, _), obj in emulator.objects.items()
            if resource == kmock.resource("v1/events")
            and obj_namespace == namespace
            and not obj.deleted
        ]

    return k8s.call(collect)


def test_record_event_on_the_secret(
    k8s: KubeCluster, api: Any, target: SecretTarget, k8s_namespace: str
) -> None:
    delivery = make_delivery()
    target.deliver(delivery)
    token = delivery.record.token.value.reveal()
    assert record_event(
        api_client=api,
        namespace=k8s_namespace,
        secret_name=target.name,
        reason="TokenRotated",
        message=f"delivered token {delivery.record.token.short_fingerprint}; oops {token}",
        clock=lambda: NOW,
    )
    (event,) = events_in(k8s, k8s_namespace)
    secret = k8s.get("v1/secrets", k8s_namespace, target.name)
    assert secret is not None
    assert event["involvedObject"] == {
        "apiVersion": "v1",
        "kind": "Secret",
        "name": target.name,
        "namespace": k8s_namespace,
        "uid": secret["metadata"]["uid"],
    }
    assert (event["reason"], event["type"]) == ("TokenRotated", "Normal")
    assert (
        event["message"]
        == f"delivered token {delivery.record.token.short_fingerprint}; oops <redacted>"
    )
    assert parse_timestamp(event["lastTimestamp"]) == NOW
    for secret_text in secret_texts(delivery):
        assert secret_text not in json.dumps(event)
        assert secret_text not in json.dumps(secret["metadata"])


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


# --- connect ---------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_connect_with_kubeconfig(k8s: KubeCluster, clean_env: Path) -> None:
    path = k8s.write_kubeconfig(clean_env / "config")
    api_client = connect(kubeconfig=str(path), context="test")
    try:
        assert api_client.configuration.host == k8s.url
        assert client.CoreV1Api(api_client).read_namespace("default").metadata.name == "default"
    finally:
        api_client.close()


def test_connect_with_kubeconfig_env_beats_in_cluster(
    k8s: KubeCluster, clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(k8s.write_kubeconfig(clean_env / "config")))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    api_client = connect(kubeconfig=None, context=None)
    try:
        assert api_client.configuration.host == k8s.url
    finally:
        api_client.close()


def test_connect_unknown_context(k8s: KubeCluster, clean_env: Path) -> None:
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
