"""AWS Secrets Manager provider: one secret per tenant, rotations as version stages.

Mapping onto the provider protocol (AWS's own rotation idiom):

* the record is the JSON ``SecretString`` of a secret version;
* ``write_pending`` adds a version labelled ``AWSPENDING`` with
  ``ClientRequestToken`` derived from the rotation id, so a retried write (by
  botocore or by a resumed rotation) lands on the same ``VersionId``;
* ``promote`` moves ``AWSCURRENT`` to the version (AWS moves ``AWSPREVIOUS`` to the
  old one) and then takes ``AWSPENDING`` off it;
* ``prune`` removes the staging labels of versions beyond the newest ``keep``; AWS
  treats unlabelled versions as deprecated and deletes them itself.

The first version of a secret always becomes ``AWSCURRENT`` (CreateSecret with a
value, or the first PutSecretValue whatever stages it asks for). A token must not be
current before it was delivered, so a new secret starts with a *placeholder*
version (no token) as ``AWSCURRENT``; ``read(current)`` treats it as "nothing yet".

Credentials come only from the standard boto3 chain (IRSA web identity, environment,
profiles, instance roles), never from flags. boto3/botocore are imported inside the
functions that need them, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from providers.base import (
    ProviderOption,
    Stage,
    StoredRecord,
    record_from_json,
    record_to_json,
    render_template,
)
from rotator.errors import (
    ConfigError,
    LgRotateError,
    StoreConflictError,
    StoreDataError,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from rotator.tokens import REDACTED, TOKEN_SHAPED, EnrollToken, utcnow

if TYPE_CHECKING:
    from botocore.config import Config

log = logging.getLogger("lg_rotate.aws")

DEFAULT_SECRET_NAME = "linuxguard/<tenant>/enroll-token"  # noqa: S105 (a name, not a value)
DEFAULT_DESCRIPTION = "LinuxGuard enrolment token, rotated by lg-rotate"
DEFAULT_MAX_ATTEMPTS = 4  # in all, the first attempt included
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 10.0

CURRENT = "AWSCURRENT"
PENDING = "AWSPENDING"
PREVIOUS = "AWSPREVIOUS"
_LABELS = {Stage.CURRENT: CURRENT, Stage.PENDING: PENDING}

# ClientRequestTokens are derived deterministically from rotation ids in this namespace.
_TOKEN_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://linuxguard.io/lg-rotate/aws")
PLACEHOLDER_SECRET_STRING = json.dumps(
    {
        "note": "no token promoted yet: lg-rotate writes tokens as AWSPENDING "
        "and promotes them to AWSCURRENT after delivery",
        "placeholder": True,
        "schema": "lg-rotate/v1",
    },
    separators=(",", ":"),
    sort_keys=True,
)

IAM_ACTIONS = (
    "secretsmanager:CreateSecret",
    "secretsmanager:DescribeSecret",
    "secretsmanager:GetSecretValue",
    "secretsmanager:PutSecretValue",
    "secretsmanager:UpdateSecretVersionStage",
    "secretsmanager:ListSecretVersionIds",
    "secretsmanager:TagResource",
)
KMS_ACTIONS = ("kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt")

_TRANSIENT_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "InternalServiceError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "AuthFailure",
        "RequestExpired",
    }
)
_DENIED_CODES = frozenset({"AccessDeniedException", "AccessDenied", "UnauthorizedOperation"})
_FINAL_REQUEST_CODES = frozenset(
    {
        "InvalidParameterException",
        "InvalidParameterValue",
        "InvalidRequestException",
        "ValidationException",
        "LimitExceededException",
        "MalformedPolicyDocumentException",
        "PreconditionNotMetException",
    }
)
_CREDENTIAL_FIX = (
    "give the process AWS credentials through the standard chain: IRSA (a ServiceAccount "
    "annotated with eks.amazonaws.com/role-arn), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
    "or AWS_PROFILE; refresh expired session credentials"
)

_filter_lock = threading.Lock()


def client_request_token(rotation_id: str) -> str:
    """The ``ClientRequestToken`` (and so the ``VersionId``) for a rotation.

    AWS wants 32-64 characters; a rotation id that is already a canonical UUID is used
    as is (so the version id matches the rotation id a human sees), anything else is
    mapped to a UUID5, which is deterministic: a retry gets the same token.
    """
    try:
        parsed = uuid.UUID(rotation_id)
    except ValueError:
        parsed = None
    if parsed is not None and str(parsed) == rotation_id:
        return rotation_id
    return str(uuid.uuid5(_TOKEN_NAMESPACE, rotation_id))


def parse_tags(text: str | None) -> dict[str, str]:
    """``"team=sec,env=prod"`` -> ``{"team": "sec", "env": "prod"}``."""
    tags: dict[str, str] = {}
    if not text or not text.strip():
        return tags
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--aws-tags item {item.strip()!r} is not KEY=VALUE",
                fix="write tags as key=value pairs separated by commas, e.g. team=sec,env=prod",
            )
        tags[key.strip()] = value.strip()
    return tags


def client_config(
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> Config:
    """botocore's own retry policy: standard mode (throttling, 5xx, connection errors)."""
    from botocore.config import Config

    return Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        user_agent_extra="lg-rotate",
    )


def make_client(
    *,
    region: str | None = None,
    profile: str | None = None,
    endpoint_url: str | None = None,
    config: Config | None = None,
) -> Any:
    """A Secrets Manager client from the standard boto3 credential and region chain.

    ``endpoint_url`` only when given: otherwise boto3 honours
    ``AWS_ENDPOINT_URL_SECRETS_MANAGER`` / ``AWS_ENDPOINT_URL`` itself.
    """
    import boto3.session
    from botocore.exceptions import BotoCoreError, ProfileNotFound

    install_log_redaction()
    try:
        session = boto3.session.Session(profile_name=profile or None, region_name=region or None)
    except ProfileNotFound as exc:
        raise ConfigError(
            f"AWS profile {profile!r} is not configured",
            fix="check --aws-profile / AWS_PROFILE against ~/.aws/config",
        ) from exc
    if not session.region_name:
        raise ConfigError(
            "no AWS region configured for Secrets Manager",
            fix="pass --aws-region, set AWS_REGION or AWS_DEFAULT_REGION, "
            "or set region in the AWS profile",
        )
    try:
        return session.client(
            "secretsmanager",
            endpoint_url=endpoint_url or None,
            config=config or client_config(),
        )
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(
            f"could not build the Secrets Manager client ({type(exc).__name__}: {exc})",
            fix="check --aws-region and --aws-endpoint-url",
        ) from exc


class AwsProvider:
    """Tenant tokens in AWS Secrets Manager, one secret per tenant, stages as pointers."""

    name: ClassVar[str] = "aws"
    summary: ClassVar[str] = (
        "AWS Secrets Manager: one secret per tenant, AWSPENDING -> AWSCURRENT version stages"
    )
    extra: ClassVar[str | None] = "aws"
    sdk_modules: ClassVar[tuple[str, ...]] = ("boto3",)
    options: ClassVar[tuple[ProviderOption, ...]] = (
        ProviderOption(
            name="aws-secret-name",
            help="secret name template; <tenant> is replaced by the tenant id",
            default=DEFAULT_SECRET_NAME,
        ),
        ProviderOption(
            name="aws-region",
            help="AWS region of the secret (default: the boto3 chain)",
            env=("AWS_REGION", "AWS_DEFAULT_REGION"),
        ),
        ProviderOption(
            name="aws-profile",
            help="AWS profile for credentials and region (credentials never come from flags)",
            env=("AWS_PROFILE",),
            secret=True,
        ),
        ProviderOption(
            name="aws-kms-key-id",
            help="KMS key (id, ARN or alias) to encrypt a newly created secret with",
        ),
        ProviderOption(
            name="aws-tags",
            help="tags for a newly created secret, as key=value,key2=value2",
        ),
        ProviderOption(
            name="aws-description",
            help="description for a newly created secret",
            default=DEFAULT_DESCRIPTION,
        ),
        ProviderOption(
            name="aws-endpoint-url",
            help="Secrets Manager endpoint override (VPC endpoint, test server); "
            "AWS_ENDPOINT_URL_SECRETS_MANAGER also works",
        ),
    )

    def __init__(
        self,
        *,
        client: Any = None,
        secret_name: str = DEFAULT_SECRET_NAME,
        kms_key_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str | None = DEFAULT_DESCRIPTION,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
        config: Config | None = None,
    ) -> None:
        """Use ``client`` when given (any boto3 ``secretsmanager`` client), else build one.

        ``region``/``profile``/``endpoint_url``/``config`` only shape the client this
        constructor builds; they are ignored when a client is injected.
        """
        if not secret_name.strip():
            raise ConfigError("--aws-secret-name is empty", fix=f"use e.g. {DEFAULT_SECRET_NAME}")
        self.secret_name_template = secret_name
        self.kms_key_id = kms_key_id or None
        self.tags = dict(tags or {})
        self.description = description or None
        if client is None:
            client = make_client(
                region=region, profile=profile, endpoint_url=endpoint_url, config=config
            )
        else:
            install_log_redaction()
        self._client = client

    @classmethod
    def from_options(cls, options: Mapping[str, str | None]) -> AwsProvider:
        # The config layer resolves each option's env; read them again for direct callers.
        region = (
            options.get("aws_region")
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
        )
        return cls(
            secret_name=options.get("aws_secret_name") or DEFAULT_SECRET_NAME,
            region=region or None,
            profile=options.get("aws_profile") or None,
            kms_key_id=options.get("aws_kms_key_id") or None,
            tags=parse_tags(options.get("aws_tags")),
            description=options.get("aws_description") or DEFAULT_DESCRIPTION,
            endpoint_url=options.get("aws_endpoint_url") or None,
        )

    @property
    def client(self) -> Any:
        """The boto3 ``secretsmanager`` client in use."""
        return self._client

    @property
    def region(self) -> str:
        return str(self._client.meta.region_name)

    def secret_name(self, *, tenant: str) -> str:
        return render_template(self.secret_name_template, tenant=tenant)

    def location(self, *, tenant: str) -> str:
        return f"aws:{self.region}/{self.secret_name(tenant=tenant)}"

    # --- the protocol -------------------------------------------------------------------

    def write_pending(self, *, tenant: str, token: EnrollToken, rotation_id: str) -> StoredRecord:
        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        version_id = client_request_token(rotation_id)
        stages = self._prepare_secret(name=name, where=where)
        if version_id in stages:  # a retry: that rotation already stored its version
            return self._existing_version(
                name=name,
                where=where,
                version_id=version_id,
                token=token,
                rotation_id=rotation_id,
                labels=stages[version_id],
                stages=stages,
            )
        stored_at = utcnow().replace(microsecond=0)  # as the record stores it
        try:
            answer = self._call(
                "PutSecretValue",
                where=where,
                SecretId=name,
                ClientRequestToken=version_id,
                SecretString=record_to_json(
                    token=token, rotation_id=rotation_id, stored_at=stored_at
                ),
                VersionStages=[PENDING],
            )
        except StoreConflictError:
            # ResourceExistsException: the version exists (deprecated, or a concurrent
            # writer) with another value. Same token -> idempotent; else a real conflict.
            return self._existing_version(
                name=name,
                where=where,
                version_id=version_id,
                token=token,
                rotation_id=rotation_id,
                labels=None,
                stages=None,
            )
        written = str(answer.get("VersionId") or version_id)
        # AWS moves AWSPENDING off the older version itself; make sure nothing else kept it.
        self._drop_pending_except(name=name, where=where, keep=written)
        log.debug("stored %s as pending version %s of %s", token.short_fingerprint, written, where)
        return StoredRecord(
            token=token,
            rotation_id=rotation_id,
            version=written,
            stage=Stage.PENDING,
            stored_at=stored_at,
        )

    def promote(self, *, tenant: str, version: str) -> None:
        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        stages = self._version_stages(name=name, where=where)
        labels = stages.get(version) if stages is not None else None
        if labels is None:
            raise StoreConflictError(
                f"{where} has no live version {version} to promote",
                fix="the version was pruned or the secret replaced; run lg-rotate rotate again",
            )
        holder = _holder(stages or {}, CURRENT)
        if holder != version:
            move: dict[str, Any] = {"MoveToVersionId": version}
            if holder is not None:
                move["RemoveFromVersionId"] = holder
            try:
                self._call(
                    "UpdateSecretVersionStage",
                    where=where,
                    SecretId=name,
                    VersionStage=CURRENT,
                    **move,
                )
            except StoreError as exc:
                if isinstance(exc, StorePermissionError | StoreUnavailableError):
                    raise
                now = self._version_stages(name=name, where=where) or {}
                if _holder(now, CURRENT) == holder:
                    raise  # AWSCURRENT did not move: the refusal is about something else
                raise StoreConflictError(
                    f"AWSCURRENT of {where} moved to another version while promoting "
                    f"version {version}",
                    fix="another rotation ran at the same time; check lg-rotate status "
                    "and rotate again if needed",
                ) from exc
        # After AWSCURRENT moved: a crash in between leaves a current version still
        # labelled pending, which a resumed run promotes again (never an unlabelled one).
        if PENDING in labels:
            self._call(
                "UpdateSecretVersionStage",
                where=where,
                SecretId=name,
                VersionStage=PENDING,
                RemoveFromVersionId=version,
            )
        log.debug("promoted version %s of %s to AWSCURRENT", version, where)

    def check(self, *, tenant: str) -> None:
        """Before a mint: Secrets Manager answers DescribeSecret for the tenant's secret with
        these credentials (a missing secret is fine, the first write creates it; one
        scheduled for deletion is refused). Write permission cannot be proven without IAM
        rights of its own, so a policy without PutSecretValue still fails at the write."""
        self._version_stages(
            name=self.secret_name(tenant=tenant), where=self.location(tenant=tenant)
        )

    def read(self, *, tenant: str, stage: Stage) -> StoredRecord | None:
        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        answer = self._call(
            "GetSecretValue",
            where=where,
            missing_ok=True,
            SecretId=name,
            VersionStage=_LABELS[stage],
        )
        if answer is None:
            return None
        return self._record(answer, where=where, stage=stage)

    def prune(self, *, tenant: str, keep: int) -> int:
        """Take the labels off labelled versions beyond the newest ``keep``.

        Only labelled versions count (AWS keeps at most current, pending and previous
        for lg-rotate, and deletes unlabelled ones itself), so with ``keep >= 3`` this
        rarely has work; current and pending are never touched.
        """
        name = self.secret_name(tenant=tenant)
        where = self.location(tenant=tenant)
        if self._version_stages(name=name, where=where) is None:
            return 0  # no secret (and a deleted one raises)
        versions = self._list_versions(name=name, where=where)
        # Unlabelled versions are already deprecated; order the live ones oldest first.
        # The sort is stable, so versions created in the same second keep AWS's order.
        live = sorted(
            (v for v in versions if v.get("VersionStages")),
            key=lambda v: _timestamp(v.get("CreatedDate")),
        )
        retired = 0
        for entry in live[: max(len(live) - max(keep, 0), 0)]:
            labels = list(entry.get("VersionStages") or ())
            if CURRENT in labels or PENDING in labels:
                continue
            version_id = str(entry["VersionId"])
            for label in labels:
                self._call(
                    "UpdateSecretVersionStage",
                    where=where,
                    SecretId=name,
                    VersionStage=label,
                    RemoveFromVersionId=version_id,
                )
            retired += 1
            log.debug("deprecated version %s of %s (labels %s)", version_id, where, labels)
        return retired

    # --- steps ----------------------------------------------------------------------------

    def _prepare_secret(self, *, name: str, where: str) -> dict[str, list[str]]:
        """Create the secret if missing; return its labelled versions."""
        stages = self._version_stages(name=name, where=where)
        placeholder_id = client_request_token(f"placeholder:{name}")
        if stages is None:
            params: dict[str, Any] = {
                "Name": name,
                "ClientRequestToken": placeholder_id,
                "SecretString": PLACEHOLDER_SECRET_STRING,
            }
            if self.description:
                params["Description"] = self.description
            if self.kms_key_id:
                params["KmsKeyId"] = self.kms_key_id
            if self.tags:
                params["Tags"] = [{"Key": k, "Value": v} for k, v in self.tags.items()]
            try:
                self._call("CreateSecret", where=where, **params)
            except StoreConflictError:  # created concurrently: use that one
                stages = self._version_stages(name=name, where=where)
                if stages is None:
                    raise StoreError(f"{where} exists but cannot be described") from None
            else:
                log.info("created secret %s", where)
                return {placeholder_id: [CURRENT]}
        if not stages:
            # Created elsewhere (e.g. by Terraform) without a value: the first version
            # becomes AWSCURRENT whatever we ask, so let that be a placeholder.
            self._call(
                "PutSecretValue",
                where=where,
                SecretId=name,
                ClientRequestToken=placeholder_id,
                SecretString=PLACEHOLDER_SECRET_STRING,
            )
            stages = {placeholder_id: [CURRENT]}
        return stages

    def _existing_version(
        self,
        *,
        name: str,
        where: str,
        version_id: str,
        token: EnrollToken,
        rotation_id: str,
        labels: list[str] | None,
        stages: dict[str, list[str]] | None,
    ) -> StoredRecord:
        answer = self._call(
            "GetSecretValue", where=where, missing_ok=True, SecretId=name, VersionId=version_id
        )
        existing = self._record(answer, where=where, stage=Stage.PENDING) if answer else None
        # Compare values only: the record keeps the expiry to the second, the token may not.
        if existing is None:
            raise StoreConflictError(
                f"rotation {rotation_id} has a version {version_id} in {where} that "
                "cannot be read back",
                fix="start a new rotation (a new rotation id)",
            )
        if existing.rotation_id != rotation_id or existing.token.value != token.value:
            raise StoreConflictError(
                f"rotation {rotation_id} already stored a different token in {where} "
                f"(version {version_id})",
                fix="start a new rotation (a new rotation id)",
            )
        labels = labels if labels is not None else list(answer.get("VersionStages") or ())
        if CURRENT not in labels and PENDING not in labels:
            # Like a fresh write, a retried one leaves the version pending.
            if stages is None:
                stages = self._version_stages(name=name, where=where) or {}
            move: dict[str, Any] = {"MoveToVersionId": version_id}
            holder = _holder(stages, PENDING)
            if holder is not None:
                move["RemoveFromVersionId"] = holder
            self._call(
                "UpdateSecretVersionStage", where=where, SecretId=name, VersionStage=PENDING, **move
            )
        log.debug("rotation %s already stored version %s of %s", rotation_id, version_id, where)
        return existing

    def _drop_pending_except(self, *, name: str, where: str, keep: str) -> None:
        stages = self._version_stages(name=name, where=where) or {}
        for version_id, labels in stages.items():
            if version_id != keep and PENDING in labels:
                self._call(
                    "UpdateSecretVersionStage",
                    where=where,
                    SecretId=name,
                    VersionStage=PENDING,
                    RemoveFromVersionId=version_id,
                )

    def _version_stages(self, *, name: str, where: str) -> dict[str, list[str]] | None:
        """``{version id: labels}`` of the labelled versions, ``None`` if no secret."""
        answer = self._call("DescribeSecret", where=where, missing_ok=True, SecretId=name)
        if answer is None:
            return None
        if answer.get("DeletedDate"):
            raise _deleted_error(name=name, where=where)
        raw = answer.get("VersionIdsToStages") or {}
        return {str(k): [str(label) for label in v] for k, v in raw.items() if v}

    def _list_versions(self, *, name: str, where: str) -> list[dict[str, Any]]:
        versions: list[dict[str, Any]] = []
        next_token: str | None = None
        while True:
            params: dict[str, Any] = {"SecretId": name, "IncludeDeprecated": True}
            if next_token:
                params["NextToken"] = next_token
            answer = self._call("ListSecretVersionIds", where=where, missing_ok=True, **params)
            if answer is None:
                return []
            versions.extend(answer.get("Versions") or ())
            next_token = answer.get("NextToken") or None
            if next_token is None:
                return versions

    def _record(
        self, answer: Mapping[str, Any], *, where: str, stage: Stage
    ) -> StoredRecord | None:
        version_id = str(answer.get("VersionId", "?"))
        text = answer.get("SecretString")
        if not isinstance(text, str):
            raise StoreDataError(
                f"the secret at {where} (version {version_id}) holds binary data, not a record",
                fix="point --aws-secret-name at a secret that lg-rotate owns",
            )
        if _is_placeholder(text):
            return None
        return record_from_json(text, version=version_id, stage=stage, where=where)

    # --- calls and errors -----------------------------------------------------------------

    def _call(
        self, action: str, *, where: str, missing_ok: bool = False, **params: Any
    ) -> dict[str, Any] | Any:
        """One API call; botocore retries transient failures, we translate what is left.

        Returns ``None`` for ResourceNotFoundException when ``missing_ok``.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        method = getattr(self._client, _snake_case(action))
        carries_secret = "SecretString" in params
        secret = str(params.get("SecretId") or params.get("Name") or "")
        try:
            return cast(dict[str, Any], method(**params))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if missing_ok and code == "ResourceNotFoundException":
                return None
            error = self._translate_client_error(
                exc, code=code, action=action, where=where, secret=secret
            )
        except BotoCoreError as exc:
            error = self._translate_botocore_error(exc, action=action, where=where)
        # A request that carried a SecretString may be quoted by the cause: never chain it.
        if carries_secret:
            raise error from None
        raise error

    def _translate_client_error(
        self, exc: Any, *, code: str, action: str, where: str, secret: str
    ) -> LgRotateError:
        response = exc.response
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        attempts = int(response.get("ResponseMetadata", {}).get("RetryAttempts") or 0) + 1
        detail = _redact(str(response.get("Error", {}).get("Message") or code or status))
        error: LgRotateError
        if code in _TRANSIENT_CODES or status >= 500:
            error = StoreUnavailableError(
                f"AWS Secrets Manager kept failing on {action} for {where} after "
                f"{attempts} attempt(s): {code or status}: {detail}",
                fix="AWS is throttling or unavailable; retry later, or raise the Secrets "
                "Manager quota if throttling persists",
            )
        elif code in _CREDENTIAL_CODES:
            error = StorePermissionError(
                f"AWS rejected the credentials for {action} on {where}: {code}: {detail}",
                fix=_CREDENTIAL_FIX,
            )
        elif code in _DENIED_CODES:
            error = StorePermissionError(
                f"AWS denied {action} on {where}: {code}: {detail}",
                fix=f"allow {', '.join(self.required_actions())} on "
                f"arn:aws:secretsmanager:{self.region}:<account>:secret:{secret}-* "
                "in the IAM policy of the role lg-rotate runs as",
            )
        elif code == "KMSAccessDeniedException":
            error = StorePermissionError(
                f"KMS denied the key for {action} on {where}: {detail}",
                fix=f"allow {', '.join(KMS_ACTIONS)} on the KMS key"
                f"{' ' + self.kms_key_id if self.kms_key_id else ''} to lg-rotate's role "
                "(IAM policy and key policy)",
            )
        elif code in ("KMSDisabledException", "KMSInvalidStateException"):
            error = StoreError(
                f"the KMS key of {where} is disabled or pending deletion ({code}): {detail}",
                fix="enable the key (aws kms enable-key) or cancel its deletion "
                "(aws kms cancel-key-deletion), or use another --aws-kms-key-id",
            )
        elif code == "KMSNotFoundException":
            error = StoreError(
                f"the KMS key of {where} does not exist or is not usable: {detail}",
                fix="check --aws-kms-key-id (key id, key ARN or alias/NAME in this region)",
            )
        elif code in ("DecryptionFailure", "EncryptionFailure"):
            error = StoreError(
                f"KMS could not {'decrypt' if code == 'DecryptionFailure' else 'encrypt'} "
                f"{where} ({code}): {detail}",
                fix=f"check that lg-rotate's role may use the secret's KMS key "
                f"({', '.join(KMS_ACTIONS)}) and that the key is enabled",
            )
        elif code == "ResourceExistsException":
            error = StoreConflictError(
                f"{action} on {where} conflicts with an existing resource: {detail}",
                fix="start a new rotation (a new rotation id)",
            )
        elif code == "InvalidRequestException" and "delet" in detail.lower():
            error = _deleted_error(name=secret, where=where)
        elif code == "ResourceNotFoundException":
            error = StoreError(
                f"{where} does not exist ({action}): {detail}",
                fix="check --aws-secret-name and --aws-region",
            )
        elif code in _FINAL_REQUEST_CODES:
            error = StoreError(
                f"AWS Secrets Manager refused {action} on {where}: {code}: {detail}",
                fix="check --aws-secret-name, --aws-kms-key-id and --aws-tags",
            )
        else:
            error = StoreError(
                f"AWS Secrets Manager failed {action} on {where}: {code or status}: {detail}",
            )
        return error

    def _translate_botocore_error(self, exc: Any, *, action: str, where: str) -> LgRotateError:
        from botocore import exceptions as bce

        kind = type(exc).__name__
        if isinstance(exc, bce.HTTPClientError | bce.EndpointConnectionError):
            return StoreUnavailableError(
                f"cannot reach AWS Secrets Manager for {action} on {where} ({kind})",
                fix="check network access to the Secrets Manager endpoint (VPC endpoint, "
                "proxy, NetworkPolicy) and --aws-endpoint-url / AWS_ENDPOINT_URL_SECRETS_MANAGER",
            )
        if isinstance(
            exc,
            bce.NoCredentialsError
            | bce.PartialCredentialsError
            | bce.CredentialRetrievalError
            | bce.TokenRetrievalError,
        ):
            return StorePermissionError(
                f"no usable AWS credentials for {action} on {where} ({kind})",
                fix=_CREDENTIAL_FIX,
            )
        if isinstance(exc, bce.NoRegionError):
            return ConfigError(
                "no AWS region configured for Secrets Manager",
                fix="pass --aws-region or set AWS_REGION / AWS_DEFAULT_REGION",
            )
        if isinstance(exc, bce.ParamValidationError):
            # Its text quotes parameter values, which may include the SecretString.
            return StoreError(
                f"botocore rejected the parameters of {action} on {where}",
                fix="check --aws-secret-name, --aws-kms-key-id and --aws-tags",
            )
        return StoreError(f"AWS Secrets Manager client failed {action} on {where} ({kind})")

    def required_actions(self) -> tuple[str, ...]:
        """The IAM actions lg-rotate needs on its secret (plus KMS ones for a custom key)."""
        return IAM_ACTIONS + (KMS_ACTIONS if self.kms_key_id else ())


# --- helpers -------------------------------------------------------------------------------


def _holder(stages: Mapping[str, list[str]], label: str) -> str | None:
    for version_id, labels in stages.items():
        if label in labels:
            return version_id
    return None


def _is_placeholder(text: str) -> bool:
    if text == PLACEHOLDER_SECRET_STRING:
        return True
    try:
        payload = json.loads(text)
    except ValueError:
        return False
    return isinstance(payload, dict) and payload.get("placeholder") is True


def _deleted_error(*, name: str, where: str) -> StoreError:
    return StoreError(
        f"{where} is scheduled for deletion",
        fix=f"restore it with: aws secretsmanager restore-secret --secret-id {name} "
        "(or use another --aws-secret-name)",
    )


def _timestamp(value: Any) -> float:
    if value is None:
        return 0.0
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _snake_case(action: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in action).lstrip("_")


def _redact(text: str, limit: int = 300) -> str:
    text = " ".join(TOKEN_SHAPED.sub(REDACTED, text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- logging ---------------------------------------------------------------------------------


class _BotocoreRedaction(logging.Filter):
    """botocore logs request and response bodies at DEBUG: keep record contents out.

    Filters on a logger apply only to records created on that very logger, so this is
    installed on each botocore logger that logs bodies.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it, unredacted args dropped
            message = str(record.msg)
        if "SecretString" in message or TOKEN_SHAPED.search(message):
            record.msg = "%s"
            record.args = (f"[lg-rotate: botocore message withheld, {len(message)} characters]",)
        return True


_BODY_LOGGERS = (
    "botocore.endpoint",
    "botocore.parsers",
    "botocore.hooks",
    "botocore.auth",
    "botocore.httpsession",
    "botocore.retryhandler",
    "botocore.retries.standard",
    "urllib3.connectionpool",
)


def install_log_redaction() -> None:
    """Idempotently attach :class:`_BotocoreRedaction` to the loggers that see bodies."""
    with _filter_lock:
        for name in _BODY_LOGGERS:
            logger = logging.getLogger(name)
            if not any(isinstance(f, _BotocoreRedaction) for f in logger.filters):
                logger.addFilter(_BotocoreRedaction())
