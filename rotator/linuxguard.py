"""The LinuxGuard API client: mint an enrolment token, validate it, hand it over.

The contract (DESIGN.md §3, README "LinuxGuard API"):

* ``POST {base}/api/tokens/new`` with ``Authorization: Bearer <api key>`` and JSON
  ``{"tenantId": "...", "ttlSeconds": N?}``;
* ``200``/``201`` JSON ``{"token", "tenantId", "expiresAt" (RFC 3339), "ttlSeconds"}``;
* transient, retried until the budget is spent: ``5xx``, ``408``, ``429`` (``Retry-After`` in
  seconds or as an HTTP date is honoured), timeouts, refused/reset connections, DNS
  failures;
* final: every other ``4xx`` (``400``/``401``/``403``/``404`` with a specific fix) and
  redirects (never followed: that would send the API key to another address).

The answer is validated before anyone else sees it: JSON shape, token format, the
tenant asked for, and at least ``min_ttl`` left. The token stays wrapped in
:class:`~rotator.tokens.Secret`; messages name the URL, the tenant and the cause,
never the token or the API key.

Only the standard library's ``http.client`` is used, so importing this module is cheap.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import ssl
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

from rotator import __version__
from rotator.errors import (
    ConfigError,
    SourceError,
    SourceRejectedError,
    SourceUnavailableError,
    TransientSourceError,
)
from rotator.retrying import RetriesExhausted, RetryPolicy
from rotator.tokens import REDACTED, TOKEN_SHAPED, EnrollToken, Secret, format_timestamp, utcnow

API_KEY_ENV = "LINUXGUARD_API_KEY"
MINT_PATH = "/api/tokens/new"
USER_AGENT = f"lg-rotate/{__version__}"
_MAX_BODY = 1024 * 1024
_MAX_MESSAGE = 200
_LOGGER = logging.getLogger("lg_rotate.linuxguard")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_TOKEN_LIKE_ANYWHERE = re.compile(r"(?:[A-Za-z2-7]{4}-){5,7}[A-Za-z2-7]{1,4}|[A-Za-z2-7]{24,}")


def _is_transient(error: BaseException) -> bool:
    return isinstance(error, TransientSourceError)


def sanitize_server_message(text: str, *, secrets: tuple[str, ...] = ()) -> str:
    """A server's error text made safe to show: one line, short, no token or key in it."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _ANSI_ESCAPE.sub(" ", text)
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = TOKEN_SHAPED.sub(REDACTED, " ".join(text.split()))
    # Server text is untrusted: also catch token-like runs glued to other characters.
    text = _TOKEN_LIKE_ANYWHERE.sub(REDACTED, text)
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """``Retry-After`` as seconds to wait: delta-seconds or an HTTP date; None if absent/bad."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or utcnow())).total_seconds())


class LinuxGuardClient:
    """Mints enrolment tokens from one LinuxGuard API endpoint.

    ``timeout`` bounds each HTTP attempt (connect and read); ``retry`` bounds the whole
    call: transient failures are retried with backoff and jitter until its budget
    (``--mint-budget``) is spent, however many attempts that takes. ``clock`` is the
    wall clock the token's expiry is checked against; ``ssl_context`` overrides the
    default certificate verification (for a private CA).
    """

    def __init__(
        self,
        *,
        base_url: str,
        api_key: Secret,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        user_agent: str = USER_AGENT,
        ssl_context: ssl.SSLContext | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        parts = urlsplit(base_url.strip())
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ConfigError(
                f"the LinuxGuard URL {base_url!r} is not an http(s) URL",
                fix="pass --linuxguard-url https://<your LinuxGuard host>",
            )
        if parts.username or parts.password:
            raise ConfigError(
                "the LinuxGuard URL must not carry credentials",
                fix="remove user:password@ from --linuxguard-url; the API key goes in "
                f"{API_KEY_ENV} or --api-key-file",
            )
        if parts.query or parts.fragment:
            raise ConfigError(
                f"the LinuxGuard URL {base_url!r} must not have a query or fragment",
                fix="pass the API base URL only, e.g. https://linuxguard.example.com",
            )
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigError(
                f"the LinuxGuard URL {base_url!r} has an invalid port",
                fix="pass --linuxguard-url https://<host>[:port]",
            ) from exc
        if not api_key.reveal().strip():
            raise ConfigError("the LinuxGuard API key is empty", fix=_API_KEY_FIX)
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")
        self._api_key = api_key
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._user_agent = user_agent
        self._ssl_context = ssl_context
        self._clock = clock
        netloc = parts.netloc.rsplit("@", 1)[-1]
        self.base_url = f"{parts.scheme}://{netloc}{self._prefix}"
        self.mint_url = f"{self.base_url}{MINT_PATH}"

    def __repr__(self) -> str:
        return f"LinuxGuardClient(base_url={self.base_url!r}, api_key={self._api_key!r})"

    @property
    def is_loopback_http(self) -> bool:
        """Plain http to a loopback host (acceptable for the sandbox only)."""
        return self._scheme == "http" and self._host in {"127.0.0.1", "localhost", "::1"}

    def mint(
        self,
        *,
        tenant_id: str,
        min_ttl: timedelta,
        ttl_seconds: int | None = None,
        deadline: float | None = None,
    ) -> EnrollToken:
        """Mint a token for ``tenant_id``; transient failures are retried until the budget ends.

        ``deadline`` (a time on the retry policy's monotonic clock) may shorten the
        budget further. Raises ``SourceUnavailableError`` when transient failures
        outlast the budget, ``SourceRejectedError`` on a final answer, and a
        ``TokenError`` when the answer fails validation.
        """
        if not tenant_id or not tenant_id.strip():
            raise ConfigError("no tenant ID to mint a token for", fix="pass --tenant")
        tenant_id = tenant_id.strip()
        body: dict[str, Any] = {"tenantId": tenant_id}
        if ttl_seconds is not None:
            body["ttlSeconds"] = int(ttl_seconds)
        payload = json.dumps(body).encode()
        limit = self._retry.deadline_from_now()
        if deadline is not None:
            limit = min(limit, deadline)
        started = self._retry.clock()
        attempts = 0

        def attempt() -> tuple[int, bytes]:
            nonlocal attempts
            attempts += 1
            remaining = limit - self._retry.clock()
            return self._post(payload, timeout=max(0.1, min(self._timeout, remaining)))

        try:
            status, raw = self._retry.call(
                attempt,
                is_transient=_is_transient,
                describe=f"mint a token for tenant {tenant_id!r} from {self.mint_url}",
                logger=_LOGGER,
                deadline=limit,
            )
        except RetriesExhausted as exhausted:
            cause = exhausted.last_error
            reason = cause.message if isinstance(cause, SourceError) else str(cause)
            raise SourceUnavailableError(
                f"LinuxGuard at {self.mint_url} stayed unavailable after "
                f"{exhausted.attempts} attempt(s) in {exhausted.elapsed:.1f}s "
                f"({exhausted.reason}); last error: {reason}",
                fix="check that --linuxguard-url is reachable from here (DNS, proxy, "
                "NetworkPolicy egress) and LinuxGuard's status; retry later",
            ) from cause
        token = self._validate(status, raw, tenant_id=tenant_id, min_ttl=min_ttl)
        _LOGGER.info(
            "minted token %s for tenant %r, expires %s (%ds left), %d attempt(s) in %.2fs",
            token.short_fingerprint,
            tenant_id,
            format_timestamp(token.expires_at),
            int(token.ttl_left(now=self._clock()).total_seconds()),
            attempts,
            self._retry.clock() - started,
        )
        return token

    # --- one HTTP attempt -----------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self._scheme == "https":
            context = self._ssl_context or ssl.create_default_context()
            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _post(self, payload: bytes, *, timeout: float) -> tuple[int, bytes]:
        """One POST; returns (status, body) for a success, raises for anything else."""
        headers = {
            "Authorization": f"Bearer {self._api_key.reveal()}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        connection = self._connection(timeout)
        try:
            connection.request("POST", f"{self._prefix}{MINT_PATH}", body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(_MAX_BODY + 1)
            status = response.status
            retry_after = response.getheader("Retry-After")
            location = response.getheader("Location")
        except ssl.SSLCertVerificationError as exc:
            raise SourceError(
                f"the TLS certificate of {self.mint_url} is not trusted: {exc.verify_message}",
                fix="use the right --linuxguard-url, or trust its CA (SSL_CERT_FILE)",
            ) from exc
        except ssl.SSLEOFError as exc:
            raise TransientSourceError("the TLS connection was cut") from exc
        except ssl.SSLError as exc:
            raise SourceError(
                f"TLS with {self.mint_url} failed: {exc.reason or type(exc).__name__}",
                fix="check whether --linuxguard-url should be http:// or https://",
            ) from exc
        except TimeoutError as exc:
            raise TransientSourceError(f"no answer within {timeout:.1f}s") from exc
        except ConnectionRefusedError as exc:
            raise TransientSourceError("connection refused") from exc
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
            raise TransientSourceError("connection reset by the server") from exc
        except socket.gaierror as exc:
            raise TransientSourceError(f"cannot resolve {self._host!r}: {exc.strerror}") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise TransientSourceError(f"connection failed: {type(exc).__name__}") from exc
        finally:
            connection.close()
        if status in {200, 201}:
            return status, raw
        self._raise_for(status, raw, retry_after=retry_after, location=location)
        raise AssertionError("unreachable")  # pragma: no cover

    def _raise_for(
        self, status: int, raw: bytes, *, retry_after: str | None, location: str | None
    ) -> None:
        message = self._server_message(raw)
        detail = f": {message}" if message else ""
        if status in {408, 429} or status >= 500:
            wait = parse_retry_after(retry_after, now=self._clock())
            hint = f" (Retry-After {wait:.1f}s)" if wait is not None else ""
            raise TransientSourceError(f"HTTP {status}{hint}{detail}", retry_after=wait)
        where = f"LinuxGuard ({self.mint_url}) answered {status}"
        if status == 401:
            raise SourceRejectedError(
                f"{where}: the API key is invalid or revoked{detail}",
                status=status,
                fix=_API_KEY_FIX,
            )
        if status == 403:
            raise SourceRejectedError(
                f"{where}: the API key is not allowed to mint tokens for this tenant{detail}",
                status=status,
                fix="use an API key issued for this tenant, or check --tenant",
            )
        if status == 404:
            raise SourceRejectedError(
                f"{where}: no such API path",
                status=status,
                fix=f"check --linuxguard-url: it must be the API base URL, without {MINT_PATH}",
            )
        if 300 <= status < 400:
            target = sanitize_server_message(location or "", secrets=(self._api_key.reveal(),))
            raise SourceRejectedError(
                f"{where}: a redirect to {target or 'an unnamed location'} (not followed)",
                status=status,
                fix="set --linuxguard-url to the final API address",
            )
        if status == 400:
            raise SourceRejectedError(
                f"{where}: the request was refused{detail or ' (no message)'}",
                status=status,
                fix="check --tenant and --ttl against the tenant's policy",
            )
        raise SourceRejectedError(
            f"{where}{detail}",
            status=status,
            fix="check the LinuxGuard API version and --linuxguard-url",
        )

    def _server_message(self, raw: bytes) -> str:
        text = raw[:4096].decode("utf-8", errors="replace")
        try:
            document = json.loads(text)
        except ValueError:
            pass
        else:
            if isinstance(document, dict):
                for key in ("error", "message", "detail"):
                    if isinstance(document.get(key), str):
                        text = document[key]
                        break
        return sanitize_server_message(text, secrets=(self._api_key.reveal(),))

    # --- validation -------------------------------------------------------------------

    def _validate(
        self, status: int, raw: bytes, *, tenant_id: str, min_ttl: timedelta
    ) -> EnrollToken:
        def shape_error(what: str) -> SourceRejectedError:
            return SourceRejectedError(
                f"LinuxGuard ({self.mint_url}) answered {status} but {what}",
                status=status,
                fix="check that --linuxguard-url is the LinuxGuard API (not a proxy or a "
                "login page) and that its version matches the documented contract",
            )

        if len(raw) > _MAX_BODY:
            raise shape_error("the body is larger than 1 MiB")
        try:
            document = json.loads(raw)
        except ValueError:
            # No chaining: the decoder's error keeps the body, which may hold a token.
            raise shape_error("the body is not JSON") from None
        if not isinstance(document, dict):
            raise shape_error("the body is not a JSON object")
        for key in ("token", "tenantId", "expiresAt"):
            if not isinstance(document.get(key), str):
                raise shape_error(f'"{key}" is missing or not a string')
        ttl = document.get("ttlSeconds")
        if ttl is not None and (not isinstance(ttl, int) or isinstance(ttl, bool)):
            raise shape_error('"ttlSeconds" is not an integer')
        token = EnrollToken.parse(
            value=document["token"],
            tenant_id=document["tenantId"],
            expires_at=document["expiresAt"],
        )
        token.check_usable(tenant_id=tenant_id, min_ttl=min_ttl, now=self._clock())
        return token


_API_KEY_FIX = f"check {API_KEY_ENV} or the file given to --api-key-file"


def load_api_key(
    *,
    env: MutableMapping[str, str] = os.environ,
    api_key_file: str | None = None,
) -> Secret:
    """Read the LinuxGuard API key from ``api_key_file`` or ``$LINUXGUARD_API_KEY``.

    The environment variable is removed from ``env`` once read (and also when the
    file wins), so that processes lg-rotate starts never inherit the key; with the
    default ``os.environ`` this unsets it in the real process environment too, and erases
    it from the exec-time block ``/proc/<pid>/environ`` shows (:mod:`rotator.environ`).
    """
    from_env = env.pop(API_KEY_ENV, None)
    if env is os.environ:
        from rotator.environ import scrub_exec_environ

        scrub_exec_environ([API_KEY_ENV])
    if api_key_file is not None:
        try:
            with open(api_key_file, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"cannot read the API key file {api_key_file!r}: "
                f"{getattr(exc, 'strerror', None) or type(exc).__name__}",
                fix="check the path given to --api-key-file and its permissions",
            ) from exc
        source = f"the API key file {api_key_file!r}"
    elif from_env is not None:
        text = from_env
        source = f"${API_KEY_ENV}"
    else:
        raise ConfigError(
            "no LinuxGuard API key given",
            fix=f"set {API_KEY_ENV} or pass --api-key-file PATH",
        )
    key = text.strip()
    if not key:
        raise ConfigError(f"{source} is empty", fix=_API_KEY_FIX)
    if any(not ch.isprintable() or ch.isspace() for ch in key):
        raise ConfigError(
            f"{source} holds more than one line or whitespace inside the key",
            fix="put only the API key in it",
        )
    return Secret(key)
