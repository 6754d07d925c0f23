"""What the rotation protocol needs from a delivery target and from a lock.

The Kubernetes Secret (``rotator.kube``) is the main target; tests and the demo use
:class:`MemoryTarget`. Targets never talk to LinuxGuard: they deliver what the store holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from providers.base import StoredRecord
from rotator.tokens import EnrollToken


@dataclass(frozen=True, kw_only=True)
class TargetState:
    """What a target carries now, as read from it (annotations, never the raw token)."""

    fingerprint: str | None
    rotation_id: str | None
    expires_at: datetime | None
    rotated_at: datetime | None
    source: str | None  # "<provider>:<store version>"
    revision: str | None  # e.g. the Secret's resourceVersion


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """What one rotation hands to a target."""

    record: StoredRecord
    source: str  # "<provider>:<store version>", recorded in linuxguard.io/source
    rotated_at: datetime


class Target(Protocol):
    def location(self) -> str:
        """Where deliveries land, for humans (``k8s:agents/linuxguard-enroll``)."""
        ...

    def read_state(self) -> TargetState | None:
        """The current state, or ``None`` when the target does not exist yet."""
        ...

    def preflight(self) -> None:
        """Prove, before a token is minted, that :meth:`deliver` would be allowed.

        Checks everything checkable without writing or exposing a token (the place
        exists, the permissions and policies allow the write); raises the error
        :meth:`deliver` would raise. A target with nothing to check does nothing.
        """
        ...

    def deliver(self, delivery: Delivery) -> TargetState:
        """Put the token in place (create or update, optimistic concurrency)."""
        ...


class Lock(Protocol):
    def hold(self) -> AbstractContextManager[None]:
        """Hold the lock for the duration of the ``with`` block, or raise LockError."""
        ...


class NoLock:
    """For targets with no shared state to protect (a launch wrapper, the demo)."""

    @contextmanager
    def hold(self) -> Iterator[None]:
        yield


class MemoryTarget:
    """An in-process target: the demo's "Secret" and the unit tests' reference."""

    def __init__(self, *, name: str = "memory-target") -> None:
        self.name = name
        self.token: EnrollToken | None = None
        self.state: TargetState | None = None
        self.deliveries = 0

    def location(self) -> str:
        return f"memory:{self.name}"

    def read_state(self) -> TargetState | None:
        return self.state

    def preflight(self) -> None:
        """Nothing can refuse an in-process delivery."""

    def deliver(self, delivery: Delivery) -> TargetState:
        self.deliveries += 1
        self.token = delivery.record.token
        self.state = TargetState(
            fingerprint=delivery.record.fingerprint,
            rotation_id=delivery.record.rotation_id,
            expires_at=delivery.record.token.expires_at,
            rotated_at=delivery.rotated_at,
            source=delivery.source,
            revision=str(self.deliveries),
        )
        return self.state
