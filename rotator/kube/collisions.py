"""Which token each container start may have read, and which starts collided.

The reasoning is in :mod:`rotator.kube.controller`'s docstring (attribution, collisions).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

from rotator.errors import (
    ConfigError,
)
from rotator.kube.pods import ContainerView, PodStart, PodView

if TYPE_CHECKING:
    pass

log = logging.getLogger("lg_rotate.controller")

# The token the Secret held before the first one the timeline knows (a label, not a secret).
UNKNOWN_TOKEN = "unknown"  # noqa: S105
_HISTORY = timedelta(minutes=15)
_MAX_STARTS = 5000


# --- the token timeline ----------------------------------------------------------------


@dataclass(kw_only=True)
class TimelineEntry:
    """One token the Secret held; it switched to it at some instant in [earliest, latest]."""

    fingerprint: str
    earliest: datetime
    latest: datetime
    origin: str  # "controller" (our rotation) or "observed" (read from the Secret)
    rotation_id: str | None = None
    expires_at: datetime | None = None
    rotated_at: datetime | None = None


class TokenTimeline:
    """The tokens the Secret held, in order, with how precisely each switch is known."""

    def __init__(self, *, keep: timedelta = timedelta(hours=1), max_entries: int = 2000) -> None:
        self.keep = keep
        self.max_entries = max_entries
        self._entries: list[TimelineEntry] = []
        self.version = 0  # bumped on every change (candidate caches key on it)

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[TimelineEntry]:
        return list(self._entries)

    @property
    def current(self) -> TimelineEntry | None:
        return self._entries[-1] if self._entries else None

    def fingerprints(self) -> set[str]:
        return {entry.fingerprint for entry in self._entries}

    def observe(
        self,
        *,
        fingerprint: str,
        earliest: datetime,
        latest: datetime,
        origin: str,
        rotation_id: str | None = None,
        expires_at: datetime | None = None,
        rotated_at: datetime | None = None,
    ) -> bool:
        """Record that the Secret switched to ``fingerprint`` within [earliest, latest].

        A token already current narrows its interval (both bounds hold, so their
        intersection does); an older token is a stale read and is ignored. Returns True
        when a new entry was added.
        """
        earliest = min(earliest, latest)
        current = self.current
        self.version += 1
        if current is not None and current.fingerprint == fingerprint:
            low, high = max(current.earliest, earliest), min(current.latest, latest)
            if low <= high:  # inconsistent bounds (clock trouble): keep what we had
                current.earliest, current.latest = low, high
            if origin == "controller":
                current.origin = origin
            current.rotation_id = current.rotation_id or rotation_id
            current.expires_at = current.expires_at or expires_at
            current.rotated_at = current.rotated_at or rotated_at
            return False
        if any(entry.fingerprint == fingerprint for entry in self._entries):
            return False
        if current is not None:  # the Secret moves forward: a switch is after the previous one
            earliest = max(earliest, current.earliest)
            latest = max(latest, earliest)
        self._entries.append(
            TimelineEntry(
                fingerprint=fingerprint,
                earliest=earliest,
                latest=latest,
                origin=origin,
                rotation_id=rotation_id,
                expires_at=expires_at,
                rotated_at=rotated_at,
            )
        )
        return True

    def candidates(self, *, earliest: datetime | None, latest: datetime) -> frozenset[str]:
        """The tokens the Secret may have held at some instant in [earliest, latest].

        ``UNKNOWN_TOKEN`` stands for whatever it held before the first known entry.
        ``earliest=None`` reaches back without bound.
        """
        entries = self._entries
        found: set[str] = set()
        if not entries or earliest is None or earliest <= entries[0].latest:
            found.add(UNKNOWN_TOKEN)
        for index, entry in enumerate(entries):
            if entry.earliest > latest:
                break
            replaced_by = entries[index + 1].latest if index + 1 < len(entries) else None
            if replaced_by is None or earliest is None or replaced_by >= earliest:
                found.add(entry.fingerprint)
        return frozenset(found)

    def arrived(self, fingerprints: frozenset[str]) -> datetime | None:
        """The earliest instant any of these tokens may have been in the Secret (None:
        unbounded, for ``UNKNOWN_TOKEN``)."""
        if UNKNOWN_TOKEN in fingerprints:
            return None
        times = [e.earliest for e in self._entries if e.fingerprint in fingerprints]
        return min(times) if times else None

    def prune(self, *, now: datetime) -> None:
        """Forget entries replaced longer than ``keep`` ago (the current one always stays)."""
        cutoff = now - self.keep
        keep_from = 0
        for index in range(len(self._entries) - 1):
            if self._entries[index + 1].latest < cutoff:
                keep_from = index + 1
        keep_from = max(keep_from, len(self._entries) - self.max_entries)
        if keep_from:
            del self._entries[:keep_from]
            self.version += 1


# --- the deletion rate limit -----------------------------------------------------------


class TokenBucket:
    """At most ``rate`` actions per ``per`` seconds, in bursts of at most ``capacity``."""

    def __init__(
        self,
        *,
        rate: float,
        per: float = 60.0,
        capacity: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or per <= 0:
            raise ConfigError(
                f"the deletion rate must be positive (got {rate:g} per {per:g}s)",
                fix="pass a positive number of deletions per minute",
            )
        self.refill_per_second = rate / per
        self.capacity = float(capacity if capacity is not None else max(1.0, rate))
        if self.capacity < 1:
            raise ConfigError("the deletion burst must be at least 1", fix="pass 1 or more")
        self._monotonic = monotonic
        self._tokens = self.capacity
        self._stamp = monotonic()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._monotonic()
        elapsed = max(0.0, now - self._stamp)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.refill_per_second)
        self._stamp = now

    def try_take(self) -> bool:
        with self._lock:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            return False

    def wait_time(self) -> float:
        """Seconds until the next action is allowed (0 if it is now)."""
        with self._lock:
            self._refill()
            missing = 1 - self._tokens
            return 0.0 if missing <= 0 else missing / self.refill_per_second

    @property
    def available(self) -> float:
        with self._lock:
            self._refill()
            return self._tokens


# --- collisions ------------------------------------------------------------------------


class Verdict(StrEnum):
    WAIT = "wait"  # not decided yet
    GONE = "gone"  # the pod or container went away
    RESTARTED = "restarted"  # the container started again (it read the Secret again)
    ENROLLED = "enrolled"  # Ready: it holds the token
    VICTIM = "victim"  # delete its pod so it comes back with a fresh token


@dataclass(kw_only=True)
class Suspect:
    start: PodStart
    partners: set[tuple[str, str, str]] = field(default_factory=set)
    certain: set[tuple[str, str, str]] = field(default_factory=set)
    due: float = 0.0  # monotonic
    rounds: int = 0
    reason: str = ""


@dataclass(frozen=True, kw_only=True)
class CollisionRecord:
    """A confirmed collision and how it was (or is being) recovered."""

    pod_uid: str
    pod_name: str
    node: str | None
    container: str
    key: str
    started_at: datetime | None
    certain: bool
    action: str  # "delete" or "restart"
    reason: str


class CollisionTracker:
    """Finds starts that may have shared a token and judges them (see the module doc)."""

    def __init__(
        self,
        *,
        tolerance: timedelta,
        grace: float,
        history: timedelta = _HISTORY,
        max_starts: int = _MAX_STARTS,
    ) -> None:
        self.tolerance = tolerance
        self.grace = grace
        self.history = history
        self._starts: collections.OrderedDict[tuple[str, str, str], PodStart] = (
            collections.OrderedDict()
        )
        self.max_starts = max_starts
        self.suspects: dict[tuple[str, str, str], Suspect] = {}
        self.judged: set[tuple[str, str, str]] = set()  # decided: never suspected again
        self._cache: dict[tuple[str, str, str], tuple[int, frozenset[str]]] = {}

    def __len__(self) -> int:
        return len(self._starts)

    def start(self, ident: tuple[str, str, str]) -> PodStart | None:
        return self._starts.get(ident)

    def candidates(self, start: PodStart, timeline: TokenTimeline) -> frozenset[str]:
        cached = self._cache.get(start.ident)
        if cached is not None and cached[0] == timeline.version:
            return cached[1]
        earliest, latest = start.window(self.tolerance)
        found = timeline.candidates(earliest=earliest, latest=latest)
        self._cache[start.ident] = (timeline.version, found)
        return found

    def add(self, start: PodStart, timeline: TokenTimeline, *, now: float) -> list[PodStart]:
        """Record a start; return the earlier starts of other pods it may share a token with."""
        mine = self.candidates(start, timeline)
        since = timeline.arrived(mine)
        partners: list[PodStart] = []
        for other in reversed(self._starts.values()):  # the most recent first
            if since is not None and other.observed_at < since:
                break  # seen before any of my tokens was in the Secret: nor are the older
            if other.pod_uid == start.pod_uid:
                continue  # the same workload identity replays its enrolment
            if mine & self.candidates(other, timeline):
                partners.append(other)
        partners.reverse()
        self._starts[start.ident] = start
        while len(self._starts) > self.max_starts:
            ident, _ = self._starts.popitem(last=False)
            self._cache.pop(ident, None)
        certain_token = len(mine) == 1 and UNKNOWN_TOKEN not in mine
        for other in partners:
            certain = certain_token and self.candidates(other, timeline) == mine
            for member, partner in ((start, other), (other, start)):
                if member.historical or member.ident in self.judged:
                    continue  # ran before this controller looked, or decided: only a partner
                suspect = self.suspects.get(member.ident)
                if suspect is None:
                    suspect = Suspect(start=member, due=now + self.grace)
                    self.suspects[member.ident] = suspect
                suspect.partners.add(partner.ident)
                if certain:
                    suspect.certain.add(partner.ident)
        return partners

    def prune(self, *, now: datetime) -> None:
        cutoff = now - self.history
        for ident in [i for i, s in self._starts.items() if s.observed_at < cutoff]:
            if ident not in self.suspects:
                del self._starts[ident]
                self.judged.discard(ident)
                self._cache.pop(ident, None)

    def judge(  # noqa: PLR0911 - one verdict per rule, in the documented order
        self, suspect: Suspect, pods: Mapping[str, PodView], *, now: float
    ) -> Verdict:
        """Decide about one suspect start (the rules are in the module docstring)."""
        start = suspect.start
        container = self._container(start, pods)
        if container is None:
            return Verdict.GONE
        if container.latest_key != start.key:
            return Verdict.RESTARTED
        if container.is_ready(start.key):
            earlier_certain = [
                other
                for ident in suspect.certain
                if (other := self._starts.get(ident)) is not None and other.order() < start.order()
            ]
            if not earlier_certain:
                return Verdict.ENROLLED
            if now < suspect.due:
                return Verdict.WAIT
            for other in earlier_certain:
                theirs = self._container(other, pods)
                if theirs is None or theirs.is_ready(other.key) or other.key in theirs.ready_keys:
                    suspect.reason = (
                        f"it reports Ready, but {other.describe()} started earlier under the "
                        "same token (the readiness probe does not show enrolment)"
                    )
                    return Verdict.VICTIM
            return Verdict.ENROLLED
        if now < suspect.due:
            return Verdict.WAIT
        group = [start] + [
            other for ident in suspect.partners if (other := self._present(ident, pods)) is not None
        ]
        anyone_ready = any(
            (view := self._container(other, pods)) is not None and view.is_ready(other.key)
            for other in group[1:]
        )
        earliest = min(group, key=PodStart.order)
        if earliest is start and not anyone_ready and suspect.rounds == 0:
            suspect.rounds += 1  # probably the owner, just slow: one more grace period
            suspect.due = now + self.grace
            return Verdict.WAIT
        suspect.reason = (
            f"not Ready {self.grace * (suspect.rounds + 1):g}s after starting under a token "
            "another pod may have read"
        )
        return Verdict.VICTIM

    def _container(self, start: PodStart, pods: Mapping[str, PodView]) -> ContainerView | None:
        pod = pods.get(start.pod_uid)
        return None if pod is None else pod.containers.get(start.container)

    def _present(self, ident: tuple[str, str, str], pods: Mapping[str, PodView]) -> PodStart | None:
        other = self._starts.get(ident)
        if other is None:
            return None
        view = self._container(other, pods)
        return other if view is not None and view.latest_key == other.key else None
