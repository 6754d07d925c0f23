"""The webhook's serving certificates, kept by lg-rotate itself: one CA, one writer, overlap.

``lg-rotate webhook --tls-self-managed`` (docs/PER-POD.md, "Certificates managed by
lg-rotate"), for clusters without cert-manager. Every replica still serves the key pair from
its files (``--tls-cert-file``/``--tls-private-key-file``, the mounted Secret, reloaded by
:class:`rotator.kube.webhook.ReloadingTls`); this module only writes the Secret those files
come from and the webhook configuration's ``caBundle``.

**One writer.** Several replicas that each make certificates fight over the ``caBundle``: each
writes its own CA and the others' serving certificates stop being trusted (vault-k8s'
injector with several replicas: ``x509: certificate signed by unknown authority``). Here every
replica runs a :class:`CertKeeper`, but only the holder of the Lease ``lg-rotate-webhook-certs``
(:class:`~rotator.kube.lease.LeaseLock`, the machinery of the rotation lock and of ``watch``'s
leader election) writes; the others stand by and take over when the holder releases the Lease
(SIGTERM) or stops renewing it (a crash). Every write also carries the ``resourceVersion`` it
read (a 409 is re-read, the step planned again), so even a leader that lost its Lease without
noticing cannot overwrite a newer state.

**Pure part.** :func:`make_ca` (EC P-256, self-signed, ``CA:TRUE, pathlen:0``, keyCertSign),
:func:`issue_serving` (EC P-256, the Service's DNS names :func:`service_dns_names`:
``SVC.NS.svc`` and ``SVC.NS.svc.cluster.local``; serverAuth, digitalSignature; never past its
CA's end), :func:`parse_certificates` / :class:`CertInfo` (expiry, names, fingerprints). The
``cryptography`` package is imported inside these functions only: no other path of lg-rotate
pays for it.

**What the Secret holds** (type ``kubernetes.io/tls``, shipped empty by the component so RBAC
needs no ``create``): ``tls.crt``/``tls.key`` (the serving pair, what the replicas mount),
``ca.crt`` (the trusted bundle: exactly what ``caBundle`` must be; PodMonitors verify with it),
``ca.key`` (the key of the CA new certificates are signed with; the Deployment mounts only
``tls.crt`` and ``tls.key``). The CA is trusted by this one webhook configuration and nothing
else, so its key lets its reader do no more than ``tls.key`` does: impersonate the webhook.

**Rotation with overlap.** The API server must trust whatever any replica serves, and the
replicas see a new Secret only after the kubelet's sync (about a minute, each on its own
schedule). So a CA is never swapped, it is overlapped, in three phases written on the Secret:

1. ``ca-added``: a new CA joins the bundle: ``caBundle`` first (old + new), then the Secret's
   ``ca.crt`` and ``ca.key``. Replicas still serve the old CA's certificate, trusted.
2. ``serving-switched``, at least ``overlap`` later (every API server has the bundle by
   then): ``tls.crt``/``tls.key`` become a certificate of the new CA. Replicas reload it as the
   kubelet delivers it; until then their old certificate is still trusted.
3. ``stable`` again, another ``overlap`` later (every replica has reloaded by then): the old
   CA leaves ``ca.crt``, then ``caBundle``.

A serving certificate renewed under the same CA changes nothing in ``caBundle``.

**Crash-safe.** The phase, when it began (``linuxguard.io/tls-phase``,
``linuxguard.io/tls-phase-since``) and the CAs' fingerprints are annotations on the Secret,
written in the same patch as the data they describe, so a keeper that dies between phases
(or a new leader) reads where the rotation stands and finishes it; nothing lives in memory
only. ``caBundle`` is made equal to ``ca.crt`` on every pass, except that phase 1 writes it
*before* the Secret: a crash in between leaves a bundle with a CA nobody uses (harmless; the
next pass starts phase 1 again), never a Secret whose certificate the API server does not
trust. A Secret whose ``ca.key`` is gone or does not match starts a rotation (the serving
pair, if valid, stays trusted meanwhile) or, with no usable pair either, a fresh CA and pair.

**Lifetimes** (:class:`CertLifetimes`), and why:

* CA: 365 days, rotated at 2/3 of its life (about 4 months before its end). Short enough that
  the rotation path runs every year, while people still remember it, and that a copied CA key
  is worth a year at most; long enough that ``caBundle`` changes once a year.
* Serving certificate: 90 days, renewed at 2/3 (30 days before its end), cert-manager's and
  Let's Encrypt's cadence: a keeper down for weeks still leaves a valid certificate.
* ``overlap``: 5 minutes per phase. It must exceed the kubelet's Secret propagation (its sync
  period, 1 minute by default, plus its Secret cache's TTL: up to about 2 minutes in all) and
  the replicas' reload (at their next connection; the readiness probe makes one every 5 s),
  and the API servers' informers (seconds). 5 minutes is more than twice that, and a whole
  rotation still takes only 10.
* ``backdate``: ``notBefore`` is 5 minutes in the past, for clock skew between this node and
  the API servers.

Tests inject seconds for all of these (``tests/test_webhook_certs.py``).

No certificate or key body is ever logged or put in an exception: fingerprints (SHA-256 of
the DER, 12 hex digits in logs) and dates only.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from rotator.errors import CertificateError, ConfigError, LgRotateError, LockError
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    FIELD_MANAGER,
    JSON_PATCH,
    MAX_CONFLICTS,
    MERGE_PATCH,
    SECRET_PATH,
    ApiOp,
    KubernetesConflictError,
    KubernetesNotFoundError,
    api_request,
    check_name,
    micro_time,
    optional_timestamp,
)
from rotator.kube.lease import LeaseLock, compete
from rotator.tokens import format_timestamp, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

__all__ = [
    "DEFAULT_SERVICE",
    "DEFAULT_TLS_SECRET",
    "DEFAULT_WEBHOOK_CONFIGURATION",
    "LEASE_NAME",
    "Authority",
    "CertInfo",
    "CertKeeper",
    "CertLifetimes",
    "KeeperState",
    "ServingPair",
    "Step",
    "issue_serving",
    "make_ca",
    "parse_certificates",
    "placeholder_pair",
    "plan_step",
    "read_state",
    "service_dns_names",
]

log = logging.getLogger("lg_rotate.webhook.certs")

DEFAULT_TLS_SECRET = "lg-rotate-webhook-tls"  # noqa: S105 - a name, not a secret
DEFAULT_WEBHOOK_CONFIGURATION = "lg-rotate-per-pod"
DEFAULT_SERVICE = "lg-rotate-webhook"
# LeaseLock names its Lease lg-rotate-<name>: lg-rotate-webhook-certs.
LEASE_SUBJECT = "webhook-certs"
LEASE_NAME = "lg-rotate-" + LEASE_SUBJECT
MUTATING_WEBHOOK_CONFIGURATION_PATH = (
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{name}"
)
TLS_SECRET_TYPE = "kubernetes.io/tls"  # noqa: S105 - a Secret type
CERT_KEY, KEY_KEY, CA_KEY, CA_PRIVATE_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"

ANNOTATION_PREFIX = "linuxguard.io/tls-"
PHASE_ANNOTATION = ANNOTATION_PREFIX + "phase"
SINCE_ANNOTATION = ANNOTATION_PREFIX + "phase-since"
CA_ANNOTATION = ANNOTATION_PREFIX + "ca-sha256"  # the CA new certificates are signed by
RETIRING_ANNOTATION = ANNOTATION_PREFIX + "retiring-ca-sha256"  # during a rotation only
CA_EXPIRY_ANNOTATION = ANNOTATION_PREFIX + "ca-expires-at"
SERVING_ANNOTATION = ANNOTATION_PREFIX + "serving-sha256"
SERVING_EXPIRY_ANNOTATION = ANNOTATION_PREFIX + "serving-expires-at"
WRITER_ANNOTATION = ANNOTATION_PREFIX + "written-by"

Phase = Literal["stable", "ca-added", "serving-switched"]
PHASES: tuple[Phase, ...] = ("stable", "ca-added", "serving-switched")
Action = Literal[
    "bootstrap", "renew-serving", "add-ca", "switch-serving", "retire-ca", "restart-overlap"
]

CA_COMMON_NAME = "lg-rotate-webhook-ca"


# --- lifetimes -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CertLifetimes:
    """How long certificates live, when they are renewed, how long phases overlap (see the
    module docstring for why these defaults)."""

    ca: timedelta = timedelta(days=365)
    serving: timedelta = timedelta(days=90)
    renew_at: float = 2 / 3  # renewed once this fraction of its life has passed
    overlap: timedelta = timedelta(minutes=5)  # each of the rotation's two waits
    backdate: timedelta = timedelta(minutes=5)  # notBefore in the past: clock skew

    def __post_init__(self) -> None:
        if not 0 < self.renew_at < 1:
            raise ConfigError(f"renew_at must be between 0 and 1, not {self.renew_at:g}")
        if self.overlap <= timedelta(0) or self.serving <= timedelta(0):
            raise ConfigError("the overlap and the serving lifetime must be positive")
        if self.serving >= self.ca:
            raise ConfigError(
                f"the serving certificate's lifetime ({self.serving}) must be shorter than "
                f"the CA's ({self.ca})"
            )
        # A CA rotation (two overlaps) must end well before the old CA does.
        if self.ca * (1 - self.renew_at) <= 2 * self.overlap:
            raise ConfigError(
                f"a CA living {self.ca} and renewed at {self.renew_at:.0%} of it leaves too "
                f"little time for a rotation with {self.overlap} overlaps"
            )

    def ca_renew_before(self) -> timedelta:
        return self.ca * (1 - self.renew_at)

    def serving_renew_before(self) -> timedelta:
        return self.serving * (1 - self.renew_at)


# --- the pure part: certificates --------------------------------------------------------


def service_dns_names(service: str, namespace: str) -> tuple[str, str]:
    """The names the API server connects to for ``clientConfig.service``."""
    return f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"


@dataclass(frozen=True, kw_only=True)
class CertInfo:
    """The public facts of one certificate (never its body in ``repr``)."""

    fingerprint: str  # SHA-256 of the DER, hex
    subject: str
    not_before: datetime
    not_after: datetime
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    pem: bytes = field(repr=False)

    @property
    def short(self) -> str:
        return self.fingerprint[:12]


@dataclass(frozen=True, kw_only=True)
class Authority:
    """A CA: its certificate and private key (PEM; the key never in ``repr``)."""

    info: CertInfo
    key_pem: bytes = field(repr=False)

    @property
    def cert_pem(self) -> bytes:
        return self.info.pem


@dataclass(frozen=True, kw_only=True)
class ServingPair:
    """A serving certificate, its key, and the fingerprint of the CA that signed it."""

    info: CertInfo
    key_pem: bytes = field(repr=False)
    issuer_fingerprint: str | None  # None: signed by no CA of the bundle it was read with

    @property
    def cert_pem(self) -> bytes:
        return self.info.pem


def _x509() -> Any:
    try:
        from cryptography import x509
    except ImportError as exc:
        raise ConfigError(
            "--tls-self-managed needs the cryptography package",
            fix="pip install 'cryptography>=42' (a dependency of linuxguard-rotator)",
        ) from exc
    return x509


def _info(cert: Any) -> CertInfo:
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    x509 = _x509()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns_names, ips = (), ()
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertInfo(
        fingerprint=hashlib.sha256(der).hexdigest(),
        subject=str(names[0].value) if names else "",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        is_ca=is_ca,
        dns_names=dns_names,
        ip_addresses=ips,
        pem=cert.public_bytes(serialization.Encoding.PEM),
    )


def parse_certificates(pem: bytes) -> list[CertInfo]:
    """Every certificate in a PEM bundle, in order; [] for an empty or unreadable one."""
    if not pem.strip():
        return []
    try:
        certs = _x509().load_pem_x509_certificates(pem)
    except ValueError:  # says what is wrong with the data, never quotes it
        return []
    return [_info(cert) for cert in certs]


def _private_key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def _load_key(key_pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    if not key_pem.strip():
        return None
    try:
        return serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):  # unreadable, or encrypted
        return None


def _same_public_key(key: Any, cert: Any) -> bool:
    from cryptography.hazmat.primitives import serialization

    def spki(public: Any) -> bytes:
        data: bytes = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return data

    return spki(key.public_key()) == spki(cert.public_key())


def make_ca(
    *,
    now: datetime,
    lifetime: timedelta,
    backdate: timedelta = timedelta(minutes=5),
    common_name: str = CA_COMMON_NAME,
) -> Authority:
    """A self-signed CA (EC P-256) valid from ``now - backdate`` for ``lifetime``."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # A serial in the name: two CAs of one bundle never share a subject (clients pick the
    # issuer by name first).
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{serial:x}"[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - backdate)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Authority(info=_info(cert), key_pem=_private_key_pem(key))


def issue_serving(
    ca: Authority,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    now: datetime,
    lifetime: timedelta,
    backdate: timedelta = timedelta(minutes=5),
) -> ServingPair:
    """A serving certificate (EC P-256) for these names, signed by ``ca``, never outliving it."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if not dns_names and not ip_addresses:
        raise ConfigError("a serving certificate needs at least one name")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = _load_key(ca.key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names = [x509.DNSName(name) for name in dns_names] + [
        x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses
    ]
    common_name = (list(dns_names) or list(ip_addresses))[0][:64]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - backdate)
        .not_valid_after(min(now + lifetime, ca.info.not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ServingPair(
        info=_info(cert), key_pem=_private_key_pem(key), issuer_fingerprint=ca.info.fingerprint
    )


def load_authority(cert_pem: bytes, key_pem: bytes) -> Authority | None:
    """The CA whose certificate is ``cert_pem`` if ``key_pem`` is its key, else None."""
    infos = parse_certificates(cert_pem)
    key = _load_key(key_pem)
    if len(infos) != 1 or key is None or not infos[0].is_ca:
        return None
    cert = _x509().load_pem_x509_certificate(infos[0].pem)
    return Authority(info=infos[0], key_pem=key_pem) if _same_public_key(key, cert) else None


def load_serving(
    cert_pem: bytes, key_pem: bytes, *, bundle: Sequence[CertInfo]
) -> ServingPair | None:
    """The serving pair if the key is the certificate's; its issuer among ``bundle``, if any."""
    infos = parse_certificates(cert_pem)
    key = _load_key(key_pem)
    if not infos or key is None:
        return None
    x509 = _x509()
    cert = x509.load_pem_x509_certificate(infos[0].pem)
    if not _same_public_key(key, cert):
        return None
    issuer = None
    for ca in bundle:
        try:
            cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.pem))
        except (ValueError, TypeError, _invalid_signature()):
            continue
        issuer = ca.fingerprint
        break
    return ServingPair(info=infos[0], key_pem=key_pem, issuer_fingerprint=issuer)


def _invalid_signature() -> type[Exception]:
    from cryptography.exceptions import InvalidSignature

    return InvalidSignature


def placeholder_pair(*, now: datetime | None = None) -> tuple[bytes, bytes]:
    """A throwaway self-signed pair a replica serves until its real one arrives.

    Nobody trusts it (its CA is in no bundle): it only lets the HTTPS listener answer the
    kubelet's probes (``/healthz`` 200, ``/readyz`` 503) instead of crash-looping.
    """
    start = now or utcnow()
    ca = make_ca(
        now=start,
        lifetime=timedelta(days=1),
        common_name="lg-rotate-webhook-placeholder",
    )
    pair = issue_serving(
        ca, dns_names=["lg-rotate-webhook-placeholder"], now=start, lifetime=timedelta(hours=23)
    )
    return pair.cert_pem, pair.key_pem


# --- the state on the Secret, and the next step ------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KeeperState:
    """What the Secret says, parsed: the phase, the bundle, the signing CA, the serving pair."""

    phase: Phase
    since: datetime | None
    bundle: tuple[CertInfo, ...]
    signing: Authority | None  # ca.key with its certificate from the bundle
    serving: ServingPair | None
    retiring: str | None  # the old CA's fingerprint, during a rotation

    @property
    def bundle_pem(self) -> bytes:
        return b"".join(ca.pem for ca in self.bundle)


def _secret_bytes(secret: Mapping[str, Any], key: str) -> bytes:
    raw = (secret.get("data") or {}).get(key) or ""
    try:
        return base64.b64decode(raw, validate=True)
    except ValueError:
        return b""


def read_state(secret: Mapping[str, Any]) -> KeeperState:
    """The keeper's state from the Secret (annotations for the phase; data for the rest)."""
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    bundle = tuple(ca for ca in parse_certificates(_secret_bytes(secret, CA_KEY)) if ca.is_ca)
    signing_fingerprint = annotations.get(CA_ANNOTATION)
    signing = None
    for ca in bundle:
        if ca.fingerprint == signing_fingerprint:
            signing = load_authority(ca.pem, _secret_bytes(secret, CA_PRIVATE_KEY))
    serving = load_serving(
        _secret_bytes(secret, CERT_KEY), _secret_bytes(secret, KEY_KEY), bundle=bundle
    )
    phase_text = str(annotations.get(PHASE_ANNOTATION) or "stable")
    phase: Phase = next((known for known in PHASES if known == phase_text), "stable")
    retiring = annotations.get(RETIRING_ANNOTATION) or None
    if phase != "stable" and retiring not in {ca.fingerprint for ca in bundle}:
        phase, retiring = "stable", None  # the old CA is gone already: nothing to finish
    return KeeperState(
        phase=phase,
        since=optional_timestamp(annotations.get(SINCE_ANNOTATION), what="the phase's start"),
        bundle=bundle,
        signing=signing,
        serving=serving,
        retiring=retiring,
    )


@dataclass(frozen=True, kw_only=True)
class Step:
    """One write of the keeper: the Secret's new data and annotations, and its caBundle."""

    action: Action
    data: Mapping[str, bytes] = field(repr=False)
    annotations: Mapping[str, str | None]
    bundle_first: bool  # caBundle before the Secret (a CA is being added)
    summary: str  # for the log: fingerprints and dates only

    @property
    def bundle_pem(self) -> bytes:
        return self.data.get(CA_KEY, b"")


def _serving_due(
    state: KeeperState,
    *,
    now: datetime,
    lifetimes: CertLifetimes,
    names: tuple[tuple[str, ...], tuple[str, ...]],
) -> str | None:
    """Why the serving pair must be (re)issued under the signing CA, or None."""
    serving, signing = state.serving, state.signing
    if serving is None:
        return "no usable serving pair"
    if signing is None or serving.issuer_fingerprint != signing.info.fingerprint:
        return "the serving certificate is not signed by the current CA"
    if (tuple(sorted(serving.info.dns_names)), tuple(sorted(serving.info.ip_addresses))) != (
        tuple(sorted(names[0])),
        tuple(sorted(names[1])),
    ):
        return "the serving certificate names other hosts"
    if now >= serving.info.not_after - lifetimes.serving_renew_before():
        return f"the serving certificate ends {format_timestamp(serving.info.not_after)}"
    return None


def plan_step(  # noqa: PLR0911 - one return per decision of the phase table
    state: KeeperState,
    *,
    now: datetime,
    lifetimes: CertLifetimes,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
) -> Step | None:
    """The next write that brings the Secret closer to a valid, trusted pair; None if none."""
    names = (tuple(dns_names), tuple(ip_addresses))

    def serving(ca: Authority) -> ServingPair:
        return issue_serving(
            ca,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            now=now,
            lifetime=lifetimes.serving,
            backdate=lifetimes.backdate,
        )

    def new_ca() -> Authority:
        return make_ca(now=now, lifetime=lifetimes.ca, backdate=lifetimes.backdate)

    def step(
        action: Action,
        *,
        phase: Phase,
        bundle: Sequence[CertInfo],
        signing: Authority,
        pair: ServingPair | None,
        retiring: str | None,
        since: datetime | None,
        summary: str,
    ) -> Step:
        data = {CA_KEY: b"".join(ca.pem for ca in bundle), CA_PRIVATE_KEY: signing.key_pem}
        annotations: dict[str, str | None] = {
            PHASE_ANNOTATION: phase,
            SINCE_ANNOTATION: micro_time(since or now),
            CA_ANNOTATION: signing.info.fingerprint,
            CA_EXPIRY_ANNOTATION: format_timestamp(signing.info.not_after),
            RETIRING_ANNOTATION: retiring,  # None removes it (merge patch)
        }
        if pair is not None:
            data |= {CERT_KEY: pair.cert_pem, KEY_KEY: pair.key_pem}
            annotations |= {
                SERVING_ANNOTATION: pair.info.fingerprint,
                SERVING_EXPIRY_ANNOTATION: format_timestamp(pair.info.not_after),
            }
        return Step(
            action=action,
            data=data,
            annotations=annotations,
            bundle_first=action == "add-ca",
            summary=summary,
        )

    signing, current = state.signing, state.serving
    if signing is None:
        issuer = next(
            (ca for ca in state.bundle if current and ca.fingerprint == current.issuer_fingerprint),
            None,
        )
        if current is not None and issuer is not None and now < current.info.not_after:
            # The CA key is lost, the pair still trusted: rotate to a new CA with overlap.
            ca = new_ca()
            return step(
                "add-ca",
                phase="ca-added",
                bundle=[issuer, ca.info],
                signing=ca,
                pair=None,
                retiring=issuer.fingerprint,
                since=now,
                summary=f"no usable CA key: new CA {ca.info.short} added next to {issuer.short}",
            )
        ca = new_ca()
        pair = serving(ca)
        return step(
            "bootstrap",
            phase="stable",
            bundle=[ca.info],
            signing=ca,
            pair=pair,
            retiring=None,
            since=now,
            summary=f"new CA {ca.info.short} (until {format_timestamp(ca.info.not_after)}), "
            f"serving certificate {pair.info.short} (until "
            f"{format_timestamp(pair.info.not_after)})",
        )

    if state.phase != "stable" and state.since is None:
        # The phase's start is unreadable (edited by hand?): its overlap starts again now,
        # rather than counting as over.
        return step(
            "restart-overlap",
            phase=state.phase,
            bundle=state.bundle,
            signing=signing,
            pair=None,
            retiring=state.retiring,
            since=now,
            summary=f"phase {state.phase}: its start was unreadable, its overlap starts now",
        )
    overlap_over = state.since is not None and now >= state.since + lifetimes.overlap
    due = _serving_due(state, now=now, lifetimes=lifetimes, names=names)
    if state.phase == "ca-added":
        if not overlap_over and current is not None and now < current.info.not_after:
            return None
        pair = serving(signing)
        return step(
            "switch-serving",
            phase="serving-switched",
            bundle=state.bundle,
            signing=signing,
            pair=pair,
            retiring=state.retiring,
            since=now,
            summary=f"serving certificate {pair.info.short} of the new CA "
            f"{signing.info.short}; the old CA {(state.retiring or '')[:12]} is still trusted",
        )
    if state.phase == "serving-switched":
        if overlap_over:
            return step(
                "retire-ca",
                phase="stable",
                bundle=[signing.info],
                signing=signing,
                pair=None,
                retiring=None,
                since=now,
                summary=f"the old CA {(state.retiring or '')[:12]} is no longer trusted; "
                f"CA {signing.info.short} only",
            )
        if due is None:
            return None
        pair = serving(signing)
        return step(
            "renew-serving",
            phase="serving-switched",
            bundle=state.bundle,
            signing=signing,
            pair=pair,
            retiring=state.retiring,
            since=state.since,
            summary=f"serving certificate {pair.info.short} ({due})",
        )
    # stable
    if now >= signing.info.not_after - lifetimes.ca_renew_before():
        ca = new_ca()
        return step(
            "add-ca",
            phase="ca-added",
            bundle=[*state.bundle, ca.info],
            signing=ca,
            pair=None,
            retiring=signing.info.fingerprint,
            since=now,
            summary=f"CA {signing.info.short} ends {format_timestamp(signing.info.not_after)}: "
            f"new CA {ca.info.short} added to the bundle",
        )
    if due is None:
        return None
    pair = serving(signing)
    return step(
        "renew-serving",
        phase="stable",
        bundle=state.bundle,
        signing=signing,
        pair=pair,
        retiring=None,
        since=state.since,
        summary=f"serving certificate {pair.info.short} (until "
        f"{format_timestamp(pair.info.not_after)}; {due})",
    )


def next_change(state: KeeperState, *, lifetimes: CertLifetimes) -> datetime | None:
    """When :func:`plan_step` will next have something to do (None: at once / unknown)."""
    if state.signing is None or state.serving is None:
        return None
    moments = [
        state.signing.info.not_after - lifetimes.ca_renew_before(),
        state.serving.info.not_after - lifetimes.serving_renew_before(),
    ]
    if state.phase != "stable" and state.since is not None:
        moments.append(state.since + lifetimes.overlap)
    return min(moments)


# --- the keeper: one writer, through the Lease --------------------------------------------


class CertKeeper:
    """Keeps the Secret's pair valid and the webhook configuration's caBundle equal to its
    ``ca.crt``, while holding the Lease ``lg-rotate-webhook-certs`` (see the module docstring).

    :meth:`run` competes for the Lease until ``stop``; while it holds it, :meth:`reconcile`
    runs when something is due (and every ``check_interval`` anyway, to repair what others
    changed: a ``kubectl apply`` that emptied the pair, an edited caBundle). RBAC: ``get`` and
    ``patch`` on the Secret and on the MutatingWebhookConfiguration (by name), ``get``,
    ``create``, ``patch`` on the Lease.
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        secret_name: str = DEFAULT_TLS_SECRET,
        webhook_configuration: str = DEFAULT_WEBHOOK_CONFIGURATION,
        service: str = DEFAULT_SERVICE,
        lifetimes: CertLifetimes | None = None,
        extra_ip_addresses: Sequence[str] = (),
        lease_duration: float = 15.0,
        check_interval: float = 60.0,
        retry_interval: float = 5.0,
        identity: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if lease_duration < 2:
            raise ConfigError(
                f"the certificate keeper's lease must last at least 2 s, not {lease_duration:g}"
            )
        self.api_client = api_client
        self.namespace = check_name(namespace, what="the namespace", label=True)
        self.secret_name = check_name(secret_name, what="--tls-secret")
        self.webhook_configuration = check_name(
            webhook_configuration, what="--tls-webhook-configuration"
        )
        self.service = check_name(service, what="--tls-service", label=True)
        self.lifetimes = lifetimes or CertLifetimes()
        self.dns_names = service_dns_names(self.service, self.namespace)
        self.ip_addresses = tuple(str(ipaddress.ip_address(ip)) for ip in extra_ip_addresses)
        self.lease_duration = lease_duration
        self.renew_period = lease_duration / 3
        self.check_interval = check_interval
        self.retry_interval = retry_interval
        self.clock = clock
        self.monotonic = monotonic
        self.request_timeout = request_timeout
        self._lease = LeaseLock(
            api_client=api_client,
            namespace=self.namespace,
            secret_name=LEASE_SUBJECT,
            duration=lease_duration,
            identity=identity,
            renew=False,
            clock=clock,
            request_timeout=request_timeout,
        )
        self.identity = self._lease.identity
        self.lease_name = self._lease.name
        self.actions: dict[str, int] = {}  # action -> how often this keeper wrote it
        self.leading = threading.Event()
        self.release_on_stop = True  # tests turn it off to play a crashed keeper
        self._lease_valid_until = 0.0
        self._running = False
        self.state: KeeperState | None = None  # what the Secret held after the last pass

    def __repr__(self) -> str:
        return f"CertKeeper({self.namespace}/{self.secret_name}, identity={self.identity!r})"

    # --- API plumbing ---

    def _secret_op(self, verb: str) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Secret",
            resource="secrets",
            group="",
            namespace=self.namespace,
            name=self.secret_name,
            writes=verb != "get",
        )

    def _configuration_op(self, verb: str) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="MutatingWebhookConfiguration",
            resource="mutatingwebhookconfigurations",
            group="admissionregistration.k8s.io",
            namespace="",
            name=self.webhook_configuration,
            writes=verb != "get",
        )

    def _read_secret(self) -> dict[str, Any]:
        try:
            secret: dict[str, Any] = api_request(
                self.api_client,
                self._secret_op("get"),
                "GET",
                SECRET_PATH,
                timeout=self.request_timeout,
            )
        except KubernetesNotFoundError as exc:
            raise CertificateError(
                f"the TLS Secret {self.namespace}/{self.secret_name} does not exist",
                fix="apply cronjob/components/webhook-certs (it ships the Secret empty: "
                "lg-rotate may patch it, not create it), or pass --tls-secret NAME",
            ) from exc
        if secret.get("type") != TLS_SECRET_TYPE:
            raise CertificateError(
                f"the Secret {self.namespace}/{self.secret_name} is of type "
                f"{secret.get('type')!r}, not {TLS_SECRET_TYPE}",
                fix="recreate it as type kubernetes.io/tls with empty tls.crt and tls.key "
                "(cronjob/components/webhook-certs/secret.yaml); a type cannot be changed",
            )
        return secret

    def _write_secret(self, secret: Mapping[str, Any], step: Step) -> dict[str, Any]:
        metadata = secret.get("metadata") or {}
        body = {
            "metadata": {
                "resourceVersion": metadata.get("resourceVersion"),
                "annotations": {**step.annotations, WRITER_ANNOTATION: self.identity},
            },
            "data": {key: base64.b64encode(value).decode() for key, value in step.data.items()},
        }
        written: dict[str, Any] = api_request(
            self.api_client,
            self._secret_op("patch"),
            "PATCH",
            SECRET_PATH,
            query={"fieldManager": FIELD_MANAGER},
            body=body,
            content_type=MERGE_PATCH,
            timeout=self.request_timeout,
        )
        return written

    def _sync_bundle(self, bundle_pem: bytes) -> bool:
        """Make every webhook's caBundle ``bundle_pem``; True if one was changed."""
        wanted = base64.b64encode(bundle_pem).decode()
        for _ in range(MAX_CONFLICTS):
            try:
                configuration: dict[str, Any] = api_request(
                    self.api_client,
                    self._configuration_op("get"),
                    "GET",
                    MUTATING_WEBHOOK_CONFIGURATION_PATH,
                    timeout=self.request_timeout,
                )
            except KubernetesNotFoundError as exc:
                raise CertificateError(
                    f"the MutatingWebhookConfiguration {self.webhook_configuration} does not exist",
                    fix="apply the per-pod component, or pass --tls-webhook-configuration NAME",
                ) from exc
            webhooks = configuration.get("webhooks") or []
            # resourceVersion first: the API server refuses (409) a patch of a newer object.
            patch: list[dict[str, Any]] = [
                {
                    "op": "replace",
                    "path": "/metadata/resourceVersion",
                    "value": (configuration.get("metadata") or {}).get("resourceVersion"),
                }
            ]
            for index, hook in enumerate(webhooks):
                if (hook.get("clientConfig") or {}).get("caBundle") != wanted:
                    patch.append(
                        {
                            "op": "add",
                            "path": f"/webhooks/{index}/clientConfig/caBundle",
                            "value": wanted,
                        }
                    )
            if len(patch) == 1:
                if not webhooks:
                    log.warning(
                        "MutatingWebhookConfiguration %s has no webhooks: no caBundle to keep",
                        self.webhook_configuration,
                    )
                return False
            try:
                api_request(
                    self.api_client,
                    self._configuration_op("patch"),
                    "PATCH",
                    MUTATING_WEBHOOK_CONFIGURATION_PATH,
                    query={"fieldManager": FIELD_MANAGER},
                    body=patch,
                    content_type=JSON_PATCH,
                    timeout=self.request_timeout,
                )
            except KubernetesConflictError:
                continue  # changed meanwhile: read it again
            log.info(
                "caBundle of MutatingWebhookConfiguration %s: %s",
                self.webhook_configuration,
                ", ".join(ca.short for ca in parse_certificates(bundle_pem)) or "empty",
            )
            return True
        raise CertificateError(
            f"MutatingWebhookConfiguration {self.webhook_configuration} kept changing while "
            "lg-rotate set its caBundle",
            fix="another writer keeps changing it (cert-manager's CA injector? remove the "
            "cert-manager.io/inject-ca-from annotation when lg-rotate manages the certificates)",
        )

    # --- one pass ---

    def read_state(self) -> KeeperState:
        """The state on the Secret now (tests and ``reconcile``)."""
        return read_state(self._read_secret())

    def reconcile(self) -> Action | None:
        """One pass: plan the next step from the Secret, write it, then keep the caBundle.

        Returns the action written, or None when nothing was due (:attr:`state` is what the
        Secret holds afterwards). A 409 (someone changed the Secret since it was read)
        re-reads and plans again.
        """
        for _ in range(MAX_CONFLICTS):
            secret = self._read_secret()
            state = read_state(secret)
            step = plan_step(
                state,
                now=self.clock(),
                lifetimes=self.lifetimes,
                dns_names=self.dns_names,
                ip_addresses=self.ip_addresses,
            )
            if step is None:
                self._check_lease()
                self._sync_bundle(state.bundle_pem)
                self.state = state
                return None
            self._check_lease()
            if step.bundle_first:
                self._sync_bundle(step.bundle_pem)
            try:
                written = self._write_secret(secret, step)
            except KubernetesConflictError:
                log.debug(
                    "Secret %s/%s changed meanwhile; reading it again",
                    self.namespace,
                    self.secret_name,
                )
                continue
            self.actions[step.action] = self.actions.get(step.action, 0) + 1
            log.info(
                "webhook TLS Secret %s/%s: %s: %s",
                self.namespace,
                self.secret_name,
                step.action,
                step.summary,
            )
            self.state = read_state(written)
            self._sync_bundle(step.bundle_pem)
            return step.action
        raise CertificateError(
            f"the TLS Secret {self.namespace}/{self.secret_name} kept changing while lg-rotate "
            "wrote it",
            fix="another writer is changing it: is a second lg-rotate keeping it outside the "
            f"Lease {self.lease_name}, or cert-manager writing it too?",
        )

    def _check_lease(self) -> None:
        """Under :meth:`run`, never write on a Lease that may have lapsed (another keeper may
        lead by now). Called directly (tests, one-off repairs), :meth:`reconcile` holds none."""
        if self._running and self.monotonic() >= self._lease_valid_until:
            raise LockError(
                f"the Lease {self.namespace}/{self.lease_name} was not renewed in time; "
                "not writing",
                fix="check the API server's latency",
            )

    # --- the loop ---

    def run(self, *, stop: threading.Event) -> None:
        """Compete for the Lease and keep the certificates while holding it; until ``stop``."""
        log.info(
            "webhook certificate keeper %s for Secret %s/%s and MutatingWebhookConfiguration %s "
            "(Lease %s)",
            self.identity,
            self.namespace,
            self.secret_name,
            self.webhook_configuration,
            self.lease_name,
        )
        self._running = True
        try:
            compete(
                self._lease,
                stop=stop,
                lead=self._lead,
                retry_period=min(self.renew_period, self.retry_interval),
                what="certificate keeper",
                log=log,
            )
        finally:
            self._running = False

    def _lead(self, stop: threading.Event) -> None:
        log.info("keeping the webhook certificates as %s", self.identity)
        renewed = self.monotonic()
        self._lease_valid_until = renewed + self.lease_duration
        self.leading.set()
        next_pass = renewed  # at once
        lost = False
        try:
            while not stop.is_set():
                now = self.monotonic()
                if now - renewed >= self.renew_period:
                    try:
                        self._lease.renew()
                        renewed = now
                        self._lease_valid_until = now + self.lease_duration
                    except LockError as exc:
                        log.error("certificate keeper lost its Lease: %s", exc.one_line())
                        lost = True
                        return
                    except LgRotateError as exc:
                        log.warning(
                            "could not renew the Lease %s: %s", self.lease_name, exc.one_line()
                        )
                        if self.monotonic() >= self._lease_valid_until:
                            log.error("could not renew the Lease in time; standing down")
                            lost = True
                            return
                if self.monotonic() >= next_pass:
                    next_pass = self._pass()
                wake = min(renewed + self.renew_period, next_pass)
                stop.wait(max(0.0, wake - self.monotonic()))
        finally:
            self.leading.clear()
            if not lost and self.release_on_stop:
                try:
                    self._lease.release()
                except LgRotateError as exc:
                    log.warning(
                        "could not release the Lease %s (it lapses in %gs): %s",
                        self.lease_name,
                        self.lease_duration,
                        exc.one_line(),
                    )

    def _pass(self) -> float:
        """One reconcile; the monotonic time of the next one (sooner when a step is due)."""
        try:
            self.reconcile()
        except LgRotateError as exc:
            log.warning("could not keep the webhook certificates: %s", exc.one_line())
            return self.monotonic() + self.retry_interval
        delay = self.check_interval
        due = None if self.state is None else next_change(self.state, lifetimes=self.lifetimes)
        if due is not None:
            # A little after the moment, so that plan_step sees it as reached.
            delay = min(delay, max((due - self.clock()).total_seconds(), 0.0) + 0.05)
        return self.monotonic() + delay
