"""Workloads: ``kind/NAME`` references, restarts (``kubectl rollout restart``) and rollouts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from rotator.errors import (
    ConfigError,
    KubernetesError,
    RolloutTimeoutError,
)
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    FIELD_MANAGER,
    MERGE_PATCH,
    ApiOp,
    api_request,
    check_name,
    workload_path,
)
from rotator.tokens import (
    format_timestamp,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger("lg_rotate.kube")

RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"


WorkloadKind = Literal["daemonset", "deployment", "statefulset"]
_ALIASES_BY_KIND: dict[WorkloadKind, tuple[str, ...]] = {
    "daemonset": ("ds", "daemonset", "daemonsets"),
    "deployment": ("deploy", "deployment", "deployments"),
    "statefulset": ("sts", "statefulset", "statefulsets"),
}
_WORKLOAD_ALIASES: dict[str, WorkloadKind] = {
    alias: kind
    for kind, aliases in _ALIASES_BY_KIND.items()
    for name in aliases
    for alias in (name, f"{name}.apps")
}


def parse_workload_ref(ref: str) -> tuple[WorkloadKind, str]:
    """``"daemonset/NAME"`` -> ``("daemonset", "NAME")``, as ``kubectl rollout`` spells it.

    Accepted kinds (case-insensitive, optionally with ``.apps``): ``ds``, ``daemonset``,
    ``daemonsets``, ``deploy``, ``deployment``, ``deployments``, ``sts``, ``statefulset``,
    ``statefulsets``.
    """
    kind_text, slash, name = ref.strip().partition("/")
    kind = _WORKLOAD_ALIASES.get(kind_text.strip().lower())
    if not slash or kind is None or not name.strip():
        raise ConfigError(
            f"{ref!r} is not a workload reference",
            fix="use daemonset/NAME, deployment/NAME or statefulset/NAME (ds/, deploy/, sts/)",
        )
    return kind, check_name(name.strip(), what="the workload name")


def workload_kind(kind: str) -> WorkloadKind:
    canonical = _WORKLOAD_ALIASES.get(kind.strip().lower())
    if canonical is None:
        raise ConfigError(
            f"{kind!r} is not a workload kind lg-rotate can restart",
            fix="use daemonset, deployment or statefulset",
        )
    return canonical


# --- workloads -------------------------------------------------------------------------


def workload_op(verb: str, kind: WorkloadKind, namespace: str, name: str) -> ApiOp:
    return ApiOp(
        verb=verb,
        kind={"daemonset": "DaemonSet", "deployment": "Deployment", "statefulset": "StatefulSet"}[
            kind
        ],
        resource=f"{kind}s",
        group="apps",
        namespace=namespace,
        name=name,
        writes=False,
    )


def restart_workload(
    *,
    api_client: ApiClient,
    namespace: str,
    kind: str,
    name: str,
    at: datetime,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> None:
    """Restart a DaemonSet, Deployment or StatefulSet like ``kubectl rollout restart``.

    Sets ``spec.template.metadata.annotations["kubectl.kubernetes.io/restartedAt"]`` to
    ``at``, which changes the pod template, so the controller replaces the pods under
    the workload's update strategy. RBAC: ``patch`` on the workload (``apps``).
    """
    canonical = workload_kind(kind)
    body = {
        "spec": {
            "template": {
                "metadata": {"annotations": {RESTARTED_AT_ANNOTATION: format_timestamp(at)}}
            }
        }
    }
    api_request(
        api_client,
        workload_op("patch", canonical, namespace, name),
        "PATCH",
        workload_path(f"{canonical}s"),
        query={"fieldManager": FIELD_MANAGER},
        body=body,
        content_type=MERGE_PATCH,
        timeout=request_timeout,
    )
    logger.info(
        "restarted %s %s/%s (restartedAt %s)", canonical, namespace, name, format_timestamp(at)
    )


@dataclass(frozen=True, kw_only=True)
class RolloutProgress:
    """Where a workload's rollout stands, from its status (the numbers are pods)."""

    kind: WorkloadKind
    namespace: str
    name: str
    generation: int | None
    observed_generation: int | None
    desired: int
    updated: int
    ready: int
    available: int
    done: bool

    def describe(self) -> str:
        if not self.observed:
            return (
                f"{self.kind} {self.namespace}/{self.name}: the controller has not seen "
                f"generation {self.generation} yet"
            )
        return (
            f"{self.kind} {self.namespace}/{self.name}: {self.updated} of {self.desired} pods "
            f"updated, {self.available} available"
        )

    @property
    def observed(self) -> bool:
        if self.generation is None:
            return True
        return self.observed_generation is not None and self.observed_generation >= self.generation


def as_int(value: Any, default: int = 0) -> int:
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError):
        return default


def rollout_progress(
    kind: WorkloadKind, namespace: str, name: str, obj: Mapping[str, Any]
) -> RolloutProgress:
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation = metadata.get("generation")
    observed_generation = status.get("observedGeneration")
    strategy = (spec.get("updateStrategy") or {}).get("type")
    if kind in ("daemonset", "statefulset") and strategy == "OnDelete":
        raise KubernetesError(
            f"{kind} {namespace}/{name} uses the OnDelete update strategy: a restart does not "
            "replace its pods",
            fix="switch it to RollingUpdate, or delete its pods yourself",
        )
    if kind == "daemonset":
        desired = as_int(status.get("desiredNumberScheduled"))
        updated = as_int(status.get("updatedNumberScheduled"))
        ready = as_int(status.get("numberReady"))
        available = as_int(status.get("numberAvailable"))
        complete = updated == desired and available == desired
    elif kind == "deployment":
        for condition in status.get("conditions") or []:
            if condition.get("type") == "Progressing" and (
                condition.get("reason") == "ProgressDeadlineExceeded"
            ):
                raise KubernetesError(
                    f"deployment {namespace}/{name} exceeded its progress deadline",
                    fix=f"check its pods: kubectl -n {namespace} describe deployment {name}",
                )
        desired = as_int(spec.get("replicas"), 1)
        updated = as_int(status.get("updatedReplicas"))
        ready = as_int(status.get("readyReplicas"))
        available = as_int(status.get("availableReplicas"))
        total = as_int(status.get("replicas"))
        complete = updated >= desired and total <= updated and available >= updated
    else:
        desired = as_int(spec.get("replicas"), 1)
        updated = as_int(status.get("updatedReplicas"))
        ready = as_int(status.get("readyReplicas"))
        available = as_int(status.get("availableReplicas"), ready)
        partition = as_int(
            ((spec.get("updateStrategy") or {}).get("rollingUpdate") or {}).get("partition")
        )
        if partition:
            complete = ready >= desired and updated >= desired - partition
        else:
            revisions = status.get("currentRevision"), status.get("updateRevision")
            same_revision = None in revisions or revisions[0] == revisions[1]
            complete = ready >= desired and updated >= desired and same_revision
    progress = RolloutProgress(
        kind=kind,
        namespace=namespace,
        name=name,
        generation=as_int(generation) if generation is not None else None,
        observed_generation=as_int(observed_generation)
        if observed_generation is not None
        else None,
        desired=desired,
        updated=updated,
        ready=ready,
        available=available,
        done=False,
    )
    return replace(progress, done=progress.observed and complete)


def wait_for_rollout(
    *,
    api_client: ApiClient,
    namespace: str,
    kind: str,
    name: str,
    timeout: float,
    on_progress: Callable[[RolloutProgress], None] | None = None,
    poll_interval: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
) -> RolloutProgress:
    """Poll a workload until its rollout is complete, like ``kubectl rollout status``.

    Complete means the controller has observed the latest generation and, for a
    DaemonSet, every scheduled pod is updated and available (``updatedNumberScheduled``
    and ``numberAvailable`` equal ``desiredNumberScheduled``); for a Deployment, the
    updated replicas reach ``spec.replicas``, no old replicas remain and the updated ones
    are available; for a StatefulSet, the replicas are ready and on the update revision.
    ``on_progress`` is called with each new state. RolloutTimeoutError after ``timeout``
    seconds. RBAC: ``get`` on the workload.
    """
    canonical = workload_kind(kind)
    deadline = clock() + timeout
    last: RolloutProgress | None = None
    while True:
        obj = api_request(
            api_client,
            workload_op("get", canonical, namespace, name),
            "GET",
            workload_path(f"{canonical}s"),
            timeout=request_timeout,
        )
        progress = rollout_progress(canonical, namespace, name, obj)
        if progress != last:
            logger.info("rollout: %s", progress.describe())
            if on_progress is not None:
                on_progress(progress)
            last = progress
        if progress.done:
            return progress
        remaining = deadline - clock()
        if remaining <= 0:
            raise RolloutTimeoutError(
                f"{canonical} {namespace}/{name} did not finish rolling out within "
                f"{timeout:g}s ({progress.describe()})",
                fix=f"check its pods (kubectl -n {namespace} rollout status {canonical}/{name}; "
                "an agent that cannot enrol crash-loops), or raise the rollout timeout",
            )
        sleep(min(poll_interval, remaining))
