"""Per-pod Secrets: one token per agent pod by construction (DESIGN.md §3, "Per-pod Secrets").

The admission webhook (:mod:`rotator.kube.webhook`) creates a Secret of the pod's own while the
pod is being admitted, and points the pod's ``secretKeyRef``s at it; ``lg-rotate watch``
(:mod:`rotator.kube.controller`) then looks after those Secrets. This module is the contract
both sides share: names, labels, annotations, the Secret's body, and how to read one back.

**Naming.** At admission a pod often has no name yet (``generateName``: the DaemonSet
controller's pods are ``linuxguard-agent-`` plus a suffix chosen by the API server after the
webhooks ran) and never a UID. The per-pod Secret is therefore named after the *admission
request*: ``<shared secret>-<12 hex of the AdmissionReview request uid>``. The API server
sends the same uid when it calls the webhook again for the same request (a retry after a
timeout, a reinvocation), so a retried admission finds its Secret and mints nothing new.

**Adoption.** The pod carries the Secret's name in the ``linuxguard.io/enroll-secret``
annotation. Once the pod exists, ``watch`` sets an ownerReference from the Secret to the pod
(name and UID now known), so garbage collection deletes the Secret with its pod. A per-pod
Secret that no pod names within :data:`ADOPTION_GRACE` of its creation belongs to an admission
that never became a pod (denied by a later webhook, a quota, a dry-run by an older server) and
is deleted.

**Refresh.** A per-pod token is consumed when the pod's agent container first starts. Until
then ``watch`` replaces it before it expires (slow image pulls, a pod Pending for want of
resources); after that it is left alone: a container restart re-presents the pod's own token
(same workload identity, which LinuxGuard accepts as a replay).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rotator.kube.api import FIELD_MANAGER, MANAGED_BY_LABEL, check_name, optional_timestamp
from rotator.kube.secret import (
    ANNOTATION_EXPIRES_AT,
    ANNOTATION_FINGERPRINT,
    ANNOTATION_ROTATED_AT,
    delivery_annotations,
    secret_data,
)
from rotator.targets import Delivery

__all__ = [
    "ADOPTION_GRACE",
    "ANNOTATION_ADMISSION_UID",
    "ANNOTATION_POD",
    "ENROLL_SECRET_ANNOTATION",
    "PER_POD_LABEL",
    "SHARED_SECRET_LABEL",
    "PodSecretInfo",
    "per_pod_selector",
    "pod_secret_body",
    "pod_secret_name",
]

# On the pod: the name of its own Secret (set by the webhook's JSONPatch).
ENROLL_SECRET_ANNOTATION = "linuxguard.io/enroll-secret"  # noqa: S105 - a name, not a secret
# On the per-pod Secret: what it is and which shared Secret it stands in for.
PER_POD_LABEL = "linuxguard.io/per-pod"
SHARED_SECRET_LABEL = "linuxguard.io/shared-secret"  # noqa: S105 - a label key
ANNOTATION_ADMISSION_UID = "linuxguard.io/admission-uid"
# ``<generateName>*`` until adopted, then the pod's name.
ANNOTATION_POD = "linuxguard.io/pod"
# How long a per-pod Secret may wait for a pod to name it before it is an orphan: well past
# the longest admission (webhook timeouts are at most 30 s) and the API server's own retries.
ADOPTION_GRACE = timedelta(minutes=2)
_SUFFIX_HEX = 12


def pod_secret_name(shared_secret: str, admission_uid: str) -> str:
    """``<shared>-<12 hex of the admission uid>``; stable for retries of one admission."""
    digits = "".join(ch for ch in admission_uid.lower() if ch in "0123456789abcdef")
    if len(digits) < _SUFFIX_HEX:
        raise ValueError("an admission uid carries at least 12 hex digits")
    base = shared_secret[: 253 - _SUFFIX_HEX - 1].rstrip("-.")
    return check_name(f"{base}-{digits[:_SUFFIX_HEX]}", what="the per-pod Secret name")


def per_pod_selector(shared_secret: str) -> str:
    """The label selector of every per-pod Secret standing in for ``shared_secret``."""
    return f"{PER_POD_LABEL}=true,{SHARED_SECRET_LABEL}={shared_secret}"


def pod_secret_body(
    *,
    name: str,
    namespace: str,
    shared_secret: str,
    delivery: Delivery,
    token_key: str,
    tenant_key: str,
    admission_uid: str,
    pod_label: str,
) -> dict[str, Any]:
    """The per-pod Secret to create: the shared Secret's keys and annotations, plus the tie
    to its pod (labels, admission uid, ``pod_label``: ``<generateName>*`` or the name).

    The token is only in ``data`` (base64), as in the shared Secret.
    """
    annotations = delivery_annotations(delivery)
    annotations[ANNOTATION_ADMISSION_UID] = admission_uid
    annotations[ANNOTATION_POD] = pod_label
    token = delivery.record.token
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                MANAGED_BY_LABEL: FIELD_MANAGER,
                PER_POD_LABEL: "true",
                SHARED_SECRET_LABEL: shared_secret,
            },
            "annotations": annotations,
        },
        "data": secret_data(token, token_key=token_key, tenant_key=tenant_key),
    }


@dataclass(frozen=True, kw_only=True)
class PodSecretInfo:
    """What a per-pod Secret says about itself (its metadata only; never its data)."""

    name: str
    namespace: str
    uid: str
    resource_version: str
    created_at: datetime | None
    fingerprint: str | None
    expires_at: datetime | None
    admission_uid: str | None
    pod: str | None
    owner_pod_uid: str | None  # set once adopted
    rotated_at: datetime | None = None  # when its token was written (refresh deadline)

    @classmethod
    def from_object(cls, secret: Mapping[str, Any]) -> PodSecretInfo:
        metadata = secret.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        owner = next(
            (
                ref
                for ref in metadata.get("ownerReferences") or []
                if ref.get("kind") == "Pod" and ref.get("apiVersion") == "v1"
            ),
            None,
        )
        return cls(
            name=str(metadata.get("name", "")),
            namespace=str(metadata.get("namespace", "")),
            uid=str(metadata.get("uid", "")),
            resource_version=str(metadata.get("resourceVersion", "")),
            created_at=optional_timestamp(
                metadata.get("creationTimestamp"), what="creationTimestamp"
            ),
            fingerprint=annotations.get(ANNOTATION_FINGERPRINT),
            expires_at=optional_timestamp(
                annotations.get(ANNOTATION_EXPIRES_AT), what=ANNOTATION_EXPIRES_AT
            ),
            admission_uid=annotations.get(ANNOTATION_ADMISSION_UID),
            pod=annotations.get(ANNOTATION_POD),
            owner_pod_uid=str(owner["uid"]) if owner and owner.get("uid") else None,
            rotated_at=optional_timestamp(
                annotations.get(ANNOTATION_ROTATED_AT), what=ANNOTATION_ROTATED_AT
            ),
        )
