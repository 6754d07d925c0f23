"""The in-memory provider: the demo's store and the reference for unit tests.

It keeps everything in this process (nothing is written to disk: a token must not
land in a temporary file). Instances built by the registry share one process-wide
store, so a CLI run and the demo's rotation see the same records.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from providers.base import ProviderOption, Stage, StoredRecord
from rotator.errors import StoreConflictError
from rotator.tokens import EnrollToken, utcnow


@dataclass
class _TenantHistory:
    versions: dict[int, StoredRecord] = field(default_factory=dict)
    retired: set[int] = field(default_factory=set)
    current: int | None = None
    pending: int | None = None
    by_rotation: dict[str, int] = field(default_factory=dict)


class MemoryStore:
    """The state behind :class:`MemoryProvider`; one per process by default."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tenants: dict[str, _TenantHistory] = {}


_PROCESS_STORE = MemoryStore()


class MemoryProvider:
    name: ClassVar[str] = "memory"
    summary: ClassVar[str] = "in-process store for the demo and tests (forgets on exit)"
    extra: ClassVar[str | None] = None
    sdk_modules: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[ProviderOption, ...]] = ()

    def __init__(self, *, store: MemoryStore | None = None) -> None:
        self._store = store or _PROCESS_STORE

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> MemoryProvider:
        return cls()

    def location(self, *, tenant: str) -> str:
        return f"memory:{tenant}"

    def _history(self, tenant: str) -> _TenantHistory:
        return self._store.tenants.setdefault(tenant, _TenantHistory())

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        with self._store.lock:
            history = self._history(tenant)
            if rotation_id in history.by_rotation:
                number = history.by_rotation[rotation_id]
                existing = history.versions[number]
                if existing.token.value != token.value:
                    raise StoreConflictError(
                        f"rotation {rotation_id} already stored a different token",
                        fix="start a new rotation (a new rotation id)",
                    )
                history.pending = number if history.current != number else history.pending
                return _at(existing, Stage.PENDING)
            number = max(history.versions, default=0) + 1
            record = StoredRecord(
                token=token,
                rotation_id=rotation_id,
                version=str(number),
                stage=Stage.PENDING,
                stored_at=utcnow(),
            )
            history.versions[number] = record
            history.by_rotation[rotation_id] = number
            history.pending = number
            return record

    def promote(self, *, tenant: str, version: str) -> None:
        with self._store.lock:
            history = self._history(tenant)
            number = int(version)
            if number not in history.versions or number in history.retired:
                raise StoreConflictError(
                    f"{self.location(tenant=tenant)} has no version {version} to promote"
                )
            history.current = number
            if history.pending is not None and history.pending <= number:
                history.pending = None

    def check(self, *, tenant: str) -> None:
        """Nothing to reach: the store lives in this process."""

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        with self._store.lock:
            history = self._store.tenants.get(tenant)
            if history is None:
                return None
            number = history.current if stage is Stage.CURRENT else history.pending
            if number is None:
                return None
            return _at(history.versions[number], stage)

    def prune(self, *, tenant: str, keep: int) -> int:
        with self._store.lock:
            history = self._store.tenants.get(tenant)
            if history is None:
                return 0
            protected = {history.current, history.pending}
            live = sorted(n for n in history.versions if n not in history.retired)
            retired = 0
            for number in live[: max(len(live) - keep, 0)]:
                if number not in protected:
                    history.retired.add(number)
                    retired += 1
            return retired


def _at(record: StoredRecord, stage: Stage) -> StoredRecord:
    return StoredRecord(
        token=record.token,
        rotation_id=record.rotation_id,
        version=record.version,
        stage=stage,
        stored_at=record.stored_at,
    )
