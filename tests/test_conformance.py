"""One conformance suite for every provider: adding a provider means passing it.

Parametrised over memory, vault (real OpenBao), aws (moto server), gcp (the in-repo gRPC
fake) and a third-party plugin loaded through the ``lg_rotate.providers`` entry point
(tests/plugin_dist). The second half runs the crash-safe rotation protocol over each
provider with a crash injected at every step boundary, into a Secret on the real
kube-apiserver of tests/fixtures/cluster.py.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from providers import registry
from providers.base import Provider, Stage, check_store
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import StoreConflictError, StoreError
from rotator.kube.secret import SecretTarget
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Action, Rotator, Step
from rotator.tokens import EnrollToken, Secret, utcnow

PLUGIN_DIR = Path(__file__).parent / "plugin_dist"
PROVIDERS = ["memory", "vault", "aws", "gcp", "plugin"]


@pytest.fixture
def plugin_provider(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    return registry.create("example", {"example_prefix": f"t-{uuid.uuid4().hex[:8]}"})


@pytest.fixture(params=PROVIDERS)
def provider(request) -> Provider:
    if request.param == "memory":
        return MemoryProvider(store=MemoryStore())
    return request.getfixturevalue(f"{request.param}_provider")


def token(n: int = 0, *, tenant: str = "acme", ttl: int = 600) -> EnrollToken:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    body = "".join(alphabet[(n * 7 + i * 3) % 32] for i in range(24))
    expires = utcnow().replace(microsecond=0) + timedelta(seconds=ttl)
    return EnrollToken.parse(value=body, tenant_id=tenant, expires_at=expires)


def test_plugin_is_discovered_with_its_origin(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    info = registry.discover()["example"]
    assert info.origin == "lg-rotate-example-provider"
    assert registry.load("example").summary.startswith("example plugin")


def test_is_a_provider(provider):
    assert isinstance(provider, Provider)
    assert "acme" in provider.location(tenant="acme")


def test_empty_store_reads_none(provider):
    assert provider.read(tenant="acme", stage=Stage.CURRENT) is None
    assert provider.read(tenant="acme", stage=Stage.PENDING) is None


def test_the_preflight_check_passes_and_writes_nothing(provider):
    # Before a mint the rotator proves the store usable (providers.base.check_store): the
    # provider's check(), or a read for a plugin without one. A tenant with no record yet
    # is fine (its first write creates it) and the check itself writes nothing.
    check_store(provider, tenant="acme")
    assert provider.read(tenant="acme", stage=Stage.CURRENT) is None
    assert provider.read(tenant="acme", stage=Stage.PENDING) is None
    record = provider.write_pending(tenant="acme", token=token(1), rotation_id=str(uuid.uuid4()))
    provider.promote(tenant="acme", version=record.version)
    check_store(provider, tenant="acme")
    assert provider.read(tenant="acme", stage=Stage.CURRENT).version == record.version
    assert provider.read(tenant="acme", stage=Stage.PENDING) is None


def test_write_pending_then_promote(provider):
    stored = token(1)  # built once: its expiry is "now + TTL", a second later it differs
    written = provider.write_pending(tenant="acme", token=stored, rotation_id=str(uuid.uuid4()))
    pending = provider.read(tenant="acme", stage=Stage.PENDING)
    assert pending is not None
    assert pending.version == written.version
    assert pending.token.value == stored.value
    assert pending.token.tenant_id == "acme"
    assert pending.token.expires_at == stored.expires_at
    assert pending.rotation_id == written.rotation_id
    assert provider.read(tenant="acme", stage=Stage.CURRENT) is None

    provider.promote(tenant="acme", version=written.version)

    current = provider.read(tenant="acme", stage=Stage.CURRENT)
    assert current is not None
    assert current.version == written.version
    assert current.fingerprint == token(1).fingerprint
    assert provider.read(tenant="acme", stage=Stage.PENDING) is None


def test_a_new_pending_version_leaves_current_alone(provider):
    first = provider.write_pending(tenant="acme", token=token(1), rotation_id=str(uuid.uuid4()))
    provider.promote(tenant="acme", version=first.version)
    second = provider.write_pending(tenant="acme", token=token(2), rotation_id=str(uuid.uuid4()))
    assert second.version != first.version
    assert provider.read(tenant="acme", stage=Stage.CURRENT).version == first.version
    assert provider.read(tenant="acme", stage=Stage.PENDING).version == second.version
    provider.promote(tenant="acme", version=second.version)
    assert provider.read(tenant="acme", stage=Stage.CURRENT).fingerprint == token(2).fingerprint


def test_write_pending_is_idempotent_per_rotation_id(provider):
    rotation_id = str(uuid.uuid4())
    first = provider.write_pending(tenant="acme", token=token(1), rotation_id=rotation_id)
    again = provider.write_pending(tenant="acme", token=token(1), rotation_id=rotation_id)
    assert again.version == first.version
    with pytest.raises(StoreConflictError):
        provider.write_pending(tenant="acme", token=token(2), rotation_id=rotation_id)


def test_promoting_an_unknown_version_fails(provider):
    provider.write_pending(tenant="acme", token=token(1), rotation_id=str(uuid.uuid4()))
    with pytest.raises(StoreError):
        provider.promote(tenant="acme", version="99")


def test_tenants_are_isolated(provider):
    record = provider.write_pending(tenant="acme", token=token(1), rotation_id=str(uuid.uuid4()))
    provider.promote(tenant="acme", version=record.version)
    assert provider.read(tenant="globex", stage=Stage.CURRENT) is None
    assert provider.location(tenant="acme") != provider.location(tenant="globex")


def test_prune_keeps_the_newest_and_never_current_or_pending(provider):
    versions = []
    for n in range(6):
        record = provider.write_pending(
            tenant="acme", token=token(n), rotation_id=str(uuid.uuid4())
        )
        versions.append(record.version)
        if n == 1:
            provider.promote(tenant="acme", version=record.version)  # an old current
    pruned = provider.prune(tenant="acme", keep=2)
    # Versions 1, 3, 4 go (2 is current, 5-6 are the newest). AWS is the exception by
    # its own idiom: a version that lost its staging label is already deprecated (AWS
    # deletes it), so only labelled versions are left to retire there.
    assert pruned >= (0 if provider.name == "aws" else 3)
    assert provider.read(tenant="acme", stage=Stage.CURRENT).version == versions[1]
    assert provider.read(tenant="acme", stage=Stage.PENDING).version == versions[-1]
    assert provider.prune(tenant="acme", keep=2) == 0  # nothing left to retire


def test_repr_of_records_never_shows_the_token(provider):
    record = provider.write_pending(tenant="acme", token=token(3), rotation_id=str(uuid.uuid4()))
    assert token(3).value.reveal() not in repr(record)
    assert token(3).value.reveal() not in repr(provider.read(tenant="acme", stage=Stage.PENDING))


# --- the rotation protocol over every provider, with a crash at every step -------------


class Crash(BaseException):
    """Stands in for the process dying (BaseException: nothing in the protocol catches it)."""


@pytest.fixture
def secret_target(k8s, k8s_namespace):
    return SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)


@pytest.fixture
def minter(sandbox):
    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=5),
    )


@pytest.mark.parametrize(
    "crash_step", [Step.LOCKED, Step.MINTED, Step.STORED, Step.DELIVERED, Step.PROMOTED]
)
def test_a_crash_at_any_step_ends_consistent(provider, secret_target, minter, sandbox, crash_step):
    def crash(step: Step) -> None:
        if step is crash_step:
            raise Crash(step)

    with pytest.raises(Crash):
        Rotator(
            minter=minter, provider=provider, tenant="acme", target=secret_target, on_step=crash
        ).rotate()
    delivered_before = secret_target.read_state()

    report = Rotator(minter=minter, provider=provider, tenant="acme", target=secret_target).rotate()

    current = provider.read(tenant="acme", stage=Stage.CURRENT)
    in_secret = secret_target.read_token()
    assert in_secret.value == current.token.value  # store and Secret consistent
    assert provider.read(tenant="acme", stage=Stage.PENDING) is None
    minted = [m.fingerprint for m in sandbox.minted()]
    if crash_step in (Step.STORED, Step.DELIVERED):
        # the stored token was not lost: no second mint, and it is the one delivered
        assert minted == [current.fingerprint]
        expected = Action.PROMOTED_ONLY if crash_step is Step.DELIVERED else Action.RESUMED
        assert report.action is expected
    if crash_step is Step.DELIVERED:
        # nothing delivered twice: the Secret was not written again
        assert secret_target.read_state().revision == delivered_before.revision
    if crash_step is Step.MINTED:
        # minted but never stored: that token is simply unused (it expires at LinuxGuard)
        assert len(minted) == 2
        assert current.fingerprint == minted[-1]
    if crash_step is Step.PROMOTED:
        # the first run finished; the second is an ordinary rotation
        assert report.action is Action.MINTED
        assert len(minted) == 2
