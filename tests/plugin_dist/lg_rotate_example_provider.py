"""A third-party provider as a plugin author would write it (docs/PROVIDERS.md).

It lives outside lg-rotate, registers itself in the ``lg_rotate.providers`` entry-point
group (see the .dist-info beside it) and depends only on the public interface:
``providers.base`` and the two leaves ``rotator.tokens`` / ``rotator.errors``. It keeps
its versions in a process-wide dictionary, with a ``namespace`` option to show how a
plugin declares settings (``--provider-option namespace=...`` / ``LG_ROTATE_NAMESPACE``...).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import ClassVar

from providers.base import ProviderOption, Stage, StoredRecord
from rotator.errors import StoreConflictError
from rotator.tokens import EnrollToken, utcnow

_LOCK = threading.Lock()
_VERSIONS: dict[str, list[StoredRecord | None]] = {}  # None: a pruned version
_STAGES: dict[str, dict[Stage, int]] = {}


class ExampleProvider:
    name: ClassVar[str] = "example"
    summary: ClassVar[str] = "example plugin (process-wide dictionary)"
    extra: ClassVar[str | None] = None
    sdk_modules: ClassVar[tuple[str, ...]] = ()
    options: ClassVar[tuple[ProviderOption, ...]] = (
        ProviderOption(name="example-prefix", help="key prefix", default="lg"),
    )

    def __init__(self, *, prefix: str = "lg") -> None:
        self.prefix = prefix

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> ExampleProvider:
        return cls(prefix=options.get("example_prefix") or "lg")

    def _key(self, tenant: str) -> str:
        return f"{self.prefix}/{tenant}"

    def location(self, *, tenant: str) -> str:
        return f"example:{self._key(tenant)}"

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        key = self._key(tenant)
        with _LOCK:
            versions = _VERSIONS.setdefault(key, [])
            for record in versions:
                if record is not None and record.rotation_id == rotation_id:
                    if record.token.value != token.value:
                        raise StoreConflictError(f"rotation {rotation_id} stored another token")
                    _STAGES.setdefault(key, {})[Stage.PENDING] = int(record.version)
                    return record
            record = StoredRecord(
                token=token,
                rotation_id=rotation_id,
                version=str(len(versions) + 1),
                stage=Stage.PENDING,
                stored_at=utcnow(),
            )
            versions.append(record)
            _STAGES.setdefault(key, {})[Stage.PENDING] = len(versions)
            return record

    def promote(self, *, tenant: str, version: str) -> None:
        key = self._key(tenant)
        with _LOCK:
            versions = _VERSIONS.get(key, [])
            if not 1 <= int(version) <= len(versions) or versions[int(version) - 1] is None:
                raise StoreConflictError(f"no version {version} to promote")
            stages = _STAGES.setdefault(key, {})
            stages[Stage.CURRENT] = int(version)
            if stages.get(Stage.PENDING, 0) <= int(version):
                stages.pop(Stage.PENDING, None)

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        key = self._key(tenant)
        with _LOCK:
            number = _STAGES.get(key, {}).get(stage)
            return None if number is None else _VERSIONS[key][number - 1]

    def prune(self, *, tenant: str, keep: int) -> int:
        key = self._key(tenant)
        with _LOCK:
            versions = _VERSIONS.get(key, [])
            protected = set(_STAGES.get(key, {}).values())
            live = [n for n, r in enumerate(versions, start=1) if r is not None]
            pruned = 0
            for number in live[: max(len(live) - keep, 0)]:
                if number not in protected:
                    versions[number - 1] = None
                    pruned += 1
            return pruned
