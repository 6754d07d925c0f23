"""An in-process gRPC fake of Google Cloud Secret Manager (v1) for lg-rotate's tests.

No usable Secret Manager emulator installs here (TESTING.md), so this is a real gRPC
server on a loopback port whose messages are (de)serialised by the official client's own
``google.cloud.secretmanager_v1.types``: the provider talks to it through the official
``SecretManagerServiceClient`` exactly as it would talk to Google.

Semantics mirrored from the public API reference and documentation:

* resource names ``projects/<p>/secrets/<id>/versions/<n>``; requests may name a project
  by id or number, responses name it by *number* as the real service does;
* ``CreateSecret``: ALREADY_EXISTS on a duplicate; replication is required (automatic or
  user-managed with at least one replica); labels validated like GCP labels;
* ``GetSecret`` / a missing secret anywhere: NOT_FOUND;
* ``UpdateSecret``: ``update_mask`` is required and may name ``labels``,
  ``annotations`` and ``version_aliases`` (a named map is replaced whole);
  ``Secret.etag`` when set must match, otherwise FAILED_PRECONDITION (the documented
  etag failure; ``etag_mismatch_code`` switches it to ABORTED to exercise clients);
  every successful update changes the etag, even when nothing changed (documented);
* etags: a secret's etag changes only with secret updates (adding a version does not);
  a version's etag changes with enable/disable/destroy; etags are quoted strings;
* ``AddSecretVersion``: versions are numbered 1, 2, ...; ``data_crc32c`` when set is
  checked with google_crc32c (INVALID_ARGUMENT on mismatch); payloads over 64 KiB are
  INVALID_ARGUMENT;
* ``AccessSecretVersion`` / ``GetSecretVersion`` accept a number, ``latest`` (the most
  recently created version, whatever its state) or an alias; access to a DISABLED or
  DESTROYED version is FAILED_PRECONDITION; the response names the resolved version and
  carries ``data_crc32c``;
* ``ListSecretVersions``: newest first, paged; filters are refused (INVALID_ARGUMENT)
  rather than silently ignored;
* Disable / Enable / Destroy take an optional version etag; DESTROYED is terminal
  (FAILED_PRECONDITION for any further state change).

Behaviour chosen where the documentation is silent (keep tests from depending on
anything stricter): an alias naming a version that does not exist is INVALID_ARGUMENT,
one naming a DESTROYED version is FAILED_PRECONDITION (so aliases cannot be set at
creation, when no version exists); destroying an aliased version is allowed and the
alias then leads to a FAILED_PRECONDITION on access; an unknown project is NOT_FOUND.

Fault injection: :meth:`SecretManagerFake.fail_next` makes the next N calls (of one
method, or of any) fail with a status code; :meth:`SecretManagerFake.before_next` runs a
callback before the next call of a method (to simulate a concurrent writer). Every call
is recorded in :attr:`SecretManagerFake.calls`. All state is guarded by one lock.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import google_crc32c
import grpc
from google.cloud.secretmanager_v1 import types
from google.protobuf import empty_pb2

SERVICE = "google.cloud.secretmanager.v1.SecretManagerService"
MAX_PAYLOAD_BYTES = 65536
MAX_ALIASES = 50

_SECRET_ID = re.compile(r"[A-Za-z0-9_-]{1,255}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_LABEL_KEY = re.compile(r"[\w-]{0,63}", re.UNICODE)
_LABEL_VALUE = re.compile(r"[\w-]{0,63}", re.UNICODE)
_RESERVED_ALIASES = frozenset({"latest", "NEW"})

State = types.SecretVersion.State


class _AbortError(Exception):
    """Raised inside a handler to end the call with a status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


@dataclass
class _Version:
    number: int
    data: bytes
    create_time: datetime
    etag: str
    checksum_given: bool
    state: State = State.ENABLED
    destroy_time: datetime | None = None


@dataclass
class _Secret:
    project_number: int
    secret_id: str
    replication: types.Replication
    create_time: datetime
    etag: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    versions: dict[int, _Version] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"projects/{self.project_number}/secrets/{self.secret_id}"


@dataclass
class _FaultRule:
    code: grpc.StatusCode
    remaining: int
    method: str | None
    message: str
    after: bool


@dataclass(frozen=True)
class RecordedCall:
    """One RPC the fake received (the request is the deserialised proto-plus message)."""

    method: str
    request: Any
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class VersionView:
    """A snapshot of one version, for assertions."""

    number: int
    state: str
    data: bytes
    etag: str
    checksum_given: bool


@dataclass(frozen=True)
class SecretView:
    """A snapshot of one secret, for assertions."""

    name: str
    etag: str
    labels: dict[str, str]
    annotations: dict[str, str]
    aliases: dict[str, int]
    replication: str  # "automatic" or "user-managed:<loc>,<loc>"
    versions: dict[int, VersionView]


def _now() -> datetime:
    return datetime.now(UTC)


def _new_etag() -> str:
    return f'"{secrets.token_hex(8)}"'


def _crc32c(data: bytes) -> int:
    return int(google_crc32c.value(data))


class SecretManagerFake:
    """The fake service's state and its gRPC server.

    ``projects`` maps the project ids it knows to their numbers; calls naming any other
    project get NOT_FOUND.
    """

    def __init__(
        self,
        *,
        projects: Mapping[str, int] | None = None,
        etag_mismatch_code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION,
    ) -> None:
        self._lock = threading.RLock()
        self._projects: dict[str, int] = dict(projects or {"lg-test": 424242424242})
        self._secrets: dict[tuple[int, str], _Secret] = {}
        self._faults: list[_FaultRule] = []
        self._hooks: list[tuple[str, Callable[[], None]]] = []
        self._tamper_access = 0
        self.etag_mismatch_code = etag_mismatch_code
        self.calls: list[RecordedCall] = []
        self._server: grpc.Server | None = None
        self.port: int | None = None

    # --- server lifecycle ----------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake is not started")
        return f"127.0.0.1:{self.port}"

    def start(self) -> str:
        """Bind a free loopback port, start serving, return ``127.0.0.1:PORT``."""
        server = grpc.server(ThreadPoolExecutor(max_workers=8, thread_name_prefix="gcpfake"))
        server.add_generic_rpc_handlers((self._generic_handler(),))
        port = server.add_insecure_port("127.0.0.1:0")
        if port == 0:
            raise RuntimeError("the Secret Manager fake could not bind a loopback port")
        server.start()
        self._server = server
        self.port = port
        return self.endpoint

    def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None

    def __enter__(self) -> SecretManagerFake:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- test controls -------------------------------------------------------------

    def add_project(self, project_id: str, number: int) -> None:
        with self._lock:
            self._projects[project_id] = number

    def project_number(self, project_id: str) -> int:
        with self._lock:
            return self._projects[project_id]

    def fail_next(
        self,
        code: grpc.StatusCode,
        *,
        times: int = 1,
        method: str | None = None,
        message: str = "injected fault",
        after: bool = False,
    ) -> None:
        """Fail the next ``times`` calls (of ``method``, e.g. "GetSecret", or any) with ``code``.

        With ``after=True`` the call is carried out first and *then* fails: the caller
        cannot tell whether it took effect (a connection lost after the commit).
        """
        if method is not None and method not in _METHODS:
            raise ValueError(f"unknown method {method!r}")
        with self._lock:
            self._faults.append(_FaultRule(code, times, method, message, after))

    def tamper_next_access(self, *, times: int = 1) -> None:
        """Flip a bit in the next ``times`` AccessSecretVersion answers, keeping the CRC32C
        of the stored data (corruption in transit, which the client must detect)."""
        with self._lock:
            self._tamper_access += times

    def before_next(self, method: str, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, just before the next ``method`` call is handled."""
        if method not in _METHODS:
            raise ValueError(f"unknown method {method!r}")
        with self._lock:
            self._hooks.append((method, callback))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._hooks.clear()
            self._tamper_access = 0

    def pending_faults(self) -> int:
        with self._lock:
            return sum(rule.remaining for rule in self._faults)

    def reset(self) -> None:
        """Forget every secret, fault, hook and recorded call (projects stay)."""
        with self._lock:
            self._secrets.clear()
            self._faults.clear()
            self._hooks.clear()
            self._tamper_access = 0
            self.calls.clear()

    def calls_to(self, method: str) -> list[RecordedCall]:
        with self._lock:
            return [call for call in self.calls if call.method == method]

    def touch_secret(self, *, project: str, secret_id: str) -> str:
        """Change a secret's etag as a concurrent ``UpdateSecret`` would; returns the new etag."""
        with self._lock:
            secret = self._secret_by_ids(project, secret_id)
            secret.etag = _new_etag()
            return secret.etag

    def set_alias(self, *, project: str, secret_id: str, alias: str, version: int | None) -> None:
        """Point (or remove, with ``None``) an alias directly, bumping the etag."""
        with self._lock:
            secret = self._secret_by_ids(project, secret_id)
            if version is None:
                secret.aliases.pop(alias, None)
            else:
                secret.aliases[alias] = version
            secret.etag = _new_etag()

    def corrupt_version(self, *, project: str, secret_id: str, version: int, data: bytes) -> None:
        """Replace a version's stored bytes (the stored checksum is recomputed on access)."""
        with self._lock:
            self._secret_by_ids(project, secret_id).versions[version].data = data

    def snapshot(self, *, project: str, secret_id: str) -> SecretView | None:
        with self._lock:
            try:
                secret = self._secret_by_ids(project, secret_id)
            except KeyError:
                return None
            replication = "automatic"
            if "user_managed" in secret.replication:
                locations = [r.location for r in secret.replication.user_managed.replicas]
                replication = "user-managed:" + ",".join(locations)
            return SecretView(
                name=secret.name,
                etag=secret.etag,
                labels=dict(secret.labels),
                annotations=dict(secret.annotations),
                aliases=dict(secret.aliases),
                replication=replication,
                versions={
                    n: VersionView(
                        number=n,
                        state=v.state.name,
                        data=v.data,
                        etag=v.etag,
                        checksum_given=v.checksum_given,
                    )
                    for n, v in secret.versions.items()
                },
            )

    # --- plumbing ------------------------------------------------------------------

    def _generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method, (request_type, response_serializer) in _METHODS.items():
            impl = getattr(self, f"_rpc_{method}")
            handlers[method] = grpc.unary_unary_rpc_method_handler(
                self._wrap(method, impl),
                request_deserializer=request_type.deserialize,
                response_serializer=response_serializer,
            )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _wrap(
        self, method: str, impl: Callable[[Any], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def take_fault(*, after: bool) -> _FaultRule | None:
            for rule in self._faults:
                if rule.after == after and rule.method in (None, method):
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._faults.remove(rule)
                    return rule
            return None

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            metadata = tuple((m.key, str(m.value)) for m in context.invocation_metadata())
            hook: Callable[[], None] | None = None
            with self._lock:
                self.calls.append(RecordedCall(method, request, metadata))
                fault = take_fault(after=False)
                if fault is None:
                    for index, (hook_method, callback) in enumerate(self._hooks):
                        if hook_method == method:
                            hook = callback
                            del self._hooks[index]
                            break
            if fault is not None:
                context.abort(fault.code, fault.message)
            if hook is not None:
                hook()  # outside the lock: a hook may itself call the fake through a client
            try:
                with self._lock:
                    response = impl(request)
                    fault = take_fault(after=True)
                    if method == "AccessSecretVersion" and self._tamper_access > 0:
                        self._tamper_access -= 1
                        data = bytes(response.payload.data) or b"\0"
                        response.payload.data = data[:-1] + bytes([data[-1] ^ 1])
            except _AbortError as abort:
                context.abort(abort.code, abort.details)
            if fault is not None:  # the change is committed, but the caller sees a failure
                context.abort(fault.code, fault.message)
            return response

        return handle

    def _project_number(self, project: str) -> int:
        if project.isdigit() and int(project) in self._projects.values():
            return int(project)
        if project in self._projects:
            return self._projects[project]
        raise _AbortError(grpc.StatusCode.NOT_FOUND, f"Project [{project}] not found.")

    def _parse_parent(self, parent: str) -> int:
        parts = parent.split("/")
        if len(parts) != 2 or parts[0] != "projects" or not parts[1]:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value: {parent}"
            )
        return self._project_number(parts[1])

    def _secret_by_ids(self, project: str, secret_id: str) -> _Secret:
        number = self._projects[project] if not project.isdigit() else int(project)
        return self._secrets[(number, secret_id)]

    def _find_secret(self, name: str) -> _Secret:
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "secrets":
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value: {name}"
            )
        number = self._project_number(parts[1])
        secret = self._secrets.get((number, parts[3]))
        if secret is None:
            raise _AbortError(
                grpc.StatusCode.NOT_FOUND,
                f"Secret [projects/{number}/secrets/{parts[3]}] not found or has no versions.",
            )
        return secret

    def _find_version(self, name: str) -> tuple[_Secret, _Version]:
        parts = name.split("/")
        if len(parts) != 6 or parts[4] != "versions" or not parts[5]:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource field value: {name}"
            )
        secret = self._find_secret("/".join(parts[:4]))
        ref = parts[5]
        number: int | None
        if ref == "latest":
            number = max(secret.versions, default=None)
        elif ref.isdigit():
            number = int(ref)
        else:
            number = secret.aliases.get(ref)
        version = secret.versions.get(number) if number is not None else None
        if version is None:
            raise _AbortError(
                grpc.StatusCode.NOT_FOUND,
                f"Secret Version [{secret.name}/versions/{ref}] not found.",
            )
        return secret, version

    def _check_etag(self, *, given: str, stored: str, what: str) -> None:
        if given and given != stored:
            raise _AbortError(
                self.etag_mismatch_code,
                f"The etag provided in the request does not match the current etag of {what}.",
            )

    def _check_labels(self, labels: Mapping[str, str]) -> None:
        if len(labels) > 64:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, "A secret can have at most 64 labels."
            )
        for key, value in labels.items():
            bad_key = not key or not key[0].islower() or key.lower() != key
            if bad_key or not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value):
                raise _AbortError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid label: {key!r}")
            if value.lower() != value:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Invalid label value for {key!r}"
                )

    def _check_aliases(self, secret: _Secret | None, aliases: Mapping[str, int]) -> None:
        if len(aliases) > MAX_ALIASES:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"A secret can have at most {MAX_ALIASES} version aliases.",
            )
        for alias, number in aliases.items():
            if alias in _RESERVED_ALIASES or not _ALIAS.fullmatch(alias):
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Invalid version alias {alias!r}."
                )
            version = secret.versions.get(number) if secret is not None else None
            if version is None:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Version alias {alias!r} refers to version {number}, which does not exist.",
                )
            if version.state is State.DESTROYED:
                raise _AbortError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"Version alias {alias!r} refers to version {number}, which is DESTROYED.",
                )

    def _secret_proto(self, secret: _Secret) -> types.Secret:
        return types.Secret(
            name=secret.name,
            replication=secret.replication,
            create_time=secret.create_time,
            labels=secret.labels,
            annotations=secret.annotations,
            version_aliases=secret.aliases,
            etag=secret.etag,
        )

    def _version_proto(self, secret: _Secret, version: _Version) -> types.SecretVersion:
        proto = types.SecretVersion(
            name=f"{secret.name}/versions/{version.number}",
            create_time=version.create_time,
            state=version.state,
            etag=version.etag,
            client_specified_payload_checksum=version.checksum_given,
        )
        if version.destroy_time is not None:
            proto.destroy_time = version.destroy_time
        return proto

    # --- RPCs ----------------------------------------------------------------------

    def _rpc_CreateSecret(self, request: types.CreateSecretRequest) -> types.Secret:  # noqa: N802
        number = self._parse_parent(request.parent)
        if not _SECRET_ID.fullmatch(request.secret_id):
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Secret ID must be 1-255 characters of letters, digits, '-' and '_'.",
            )
        key = (number, request.secret_id)
        if key in self._secrets:
            raise _AbortError(
                grpc.StatusCode.ALREADY_EXISTS,
                f"Secret [projects/{number}/secrets/{request.secret_id}] already exists.",
            )
        body = request.secret
        replication = body.replication
        if "automatic" not in replication and "user_managed" not in replication:
            raise _AbortError(grpc.StatusCode.INVALID_ARGUMENT, "Secret.replication is required.")
        if "user_managed" in replication and not replication.user_managed.replicas:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Secret.replication.user_managed.replicas must not be empty.",
            )
        labels = dict(body.labels)
        self._check_labels(labels)
        aliases = dict(body.version_aliases)
        if aliases:
            self._check_aliases(None, aliases)  # no version exists yet: always refused
        secret = _Secret(
            project_number=number,
            secret_id=request.secret_id,
            replication=types.Replication.deserialize(types.Replication.serialize(replication)),
            create_time=_now(),
            etag=_new_etag(),
            labels=labels,
            annotations=dict(body.annotations),
        )
        self._secrets[key] = secret
        return self._secret_proto(secret)

    def _rpc_GetSecret(self, request: types.GetSecretRequest) -> types.Secret:  # noqa: N802
        return self._secret_proto(self._find_secret(request.name))

    def _rpc_DeleteSecret(self, request: types.DeleteSecretRequest) -> empty_pb2.Empty:  # noqa: N802
        secret = self._find_secret(request.name)
        self._check_etag(given=request.etag, stored=secret.etag, what=secret.name)
        del self._secrets[(secret.project_number, secret.secret_id)]
        return empty_pb2.Empty()

    def _rpc_UpdateSecret(self, request: types.UpdateSecretRequest) -> types.Secret:  # noqa: N802
        body = request.secret
        secret = self._find_secret(body.name)
        paths = list(request.update_mask.paths)
        if not paths:
            raise _AbortError(grpc.StatusCode.INVALID_ARGUMENT, "update_mask is required.")
        self._check_etag(given=body.etag, stored=secret.etag, what=secret.name)
        updates: dict[str, Any] = {}
        for path in paths:
            if path == "labels":
                labels = dict(body.labels)
                self._check_labels(labels)
                updates["labels"] = labels
            elif path == "annotations":
                updates["annotations"] = dict(body.annotations)
            elif path in ("version_aliases", "versionAliases"):
                aliases = dict(body.version_aliases)
                self._check_aliases(secret, aliases)
                updates["aliases"] = aliases
            else:
                raise _AbortError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"update_mask path {path!r} is not supported by this fake.",
                )
        for attr, value in updates.items():
            setattr(secret, attr, value)
        secret.etag = _new_etag()
        return self._secret_proto(secret)

    def _rpc_AddSecretVersion(  # noqa: N802
        self, request: types.AddSecretVersionRequest
    ) -> types.SecretVersion:
        secret = self._find_secret(request.parent)
        payload = request.payload
        data = bytes(payload.data)
        if len(data) > MAX_PAYLOAD_BYTES:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Secret payload data must be at most {MAX_PAYLOAD_BYTES} bytes.",
            )
        checksum_given = "data_crc32c" in payload
        if checksum_given and payload.data_crc32c != _crc32c(data):
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Checksum mismatch: the data_crc32c in the request does not match the data.",
            )
        number = max(secret.versions, default=0) + 1
        version = _Version(
            number=number,
            data=data,
            create_time=_now(),
            etag=_new_etag(),
            checksum_given=checksum_given,
        )
        secret.versions[number] = version
        return self._version_proto(secret, version)

    def _rpc_AccessSecretVersion(  # noqa: N802
        self, request: types.AccessSecretVersionRequest
    ) -> types.AccessSecretVersionResponse:
        secret, version = self._find_version(request.name)
        if version.state is not State.ENABLED:
            raise _AbortError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Secret Version [{secret.name}/versions/{version.number}] is in "
                f"{version.state.name} state.",
            )
        return types.AccessSecretVersionResponse(
            name=f"{secret.name}/versions/{version.number}",
            payload=types.SecretPayload(data=version.data, data_crc32c=_crc32c(version.data)),
        )

    def _rpc_GetSecretVersion(  # noqa: N802
        self, request: types.GetSecretVersionRequest
    ) -> types.SecretVersion:
        secret, version = self._find_version(request.name)
        return self._version_proto(secret, version)

    def _rpc_ListSecretVersions(  # noqa: N802
        self, request: types.ListSecretVersionsRequest
    ) -> types.ListSecretVersionsResponse:
        secret = self._find_secret(request.parent)
        if request.filter:
            raise _AbortError(
                grpc.StatusCode.INVALID_ARGUMENT, "This fake does not support filters."
            )
        newest_first = sorted(secret.versions.values(), key=lambda v: v.number, reverse=True)
        size = request.page_size if request.page_size > 0 else 25000
        size = min(size, 25000)
        try:
            start = int(request.page_token or "0")
        except ValueError:
            raise _AbortError(grpc.StatusCode.INVALID_ARGUMENT, "Invalid page token.") from None
        page = newest_first[start : start + size]
        following = start + size
        return types.ListSecretVersionsResponse(
            versions=[self._version_proto(secret, v) for v in page],
            next_page_token=str(following) if following < len(newest_first) else "",
            total_size=len(newest_first),
        )

    def _change_state(self, name: str, etag: str, state: State) -> types.SecretVersion:
        secret, version = self._find_version(name)
        self._check_etag(
            given=etag, stored=version.etag, what=f"{secret.name}/versions/{version.number}"
        )
        if version.state is State.DESTROYED:
            raise _AbortError(
                grpc.StatusCode.FAILED_PRECONDITION, "SecretVersion.state is already DESTROYED."
            )
        version.state = state
        version.etag = _new_etag()
        if state is State.DESTROYED:
            version.data = b""
            version.destroy_time = _now()
        return self._version_proto(secret, version)

    def _rpc_DisableSecretVersion(  # noqa: N802
        self, request: types.DisableSecretVersionRequest
    ) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, State.DISABLED)

    def _rpc_EnableSecretVersion(  # noqa: N802
        self, request: types.EnableSecretVersionRequest
    ) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, State.ENABLED)

    def _rpc_DestroySecretVersion(  # noqa: N802
        self, request: types.DestroySecretVersionRequest
    ) -> types.SecretVersion:
        return self._change_state(request.name, request.etag, State.DESTROYED)


def _serialize_empty(message: empty_pb2.Empty) -> bytes:
    return message.SerializeToString()


# method name -> (request type, response serializer)
_METHODS: dict[str, tuple[Any, Callable[[Any], bytes]]] = {
    "CreateSecret": (types.CreateSecretRequest, types.Secret.serialize),
    "GetSecret": (types.GetSecretRequest, types.Secret.serialize),
    "DeleteSecret": (types.DeleteSecretRequest, _serialize_empty),
    "UpdateSecret": (types.UpdateSecretRequest, types.Secret.serialize),
    "AddSecretVersion": (types.AddSecretVersionRequest, types.SecretVersion.serialize),
    "AccessSecretVersion": (
        types.AccessSecretVersionRequest,
        types.AccessSecretVersionResponse.serialize,
    ),
    "GetSecretVersion": (types.GetSecretVersionRequest, types.SecretVersion.serialize),
    "ListSecretVersions": (
        types.ListSecretVersionsRequest,
        types.ListSecretVersionsResponse.serialize,
    ),
    "DisableSecretVersion": (types.DisableSecretVersionRequest, types.SecretVersion.serialize),
    "EnableSecretVersion": (types.EnableSecretVersionRequest, types.SecretVersion.serialize),
    "DestroySecretVersion": (types.DestroySecretVersionRequest, types.SecretVersion.serialize),
}
