"""Agent pods as the controller and ``roll`` see them: container starts, readiness, and the
API calls for pods and workload annotations.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    KubernetesError,
)
from rotator.kube.api import (
    FIELD_MANAGER,
    MERGE_PATCH,
    POD_PATH,
    PODS_PATH,
    ApiOp,
    KubernetesNotFoundError,
    api_request,
    api_stream,
    transport_reason,
    workload_path,
)
from rotator.tokens import format_timestamp, parse_timestamp

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("lg_rotate.controller")

ONE_SECOND = timedelta(seconds=1)


# --- pods: what started, and is it ready ---------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ContainerInstance:
    """One run of a container, as the pod status shows it."""

    key: str  # containerID, else "@<startedAt>"
    started_at: datetime | None
    current: bool  # the instance in ``state`` (running or terminated), not ``lastState``
    running: bool = False  # ``state.running``: not (yet) exited


@dataclass(frozen=True, kw_only=True)
class ContainerStatusView:
    name: str
    restart_count: int
    ready: bool
    instances: tuple[ContainerInstance, ...]  # oldest first

    @property
    def current_key(self) -> str | None:
        for instance in self.instances:
            if instance.current:
                return instance.key
        return None


def _timestamp(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return parse_timestamp(str(value))
    except ValueError:
        return None


def _instance(
    run: Mapping[str, Any], container_id: Any, *, current: bool, running: bool = False
) -> ContainerInstance | None:
    started_at = _timestamp(run.get("startedAt"))
    if started_at is None and not container_id:
        return None
    key = str(container_id) if container_id else f"@{format_timestamp(started_at)}"  # type: ignore[arg-type]
    return ContainerInstance(key=key, started_at=started_at, current=current, running=running)


def container_instances(
    pod: Mapping[str, Any], *, container: str | None = None
) -> list[ContainerStatusView]:
    """The agent containers of a pod and the instances its status shows (oldest first).

    ``container`` restricts to one container name (None: every container of the pod).
    """
    views = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        name = str(status.get("name") or "")
        if container is not None and name != container:
            continue
        state = status.get("state") or {}
        last = (status.get("lastState") or {}).get("terminated")
        instances: list[ContainerInstance] = []
        if last:
            old = _instance(last, last.get("containerID"), current=False)
            if old is not None:
                instances.append(old)
        run = state.get("running") or state.get("terminated")
        if run:
            now = _instance(
                run,
                status.get("containerID") or run.get("containerID"),
                current=True,
                running=bool(state.get("running")),
            )
            if now is not None and all(now.key != i.key for i in instances):
                instances.append(now)
        try:
            restarts = int(status.get("restartCount") or 0)
        except (TypeError, ValueError):
            restarts = 0
        views.append(
            ContainerStatusView(
                name=name,
                restart_count=restarts,
                ready=bool(status.get("ready")) and bool(state.get("running")),
                instances=tuple(instances),
            )
        )
    return views


def pod_is_ready(pod: Mapping[str, Any]) -> bool:
    """The pod's ``Ready`` condition (else: every container ready), and not terminating."""
    metadata = pod.get("metadata") or {}
    if metadata.get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Ready":
            return str(condition.get("status")) == "True"
    statuses = status.get("containerStatuses") or []
    return bool(statuses) and all(bool(s.get("ready")) for s in statuses)


@dataclass(frozen=True, kw_only=True)
class PodStart:
    """One container start (a token consumption) as the controller observed it."""

    pod_uid: str
    pod_name: str
    node: str | None
    container: str
    key: str  # the container instance (containerID or "@startedAt"; "unseen-N" if missed)
    started_at: datetime | None  # None: a restart the controller only counted
    observed_at: datetime  # controller clock, when its status was seen
    historical: bool = False  # seen in the first list of a leadership term

    @property
    def ident(self) -> tuple[str, str, str]:
        return (self.pod_uid, self.container, self.key)

    def window(self, tolerance: timedelta) -> tuple[datetime | None, datetime]:
        """When the container may have read the Secret (None: unbounded in the past)."""
        if self.started_at is None:
            return None, self.observed_at
        low = self.started_at - tolerance
        high = min(self.started_at + ONE_SECOND + tolerance, self.observed_at)
        return min(low, high), high

    def order(self) -> tuple[datetime, datetime]:
        return (self.started_at or self.observed_at, self.observed_at)

    def describe(self) -> str:
        where = f" on node {self.node}" if self.node else ""
        when = f" at {format_timestamp(self.started_at)}" if self.started_at else ""
        return f"pod {self.pod_name}{where} (container {self.container}{when})"


@dataclass(kw_only=True)
class ContainerView:
    """What the controller knows of one container of one pod."""

    seen: set[str] = field(default_factory=set)
    restart_count: int | None = None
    latest_key: str | None = None  # the most recent instance seen
    current_key: str | None = None  # the instance in ``state`` now (None while waiting)
    ready: bool = False
    ready_keys: set[str] = field(default_factory=set)  # instances ever seen Ready

    def is_ready(self, key: str) -> bool:
        return self.ready and self.current_key == key


@dataclass(kw_only=True)
class PodView:
    uid: str
    name: str
    node: str | None
    containers: dict[str, ContainerView] = field(default_factory=dict)


# --- the Kubernetes API for pods and workloads -----------------------------------------


class PodApi:
    """Pods and workload annotations, through the official client, as plain JSON.

    Errors are lg-rotate errors with RBAC hints (from :mod:`rotator.kube`). RBAC: ``list``
    and ``watch`` on ``pods``, ``delete`` on ``pods`` (recovery and ``roll``), ``get`` and
    ``patch`` on ``daemonsets.apps`` (``roll``).
    """

    def __init__(
        self, *, api_client: ApiClient, namespace: str, request_timeout: float = 30.0
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.request_timeout = request_timeout
        self._response: Any = None
        self._response_lock = threading.Lock()

    def _op(self, verb: str, name: str | None = None, *, kind: str = "Pod") -> ApiOp:
        resource, group = ("pods", "") if kind == "Pod" else (f"{kind.lower()}s", "apps")
        return ApiOp(
            verb=verb,
            kind=kind,
            resource=resource,
            group=group,
            namespace=self.namespace,
            name=name,
            writes=False,
        )

    def list(self, *, selector: str) -> tuple[list[dict[str, Any]], str | None]:
        answer = api_request(
            self.api_client,
            self._op("list"),
            "GET",
            PODS_PATH,
            query={"labelSelector": selector},
            timeout=self.request_timeout,
        )
        items = [item for item in answer.get("items") or [] if isinstance(item, dict)]
        version = (answer.get("metadata") or {}).get("resourceVersion")
        return items, str(version) if version else None

    def watch(
        self, *, selector: str, resource_version: str | None, timeout_seconds: int
    ) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) until the server ends the watch.

        A plain streamed GET (``watch=true``, one JSON event per line): ``kubernetes.watch``
        streams through a generated API method (``CoreV1Api.list_namespaced_pod``), whose
        import builds the client's models.
        """
        from urllib3.exceptions import HTTPError as TransportError

        response = api_stream(
            self.api_client,
            self._op("watch"),
            PODS_PATH,
            query={
                "labelSelector": selector,
                "watch": True,
                "allowWatchBookmarks": True,
                "timeoutSeconds": max(1, int(timeout_seconds)),
                "resourceVersion": resource_version or None,
            },
            timeout=(self.request_timeout, timeout_seconds + self.request_timeout),
        )
        with self._response_lock:
            self._response = response
        try:
            buffer = b""
            for chunk in response.stream(amt=None, decode_content=True):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip():
                yield json.loads(buffer)
        except (TransportError, OSError, ValueError) as exc:
            raise KubernetesError(
                f"the watch on pods in namespace {self.namespace!r} broke: {transport_reason(exc)}",
                fix="it is re-established by itself; check the API server if it keeps breaking",
            ) from exc
        finally:
            with self._response_lock:
                self._response = None
            response.release_conn()

    def abort_watch(self) -> None:
        """Break a running :meth:`watch` from another thread (graceful shutdown)."""
        with self._response_lock:
            response = self._response
        if response is None:
            return
        try:
            shutdown = getattr(response, "shutdown", None)
            if callable(shutdown):
                shutdown()
            response.close()
        except Exception:  # already closed or broken: that is what we wanted
            log.debug("closing the watch connection failed", exc_info=True)

    def delete(self, *, name: str, uid: str | None = None) -> bool:
        """Delete a pod (only if it still has ``uid``); False if it was already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            api_request(
                self.api_client,
                self._op("delete", name),
                "DELETE",
                POD_PATH,
                body=body,
                timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return False
        return True

    def read_workload(self, *, kind: str, name: str) -> dict[str, Any]:
        op = self._op("get", name, kind=kind)
        result: dict[str, Any] = api_request(
            self.api_client,
            op,
            "GET",
            workload_path(op.resource),
            timeout=self.request_timeout,
        )
        return result

    def annotate_workload(
        self, *, kind: str, name: str, annotations: Mapping[str, str | None]
    ) -> dict[str, Any]:
        op = self._op("patch", name, kind=kind)
        result: dict[str, Any] = api_request(
            self.api_client,
            op,
            "PATCH",
            workload_path(op.resource),
            query={"fieldManager": FIELD_MANAGER},
            body={"metadata": {"annotations": dict(annotations)}},
            content_type=MERGE_PATCH,
            timeout=self.request_timeout,
        )
        return result
