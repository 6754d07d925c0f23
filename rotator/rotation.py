"""The rotation protocol (DESIGN.md §4), written once on top of the provider primitives.

    lock -> resume, or preflight + mint -> write pending -> deliver -> promote -> prune -> report

Before minting, :meth:`Rotator.preflight` checks everything checkable without a token:
the store answers and accepts this identity (``providers.base.check_store``), and the
target would accept the write (``Target.preflight``: for the Secret, a server-side dry
run). A run that would fail after minting fails before it instead, with the same error
and exit code, and nothing minted, stored or delivered.

Crash safety comes from the order and from what each step leaves behind:

* a run that dies after ``write_pending`` leaves a *pending* version in the store; the
  next run finds it and, if it is still usable (right tenant, at least ``min_ttl`` left),
  delivers it instead of minting, so no valid token is lost and LinuxGuard is not asked
  twice;
* a run that dies after delivering but before promoting leaves a target that already
  carries the pending token; the next run sees the matching fingerprint and only
  promotes, so nothing is delivered twice;
* a version is promoted only after this run (or the run it resumes) delivered it.

The protocol knows no SDK: providers, the target, the lock and the minter are passed in.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol

from providers.base import DEFAULT_KEEP_VERSIONS, Provider, Stage, StoredRecord, check_store
from rotator.errors import LgRotateError, TokenError
from rotator.targets import Delivery, Lock, NoLock, Target, TargetState
from rotator.tokens import EnrollToken, utcnow

log = logging.getLogger("lg_rotate.rotation")

DEFAULT_MIN_TTL = timedelta(seconds=60)


class Minter(Protocol):
    """The source of fresh tokens (``rotator.linuxguard.LinuxGuardClient``)."""

    def mint(
        self, *, tenant_id: str, min_ttl: timedelta, ttl_seconds: int | None = None
    ) -> EnrollToken: ...


class Step(StrEnum):
    """Step boundaries, reported to ``on_step`` (crash tests kill the process there)."""

    LOCKED = "locked"
    MINTED = "minted"
    STORED = "stored"
    DELIVERED = "delivered"
    PROMOTED = "promoted"


class Action(StrEnum):
    MINTED = "minted"  # a fresh token was minted, stored, delivered, promoted
    RESUMED = "resumed"  # a pending token left by an interrupted run was delivered
    PROMOTED_ONLY = "promoted-only"  # the target already had the pending token
    WOULD_MINT = "would-mint"  # dry run
    WOULD_RESUME = "would-resume"  # dry run


@dataclass(frozen=True, kw_only=True)
class RotationReport:
    action: Action
    tenant: str
    rotation_id: str | None
    fingerprint: str | None
    previous_fingerprint: str | None
    store_location: str
    store_version: str | None
    target_location: str | None
    target_revision: str | None
    expires_at: datetime | None
    ttl_left_seconds: float | None
    duration_seconds: float
    pruned: int
    dry_run: bool
    # The record delivered (None for a dry run), for callers that hand the token on
    # themselves (exec/emit). Not part of as_dict(): reports never carry the token.
    record: StoredRecord | None = None
    # Whether the target existed before this run (False: this run created it, or a dry
    # run would); None with no target. ``previous_fingerprint`` is then None too: there
    # was no previous value, which is not the same as an unknown one.
    target_existed: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "action": str(self.action),
            "tenant": self.tenant,
            "rotationId": self.rotation_id,
            "fingerprint": self.fingerprint,
            "previousFingerprint": self.previous_fingerprint,
            "targetExisted": self.target_existed,
            "store": self.store_location,
            "storeVersion": self.store_version,
            "target": self.target_location,
            "targetRevision": self.target_revision,
            "expiresAt": self.expires_at.isoformat() if self.expires_at else None,
            "ttlLeftSeconds": round(self.ttl_left_seconds, 1)
            if self.ttl_left_seconds is not None
            else None,
            "durationSeconds": round(self.duration_seconds, 3),
            "pruned": self.pruned,
            "dryRun": self.dry_run,
        }


class Rotator:
    """Runs the protocol for one tenant, one provider and (optionally) one target."""

    def __init__(
        self,
        *,
        minter: Minter,
        provider: Provider,
        tenant: str,
        target: Target | None = None,
        lock: Lock | None = None,
        min_ttl: timedelta = DEFAULT_MIN_TTL,
        ttl_seconds: int | None = None,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        clock: Callable[[], datetime] = utcnow,
        on_step: Callable[[Step], None] | None = None,
    ) -> None:
        self.minter = minter
        self.provider = provider
        self.tenant = tenant
        self.target = target
        self.lock = lock or NoLock()
        self.min_ttl = min_ttl
        self.ttl_seconds = ttl_seconds
        self.keep_versions = keep_versions
        self.clock = clock
        self.on_step = on_step

    # --- public -------------------------------------------------------------------------

    def rotate(self, *, dry_run: bool = False, resume: bool = True) -> RotationReport:
        """Run the protocol once. ``resume=False`` always mints (a launch wrapper does)."""
        started = time.monotonic()
        with self.lock.hold():
            self._step(Step.LOCKED)
            state = self.target.read_state() if self.target else None
            pending = self._usable_pending() if resume else None
            if dry_run:
                if pending is None:
                    self.preflight()  # a dry run answers "would a real run succeed?"
                return self._dry_run_report(pending=pending, state=state, started=started)
            if pending is not None:
                record, action = pending, Action.RESUMED
                log.info(
                    "resuming rotation %s: delivering stored version %s (%s)",
                    record.rotation_id,
                    record.version,
                    record.token.short_fingerprint,
                )
            else:
                self.preflight()  # a run that would fail after minting fails before it
                record, action = self._mint_and_store(), Action.MINTED
            delivered_state = state
            if self.target is not None:
                if state is not None and state.fingerprint == record.fingerprint:
                    action = Action.PROMOTED_ONLY  # delivered by the run that crashed
                else:
                    delivered_state = self._deliver(record)
            self.provider.promote(tenant=self.tenant, version=record.version)
            self._step(Step.PROMOTED)
            pruned = self._prune()
        return self._report(
            action=action,
            record=record,
            previous=state,
            delivered=delivered_state,
            started=started,
            pruned=pruned,
        )

    def preflight(self) -> None:
        """Check the store and the target before a token exists (raises their errors)."""
        check_store(self.provider, tenant=self.tenant)
        if self.target is not None:
            self.target.preflight()
        log.debug("preflight passed: %s", self.provider.location(tenant=self.tenant))

    # --- steps --------------------------------------------------------------------------

    def _step(self, step: Step) -> None:
        log.debug("step %s", step)
        if self.on_step is not None:
            self.on_step(step)

    def _usable_pending(self) -> StoredRecord | None:
        pending = self.provider.read(tenant=self.tenant, stage=Stage.PENDING)
        if pending is None:
            return None
        try:
            pending.token.check_usable(
                tenant_id=self.tenant, min_ttl=self.min_ttl, now=self.clock()
            )
        except TokenError as exc:
            log.info(
                "stored pending version %s is not usable (%s); minting a new token",
                pending.version,
                exc.message,
            )
            return None
        return pending

    def _mint_and_store(self) -> StoredRecord:
        token = self.minter.mint(
            tenant_id=self.tenant, min_ttl=self.min_ttl, ttl_seconds=self.ttl_seconds
        )
        self._step(Step.MINTED)
        rotation_id = str(uuid.uuid4())
        record = self.provider.write_pending(
            tenant=self.tenant, token=token, rotation_id=rotation_id
        )
        log.info(
            "stored %s as version %s of %s (rotation %s)",
            token.short_fingerprint,
            record.version,
            self.provider.location(tenant=self.tenant),
            rotation_id,
        )
        self._step(Step.STORED)
        return record

    def _deliver(self, record: StoredRecord) -> TargetState:
        assert self.target is not None
        # Time passed since minting (retries, a resumed run): check again before delivery.
        record.token.check_usable(tenant_id=self.tenant, min_ttl=self.min_ttl, now=self.clock())
        state = self.target.deliver(
            Delivery(
                record=record,
                source=f"{self.provider.name}:{record.version}",
                rotated_at=self.clock(),
            )
        )
        log.info(
            "delivered %s to %s (revision %s)",
            record.token.short_fingerprint,
            self.target.location(),
            state.revision,
        )
        self._step(Step.DELIVERED)
        return state

    def _prune(self) -> int:
        # Hygiene must not fail a rotation that already delivered: warn and go on.
        try:
            return self.provider.prune(tenant=self.tenant, keep=self.keep_versions)
        except LgRotateError as exc:
            log.warning("could not prune old versions: %s", exc.one_line())
            return 0

    # --- reports ------------------------------------------------------------------------

    def _report(
        self,
        *,
        action: Action,
        record: StoredRecord,
        previous: TargetState | None,
        delivered: TargetState | None,
        started: float,
        pruned: int,
    ) -> RotationReport:
        return RotationReport(
            action=action,
            tenant=self.tenant,
            rotation_id=record.rotation_id,
            fingerprint=record.fingerprint,
            previous_fingerprint=previous.fingerprint if previous else None,
            store_location=self.provider.location(tenant=self.tenant),
            store_version=record.version,
            target_location=self.target.location() if self.target else None,
            target_revision=delivered.revision if delivered else None,
            expires_at=record.token.expires_at,
            ttl_left_seconds=record.token.ttl_left(now=self.clock()).total_seconds(),
            duration_seconds=time.monotonic() - started,
            pruned=pruned,
            dry_run=False,
            record=record,
            target_existed=(previous is not None) if self.target else None,
        )

    def _dry_run_report(
        self, *, pending: StoredRecord | None, state: TargetState | None, started: float
    ) -> RotationReport:
        return RotationReport(
            action=Action.WOULD_RESUME if pending else Action.WOULD_MINT,
            tenant=self.tenant,
            rotation_id=pending.rotation_id if pending else None,
            fingerprint=pending.fingerprint if pending else None,
            previous_fingerprint=state.fingerprint if state else None,
            store_location=self.provider.location(tenant=self.tenant),
            store_version=pending.version if pending else None,
            target_location=self.target.location() if self.target else None,
            target_revision=state.revision if state else None,
            expires_at=pending.token.expires_at if pending else None,
            ttl_left_seconds=pending.token.ttl_left(now=self.clock()).total_seconds()
            if pending
            else None,
            duration_seconds=time.monotonic() - started,
            pruned=0,
            dry_run=True,
            target_existed=(state is not None) if self.target else None,
        )


# --- status ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class StatusReport:
    tenant: str
    store_location: str
    current: StoredRecord | None
    pending: StoredRecord | None
    target_location: str | None
    target: TargetState | None
    now: datetime

    @property
    def in_sync(self) -> bool | None:
        """Whether the target carries the store's current token; None with no target.

        With no target (``--target none``) there is nothing to be in sync with: the
        answer is "not applicable", and :meth:`problems` judges the store alone.
        """
        if self.target_location is None:
            return None
        if self.current is None or self.target is None:
            return False
        return self.target.fingerprint == self.current.fingerprint

    def problems(self, *, min_ttl: timedelta) -> list[str]:
        """What an operator should act on (also the exit status of ``status --check``)."""
        found = []
        if self.current is None:
            found.append("the store holds no current token: run lg-rotate rotate")
        elif self.current.token.ttl_left(now=self.now) < min_ttl:
            found.append("the store's current token is expired or about to: rotate")
        if self.pending is not None:
            found.append("a pending version awaits delivery: the next rotate resumes it")
        if self.target_location is not None:
            if self.target is None:
                found.append("the target does not exist yet: run lg-rotate rotate")
            elif not self.in_sync:
                found.append("the target does not carry the store's current token")
        return found

    def as_dict(self, *, min_ttl: timedelta) -> dict[str, object]:
        def record(r: StoredRecord | None) -> dict[str, object] | None:
            if r is None:
                return None
            return {
                "version": r.version,
                "fingerprint": r.fingerprint,
                "rotationId": r.rotation_id,
                "storedAt": r.stored_at.isoformat(),
                "ageSeconds": round((self.now - r.stored_at).total_seconds(), 1),
                "expiresAt": r.token.expires_at.isoformat(),
                "ttlLeftSeconds": round(r.token.ttl_left(now=self.now).total_seconds(), 1),
            }

        target: dict[str, object] | None = None
        if self.target is not None:
            t = self.target
            target = {
                "fingerprint": t.fingerprint,
                "rotationId": t.rotation_id,
                "source": t.source,
                "revision": t.revision,
                "rotatedAt": t.rotated_at.isoformat() if t.rotated_at else None,
                "ageSeconds": round((self.now - t.rotated_at).total_seconds(), 1)
                if t.rotated_at
                else None,
                "expiresAt": t.expires_at.isoformat() if t.expires_at else None,
                "ttlLeftSeconds": round((t.expires_at - self.now).total_seconds(), 1)
                if t.expires_at
                else None,
            }
        return {
            "tenant": self.tenant,
            "store": {
                "location": self.store_location,
                "current": record(self.current),
                "pending": record(self.pending),
            },
            "target": {"location": self.target_location, "state": target},
            "inSync": self.in_sync,
            "problems": self.problems(min_ttl=min_ttl),
        }


def read_status(
    *,
    provider: Provider,
    tenant: str,
    target: Target | None,
    clock: Callable[[], datetime] = utcnow,
) -> StatusReport:
    return StatusReport(
        tenant=tenant,
        store_location=provider.location(tenant=tenant),
        current=provider.read(tenant=tenant, stage=Stage.CURRENT),
        pending=provider.read(tenant=tenant, stage=Stage.PENDING),
        target_location=target.location() if target else None,
        target=target.read_state() if target else None,
        now=clock(),
    )
