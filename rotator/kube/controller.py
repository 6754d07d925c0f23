"""Controller mode (``lg-rotate watch``): a fresh token for every agent container start.

The controller runs as a Deployment (one or more replicas) next to the agent DaemonSet.
docs/CONTROLLER.md is the operator's guide; this docstring is the map of the code.

**Leader election.** Replicas compete for a ``coordination.k8s.io/v1`` Lease named
``lg-rotate-controller-<secret>`` (:func:`controller_lease_name`), taken, renewed and
released with :class:`rotator.kube.LeaseLock`. Only the holder acts; the others retry
every ``lease_retry_period`` seconds and take over once the holder releases the Lease
(graceful shutdown) or stops renewing it for ``lease_duration`` seconds (a crash). A
leader that cannot renew for ``lease_duration`` seconds steps down by itself. Each
rotation still takes the per-Secret lock (``lg-rotate-<secret>``), so the CronJob, a
pipeline step or a shell never rotate at the same time as the controller.

**Watching.** While leading, a watcher thread lists the agent pods (label selector),
then watches them from the list's ``resourceVersion`` (bookmarks requested; a
``410 Gone`` or a broken connection means relist). From each pod's
``status.containerStatuses`` it derives the container *instances* that started
(``state.running``/``state.terminated`` and ``lastState.terminated``, identified by
``containerID``, else by ``startedAt``) and a growing ``restartCount`` (restarts it did
not see in between still count). Every new instance is a token consumption: the
container read the Secret when it started.

**Rotating.** A worker thread reacts to each batch of starts with one rotation
(:meth:`rotator.rotation.Rotator.rotate`), so the next start finds a fresh token. It also
rotates when the Secret is missing, and before the Secret's token expires: at
``expires_at - expiry_margin * TTL`` (default 20 % of the TTL, so a 600 s token is
replaced 120 s before it expires). Failures never stop the controller: they are
logged, counted, recorded as Events and retried with exponential backoff (jittered, at
most ``max_backoff`` seconds).

**Attributing starts to tokens** (:class:`TokenTimeline`). The controller keeps a
timeline of the tokens the Secret held: for each one, an interval in which the Secret
switched to it. Its own rotations give tight bounds (just before and just after the
Secret was patched, on the controller's clock); rotations by others (the CronJob, a
shell) are learnt from the Secret's annotations when it re-reads the Secret
(``rotated-at``, widened by ``start_tolerance``). A container start is known only to
the second (``startedAt``), on the kubelet's clock; the token it read is therefore one
of the tokens the Secret *may* have held during
``[startedAt - tolerance, min(startedAt + 1 s + tolerance, observed)]``, where
*observed* is when the controller saw the start (the container read the Secret before
its status said it had started). Those are the start's *candidate* tokens.

**Collisions** (:class:`CollisionTracker`). Two starts of different pods whose
candidate sets intersect *may* have read the same token (a *certain* collision when
both sets are the same single token). Starts of the same pod never collide: the pod's
UID is the workload identity, and the same workload replays its enrolment. A suspect
start is judged (:meth:`CollisionTracker.judge`) as soon as its container restarts
(the restart read the Secret again: recovered by restart), when its pod is gone, when it
is Ready (it enrolled), or after ``collision_grace`` seconds. A start that is still not
Ready then is a collision victim (the earliest start of its group gets one more grace
period when nobody in the group is Ready: it probably holds the token, it is only
slow). A Ready start is also a victim when an earlier start certainly read the same
token and is Ready too (the agent's readiness probe does not reflect enrolment, so
ordering decides). **Recovery**: the Secret is rotated first (a victim is never deleted
while the Secret may still hold a consumed token), then the victim's pod is deleted
(with its UID as precondition) so the DaemonSet recreates it with the fresh token.
Deletions are rate-limited by a token bucket (:class:`TokenBucket`).

**Per-pod Secrets** (the webhook mode, docs/PER-POD.md). A pod that carries
``linuxguard.io/enroll-secret`` reads a Secret of its own (made at admission by
:mod:`rotator.kube.webhook`): its starts consume nothing of the shared Secret and are left
out of the attribution above, except through containers that still reference the shared
Secret. A third thread of each term (:class:`rotator.kube.podsecret_keeper.PodSecretKeeper`)
adopts those Secrets (ownerReference to the pod, for garbage collection), refreshes the token
of a pod whose agent has not started before it expires, and deletes orphans. Without the RBAC
for it (the optional component cronjob/components/per-pod) it says so once and the rest of
the controller is unaffected.

**Observability.** ``/metrics`` (Prometheus, through ``prometheus_client``), ``/healthz``
and ``/readyz`` on one port (:mod:`rotator.metrics`, ``--metrics-bind-address``),
Kubernetes Events on the Secret (rotations, failures, collisions, leadership; fingerprints
only), and logs under ``lg_rotate.controller``.

**Shutdown.** Setting the ``stop`` event passed to :meth:`Controller.run` (the CLI does it
on SIGTERM/SIGINT, see :func:`install_signal_handlers`) stops the watch, lets a
rotation in progress finish, releases the leader Lease so a standby takes over at
once, and stops the HTTP server.

The ``kubernetes`` client is imported only inside the functions that call it.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    ConfigError,
    LgRotateError,
    LockError,
)
from rotator.kube.collisions import (
    UNKNOWN_TOKEN,
    CollisionRecord,
    CollisionTracker,
    Suspect,
    TimelineEntry,
    TokenBucket,
    TokenTimeline,
    Verdict,
)
from rotator.kube.events import read_secret_uid, record_event
from rotator.kube.lease import LeaseLock, compete, lease_name_for
from rotator.kube.pods import ContainerView, PodApi, PodStart, PodView, container_instances
from rotator.kube.podsecret_keeper import (
    ADOPTED,
    DELETED,
    FAILED,
    REFRESHED,
    PodSecretKeeper,
    PodTokenIssuer,
    shared_consumers,
)
from rotator.kube.podsecrets import ADOPTION_GRACE
from rotator.kube.secret import SecretTarget
from rotator.metrics import Counter, Gauge, Histogram, MetricsServer, Registry
from rotator.rotation import Action, RotationReport, Rotator, Step
from rotator.targets import TargetState
from rotator.tokens import format_timestamp, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("lg_rotate.controller")

CONTROLLER_LEASE_PREFIX = "controller-"
ONE_SECOND = timedelta(seconds=1)
# How long after its rotated-at annotation a delivery by someone else may have landed.
OBSERVED_DELIVERY_SLACK = timedelta(seconds=10)
_EVENT_QUEUE = 1000
_LOG_COLLISIONS = 1000


# --- metrics ---------------------------------------------------------------------------


class ControllerMetrics:
    """The controller's Prometheus metrics (names start with ``lg_rotate_``)."""

    def __init__(self, *, token_ttl: Callable[[], float | None]) -> None:
        self.registry = Registry()
        r = self.registry
        self.rotations = r.register(
            Counter(
                "lg_rotate_rotations_total",
                "Rotations run by the controller, by result (minted, resumed, promoted-only, "
                "failed).",
                ["result"],
                initial=[{"result": "minted"}, {"result": "failed"}],
            )
        )
        self.failures = r.register(
            Counter("lg_rotate_rotation_failures_total", "Rotations that failed (then retried).")
        )
        self.starts = r.register(
            Counter(
                "lg_rotate_pod_starts_total",
                "Agent container starts seen (each one consumes the Secret's token).",
            )
        )
        self.suspects = r.register(
            Counter(
                "lg_rotate_collision_suspects_total",
                "Starts that may have read a token another pod read too.",
            )
        )
        self.collisions = r.register(
            Counter(
                "lg_rotate_collisions_total",
                "Confirmed collisions: starts that did not enrol after sharing a token.",
            )
        )
        self.recoveries = r.register(
            Counter(
                "lg_rotate_recoveries_total",
                "Collisions recovered, by action (delete: pod deleted; restart: the container "
                "restarted with a fresh token by itself).",
                ["action"],
                initial=[{"action": "delete"}, {"action": "restart"}],
            )
        )
        self.throttled = r.register(
            Counter(
                "lg_rotate_deletions_throttled_total",
                "Recovery deletions delayed by the deletion rate limit.",
            )
        )
        self.events_dropped = r.register(
            Counter("lg_rotate_events_dropped_total", "Kubernetes Events not recorded.")
        )
        self.leader = r.register(
            Gauge("lg_rotate_controller_leader", "1 while this replica is the leader.")
        )
        self.leader.set(0)
        self.ttl = r.register(
            Gauge(
                "lg_rotate_token_ttl_seconds",
                "Seconds until the token in the Secret expires (as last seen).",
                collect=token_ttl,
            )
        )
        self.mint_latency = r.register(
            Histogram("lg_rotate_mint_latency_seconds", "Time to mint a token from LinuxGuard.")
        )
        self.rotation_duration = r.register(
            Histogram("lg_rotate_rotation_duration_seconds", "Time a whole rotation took.")
        )
        self.pod_secrets = r.register(
            Counter(
                "lg_rotate_pod_secrets_total",
                "Per-pod Secrets (webhook mode) handled, by action (adopted: ownerReference to "
                "its pod set; refreshed: token replaced before its pod started; deleted: "
                "orphaned; failed).",
                ["action"],
                initial=[{"action": a} for a in (ADOPTED, REFRESHED, DELETED, FAILED)],
            )
        )


# --- the controller --------------------------------------------------------------------


def controller_lease_name(secret_name: str) -> str:
    """``lg-rotate-controller-<secret>``: the leader-election Lease for one Secret."""
    return lease_name_for(CONTROLLER_LEASE_PREFIX + secret_name)


@dataclass(frozen=True, kw_only=True)
class ControllerStatus:
    """A snapshot for health answers, logs and tests."""

    running: bool
    leader: bool
    synced: bool
    identity: str
    pods: int
    pending_starts: int
    rotation_pending: bool
    suspects: int
    deletions_pending: int
    rotations: int
    failures: int
    collisions: int
    recoveries: int
    fingerprint: str | None  # the Secret's token, as the timeline knows it
    expires_at: datetime | None

    @property
    def idle(self) -> bool:
        """Nothing left to do: no start to process, rotation, suspect or deletion pending."""
        return (
            self.synced
            and not self.pending_starts
            and not self.rotation_pending
            and not self.suspects
            and not self.deletions_pending
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "running": self.running,
            "leader": self.leader,
            "synced": self.synced,
            "identity": self.identity,
            "pods": self.pods,
            "pendingStarts": self.pending_starts,
            "rotationPending": self.rotation_pending,
            "suspects": self.suspects,
            "deletionsPending": self.deletions_pending,
            "rotations": self.rotations,
            "failures": self.failures,
            "collisions": self.collisions,
            "recoveries": self.recoveries,
            "fingerprint": self.fingerprint[:12] if self.fingerprint else None,
            "expiresAt": format_timestamp(self.expires_at) if self.expires_at else None,
        }


@dataclass
class _Term:
    """One leadership term: its threads and the state they share (under ``cond``)."""

    started: datetime
    stop: threading.Event = field(default_factory=threading.Event)
    synced: threading.Event = field(default_factory=threading.Event)  # first pod list done
    secret_read: threading.Event = field(default_factory=threading.Event)  # and the Secret's
    threads: list[threading.Thread] = field(default_factory=list)

    def alive(self) -> bool:
        return all(thread.is_alive() for thread in self.threads)


class _StepTimer:
    """The ``on_step`` hook the controller puts on its Rotator: when did each step end."""

    def __init__(self, *, owner: Controller, previous: Callable[[Step], None] | None) -> None:
        self.owner = owner
        self.previous = previous

    def __call__(self, step: Step) -> None:
        self.owner._step_times[step] = self.owner.clock()
        self.owner._step_mono[step] = self.owner.monotonic()
        if self.previous is not None:
            self.previous(step)


@dataclass(frozen=True)
class _Victim:
    start: PodStart
    certain: bool
    reason: str


class Controller:
    """``lg-rotate watch``: see the module docstring and docs/CONTROLLER.md.

    ``rotator`` is a :class:`~rotator.rotation.Rotator` whose target is ``target`` (the
    controller sets its ``on_step`` hook to time mints and deliveries, keeping any hook
    already there), or a callable returning a fresh one for each rotation.
    ``metrics_port`` serves ``/metrics``, ``/healthz`` and ``/readyz`` (0: a free port,
    see :attr:`metrics_url`; None: no HTTP server).
    """

    def __init__(  # noqa: PLR0915 - settings, checked and stored
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        selector: str,
        rotator: Rotator | Callable[[], Rotator],
        target: SecretTarget,
        container: str | None = None,
        expiry_margin: float = 0.2,
        start_tolerance: float = 1.0,
        collision_grace: float = 20.0,
        deletions_per_minute: float = 6.0,
        deletion_burst: int = 3,
        lease_duration: float = 15.0,
        lease_renew_period: float | None = None,
        lease_retry_period: float = 2.0,
        identity: str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",  # noqa: S104 - scraped by Prometheus from other pods
        resync_seconds: float = 300.0,
        tick: float = 5.0,
        max_backoff: float = 60.0,
        events: bool = True,
        request_timeout: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
        pod_secrets: bool = True,
        adoption_grace: timedelta | float = ADOPTION_GRACE,
        pod_secret_resync: float = 30.0,
    ) -> None:
        if not selector or not selector.strip():
            raise ConfigError(
                "the controller needs a label selector for the agent pods",
                fix="pass --selector, e.g. app=linuxguard-agent (it deletes pods it selects)",
            )
        if not 0 <= expiry_margin < 1:
            raise ConfigError(
                f"the expiry margin must be a fraction of the TTL in [0, 1), not {expiry_margin}",
                fix="pass e.g. 0.2 to rotate when 20% of the token's lifetime is left",
            )
        if collision_grace <= 0 or tick <= 0 or lease_retry_period <= 0:
            raise ConfigError(
                "the collision grace, tick and lease retry period must be positive",
                fix="pass positive numbers of seconds",
            )
        if lease_duration < 2:
            raise ConfigError(
                f"the leader lease duration must be at least 2 seconds, not {lease_duration:g}",
                fix="pass --lease-duration 15 (the default)",
            )
        self.api_client = api_client
        self.namespace = namespace
        self.selector = selector.strip()
        self.target = target
        target.events = False  # the controller records a richer Rotated Event (why) itself
        self.container = container
        self.expiry_margin = expiry_margin
        self.tolerance = timedelta(seconds=max(0.0, start_tolerance))
        self.collision_grace = collision_grace
        self.lease_duration = lease_duration
        self.lease_renew_period = lease_renew_period or lease_duration / 3
        self.lease_retry_period = lease_retry_period
        self.resync_seconds = resync_seconds
        self.tick = tick
        self.max_backoff = max_backoff
        self.events_enabled = events
        self.request_timeout = request_timeout
        self.clock = clock
        self.monotonic = monotonic
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host

        self._lease = LeaseLock(
            api_client=api_client,
            namespace=namespace,
            secret_name=CONTROLLER_LEASE_PREFIX + target.name,
            duration=lease_duration,
            identity=identity,
            renew=False,
            clock=clock,
            request_timeout=request_timeout,
        )
        self.identity = self._lease.identity
        self.lease_name = self._lease.name
        self._pods_api = PodApi(
            api_client=api_client, namespace=namespace, request_timeout=request_timeout
        )
        self._rotator_source = rotator
        self._bucket = TokenBucket(
            rate=deletions_per_minute, per=60.0, capacity=deletion_burst, monotonic=monotonic
        )
        self._random = random.Random()  # noqa: S311 - backoff jitter, not security
        self.metrics = ControllerMetrics(token_ttl=self._token_ttl)
        self._server: MetricsServer | None = None
        self._release_on_stop = True  # tests turn it off to play a crashed leader
        # Per-pod Secrets (webhook mode, docs/PER-POD.md): adopted, refreshed, cleaned up by
        # a thread of each leadership term (rotator/kube/podsecret_keeper.py).
        self.pod_secret_keeper: PodSecretKeeper | None = None
        if pod_secrets:
            self.pod_secret_keeper = PodSecretKeeper(
                api_client=api_client,
                namespace=namespace,
                shared_secret=target.name,
                token_key=target.token_key,
                tenant_key=target.tenant_key,
                issuer=lambda: PodTokenIssuer.from_rotator(self._rotator()),
                expiry_margin=expiry_margin,
                adoption_grace=adoption_grace,
                resync=pod_secret_resync,
                request_timeout=request_timeout,
                clock=clock,
                monotonic=monotonic,
                on_action=lambda action: self.metrics.pod_secrets.inc(action=action),
            )

        self._cond = threading.Condition()
        self._running = False
        self._leader = False
        self._term: _Term | None = None
        self._beat = monotonic()
        self.election_attempts = 0
        self.worker_cycles = 0
        self._lease_valid_until = 0.0  # monotonic; past it, a leader must not act
        self._events: queue.Queue[tuple[str, str, str]] = queue.Queue(maxsize=_EVENT_QUEUE)
        self._events_stop = threading.Event()
        self._events_thread: threading.Thread | None = None
        self.secret_uid: str | None = None
        self.collision_log: collections.deque[CollisionRecord] = collections.deque(
            maxlen=_LOG_COLLISIONS
        )
        self._reset_term_state()

    # --- per-term state (guarded by _cond) ---

    def _reset_term_state(self) -> None:
        self._pods: dict[str, PodView] = {}
        self._new_starts: collections.deque[PodStart] = collections.deque()
        self._in_flight = 0  # starts taken by the worker, not yet considered
        self._timeline = TokenTimeline()
        self._tracker = CollisionTracker(tolerance=self.tolerance, grace=self.collision_grace)
        self._reasons: dict[str, str] = {}  # why a rotation is due -> a description
        self._trigger_starts = 0  # starts that consumed the current token
        self._delete_retry_at = 0.0
        self._secret_state: TargetState | None = None
        self._secret_missing = False
        self._victims: dict[tuple[str, str, str], _Victim] = {}
        self._throttled: set[tuple[str, str, str]] = set()
        self._failures_in_row = 0
        self._backoff_until = 0.0
        self._step_times: dict[Step, datetime] = {}
        self._step_mono: dict[Step, float] = {}
        if self.pod_secret_keeper is not None:
            self.pod_secret_keeper.reset()

    # --- public ---

    @property
    def is_leader(self) -> bool:
        return self._leader

    @property
    def metrics_url(self) -> str | None:
        return self._server.url if self._server is not None else None

    def status(self) -> ControllerStatus:
        with self._cond:
            term = self._term
            current = self._timeline.current
            return ControllerStatus(
                running=self._running,
                leader=self._leader,
                synced=bool(term and term.synced.is_set() and term.secret_read.is_set()),
                identity=self.identity,
                pods=len(self._pods),
                pending_starts=len(self._new_starts) + self._in_flight,
                rotation_pending=bool(self._reasons),
                suspects=len(self._tracker.suspects),
                deletions_pending=len(self._victims),
                rotations=int(
                    sum(
                        self.metrics.rotations.value(result=str(action))
                        for action in (Action.MINTED, Action.RESUMED, Action.PROMOTED_ONLY)
                    )
                ),
                failures=int(self.metrics.failures.value()),
                collisions=int(self.metrics.collisions.value()),
                recoveries=int(
                    self.metrics.recoveries.value(action="delete")
                    + self.metrics.recoveries.value(action="restart")
                ),
                fingerprint=current.fingerprint if current else None,
                expires_at=current.expires_at if current else None,
            )

    def run(self, *, stop: threading.Event) -> None:
        """Compete for leadership and, while leading, keep the Secret fresh; until ``stop``."""
        self._start_http()  # first: a port in use is a configuration error, raised here
        self._running = True
        self._beat = self.monotonic()
        self._events_stop.clear()
        self._events_thread = threading.Thread(
            target=self._send_events, name="lg-rotate-events", daemon=True
        )
        self._events_thread.start()
        log.info(
            "controller %s watching pods %r in namespace %s for Secret %s (leader Lease %s)",
            self.identity,
            self.selector,
            self.namespace,
            self.target.name,
            self.lease_name,
        )

        def attempt() -> None:
            self._beat = self.monotonic()
            self.election_attempts += 1

        try:
            compete(
                self._lease,
                stop=stop,
                lead=self._lead,
                retry_period=self.lease_retry_period,
                what="controller",
                log=log,
                on_attempt=attempt,
            )
        finally:
            self._running = False
            self._events_stop.set()
            if self._events_thread is not None:
                self._events_thread.join(timeout=self.request_timeout + 5)
            self._stop_http()
            log.info("controller %s stopped", self.identity)

    # --- leadership ---

    def _lead(self, stop: threading.Event) -> None:
        log.info("leading as %s (Lease %s/%s)", self.identity, self.namespace, self.lease_name)
        self._leader = True
        self.metrics.leader.set(1)
        self._event("LeaderElected", f"lg-rotate controller {self.identity} is the leader")
        last_renewed = self.monotonic()
        self._lease_valid_until = last_renewed + self.lease_duration
        term = self._begin_term()
        lost = False
        while not stop.wait(self.lease_renew_period):
            self._beat = self.monotonic()
            if not term.alive():
                log.error("a controller loop ended unexpectedly; stepping down to restart it")
                break
            try:
                before = self.monotonic()
                self._lease.renew()
                last_renewed = before
                self._lease_valid_until = before + self.lease_duration
            except LockError as exc:
                log.error("lost leadership: %s", exc.one_line())
                lost = True
                break
            except LgRotateError as exc:
                log.warning("could not renew the leader Lease: %s", exc.one_line())
                if self.monotonic() - last_renewed > self.lease_duration:
                    log.error("could not renew the leader Lease in time; stepping down")
                    lost = True
                    break
        self._end_term(term)
        self._leader = False
        self.metrics.leader.set(0)
        if not lost and self._release_on_stop:
            try:
                self._lease.release()
            except LgRotateError as exc:
                log.warning(
                    "could not release the leader Lease (it lapses in %gs): %s",
                    self.lease_duration,
                    exc.one_line(),
                )

    def _begin_term(self) -> _Term:
        with self._cond:
            self._reset_term_state()
            term = _Term(started=self.clock())
            self._term = term
        loops: list[tuple[str, Callable[[_Term], None]]] = [
            ("watch", self._watch_loop),
            ("work", self._work_loop),
        ]
        if self.pod_secret_keeper is not None:
            loops.append(("podsecrets", self._pod_secret_loop))
        for name, target in loops:
            thread = threading.Thread(
                target=target, args=(term,), name=f"lg-rotate-{name}", daemon=True
            )
            term.threads.append(thread)
            thread.start()
        return term

    def _end_term(self, term: _Term) -> None:
        term.stop.set()
        self._pods_api.abort_watch()
        if self.pod_secret_keeper is not None:
            self.pod_secret_keeper.wake.set()
        with self._cond:
            self._cond.notify_all()
        for thread in term.threads:
            # A rotation in progress finishes (it releases the per-Secret lock itself).
            thread.join(timeout=self.request_timeout * 2 + 10)
            if thread.is_alive():
                log.warning("%s did not stop in time", thread.name)

    # --- watching pods ---

    def _watch_loop(self, term: _Term) -> None:
        version: str | None = None
        failures = 0
        first = True
        while not term.stop.is_set():
            try:
                if version is None:
                    items, version = self._pods_api.list(selector=self.selector)
                    self._apply_list(items, historical=first)
                    first = False
                    term.synced.set()
                for event in self._pods_api.watch(
                    selector=self.selector,
                    resource_version=version,
                    timeout_seconds=int(self.resync_seconds),
                ):
                    if term.stop.is_set():
                        break
                    kind = str(event.get("type") or "")
                    obj = event.get("object") or {}
                    if kind == "ERROR":
                        code = obj.get("code")
                        log.info("pod watch answered an error (%s): relisting", code)
                        version = None
                        break
                    new_version = (obj.get("metadata") or {}).get("resourceVersion")
                    if new_version:
                        version = str(new_version)
                    if kind == "BOOKMARK":
                        continue
                    self._apply_pod(kind, obj)
                failures = 0
            except LgRotateError as exc:
                if term.stop.is_set():
                    break
                failures += 1
                delay = min(30.0, 0.5 * 2 ** min(failures, 6))
                log.warning("watching pods failed (%s); relisting in %.1fs", exc.one_line(), delay)
                version = None
                term.stop.wait(delay)
            except Exception:  # never let the watcher die: relist after a pause
                if term.stop.is_set():
                    break
                failures += 1
                log.exception("unexpected error while watching pods; relisting")
                version = None
                term.stop.wait(min(30.0, 0.5 * 2 ** min(failures, 6)))

    def _apply_list(self, items: list[dict[str, Any]], *, historical: bool) -> None:
        seen = set()
        for item in items:
            uid = (item.get("metadata") or {}).get("uid")
            if uid:
                seen.add(str(uid))
            self._apply_pod("ADDED", item, historical=historical)
        if self.pod_secret_keeper is not None:
            self.pod_secret_keeper.replace(items)
        with self._cond:
            for uid in [uid for uid in self._pods if uid not in seen]:
                del self._pods[uid]  # deleted while nobody was watching
            self._cond.notify_all()

    def _apply_pod(self, kind: str, obj: Mapping[str, Any], *, historical: bool = False) -> None:
        metadata = obj.get("metadata") or {}
        uid = str(metadata.get("uid") or "")
        if not uid:
            return
        if self.pod_secret_keeper is not None and not historical:
            self.pod_secret_keeper.observe(kind, obj)  # (a relist hands it every pod at once)
        # A pod admitted by the webhook reads its own Secret: its starts consume nothing of the
        # shared one, except through containers that still reference the shared Secret.
        consumers = shared_consumers(obj, self.target.name)
        now = self.clock()
        with self._cond:
            if kind == "DELETED" or consumers == set():
                if self._pods.pop(uid, None) is not None or kind == "DELETED":
                    self._cond.notify_all()
                return
            pod = self._pods.get(uid)
            if pod is None:
                pod = PodView(uid=uid, name=str(metadata.get("name") or uid), node=None)
                self._pods[uid] = pod
            pod.node = (obj.get("spec") or {}).get("nodeName") or pod.node
            starts: list[PodStart] = []
            for status in container_instances(obj, container=self.container):
                if consumers is not None and status.name not in consumers:
                    continue
                view = pod.containers.setdefault(status.name, ContainerView())
                fresh = [i for i in status.instances if i.key not in view.seen]
                # Restarts the status no longer shows (it keeps two instances) still consumed
                # a token each: count them, without a start time.
                missed = 0
                if view.restart_count is not None:
                    missed = max(0, status.restart_count - view.restart_count - len(fresh))
                found: list[tuple[str, datetime | None]] = [
                    (f"unseen-{status.restart_count}-{index}", None) for index in range(missed)
                ]
                found += [(instance.key, instance.started_at) for instance in fresh]
                for key, started_at in found:
                    view.seen.add(key)
                    starts.append(
                        PodStart(
                            pod_uid=uid,
                            pod_name=pod.name,
                            node=pod.node,
                            container=status.name,
                            key=key,
                            started_at=started_at,
                            observed_at=now,
                            historical=historical,
                        )
                    )
                view.restart_count = max(view.restart_count or 0, status.restart_count)
                if fresh or (status.current_key and status.current_key != view.latest_key):
                    view.latest_key = status.instances[-1].key
                elif missed:
                    view.latest_key = found[-1][0]
                view.current_key = status.current_key
                view.ready = status.ready
                if status.ready and status.current_key:
                    view.ready_keys.add(status.current_key)
            self._new_starts.extend(starts)
            self._cond.notify_all()

    # --- the worker: rotations, collisions, recoveries ---

    def _work_loop(self, term: _Term) -> None:
        while not term.stop.is_set() and not term.synced.wait(0.1):
            self._beat = self.monotonic()
        self._sync_secret()
        term.secret_read.set()
        while not term.stop.is_set():
            self._beat = self.monotonic()
            try:
                self._work_once(term)
            except Exception:  # never let the worker die: log, count, pause, go on
                log.exception("unexpected error in the controller loop")
                self._failure_backoff()
            finally:
                with self._cond:
                    self._in_flight = 0
            with self._cond:
                if not self._new_starts and not term.stop.is_set():
                    self._cond.wait(self._next_wake())

    def _pod_secret_loop(self, term: _Term) -> None:
        """Per-pod Secrets (webhook mode): adopt, refresh, clean up; see podsecret_keeper."""
        keeper = self.pod_secret_keeper
        assert keeper is not None
        while not term.stop.is_set() and not term.synced.wait(0.1):
            pass
        while not term.stop.is_set():
            self._beat = self.monotonic()
            acting = self.monotonic() < self._lease_valid_until
            keeper.wake.clear()  # before the pass: a pod event during it wakes the next one
            try:
                wait = keeper.run_once(acting=acting)
            except Exception:  # never let the loop die: log, pause, go on
                log.exception("unexpected error managing per-pod Secrets")
                wait = min(self.max_backoff, 5.0)
            if term.stop.is_set():
                break
            keeper.wake.wait(max(0.01, min(wait, self.tick * 6)))

    def _work_once(self, term: _Term) -> None:
        self.worker_cycles += 1
        with self._cond:
            starts = list(self._new_starts)
            self._new_starts.clear()
            self._in_flight = len(starts)
        if starts:
            self._sync_secret()
        now = self.clock()
        mono = self.monotonic()
        for start in starts:
            self._consider(start, mono)
        self._check_expiry(now)
        # A leader whose Lease may have lapsed (renewals failing) must not act: another
        # replica may lead by now.
        acting = not term.stop.is_set() and mono < self._lease_valid_until
        if self._reasons and mono >= self._backoff_until and acting:
            self._rotate()
        self._judge_suspects()
        if acting:
            self._recover()
        with self._cond:
            self._timeline.prune(now=now)
            self._tracker.prune(now=now)

    def _consider(self, start: PodStart, mono: float) -> None:
        if not start.historical:
            self.metrics.starts.inc()
        with self._cond:
            candidates = self._tracker.candidates(start, self._timeline)
            current = self._timeline.current
            consumed = current is None or bool(candidates & {current.fingerprint, UNKNOWN_TOKEN})
            if consumed and current is not None and start.historical:
                # At startup: only a start after the current token arrived consumed it.
                consumed = current.fingerprint in candidates
            if consumed and start.historical:
                self._reasons["startup"] = (
                    "a pod started after the Secret's token was delivered (found at startup)"
                )
            elif consumed:
                self._trigger_starts += 1
                self._reasons["start"] = (
                    f"the start of {start.describe()}"
                    if self._trigger_starts == 1
                    else f"{self._trigger_starts} agent container starts"
                )
            before = set(self._tracker.suspects)
            partners = self._tracker.add(start, self._timeline, now=mono)
            new_suspects = set(self._tracker.suspects) - before
        if partners:
            self.metrics.suspects.inc(len(new_suspects))
            log.info(
                "%s may share a token with %s",
                start.describe(),
                ", ".join(p.describe() for p in partners[:3])
                + ("..." if len(partners) > 3 else ""),
            )

    def _check_expiry(self, now: datetime) -> None:
        with self._cond:
            if self._secret_missing:
                self._reasons.setdefault("missing", "the Secret does not exist")
                return
            current = self._timeline.current
            if current is None or current.expires_at is None:
                if self._secret_state is not None and self._secret_state.fingerprint is None:
                    self._reasons.setdefault("foreign", "the Secret carries no lg-rotate token")
                return
            deadline = self._expiry_deadline(current)
            if now >= deadline:
                left = (current.expires_at - now).total_seconds()
                self._reasons.setdefault(
                    "expiry", f"the token expires in {left:.0f}s (margin {self.expiry_margin:.0%})"
                )

    def _expiry_deadline(self, entry: TimelineEntry) -> datetime:
        assert entry.expires_at is not None
        born = entry.rotated_at or entry.latest
        lifetime = max(timedelta(0), entry.expires_at - born)
        return entry.expires_at - lifetime * self.expiry_margin

    def _sync_secret(self) -> None:
        try:
            state = self.target.read_state()
        except LgRotateError as exc:
            log.warning("could not read Secret %s: %s", self.target.location(), exc.one_line())
            return
        now = self.clock()
        with self._cond:
            self._secret_state = state
            self._secret_missing = state is None
            if state is None or state.fingerprint is None:
                return
            rotated = state.rotated_at
            earliest = (rotated - self.tolerance) if rotated else datetime.min.replace(tzinfo=UTC)
            latest = now
            if rotated is not None:
                latest = min(now, rotated + ONE_SECOND + self.tolerance + OBSERVED_DELIVERY_SLACK)
            if self._timeline.observe(
                fingerprint=state.fingerprint,
                earliest=earliest,
                latest=latest,
                origin="observed",
                rotation_id=state.rotation_id,
                expires_at=state.expires_at,
                rotated_at=rotated,
            ):
                log.info(
                    "the Secret holds token %s (rotation %s)",
                    state.fingerprint[:12],
                    state.rotation_id,
                )

    def _rotator(self) -> Rotator:
        source = self._rotator_source
        rotator = source if isinstance(source, Rotator) else source()
        hook = rotator.on_step
        if not (isinstance(hook, _StepTimer) and hook.owner is self):
            rotator.on_step = _StepTimer(owner=self, previous=hook)
        return rotator

    def _rotate(self) -> None:
        with self._cond:
            reasons = dict(self._reasons)
            self._reasons.clear()
            trigger_starts, self._trigger_starts = self._trigger_starts, 0
        why = "; ".join(reasons.values())
        self._step_times.clear()
        self._step_mono.clear()
        started, started_mono = self.clock(), self.monotonic()
        try:
            report = self._rotator().rotate()
        except Exception as exc:
            with self._cond:
                for key, text in reasons.items():
                    self._reasons.setdefault(key, text)
                self._trigger_starts += trigger_starts
            self._rotation_failed(exc, why)
            return
        finished = self.clock()
        self._failures_in_row = 0
        self._backoff_until = 0.0
        self._rotation_done(report, why=why, started=started, finished=finished)
        self.metrics.rotation_duration.observe(self.monotonic() - started_mono)

    def _rotation_done(
        self, report: RotationReport, *, why: str, started: datetime, finished: datetime
    ) -> None:
        self.metrics.rotations.inc(result=str(report.action))
        if Step.LOCKED in self._step_mono and Step.MINTED in self._step_mono:
            self.metrics.mint_latency.observe(
                self._step_mono[Step.MINTED] - self._step_mono[Step.LOCKED]
            )
        if report.action is Action.PROMOTED_ONLY or report.fingerprint is None:
            self._sync_secret()
        else:
            earliest = self._step_times.get(Step.STORED) or self._step_times.get(
                Step.LOCKED, started
            )
            latest = self._step_times.get(Step.DELIVERED, finished)
            with self._cond:
                self._timeline.observe(
                    fingerprint=report.fingerprint,
                    earliest=earliest,
                    latest=latest,
                    origin="controller",
                    rotation_id=report.rotation_id,
                    expires_at=report.expires_at,
                    rotated_at=latest,
                )
                self._secret_missing = False
            # The delivery may have (re)created the Secret, under a new uid: the Events
            # thread re-reads it rather than naming a deleted object.
            self.secret_uid = None
        short = (report.fingerprint or "")[:12]
        log.info(
            "rotated Secret %s to token %s (%s, rotation %s) after %s",
            self.target.location(),
            short,
            report.action,
            report.rotation_id,
            why,
        )
        self._event(
            "Rotated",
            f"lg-rotate controller delivered token sha256:{short} (rotation {report.rotation_id}, "
            f"{report.action}) after {why}",
        )

    def _rotation_failed(self, exc: BaseException, why: str) -> None:
        self._failures_in_row += 1
        self.metrics.failures.inc()
        self.metrics.rotations.inc(result="failed")
        delay = self._failure_backoff()
        text = exc.one_line() if isinstance(exc, LgRotateError) else type(exc).__name__
        if isinstance(exc, LgRotateError):
            log.warning("rotation failed (%s); retrying in %.1fs: %s", why, delay, text)
        else:
            log.error(
                "rotation failed unexpectedly (%s); retrying in %.1fs", why, delay, exc_info=exc
            )
        self._event(
            "RotationFailed",
            f"lg-rotate controller could not rotate ({why}); retrying in {delay:.0f}s: {text}",
            type="Warning",
        )

    def _failure_backoff(self) -> float:
        exponent = max(0, self._failures_in_row - 1)
        delay = min(self.max_backoff, 2.0 ** min(exponent, 16))
        delay *= self._random.uniform(0.5, 1.0)
        self._backoff_until = self.monotonic() + delay
        return delay

    def _judge_suspects(self) -> None:
        mono = self.monotonic()
        with self._cond:
            for ident, suspect in list(self._tracker.suspects.items()):
                verdict = self._tracker.judge(suspect, self._pods, now=mono)
                if verdict is Verdict.WAIT:
                    continue
                del self._tracker.suspects[ident]
                self._tracker.judged.add(ident)
                start = suspect.start
                if verdict is Verdict.RESTARTED:
                    view = self._pods[start.pod_uid].containers[start.container]
                    if start.key not in view.ready_keys:
                        self._confirm(suspect, action="restart", reason="it restarted un-enrolled")
                        self.metrics.recoveries.inc(action="restart")
                elif verdict is Verdict.VICTIM:
                    self._confirm(suspect, action="delete", reason=suspect.reason)
                    self._victims[ident] = _Victim(
                        start=start, certain=bool(suspect.certain), reason=suspect.reason
                    )

    def _confirm(self, suspect: Suspect, *, action: str, reason: str) -> None:
        start = suspect.start
        self.metrics.collisions.inc()
        record = CollisionRecord(
            pod_uid=start.pod_uid,
            pod_name=start.pod_name,
            node=start.node,
            container=start.container,
            key=start.key,
            started_at=start.started_at,
            certain=bool(suspect.certain),
            action=action,
            reason=reason,
        )
        self.collision_log.append(record)
        recovery = (
            "its container already restarted with a fresh token"
            if action == "restart"
            else "deleting the pod so it restarts with a fresh token"
        )
        log.warning("token collision: %s: %s; %s", start.describe(), reason, recovery)
        self._event(
            "TokenCollision",
            f"{start.describe()} shared an enrolment token with another pod ({reason}); {recovery}",
            type="Warning",
        )

    def _recover(self) -> None:
        with self._cond:
            if not self._victims or self.monotonic() < self._delete_retry_at:
                return
            if self._reasons or self._new_starts or self._secret_missing:
                return  # rotate first: a replacement must not read a consumed token
            victims = list(self._victims.items())
        for ident, victim in victims:
            start = victim.start
            with self._cond:
                pod = self._pods.get(start.pod_uid)
                view = pod.containers.get(start.container) if pod else None
                still = view is not None and view.latest_key == start.key
            if not still:
                with self._cond:
                    self._victims.pop(ident, None)
                continue
            if not self._bucket.try_take():
                if ident not in self._throttled:
                    self._throttled.add(ident)
                    self.metrics.throttled.inc()
                    log.info(
                        "deletion of %s waits for the rate limit (%.1fs)",
                        start.pod_name,
                        self._bucket.wait_time(),
                    )
                return
            try:
                deleted = self._pods_api.delete(name=start.pod_name, uid=start.pod_uid)
            except LgRotateError as exc:
                log.warning("could not delete pod %s: %s", start.pod_name, exc.one_line())
                self._delete_retry_at = self.monotonic() + min(self.max_backoff, 5.0)
                return
            with self._cond:
                self._victims.pop(ident, None)
                self._throttled.discard(ident)
            if deleted:
                self.metrics.recoveries.inc(action="delete")
                log.info("deleted pod %s to recover from a token collision", start.pod_name)
                self._event(
                    "CollisionRecovered",
                    f"deleted {start.describe()}: its replacement reads a fresh token",
                )

    def _next_wake(self) -> float:
        """Seconds until the worker has something to do by the clock (called under _cond)."""
        mono = self.monotonic()
        wake = self.tick
        if self._reasons:
            wake = min(wake, max(0.0, self._backoff_until - mono))
        for suspect in self._tracker.suspects.values():
            wake = min(wake, max(0.0, suspect.due - mono))
        if self._victims and not self._reasons:
            retry = max(self._delete_retry_at - mono, self._bucket.wait_time())
            wake = min(wake, max(0.01, retry))
        current = self._timeline.current
        if current is not None and current.expires_at is not None:
            until = (self._expiry_deadline(current) - self.clock()).total_seconds()
            wake = min(wake, max(0.0, until))
        return max(wake, 0.005)

    # --- events, metrics, health ---

    def _event(self, reason: str, message: str, *, type: str = "Normal") -> None:
        if not self.events_enabled:
            return
        try:
            self._events.put_nowait((reason, message, type))
        except queue.Full:
            self.metrics.events_dropped.inc()

    def _send_events(self) -> None:
        while True:
            try:
                reason, message, kind = self._events.get(timeout=0.2)
            except queue.Empty:
                if self._events_stop.is_set():
                    return
                continue
            if self.secret_uid is None:
                self.secret_uid = read_secret_uid(
                    self.api_client, self.namespace, self.target.name, self.request_timeout
                )
            if not record_event(
                api_client=self.api_client,
                namespace=self.namespace,
                secret_name=self.target.name,
                reason=reason,
                message=message,
                type=kind,
                secret_uid=self.secret_uid or "",
                clock=self.clock,
                request_timeout=min(self.request_timeout, 10.0),
            ):
                self.metrics.events_dropped.inc()

    def _token_ttl(self) -> float | None:
        current = self._timeline.current
        if current is None or current.expires_at is None:
            return None
        return (current.expires_at - self.clock()).total_seconds()

    def _liveness(self) -> tuple[bool, dict[str, Any]]:
        stale = self.monotonic() - self._beat
        limit = max(self.lease_renew_period, self.lease_retry_period, self.tick) * 3 + 30
        term = self._term
        loops_ok = not self._leader or term is None or term.alive() or term.stop.is_set()
        healthy = self._running and stale < limit and loops_ok
        return healthy, {"leader": self._leader, "secondsSinceLoop": round(stale, 1)}

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        status = self.status()
        ready = status.running and (not status.leader or status.synced)
        return ready, {"status": status.as_dict()}

    def _start_http(self) -> None:
        if self.metrics_port is None:
            return
        try:
            self._server = MetricsServer(
                registry=self.metrics.registry,
                liveness=self._liveness,
                readiness=self._readiness,
                host=self.metrics_host,
                port=self.metrics_port,
            ).start()
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {self.metrics_host}:{self.metrics_port}: "
                f"{exc.strerror or type(exc).__name__}",
                fix="pick another --metrics-bind-address (HOST:0: any free port; 0: none), or "
                "stop what uses it",
            ) from exc

    def _stop_http(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


# --- helpers for the CLI ---------------------------------------------------------------


def is_running(
    *,
    api_client: ApiClient,
    namespace: str,
    secret_name: str,
    clock: Callable[[], datetime] = utcnow,
) -> bool:
    """True if a controller currently leads for this Secret (its Lease is held and live).

    Any error reading the Lease (no permission, no Lease) answers False: callers use it
    to decide whether to warn, and warning is the safe side.
    """
    lease = LeaseLock(
        api_client=api_client,
        namespace=namespace,
        secret_name=CONTROLLER_LEASE_PREFIX + secret_name,
        renew=False,
        clock=clock,
        request_timeout=10.0,
    )
    try:
        holder = lease.read_holder()
    except LgRotateError as exc:
        log.debug("could not read the controller Lease: %s", exc.one_line())
        return False
    return holder is not None and holder.expires_at >= clock()


def install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGTERM and SIGINT (main thread only); returns a function restoring
    the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[signal.Signals, Any] = {}

    def handle(signum: int, frame: object) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handle)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return restore
