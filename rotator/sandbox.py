"""A faithful LinuxGuard sandbox: the token API and the agent enrolment endpoint.

Used by ``lg-rotate sandbox``, ``lg-rotate demo``, the test-suite and users' own
pipelines. It keeps the vendor semantics (DESIGN.md §3, the vendor page
"Enrollment tokens"):

``POST /api/tokens/new`` (``Authorization: Bearer <api key>``, JSON ``{"tenantId",
"ttlSeconds"?}``)
    ``401`` without a known API key; ``400`` without ``tenantId`` or with a
    ``ttlSeconds`` outside [60, 3600] (rejected, not clamped: LinuxGuard enforces the
    tenant policy); ``403`` when the key is bound to another tenant; otherwise ``201``
    ``{"token", "tenantId", "expiresAt", "ttlSeconds"}``. Tokens are random base32,
    24 characters by default, printed in dash groups of four like the console does.

``POST /agent/enroll`` (JSON ``{"tenantId", "enrollCode", "workloadId"}``)
    ``400 {"error": "tenantId required for TOTP enrollment"}`` when the tenant is empty
    and a code is set; ``400`` without a code or a workload id; ``401`` for a code the
    sandbox never issued (the agent's credential is wrong: same status as a bad key);
    ``403`` for a code issued to another tenant; for a code already bound to a workload:
    the same workload gets the cached answer again (idempotent replay, ``200``), another
    one ``409 conflict`` (both even after expiry: the binding outlives the TTL); an
    unbound expired code ``400 {"error": "enrollment token expired"}``; otherwise the
    code is bound to the workload and ``200`` carries a fake identity and cert chain.
    Codes compare case-insensitively and ignore dashes.

Knobs for tests (methods) and pipelines (``/_sandbox/*``, can be disabled):
failing the next N requests (optionally one path) with a status, a ``Retry-After``,
added latency, or a dropped connection; odd answers for the next mints
(``malformed``, ``not-json``, ``wrong-tenant``, ``expired``, ``short-ttl``); a clock
that can be advanced. ``GET /healthz`` is always there for readiness checks.

The sandbox keeps only fingerprints of the tokens it issued, never the values, and
never logs a token.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import os
import secrets
import signal
import socket
import stat
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from rotator.durations import format_duration, parse_whole_seconds
from rotator.tokens import REDACTED, TOKEN_SHAPED, fingerprint, format_timestamp, utcnow

_LOGGER = logging.getLogger("lg_rotate.sandbox")

MINT_PATH = "/api/tokens/new"
ENROLL_PATH = "/agent/enroll"
HEALTH_PATH = "/healthz"
ADMIN_PREFIX = "/_sandbox/"
DEFAULT_PORT = 8470
DEFAULT_TTL = timedelta(seconds=600)
MIN_REQUEST_TTL = 60
MAX_REQUEST_TTL = 3600
SHORT_TTL_SECONDS = 5
TENANT_REQUIRED_MESSAGE = "tenantId required for TOTP enrollment"
EXPIRED_MESSAGE = "enrollment token expired"
MINT_MODES = ("malformed", "not-json", "wrong-tenant", "expired", "short-ttl")
MintMode = Literal["malformed", "not-json", "wrong-tenant", "expired", "short-ttl"]
Grouping = Literal["grouped", "bare", "alternate"]
_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_MAX_BODY = 64 * 1024


def canonical_code(raw: str) -> str:
    """How the enrolment endpoint compares codes: trimmed, upper-case, no dashes."""
    return raw.strip().upper().replace("-", "")


@dataclass(frozen=True, kw_only=True)
class Fault:
    """What to do to the next ``count`` matching requests.

    ``status=None`` answers normally (after ``latency_ms``); ``drop`` closes the
    connection with a reset instead of answering. ``path=None`` matches every path
    except ``/healthz`` and ``/_sandbox/*``.
    """

    status: int | None = 503
    count: int = 1
    path: str | None = None
    retry_after: str | None = None
    latency_ms: int = 0
    drop: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "count": self.count,
            "path": self.path,
            "retryAfter": self.retry_after,
            "latencyMs": self.latency_ms,
            "drop": self.drop,
        }


@dataclass(frozen=True, kw_only=True)
class MintRecord:
    """One token the sandbox issued (fingerprint only)."""

    fingerprint: str
    tenant_id: str
    expires_at: datetime
    ttl_seconds: int
    mode: str | None


@dataclass(frozen=True, kw_only=True)
class EnrolmentRecord:
    """One enrolment attempt and how it ended.

    ``result`` is one of ``ok``, ``replay``, ``conflict``, ``expired``, ``unknown-token``,
    ``wrong-tenant``, ``tenant-required``, ``bad-request``.
    """

    fingerprint: str | None
    tenant_id: str
    workload_id: str
    result: str
    status: int
    identity_id: str | None
    at: datetime


@dataclass(kw_only=True)
class _PendingFault:
    fault: Fault
    left: int


@dataclass
class _IssuedToken:
    tenant_id: str
    expires_at: datetime
    owner: str | None = None
    answer: dict[str, Any] | None = None


@dataclass
class _Answer:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    drop: bool = False


def _error(status: int, message: str, **headers: str) -> _Answer:
    return _Answer(status, {"error": message}, dict(headers))


class SandboxServer:
    """The sandbox as an in-process server: ``start()``/``stop()`` or a context manager.

    ``api_keys`` maps each accepted API key to the tenant it is bound to, or ``None``
    for any tenant; without it one any-tenant key is generated (``.api_key``).
    ``clock`` returns an aware UTC datetime; :meth:`advance_clock` moves the sandbox's
    notion of time forward without sleeping.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ttl: timedelta = DEFAULT_TTL,
        api_keys: Mapping[str, str | None] | None = None,
        clock: Callable[[], datetime] = utcnow,
        admin: bool = True,
        token_length: int = 24,
        grouping: Grouping = "grouped",
    ) -> None:
        if not 24 <= token_length <= 32:
            raise ValueError("token_length must be 24-32")
        self.host = host
        self._requested_port = port
        self.ttl = ttl
        self._initial_ttl = ttl
        self.admin = admin
        self.token_length = token_length
        self.grouping: Grouping = grouping
        self._clock = clock
        self._initial_keys = dict(api_keys) if api_keys else {_new_key(): None}
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._styles = itertools.cycle(("grouped", "bare"))
        self._reset_locked(keep_keys=False)

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> SandboxServer:
        if self._http is not None:
            raise RuntimeError("the sandbox is already running")
        self._stopping.clear()
        server = _HTTPServer((self.host, self._requested_port), _Handler)
        server.sandbox = self
        self._http = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"lg-sandbox-{self.port}",
            daemon=True,
        )
        self._thread.start()
        _LOGGER.info("LinuxGuard sandbox listening on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._http, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping on injected latency
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._http = self._thread = None

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the sandbox is not running")
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._http is not None

    # --- keys, clock, faults ------------------------------------------------------

    @property
    def api_key(self) -> str:
        """An any-tenant key (the first one), or the first key if all are bound."""
        with self._lock:
            for key, tenant in self._keys.items():
                if tenant is None:
                    return key
            return next(iter(self._keys))

    def add_api_key(self, key: str | None = None, *, tenant_id: str | None = None) -> str:
        """Accept ``key`` (generated when omitted), bound to ``tenant_id`` or to any tenant."""
        key = key or _new_key()
        with self._lock:
            self._keys[key] = tenant_id
        return key

    def remove_api_key(self, key: str) -> None:
        with self._lock:
            self._keys.pop(key, None)

    def now(self) -> datetime:
        with self._lock:
            return self._clock() + self._clock_offset

    def advance_clock(self, seconds: float) -> datetime:
        with self._lock:
            self._clock_offset += timedelta(seconds=seconds)
            return self.now()

    def inject_fault(
        self,
        *,
        status: int | None = 503,
        count: int = 1,
        path: str | None = None,
        retry_after: str | int | None = None,
        latency_ms: int = 0,
        drop: bool = False,
    ) -> Fault:
        """Apply a fault to the next ``count`` requests (to ``path`` only, if given)."""
        if count < 1:
            raise ValueError("count must be at least 1")
        if status is not None and not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        fault = Fault(
            status=status,
            count=count,
            path=path,
            retry_after=None if retry_after is None else str(retry_after),
            latency_ms=max(0, latency_ms),
            drop=drop,
        )
        with self._lock:
            self._faults.append(_PendingFault(fault=fault, left=count))
        return fault

    def set_mint_mode(self, mode: MintMode, *, count: int = 1) -> None:
        """Answer the next ``count`` successful mints in an odd way (see ``MINT_MODES``)."""
        if mode not in MINT_MODES:
            raise ValueError(f"unknown mint mode {mode!r}; known: {', '.join(MINT_MODES)}")
        with self._lock:
            self._mint_modes.extend([mode] * count)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._mint_modes.clear()

    def reset(self, *, keep_keys: bool = False) -> None:
        """Forget tokens, counters, faults, clock offset and TTL changes; keys back to the
        initial set unless ``keep_keys``."""
        with self._lock:
            self._reset_locked(keep_keys=keep_keys)

    def _reset_locked(self, *, keep_keys: bool) -> None:
        if not keep_keys:
            self._keys: dict[str, str | None] = dict(self._initial_keys)
        self.ttl = self._initial_ttl
        self._clock_offset = timedelta(0)
        self._faults: list[_PendingFault] = []
        self._mint_modes: list[str] = []
        self._tokens: dict[str, _IssuedToken] = {}
        self._minted: list[MintRecord] = []
        self._enrolments: list[EnrolmentRecord] = []
        self._requests: Counter[str] = Counter()
        self._mint_results: Counter[str] = Counter()
        self._faults_served = 0

    # --- inspection ---------------------------------------------------------------

    def requests(self, path: str | None = None) -> int:
        """How many requests reached ``path`` (all API paths when None), faults included."""
        with self._lock:
            if path is None:
                return sum(self._requests.values())
            return self._requests[path]

    def minted(self) -> list[MintRecord]:
        with self._lock:
            return list(self._minted)

    def enrolments(self) -> list[EnrolmentRecord]:
        with self._lock:
            return list(self._enrolments)

    def owners(self) -> dict[str, str]:
        """Token fingerprint -> the workload id it is bound to (bound tokens only)."""
        with self._lock:
            return {fp: t.owner for fp, t in self._tokens.items() if t.owner is not None}

    def state(self) -> dict[str, Any]:
        """Counters as ``GET /_sandbox/state`` shows them (no token values, no keys)."""
        with self._lock:
            now = self.now()
            return {
                "now": format_timestamp(now),
                "clockOffsetSeconds": self._clock_offset.total_seconds(),
                "ttlSeconds": int(self.ttl.total_seconds()),
                "mints": len(self._minted),
                "mintResults": dict(self._mint_results),
                "enrolments": dict(Counter(record.result for record in self._enrolments)),
                "tokens": {
                    "issued": len(self._tokens),
                    "bound": sum(1 for t in self._tokens.values() if t.owner is not None),
                    "expired": sum(1 for t in self._tokens.values() if t.expires_at <= now),
                },
                "requests": dict(self._requests),
                "faults": {
                    "pending": [
                        {**pending.fault.as_json(), "remaining": pending.left}
                        for pending in self._faults
                    ],
                    "served": self._faults_served,
                    "mintModes": list(self._mint_modes),
                },
                "apiKeys": len(self._keys),
            }

    # --- request handling (called by the HTTP handler) ----------------------------

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for pending in self._faults:
                if pending.fault.path in {None, path}:
                    pending.left -= 1
                    if pending.left <= 0:
                        self._faults.remove(pending)
                    self._faults_served += 1
                    return pending.fault
            return None

    def _handle_api(self, method: str, path: str, authorization: str, body: bytes) -> _Answer:
        with self._lock:
            self._requests[path] += 1
        fault = self._take_fault(path)
        faulted = self._fault_answer(fault) if fault is not None else None
        if faulted is not None:
            return faulted
        if path not in {MINT_PATH, ENROLL_PATH}:
            return _error(404, "not found")
        if method != "POST":
            return _error(405, "method not allowed", Allow="POST")
        if path == MINT_PATH:
            return self._mint(authorization, body)
        return self._enroll(body)

    def _fault_answer(self, fault: Fault) -> _Answer | None:
        """The answer a fault imposes, or None to answer normally (after its latency)."""
        if fault.latency_ms and self._stopping.wait(fault.latency_ms / 1000):
            return _Answer(503, {"error": "sandbox stopping"}, drop=True)
        if fault.drop:
            return _Answer(0, None, drop=True)
        if fault.status is None:
            return None
        extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "injected"
        return _Answer(fault.status, {"error": f"sandbox fault: {phrase}"}, extra)

    def _mint(self, authorization: str, body: bytes) -> _Answer:
        answer = self._mint_answer(authorization, body)
        if answer.status >= 400:
            with self._lock:
                self._mint_results[f"http-{answer.status}"] += 1
        return answer

    def _mint_answer(self, authorization: str, body: bytes) -> _Answer:
        known, bound_tenant = self._authenticate(authorization)
        if not known:
            return _error(401, "invalid API key", **{"WWW-Authenticate": "Bearer"})
        document = _json_object(body)
        if document is None:
            return _error(400, "the request body must be a JSON object")
        tenant_id = document.get("tenantId")
        if not isinstance(tenant_id, str) or not tenant_id.strip():
            return _error(400, "tenantId required")
        tenant_id = tenant_id.strip()
        ttl_seconds = int(self.ttl.total_seconds())
        if "ttlSeconds" in document and document["ttlSeconds"] is not None:
            requested = document["ttlSeconds"]
            if (
                not isinstance(requested, int)
                or isinstance(requested, bool)
                or not MIN_REQUEST_TTL <= requested <= MAX_REQUEST_TTL
            ):
                return _error(
                    400,
                    f"ttlSeconds must be an integer between {MIN_REQUEST_TTL} and "
                    f"{MAX_REQUEST_TTL}",
                )
            ttl_seconds = requested
        if bound_tenant is not None and bound_tenant != tenant_id:
            return _error(403, f"this API key may not mint tokens for tenant {tenant_id}")
        return self._issue(tenant_id=tenant_id, ttl_seconds=ttl_seconds)

    def _issue(self, *, tenant_id: str, ttl_seconds: int) -> _Answer:
        with self._lock:
            mode = self._mint_modes.pop(0) if self._mint_modes else None
            now = self.now()
            code = "".join(secrets.choice(_BASE32) for _ in range(self.token_length))
            token_tenant = tenant_id
            if mode == "malformed":
                # Digits 0, 1, 8 and 9 are outside the base32 alphabet.
                code = code[:-4] + "0189"
            elif mode == "wrong-tenant":
                token_tenant = f"{tenant_id}-other"
            elif mode == "expired":
                ttl_seconds = -1
            elif mode == "short-ttl":
                ttl_seconds = SHORT_TTL_SECONDS
            expires_at = now + timedelta(seconds=ttl_seconds)
            digest = fingerprint(code)
            if mode != "malformed":
                self._tokens[digest] = _IssuedToken(tenant_id=token_tenant, expires_at=expires_at)
            self._minted.append(
                MintRecord(
                    fingerprint=digest,
                    tenant_id=token_tenant,
                    expires_at=expires_at,
                    ttl_seconds=ttl_seconds,
                    mode=mode,
                )
            )
            self._mint_results[mode or "ok"] += 1
            style = self.grouping if self.grouping != "alternate" else next(self._styles)
        if mode == "not-json":
            page = b"<html><body>LinuxGuard sandbox: maintenance</body></html>"
            return _Answer(200, None, {"Content-Type": "text/html"}, raw=page)
        shown = _group(code) if style == "grouped" and mode != "malformed" else code
        _LOGGER.debug(
            "minted token %s for tenant %r (%ss, mode %s)",
            digest[:12],
            tenant_id,
            ttl_seconds,
            mode,
        )
        return _Answer(
            201,
            {
                "token": shown,
                "tenantId": token_tenant,
                "expiresAt": format_timestamp(expires_at),
                "ttlSeconds": ttl_seconds,
            },
        )

    def _authenticate(self, header: str) -> tuple[bool, str | None]:
        """``(known, bound tenant or None)`` for the bearer credential in ``header``."""
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return False, None
        with self._lock:
            keys = list(self._keys.items())
        known, bound = False, None
        for key, tenant in keys:
            # Compare against every key so the timing says nothing about which matched.
            if secrets.compare_digest(key.encode(), credential.encode()):
                known, bound = True, tenant
        return known, bound

    def _enroll(self, body: bytes) -> _Answer:  # noqa: PLR0911 - one answer per rule
        document = _json_object(body)
        if document is None:
            return self._enrolment(None, "", "", "bad-request", _error(400, "invalid JSON body"))
        tenant_id = _text(document.get("tenantId"))
        code = _text(document.get("enrollCode"))
        workload_id = _text(document.get("workloadId"))
        digest = fingerprint(canonical_code(code)) if code.isascii() and code else None
        if not code:
            answer = _error(400, "enrollCode required (API-key enrolment is not simulated)")
            return self._enrolment(None, tenant_id, workload_id, "bad-request", answer)
        if not tenant_id:
            answer = _error(400, TENANT_REQUIRED_MESSAGE)
            return self._enrolment(digest, tenant_id, workload_id, "tenant-required", answer)
        if not workload_id:
            answer = _error(400, "workloadId required")
            return self._enrolment(digest, tenant_id, workload_id, "bad-request", answer)
        with self._lock:
            issued = self._tokens.get(digest) if digest else None
            if issued is None:
                answer = _error(401, "invalid enrollment token")
                return self._enrolment(digest, tenant_id, workload_id, "unknown-token", answer)
            if issued.tenant_id != tenant_id:
                answer = _error(403, "enrollment token not valid for this tenant")
                return self._enrolment(digest, tenant_id, workload_id, "wrong-tenant", answer)
            if issued.owner is not None:
                if issued.owner == workload_id and issued.answer is not None:
                    answer = _Answer(200, issued.answer)
                    return self._enrolment(digest, tenant_id, workload_id, "replay", answer)
                answer = _error(409, "conflict: enrollment token already used by another workload")
                return self._enrolment(digest, tenant_id, workload_id, "conflict", answer)
            now = self.now()
            if issued.expires_at <= now:
                answer = _error(400, EXPIRED_MESSAGE)
                return self._enrolment(digest, tenant_id, workload_id, "expired", answer)
            identity = {
                "identityId": f"lgid-{secrets.token_hex(8)}",
                "tenantId": tenant_id,
                "workloadId": workload_id,
                "enrolledAt": format_timestamp(now),
                "certChain": [_fake_certificate(), _fake_certificate()],
            }
            issued.owner = workload_id
            issued.answer = identity
            return self._enrolment(digest, tenant_id, workload_id, "ok", _Answer(200, identity))

    def _enrolment(
        self,
        digest: str | None,
        tenant_id: str,
        workload_id: str,
        result: str,
        answer: _Answer,
    ) -> _Answer:
        identity = answer.body.get("identityId") if isinstance(answer.body, dict) else None
        with self._lock:
            self._enrolments.append(
                EnrolmentRecord(
                    fingerprint=digest,
                    tenant_id=tenant_id,
                    workload_id=workload_id,
                    result=result,
                    status=answer.status,
                    identity_id=identity,
                    at=self.now(),
                )
            )
        _LOGGER.debug(
            "enrolment %s for workload %r: %s (%d)",
            digest[:12] if digest else "-",
            workload_id,
            result,
            answer.status,
        )
        return answer

    def _handle_admin(  # noqa: PLR0911 - one answer per endpoint
        self, method: str, path: str, body: bytes
    ) -> _Answer:
        action = path[len(ADMIN_PREFIX) :]
        if action == "state" and method == "GET":
            return _Answer(200, self.state())
        if action == "reset" and method == "POST":
            self.reset(keep_keys=True)
            return _Answer(200, self.state())
        if action == "faults" and method == "DELETE":
            self.clear_faults()
            return _Answer(200, self.state())
        if action == "faults" and method == "POST":
            document = _json_any(body)
            items = document if isinstance(document, list) else [document]
            try:
                for item in items:
                    self._admin_fault(item)
            except (TypeError, ValueError) as exc:
                return _error(400, f"bad fault: {exc}")
            return _Answer(201, self.state())
        if action == "clock" and method == "POST":
            document = _json_object(body)
            seconds = None if document is None else document.get("advanceSeconds")
            if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                return _error(400, "advanceSeconds (a number) required")
            now = self.advance_clock(float(seconds))
            return _Answer(200, {"now": format_timestamp(now)})
        if action == "keys" and method == "POST":
            document = _json_object(body) or {}
            tenant = document.get("tenantId")
            if tenant is not None and not isinstance(tenant, str):
                return _error(400, "tenantId must be a string")
            return _Answer(201, {"apiKey": self.add_api_key(tenant_id=tenant or None)})
        if action in {"state", "reset", "faults", "clock", "keys"}:
            return _error(405, "method not allowed")
        return _error(404, "no such sandbox endpoint")

    def _admin_fault(self, item: object) -> None:
        if not isinstance(item, dict):
            raise TypeError("each fault must be a JSON object")
        count = item.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool):
            raise TypeError("count must be an integer")
        if "mintMode" in item:
            mode = item["mintMode"]
            if mode not in MINT_MODES:
                raise ValueError(f"mintMode must be one of {', '.join(MINT_MODES)}")
            self.set_mint_mode(mode, count=count)
            return
        status = item.get("status", 503)
        latency = item.get("latencyMs", 0)
        retry_after = item.get("retryAfter")
        path = item.get("path")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool)):
            raise TypeError("status must be an integer or null")
        if not isinstance(latency, int) or isinstance(latency, bool):
            raise TypeError("latencyMs must be an integer")
        if retry_after is not None and not isinstance(retry_after, str | int):
            raise TypeError("retryAfter must be a string or an integer")
        if path is not None and not isinstance(path, str):
            raise TypeError("path must be a string")
        self.inject_fault(
            status=status,
            count=count,
            path=path,
            retry_after=retry_after,
            latency_ms=latency,
            drop=bool(item.get("drop", False)),
        )


# --- HTTP plumbing ----------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    sandbox: SandboxServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout, reset) is normal here; keep stderr clean.
        _LOGGER.debug("connection from %s ended with an error", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "LinuxGuardSandbox/1"

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        sandbox = self.server.sandbox
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            answer = _error(413, "request body too large")
        elif path == HEALTH_PATH:
            answer = _Answer(200, {"status": "ok"})
        elif path.startswith(ADMIN_PREFIX):
            answer = (
                sandbox._handle_admin(method, path, body)
                if sandbox.admin
                else _error(404, "the sandbox admin endpoints are disabled")
            )
        else:
            answer = sandbox._handle_api(method, path, self.headers.get("Authorization", ""), body)
        self._send(answer)

    def _read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > _MAX_BODY:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, answer: _Answer) -> None:
        if answer.drop:
            # An abortive close: the client sees a reset, as from a crashing backend.
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        payload = answer.raw if answer.raw is not None else json.dumps(answer.body).encode()
        self.send_response(answer.status)
        headers = {"Content-Type": "application/json", **answer.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        text = TOKEN_SHAPED.sub(REDACTED, format % args)
        _LOGGER.debug("%s %s", self.address_string(), text)


def _json_any(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError:
        return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    document = _json_any(body)
    return document if isinstance(document, dict) else None


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


def _group(code: str) -> str:
    return "-".join(code[i : i + 4] for i in range(0, len(code), 4))


def _new_key() -> str:
    return f"lgsbx-{secrets.token_hex(16)}"


def _fake_certificate() -> str:
    der = b"LinuxGuard sandbox certificate, not a real one: " + secrets.token_bytes(48)
    body = base64.encodebytes(der).decode().strip()
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


# --- CLI ----------------------------------------------------------------------------------


SANDBOX_DESCRIPTION = """\
A local stand-in for the LinuxGuard API, to try lg-rotate and to test pipelines without a
LinuxGuard tenant. It mints tokens (POST /api/tokens/new) and enrols agents
(POST /agent/enroll) by LinuxGuard's rules: a token lives --ttl seconds, belongs to the
first workload that enrols with it (any other workload gets 409, the same one gets its
answer again), and is refused with 400 once expired. It prints its URL and how to get its
API key, then serves until Ctrl-C or SIGTERM. Tokens are kept in memory, as fingerprints
only; nothing is written to disk except the key file you ask for."""

SANDBOX_EPILOG = """\
try it:
  lg-rotate sandbox --port 8787 --api-key-file ./sandbox-key
  lg-rotate rotate --provider memory --tenant acme --target none \\
      --linuxguard-url http://127.0.0.1:8787 --api-key-file ./sandbox-key

fault injection (off with --no-admin), to rehearse outages in a pipeline:
  curl -s -X POST http://127.0.0.1:8787/_sandbox/faults \\
      -d '{"status": 503, "count": 2, "retryAfter": 1}'
  GET  /_sandbox/state    counters: mints, enrolments, requests, pending faults
  POST /_sandbox/faults   fail, delay or drop the next requests; odd mint answers
  DELETE /_sandbox/faults, POST /_sandbox/clock, /_sandbox/keys, /_sandbox/reset
  GET  /healthz           readiness
Every endpoint, with examples: docs/SANDBOX.md."""


def _duration_seconds(text: str) -> int:
    """``600`` or ``10m``: whole seconds (rotator.durations)."""
    try:
        return parse_whole_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_sandbox_arguments(parser: argparse.ArgumentParser) -> None:
    """The options and help of ``lg-rotate sandbox``."""
    parser.description = SANDBOX_DESCRIPTION
    parser.epilog = SANDBOX_EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; 0.0.0.0 to reach it from "
        "containers: plain HTTP, for test networks only)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port to listen on, 0 for any free one (default: %(default)s)",
    )
    parser.add_argument(
        "--ttl",
        type=_duration_seconds,
        default=int(DEFAULT_TTL.total_seconds()),
        metavar="DURATION",
        help="lifetime of minted tokens, unless a mint request asks for one between "
        f"{format_duration(MIN_REQUEST_TTL)} and {format_duration(MAX_REQUEST_TTL)} "
        f"(default: {format_duration(DEFAULT_TTL.total_seconds())})",
    )
    parser.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="read the API key from PATH, or write a generated one there (mode 0600); "
        "without it $LINUXGUARD_API_KEY is used, or a generated key is printed",
    )
    parser.add_argument(
        "--bind-tenant",
        metavar="TENANT",
        help="the API key may mint only for TENANT (default: any tenant)",
    )
    parser.add_argument(
        "--no-admin",
        dest="admin",
        action="store_false",
        help="turn off the /_sandbox/* endpoints (faults, clock, keys, reset): "
        "for a sandbox shared with others",
    )
    parser.add_argument(
        "--token-length",
        type=int,
        default=24,
        choices=range(24, 33),
        metavar="24-32",
        help="base32 characters per token (default: %(default)s)",
    )
    parser.add_argument(
        "--grouping",
        choices=("grouped", "bare", "alternate"),
        default="grouped",
        help="how tokens are printed: dash groups of four, bare, or alternating",
    )


def _sandbox_key(*, api_key_file: str | None, env: Mapping[str, str]) -> tuple[str, str]:
    """The key to accept and a note telling the user how to get it."""
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as handle:
                existing = handle.read().strip()
        except FileNotFoundError:
            existing = ""
        if existing:
            return existing, f"API key read from {api_key_file}"
        key = _new_key()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        descriptor = os.open(api_key_file, flags, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(key + "\n")
        return key, f"API key written to {api_key_file} (use --api-key-file {api_key_file})"
    from_env = env.get("LINUXGUARD_API_KEY", "").strip()
    if from_env:
        return from_env, "API key: the value of $LINUXGUARD_API_KEY"
    key = _new_key()
    return key, f"sandbox-only API key: export LINUXGUARD_API_KEY={key}"


def serve_forever(
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    ttl: timedelta = DEFAULT_TTL,
    api_keys: Mapping[str, str | None],
    key_note: str = "",
    admin: bool = True,
    token_length: int = 24,
    grouping: Grouping = "grouped",
    announce: Callable[[str], None] = print,
    stop: threading.Event | None = None,
) -> int:
    """Run the sandbox until SIGINT/SIGTERM (or ``stop`` is set); print one line first."""
    stop = stop or threading.Event()
    sandbox = SandboxServer(
        host=host,
        port=port,
        ttl=ttl,
        api_keys=api_keys,
        admin=admin,
        token_length=token_length,
        grouping=grouping,
    )
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            sandbox.start()
        except OSError as exc:
            from rotator.errors import ConfigError

            raise ConfigError(
                f"the sandbox cannot listen on {host}:{port}: {exc.strerror or exc}",
                fix="choose another --port, or --port 0 for any free one",
            ) from None
        admin_note = "admin /_sandbox/* on" if admin else "admin off"
        parts = [part for part in (admin_note, key_note) if part]
        announce(f"LinuxGuard sandbox listening on {sandbox.url} ({'; '.join(parts)})")
        while not stop.wait(0.5):
            pass
    finally:
        sandbox.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 0


def run_sandbox_command(args: argparse.Namespace) -> int:
    """``lg-rotate sandbox``: what the CLI calls with the parsed arguments."""
    key, note = _sandbox_key(api_key_file=args.api_key_file, env=os.environ)
    return serve_forever(
        host=args.host,
        port=args.port,
        ttl=timedelta(seconds=args.ttl),
        api_keys={key: args.bind_tenant or None},
        key_note=note,
        admin=args.admin,
        token_length=args.token_length,
        grouping=args.grouping,
        announce=lambda line: print(line, flush=True),
    )


def main(argv: Iterable[str] | None = None) -> int:
    """``python -m rotator.sandbox`` (the same as ``lg-rotate sandbox``)."""
    parser = argparse.ArgumentParser(prog="lg-rotate sandbox")
    add_sandbox_arguments(parser)
    return run_sandbox_command(parser.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
