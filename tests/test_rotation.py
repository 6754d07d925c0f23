"""The rotation protocol (rotator.rotation) against the real LinuxGuard sandbox.

The store and target are the in-memory reference implementations; the provider- and
Kubernetes-specific runs live in test_conformance.py and test_cli_e2e.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from providers.base import Stage
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import LgRotateError, TokenError
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Action, Rotator, Step, read_status
from rotator.targets import MemoryTarget
from rotator.tokens import Secret, utcnow

TENANT = "acme"


class Crash(BaseException):
    """Stands in for the process dying at a step boundary (not an Exception: nothing catches it)."""


@pytest.fixture
def minter(sandbox):
    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=5),
    )


@pytest.fixture
def provider():
    return MemoryProvider(store=MemoryStore())


@pytest.fixture
def target():
    return MemoryTarget()


def make_rotator(minter, provider, target, **kwargs):
    return Rotator(minter=minter, provider=provider, tenant=TENANT, target=target, **kwargs)


def crash_at(step: Step):
    def on_step(reached: Step) -> None:
        if reached is step:
            raise Crash(step)

    return on_step


def test_full_rotation_leaves_the_same_token_in_store_and_target(sandbox, minter, provider, target):
    report = make_rotator(minter, provider, target).rotate()

    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert report.action is Action.MINTED
    assert current is not None
    assert target.token is not None
    assert target.token.value == current.token.value
    assert report.fingerprint == current.fingerprint == target.state.fingerprint
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert [m.fingerprint for m in sandbox.minted()] == [current.fingerprint]
    assert target.state.source == f"memory:{current.version}"
    assert report.ttl_left_seconds > 500


def test_each_rotation_mints_a_new_token_and_records_the_previous(minter, provider, target):
    first = make_rotator(minter, provider, target).rotate()
    second = make_rotator(minter, provider, target).rotate()
    assert second.fingerprint != first.fingerprint
    assert second.previous_fingerprint == first.fingerprint
    assert int(second.store_version) == int(first.store_version) + 1


def test_crash_after_store_resumes_with_the_stored_token(sandbox, minter, provider, target):
    with pytest.raises(Crash):
        make_rotator(minter, provider, target, on_step=crash_at(Step.STORED)).rotate()
    pending = provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert target.deliveries == 0

    report = make_rotator(minter, provider, target).rotate()

    assert report.action is Action.RESUMED
    assert report.fingerprint == pending.fingerprint
    assert len(sandbox.minted()) == 1  # no second mint: the stored token was not lost
    assert target.deliveries == 1
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT).fingerprint == pending.fingerprint


def test_crash_after_delivery_only_promotes(sandbox, minter, provider, target):
    with pytest.raises(Crash):
        make_rotator(minter, provider, target, on_step=crash_at(Step.DELIVERED)).rotate()
    assert target.deliveries == 1
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT) is None

    report = make_rotator(minter, provider, target).rotate()

    assert report.action is Action.PROMOTED_ONLY
    assert target.deliveries == 1  # nothing delivered twice
    assert len(sandbox.minted()) == 1
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT).fingerprint == target.state.fingerprint


def test_expired_pending_token_is_replaced_by_a_fresh_one(sandbox, minter, provider, target):
    with pytest.raises(Crash):
        make_rotator(minter, provider, target, on_step=crash_at(Step.STORED)).rotate()
    stale = provider.read(tenant=TENANT, stage=Stage.PENDING)
    later = stale.token.expires_at + timedelta(seconds=1)

    # The rotator's clock says the pending token expired; the sandbox mints a new one
    # whose expiry is computed from the sandbox clock, moved forward to match.
    sandbox.advance_clock((later - utcnow()).total_seconds())
    minter_later = LinuxGuardClient(
        base_url=sandbox.url, api_key=Secret(sandbox.api_key), clock=lambda: later
    )
    report = make_rotator(minter_later, provider, target, clock=lambda: later).rotate()

    assert report.action is Action.MINTED
    assert report.fingerprint != stale.fingerprint
    assert len(sandbox.minted()) == 2
    assert target.state.fingerprint == report.fingerprint


def test_no_resume_always_mints(sandbox, minter, provider, target):
    with pytest.raises(Crash):
        make_rotator(minter, provider, target, on_step=crash_at(Step.STORED)).rotate()
    report = make_rotator(minter, provider, target).rotate(resume=False)
    assert report.action is Action.MINTED
    assert len(sandbox.minted()) == 2


def test_dry_run_changes_nothing_and_mints_nothing(sandbox, minter, provider, target):
    make_rotator(minter, provider, target).rotate()
    before = provider.read(tenant=TENANT, stage=Stage.CURRENT)

    report = make_rotator(minter, provider, target).rotate(dry_run=True)

    assert report.action is Action.WOULD_MINT
    assert report.previous_fingerprint == before.fingerprint
    assert len(sandbox.minted()) == 1
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT).version == before.version
    assert target.deliveries == 1


@pytest.mark.parametrize("mode", ["malformed", "wrong-tenant", "expired", "short-ttl", "not-json"])
def test_invalid_answers_change_nothing(sandbox, minter, provider, target, mode):
    make_rotator(minter, provider, target).rotate()
    before = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    sandbox.set_mint_mode(mode)

    with pytest.raises(LgRotateError) as caught:
        make_rotator(minter, provider, target).rotate()

    assert caught.value.exit_code in (3, 4)  # LinuxGuard answer unusable / token rejected
    after = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert after.version == before.version
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert target.deliveries == 1
    assert target.state.fingerprint == before.fingerprint


def test_short_ttl_is_rejected_by_min_ttl(sandbox, minter, provider, target):
    sandbox.ttl = timedelta(seconds=90)
    try:
        with pytest.raises(TokenError):
            make_rotator(minter, provider, target, min_ttl=timedelta(seconds=120)).rotate()
    finally:
        sandbox.ttl = timedelta(seconds=600)
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert target.deliveries == 0


def test_old_versions_are_pruned_but_current_kept(minter, provider, target):
    for _ in range(4):
        report = make_rotator(minter, provider, target, keep_versions=2).rotate()
    assert report.pruned >= 1
    assert provider.read(tenant=TENANT, stage=Stage.CURRENT).version == report.store_version


def test_status_compares_store_and_target(minter, provider, target):
    empty = read_status(provider=provider, tenant=TENANT, target=target)
    assert not empty.in_sync
    assert empty.problems(min_ttl=timedelta(seconds=60))

    make_rotator(minter, provider, target).rotate()
    status = read_status(provider=provider, tenant=TENANT, target=target)
    assert status.in_sync
    assert status.problems(min_ttl=timedelta(seconds=60)) == []
    data = status.as_dict(min_ttl=timedelta(seconds=60))
    assert data["inSync"] is True
    assert data["store"]["current"]["fingerprint"] == target.state.fingerprint
