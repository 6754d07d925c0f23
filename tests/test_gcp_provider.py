"""The GCP provider against the in-repo Secret Manager gRPC fake (tests/gcpfake.py).

The provider talks to the fake through the official client over a real gRPC channel, so
these tests exercise the same requests and status codes it would meet at Google.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import google_crc32c
import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)

from providers import registry
from providers.base import Provider, Stage
from providers.gcp import GcpProvider, parse_endpoint, parse_labels, parse_replication
from rotator.errors import (
    ConfigError,
    LgRotateError,
    StoreConflictError,
    StoreDataError,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from rotator.tokens import EnrollToken, utcnow

TENANT = "acme"
REPO = Path(__file__).resolve().parent.parent
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)


def new_token(tenant: str = TENANT) -> EnrollToken:
    value = base64.b32encode(os.urandom(20)).decode()  # 32 base32 characters
    expires_at = (utcnow() + timedelta(minutes=10)).replace(microsecond=0)
    return EnrollToken.parse(value=value, tenant_id=tenant, expires_at=expires_at)


def secret_id(provider: GcpProvider, tenant: str = TENANT) -> str:
    return provider.secret_id(tenant=tenant)


def snapshot(gcp_fake, provider: GcpProvider, tenant: str = TENANT):
    return gcp_fake.fake.snapshot(project=gcp_fake.project, secret_id=secret_id(provider, tenant))


def error_texts(exc: BaseException) -> str:
    """Every message in an exception chain, as an operator or a traceback would see it."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current!s} {current!r}")
        if isinstance(current, LgRotateError):
            texts.append(current.one_line())
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


@pytest.fixture
def admin(gcp_fake):
    """An official client on its own channel: the 'other writer' in concurrency tests."""
    channel = grpc.insecure_channel(gcp_fake.endpoint)
    yield SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
    channel.close()


# --- the protocol ------------------------------------------------------------------------


def test_is_a_provider_and_registered(gcp_provider: GcpProvider) -> None:
    assert isinstance(gcp_provider, Provider)
    assert registry.load("gcp") is GcpProvider
    assert gcp_provider.location(tenant=TENANT) == (
        f"gcp:projects/lg-test/secrets/{secret_id(gcp_provider)}"
    )


def test_round_trip_with_pending_and_current_aliases(gcp_fake, gcp_provider) -> None:
    assert gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None  # no secret yet
    first = new_token()
    record = gcp_provider.write_pending(tenant=TENANT, token=first, rotation_id="rot-1")
    assert (record.version, record.stage, record.rotation_id) == ("1", Stage.PENDING, "rot-1")
    view = snapshot(gcp_fake, gcp_provider)
    assert view.aliases == {"pending": 1}
    assert view.labels == {"managed-by": "lg-rotate"}
    assert view.replication == "automatic"
    assert gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None

    pending = gcp_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == first
    assert (pending.version, pending.stage, pending.rotation_id) == ("1", Stage.PENDING, "rot-1")
    assert pending.stored_at == record.stored_at

    gcp_provider.promote(tenant=TENANT, version="1")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 1}
    current = gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.token == first
    assert current.stage is Stage.CURRENT
    assert gcp_provider.read(tenant=TENANT, stage=Stage.PENDING) is None

    second = new_token()
    record2 = gcp_provider.write_pending(tenant=TENANT, token=second, rotation_id="rot-2")
    assert record2.version == "2"
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 1, "pending": 2}
    current = gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.token == first
    # The stored payload is the lg-rotate record.
    stored = json.loads(snapshot(gcp_fake, gcp_provider).versions[2].data)
    assert stored["rotationId"] == "rot-2"
    assert stored["fingerprint"] == second.fingerprint


def test_promote_keeps_a_newer_pending_version(gcp_fake, gcp_provider) -> None:
    for number in (1, 2, 3):
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=f"r{number}")
    gcp_provider.promote(tenant=TENANT, version="2")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 2, "pending": 3}
    gcp_provider.promote(tenant=TENANT, version="3")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 3}


def test_promote_refuses_missing_or_retired_versions(gcp_fake, gcp_provider, admin) -> None:
    with pytest.raises(StoreConflictError):
        gcp_provider.promote(tenant=TENANT, version="1")  # no secret at all
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    for version in ("7", "0", "latest", "pending"):
        with pytest.raises(StoreConflictError, match="no version"):
            gcp_provider.promote(tenant=TENANT, version=version)
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}/versions/1"
    admin.disable_secret_version(request={"name": name}, retry=None)
    with pytest.raises(StoreConflictError, match="DISABLED"):
        gcp_provider.promote(tenant=TENANT, version="1")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"pending": 1}


def test_creates_the_secret_with_labels_and_user_managed_replication(
    gcp_fake, gcp_secret_template
) -> None:
    provider = GcpProvider.from_options(
        {
            "gcp_project": "lg-test",
            "gcp_secret_id": gcp_secret_template,
            "gcp_replication": "us-east1, europe-west1",
            "gcp_labels": "team=security,env=test",
            "gcp_endpoint": gcp_fake.endpoint,
        }
    )
    provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    view = snapshot(gcp_fake, provider)
    assert view.replication == "user-managed:us-east1,europe-west1"
    assert view.labels == {"managed-by": "lg-rotate", "team": "security", "env": "test"}


def test_a_creation_race_is_fine(gcp_fake, gcp_provider, admin) -> None:
    """Another writer creates the secret between our GetSecret and CreateSecret."""
    name = secret_id(gcp_provider)

    def create_concurrently() -> None:
        admin.create_secret(
            request={
                "parent": "projects/lg-test",
                "secret_id": name,
                "secret": {"replication": {"automatic": {}}},
            },
            retry=None,
        )

    gcp_fake.fake.before_next("CreateSecret", create_concurrently)
    record = gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    assert record.version == "1"
    assert len(gcp_fake.fake.calls_to("CreateSecret")) >= 2  # ours got ALREADY_EXISTS


# --- checksums ---------------------------------------------------------------------------


def test_crc32c_is_sent_and_verified(gcp_fake, gcp_provider) -> None:
    token = new_token()
    gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    (call,) = [
        c
        for c in gcp_fake.fake.calls_to("AddSecretVersion")
        if c.request.parent.endswith(secret_id(gcp_provider))
    ]
    data = call.request.payload.data
    assert call.request.payload.data_crc32c == int(google_crc32c.value(data))
    assert snapshot(gcp_fake, gcp_provider).versions[1].checksum_given

    gcp_fake.fake.tamper_next_access()
    with pytest.raises(StoreDataError, match="CRC32C") as caught:
        gcp_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert token.value.reveal() not in error_texts(caught.value)
    pending = gcp_provider.read(tenant=TENANT, stage=Stage.PENDING)  # intact again
    assert pending is not None
    assert pending.token == token


def test_a_payload_that_is_not_a_record_is_a_data_error(gcp_fake, gcp_provider, admin) -> None:
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}"
    admin.add_secret_version(request={"parent": name, "payload": {"data": b"hello"}}, retry=None)
    gcp_fake.fake.set_alias(
        project="lg-test", secret_id=secret_id(gcp_provider), alias="current", version=2
    )
    with pytest.raises(StoreDataError, match="not JSON"):
        gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    # A foreign latest version does not stop the next rotation.
    record = gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r2")
    assert record.version == "3"


# --- optimistic concurrency --------------------------------------------------------------


def test_etag_conflict_is_reread_and_retried(gcp_fake, gcp_provider, admin) -> None:
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}"

    def concurrent_update() -> None:  # a person adds an alias of their own meanwhile
        admin.update_secret(
            request={
                "secret": {"name": name, "version_aliases": {"pending": 1, "canary": 1}},
                "update_mask": {"paths": ["version_aliases"]},
            },
            retry=None,
        )

    updates_before = len(gcp_fake.fake.calls_to("UpdateSecret"))
    gcp_fake.fake.before_next("UpdateSecret", concurrent_update)
    gcp_provider.promote(tenant=TENANT, version="1")
    # Ours failed on the etag, the concurrent one landed, ours was retried on a fresh read.
    assert len(gcp_fake.fake.calls_to("UpdateSecret")) - updates_before == 3
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 1, "canary": 1}


def test_aborted_etag_conflicts_are_retried_too(gcp_fake, gcp_provider) -> None:
    gcp_fake.fake.etag_mismatch_code = grpc.StatusCode.ABORTED
    try:
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
        gcp_fake.fake.before_next(
            "UpdateSecret",
            lambda: gcp_fake.fake.touch_secret(
                project="lg-test", secret_id=secret_id(gcp_provider)
            ),
        )
        gcp_provider.promote(tenant=TENANT, version="1")
    finally:
        gcp_fake.fake.etag_mismatch_code = grpc.StatusCode.FAILED_PRECONDITION
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 1}


def test_endless_etag_conflicts_give_up(gcp_fake, gcp_provider) -> None:
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    for _ in range(5):  # one per attempt of the provider's conflict budget
        gcp_fake.fake.before_next(
            "UpdateSecret",
            lambda: gcp_fake.fake.touch_secret(
                project="lg-test", secret_id=secret_id(gcp_provider)
            ),
        )
    with pytest.raises(StoreConflictError, match="kept changing"):
        gcp_provider.promote(tenant=TENANT, version="1")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"pending": 1}


def test_a_newer_pending_written_meanwhile_is_a_conflict(gcp_fake, gcp_provider, admin) -> None:
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}"

    def other_rotation() -> None:
        admin.add_secret_version(request={"parent": name, "payload": {"data": b"{}"}}, retry=None)
        admin.update_secret(
            request={
                "secret": {"name": name, "version_aliases": {"pending": 3}},
                "update_mask": {"paths": ["version_aliases"]},
            },
            retry=None,
        )

    gcp_fake.fake.before_next("UpdateSecret", other_rotation)
    with pytest.raises(StoreConflictError, match="another rotation"):
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r2")
    assert snapshot(gcp_fake, gcp_provider).aliases == {"pending": 3}


# --- idempotency -------------------------------------------------------------------------


def test_write_pending_is_idempotent_per_rotation_id(gcp_fake, gcp_provider) -> None:
    token = new_token()
    first = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    again = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert again.version == first.version == "1"
    assert again.stored_at == first.stored_at
    assert sorted(snapshot(gcp_fake, gcp_provider).versions) == [1]

    with pytest.raises(StoreConflictError, match="different token") as caught:
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    assert token.value.reveal() not in error_texts(caught.value)
    assert sorted(snapshot(gcp_fake, gcp_provider).versions) == [1]

    # A retry after promotion finds the version (now latest and current): nothing pending.
    gcp_provider.promote(tenant=TENANT, version="1")
    after = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert after.version == "1"
    assert snapshot(gcp_fake, gcp_provider).aliases == {"current": 1}


def test_a_write_lost_after_commit_is_not_stored_twice(gcp_fake, gcp_provider) -> None:
    token = new_token()
    gcp_fake.fake.fail_next(grpc.StatusCode.UNAVAILABLE, method="AddSecretVersion", after=True)
    record = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert record.version == "1"
    view = snapshot(gcp_fake, gcp_provider)
    assert sorted(view.versions) == [1]
    assert view.aliases == {"pending": 1}


def test_a_crash_between_write_and_alias_reuses_the_version(gcp_fake, gcp_provider) -> None:
    token = new_token()
    gcp_fake.fake.fail_next(grpc.StatusCode.PERMISSION_DENIED, method="UpdateSecret")
    with pytest.raises(StorePermissionError):
        gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert snapshot(gcp_fake, gcp_provider).aliases == {}  # stored, not yet pending
    record = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert record.version == "1"
    assert snapshot(gcp_fake, gcp_provider).aliases == {"pending": 1}


# --- prune -------------------------------------------------------------------------------


def test_prune_keeps_newest_and_never_current_or_pending(gcp_fake, gcp_provider, admin) -> None:
    assert gcp_provider.prune(tenant=TENANT, keep=2) == 0  # no secret: nothing to do
    for number in range(1, 7):
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=f"r{number}")
    gcp_provider.promote(tenant=TENANT, version="2")  # current 2, pending stays 6
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}"
    admin.disable_secret_version(request={"name": f"{name}/versions/5"}, retry=None)

    assert gcp_provider.prune(tenant=TENANT, keep=2) == 3  # 4, 3 and 1; 2 is current
    states = {n: v.state for n, v in snapshot(gcp_fake, gcp_provider).versions.items()}
    assert states == {
        1: "DESTROYED",
        2: "ENABLED",
        3: "DESTROYED",
        4: "DESTROYED",
        5: "DISABLED",
        6: "ENABLED",
    }
    assert gcp_provider.prune(tenant=TENANT, keep=2) == 0
    assert gcp_provider.prune(tenant=TENANT, keep=0) == 1  # only 5 is unprotected
    assert snapshot(gcp_fake, gcp_provider).versions[5].state == "DESTROYED"
    current = gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    pending = gcp_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert current is not None
    assert current.version == "2"
    assert pending is not None
    assert pending.version == "6"
    with pytest.raises(ConfigError):
        gcp_provider.prune(tenant=TENANT, keep=-1)


def test_read_of_a_destroyed_stage_is_none(gcp_fake, gcp_provider, admin) -> None:
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    gcp_provider.promote(tenant=TENANT, version="1")
    name = f"projects/lg-test/secrets/{secret_id(gcp_provider)}/versions/1"
    admin.destroy_secret_version(request={"name": name}, retry=None)
    assert gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None


# --- transient and permanent failures ----------------------------------------------------


@pytest.mark.parametrize("code", TRANSIENT, ids=lambda c: c.name)
def test_transient_failures_are_retried(gcp_fake, gcp_provider, code) -> None:
    token = new_token()
    gcp_fake.fake.fail_next(code, times=2, method="GetSecret")
    gcp_fake.fake.fail_next(code, times=2, method="AddSecretVersion")
    record = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="r1")
    assert record.version == "1"
    assert sorted(snapshot(gcp_fake, gcp_provider).versions) == [1]

    before = len(gcp_fake.fake.calls_to("AccessSecretVersion"))
    gcp_fake.fake.fail_next(code, times=2, method="AccessSecretVersion")
    pending = gcp_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == token
    assert len(gcp_fake.fake.calls_to("AccessSecretVersion")) - before == 3
    assert gcp_fake.fake.pending_faults() == 0


def test_a_transient_failure_that_persists_is_unavailable(gcp_fake, gcp_provider) -> None:
    gcp_fake.fake.fail_next(grpc.StatusCode.UNAVAILABLE, times=100, method="AccessSecretVersion")
    before = len(gcp_fake.fake.calls_to("AccessSecretVersion"))
    with pytest.raises(StoreUnavailableError, match="UNAVAILABLE"):
        gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert len(gcp_fake.fake.calls_to("AccessSecretVersion")) - before == 5  # the budget

    gcp_fake.fake.clear_faults()
    gcp_fake.fake.fail_next(grpc.StatusCode.UNAVAILABLE, times=100, method="AddSecretVersion")
    with pytest.raises(StoreUnavailableError, match="AddSecretVersion"):
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")


def test_an_unreachable_endpoint_is_unavailable(gcp_secret_template) -> None:
    from fixtures.ports import free_port

    provider = GcpProvider(
        project="lg-test",
        secret_id=gcp_secret_template,
        endpoint=f"127.0.0.1:{free_port()}",
        timeout=1.0,
        retry_attempts=2,
        retry_initial_delay=0.01,
    )
    with pytest.raises(StoreUnavailableError):
        provider.read(tenant=TENANT, stage=Stage.CURRENT)


@pytest.mark.parametrize(
    ("method", "role"),
    [
        ("AccessSecretVersion", "roles/secretmanager.secretAccessor"),
        ("CreateSecret", "roles/secretmanager.admin"),
        ("AddSecretVersion", "roles/secretmanager.secretVersionAdder"),
        ("UpdateSecret", "secretmanager.secrets.update"),
    ],
)
def test_permission_denied_is_final_and_names_the_role(
    gcp_fake, gcp_provider, method, role
) -> None:
    gcp_fake.fake.fail_next(grpc.StatusCode.PERMISSION_DENIED, times=10, method=method)
    before = len(gcp_fake.fake.calls_to(method))
    token = new_token()
    if method == "AccessSecretVersion":
        operation = partial(gcp_provider.read, tenant=TENANT, stage=Stage.CURRENT)
    else:
        operation = partial(
            gcp_provider.write_pending, tenant=TENANT, token=token, rotation_id="r1"
        )
    with pytest.raises(StorePermissionError) as caught:
        operation()
    assert len(gcp_fake.fake.calls_to(method)) - before == 1  # never retried
    assert role in caught.value.one_line()
    assert method in caught.value.one_line()
    assert token.value.reveal() not in error_texts(caught.value)


def test_unauthenticated_points_at_application_default_credentials(gcp_fake, gcp_provider) -> None:
    gcp_fake.fake.fail_next(grpc.StatusCode.UNAUTHENTICATED, method="AccessSecretVersion")
    with pytest.raises(StorePermissionError, match="credentials") as caught:
        gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert "Application Default Credentials" in caught.value.one_line()


def test_an_unknown_project_is_a_store_error_naming_it(gcp_fake, gcp_secret_template) -> None:
    provider = GcpProvider(
        project="no-such-project", secret_id=gcp_secret_template, endpoint=gcp_fake.endpoint
    )
    with pytest.raises(StoreError, match="no-such-project") as caught:
        provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r1")
    assert not isinstance(caught.value, StorePermissionError | StoreUnavailableError)
    assert "--gcp-project" in caught.value.one_line()


# --- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "plaintext"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080, True),
        ("127.8.9.10:1", "127.8.9.10", 1, True),
        ("localhost:9000", "localhost", 9000, True),
        ("[::1]:9000", "::1", 9000, True),
        ("http://127.0.0.1:80", "127.0.0.1", 80, True),
        ("https://127.0.0.1:8443", "127.0.0.1", 8443, False),
        ("secretmanager.example.internal:443", "secretmanager.example.internal", 443, False),
        ("10.0.0.5:8443", "10.0.0.5", 8443, False),
        ("https://secretmanager.googleapis.com", "secretmanager.googleapis.com", 443, False),
    ],
)
def test_endpoint_parsing(text, host, port, plaintext) -> None:
    endpoint = parse_endpoint(text)
    assert (endpoint.host, endpoint.port, endpoint.plaintext) == (host, port, plaintext)


@pytest.mark.parametrize(
    "text",
    [
        "http://10.0.0.5:8080",  # plaintext to a non-loopback host
        "http://secretmanager.example.com:80",
        "http://[2001:db8::1]:80",
        "ftp://127.0.0.1:21",
        "127.0.0.1",  # no port
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "::1:80",  # IPv6 without brackets
        ":8080",
        "bad host:80",
    ],
)
def test_bad_endpoints_are_config_errors(text) -> None:
    with pytest.raises(ConfigError):
        parse_endpoint(text)
    with pytest.raises(ConfigError):
        GcpProvider.from_options({"gcp_project": "lg-test", "gcp_endpoint": text})


def test_a_tls_endpoint_uses_application_default_credentials(monkeypatch) -> None:
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    asked: list[object] = []

    def fake_default(*args, **kwargs):
        asked.append(kwargs)
        return AnonymousCredentials(), "lg-test"

    monkeypatch.setattr(google.auth, "default", fake_default)
    provider = GcpProvider(project="lg-test", endpoint="secretmanager.example.internal:8443")
    client = provider.client
    assert asked  # the credentials came from ADC
    assert client.api_endpoint == "secretmanager.example.internal:8443"
    client.transport.close()


def test_a_loopback_endpoint_needs_no_credentials(monkeypatch, gcp_fake, gcp_secret_template):
    import google.auth

    def no_adc(*args, **kwargs):
        raise AssertionError("ADC must not be consulted for a loopback plaintext endpoint")

    monkeypatch.setattr(google.auth, "default", no_adc)
    provider = GcpProvider(
        project="lg-test", secret_id=gcp_secret_template, endpoint=gcp_fake.endpoint
    )
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT) is None


def test_missing_credentials_are_a_permission_error(monkeypatch) -> None:
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    def no_adc(*args, **kwargs):
        raise DefaultCredentialsError("no credentials here")

    monkeypatch.setattr(google.auth, "default", no_adc)
    provider = GcpProvider(project="lg-test", endpoint="secretmanager.example.internal:443")
    with pytest.raises(StorePermissionError, match="credentials") as caught:
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert "Workload Identity" in caught.value.one_line()


def test_options_and_validation(gcp_fake) -> None:
    with pytest.raises(ConfigError, match="gcp-project"):
        GcpProvider.from_options({"gcp_project": None})
    with pytest.raises(ConfigError):
        GcpProvider(project="projects/evil")
    assert parse_labels("a=b, c-d=e_f,") == {"a": "b", "c-d": "e_f"}
    assert parse_labels(None) == {}
    for bad in ("A=b", "a=B", "a", "a=b,a=c", "1a=b"):
        with pytest.raises(ConfigError):
            parse_labels(bad)
    assert parse_replication("automatic") == ()
    assert parse_replication("us-east1,europe-west4") == ("us-east1", "europe-west4")
    for bad in ("", " , ", "US-EAST1", "us east1"):
        with pytest.raises(ConfigError):
            parse_replication(bad)
    provider = registry.create("gcp", {"gcp_project": "lg-test", "gcp_endpoint": gcp_fake.endpoint})
    assert isinstance(provider, GcpProvider)
    assert provider.secret_id(tenant="acme") == "linuxguard-acme-enroll-token"
    with pytest.raises(ConfigError, match="secret id"):
        provider.secret_id(tenant="a/b")
    names = [option.name for option in GcpProvider.options]
    assert names == [
        "gcp-project",
        "gcp-secret-id",
        "gcp-replication",
        "gcp-labels",
        "gcp-endpoint",
    ]


# --- secrecy and import cost -------------------------------------------------------------


def test_tokens_never_reach_logs_or_errors(gcp_fake, gcp_provider, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = new_token()
    record = gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="a")
    gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="a")
    gcp_provider.promote(tenant=TENANT, version=record.version)
    current = gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="b")
    gcp_provider.prune(tenant=TENANT, keep=0)

    failures: list[BaseException] = []
    with pytest.raises(StoreConflictError) as conflict:
        gcp_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    failures.append(conflict.value)
    gcp_fake.fake.fail_next(grpc.StatusCode.PERMISSION_DENIED, method="AddSecretVersion")
    with pytest.raises(StorePermissionError) as denied:
        gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="c")
    failures.append(denied.value)
    gcp_fake.fake.fail_next(grpc.StatusCode.UNAVAILABLE, times=100, method="AddSecretVersion")
    with pytest.raises(StoreUnavailableError) as unavailable:
        gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="d")
    failures.append(unavailable.value)
    gcp_fake.fake.clear_faults()
    gcp_fake.fake.fail_next(grpc.StatusCode.INVALID_ARGUMENT, method="AddSecretVersion")
    with pytest.raises(StoreError) as refused:
        gcp_provider.write_pending(tenant=TENANT, token=token, rotation_id="e")
    failures.append(refused.value)
    gcp_fake.fake.tamper_next_access()
    with pytest.raises(StoreDataError) as corrupt:
        gcp_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    failures.append(corrupt.value)

    visible = "\n".join(
        [caplog.text, repr(gcp_provider), repr(record), repr(current), str(current)]
        + [str(vars(entry)) for entry in caplog.records]  # extras too (JSON log formatters)
        + [error_texts(exc) for exc in failures]
    )
    assert "as version 1" in caplog.text  # the log did capture the provider's work
    assert token.value.reveal() not in visible
    # The client's payload logging (base64, out of the redaction filter's reach) stayed off.
    assert not [entry for entry in caplog.records if hasattr(entry, "request")]
    assert not [entry for entry in caplog.records if hasattr(entry, "response")]


def test_importing_the_provider_does_not_import_the_sdk() -> None:
    code = (
        "import sys, providers.gcp, providers.registry\n"
        "factory = providers.registry.load('gcp')\n"
        "p = factory.from_options({'gcp_project': 'p-1', 'gcp_endpoint': '127.0.0.1:1'})\n"
        "p.location(tenant='acme')\n"
        "heavy = [m for m in sys.modules if m.startswith(('google', 'grpc', 'tenacity'))]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_official_client_exceptions_are_what_the_fake_raises(gcp_fake, admin) -> None:
    """Guard for the mapping above: the fake's codes arrive as these api_core classes."""
    gcp_fake.fake.fail_next(grpc.StatusCode.DEADLINE_EXCEEDED, method="GetSecret")
    with pytest.raises(gexc.DeadlineExceeded):
        admin.get_secret(request={"name": "projects/lg-test/secrets/x"}, retry=None)
