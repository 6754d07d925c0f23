"""``webhook --tls-self-managed``: lg-rotate keeps the webhook's certificates (one writer).

First the pure part (certificates, and the rotation's state machine walked with a manual
clock), then the keeper on the real control plane (tests/fixtures/cluster.py): from an empty
Secret, two keepers and their Lease, a crash between phases, and a whole CA rotation while the
API server admits pods through two webhook replicas, each reloading the files a test thread
copies from the Secret as the kubelet would (one of them late). Lifetimes and overlaps are
injected in seconds; nothing sleeps for readiness.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from kubernetes import client

from fixtures.cluster import Cluster
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import ConfigError, LgRotateError
from rotator.kube import webhook_certs
from rotator.kube.webhook import ENROLL_SECRET_ANNOTATION, WebhookServer
from rotator.kube.webhook_certs import (
    CA_ANNOTATION,
    PHASE_ANNOTATION,
    WRITER_ANNOTATION,
    CertKeeper,
    CertLifetimes,
    issue_serving,
    make_ca,
    parse_certificates,
    plan_step,
    read_state,
    service_dns_names,
)
from rotator.sandbox import SandboxServer
from rotator.tokens import utcnow
from webhooksim import (
    RoundRobinProxy,
    agent_pod,
    shared_secret,
    start_webhook,
    wait_for,
    wait_until_mutating,
    webhook_configuration,
    widen_pool,
)

SERVICE = "lg-rotate-webhook"
SECRET = "lg-rotate-webhook-tls"
MWC = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
NAMES = service_dns_names(SERVICE, "agents")


# --- pure: certificates ---------------------------------------------------------------------


def test_a_ca_and_a_serving_certificate_for_the_service_names() -> None:
    now = utcnow()
    ca = make_ca(now=now, lifetime=timedelta(days=365), backdate=timedelta(minutes=5))
    pair = issue_serving(
        ca, dns_names=NAMES, now=now, lifetime=timedelta(days=90), backdate=timedelta(minutes=5)
    )
    assert NAMES == ("lg-rotate-webhook.agents.svc", "lg-rotate-webhook.agents.svc.cluster.local")

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    assert usage.crl_sign
    assert ca_cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.info.not_after == (now + timedelta(days=365)).replace(microsecond=0)
    assert ca.info.not_before == (now - timedelta(minutes=5)).replace(microsecond=0)

    cert = x509.load_pem_x509_certificate(pair.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == list(NAMES)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_cert_sign
    assert not usage.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(ca_cert)
    assert pair.info.not_after == (now + timedelta(days=90)).replace(microsecond=0)
    assert pair.issuer_fingerprint == ca.info.fingerprint
    # Never past its CA.
    short = make_ca(now=now, lifetime=timedelta(days=10))
    capped = issue_serving(short, dns_names=NAMES, now=now, lifetime=timedelta(days=90))
    assert capped.info.not_after == short.info.not_after
    # Keys never show in a repr (a log line, a test failure).
    for thing in (ca, pair):
        assert "PRIVATE KEY" not in repr(thing)
        assert "CERTIFICATE" not in repr(thing)


def test_openssl_verifies_the_serving_certificate_by_the_service_name(tmp_path: Path) -> None:
    """A real TLS handshake: the client trusts only the CA and checks the Service's name."""
    now = utcnow()
    ca = make_ca(now=now, lifetime=timedelta(days=1))
    pair = issue_serving(ca, dns_names=NAMES, now=now, lifetime=timedelta(hours=1))
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with (
            listener.accept()[0] as raw,
            server_context.wrap_socket(raw, server_side=True) as tls,
        ):
            tls.recv(1)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    trusting = ssl.create_default_context(cadata=ca.cert_pem.decode())
    with (
        socket.create_connection(listener.getsockname(), timeout=5) as raw,
        trusting.wrap_socket(raw, server_hostname=NAMES[0]) as tls,
    ):
        assert tls.getpeercert()["subjectAltName"] == tuple(("DNS", n) for n in NAMES)
        tls.send(b"x")
    thread.join(timeout=5)
    listener.close()
    # Another CA's client refuses it: what the API server does with a stale caBundle.
    other = make_ca(now=now, lifetime=timedelta(days=1))
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=lambda: _swallow(accept), daemon=True)
    thread.start()
    with (
        pytest.raises(ssl.SSLCertVerificationError),
        socket.create_connection(listener.getsockname(), timeout=5) as raw,
    ):
        ssl.create_default_context(cadata=other.cert_pem.decode()).wrap_socket(
            raw, server_hostname=NAMES[0]
        )
    thread.join(timeout=5)
    listener.close()


def _swallow(function: Any) -> None:
    with contextlib.suppress(OSError, ssl.SSLError):
        function()


def test_bundles_are_parsed_in_order_and_garbage_is_no_certificate() -> None:
    now = utcnow()
    first, second = (make_ca(now=now, lifetime=timedelta(days=1)) for _ in range(2))
    infos = parse_certificates(first.cert_pem + second.cert_pem)
    assert [i.fingerprint for i in infos] == [first.info.fingerprint, second.info.fingerprint]
    der = x509.load_pem_x509_certificate(first.cert_pem).public_bytes(Encoding.DER)
    assert first.info.fingerprint == hashlib.sha256(der).hexdigest()
    assert parse_certificates(b"") == []
    assert (
        parse_certificates(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n") == []
    )


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"serving": timedelta(days=400)}, "shorter than the CA"),
        ({"overlap": timedelta(days=100)}, "too little time for a rotation"),
        ({"renew_at": 1.0}, "between 0 and 1"),
    ],
)
def test_lifetimes_that_cannot_rotate_safely_are_refused(
    settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        CertLifetimes(**settings)


# --- pure: the rotation, walked with a manual clock ------------------------------------------

SHORT = CertLifetimes(
    ca=timedelta(seconds=15),
    serving=timedelta(seconds=9),
    overlap=timedelta(seconds=2),
    backdate=timedelta(seconds=0),
)


def apply_step(secret: Mapping[str, Any], step: webhook_certs.Step) -> dict[str, Any]:
    """What the keeper's merge patch does to the Secret (data and annotations)."""
    data = dict(secret.get("data") or {})
    data |= {key: base64.b64encode(value).decode() for key, value in step.data.items()}
    annotations = dict((secret.get("metadata") or {}).get("annotations") or {})
    for key, value in step.annotations.items():
        if value is None:
            annotations.pop(key, None)
        else:
            annotations[key] = value
    return {"type": "kubernetes.io/tls", "data": data, "metadata": {"annotations": annotations}}


def walk(
    secret: Mapping[str, Any], start: datetime, seconds: float
) -> list[tuple[float, str, Any]]:
    """plan_step every 0.25 s of a manual clock, each step applied to the Secret alone (a
    fresh read_state every time: a keeper that crashed and a new one are the same to it)."""
    steps = []
    state_holder = dict(secret)
    for tick in range(int(seconds * 4) + 1):
        now = start + timedelta(seconds=tick / 4)
        step = plan_step(read_state(state_holder), now=now, lifetimes=SHORT, dns_names=NAMES)
        if step is not None:
            state_holder = apply_step(state_holder, step)
            steps.append((tick / 4, step.action, read_state(state_holder)))
    return steps


EMPTY = {"type": "kubernetes.io/tls", "data": {"tls.crt": "", "tls.key": ""}, "metadata": {}}


def test_the_rotation_adds_the_new_ca_switches_the_pair_then_drops_the_old_ca() -> None:
    start = utcnow().replace(microsecond=0)  # certificates carry whole seconds
    steps = walk(EMPTY, start, 14.5)
    expected = [
        (0.0, "bootstrap"),
        (6.0, "renew-serving"),  # 2/3 of 9 s
        (10.0, "add-ca"),  # 2/3 of 15 s
        (12.0, "switch-serving"),  # one overlap later
        (14.0, "retire-ca"),  # another one
    ]
    assert [action for _, action, _ in steps] == [action for _, action in expected]
    for (t, _, _), (due, _) in zip(steps, expected, strict=True):
        assert due <= t <= due + 0.25  # at the first tick of the clock that reaches it
    boot, renewed, added, switched, retired = (state for _, _, state in steps)
    old_ca = boot.signing.info.fingerprint
    # A renewal under the same CA changes neither the bundle nor the CA.
    assert renewed.bundle == boot.bundle
    assert renewed.serving.info.fingerprint != boot.serving.info.fingerprint
    assert renewed.serving.issuer_fingerprint == old_ca
    # Phase 1: both CAs trusted, the pair unchanged, signed by the old one.
    new_ca = added.signing.info.fingerprint
    assert [ca.fingerprint for ca in added.bundle] == [old_ca, new_ca]
    assert added.serving.info.fingerprint == renewed.serving.info.fingerprint
    assert (added.phase, added.retiring) == ("ca-added", old_ca)
    # Phase 2: the new CA's pair, both CAs still trusted.
    assert switched.serving.issuer_fingerprint == new_ca
    assert [ca.fingerprint for ca in switched.bundle] == [old_ca, new_ca]
    # Phase 3: the old CA is gone.
    assert [ca.fingerprint for ca in retired.bundle] == [new_ca]
    assert (retired.phase, retired.retiring) == ("stable", None)
    assert retired.serving.info.fingerprint == switched.serving.info.fingerprint
    # Every pair the replicas could still be serving during a phase is trusted by its bundle,
    # and valid for a while after the phase began (an overlap, for a late kubelet).
    previous = None
    for t, _, state in steps:
        now = start + timedelta(seconds=t)
        for pair in (state.serving, previous):
            if pair is not None:
                assert pair.issuer_fingerprint in {ca.fingerprint for ca in state.bundle}
                assert pair.info.not_after >= now + SHORT.overlap
        previous = state.serving


def test_a_lost_ca_key_rotates_with_overlap_and_unreadable_state_restarts_safely() -> None:
    start = utcnow()
    secret = apply_step(
        EMPTY, plan_step(read_state(EMPTY), now=start, lifetimes=SHORT, dns_names=NAMES)
    )
    lost = {**secret, "data": {**secret["data"], "ca.key": ""}}
    step = plan_step(read_state(lost), now=start, lifetimes=SHORT, dns_names=NAMES)
    assert step is not None
    assert step.action == "add-ca"
    assert step.bundle_first  # caBundle before the Secret
    assert len(parse_certificates(step.bundle_pem)) == 2
    # The phase's start unreadable: its overlap starts again rather than counting as over.
    rotating = apply_step(lost, step)
    rotating["metadata"]["annotations"][webhook_certs.SINCE_ANNOTATION] = "yesterday"
    later = start + timedelta(seconds=5)
    step = plan_step(read_state(rotating), now=later, lifetimes=SHORT, dns_names=NAMES)
    assert step is not None
    assert step.action == "restart-overlap"
    restarted = apply_step(rotating, step)
    assert plan_step(read_state(restarted), now=later, lifetimes=SHORT, dns_names=NAMES) is None
    # Nothing usable at all (a pair that is not its key's): a new CA and pair.
    broken = {**secret, "data": {**secret["data"], "ca.key": "", "tls.key": ""}}
    step = plan_step(read_state(broken), now=start, lifetimes=SHORT, dns_names=NAMES)
    assert step is not None
    assert step.action == "bootstrap"


# --- the keeper on the real API server ---------------------------------------------------------


def tls_secret() -> dict[str, Any]:
    """The component's empty Secret (cronjob/components/webhook-certs/secret.yaml)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": "", "tls.key": ""},
    }


def secret_bytes(secret: Mapping[str, Any], key: str) -> bytes:
    return base64.b64decode((secret.get("data") or {}).get(key) or "")


def ca_bundle(k8s: Cluster, name: str) -> bytes:
    configuration = k8s.get(MWC, None, name)
    assert configuration is not None
    return base64.b64decode(configuration["webhooks"][0]["clientConfig"].get("caBundle") or "")


@pytest.fixture
def certs_env(k8s: Cluster, k8s_namespace: str) -> Iterator[SimpleNamespace]:
    """The empty TLS Secret and a webhook configuration (never called: no pod matches it)."""
    k8s.apply(tls_secret(), k8s_namespace)
    name = f"lgr-certs-{k8s_namespace}"
    configuration = webhook_configuration(
        name=name, url="https://127.0.0.1:9/", ca_pem=b"", namespace=k8s_namespace,
        failure_policy="Ignore",
    )  # fmt: skip
    k8s.apply(configuration)
    keepers: list[tuple[CertKeeper, threading.Event, threading.Thread]] = []

    def keeper(**settings: Any) -> CertKeeper:
        options: dict[str, Any] = {
            "api_client": k8s.api_client(),
            "namespace": k8s_namespace,
            "secret_name": SECRET,
            "webhook_configuration": name,
            "service": SERVICE,
            "lifetimes": SHORT,
            "lease_duration": 2.0,
            "check_interval": 0.2,
            "retry_interval": 0.2,
        }
        options.update(settings)
        return CertKeeper(**options)

    def run(made: CertKeeper) -> threading.Event:
        stop = threading.Event()
        thread = threading.Thread(target=made.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        keepers.append((made, stop, thread))
        return stop

    def halt(made: CertKeeper) -> None:
        for entry in keepers:
            if entry[0] is made:
                entry[1].set()
                entry[2].join(timeout=10)
                assert not entry[2].is_alive()

    def secret() -> dict[str, Any]:
        found = k8s.get("v1/secrets", k8s_namespace, SECRET)
        assert found is not None
        return found

    try:
        yield SimpleNamespace(
            name=name, keeper=keeper, run=run, halt=halt, secret=secret, namespace=k8s_namespace
        )
    finally:
        for _made, stop, thread in keepers:
            stop.set()
            thread.join(timeout=10)
        k8s.delete(MWC, None, name)


def test_the_keeper_fills_an_empty_secret_and_the_ca_bundle(
    certs_env: SimpleNamespace, k8s: Cluster, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG, logger="lg_rotate")
    keeper = certs_env.keeper(lifetimes=CertLifetimes())  # the shipped lifetimes
    assert keeper.reconcile() == "bootstrap"

    secret = certs_env.secret()
    assert secret["type"] == "kubernetes.io/tls"
    state = read_state(secret)
    assert state.phase == "stable"
    assert state.signing is not None
    assert state.serving is not None
    (ca,) = state.bundle
    assert state.serving.issuer_fingerprint == ca.fingerprint
    names = service_dns_names(SERVICE, certs_env.namespace)
    assert state.serving.info.dns_names == names
    now = utcnow()
    assert abs(state.serving.info.not_after - (now + timedelta(days=90))) < timedelta(minutes=1)
    assert abs(ca.not_after - (now + timedelta(days=365))) < timedelta(minutes=1)
    annotations = secret["metadata"]["annotations"]
    assert annotations[CA_ANNOTATION] == ca.fingerprint
    assert annotations[WRITER_ANNOTATION] == keeper.identity
    assert ca_bundle(k8s, certs_env.name) == secret_bytes(secret, "ca.crt") == ca.pem
    # The pair loads where the replicas load it.
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(*_files(secret, tmp_path / "pair"))

    # Nothing due: no write at all.
    versions = (secret["metadata"]["resourceVersion"], _version(k8s, certs_env.name))
    assert keeper.reconcile() is None
    assert (certs_env.secret()["metadata"]["resourceVersion"], _version(k8s, certs_env.name)) == (
        versions
    )
    # A client-side `kubectl apply` of the shipped Secret empties the pair: a new one, under
    # the same CA, and the caBundle stays.
    k8s.modify("v1/secrets", certs_env.namespace, SECRET, {"data": {"tls.crt": "", "tls.key": ""}})
    assert keeper.reconcile() == "renew-serving"
    again = read_state(certs_env.secret())
    assert again.serving is not None
    assert again.serving.issuer_fingerprint == ca.fingerprint
    assert _version(k8s, certs_env.name) == versions[1]
    # No key or certificate body in any log line.
    text = caplog.text
    assert "PRIVATE KEY" not in text
    assert "BEGIN CERTIFICATE" not in text
    for key in ("tls.crt", "tls.key", "ca.crt", "ca.key"):
        blob = certs_env.secret()["data"][key]
        assert blob[:40] not in text
        assert base64.b64decode(blob).decode()[40:80] not in text
    assert "bootstrap" in text
    assert ca.fingerprint[:12] in text


def _version(k8s: Cluster, name: str) -> str:
    configuration = k8s.get(MWC, None, name)
    assert configuration is not None
    return str(configuration["metadata"]["resourceVersion"])


def _files(secret: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tls.crt").write_bytes(secret_bytes(secret, "tls.crt"))
    (folder / "tls.key").write_bytes(secret_bytes(secret, "tls.key"))
    return folder / "tls.crt", folder / "tls.key"


def test_two_keepers_one_writer_and_the_other_takes_over(
    certs_env: SimpleNamespace, k8s: Cluster
) -> None:
    first, second = certs_env.keeper(), certs_env.keeper()
    certs_env.run(first)
    certs_env.run(second)
    wait_for(
        lambda: read_state(certs_env.secret()).serving is not None,
        timeout=15,
        what="a keeper to write the pair",
    )
    wait_for(lambda: first.leading.is_set() != second.leading.is_set(), timeout=5, what="a leader")
    leader, standby = (first, second) if first.leading.is_set() else (second, first)
    assert leader.actions == {"bootstrap": 1}
    assert standby.actions == {}  # the Lease: it never wrote
    annotations = certs_env.secret()["metadata"]["annotations"]
    assert annotations[WRITER_ANNOTATION] == leader.identity
    lease = k8s.get("coordination.k8s.io/v1/leases", certs_env.namespace, webhook_certs.LEASE_NAME)
    assert lease is not None
    assert lease["spec"]["holderIdentity"] == leader.identity

    certs_env.halt(leader)  # SIGTERM: it releases the Lease
    wait_for(standby.leading.is_set, timeout=10, what="the standby to take the Lease")
    k8s.modify("v1/secrets", certs_env.namespace, SECRET, {"data": {"tls.crt": "", "tls.key": ""}})
    wait_for(
        lambda: (
            certs_env.secret()["metadata"]["annotations"][WRITER_ANNOTATION] == standby.identity
        ),
        timeout=10,
        what="the new leader to repair the pair",
    )
    assert standby.actions == {"renew-serving": 1}
    assert leader.actions == {"bootstrap": 1}
    state = read_state(certs_env.secret())
    assert state.serving is not None
    assert state.serving.issuer_fingerprint == (annotations[CA_ANNOTATION])


def seed(certs_env: SimpleNamespace, k8s: Cluster, *, age: float) -> webhook_certs.KeeperState:
    """The Secret and caBundle as a keeper left them ``age`` seconds ago (so a rotation is due
    sooner than the lifetimes would take to get there)."""
    then = utcnow() - timedelta(seconds=age)
    names = service_dns_names(SERVICE, certs_env.namespace)
    step = plan_step(read_state(EMPTY), now=then, lifetimes=SHORT, dns_names=names)
    assert step is not None
    body = apply_step(certs_env.secret(), step)
    k8s.modify(
        "v1/secrets", certs_env.namespace, SECRET, {k: body[k] for k in ("data", "metadata")}
    )
    configuration = k8s.get(MWC, None, certs_env.name)
    assert configuration is not None
    configuration["webhooks"][0]["clientConfig"]["caBundle"] = base64.b64encode(
        step.bundle_pem
    ).decode()
    k8s.modify(MWC, None, certs_env.name, {"webhooks": configuration["webhooks"]})
    return read_state(certs_env.secret())


def test_a_keeper_that_crashes_mid_rotation_is_finished_by_the_next(
    certs_env: SimpleNamespace, k8s: Cluster
) -> None:
    seeded = seed(certs_env, k8s, age=10)  # the CA (15 s) is due for rotation (at 10 s)
    assert seeded.signing is not None
    crashing = certs_env.keeper()
    crashing.release_on_stop = False  # SIGKILL: the Lease stays held until it lapses
    certs_env.run(crashing)
    wait_for(
        lambda: read_state(certs_env.secret()).phase == "ca-added",
        timeout=10,
        what="phase 1",
    )
    certs_env.halt(crashing)
    added = read_state(certs_env.secret())
    assert added.phase == "ca-added"  # stopped between phases
    assert crashing.actions == {"add-ca": 1}
    assert added.signing is not None
    new_ca = added.signing.info.fingerprint
    assert [ca.fingerprint for ca in added.bundle] == [seeded.signing.info.fingerprint, new_ca]
    assert ca_bundle(k8s, certs_env.name) == added.bundle_pem  # caBundle first, then Secret

    successor = certs_env.keeper()
    certs_env.run(successor)
    wait_for(
        lambda: (
            read_state(certs_env.secret()).phase == "stable"
            and len(read_state(certs_env.secret()).bundle) == 1
        ),
        timeout=15,
        what="the successor to finish the rotation",
    )
    final = read_state(certs_env.secret())
    assert [ca.fingerprint for ca in final.bundle] == [new_ca]  # the rotation it found
    assert final.serving is not None
    assert final.serving.issuer_fingerprint == new_ca
    assert successor.actions.get("switch-serving") == 1
    assert successor.actions.get("retire-ca") == 1
    assert "add-ca" not in successor.actions
    assert "bootstrap" not in successor.actions
    assert ca_bundle(k8s, certs_env.name) == final.bundle_pem


# --- a whole rotation under load, two replicas, a late kubelet ----------------------------------


class ProjectedVolume:
    """tls.crt and tls.key as the kubelet projects a Secret volume: the files are symlinks
    into ``..data``, a symlink to a timestamped folder, swapped atomically (AtomicWriter)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.write({"tls.crt": b"", "tls.key": b""})
        for name in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{name}", folder / name)

    @property
    def cert_file(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.folder / "tls.key"

    def write(self, files: Mapping[str, bytes]) -> None:
        target = self.folder / f"..{time.time_ns()}"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        staged = self.folder / "..data_tmp"
        os.symlink(target.name, staged)
        previous = (self.folder / "..data").resolve() if (self.folder / "..data").exists() else None
        os.replace(staged, self.folder / "..data")
        if previous is not None:
            for stale in previous.iterdir():
                stale.unlink()
            previous.rmdir()


class Kubelet(threading.Thread):
    """Copies the Secret's pair into a replica's volume ``lag`` seconds after it changed."""

    def __init__(self, k8s: Cluster, namespace: str, volume: ProjectedVolume, lag: float) -> None:
        super().__init__(daemon=True)
        self.k8s, self.namespace, self.volume, self.lag = k8s, namespace, volume, lag
        self.stop = threading.Event()
        self.delivered = 0

    def run(self) -> None:
        current: tuple[bytes, bytes] = (b"", b"")
        pending: list[tuple[float, tuple[bytes, bytes]]] = []
        while not self.stop.wait(0.02):
            secret = self.k8s.get("v1/secrets", self.namespace, SECRET) or {}
            pair = (secret_bytes(secret, "tls.crt"), secret_bytes(secret, "tls.key"))
            if pair != current and all(p[1] != pair for p in pending):
                pending.append((time.monotonic() + self.lag, pair))
            while pending and pending[0][0] <= time.monotonic():
                _, current = pending.pop(0)
                self.volume.write({"tls.crt": current[0], "tls.key": current[1]})
                self.delivered += 1


def ready(server: WebhookServer) -> bool:
    """GET /readyz as the kubelet probes it (HTTPS, the certificate not verified)."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own loopback URL
            f"{server.url}/readyz", context=insecure, timeout=5
        ) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError:
        return False


def test_a_ca_rotation_under_load_through_two_replicas_fails_no_admission(
    k8s: Cluster, k8s_namespace: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    """Pods are created through the API server the whole time; it calls two replicas (in
    turn) that serve what a late kubelet copied from the Secret (0.1 s and 1 s behind). Each
    replica runs a keeper, as in production: the leader starts from the empty Secret, renews
    the serving pair, begins a CA rotation, and is stopped (SIGTERM) once the new CA is added;
    the other takes the Lease over and finishes the rotation. No admission fails."""
    k8s.apply(shared_secret(), k8s_namespace)
    k8s.apply(tls_secret(), k8s_namespace)
    volumes = [ProjectedVolume(tmp_path / f"replica-{i}") for i in range(2)]
    store = MemoryStore()
    replicas = [
        start_webhook(
            api_client=k8s.api_client(),
            namespace=k8s_namespace,
            sandbox=sandbox,
            pki=volume,  # its cert_file and key_file
            provider=MemoryProvider(store=store),
            wait_for_pair=True,
        )
        for volume in volumes
    ]
    proxy = RoundRobinProxy([("127.0.0.1", server.port) for server in replicas]).start()
    name = f"lgr-certs-{k8s_namespace}"
    k8s.apply(webhook_configuration(name=name, url=proxy.url, ca_pem=b"", namespace=k8s_namespace))
    kubelets = [
        Kubelet(k8s, k8s_namespace, volume, lag)
        for volume, lag in zip(volumes, (0.1, 1.0), strict=True)
    ]
    keepers = [
        CertKeeper(
            api_client=k8s.api_client(),
            namespace=k8s_namespace,
            secret_name=SECRET,
            webhook_configuration=name,
            service=SERVICE,
            lifetimes=SHORT,
            extra_ip_addresses=["127.0.0.1"],  # clientConfig.url is https://127.0.0.1:PORT
            lease_duration=3.0,
            check_interval=0.1,
            retry_interval=0.2,
        )
        for _ in replicas
    ]
    stops = [threading.Event() for _ in keepers]
    keeping = [
        threading.Thread(target=keeper.run, kwargs={"stop": stop}, daemon=True)
        for keeper, stop in zip(keepers, stops, strict=True)
    ]
    handed_over: list[CertKeeper] = []  # the leader stopped mid-rotation
    core = client.CoreV1Api(widen_pool(k8s.api_client()))
    created: list[float] = []
    failures: list[str] = []
    load_stop = threading.Event()

    def create_pods() -> None:
        while not load_stop.is_set():
            try:
                core.create_namespaced_pod(k8s_namespace, agent_pod(init=False))
            except client.ApiException as exc:
                failures.append(f"{exc.status}: {str(exc.body)[:300]}")
            else:
                created.append(time.monotonic())
            load_stop.wait(0.05)  # a steady stream, not a burst

    phases: list[str] = []

    def follow_phases() -> None:
        while not load_stop.wait(0.02):
            secret = k8s.get("v1/secrets", k8s_namespace, SECRET) or {}
            phase = ((secret.get("metadata") or {}).get("annotations") or {}).get(PHASE_ANNOTATION)
            if phase and (not phases or phases[-1] != phase):
                phases.append(phase)
            if phase == "ca-added" and not handed_over:
                # A leader change in the middle of the rotation: stop whoever leads now.
                for keeper, stop in zip(keepers, stops, strict=True):
                    if keeper.leading.is_set():
                        handed_over.append(keeper)
                        stop.set()

    try:
        # Replicas that start before the Secret has a pair wait, not ready; they do not crash.
        assert not any(ready(server) for server in replicas)
        for kubelet in kubelets:
            kubelet.start()
        for thread in keeping:
            thread.start()
        wait_for(lambda: all(ready(s) for s in replicas), timeout=15, what="both replicas ready")
        wait_until_mutating(core, k8s_namespace)
        first = read_state(k8s.get("v1/secrets", k8s_namespace, SECRET) or {})
        assert first.signing is not None
        old_ca = first.signing.info.fingerprint
        workers = [threading.Thread(target=create_pods, daemon=True) for _ in range(3)]
        watcher = threading.Thread(target=follow_phases, daemon=True)
        for thread in [*workers, watcher]:
            thread.start()

        def rotated() -> webhook_certs.KeeperState | None:
            state = read_state(k8s.get("v1/secrets", k8s_namespace, SECRET) or {})
            done = state.phase == "stable" and [c.fingerprint for c in state.bundle] != [old_ca]
            return state if done and len(state.bundle) == 1 else None

        final = wait_for(rotated, timeout=30, what="a whole CA rotation")
        retired_at = time.monotonic()
        assert final.serving is not None
        # Every replica reloads the new CA's pair; admissions continue past the old CA's end.
        wait_for(
            lambda: all(
                ready(s) and s.tls.fingerprint == final.serving.info.fingerprint  # type: ignore[union-attr]
                for s in replicas
            ),
            timeout=10,
            what="both replicas serving the new pair",
        )
        wait_for(
            lambda: sum(1 for t in created if t > retired_at + 0.5) >= 5,
            timeout=10,
            what="admissions after the old CA was dropped",
        )
        assert ca_bundle(k8s, name) == final.bundle_pem
    finally:
        load_stop.set()
        for stop in stops:
            stop.set()
        for thread in keeping:
            thread.join(timeout=10)
        for kubelet in kubelets:
            kubelet.stop.set()
        proxy.stop()
        for server in replicas:
            server.stop(drain_timeout=5)
        k8s.delete(MWC, None, name)

    assert failures == [], failures[:5]
    assert len(created) >= 50, len(created)
    actions: dict[str, int] = {}
    for keeper in keepers:
        for action, count in keeper.actions.items():
            actions[action] = actions.get(action, 0) + count
    assert actions.get("bootstrap") == 1  # one writer: the other stood by
    assert actions.get("renew-serving", 0) >= 1  # under the same CA first
    assert (actions.get("add-ca"), actions.get("switch-serving")) == (1, 1)
    assert actions.get("retire-ca") == 1
    (first_leader,) = handed_over
    (second_leader,) = [k for k in keepers if k is not first_leader]
    assert first_leader.actions.get("add-ca") == 1  # it began the rotation ...
    assert second_leader.actions.get("switch-serving") == 1  # ... the other finished it
    assert second_leader.actions.get("retire-ca") == 1
    assert phases[-3:] == ["ca-added", "serving-switched", "stable"], phases
    for server in replicas:
        assert server.metrics.admissions.value(result="minted") > 0  # both did real work
        assert server.metrics.tls_reloads.value(result="ok") >= 3  # placeholder, renew, switch
    pods = k8s.list_objects("v1/pods", k8s_namespace, label_selector="app")
    assert all(ENROLL_SECRET_ANNOTATION in p["metadata"]["annotations"] for p in pods)


# --- the component's RBAC and admission policy, as the webhook's ServiceAccount -----------------


def rendered_component() -> list[dict[str, Any]]:
    """cronjob/overlays/vault + per-pod + webhook-certs, as .ci/manifests.py renders it."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("ci_manifests", root / ".ci" / "manifests.py")
    assert spec is not None
    assert spec.loader is not None
    manifests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manifests)
    rendered = manifests.render_variant("cronjob/overlays/vault+per-pod+webhook-certs")
    return list(manifests.documents(rendered))


def test_the_keeper_works_as_the_webhook_serviceaccount_and_may_do_nothing_else(
    k8s: Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    """The component's Role, ClusterRole and admission policy on the real API server: the
    keeper does its whole job as lg-rotate-webhook; other Secrets and webhook configurations
    are refused it, and the policy lets it update only its TLS Secret."""
    from kubernetes.client.exceptions import ApiException

    from rotator.kube.api import connect

    docs = rendered_component()
    wanted = {
        ("Role", "lg-rotate-webhook"), ("RoleBinding", "lg-rotate-webhook"),
        ("Role", "lg-rotate-webhook-certs"), ("RoleBinding", "lg-rotate-webhook-certs"),
        ("ClusterRole", "lg-rotate-webhook-certs"),
        ("ClusterRoleBinding", "lg-rotate-webhook-certs"),
        ("Secret", SECRET), ("MutatingWebhookConfiguration", "lg-rotate-per-pod"),
        ("ValidatingAdmissionPolicy", "lg-rotate-per-pod-secrets"),
        ("ValidatingAdmissionPolicyBinding", "lg-rotate-per-pod-secrets"),
    }  # fmt: skip
    objects = [d for d in docs if (d["kind"], d["metadata"]["name"]) in wanted]
    assert len(objects) == len(wanted)
    for doc in objects:
        if doc["metadata"].get("namespace"):
            doc["metadata"]["namespace"] = k8s_namespace
        for subject in doc.get("subjects") or []:
            subject["namespace"] = k8s_namespace
        for hook in doc.get("webhooks") or []:
            hook["clientConfig"]["service"]["namespace"] = k8s_namespace
            hook["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] = k8s_namespace
    cluster_wide = [d for d in objects if not d["metadata"].get("namespace")]
    try:
        for doc in objects:
            k8s.apply(doc)
        kubeconfig = k8s.serviceaccount_kubeconfig(
            k8s_namespace, "lg-rotate-webhook", tmp_path / "webhook"
        )
        api_client = connect(kubeconfig=str(kubeconfig))
        as_webhook = client.CoreV1Api(api_client)
        wait_for(
            lambda: k8s.kubectl(
                "auth", "can-i", "patch", "mutatingwebhookconfigurations/lg-rotate-per-pod",
                kubeconfig=kubeconfig, check=False,
            ).returncode == 0,
            timeout=30,
            what="the ClusterRole to take effect",
        )  # fmt: skip

        def policy_in_force() -> bool:  # its informer takes a moment too
            try:
                as_webhook.create_namespaced_secret(
                    k8s_namespace, {"metadata": {"name": "not-per-pod"}}
                )
            except ApiException as exc:
                return "lg-rotate-per-pod-secrets" in str(exc.body)
            k8s.delete("v1/secrets", k8s_namespace, "not-per-pod")
            return False

        wait_for(policy_in_force, timeout=30, what="the admission policy to be in force")

        keeper = CertKeeper(
            api_client=api_client,
            namespace=k8s_namespace,
            lifetimes=SHORT,
            lease_duration=2.0,
            check_interval=0.2,
            retry_interval=0.2,
        )  # the shipped names: lg-rotate-webhook-tls, lg-rotate-per-pod, lg-rotate-webhook
        stop = threading.Event()
        thread = threading.Thread(target=keeper.run, kwargs={"stop": stop}, daemon=True)
        thread.start()
        try:
            wait_for(lambda: keeper.actions.get("bootstrap"), timeout=10, what="the keeper")
        finally:
            stop.set()
            thread.join(timeout=10)
        state = read_state(k8s.get("v1/secrets", k8s_namespace, SECRET) or {})
        assert state.serving is not None
        assert state.serving.info.dns_names == service_dns_names(SERVICE, k8s_namespace)
        assert ca_bundle(k8s, "lg-rotate-per-pod") == state.bundle_pem
        lease = k8s.get("coordination.k8s.io/v1/leases", k8s_namespace, webhook_certs.LEASE_NAME)
        assert lease is not None  # created as the ServiceAccount; released on stop
        assert not lease["spec"].get("holderIdentity")

        # Nothing beyond: another Secret (RBAC allows no patch), another configuration.
        k8s.apply(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-db"}}, k8s_namespace
        )
        with pytest.raises(ApiException) as refused:
            as_webhook.patch_namespaced_secret(
                "app-db", k8s_namespace, {"metadata": {"annotations": {"x": "y"}}}
            )
        assert refused.value.status == 403
        other = webhook_configuration(
            name=f"lgr-other-{k8s_namespace}", url="https://127.0.0.1:9/", ca_pem=b"",
            namespace=k8s_namespace, failure_policy="Ignore",
        )  # fmt: skip
        k8s.apply(other)
        cluster_wide.append(other)
        forbidden = CertKeeper(
            api_client=api_client,
            namespace=k8s_namespace,
            webhook_configuration=other["metadata"]["name"],
            lifetimes=SHORT,
        )
        with pytest.raises(LgRotateError, match=r"forbidden \(403\).*cluster-wide"):
            forbidden.reconcile()
        # The policy: the TLS Secret may not be turned into a per-pod Secret by the webhook.
        with pytest.raises(ApiException) as denied:
            as_webhook.patch_namespaced_secret(
                SECRET, k8s_namespace,
                {"metadata": {"labels": {"linuxguard.io/per-pod": "true",
                                         "linuxguard.io/shared-secret": "x"}}},
            )  # fmt: skip
        assert "lg-rotate-per-pod-secrets" in str(denied.value.body)
    finally:
        plural = {
            "ClusterRole": "clusterroles",
            "ClusterRoleBinding": "clusterrolebindings",
            "MutatingWebhookConfiguration": "mutatingwebhookconfigurations",
            "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
            "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
        }
        for doc in cluster_wide:
            k8s.delete(f"{doc['apiVersion']}/{plural[doc['kind']]}", None, doc["metadata"]["name"])
