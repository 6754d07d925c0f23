"""Kubernetes Events on the Secret (``kubectl events --for secret/NAME`` shows them).

Best effort, fingerprints only: anything token-shaped is redacted before it leaves.
"""

from __future__ import annotations

import logging
import socket
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from rotator.errors import (
    LgRotateError,
)
from rotator.kube.api import (
    EVENTS_PATH,
    FIELD_MANAGER,
    MANAGED_BY_LABEL,
    METADATA_ONE,
    SECRET_PATH,
    ApiOp,
    api_request,
)
from rotator.tokens import (
    REDACTED,
    TOKEN_SHAPED,
    format_timestamp,
    utcnow,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

logger = logging.getLogger("lg_rotate.kube")

_EVENT_MESSAGE_LIMIT = 1024


def record_event(
    *,
    api_client: ApiClient,
    namespace: str,
    secret_name: str,
    reason: str,
    message: str,
    type: str = "Normal",  # the Event field's own name
    secret_uid: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    request_timeout: float = 10.0,
) -> bool:
    """Record a core/v1 Event on the Secret (``kubectl events --for secret/NAME`` shows it;
    ``kubectl describe secret`` lists no Events).

    Best effort: a failure is logged and swallowed (returns False). Anything token-shaped
    in ``message`` is redacted before it leaves the process. RBAC: ``create`` on
    ``events``.
    """
    safe_message = TOKEN_SHAPED.sub(REDACTED, message)[:_EVENT_MESSAGE_LIMIT]
    now = format_timestamp(clock())
    host = socket.gethostname()
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "name": secret_name,
        "namespace": namespace,
    }
    if secret_uid is None:
        secret_uid = read_secret_uid(api_client, namespace, secret_name, request_timeout)
    if secret_uid:  # kubectl describe matches events by the object's uid
        involved["uid"] = secret_uid
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{secret_name}.{uuid.uuid4().hex[:16]}",
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: FIELD_MANAGER},
        },
        "involvedObject": involved,
        "reason": reason,
        "message": safe_message,
        "type": type,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": FIELD_MANAGER, "host": host},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": host,
    }
    op = ApiOp(
        verb="create",
        kind="Event",
        resource="events",
        group="",
        namespace=namespace,
        name=None,
        writes=True,
    )
    try:
        api_request(api_client, op, "POST", EVENTS_PATH, body=body, timeout=request_timeout)
    except LgRotateError as exc:
        logger.warning(
            "could not record the %s event on Secret %s/%s: %s",
            reason,
            namespace,
            secret_name,
            exc.one_line(),
        )
        return False
    except Exception as exc:  # events are best effort: never fail a rotation for one
        logger.warning(
            "could not record the %s event on Secret %s/%s: %s",
            reason,
            namespace,
            secret_name,
            exc.__class__.__name__,
        )
        return False
    return True


def read_secret_uid(api_client: ApiClient, namespace: str, name: str, timeout: float) -> str | None:
    op = ApiOp(
        verb="get",
        kind="Secret",
        resource="secrets",
        group="",
        namespace=namespace,
        name=name,
        writes=False,
    )
    try:
        secret = api_request(
            api_client, op, "GET", SECRET_PATH, accept=METADATA_ONE, timeout=timeout
        )
    except LgRotateError:
        return None
    uid = (secret.get("metadata") or {}).get("uid")
    return str(uid) if uid else None
