"""A simulated LinuxGuard agent: enrols once with the token from its environment.

Used by ``lg-rotate demo`` and the tests as the consumer at the end of the pipeline;
run it as ``python -m rotator.agent``. Like the real agent (vendor page "Enrollment
tokens", "Why the agent unsets the env var at startup") it:

* reads ``LINUXGUARD_ENROLL_TOKEN`` first thing and removes it from its environment
  before doing anything else (there is deliberately no ``--enroll-token`` flag: argv
  is world-readable through ``/proc/<pid>/cmdline``);
* takes the tenant from ``LINUXGUARD_TENANT_ID`` (or ``--tenant-id``) and sends it even
  when empty, so a missing tenant shows the server's
  ``400 tenantId required for TOTP enrollment``;
* derives its workload id from ``--workload-id`` or from ``LINUXGUARD_NODE_NAME`` +
  ``LINUXGUARD_POD_UID`` (the Downward API inputs);
* POSTs ``{base}/agent/enroll`` (base from ``--url`` or ``LINUXGUARD_URL``) and prints
  ONE JSON line: result, HTTP status, identity id, the token's fingerprint prefix and
  the workload id, never the token.

Exit codes: 0 enrolled (a replay of the same workload's enrolment counts), 1 refused
by the server (4xx), 2 configuration (no token, no workload id, no URL), 3 server
unreachable or failing (5xx) after a few attempts.

``python -m rotator.agent start [--tls-cache DIR]`` is the vendor agent's long-running
form, the *agent double* of the end-to-end suite (its image: tests/e2e/agent/Dockerfile):
it takes ``LINUXGUARD_ENROLL_TOKEN`` and ``LINUXGUARD_TENANT_ID`` out of its environment
first, enrols, logs the vendor's lines (``enrolled ...`` then a ``heartbeat`` line every
``--heartbeat`` seconds, or ``enrolment failed: 409 conflict ...``, ``enrolment failed:
400 tenantId required for TOTP enrollment``, ``enrolment failed: 400 enrollment token
expired``) and on failure exits non-zero, so that a kubelet's restart back-off applies.
With ``--tls-cache`` it keeps the vendor's ``.tag`` (SHA-256 of token + workload id, never
the token): an unchanged tag on restart reuses the cached enrolment without an enrol call.

About ``/proc/self/environ``: removing a variable with ``os.environ.pop`` (libc
``unsetenv``) only drops it from the C ``environ`` array; the kernel keeps showing the
original exec-time block in ``/proc/<pid>/environ``. On Linux with glibc this module
therefore also overwrites the value in that block (found through ``getenv``) with NUL
bytes before unsetting it, so the file shows ``LINUXGUARD_ENROLL_TOKEN=`` followed by
NULs. Where that is not possible (no ``ctypes``/libc, another OS) only ``os.environ``
is cleaned; ``--report-environ`` says which of the two still carries the token.
Copies forked before the scrub (a shell wrapper in front of the agent) are out of
reach: exec the agent directly, as the vendor page says.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rotator.tokens import REDACTED, TOKEN_SHAPED, Secret

ENROLL_TOKEN_ENV = "LINUXGUARD_ENROLL_TOKEN"  # noqa: S105 - a variable name
TENANT_ENV = "LINUXGUARD_TENANT_ID"
URL_ENV = "LINUXGUARD_URL"
NODE_NAME_ENV = "LINUXGUARD_NODE_NAME"
POD_UID_ENV = "LINUXGUARD_POD_UID"
ENROLL_PATH = "/agent/enroll"

EXIT_ENROLLED = 0
EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


@dataclass(frozen=True, kw_only=True)
class EnrollResult:
    """How one enrolment ended.

    ``result``: ``enrolled``, ``conflict`` (409: another workload owns the token),
    ``expired``, ``tenant-required``, ``unknown-token`` (401), ``wrong-tenant`` (403),
    ``rejected`` (another 4xx), ``unavailable`` (5xx or no connection), or
    ``config-error`` (the agent could not even try).
    """

    result: str
    status: int | None
    identity_id: str | None
    token_fingerprint: str | None
    workload_id: str
    tenant_id: str
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.result == "enrolled"

    @property
    def exit_code(self) -> int:
        if self.ok:
            return EXIT_ENROLLED
        if self.result == "config-error":
            return EXIT_CONFIG
        if self.result == "unavailable":
            return EXIT_UNAVAILABLE
        return EXIT_REFUSED

    def as_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "status": self.status,
            "identity_id": self.identity_id,
            "token_fingerprint": self.token_fingerprint,
            "workload_id": self.workload_id,
            "tenant_id": self.tenant_id,
            "error": self.error,
        }


def token_fingerprint(token: Secret) -> str:
    """The first 12 hex digits of SHA-256 over the canonical form (as lg-rotate shows it)."""
    canonical = token.reveal().strip().upper().replace("-", "")
    return hashlib.sha256(canonical.encode("utf-8", "replace")).hexdigest()[:12]


def workload_id_from(*, node_name: str, pod_uid: str) -> str:
    """A stable hex workload id for one pod on one node (the Downward API inputs)."""
    return hashlib.sha256(f"{node_name}/{pod_uid}".encode()).hexdigest()[:32]


def _scrub_exec_environ(name: str) -> None:
    """Overwrite ``name``'s value in the C environment block (best effort, glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        libc.getenv.argtypes = [ctypes.c_char_p]
        libc.strlen.restype = ctypes.c_size_t
        libc.strlen.argtypes = [ctypes.c_void_p]
        address = libc.getenv(name.encode())
        if address:
            ctypes.memset(address, 0, libc.strlen(address))
    except (OSError, AttributeError, ImportError):  # no libc to talk to: os.environ only
        return


def take_enroll_token(env: MutableMapping[str, str] | None = None) -> Secret | None:
    """Read ``LINUXGUARD_ENROLL_TOKEN`` and remove it from the environment at once.

    With the real environment (the default) the exec-time copy is overwritten too
    (see the module docstring).
    """
    if env is None or env is os.environ:
        if ENROLL_TOKEN_ENV not in os.environ:
            return None
        value = os.environ[ENROLL_TOKEN_ENV]
        _scrub_exec_environ(ENROLL_TOKEN_ENV)
        del os.environ[ENROLL_TOKEN_ENV]
        return Secret(value)
    if ENROLL_TOKEN_ENV not in env:
        return None
    return Secret(env.pop(ENROLL_TOKEN_ENV))


def environ_report(token: Secret | None) -> dict[str, bool | None]:
    """Whether the token is still visible in ``os.environ`` and ``/proc/self/environ``."""
    in_proc: bool | None = None
    if token is not None and token.reveal():
        try:
            with open("/proc/self/environ", "rb") as handle:
                in_proc = token.reveal().encode() in handle.read()
        except OSError:
            in_proc = None
    return {
        "enroll_token_in_os_environ": ENROLL_TOKEN_ENV in os.environ,
        "enroll_token_in_proc_environ": in_proc,
    }


def _classify(status: int, message: str) -> str:  # noqa: PLR0911 - a lookup ladder
    if status == 200:
        return "enrolled"
    if status == 409:
        return "conflict"
    if status == 401:
        return "unknown-token"
    if status == 403:
        return "wrong-tenant"
    if status == 400 and "expired" in message:
        return "expired"
    if status == 400 and "tenantId required" in message:
        return "tenant-required"
    if status >= 500 or status in {408, 429}:
        return "unavailable"
    return "rejected"


def enroll(
    *,
    url: str,
    tenant_id: str,
    token: Secret,
    workload_id: str,
    timeout: float = 5.0,
    attempts: int = 3,
    retry_delay: float = 0.2,
    sleep: Callable[[float], None] = time.sleep,
) -> EnrollResult:
    """POST one enrolment to ``{url}/agent/enroll``; retry only unreachable/5xx answers."""
    fingerprint = token_fingerprint(token)
    parts = urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        return EnrollResult(
            result="config-error",
            status=None,
            identity_id=None,
            token_fingerprint=fingerprint,
            workload_id=workload_id,
            tenant_id=tenant_id,
            error=f"not an http(s) URL: {url!r}",
        )
    body = json.dumps(
        {"tenantId": tenant_id, "enrollCode": token.reveal(), "workloadId": workload_id}
    ).encode()
    path = parts.path.rstrip("/") + ENROLL_PATH
    result: EnrollResult | None = None
    for attempt in range(1, max(1, attempts) + 1):
        result = _post_once(
            parts.scheme,
            parts.hostname,
            parts.port,
            path,
            body,
            timeout=timeout,
            fingerprint=fingerprint,
            workload_id=workload_id,
            tenant_id=tenant_id,
        )
        if result.result != "unavailable" or attempt >= attempts:
            break
        sleep(retry_delay * attempt)
    assert result is not None
    return result


def _post_once(
    scheme: str,
    host: str,
    port: int | None,
    path: str,
    body: bytes,
    *,
    timeout: float,
    fingerprint: str,
    workload_id: str,
    tenant_id: str,
) -> EnrollResult:
    def outcome(
        result: str, status: int | None, identity: str | None, error: str | None
    ) -> EnrollResult:
        return EnrollResult(
            result=result,
            status=status,
            identity_id=identity,
            token_fingerprint=fingerprint,
            workload_id=workload_id,
            tenant_id=tenant_id,
            error=error,
        )

    connection: http.client.HTTPConnection
    if scheme == "https":
        connection = http.client.HTTPSConnection(
            host, port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        status = response.status
        raw = response.read(256 * 1024)
    except (OSError, http.client.HTTPException) as exc:
        return outcome("unavailable", None, None, f"cannot reach the server: {type(exc).__name__}")
    finally:
        connection.close()
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    document = document if isinstance(document, dict) else {}
    message = document.get("error") if isinstance(document.get("error"), str) else None
    safe = TOKEN_SHAPED.sub(REDACTED, " ".join(message.split()))[:200] if message else None
    identity = document.get("identityId") if isinstance(document.get("identityId"), str) else None
    result = _classify(status, message or "")
    if result == "enrolled" and identity is None:
        return outcome("rejected", status, None, "200 without an identityId")
    return outcome(result, status, identity, safe)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rotator.agent",
        description="Simulated LinuxGuard agent: enrol once with $LINUXGUARD_ENROLL_TOKEN.",
    )
    parser.add_argument("--url", help=f"LinuxGuard base URL (default: ${URL_ENV})")
    parser.add_argument("--tenant-id", help=f"tenant to enrol into (default: ${TENANT_ENV})")
    parser.add_argument(
        "--workload-id",
        help=f"workload identity (default: derived from ${NODE_NAME_ENV} + ${POD_UID_ENV})",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP attempt")
    parser.add_argument("--attempts", type=int, default=3, help="attempts while unreachable")
    parser.add_argument(
        "--report-environ",
        action="store_true",
        help="add whether the token is still in os.environ and /proc/self/environ",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["start"]:
        return start(arguments[1:])
    # First thing, before parsing anything: take the token out of the environment.
    token = take_enroll_token()
    args = _parser().parse_args(argv)
    env = os.environ
    tenant_id = (args.tenant_id if args.tenant_id is not None else env.get(TENANT_ENV, "")).strip()
    workload_id = (args.workload_id or "").strip()
    if not workload_id and env.get(NODE_NAME_ENV) and env.get(POD_UID_ENV):
        workload_id = workload_id_from(node_name=env[NODE_NAME_ENV], pod_uid=env[POD_UID_ENV])
    url = (args.url or env.get(URL_ENV, "")).strip()
    problem = None
    if token is None or not token.reveal().strip():
        problem = f"${ENROLL_TOKEN_ENV} is not set or empty"
    elif not workload_id:
        problem = f"no workload id: pass --workload-id or set ${NODE_NAME_ENV} and ${POD_UID_ENV}"
    elif not url:
        problem = f"no server: pass --url or set ${URL_ENV}"
    if problem is not None:
        result = EnrollResult(
            result="config-error",
            status=None,
            identity_id=None,
            token_fingerprint=token_fingerprint(token) if token else None,
            workload_id=workload_id,
            tenant_id=tenant_id,
            error=problem,
        )
    else:
        assert token is not None
        result = enroll(
            url=url,
            tenant_id=tenant_id,
            token=token,
            workload_id=workload_id,
            timeout=args.timeout,
            attempts=args.attempts,
        )
    line = result.as_json()
    if args.report_environ:
        line.update(environ_report(token))
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
    return result.exit_code


TLS_CACHE_TAG = ".tag"


def cache_tag(token: Secret, workload_id: str) -> str:
    """The vendor's ``.tag``: a hash of token + workload id (the token is not recoverable)."""
    canonical = token.reveal().strip().upper().replace("-", "")
    return hashlib.sha256(f"{canonical}\0{workload_id}".encode()).hexdigest()


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def start(argv: Sequence[str]) -> int:
    """The long-running agent: enrol once, then heartbeat until SIGTERM (see the docstring)."""
    token = take_enroll_token()  # first thing, before parsing anything
    tenant_id = os.environ.pop(TENANT_ENV, "").strip()
    parser = argparse.ArgumentParser(prog="python -m rotator.agent start")
    parser.add_argument("--url", help=f"LinuxGuard base URL (default: ${URL_ENV})")
    parser.add_argument("--tls-cache", help="directory for the enrolment's .tag")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between lines")
    args = parser.parse_args(argv)
    env = os.environ
    workload_id = ""
    if env.get(NODE_NAME_ENV) and env.get(POD_UID_ENV):
        workload_id = workload_id_from(node_name=env[NODE_NAME_ENV], pod_uid=env[POD_UID_ENV])
    url = (args.url or env.get(URL_ENV, "")).strip()
    if token is None or not token.reveal().strip() or not workload_id or not url:
        _say(
            f"enrolment failed: configuration: need ${ENROLL_TOKEN_ENV}, ${NODE_NAME_ENV} + "
            f"${POD_UID_ENV} and ${URL_ENV}"
        )
        return EXIT_CONFIG
    tag = cache_tag(token, workload_id)
    tag_file = os.path.join(args.tls_cache, TLS_CACHE_TAG) if args.tls_cache else None
    identity: str | None = None
    if tag_file is not None and os.path.exists(tag_file):
        with open(tag_file, encoding="ascii") as handle:
            cached = handle.read().split()
        if cached[:1] == [tag] and len(cached) > 1:
            identity = cached[1]
            _say(f"enrolled: identity {identity} from the TLS cache (token and workload unchanged)")
    if identity is None:
        result = enroll(url=url, tenant_id=tenant_id, token=token, workload_id=workload_id)
        if result.result != "enrolled" or result.identity_id is None:
            _say(
                f"enrolment failed: {result.status or 'no answer'} {result.error or result.result}"
            )
            return result.exit_code
        identity = result.identity_id
        if tag_file is not None:
            os.makedirs(os.path.dirname(tag_file), exist_ok=True)
            with open(tag_file, "w", encoding="ascii") as handle:
                handle.write(f"{tag} {identity}\n")
        _say(
            f"enrolled: identity {identity} tenant {tenant_id} workload {workload_id} "
            f"token {result.token_fingerprint}"
        )
    del token  # consumed: nothing needs it any more
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        time.sleep(args.heartbeat)
        _say(f"heartbeat: identity {identity}")


if __name__ == "__main__":
    raise SystemExit(main())
