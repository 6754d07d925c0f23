"""The Vault provider against the real OpenBao dev server (tests/fixtures/openbao.py)."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac
import pytest

from fixtures.cluster import Cluster
from fixtures.openbao import OpenBaoServer
from fixtures.ports import free_port
from providers import registry
from providers.base import Stage
from providers.vault import VaultProvider
from rotator.errors import (
    ConfigError,
    LgRotateError,
    StoreConflictError,
    StoreDataError,
    StorePermissionError,
    StoreUnavailableError,
)
from rotator.tokens import EnrollToken, utcnow

TENANT = "acme"
REPO = Path(__file__).resolve().parent.parent


def new_token(tenant: str = TENANT) -> EnrollToken:
    value = base64.b32encode(os.urandom(20)).decode()  # 32 base32 characters
    # Whole seconds: records keep RFC 3339 timestamps without fractions.
    expires_at = (utcnow() + timedelta(minutes=10)).replace(microsecond=0)
    return EnrollToken.parse(value=value, tenant_id=tenant, expires_at=expires_at)


def kv_path(provider: VaultProvider, tenant: str = TENANT) -> str:
    return provider.path_template.replace("<tenant>", tenant)


def metadata(openbao: OpenBaoServer, path: str) -> dict[str, Any]:
    response = openbao.client().secrets.kv.v2.read_secret_metadata(path=path, mount_point="secret")
    return dict(response["data"])


def root_write(openbao: OpenBaoServer, path: str, data: Mapping[str, Any]) -> int:
    response = openbao.client().secrets.kv.v2.create_or_update_secret(
        path=path, secret=dict(data), mount_point="secret"
    )
    return int(response["data"]["version"])


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


def policy_for(template: str, *, data_caps: list[str]) -> str:
    prefix = template.replace("<tenant>", "*")
    return "\n".join(
        [
            f'path "secret/data/{prefix}" {{ capabilities = {json.dumps(data_caps)} }}',
            f'path "secret/metadata/{prefix}" {{ capabilities = ["read", "update"] }}',
            f'path "secret/destroy/{prefix}" {{ capabilities = ["update"] }}',
        ]
    )


# --- the KV v2 protocol --------------------------------------------------------------


def test_write_pending_read_promote_round_trip(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    token = new_token()
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None
    assert vault_provider.read(tenant=TENANT, stage=Stage.PENDING) is None

    record = vault_provider.write_pending(tenant=TENANT, token=token, rotation_id="rot-1")
    assert (record.version, record.stage, record.rotation_id) == ("1", Stage.PENDING, "rot-1")

    pending = vault_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == token
    assert (pending.version, pending.stage, pending.rotation_id) == ("1", Stage.PENDING, "rot-1")
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None

    vault_provider.promote(tenant=TENANT, version=record.version)
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.token == token
    assert current.stage is Stage.CURRENT
    assert vault_provider.read(tenant=TENANT, stage=Stage.PENDING) is None

    meta = metadata(openbao, kv_path(vault_provider))
    assert meta["custom_metadata"] == {"lg-rotate-current": "1"}
    stored = openbao.client().secrets.kv.v2.read_secret_version(
        path=kv_path(vault_provider), mount_point="secret", raise_on_deleted_version=False
    )["data"]["data"]
    assert set(stored) == {
        "schema",
        "token",
        "tenantId",
        "expiresAt",
        "fingerprint",
        "rotationId",
        "storedAt",
    }
    assert stored["fingerprint"] == token.fingerprint
    assert stored["tenantId"] == TENANT


def test_location_names_address_mount_and_path(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    assert vault_provider.location(tenant=TENANT) == (
        f"vault:{openbao.addr}/secret/{kv_path(vault_provider)}"
    )


def test_every_write_is_a_new_version_and_history_is_kept(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    tokens = [new_token() for _ in range(3)]
    versions = [
        vault_provider.write_pending(tenant=TENANT, token=t, rotation_id=f"rot-{i}").version
        for i, t in enumerate(tokens)
    ]
    assert versions == ["1", "2", "3"]
    pending = vault_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == tokens[2]
    kv = openbao.client().secrets.kv.v2
    first = kv.read_secret_version(
        path=kv_path(vault_provider), version=1, mount_point="secret", raise_on_deleted_version=True
    )
    assert first["data"]["data"]["rotationId"] == "rot-0"


def test_promote_keeps_a_newer_pending_version(vault_provider: VaultProvider) -> None:
    old = vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    newer = vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="b")
    vault_provider.promote(tenant=TENANT, version=old.version)
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    pending = vault_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert current is not None
    assert pending is not None
    assert (current.version, pending.version) == (old.version, newer.version)


@pytest.mark.parametrize("version", ["7", "nope"])
def test_promote_of_a_missing_version_is_refused(
    vault_provider: VaultProvider, version: str
) -> None:
    vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    with pytest.raises(StoreConflictError, match=r"has no (live )?version"):
        vault_provider.promote(tenant=TENANT, version=version)
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None


def test_pointer_updates_keep_other_metadata(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    path = kv_path(vault_provider)
    client = openbao.client()
    client.secrets.kv.v2.update_metadata(
        path=path,
        mount_point="secret",
        max_versions=20,
        delete_version_after="1000h",
        custom_metadata={"owner": "platform-team"},
    )
    record = vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    vault_provider.promote(tenant=TENANT, version=record.version)
    meta = metadata(openbao, path)
    assert meta["custom_metadata"] == {"owner": "platform-team", "lg-rotate-current": "1"}
    assert meta["max_versions"] == 20
    assert meta["delete_version_after"] == "1000h0m0s"
    # A version scheduled for deletion in the future is still readable.
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == "1"


class InterferingVaultProvider(VaultProvider):
    """Lets a concurrent writer in between the read of the version and the write."""

    def __init__(self, *, interfere: int, root: OpenBaoServer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.interfere = interfere
        self.root = root
        self.cas_seen: list[int] = []

    def _write_version(self, path: str, payload: Mapping[str, str], *, cas: int) -> int | None:
        self.cas_seen.append(cas)
        if self.interfere > 0:
            self.interfere -= 1
            record = dict(payload) | {"rotationId": f"intruder-{self.interfere}"}
            root_write(self.root, path, record)
        return super()._write_version(path, payload, cas=cas)


def test_check_and_set_conflict_is_reread_and_retried(
    openbao: OpenBaoServer, vault_path_template: str, caplog: pytest.LogCaptureFixture
) -> None:
    provider = InterferingVaultProvider(
        interfere=1, root=openbao, client=openbao.client(), path_template=vault_path_template
    )
    token = new_token()
    caplog.set_level(logging.INFO, logger="lg_rotate.vault")
    record = provider.write_pending(tenant=TENANT, token=token, rotation_id="mine")
    # The intruder took version 1; ours was re-based on it, never written over it.
    assert provider.cas_seen == [0, 1]
    assert record.version == "2"
    kv = openbao.client().secrets.kv.v2
    intruder = kv.read_secret_version(
        path=kv_path(provider), version=1, mount_point="secret", raise_on_deleted_version=True
    )
    assert intruder["data"]["data"]["rotationId"] == "intruder-0"
    pending = provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert (pending.version, pending.rotation_id) == ("2", "mine")
    assert "check-and-set conflict" in caplog.text


def test_endless_check_and_set_conflicts_give_up(
    openbao: OpenBaoServer, vault_path_template: str
) -> None:
    provider = InterferingVaultProvider(
        interfere=100,
        root=openbao,
        client=openbao.client(),
        path_template=vault_path_template,
        cas_attempts=3,
    )
    with pytest.raises(StoreConflictError, match="3 check-and-set conflicts"):
        provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="mine")
    assert provider.cas_seen == [0, 1, 2]
    assert metadata(openbao, kv_path(provider))["custom_metadata"] is None


def test_write_pending_is_idempotent_per_rotation_id(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    token = new_token()
    first = vault_provider.write_pending(tenant=TENANT, token=token, rotation_id="rot-x")
    again = vault_provider.write_pending(tenant=TENANT, token=token, rotation_id="rot-x")
    assert again.version == first.version == "1"
    assert again.stage is Stage.PENDING
    assert metadata(openbao, kv_path(vault_provider))["current_version"] == 1

    with pytest.raises(StoreConflictError, match="rot-x already stored a different token"):
        vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="rot-x")
    assert metadata(openbao, kv_path(vault_provider))["current_version"] == 1


def test_retry_after_a_crash_between_write_and_pointer_reuses_the_version(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    """The data landed but the pending pointer did not: the retry adopts the version."""
    token = new_token()
    done = vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="old")
    vault_provider.promote(tenant=TENANT, version=done.version)
    from providers.base import record_payload

    payload = record_payload(token=token, rotation_id="crashed", stored_at=utcnow())
    assert root_write(openbao, kv_path(vault_provider), payload) == 2
    record = vault_provider.write_pending(tenant=TENANT, token=token, rotation_id="crashed")
    assert record.version == "2"
    meta = metadata(openbao, kv_path(vault_provider))
    assert meta["current_version"] == 2
    assert meta["custom_metadata"] == {"lg-rotate-current": "1", "lg-rotate-pending": "2"}


def test_prune_keeps_newest_and_never_current_or_pending(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    records = [
        vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=f"r{i}")
        for i in range(6)
    ]
    vault_provider.promote(tenant=TENANT, version=records[1].version)  # current = 2
    vault_provider.write_pending(tenant=TENANT, token=records[5].token, rotation_id="r5")
    # live 1..6, newest two are 5 and 6; 2 is current and 6 pending.
    assert vault_provider.prune(tenant=TENANT, keep=2) == 3
    versions = metadata(openbao, kv_path(vault_provider))["versions"]
    destroyed = sorted(int(v) for v, info in versions.items() if info["destroyed"])
    assert destroyed == [1, 3, 4]
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    pending = vault_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert current is not None
    assert pending is not None
    assert (current.version, pending.version) == ("2", "6")

    assert vault_provider.prune(tenant=TENANT, keep=2) == 0  # destroyed ones do not count
    openbao.client().secrets.kv.v2.delete_secret_versions(
        path=kv_path(vault_provider), versions=[5], mount_point="secret"
    )
    assert vault_provider.prune(tenant=TENANT, keep=0) == 0  # 5 is deleted; 2, 6 protected
    assert vault_provider.prune(tenant="nobody", keep=1) == 0


def test_read_of_a_destroyed_or_deleted_stage_is_none(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    first = vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    vault_provider.promote(tenant=TENANT, version=first.version)
    vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="b")
    kv = openbao.client().secrets.kv.v2
    kv.destroy_secret_versions(path=kv_path(vault_provider), versions=[1], mount_point="secret")
    kv.delete_secret_versions(path=kv_path(vault_provider), versions=[2], mount_point="secret")
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None
    assert vault_provider.read(tenant=TENANT, stage=Stage.PENDING) is None


def test_a_secret_that_is_not_a_record_is_a_data_error(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    path = kv_path(vault_provider)
    root_write(openbao, path, {"password": "hunter2-not-a-token"})
    with pytest.raises(StoreDataError, match="not a lg-rotate record") as refused:
        vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    assert metadata(openbao, path)["current_version"] == 1  # nothing buried under it
    openbao.client().secrets.kv.v2.update_metadata(
        path=path, mount_point="secret", custom_metadata={"lg-rotate-current": "1"}
    )
    with pytest.raises(StoreDataError, match="not a valid lg-rotate record") as unreadable:
        vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    for exc in (refused.value, unreadable.value):
        assert "hunter2" not in error_texts(exc)


def test_a_corrupt_stage_pointer_is_a_data_error(
    vault_provider: VaultProvider, openbao: OpenBaoServer
) -> None:
    vault_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    openbao.client().secrets.kv.v2.update_metadata(
        path=kv_path(vault_provider),
        mount_point="secret",
        custom_metadata={"lg-rotate-current": "latest"},
    )
    with pytest.raises(StoreDataError, match="not a version number"):
        vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)


# --- configuration and mounts --------------------------------------------------------


def test_registry_builds_the_provider_from_options(
    openbao: OpenBaoServer, vault_path_template: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    provider = registry.create(
        "vault", {"vault_addr": openbao.addr, "vault_path": vault_path_template}
    )
    assert isinstance(provider, VaultProvider)
    record = provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    provider.promote(tenant=TENANT, version=record.version)
    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == "1"


def test_token_file_is_preferred_over_the_environment(
    openbao: OpenBaoServer,
    vault_path_template: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "not-a-valid-token")
    token_file = tmp_path / "vault-token"
    token_file.write_text(openbao.root_token + "\n")
    provider = VaultProvider.from_options(
        {
            "vault_addr": openbao.addr,
            "vault_path": vault_path_template,
            "vault_token_file": str(token_file),
        }
    )
    assert provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a").version == "1"


@pytest.mark.parametrize(
    ("options", "env", "message"),
    [
        ({}, {}, "needs --vault-addr"),
        ({"vault_addr": "http://127.0.0.1:1"}, {}, "token auth needs a Vault token"),
        (
            {"vault_addr": "http://127.0.0.1:1", "vault_auth": "approle"},
            {"VAULT_SECRET_ID": "s"},
            "approle auth needs --vault-role-id",
        ),
        (
            {"vault_addr": "http://127.0.0.1:1", "vault_auth": "approle", "vault_role_id": "r"},
            {},
            "approle auth needs a secret ID",
        ),
        (
            {"vault_addr": "http://127.0.0.1:1", "vault_auth": "kubernetes"},
            {},
            "kubernetes auth needs --vault-role",
        ),
        (
            {"vault_addr": "http://127.0.0.1:1", "vault_auth": "ldap"},
            {},
            "unknown Vault auth method 'ldap'",
        ),
        (
            {"vault_addr": "http://127.0.0.1:1", "vault_cacert": "/nonexistent/ca.pem"},
            {"VAULT_TOKEN": "t"},
            "CA bundle /nonexistent/ca.pem does not exist",
        ),
    ],
)
def test_incomplete_configuration_is_a_config_error(
    options: dict[str, str],
    env: dict[str, str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("VAULT_TOKEN", "VAULT_SECRET_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as caught:
        VaultProvider.from_options(options)
    assert caught.value.fix


def test_unreadable_credential_files_are_config_errors(
    openbao: OpenBaoServer, tmp_path: Path
) -> None:
    provider = VaultProvider.from_options(
        {
            "vault_addr": openbao.addr,
            "vault_auth": "kubernetes",
            "vault_role": "lg",
            "vault_jwt_file": str(tmp_path / "missing-jwt"),
        }
    )
    with pytest.raises(ConfigError, match="cannot read the service-account token file"):
        provider.read(tenant=TENANT, stage=Stage.CURRENT)


def test_missing_or_wrong_mount_is_a_config_error(openbao: OpenBaoServer) -> None:
    missing = VaultProvider(client=openbao.client(), mount=f"nope-{uuid.uuid4().hex[:8]}")
    with pytest.raises(ConfigError, match="no KV v2 mount"):
        missing.read(tenant=TENANT, stage=Stage.CURRENT)

    kv1 = f"kv1-{uuid.uuid4().hex[:8]}"
    openbao.client().sys.enable_secrets_engine("kv", path=kv1, options={"version": "1"})
    wrong = VaultProvider(client=openbao.client(), mount=kv1)
    with pytest.raises(ConfigError, match="not KV v2"):
        wrong.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")


@pytest.mark.parametrize("tenant", ["", "../etc", "a/b", ".."])
def test_a_tenant_cannot_escape_its_path(vault_provider: VaultProvider, tenant: str) -> None:
    with pytest.raises(ConfigError, match="cannot be used in a Vault path"):
        vault_provider.read(tenant=tenant, stage=Stage.CURRENT)


# --- availability --------------------------------------------------------------------


def test_unreachable_vault_is_unavailable_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAULT_TOKEN", "t")
    addr = f"http://127.0.0.1:{free_port()}"
    provider = VaultProvider.from_options({"vault_addr": addr})
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="unavailable") as caught:
        provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    assert time.monotonic() - started < 5
    assert addr in str(caught.value)


@dataclass
class FakeVault:
    """An HTTP server answering every request like a sealed Vault (503)."""

    addr: str
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def sealed_vault() -> Iterator[FakeVault]:
    fake = FakeVault(addr="")

    class Sealed(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            fake.requests.append(f"{self.command} {self.path}")
            body = json.dumps({"errors": ["Vault is sealed"]}).encode()
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sealed)
    fake.addr = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_a_sealed_vault_is_retried_a_bounded_number_of_times(sealed_vault: FakeVault) -> None:
    provider = VaultProvider(
        client=hvac.Client(url=sealed_vault.addr, token="t"), transient_attempts=3
    )
    with pytest.raises(StoreUnavailableError, match="Vault is sealed"):
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert len(sealed_vault.requests) == 3  # three attempts, then a clear failure


# --- authentication and policies -----------------------------------------------------


@dataclass
class AppRole:
    mount: str
    role_id: str
    secret_id_file: Path


def make_approle(openbao: OpenBaoServer, *, policy_text: str, tmp_path: Path) -> AppRole:
    root = openbao.client()
    suffix = uuid.uuid4().hex[:8]
    root.sys.create_or_update_policy(name=f"lg-{suffix}", policy=policy_text)
    mount = f"approle-{suffix}"
    root.sys.enable_auth_method("approle", path=mount)
    root.auth.approle.create_or_update_approle(
        role_name="lg-rotate", token_policies=[f"lg-{suffix}"], mount_point=mount
    )
    role_id = root.auth.approle.read_role_id(role_name="lg-rotate", mount_point=mount)
    secret = root.auth.approle.generate_secret_id(role_name="lg-rotate", mount_point=mount)
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text(secret["data"]["secret_id"])
    return AppRole(mount=mount, role_id=role_id["data"]["role_id"], secret_id_file=secret_id_file)


def approle_provider(openbao: OpenBaoServer, role: AppRole, template: str) -> VaultProvider:
    return VaultProvider.from_options(
        {
            "vault_addr": openbao.addr,
            "vault_path": template,
            "vault_auth": "approle",
            "vault_role_id": role.role_id,
            "vault_secret_id_file": str(role.secret_id_file),
            "vault_auth_mount": role.mount,
        }
    )


def test_approle_with_least_privilege_policy_does_everything(
    openbao: OpenBaoServer, vault_path_template: str, tmp_path: Path
) -> None:
    role = make_approle(
        openbao,
        policy_text=policy_for(vault_path_template, data_caps=["create", "update", "read"]),
        tmp_path=tmp_path,
    )
    provider = approle_provider(openbao, role, vault_path_template)
    for i in range(3):
        record = provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=f"r{i}")
        provider.promote(tenant=TENANT, version=record.version)
    again = provider.write_pending(tenant=TENANT, token=record.token, rotation_id="r2")
    assert again.version == "3"
    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == "3"
    assert provider.prune(tenant=TENANT, keep=1) == 2

    # Outside its policy the same login is refused, with the policy that would fix it.
    with pytest.raises(StorePermissionError) as refused:
        VaultProvider.from_options(
            {
                "vault_addr": openbao.addr,
                "vault_path": "elsewhere/<tenant>",
                "vault_auth": "approle",
                "vault_role_id": role.role_id,
                "vault_secret_id_file": str(role.secret_id_file),
                "vault_auth_mount": role.mount,
            }
        ).read(tenant=TENANT, stage=Stage.CURRENT)
    assert 'secret/metadata/elsewhere/acme" { capabilities = ["read", "update"]' in (
        refused.value.fix or ""
    )


def test_approle_without_write_is_refused_and_changes_nothing(
    openbao: OpenBaoServer, vault_path_template: str, tmp_path: Path
) -> None:
    seeded = VaultProvider(client=openbao.client(), path_template=vault_path_template)
    first = seeded.write_pending(tenant=TENANT, token=new_token(), rotation_id="seed")
    seeded.promote(tenant=TENANT, version=first.version)
    before = metadata(openbao, kv_path(seeded))

    role = make_approle(
        openbao,
        policy_text=policy_for(vault_path_template, data_caps=["read"]),
        tmp_path=tmp_path,
    )
    provider = approle_provider(openbao, role, vault_path_template)
    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == "1"  # reading is allowed

    with pytest.raises(StorePermissionError, match="denied writing") as refused:
        provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="new")
    fix = refused.value.fix or ""
    assert '["create", "update", "read"]' in fix
    assert f"secret/data/{kv_path(seeded)}" in fix
    assert f"secret/destroy/{kv_path(seeded)}" in fix
    after = metadata(openbao, kv_path(seeded))
    assert after["current_version"] == before["current_version"] == 1
    assert after["custom_metadata"] == before["custom_metadata"]


def test_approle_logs_in_again_when_its_token_is_revoked(
    openbao: OpenBaoServer, vault_path_template: str, tmp_path: Path
) -> None:
    role = make_approle(
        openbao,
        policy_text=policy_for(vault_path_template, data_caps=["create", "update", "read"]),
        tmp_path=tmp_path,
    )
    provider = approle_provider(openbao, role, vault_path_template)
    provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    first_token = provider._client().token
    openbao.client().auth.token.revoke(first_token)
    provider.promote(tenant=TENANT, version="1")
    assert provider._client().token != first_token
    assert metadata(openbao, kv_path(provider))["custom_metadata"] == {"lg-rotate-current": "1"}


def test_a_bad_approle_secret_id_is_a_permission_error(
    openbao: OpenBaoServer, vault_path_template: str, tmp_path: Path
) -> None:
    role = make_approle(
        openbao,
        policy_text=policy_for(vault_path_template, data_caps=["read"]),
        tmp_path=tmp_path,
    )
    role.secret_id_file.write_text(str(uuid.uuid4()))
    provider = approle_provider(openbao, role, vault_path_template)
    with pytest.raises(StorePermissionError, match="approle login at auth/approle-"):
        provider.read(tenant=TENANT, stage=Stage.CURRENT)


def kubernetes_auth_for(openbao: OpenBaoServer, k8s: Cluster, namespace: str, template: str) -> str:
    """A kubernetes auth mount whose TokenReviews go to the real API server; its mount path.

    The reviewer is a ServiceAccount bound to ``system:auth-delegator`` (what Vault's docs
    prescribe); the role admits the ServiceAccount ``lg-rotate`` of ``namespace``.
    """
    suffix = uuid.uuid4().hex[:8]
    mount = f"k8s-{suffix}"
    k8s.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{namespace}-vault-reviewer"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "system:auth-delegator",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "vault", "namespace": namespace}],
        }
    )
    root = openbao.client()
    root.sys.create_or_update_policy(
        name=f"lg-k8s-{suffix}",
        policy=policy_for(template, data_caps=["create", "update", "read"]),
    )
    root.sys.enable_auth_method("kubernetes", path=mount)
    root.auth.kubernetes.configure(
        kubernetes_host=k8s.url,
        kubernetes_ca_cert=k8s.ca_pem,
        token_reviewer_jwt=k8s.serviceaccount_token(namespace, "vault"),
        disable_local_ca_jwt=True,
        mount_point=mount,
    )
    root.auth.kubernetes.create_role(
        name="lg-rotate",
        bound_service_account_names=["lg-rotate"],
        bound_service_account_namespaces=[namespace],
        policies=[f"lg-k8s-{suffix}"],
        mount_point=mount,
    )
    return mount


def test_kubernetes_auth_logs_in_with_the_service_account_token(
    openbao: OpenBaoServer,
    vault_path_template: str,
    k8s: Cluster,
    k8s_namespace: str,
    tmp_path: Path,
) -> None:
    # Vault's kubernetes auth asks the real API server (TokenReview) whether the
    # ServiceAccount token is valid: signature, expiry, and that the ServiceAccount exists.
    mount = kubernetes_auth_for(openbao, k8s, k8s_namespace, vault_path_template)
    try:
        jwt_file = tmp_path / "token"
        jwt_file.write_text(k8s.serviceaccount_token(k8s_namespace, "lg-rotate"))
        options = {
            "vault_addr": openbao.addr,
            "vault_path": vault_path_template,
            "vault_auth": "kubernetes",
            "vault_role": "lg-rotate",
            "vault_jwt_file": str(jwt_file),
            "vault_auth_mount": mount,
        }
        provider = VaultProvider.from_options(options)
        record = provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="k8s")
        provider.promote(tenant=TENANT, version=record.version)
        current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
        assert current is not None
        assert current.rotation_id == "k8s"

        def refused(jwt: str) -> StorePermissionError:
            jwt_file.write_text(jwt)
            with pytest.raises(StorePermissionError) as failure:
                VaultProvider.from_options(options).read(tenant=TENANT, stage=Stage.CURRENT)
            assert f"kubernetes login at auth/{mount} failed" in str(failure.value)
            assert jwt not in error_texts(failure.value)
            return failure.value

        # A forged signature: the API server does not authenticate it.
        genuine = k8s.serviceaccount_token(k8s_namespace, "lg-rotate")
        assert "permission denied" in str(refused(genuine.rsplit(".", 1)[0] + ".Zm9yZ2Vk"))
        # A genuine token of another ServiceAccount: authenticated, but not bound to the role.
        intruder = k8s.serviceaccount_token(k8s_namespace, "intruder")
        assert "service account name not authorized" in str(refused(intruder))
        # A genuine token of a ServiceAccount deleted since: bound tokens die with it. (One
        # never reviewed before: the API server caches a successful authentication for 10 s,
        # so a token used just before the deletion still passes that long.)
        k8s.delete("v1/serviceaccounts", k8s_namespace, "lg-rotate")
        wait_for_deletion(k8s, k8s_namespace, "lg-rotate")
        assert "permission denied" in str(refused(genuine))
    finally:
        k8s.delete(
            "rbac.authorization.k8s.io/v1/clusterrolebindings",
            None,
            f"{k8s_namespace}-vault-reviewer",
        )


def wait_for_deletion(k8s: Cluster, namespace: str, serviceaccount: str) -> None:
    deadline = time.monotonic() + 10
    while k8s.get("v1/serviceaccounts", namespace, serviceaccount) is not None:
        assert time.monotonic() < deadline, f"ServiceAccount {serviceaccount} still exists"
        time.sleep(0.05)


# --- secrets stay secret -------------------------------------------------------------


def test_tokens_never_reach_logs_or_errors(
    openbao: OpenBaoServer,
    vault_path_template: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    vault_token = f"LEAKCHECK{uuid.uuid4().hex}"
    openbao.client().auth.token.create(id=vault_token, policies=["root"], ttl="1h")
    token_file = tmp_path / "vault-token"
    token_file.write_text(vault_token)
    caplog.set_level(logging.DEBUG)
    provider = VaultProvider.from_options(
        {
            "vault_addr": openbao.addr,
            "vault_path": vault_path_template,
            "vault_token_file": str(token_file),
        }
    )
    enrol = new_token()
    record = provider.write_pending(tenant=TENANT, token=enrol, rotation_id="a")
    provider.write_pending(tenant=TENANT, token=enrol, rotation_id="a")
    provider.promote(tenant=TENANT, version=record.version)
    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="b")
    provider.prune(tenant=TENANT, keep=0)

    failures: list[BaseException] = []
    with pytest.raises(StoreConflictError) as conflict:
        provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="a")
    failures.append(conflict.value)
    openbao.client().auth.token.revoke(vault_token)
    with pytest.raises(StorePermissionError) as denied:
        provider.write_pending(tenant=TENANT, token=enrol, rotation_id="c")
    failures.append(denied.value)

    visible = "\n".join(
        [caplog.text, repr(provider), repr(record), repr(current), str(current)]
        + [error_texts(exc) for exc in failures]
    )
    assert "stored version 1" in caplog.text  # the log did capture the provider's work
    assert vault_token not in visible
    assert enrol.value.reveal() not in visible


def test_importing_the_provider_does_not_import_hvac() -> None:
    code = (
        "import sys, providers.vault, providers.registry\n"
        "providers.registry.load('vault')\n"
        "assert 'hvac' not in sys.modules, 'hvac imported'\n"
        "assert 'requests' not in sys.modules, 'requests imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
