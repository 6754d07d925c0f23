"""Helpers for running ``lg-rotate webhook`` against a real control plane (tests and benchmarks).

* :class:`Pki`: a CA and a serving certificate for 127.0.0.1 (``cryptography``), written to
  files the webhook reads; :meth:`Pki.rotate` replaces them like cert-manager does.
* :func:`webhook_configuration`: a MutatingWebhookConfiguration whose ``clientConfig.url`` is
  the in-process webhook, scoped to one namespace and the agent label.
* :func:`start_webhook`: the webhook server (:func:`rotator.kube.webhook.build_server`) in this
  process, on a free loopback port, against the sandbox and a store.
* :func:`wait_until_mutating`: polls server-side dry-run creates until the API server calls
  the webhook (its configuration informer needs a moment), never a sleep.
* :func:`agent_pod`, :func:`agent_daemonset`: the agent's pod and DaemonSet, their env
  referencing the shared Secret (containers and an initContainer).
* :class:`Kubelet`: plays the kubelet at container start: reads the pod, follows its
  ``secretKeyRef``s to the Secret data, and enrols with the sandbox (workload id = pod UID).

Tokens are held as :class:`rotator.tokens.Secret` and compared by fingerprint only.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubernetes import client

from providers.base import Provider
from rotator import agent
from rotator.kube import webhook
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.sandbox import SandboxServer
from rotator.tokens import Secret, fingerprint, normalize

TENANT = "acme"
SHARED_SECRET = "linuxguard-enroll"
APP_LABEL = {"app": "linuxguard-agent"}
AGENT_IMAGE = "registry.example/linuxguard/agent:test"
POLL_S = 0.05


# --- PKI -------------------------------------------------------------------------------


@dataclass
class Pki:
    """A CA and a serving key pair for 127.0.0.1, as PEM files in ``folder``."""

    folder: Path
    ca_pem: bytes = b""
    _ca_key: Any = None
    _ca_cert: Any = None
    serials: list[int] = field(default_factory=list)

    @property
    def cert_file(self) -> Path:
        return self.folder / "tls.crt"

    @property
    def key_file(self) -> Path:
        return self.folder / "tls.key"

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.crt"

    @classmethod
    def create(cls, folder: Path) -> Pki:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        folder.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lgr-webhook-test-ca")])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        pki = cls(folder=folder)
        pki._ca_key, pki._ca_cert = key, cert
        pki.ca_pem = cert.public_bytes(serialization.Encoding.PEM)
        pki.ca_file.write_bytes(pki.ca_pem)
        pki.rotate()
        return pki

    def rotate(self) -> str:
        """Issue a new serving pair and replace the files atomically (rename, new inodes),
        as the kubelet does with a projected Secret volume. Returns its SHA-256 (DER)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lg-rotate-webhook")]))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        self.serials.append(serial)
        staged_cert, staged_key = self.folder / ".tls.crt.new", self.folder / ".tls.key.new"
        staged_key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        staged_key.chmod(0o600)
        der = cert.public_bytes(serialization.Encoding.DER)
        staged_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(staged_key, self.key_file)
        os.replace(staged_cert, self.cert_file)
        return hashlib.sha256(der).hexdigest()

    def client_context(self) -> Any:
        import ssl

        return ssl.create_default_context(cafile=str(self.ca_file))


# --- manifests -------------------------------------------------------------------------


def webhook_configuration(
    *,
    name: str,
    url: str,
    ca_pem: bytes,
    namespace: str,
    failure_policy: str = "Fail",
    timeout_seconds: int = 10,
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration (cluster-wide) pointing the API server at ``url``."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [
            {
                "name": "enroll-secret.linuxguard.io",
                "clientConfig": {
                    "url": f"{url}{webhook.MUTATE_PATH}",
                    "caBundle": base64.b64encode(ca_pem).decode(),
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "objectSelector": {"matchLabels": dict(APP_LABEL)},
                "sideEffects": "NoneOnDryRun",
                "admissionReviewVersions": ["v1"],
                "failurePolicy": failure_policy,
                "reinvocationPolicy": "IfNeeded",
                "timeoutSeconds": timeout_seconds,
            }
        ],
    }


def _agent_env(secret: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "LINUXGUARD_ENROLL_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
        },
        {
            "name": "LINUXGUARD_TENANT_ID",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": "tenant-id"}},
        },
        {"name": "LINUXGUARD_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    ]


def agent_pod_spec(secret: str = SHARED_SECRET, *, init: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "containers": [{"name": "agent", "image": AGENT_IMAGE, "env": _agent_env(secret)}],
    }
    if init:  # an initContainer reading the same token (a pre-flight enrolment check)
        spec["initContainers"] = [
            {"name": "preflight", "image": AGENT_IMAGE, "env": _agent_env(secret)[:2]}
        ]
    return spec


def agent_pod(
    *, name: str | None = None, generate_name: str = "linuxguard-agent-", init: bool = True
) -> dict[str, Any]:
    metadata: dict[str, Any] = {"labels": dict(APP_LABEL)}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = generate_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": agent_pod_spec(init=init),
    }


def agent_daemonset(name: str = "linuxguard-agent") -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "labels": dict(APP_LABEL)},
        "spec": {
            "selector": {"matchLabels": dict(APP_LABEL)},
            "template": {"metadata": {"labels": dict(APP_LABEL)}, "spec": agent_pod_spec()},
        },
    }


def shared_secret() -> dict[str, Any]:
    """The shared Secret the pods reference (a placeholder token; ``watch`` keeps a real one)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SHARED_SECRET},
        "type": "Opaque",
        "stringData": {"token": "AAAA-BBBB-CCCC-DDDD-EEEE-FFFF", "tenant-id": TENANT},
    }


# --- the webhook in this process -------------------------------------------------------


def make_minter(sandbox: SandboxServer, *, budget: float = 5.0) -> LinuxGuardClient:
    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.02, max_delay=0.2, budget=budget),
        clock=sandbox.now,
    )


def start_webhook(
    *,
    api_client: Any,
    namespace: str,
    sandbox: SandboxServer,
    provider: Provider,
    pki: Pki,
    **settings: Any,
) -> webhook.WebhookServer:
    """``lg-rotate webhook`` in this process on a free loopback port (stop it yourself)."""
    options: dict[str, Any] = {
        "min_ttl": timedelta(seconds=30),
        "listen": "127.0.0.1:0",
        "clock": sandbox.now,
    }
    options.update(settings)
    server = webhook.build_server(
        api_client=api_client,
        namespace=namespace,
        shared_secret=SHARED_SECRET,
        tenant=TENANT,
        minter=options.pop("minter", None) or make_minter(sandbox),
        provider=provider,
        cert_file=str(pki.cert_file),
        key_file=str(pki.key_file),
        **options,
    )
    return server.start()


def wait_for(probe: Callable[[], Any], *, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(POLL_S)


def wait_until_mutating(core: client.CoreV1Api, namespace: str, *, timeout: float = 30.0) -> None:
    """Poll server-side dry-run creates until the API server calls the webhook (the
    configuration reaches its admission plugin through an informer). Dry runs mint nothing."""

    def mutated() -> bool:
        try:
            answer = core.create_namespaced_pod(
                namespace, agent_pod(name=f"probe-{uuid.uuid4().hex[:8]}"), dry_run="All"
            )
        except client.ApiException:
            return False
        annotations = answer.metadata.annotations or {}
        return webhook.ENROLL_SECRET_ANNOTATION in annotations

    wait_for(mutated, timeout=timeout, what="the API server to call the webhook")


def widen_pool(api_client: Any, size: int = 64) -> Any:
    webhook.widen_connection_pool(api_client, size)
    return api_client


# --- the kubelet at container start ------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Start:
    """One container start: the token it resolved (fingerprint) and how enrolment went."""

    pod: str
    pod_uid: str
    secret: str
    token_fingerprint: str
    expires_at: str | None
    results: tuple[str, ...]

    @property
    def first_try(self) -> bool:
        return self.results[:1] == ("enrolled",)

    @property
    def enrolled(self) -> bool:
        return "enrolled" in self.results


def read_json(call: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One client call's answer as the API's JSON (field names as the API spells them)."""
    response = call(*args, _preload_content=False, **kwargs)
    return dict(json.loads(response.data))


class Kubelet:
    """Resolves a pod's env from its ``secretKeyRef``s at container start and enrols."""

    def __init__(self, core: client.CoreV1Api, namespace: str, sandbox_url: str) -> None:
        self.core = core
        self.namespace = namespace
        self.sandbox_url = sandbox_url

    def resolve_env(self, pod: Mapping[str, Any], container: str = "agent") -> dict[str, Any]:
        """The container's env as the kubelet fills it: values from Secrets and fieldRefs.

        Also ``_secrets`` (the Secret names read) and ``_expires_at`` (their annotation).
        """
        spec = pod["spec"]
        found = next(
            c
            for c in [*(spec.get("initContainers") or []), *spec["containers"]]
            if c["name"] == container
        )
        env: dict[str, Any] = {"_secrets": set(), "_expires_at": None}
        secrets: dict[str, dict[str, Any]] = {}
        for var in found.get("env") or []:
            source = var.get("valueFrom") or {}
            ref = source.get("secretKeyRef")
            if ref:
                name = ref["name"]
                if name not in secrets:
                    secrets[name] = read_json(
                        self.core.read_namespaced_secret, name, self.namespace
                    )
                raw = base64.b64decode(secrets[name]["data"][ref["key"]]).decode()
                env[var["name"]] = Secret(raw) if ref["key"] == "token" else raw
                env["_secrets"].add(name)
                annotations = secrets[name]["metadata"].get("annotations") or {}
                env["_expires_at"] = annotations.get("linuxguard.io/expires-at")
            elif (source.get("fieldRef") or {}).get("fieldPath") == "metadata.uid":
                env[var["name"]] = pod["metadata"]["uid"]
        return env

    def start(
        self, pod_name: str, *, retries: int = 0, backoff: float = 0.3, max_backoff: float = 3.0
    ) -> Start:
        """Start the agent container of ``pod_name``: resolve its env, enrol; on a refusal the
        container restarts (re-reading the Secret) up to ``retries`` times, after a crash-loop
        back-off compressed like podsim's (0.3 s doubling to 3 s; a kubelet: 10 s to 5 min)."""
        results: list[str] = []
        while True:
            pod = read_json(self.core.read_namespaced_pod, pod_name, self.namespace)
            env = self.resolve_env(pod)
            token: Secret = env["LINUXGUARD_ENROLL_TOKEN"]
            result = agent.enroll(
                url=self.sandbox_url,
                tenant_id=env["LINUXGUARD_TENANT_ID"],
                token=token,
                workload_id=pod["metadata"]["uid"],
                attempts=3,
                retry_delay=0.05,
            )
            results.append(result.result)
            if result.ok or len(results) > retries:
                return Start(
                    pod=pod_name,
                    pod_uid=pod["metadata"]["uid"],
                    secret=",".join(sorted(env["_secrets"])),
                    token_fingerprint=fingerprint(normalize(token.reveal()).reveal()),
                    expires_at=env["_expires_at"],
                    results=tuple(results),
                )
            time.sleep(min(max_backoff, backoff * 2 ** (len(results) - 1)))

    def start_all(self, names: Iterable[str], *, workers: int = 16) -> list[Start]:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.start, names))


# --- two replicas behind one address ---------------------------------------------------


class RoundRobinProxy:
    """A TCP pass-through on a free loopback port spreading connections over ``backends``
    in turn, as a Service spreads the API server's connections over webhook replicas (TLS
    is end to end: both replicas serve the same certificate)."""

    def __init__(self, backends: list[tuple[str, int]]) -> None:
        import socket
        import threading

        self.backends = backends
        self.connections = [0] * len(backends)
        self._next = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.url = f"https://127.0.0.1:{self.port}"
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="rr-proxy", daemon=True)

    def start(self) -> RoundRobinProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closing.is_set():
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                index = self._next
                self._next = (self._next + 1) % len(self.backends)
                self.connections[index] += 1
            try:
                upstream = socket.create_connection(self.backends[index], timeout=5)
            except OSError:
                downstream.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: Any, sink: Any) -> None:
    import socket

    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
