"""The AWS Secrets Manager provider against a real moto server over sockets.

Failures moto cannot produce (AccessDenied: moto accepts any credentials; throttling;
5xx) come from a small loopback proxy in front of moto that answers scripted AWS JSON
errors for chosen operations and forwards everything else.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from fixtures.moto import MotoServer
from fixtures.ports import free_port
from providers import registry
from providers.aws import (
    IAM_ACTIONS,
    PLACEHOLDER_SECRET_STRING,
    AwsProvider,
    client_request_token,
    parse_tags,
)
from providers.base import Provider, Stage
from rotator.errors import (
    ConfigError,
    LgRotateError,
    StoreConflictError,
    StoreDataError,
    StoreError,
    StorePermissionError,
    StoreUnavailableError,
)
from rotator.tokens import EnrollToken, utcnow

TENANT = "acme"
REPO = Path(__file__).resolve().parent.parent


def new_token(tenant: str = TENANT) -> EnrollToken:
    value = base64.b32encode(os.urandom(20)).decode()  # 32 base32 characters
    return EnrollToken.parse(
        value=value,
        tenant_id=tenant,
        expires_at=utcnow().replace(microsecond=0) + timedelta(minutes=10),
    )


def stages_of(provider: AwsProvider, tenant: str = TENANT) -> dict[str, list[str]]:
    """Every version (deprecated ones too) and its labels, straight from the server."""
    answer = provider.client.list_secret_version_ids(
        SecretId=provider.secret_name(tenant=tenant), IncludeDeprecated=True
    )
    return {v["VersionId"]: list(v["VersionStages"]) for v in answer["Versions"]}


def holders(provider: AwsProvider, label: str) -> list[str]:
    return [vid for vid, labels in stages_of(provider).items() if label in labels]


def rotate(provider: AwsProvider, *, promote: bool = True) -> str:
    record = provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=str(uuid.uuid4()))
    if promote:
        provider.promote(tenant=TENANT, version=record.version)
    return record.version


def assert_no_secret(error: BaseException, *tokens: EnrollToken) -> None:
    """Neither the message, the fix, nor any chained cause quotes a token."""
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen) + (seen.one_line() if isinstance(seen, LgRotateError) else "")
        for token in tokens:
            assert token.value.reveal() not in text
        seen = seen.__cause__ or seen.__context__


# --- a loopback proxy that can answer like AWS when moto cannot ---------------------------


Answer = tuple[int, dict[str, Any]]


class ScriptedProxy:
    """Forwards to moto, except for the AWS JSON errors a test scripts per operation.

    ``fail_next`` answers are used once each, in order; ``fail_always`` ones every time
    (operation ``"*"`` matches all). ``seen`` lists the operations that arrived.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.once: dict[str, list[Answer]] = {}
        self.always: dict[str, Answer] = {}
        self.seen: list[str] = []
        self.echo_value = False  # quote the stored token in errors, like a careless server
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def fail_next(self, operation: str, *answers: tuple[int, str, str]) -> None:
        self.once.setdefault(operation, []).extend(_errors(answers))

    def fail_always(self, operation: str, answer: tuple[int, str, str]) -> None:
        self.always[operation] = _errors([answer])[0]

    def _scripted(self, operation: str) -> Answer | None:
        with self.lock:
            self.seen.append(operation)
            if self.once.get(operation):
                return self.once[operation].pop(0)
            return self.always.get(operation) or self.always.get("*")

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = str(self.headers.get("X-Amz-Target", "")).rpartition(".")[2]
                scripted = proxy._scripted(operation)
                if scripted is not None:
                    status, payload = scripted
                    if proxy.echo_value and b"SecretString" in body:
                        record = json.loads(json.loads(body)["SecretString"])
                        payload = {**payload, "message": f"{record['token']}: {payload['message']}"}
                    self._answer(status, json.dumps(payload).encode())
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                request = urllib.request.Request(  # noqa: S310 (loopback test server)
                    proxy.upstream + self.path, data=body, headers=headers, method="POST"
                )
                try:
                    with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
                        self._answer(response.status, response.read())
                except urllib.error.HTTPError as exc:
                    self._answer(exc.code, exc.read())

            def _answer(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _errors(answers: Any) -> list[Answer]:
    return [(status, {"__type": code, "message": message}) for status, code, message in answers]


@pytest.fixture
def proxy(moto_server: MotoServer) -> Iterator[ScriptedProxy]:
    scripted = ScriptedProxy(moto_server.url)
    scripted.thread.start()
    yield scripted
    scripted.server.shutdown()
    scripted.server.server_close()


def provider_via(url: str, template: str, *, max_attempts: int = 3, **kwargs: Any) -> AwsProvider:
    client = MotoServer(url=url, server=None).client(max_attempts=max_attempts)
    return AwsProvider(client=client, secret_name=template, **kwargs)


# --- the protocol on a real server ---------------------------------------------------------


def test_is_a_provider_and_registered(aws_provider: AwsProvider) -> None:
    assert isinstance(aws_provider, Provider)
    assert registry.load("aws") is AwsProvider
    assert AwsProvider.extra == "aws"
    assert AwsProvider.sdk_modules == ("boto3",)
    names = {option.name for option in AwsProvider.options}
    assert {"aws-secret-name", "aws-region", "aws-profile", "aws-kms-key-id"} <= names
    assert {"aws-tags", "aws-description", "aws-endpoint-url"} <= names


def test_location_names_region_and_secret(aws_provider: AwsProvider) -> None:
    name = aws_provider.secret_name(tenant=TENANT)
    assert name.endswith(f"/{TENANT}/enroll-token")
    assert aws_provider.location(tenant=TENANT) == f"aws:us-east-1/{name}"


def test_creates_missing_secret_with_kms_key_tags_and_description(
    moto_server: MotoServer, aws_secret_name_template: str
) -> None:
    provider = AwsProvider(
        client=moto_server.client(),
        secret_name=aws_secret_name_template,
        kms_key_id="alias/lg-rotate-test",
        tags={"team": "sec", "app": "linuxguard"},
        description="LinuxGuard token for acme",
    )
    provider.write_pending(tenant=TENANT, token=new_token(), rotation_id=str(uuid.uuid4()))
    described = provider.client.describe_secret(SecretId=provider.secret_name(tenant=TENANT))
    assert described["KmsKeyId"] == "alias/lg-rotate-test"
    assert described["Description"] == "LinuxGuard token for acme"
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        "team": "sec",
        "app": "linuxguard",
    }
    # A second rotation reuses the secret instead of failing on CreateSecret.
    rotate(provider)
    assert len(holders(provider, "AWSCURRENT")) == 1


def test_first_write_is_pending_and_not_current_until_promoted(
    aws_provider: AwsProvider,
) -> None:
    token = new_token()
    rotation_id = str(uuid.uuid4())
    record = aws_provider.write_pending(tenant=TENANT, token=token, rotation_id=rotation_id)
    assert record.version == rotation_id  # a UUID rotation id is the VersionId
    assert record.stage is Stage.PENDING
    assert stages_of(aws_provider)[record.version] == ["AWSPENDING"]
    assert aws_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None
    # What a plain AWSCURRENT reader (another tool) sees is the placeholder, not the token.
    current = aws_provider.client.get_secret_value(
        SecretId=aws_provider.secret_name(tenant=TENANT), VersionStage="AWSCURRENT"
    )
    assert current["SecretString"] == PLACEHOLDER_SECRET_STRING
    pending = aws_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == token
    assert pending.rotation_id == rotation_id
    assert pending.version == record.version
    assert pending.stored_at == record.stored_at

    aws_provider.promote(tenant=TENANT, version=record.version)
    promoted = aws_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert promoted is not None
    assert promoted.token == token
    assert promoted.stage is Stage.CURRENT
    assert aws_provider.read(tenant=TENANT, stage=Stage.PENDING) is None
    assert stages_of(aws_provider)[record.version] == ["AWSCURRENT"]


def test_promote_moves_current_and_previous_and_clears_pending(
    aws_provider: AwsProvider,
) -> None:
    first = rotate(aws_provider)
    second = rotate(aws_provider, promote=False)
    assert holders(aws_provider, "AWSCURRENT") == [first]
    assert holders(aws_provider, "AWSPENDING") == [second]
    aws_provider.promote(tenant=TENANT, version=second)
    assert holders(aws_provider, "AWSCURRENT") == [second]
    assert holders(aws_provider, "AWSPREVIOUS") == [first]
    assert holders(aws_provider, "AWSPENDING") == []
    # Promoting again (a resumed run) changes nothing.
    aws_provider.promote(tenant=TENANT, version=second)
    assert holders(aws_provider, "AWSCURRENT") == [second]
    assert holders(aws_provider, "AWSPREVIOUS") == [first]


def test_promote_racing_another_promotion_is_a_conflict(
    aws_provider: AwsProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    rotate(aws_provider)
    ours = rotate(aws_provider, promote=False)
    # What promote saw before another run moved AWSCURRENT under it.
    stale = aws_provider._version_stages(
        name=aws_provider.secret_name(tenant=TENANT), where="stale"
    )
    theirs = rotate(aws_provider)  # takes AWSPENDING from ours, then AWSCURRENT
    real = aws_provider._version_stages
    calls = iter([stale])
    monkeypatch.setattr(
        aws_provider, "_version_stages", lambda **kw: next(calls, None) or real(**kw)
    )
    with pytest.raises(StoreConflictError, match="moved to another version"):
        aws_provider.promote(tenant=TENANT, version=ours)
    assert holders(aws_provider, "AWSCURRENT") == [theirs]


def test_promote_of_unknown_version_is_a_conflict(aws_provider: AwsProvider) -> None:
    rotate(aws_provider)
    with pytest.raises(StoreConflictError, match="no live version"):
        aws_provider.promote(tenant=TENANT, version=str(uuid.uuid4()))


def test_retried_write_returns_the_same_version(aws_provider: AwsProvider) -> None:
    token = new_token()
    for rotation_id in (str(uuid.uuid4()), "rotation-7"):  # a UUID and a derived token
        first = aws_provider.write_pending(tenant=TENANT, token=token, rotation_id=rotation_id)
        before = stages_of(aws_provider)
        again = aws_provider.write_pending(tenant=TENANT, token=token, rotation_id=rotation_id)
        assert again.version == first.version
        assert again.stored_at == first.stored_at
        assert stages_of(aws_provider) == before
        assert holders(aws_provider, "AWSPENDING") == [first.version]
    assert client_request_token("rotation-7") == first.version
    assert len(first.version) >= 32


def test_same_rotation_with_another_token_is_a_conflict(aws_provider: AwsProvider) -> None:
    rotation_id = str(uuid.uuid4())
    first, other = new_token(), new_token()
    aws_provider.write_pending(tenant=TENANT, token=first, rotation_id=rotation_id)
    with pytest.raises(StoreConflictError) as caught:
        aws_provider.write_pending(tenant=TENANT, token=other, rotation_id=rotation_id)
    assert rotation_id in caught.value.message
    assert_no_secret(caught.value, first, other)
    pending = aws_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.token == first


def test_a_newer_pending_version_takes_the_label(aws_provider: AwsProvider) -> None:
    older = rotate(aws_provider, promote=False)
    newer = rotate(aws_provider, promote=False)
    assert holders(aws_provider, "AWSPENDING") == [newer]
    assert older not in holders(aws_provider, "AWSCURRENT")
    pending = aws_provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert pending is not None
    assert pending.version == newer


def test_prune_keeps_newest_and_never_current_or_pending(aws_provider: AwsProvider) -> None:
    promoted = [rotate(aws_provider) for _ in range(3)]
    pending = rotate(aws_provider, promote=False)
    assert holders(aws_provider, "AWSPREVIOUS") == [promoted[1]]
    # Labelled now: previous, current, pending. keep=5 leaves them all.
    assert aws_provider.prune(tenant=TENANT, keep=5) == 0
    assert aws_provider.prune(tenant=TENANT, keep=1) == 1
    labelled = {vid: labels for vid, labels in stages_of(aws_provider).items() if labels}
    assert labelled == {promoted[2]: ["AWSCURRENT"], pending: ["AWSPENDING"]}
    # Nothing left that may go: current and pending are never touched.
    assert aws_provider.prune(tenant=TENANT, keep=0) == 0
    current = aws_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == promoted[2]
    aws_provider.promote(tenant=TENANT, version=pending)
    assert holders(aws_provider, "AWSPREVIOUS") == [promoted[2]]


def test_missing_secret_reads_as_nothing(aws_provider: AwsProvider) -> None:
    assert aws_provider.read(tenant="nobody", stage=Stage.CURRENT) is None
    assert aws_provider.read(tenant="nobody", stage=Stage.PENDING) is None
    assert aws_provider.prune(tenant="nobody", keep=1) == 0
    with pytest.raises(StoreConflictError):
        aws_provider.promote(tenant="nobody", version=str(uuid.uuid4()))


def test_secret_created_elsewhere_without_a_value(aws_provider: AwsProvider) -> None:
    # Terraform's aws_secretsmanager_secret without a version: the first PutSecretValue
    # would be AWSCURRENT whatever stage it asks for, so the provider adds a placeholder.
    aws_provider.client.create_secret(Name=aws_provider.secret_name(tenant=TENANT))
    version = rotate(aws_provider, promote=False)
    assert aws_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None
    assert stages_of(aws_provider)[version] == ["AWSPENDING"]


def test_foreign_value_is_a_data_error_without_quoting_it(aws_provider: AwsProvider) -> None:
    foreign = new_token()
    aws_provider.client.create_secret(
        Name=aws_provider.secret_name(tenant=TENANT), SecretString=foreign.value.reveal()
    )
    with pytest.raises(StoreDataError) as caught:
        aws_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert_no_secret(caught.value, foreign)


def test_secret_scheduled_for_deletion_says_how_to_restore(aws_provider: AwsProvider) -> None:
    rotate(aws_provider)
    name = aws_provider.secret_name(tenant=TENANT)
    aws_provider.client.delete_secret(SecretId=name, RecoveryWindowInDays=7)
    with pytest.raises(StoreError, match="scheduled for deletion") as caught:
        aws_provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r-deleted")
    assert caught.value.fix is not None
    assert f"restore-secret --secret-id {name}" in caught.value.fix
    with pytest.raises(StoreError, match="scheduled for deletion"):
        aws_provider.read(tenant=TENANT, stage=Stage.CURRENT)


# --- configuration -------------------------------------------------------------------------


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return monkeypatch


def test_from_options_honours_the_endpoint_variable(
    clean_aws_env: pytest.MonkeyPatch, aws_env: dict[str, str], moto_server: MotoServer
) -> None:
    for name, value in aws_env.items():
        clean_aws_env.setenv(name, value)
    provider = AwsProvider.from_options(
        {"aws_secret_name": aws_env["LG_ROTATE_AWS_SECRET_NAME"], "aws_tags": "team=sec"}
    )
    assert provider.client.meta.endpoint_url == moto_server.url
    assert provider.region == "us-east-1"
    version = rotate(provider)
    current = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.version == version


def test_endpoint_option_overrides_the_variable(
    clean_aws_env: pytest.MonkeyPatch, aws_env: dict[str, str], moto_server: MotoServer
) -> None:
    for name, value in aws_env.items():
        clean_aws_env.setenv(name, value)
    clean_aws_env.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://127.0.0.1:9")
    provider = AwsProvider.from_options(
        {"aws_endpoint_url": moto_server.url, "aws_region": "eu-west-1"}
    )
    assert provider.client.meta.endpoint_url == moto_server.url
    assert provider.location(tenant=TENANT) == f"aws:eu-west-1/linuxguard/{TENANT}/enroll-token"


def test_no_region_is_a_config_error(clean_aws_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no AWS region") as caught:
        AwsProvider.from_options({})
    assert caught.value.fix is not None
    assert "--aws-region" in caught.value.fix


def test_unknown_profile_is_a_config_error(clean_aws_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="profile"):
        AwsProvider.from_options({"aws_profile": "nope", "aws_region": "us-east-1"})


def test_tags_option_parsing() -> None:
    assert parse_tags("team=sec, env = prod,") == {"team": "sec", "env": "prod"}
    assert parse_tags(None) == {}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_tags("team")


def test_client_request_tokens_are_deterministic() -> None:
    rotation_id = str(uuid.uuid4())
    assert client_request_token(rotation_id) == rotation_id
    derived = client_request_token("short")
    assert derived == client_request_token("short") != client_request_token("other")
    assert 32 <= len(derived) <= 64
    assert client_request_token(rotation_id.upper()) != rotation_id.upper()


def test_import_does_not_load_boto3() -> None:
    code = (
        "import sys, providers.aws, providers.registry\n"
        "providers.registry.load('aws')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore'))\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- failures: retries, permissions, KMS, secrecy ------------------------------------------


def test_unreachable_endpoint_is_unavailable_quickly(aws_secret_name_template: str) -> None:
    provider = provider_via(f"http://127.0.0.1:{free_port()}", aws_secret_name_template)
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="cannot reach") as caught:
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert time.monotonic() - started < 5
    assert caught.value.fix is not None
    assert "AWS_ENDPOINT_URL_SECRETS_MANAGER" in caught.value.fix


def test_missing_credentials_are_a_permission_error(
    clean_aws_env: pytest.MonkeyPatch, moto_server: MotoServer, aws_secret_name_template: str
) -> None:
    provider = AwsProvider(
        secret_name=aws_secret_name_template, region="us-east-1", endpoint_url=moto_server.url
    )
    with pytest.raises(StorePermissionError, match="no usable AWS credentials") as caught:
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert caught.value.fix is not None
    assert "AWS_PROFILE" in caught.value.fix


def test_server_error_is_retried_then_succeeds(
    proxy: ScriptedProxy, aws_secret_name_template: str
) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template)
    version = rotate(provider)
    proxy.seen.clear()
    proxy.fail_next("GetSecretValue", (500, "InternalServiceError", "try again"))
    record = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert record is not None
    assert record.version == version
    assert proxy.seen == ["GetSecretValue", "GetSecretValue"]


def test_throttling_is_retried(proxy: ScriptedProxy, aws_secret_name_template: str) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template)
    proxy.fail_next("DescribeSecret", (400, "ThrottlingException", "Rate exceeded"))
    record = provider.write_pending(tenant=TENANT, token=new_token(), rotation_id="r-throttled")
    assert record.version == client_request_token("r-throttled")
    assert proxy.seen[:2] == ["DescribeSecret", "DescribeSecret"]


def test_persistent_server_errors_exhaust_the_retries(
    proxy: ScriptedProxy, aws_secret_name_template: str
) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template, max_attempts=3)
    proxy.fail_always("GetSecretValue", (503, "ServiceUnavailable", "down"))
    with pytest.raises(StoreUnavailableError, match="after 3 attempt"):
        provider.read(tenant=TENANT, stage=Stage.PENDING)
    assert proxy.seen == ["GetSecretValue"] * 3


def test_access_denied_names_the_iam_actions(
    proxy: ScriptedProxy, aws_secret_name_template: str
) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template, kms_key_id="alias/lg")
    proxy.fail_always(
        "*",
        (
            400,
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/lg-rotate/x is not authorized "
            "to perform: secretsmanager:DescribeSecret",
        ),
    )
    token = new_token()
    with pytest.raises(StorePermissionError) as caught:
        provider.write_pending(tenant=TENANT, token=token, rotation_id="r-denied")
    error = caught.value
    assert "AccessDeniedException" in error.message
    assert "secretsmanager:DescribeSecret" in error.message
    assert provider.secret_name(tenant=TENANT) in error.message
    assert error.fix is not None
    for action in (*IAM_ACTIONS, "kms:Encrypt", "kms:GenerateDataKey", "kms:Decrypt"):
        assert action in error.fix
    assert proxy.seen == ["DescribeSecret"]  # a refusal is final: not retried
    assert_no_secret(error, token)


def test_rejected_credentials_point_at_the_credential_chain(
    proxy: ScriptedProxy, aws_secret_name_template: str
) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template)
    proxy.fail_always(
        "*", (400, "UnrecognizedClientException", "The security token included is invalid.")
    )
    with pytest.raises(StorePermissionError, match="rejected the credentials") as caught:
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert caught.value.fix is not None
    assert "IRSA" in caught.value.fix


@pytest.mark.parametrize(
    ("code", "error_class", "fix_part"),
    [
        ("KMSAccessDeniedException", StorePermissionError, "kms:GenerateDataKey"),
        ("KMSDisabledException", StoreError, "enable-key"),
        ("KMSInvalidStateException", StoreError, "cancel-key-deletion"),
        ("KMSNotFoundException", StoreError, "--aws-kms-key-id"),
    ],
)
def test_kms_failures_say_what_to_fix_without_quoting_the_token(
    proxy: ScriptedProxy,
    aws_secret_name_template: str,
    code: str,
    error_class: type[StoreError],
    fix_part: str,
) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template, kms_key_id="alias/lg")
    proxy.echo_value = True  # the error quotes the token it was sent
    proxy.fail_always("PutSecretValue", (400, code, "KMS said no"))
    token = new_token()
    with pytest.raises(error_class) as caught:
        provider.write_pending(tenant=TENANT, token=token, rotation_id=f"r-{code}")
    error = caught.value
    assert type(error) is error_class
    assert error.fix is not None
    assert fix_part in error.fix
    assert error.__cause__ is None  # the cause carried the SecretString: not chained
    assert_no_secret(error, token)
    assert "<redacted>" in error.message


def test_invalid_parameter_is_final(proxy: ScriptedProxy, aws_secret_name_template: str) -> None:
    provider = provider_via(proxy.url, aws_secret_name_template)
    proxy.fail_always("GetSecretValue", (400, "InvalidParameterException", "bad stage"))
    with pytest.raises(StoreError, match="refused GetSecretValue") as caught:
        provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert not isinstance(caught.value, StoreUnavailableError)
    assert proxy.seen == ["GetSecretValue"]


def test_token_never_reaches_the_logs(
    aws_provider: AwsProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for library in ("botocore", "urllib3", "lg_rotate"):
        caplog.set_level(logging.DEBUG, logger=library)
    token, other = new_token(), new_token()
    rotation_id = str(uuid.uuid4())
    record = aws_provider.write_pending(tenant=TENANT, token=token, rotation_id=rotation_id)
    aws_provider.write_pending(tenant=TENANT, token=token, rotation_id=rotation_id)
    with pytest.raises(StoreConflictError):
        aws_provider.write_pending(tenant=TENANT, token=other, rotation_id=rotation_id)
    aws_provider.promote(tenant=TENANT, version=record.version)
    assert aws_provider.read(tenant=TENANT, stage=Stage.CURRENT) is not None
    assert any(r.name.startswith("botocore") for r in caplog.records)  # it did log bodies
    logged = caplog.text + "".join(r.getMessage() for r in caplog.records)
    for value in (token.value.reveal(), other.value.reveal()):
        assert value not in logged
