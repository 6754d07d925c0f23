"""The rotation lock: one ``coordination.k8s.io/v1`` Lease per Secret."""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    ConfigError,
    LgRotateError,
    LockError,
)
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SECRET_NAME,
    FIELD_MANAGER,
    LEASE_PATH,
    LEASES_PATH,
    MANAGED_BY_LABEL,
    MAX_CONFLICTS,
    MERGE_PATCH,
    ApiOp,
    KubernetesConflictError,
    KubernetesNotFoundError,
    api_request,
    check_name,
    micro_time,
    optional_timestamp,
)
from rotator.tokens import (
    format_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger("lg_rotate.kube")

LEASE_PREFIX = "lg-rotate-"
DEFAULT_LEASE_DURATION = 60.0
# A holder renews every third of its lease duration, and at least this often, so that a
# rotation finding the lock held can tell a running holder from a crashed one quickly.
MAX_RENEW_INTERVAL = 5.0
# The interval a holder renews at, written on the Lease when it takes it (older lg-rotate
# releases did not write it: they renewed every third of leaseDurationSeconds).
RENEW_INTERVAL_ANNOTATION = "linuxguard.io/lock-renew-seconds"
# A holder is judged to have stopped renewing when it has been silent for its renew
# interval plus this much again (at least STALE_GRACE_MIN seconds): API latency on a busy
# cluster delays a renewal, it does not skip one.
STALE_GRACE_MIN = 2.0


def renew_interval_for(duration_seconds: float) -> float:
    """How often a holder renews a Lease of this duration: a third of it, at most 5 s."""
    return min(duration_seconds / 3, MAX_RENEW_INTERVAL)


def stale_after(renew_interval: float) -> float:
    """Seconds without a renewal after which a holder counts as stopped (crashed, killed)."""
    return renew_interval + max(STALE_GRACE_MIN, renew_interval)


# --- the Lease lock --------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LeaseHolder:
    """Who holds a Lease, as read from it."""

    identity: str
    acquired_at: datetime | None
    renewed_at: datetime | None
    duration: timedelta
    # The interval the holder said it renews at (RENEW_INTERVAL_ANNOTATION), if it did.
    renew_every: float | None = field(default=None, compare=False)

    @property
    def expires_at(self) -> datetime:
        """When the lock lapses unless renewed (``renewTime + leaseDurationSeconds``)."""
        base = self.renewed_at or self.acquired_at or datetime.min.replace(tzinfo=UTC)
        return base + self.duration

    @property
    def last_sign_of_life(self) -> datetime | None:
        """The holder's last ``renewTime`` (or ``acquireTime``), on the holder's clock."""
        return self.renewed_at or self.acquired_at

    @property
    def renew_interval(self) -> float:
        """Seconds between the holder's renewals (a third of the duration when unannounced)."""
        if self.renew_every is not None and self.renew_every > 0:
            return self.renew_every
        return self.duration.total_seconds() / 3


@dataclass(kw_only=True)
class _HolderWatch:
    """What :meth:`LeaseLock.acquire` saw of one holder while it waited."""

    identity: str
    renewed_at: datetime | None  # the last renewTime read
    seen_renewing_at: datetime | None = None  # our clock, when renewTime last moved
    announced_stale: bool = False  # the "stopped renewing" warning was logged
    announced_wait: bool = False  # the "running; waiting" line was logged (--lock-wait)

    def silent_for(self, holder: LeaseHolder, now: datetime) -> float:
        """Seconds since the holder last renewed, as best known."""
        if self.seen_renewing_at is not None:  # seen on our own clock: no skew
            return (now - self.seen_renewing_at).total_seconds()
        last = holder.last_sign_of_life
        return 0.0 if last is None else (now - last).total_seconds()


def default_identity() -> str:
    """``<hostname>-<pid>-<random>``: unique per process, readable in ``kubectl get lease``."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def lease_name_for(secret_name: str) -> str:
    """``lg-rotate-<secret>``, shortened with a hash suffix if it would exceed 253 chars."""
    name = LEASE_PREFIX + secret_name
    if len(name) <= 253:
        return name
    digest = uuid.uuid5(uuid.NAMESPACE_DNS, secret_name).hex[:10]
    return f"{name[: 253 - 11].rstrip('.-')}-{digest}"


class LeaseLock:
    """A lock per Secret, so two rotations never deliver to the same Secret at once.

    **What it is.** A ``coordination.k8s.io/v1`` Lease named ``lg-rotate-<secret name>``
    in the Secret's namespace (``kubectl get lease -n NS lg-rotate-linuxguard-enroll``).
    Its ``spec.holderIdentity`` names the holder (``<hostname>-<pid>-<random>``: in a
    CronJob pod, the pod name), ``spec.renewTime`` says when the holder last proved it is
    alive, ``spec.leaseDurationSeconds`` (default 60) how long that proof lasts, and
    ``spec.acquireTime`` / ``spec.leaseTransitions`` when it changed hands and how often.

    **Acquiring.** lg-rotate reads the Lease. If it does not exist, lg-rotate creates it
    holding itself (a concurrent creator makes one of the two get 409 and re-read). If it
    exists and is free (no holder), expired (``renewTime + leaseDurationSeconds`` is in
    the past) or already ours, lg-rotate patches itself in, carrying the
    ``resourceVersion`` it read: the API server answers 409 if anyone else changed the
    Lease meanwhile, and lg-rotate re-reads instead of overwriting.

    **A held lock: running or crashed?** Otherwise someone else holds an unexpired Lease,
    and lg-rotate polls it (every ``poll_interval``) to tell a running holder from one
    that died without releasing (SIGKILL, OOM, node drain):

    * the holder *renews* (``renewTime`` moves while lg-rotate watches): it is running.
      lg-rotate fails with exit code 7 (LockError) naming the holder, as soon as it has
      seen the renewal, so within one renew interval; with ``wait`` (``--lock-wait
      SECONDS``) it keeps polling until the holder releases, or the wait runs out;
    * the holder has *stopped renewing*: ``renewTime`` is older than its renew interval
      plus as much again (:func:`stale_after`; at least 2 s more), whether it was that old
      at the first look or stopped moving while lg-rotate watched. lg-rotate logs one
      warning (who holds it, since when it has not renewed, how long it waits) and waits
      for the Lease to lapse, at most ``leaseDurationSeconds`` after that last renewal,
      then takes it over. A retry after a crash thus succeeds without flags. If the holder
      renews after all, it is running (above);
    * the holder releases meanwhile: lg-rotate takes the lock.

    The renew interval is the one the holder wrote on the Lease when it took it
    (annotation ``linuxguard.io/lock-renew-seconds``: a third of its duration, at most
    5 s, :func:`renew_interval_for`), else a third of ``leaseDurationSeconds`` (the
    cadence of releases that did not write it).

    **Holding.** While the lock is held, a background thread renews it every renew
    interval (``renewTime`` = now), so long operations (a rollout wait) keep it. If a
    renewal finds someone else holding the Lease, the lock is *lost*: this is logged as an
    error and :meth:`ensure_held` raises LockError from then on.

    **Releasing.** On leaving the ``with lock.hold():`` block, normally or by an exception,
    lg-rotate clears ``holderIdentity`` (only if it still holds the Lease), so the next
    rotation need not wait for the expiry. The Lease object itself stays. If lg-rotate
    dies without releasing (SIGKILL, node loss), the lock expires ``leaseDurationSeconds``
    after its last renewal; the next rotation waits for that (see above) and takes it over.

    **Caveat.** Expiry is judged with the local clock against the holder's ``renewTime``:
    keep node clocks in sync (NTP), as for any Kubernetes lease. (A renewal seen while
    polling is judged on the local clock alone, so skew never makes a running holder look
    crashed for longer than one poll.)

    RBAC: ``get``, ``create`` and ``patch`` on ``leases`` (``coordination.k8s.io``) in the
    Secret's namespace (``patch`` may be scoped with ``resourceNames``).
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        secret_name: str = DEFAULT_SECRET_NAME,
        duration: float = DEFAULT_LEASE_DURATION,
        wait: float = 0.0,
        poll_interval: float = 1.0,
        identity: str | None = None,
        renew: bool = True,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], None] = time.sleep,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if duration < 1:
            raise ConfigError(
                f"the lock duration must be at least 1 second, not {duration:g}",
                fix="pass --lock-duration SECONDS (default 60)",
            )
        if wait < 0:
            raise ConfigError(f"the lock wait cannot be negative ({wait:g})", fix="pass 0 or more")
        self.api_client = api_client
        self.namespace = check_name(namespace, what="the namespace", label=True)
        self.secret_name = check_name(secret_name, what="the Secret name")
        self.name = lease_name_for(secret_name)
        self.duration_seconds = max(1, round(duration))
        self.renew_interval = renew_interval_for(self.duration_seconds)
        self.wait = wait
        self.poll_interval = max(poll_interval, 0.01)
        self.identity = identity or default_identity()
        self.renew_in_background = renew
        self.clock = clock
        self.sleep = sleep
        self.request_timeout = request_timeout
        self._lost = threading.Event()
        self._stop_renewing = threading.Event()
        self._renewer: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LeaseLock({self.namespace}/{self.name}, identity={self.identity!r})"

    # --- API plumbing ---

    def _op(self, verb: str) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Lease",
            resource="leases",
            group="coordination.k8s.io",
            namespace=self.namespace,
            name=None if verb == "create" else self.name,
            writes=False,
        )

    def _read(self) -> dict[str, Any] | None:
        try:
            lease: dict[str, Any] = api_request(
                self.api_client, self._op("get"), "GET", LEASE_PATH, timeout=self.request_timeout
            )
        except KubernetesNotFoundError:
            return None
        return lease

    def _patch(
        self,
        lease: Mapping[str, Any],
        spec: Mapping[str, Any],
        *,
        annotations: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        version = (lease.get("metadata") or {}).get("resourceVersion")
        body: dict[str, Any] = {"spec": dict(spec)}
        metadata: dict[str, Any] = {}
        if version:
            metadata["resourceVersion"] = version
        if annotations:
            metadata["annotations"] = dict(annotations)
        if metadata:
            body["metadata"] = metadata
        result: dict[str, Any] = api_request(
            self.api_client,
            self._op("patch"),
            "PATCH",
            LEASE_PATH,
            query={"fieldManager": FIELD_MANAGER},
            body=body,
            content_type=MERGE_PATCH,
            timeout=self.request_timeout,
        )
        return result

    def _holder(self, lease: Mapping[str, Any]) -> LeaseHolder | None:
        spec = lease.get("spec") or {}
        identity = spec.get("holderIdentity")
        if not identity:
            return None
        seconds = spec.get("leaseDurationSeconds") or self.duration_seconds
        annotations = (lease.get("metadata") or {}).get("annotations") or {}
        return LeaseHolder(
            identity=str(identity),
            acquired_at=optional_timestamp(spec.get("acquireTime"), what="Lease acquireTime"),
            renewed_at=optional_timestamp(spec.get("renewTime"), what="Lease renewTime"),
            duration=timedelta(seconds=int(seconds)),
            renew_every=_seconds(annotations.get(RENEW_INTERVAL_ANNOTATION)),
        )

    def _announcement(self) -> dict[str, str]:
        """The annotation a new holder writes: how often it renews."""
        return {RENEW_INTERVAL_ANNOTATION: f"{self.renew_interval:g}"}

    # --- public ---

    def read_holder(self) -> LeaseHolder | None:
        """The current holder (live or expired), or None if the lock is free or absent."""
        lease = self._read()
        return None if lease is None else self._holder(lease)

    @property
    def lost(self) -> bool:
        """True once a renewal found that someone else took the Lease over."""
        return self._lost.is_set()

    def ensure_held(self) -> None:
        """Raise LockError if the lock was lost while held (call before irreversible steps)."""
        if self._lost.is_set():
            raise LockError(
                f"lost the lock on Secret {self.namespace}/{self.secret_name}: Lease "
                f"{self.namespace}/{self.name} was taken over",
                fix="a renewal was missed for longer than --lock-duration; raise it, or check "
                "the API server's latency",
            )

    def try_acquire(self) -> LeaseHolder | None:
        """One attempt: None when the lock is ours now, else the live holder."""
        for _ in range(MAX_CONFLICTS):
            lease = self._read()
            now = self.clock()
            spec = {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": self.duration_seconds,
                "acquireTime": micro_time(now),
                "renewTime": micro_time(now),
            }
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                        "annotations": self._announcement(),
                    },
                    "spec": {**spec, "leaseTransitions": 0},
                }
                try:
                    api_request(
                        self.api_client,
                        self._op("create"),
                        "POST",
                        LEASES_PATH,
                        query={"fieldManager": FIELD_MANAGER},
                        body=body,
                        timeout=self.request_timeout,
                    )
                except KubernetesConflictError:
                    continue  # created by someone else meanwhile: look at it
                return None
            holder = self._holder(lease)
            if holder is not None and holder.identity != self.identity and holder.expires_at >= now:
                return holder
            transitions = int((lease.get("spec") or {}).get("leaseTransitions") or 0)
            if holder is None or holder.identity != self.identity:
                transitions += 1
            try:
                self._patch(
                    lease,
                    {**spec, "leaseTransitions": transitions},
                    annotations=self._announcement(),
                )
            except (KubernetesConflictError, KubernetesNotFoundError):
                continue  # changed or deleted meanwhile: look again
            if holder is not None and holder.identity != self.identity:
                logger.warning(
                    "took over the expired lock Lease %s/%s from %s (expired %s)",
                    self.namespace,
                    self.name,
                    holder.identity,
                    format_timestamp(holder.expires_at),
                )
            return None
        raise LockError(
            f"Lease {self.namespace}/{self.name} kept changing while lg-rotate tried to take it",
            fix="several rotations are starting at once; retry, or pass --lock-wait SECONDS",
        )

    def acquire(self) -> None:
        """Take the lock; wait out a holder that stopped renewing; else LockError.

        See the class docstring ("A held lock: running or crashed?"): a running holder
        (seen renewing) gives LockError once ``wait`` seconds have passed (at once by
        default); a holder that stopped renewing is waited for until its Lease lapses.
        """
        deadline = self.clock() + timedelta(seconds=self.wait)
        watch: _HolderWatch | None = None
        while True:
            holder = self.try_acquire()
            if holder is None:
                self._lost.clear()
                logger.info(
                    "holding lock Lease %s/%s as %s", self.namespace, self.name, self.identity
                )
                return
            now = self.clock()
            if watch is None or watch.identity != holder.identity:
                watch = _HolderWatch(identity=holder.identity, renewed_at=holder.renewed_at)
                logger.debug(
                    "lock Lease %s/%s is held by %s (last renewed %s, renews every %gs): "
                    "watching whether it renews",
                    self.namespace,
                    self.name,
                    holder.identity,
                    _when(holder.last_sign_of_life),
                    holder.renew_interval,
                )
            elif holder.renewed_at != watch.renewed_at:
                watch.renewed_at = holder.renewed_at
                watch.seen_renewing_at = now
                if watch.announced_stale:
                    logger.warning(
                        "%s renewed lock Lease %s/%s after all: it is running",
                        holder.identity,
                        self.namespace,
                        self.name,
                    )
                    watch.announced_stale = False
            until_expiry = max((holder.expires_at - now).total_seconds(), 0.0)
            silent = watch.silent_for(holder, now)
            stale = silent > stale_after(holder.renew_interval)
            running = watch.seen_renewing_at is not None and not stale
            pause = min(self.poll_interval, until_expiry + 0.01)
            if stale and not watch.announced_stale:
                watch.announced_stale = True
                logger.warning(
                    "lock Lease %s/%s is held by %s, which has not renewed it since %s (%.0fs "
                    "ago; a running holder renews every %gs): it looks crashed, waiting up to "
                    "%.0fs (until %s) for its lease to lapse, then taking the lock over",
                    self.namespace,
                    self.name,
                    holder.identity,
                    _when(holder.last_sign_of_life),
                    silent,
                    holder.renew_interval,
                    until_expiry,
                    format_timestamp(holder.expires_at),
                )
            elif running:
                remaining = (deadline - now).total_seconds()
                if remaining <= 0:
                    raise self._held_by(holder)
                pause = min(pause, remaining)
                if not watch.announced_wait:  # once per holder, not once per poll
                    watch.announced_wait = True
                    logger.info(
                        "lock Lease %s/%s is held by %s, which is running; waiting (up to "
                        "%.0fs more)",
                        self.namespace,
                        self.name,
                        holder.identity,
                        remaining,
                    )
            self.sleep(max(pause, 0.0))

    def _held_by(self, holder: LeaseHolder) -> LockError:
        waited = f" after waiting {self.wait:g}s" if self.wait else ""
        return LockError(
            f"Secret {self.namespace}/{self.secret_name} is locked by {holder.identity}"
            f"{waited}, which is running (it renewed Lease {self.namespace}/{self.name} at "
            f"{_when(holder.renewed_at)}; it expires {format_timestamp(holder.expires_at)} "
            "unless renewed)",
            fix="another rotation is running: let it finish, or pass --lock-wait SECONDS to "
            "wait for it",
        )

    def renew(self) -> None:
        """Refresh ``renewTime``; LockError if someone else holds the Lease now."""
        for _ in range(MAX_CONFLICTS):
            lease = self._read()
            holder = None if lease is None else self._holder(lease)
            if lease is None or holder is None or holder.identity != self.identity:
                self._lost.set()
                other = holder.identity if holder else "nobody"
                raise LockError(
                    f"lost the lock Lease {self.namespace}/{self.name}: it is now held by {other}",
                    fix="a renewal was missed for longer than --lock-duration; raise it",
                )
            try:
                self._patch(lease, {"renewTime": micro_time(self.clock())})
            except KubernetesConflictError:
                continue
            return
        raise LockError(
            f"Lease {self.namespace}/{self.name} kept changing while lg-rotate renewed it",
            fix="another process is writing this Lease; check for a second lg-rotate",
        )

    def release(self) -> bool:
        """Clear the holder if it is still us; True if released. The Lease object stays."""
        for _ in range(MAX_CONFLICTS):
            lease = self._read()
            holder = None if lease is None else self._holder(lease)
            if lease is None or holder is None or holder.identity != self.identity:
                logger.warning(
                    "not releasing lock Lease %s/%s: it is held by %s, not by us",
                    self.namespace,
                    self.name,
                    holder.identity if holder else "nobody",
                )
                return False
            try:
                self._patch(lease, {"holderIdentity": None, "renewTime": micro_time(self.clock())})
            except KubernetesConflictError:
                continue
            logger.info("released lock Lease %s/%s", self.namespace, self.name)
            return True
        logger.warning(
            "could not release lock Lease %s/%s: it kept changing", self.namespace, self.name
        )
        return False

    def _renew_forever(self) -> None:
        interval = self.renew_interval
        while not self._stop_renewing.wait(interval):
            try:
                self.renew()
            except LockError as exc:
                logger.error("%s", exc.one_line())
                return
            except LgRotateError as exc:  # transient: the next renewal may work
                logger.warning(
                    "could not renew lock Lease %s/%s: %s",
                    self.namespace,
                    self.name,
                    exc.one_line(),
                )

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the ``with`` block (renewed in the background); always release."""
        self.acquire()
        if self.renew_in_background:
            self._stop_renewing.clear()
            self._renewer = threading.Thread(
                target=self._renew_forever, name=f"lease-renew-{self.name}", daemon=True
            )
            self._renewer.start()
        try:
            yield
        finally:
            self._stop_renewing.set()
            if self._renewer is not None:
                self._renewer.join(timeout=self.request_timeout + 5)
                self._renewer = None
            try:
                self.release()
            except LgRotateError as exc:
                logger.warning(
                    "could not release lock Lease %s/%s (it lapses by itself in %ds): %s",
                    self.namespace,
                    self.name,
                    self.duration_seconds,
                    exc.one_line(),
                )


def compete(
    lease: LeaseLock,
    *,
    stop: threading.Event,
    lead: Callable[[threading.Event], None],
    retry_period: float,
    what: str,
    log: logging.Logger = logger,
    on_attempt: Callable[[], None] | None = None,
) -> None:
    """Leader election, until ``stop``: take ``lease`` when it is free and ``lead(stop)`` while
    holding it (``lead`` renews, and returns when it loses or stops); otherwise stand by and
    try again every ``retry_period``. ``watch``'s controller and the webhook's certificate
    keeper both run this loop; ``what`` names the duty in the logs (``log``, the caller's),
    ``on_attempt`` runs before every attempt (the controller's liveness beat)."""
    last_holder: str | None = None
    while not stop.is_set():
        if on_attempt is not None:
            on_attempt()
        try:
            holder = lease.try_acquire()
        except LgRotateError as exc:
            log.warning("%s: leader election failed: %s", what, exc.one_line())
            stop.wait(retry_period)
            continue
        if holder is None:
            last_holder = None
            lead(stop)
            continue
        if holder.identity != last_holder:
            log.info(
                "%s: standing by, %s leads (Lease %s/%s)",
                what,
                holder.identity,
                lease.namespace,
                lease.name,
            )
            last_holder = holder.identity
        stop.wait(retry_period)


def _when(value: datetime | None) -> str:
    return format_timestamp(value) if value is not None else "never"


def _seconds(text: object) -> float | None:
    """A positive number of seconds from an annotation, or None."""
    try:
        value = float(str(text))
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None
