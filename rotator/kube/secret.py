"""The shared Kubernetes Secret the agents read their token from: the delivery target.

Annotations carry fingerprints, never the token (DESIGN.md §3).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    ConfigError,
    KubernetesError,
)
from rotator.kube.api import (
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SECRET_NAME,
    FIELD_MANAGER,
    MANAGED_BY_LABEL,
    MAX_CONFLICTS,
    MERGE_PATCH,
    SECRET_PATH,
    SECRETS_PATH,
    ApiOp,
    KubernetesConflictError,
    KubernetesNotFoundError,
    api_request,
    b64,
    check_data_key,
    check_name,
    optional_timestamp,
)
from rotator.kube.events import record_event
from rotator.targets import Delivery, TargetState
from rotator.tokens import (
    EnrollToken,
    format_timestamp,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger("lg_rotate.kube")

DEFAULT_TOKEN_KEY = "token"  # noqa: S105 - a key name, not a secret
DEFAULT_TENANT_KEY = "tenant-id"
ANNOTATION_FINGERPRINT = "linuxguard.io/token-sha256"
ANNOTATION_ROTATED_AT = "linuxguard.io/rotated-at"
ANNOTATION_EXPIRES_AT = "linuxguard.io/expires-at"
ANNOTATION_SOURCE = "linuxguard.io/source"
ANNOTATION_ROTATION_ID = "linuxguard.io/rotation-id"


# --- the Secret target -----------------------------------------------------------------


def secret_data(token: EnrollToken, *, token_key: str, tenant_key: str) -> dict[str, str]:
    """A Secret's ``data``: the token and the tenant ID, base64. The only place the token is
    put into a Kubernetes object (the shared Secret and the per-pod ones alike)."""
    return {token_key: b64(token.value.reveal()), tenant_key: b64(token.tenant_id)}


def delivery_annotations(delivery: Delivery) -> dict[str, str]:
    """The ``linuxguard.io/*`` annotations for a delivery (DESIGN.md §3; never the token)."""
    record = delivery.record
    return {
        ANNOTATION_FINGERPRINT: record.fingerprint,
        ANNOTATION_ROTATED_AT: format_timestamp(delivery.rotated_at),
        ANNOTATION_EXPIRES_AT: format_timestamp(record.token.expires_at),
        ANNOTATION_SOURCE: delivery.source,
        ANNOTATION_ROTATION_ID: record.rotation_id,
    }


class SecretTarget:
    """The Kubernetes Secret the LinuxGuard agents read their token from.

    The Secret (type ``Opaque``) holds the token under ``token_key`` and the tenant ID
    under ``tenant_key``; its ``linuxguard.io/*`` annotations describe the delivery
    (fingerprint, rotation ID, times, source), never the token.

    :meth:`deliver` reads the Secret, then creates it if it is missing (labelled
    ``app.kubernetes.io/managed-by=lg-rotate``) or sends a JSON merge patch carrying the
    ``metadata.resourceVersion`` it read, so the API server refuses it with 409 if anyone
    changed the Secret in between. A 409 is re-read and retried (at most ``max_attempts``
    times in all), never overwritten blindly. An existing Secret keeps its labels and its
    other keys: only the two keys and the five annotations change.

    With ``events`` (the CLI's ``rotate`` and ``roll`` set it), each delivery is also
    recorded as a ``Rotated`` Event on the Secret (``kubectl events --for secret/NAME``):
    fingerprint prefix, rotation ID and expiry, never the token. Best effort: a refused
    Event is a warning, never a failed delivery.

    RBAC: ``get``, ``patch`` (``resourceNames``-scoped) and ``create`` on ``secrets``;
    ``create`` on ``events`` with ``events``.
    """

    def __init__(
        self,
        *,
        api_client: ApiClient,
        namespace: str,
        name: str = DEFAULT_SECRET_NAME,
        token_key: str = DEFAULT_TOKEN_KEY,
        tenant_key: str = DEFAULT_TENANT_KEY,
        field_manager: str = FIELD_MANAGER,
        max_attempts: int = MAX_CONFLICTS,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        events: bool = False,
    ) -> None:
        self.api_client = api_client
        self.namespace = check_name(namespace, what="the namespace", label=True)
        self.name = check_name(name, what="the Secret name")
        self.token_key = check_data_key(token_key, what="the token key")
        self.tenant_key = check_data_key(tenant_key, what="the tenant key")
        if self.token_key == self.tenant_key:
            raise ConfigError(
                f"the token key and the tenant key are both {token_key!r}",
                fix="give --token-key and --tenant-key different values",
            )
        self.field_manager = field_manager
        self.max_attempts = max(1, max_attempts)
        self.request_timeout = request_timeout
        self.attempts = 0  # write attempts made by the last deliver(), for reports and tests
        self.events = events  # a Rotated Event after each delivery (the controller has its own)

    def __repr__(self) -> str:
        return f"SecretTarget({self.location()!r})"

    def location(self) -> str:
        return f"k8s:{self.namespace}/{self.name}"

    def _op(self, verb: str, *, writes: bool = False) -> ApiOp:
        return ApiOp(
            verb=verb,
            kind="Secret",
            resource="secrets",
            group="",
            namespace=self.namespace,
            name=None if verb == "create" else self.name,
            writes=writes,
        )

    def _read_secret(self) -> dict[str, Any] | None:
        """The Secret as JSON, or None if it does not exist. Its ``data`` holds the token
        (base64): keep the dict inside this class, never log or return it."""
        try:
            secret: dict[str, Any] = api_request(
                self.api_client,
                self._op("get"),
                "GET",
                SECRET_PATH,
                timeout=self.request_timeout,
            )
        except KubernetesNotFoundError:
            return None
        return secret

    def read_state(self) -> TargetState | None:
        secret = self._read_secret()
        return None if secret is None else self._state(secret)

    def _state(self, secret: Mapping[str, Any]) -> TargetState:
        metadata = secret.get("metadata") or {}
        annotations = metadata.get("annotations") or {}
        return TargetState(
            fingerprint=annotations.get(ANNOTATION_FINGERPRINT) or None,
            rotation_id=annotations.get(ANNOTATION_ROTATION_ID) or None,
            expires_at=optional_timestamp(
                annotations.get(ANNOTATION_EXPIRES_AT), what=ANNOTATION_EXPIRES_AT
            ),
            rotated_at=optional_timestamp(
                annotations.get(ANNOTATION_ROTATED_AT), what=ANNOTATION_ROTATED_AT
            ),
            source=annotations.get(ANNOTATION_SOURCE) or None,
            revision=metadata.get("resourceVersion") or None,
        )

    def read_token(self) -> EnrollToken | None:
        """The token the agents would read now, or None if the Secret or its key is missing.

        The expiry comes from the ``linuxguard.io/expires-at`` annotation (the Secret's
        data holds only the token and the tenant). Raises TokenError for a malformed token.
        """
        secret = self._read_secret()
        if secret is None:
            return None
        data = secret.get("data") or {}
        if not data.get(self.token_key):
            return None
        annotations = (secret.get("metadata") or {}).get("annotations") or {}
        expires_at = annotations.get(ANNOTATION_EXPIRES_AT)
        if not expires_at:
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} holds a token but no "
                f"{ANNOTATION_EXPIRES_AT} annotation",
                fix="it was not written by lg-rotate: run lg-rotate rotate to replace it",
            )
        try:
            value = base64.b64decode(data[self.token_key], validate=True).decode("ascii")
            tenant = base64.b64decode(data.get(self.tenant_key) or "", validate=True).decode()
        except (binascii.Error, ValueError):
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} has data that is not valid base64 text",
                fix="run lg-rotate rotate to rewrite it",
            ) from None
        return EnrollToken.parse(value=value, tenant_id=tenant, expires_at=str(expires_at))

    def _check_writable(self, secret: Mapping[str, Any]) -> None:
        declared = secret.get("type") or "Opaque"
        if declared != "Opaque":
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} has type {declared}, not Opaque",
                fix="recreate it as an empty Opaque Secret (cronjob/base/secret.yaml) "
                "or pass another --secret name",
            )
        if secret.get("immutable"):
            raise KubernetesError(
                f"Secret {self.namespace}/{self.name} is immutable",
                fix="recreate it mutable and empty (cronjob/base/secret.yaml) "
                "or pass another --secret name",
            )

    def preflight(self) -> None:
        """Prove, before a token is minted, that :meth:`deliver` would be allowed.

        A server-side dry run (``dryRun=All``: authenticated, authorised, admitted,
        validated, never persisted) of the write :meth:`deliver` would make: a create
        with empty values when the Secret is missing, else a no-op merge patch carrying
        the ``resourceVersion`` just read. It proves the namespace exists, RBAC grants
        the verb and admission accepts the write, without a token existing yet. Also
        refuses a Secret :meth:`deliver` would refuse (not Opaque, immutable). A
        concurrent change is re-read once, then left to :meth:`deliver`.

        RBAC: the same verbs as :meth:`deliver` (a dry run needs the real verb).
        """
        for _ in range(2):
            current = self._read_secret()
            try:
                if current is None:
                    api_request(
                        self.api_client,
                        self._op("create", writes=True),
                        "POST",
                        SECRETS_PATH,
                        query={"fieldManager": self.field_manager, "dryRun": "All"},
                        body={
                            "apiVersion": "v1",
                            "kind": "Secret",
                            "type": "Opaque",
                            "metadata": {
                                "name": self.name,
                                "namespace": self.namespace,
                                "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                            },
                            "data": {self.token_key: "", self.tenant_key: ""},
                        },
                        timeout=self.request_timeout,
                    )
                else:
                    self._check_writable(current)
                    read_version = (current.get("metadata") or {}).get("resourceVersion")
                    metadata = {"resourceVersion": read_version} if read_version else {}
                    api_request(
                        self.api_client,
                        self._op("patch", writes=True),
                        "PATCH",
                        SECRET_PATH,
                        query={"fieldManager": self.field_manager, "dryRun": "All"},
                        body={"metadata": metadata},
                        content_type=MERGE_PATCH,
                        timeout=self.request_timeout,
                    )
            except KubernetesConflictError:  # created or changed since it was read
                continue
            except KubernetesNotFoundError:
                if current is None:
                    raise  # a create's 404: the namespace does not exist
                continue  # deleted since it was read: check the create instead
            logger.debug(
                "preflight: the API server would accept the %s of Secret %s/%s",
                "create" if current is None else "patch",
                self.namespace,
                self.name,
            )
            return
        logger.debug("Secret %s/%s kept changing during the preflight", self.namespace, self.name)

    def deliver(self, delivery: Delivery) -> TargetState:
        token = delivery.record.token
        annotations = delivery_annotations(delivery)
        self.attempts = 0
        for attempt in range(1, self.max_attempts + 1):
            current = self._read_secret()
            self.attempts = attempt
            if current is None:
                body = {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": {
                        "name": self.name,
                        "namespace": self.namespace,
                        "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
                        "annotations": annotations,
                    },
                    "data": secret_data(
                        token, token_key=self.token_key, tenant_key=self.tenant_key
                    ),
                }
                try:
                    written = api_request(
                        self.api_client,
                        self._op("create", writes=True),
                        "POST",
                        SECRETS_PATH,
                        query={"fieldManager": self.field_manager},
                        body=body,
                        timeout=self.request_timeout,
                    )
                except KubernetesConflictError:
                    logger.info(
                        "Secret %s/%s was created concurrently; re-reading (attempt %d of %d)",
                        self.namespace,
                        self.name,
                        attempt,
                        self.max_attempts,
                    )
                    continue
                logger.info(
                    "created Secret %s/%s with token %s",
                    self.namespace,
                    self.name,
                    token.short_fingerprint,
                )
                return self._delivered(delivery, written)

            self._check_writable(current)
            metadata: dict[str, Any] = {"annotations": annotations}
            read_version = (current.get("metadata") or {}).get("resourceVersion")
            if read_version:
                metadata["resourceVersion"] = read_version
            else:  # every real API server sets it; without it there is no concurrency check
                logger.warning(
                    "Secret %s/%s has no resourceVersion: patching without a conflict check",
                    self.namespace,
                    self.name,
                )
            patch = {
                "metadata": metadata,
                "data": secret_data(token, token_key=self.token_key, tenant_key=self.tenant_key),
            }
            try:
                written = api_request(
                    self.api_client,
                    self._op("patch", writes=True),
                    "PATCH",
                    SECRET_PATH,
                    query={"fieldManager": self.field_manager},
                    body=patch,
                    content_type=MERGE_PATCH,
                    timeout=self.request_timeout,
                )
            except (KubernetesConflictError, KubernetesNotFoundError) as exc:
                logger.info(
                    "Secret %s/%s changed since it was read (resourceVersion %s: %s); "
                    "re-reading (attempt %d of %d)",
                    self.namespace,
                    self.name,
                    read_version,
                    type(exc).__name__,
                    attempt,
                    self.max_attempts,
                )
                continue
            logger.info(
                "patched Secret %s/%s with token %s (resourceVersion %s -> %s)",
                self.namespace,
                self.name,
                token.short_fingerprint,
                read_version,
                (written.get("metadata") or {}).get("resourceVersion"),
            )
            return self._delivered(delivery, written)
        raise KubernetesConflictError(
            f"Secret {self.namespace}/{self.name} kept changing: {self.max_attempts} attempts "
            "to update it conflicted with other writers",
            fix="another writer (a second lg-rotate, a GitOps tool, an operator) is updating "
            "this Secret; make lg-rotate its only writer",
        )

    def _delivered(self, delivery: Delivery, written: Mapping[str, Any]) -> TargetState:
        """The state written; records the ``Rotated`` Event when ``events`` is on."""
        state = self._state(written)
        if self.events:
            record = delivery.record
            record_event(
                api_client=self.api_client,
                namespace=self.namespace,
                secret_name=self.name,
                reason="Rotated",
                message=f"lg-rotate delivered token sha256:{record.token.short_fingerprint} "
                f"(rotation {record.rotation_id}, from {delivery.source}, expires "
                f"{format_timestamp(record.token.expires_at)})",
                secret_uid=str((written.get("metadata") or {}).get("uid") or "") or None,
                request_timeout=min(self.request_timeout, 10.0),
            )
        return state
