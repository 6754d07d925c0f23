"""The Secret Manager fake, driven by the official client: the semantics the provider relies on."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import google_crc32c
import grpc
import pytest
from google.api_core import exceptions as gexc
from google.cloud.secretmanager_v1 import SecretManagerServiceClient
from google.cloud.secretmanager_v1.services.secret_manager_service.transports import (
    SecretManagerServiceGrpcTransport,
)
from google.cloud.secretmanager_v1.types import SecretVersion

State = SecretVersion.State


@pytest.fixture
def client(gcp_fake) -> Iterator[SecretManagerServiceClient]:
    gcp_fake.fake.clear_faults()
    channel = grpc.insecure_channel(gcp_fake.endpoint)
    yield SecretManagerServiceClient(transport=SecretManagerServiceGrpcTransport(channel=channel))
    channel.close()
    gcp_fake.fake.clear_faults()


@pytest.fixture
def secret_name(gcp_fake, client) -> str:
    """A fresh secret with automatic replication; its name as the caller spells it."""
    secret_id = f"s{uuid.uuid4().hex[:12]}"
    client.create_secret(
        request={
            "parent": f"projects/{gcp_fake.project}",
            "secret_id": secret_id,
            "secret": {"replication": {"automatic": {}}},
        },
        retry=None,
    )
    return f"projects/{gcp_fake.project}/secrets/{secret_id}"


def _add(client, secret_name: str, data: bytes, *, crc: int | None = None) -> int:
    payload: dict[str, object] = {"data": data}
    if crc is not None:
        payload["data_crc32c"] = crc
    version = client.add_secret_version(
        request={"parent": secret_name, "payload": payload}, retry=None
    )
    return int(version.name.rsplit("/", 1)[-1])


def _crc(data: bytes) -> int:
    return int(google_crc32c.value(data))


def _update_aliases(client, secret_name: str, aliases: dict[str, int], etag: str = ""):
    return client.update_secret(
        request={
            "secret": {"name": secret_name, "version_aliases": aliases, "etag": etag},
            "update_mask": {"paths": ["version_aliases"]},
        },
        retry=None,
    )


# --- secrets -----------------------------------------------------------------------------


def test_create_get_and_duplicate(gcp_fake, client) -> None:
    secret_id = f"s{uuid.uuid4().hex[:12]}"
    created = client.create_secret(
        request={
            "parent": f"projects/{gcp_fake.project}",
            "secret_id": secret_id,
            "secret": {
                "replication": {
                    "user_managed": {
                        "replicas": [{"location": "us-east1"}, {"location": "europe-west1"}]
                    }
                },
                "labels": {"managed-by": "lg-rotate"},
            },
        },
        retry=None,
    )
    # Responses name the project by number, as the real service does.
    assert created.name == f"projects/{gcp_fake.project_number}/secrets/{secret_id}"
    assert created.etag.startswith('"')
    assert created.etag.endswith('"')
    fetched = client.get_secret(
        request={"name": f"projects/{gcp_fake.project}/secrets/{secret_id}"}, retry=None
    )
    assert fetched.labels == {"managed-by": "lg-rotate"}
    assert [r.location for r in fetched.replication.user_managed.replicas] == [
        "us-east1",
        "europe-west1",
    ]
    with pytest.raises(gexc.AlreadyExists):
        client.create_secret(
            request={
                "parent": f"projects/{gcp_fake.project_number}",
                "secret_id": secret_id,
                "secret": {"replication": {"automatic": {}}},
            },
            retry=None,
        )


def test_create_validates_replication_labels_aliases_and_project(gcp_fake, client) -> None:
    parent = f"projects/{gcp_fake.project}"
    with pytest.raises(gexc.InvalidArgument):
        client.create_secret(request={"parent": parent, "secret_id": "no-replication"}, retry=None)
    with pytest.raises(gexc.InvalidArgument):
        client.create_secret(
            request={
                "parent": parent,
                "secret_id": "bad-label",
                "secret": {"replication": {"automatic": {}}, "labels": {"Upper": "x"}},
            },
            retry=None,
        )
    with pytest.raises(gexc.InvalidArgument):  # no version exists for an alias to name
        client.create_secret(
            request={
                "parent": parent,
                "secret_id": "alias-at-birth",
                "secret": {"replication": {"automatic": {}}, "version_aliases": {"current": 1}},
            },
            retry=None,
        )
    with pytest.raises(gexc.InvalidArgument):
        client.create_secret(
            request={
                "parent": parent,
                "secret_id": "bad/id",
                "secret": {"replication": {"automatic": {}}},
            },
            retry=None,
        )
    with pytest.raises(gexc.NotFound):
        client.create_secret(
            request={
                "parent": "projects/no-such-project",
                "secret_id": "x",
                "secret": {"replication": {"automatic": {}}},
            },
            retry=None,
        )
    with pytest.raises(gexc.NotFound):
        client.get_secret(request={"name": f"{parent}/secrets/missing"}, retry=None)


# --- versions ----------------------------------------------------------------------------


def test_add_and_access_with_checksums(gcp_fake, client, secret_name) -> None:
    assert _add(client, secret_name, b"one", crc=_crc(b"one")) == 1
    assert _add(client, secret_name, b"two") == 2
    with pytest.raises(gexc.InvalidArgument):
        _add(client, secret_name, b"three", crc=_crc(b"three") ^ 1)
    snapshot = gcp_fake.fake.snapshot(
        project=gcp_fake.project, secret_id=secret_name.rsplit("/", 1)[-1]
    )
    assert sorted(snapshot.versions) == [1, 2]  # the mismatched write stored nothing
    assert snapshot.versions[1].checksum_given
    assert not snapshot.versions[2].checksum_given

    for ref, number, data in (("1", 1, b"one"), ("latest", 2, b"two")):
        answer = client.access_secret_version(
            request={"name": f"{secret_name}/versions/{ref}"}, retry=None
        )
        assert answer.name.endswith(f"/versions/{number}")
        assert answer.payload.data == data
        assert answer.payload.data_crc32c == _crc(data)
    with pytest.raises(gexc.NotFound):
        client.access_secret_version(request={"name": f"{secret_name}/versions/9"}, retry=None)
    with pytest.raises(gexc.NotFound):
        client.access_secret_version(
            request={"name": f"{secret_name}/versions/no-such-alias"}, retry=None
        )


def test_payload_size_limit(client, secret_name) -> None:
    with pytest.raises(gexc.InvalidArgument):
        _add(client, secret_name, b"x" * 65537)
    assert _add(client, secret_name, b"x" * 65536) == 1


def test_version_states_and_etags(client, secret_name) -> None:
    _add(client, secret_name, b"one")
    name = f"{secret_name}/versions/1"
    version = client.get_secret_version(request={"name": name}, retry=None)
    assert version.state == State.ENABLED

    disabled = client.disable_secret_version(
        request={"name": name, "etag": version.etag}, retry=None
    )
    assert disabled.state == State.DISABLED
    assert disabled.etag != version.etag
    with pytest.raises(gexc.FailedPrecondition, match="DISABLED"):
        client.access_secret_version(request={"name": name}, retry=None)
    with pytest.raises(gexc.FailedPrecondition):  # stale version etag
        client.enable_secret_version(request={"name": name, "etag": version.etag}, retry=None)
    client.enable_secret_version(request={"name": name, "etag": disabled.etag}, retry=None)
    assert client.access_secret_version(request={"name": name}, retry=None).payload.data == b"one"

    destroyed = client.destroy_secret_version(request={"name": name}, retry=None)
    assert destroyed.state == State.DESTROYED
    assert "destroy_time" in destroyed
    with pytest.raises(gexc.FailedPrecondition, match="DESTROYED"):
        client.access_secret_version(request={"name": name}, retry=None)
    for change in (client.enable_secret_version, client.destroy_secret_version):
        with pytest.raises(gexc.FailedPrecondition):  # DESTROYED is terminal
            change(request={"name": name}, retry=None)


def test_latest_is_the_newest_version_whatever_its_state(client, secret_name) -> None:
    _add(client, secret_name, b"one")
    _add(client, secret_name, b"two")
    client.disable_secret_version(request={"name": f"{secret_name}/versions/2"}, retry=None)
    with pytest.raises(gexc.FailedPrecondition):
        client.access_secret_version(request={"name": f"{secret_name}/versions/latest"}, retry=None)
    latest = client.get_secret_version(request={"name": f"{secret_name}/versions/latest"})
    assert latest.name.endswith("/versions/2")


def test_list_versions_newest_first_and_paged(client, secret_name) -> None:
    for index in range(5):
        _add(client, secret_name, f"v{index}".encode())
    client.destroy_secret_version(request={"name": f"{secret_name}/versions/2"}, retry=None)
    listed = list(
        client.list_secret_versions(request={"parent": secret_name, "page_size": 2}, retry=None)
    )
    assert [int(v.name.rsplit("/", 1)[-1]) for v in listed] == [5, 4, 3, 2, 1]
    assert listed[3].state == State.DESTROYED
    first_page = client.list_secret_versions(
        request={"parent": secret_name, "page_size": 2}, retry=None
    )
    assert len(first_page.versions) == 2
    assert first_page.next_page_token
    with pytest.raises(gexc.InvalidArgument):  # filters are refused, not silently ignored
        list(
            client.list_secret_versions(request={"parent": secret_name, "filter": "state:ENABLED"})
        )


# --- aliases and etags -------------------------------------------------------------------


def test_aliases_read_and_move_with_etags(client, secret_name) -> None:
    _add(client, secret_name, b"one")
    _add(client, secret_name, b"two")
    before = client.get_secret(request={"name": secret_name}, retry=None)
    updated = _update_aliases(client, secret_name, {"current": 1, "pending": 2}, before.etag)
    assert dict(updated.version_aliases) == {"current": 1, "pending": 2}
    assert updated.etag != before.etag
    for alias, data in (("current", b"one"), ("pending", b"two")):
        answer = client.access_secret_version(
            request={"name": f"{secret_name}/versions/{alias}"}, retry=None
        )
        assert answer.payload.data == data
    by_alias = client.get_secret_version(request={"name": f"{secret_name}/versions/pending"})
    assert by_alias.name.endswith("/versions/2")

    with pytest.raises(gexc.FailedPrecondition, match="etag"):  # the documented mismatch code
        _update_aliases(client, secret_name, {"current": 2}, before.etag)
    # The whole map is replaced: dropping "pending" removes it.
    moved = _update_aliases(client, secret_name, {"current": 2}, updated.etag)
    assert dict(moved.version_aliases) == {"current": 2}
    # Without an etag, no check; even an update that changes nothing moves the etag.
    again = _update_aliases(client, secret_name, {"current": 2})
    assert again.etag != moved.etag
    # Adding a version does not change the secret's etag (only secret updates do).
    _add(client, secret_name, b"three")
    assert client.get_secret(request={"name": secret_name}, retry=None).etag == again.etag


def test_alias_validation(client, secret_name) -> None:
    _add(client, secret_name, b"one")
    _add(client, secret_name, b"two")
    with pytest.raises(gexc.InvalidArgument):
        _update_aliases(client, secret_name, {"current": 7})  # no such version
    with pytest.raises(gexc.InvalidArgument):
        _update_aliases(client, secret_name, {"latest": 1})  # reserved
    with pytest.raises(gexc.InvalidArgument):
        _update_aliases(client, secret_name, {"9lives": 1})  # must start with a letter
    client.destroy_secret_version(request={"name": f"{secret_name}/versions/1"}, retry=None)
    with pytest.raises(gexc.FailedPrecondition):
        _update_aliases(client, secret_name, {"current": 1})
    with pytest.raises(gexc.InvalidArgument):
        client.update_secret(request={"secret": {"name": secret_name}}, retry=None)  # no mask
    secret = client.update_secret(
        request={
            "secret": {"name": secret_name, "labels": {"team": "sec"}, "annotations": {"a": "b"}},
            "update_mask": {"paths": ["labels", "annotations"]},
        },
        retry=None,
    )
    assert secret.labels == {"team": "sec"}
    assert secret.annotations == {"a": "b"}


def test_etag_mismatch_code_can_be_aborted(gcp_fake, client, secret_name) -> None:
    _add(client, secret_name, b"one")
    gcp_fake.fake.etag_mismatch_code = grpc.StatusCode.ABORTED
    try:
        with pytest.raises(gexc.Aborted):
            _update_aliases(client, secret_name, {"current": 1}, '"stale"')
    finally:
        gcp_fake.fake.etag_mismatch_code = grpc.StatusCode.FAILED_PRECONDITION


# --- fault injection and concurrency -----------------------------------------------------


def test_fail_next_per_method_and_count(gcp_fake, client, secret_name) -> None:
    fake = gcp_fake.fake
    fake.fail_next(grpc.StatusCode.UNAVAILABLE, times=2, method="GetSecret")
    with pytest.raises(gexc.ServiceUnavailable):
        client.get_secret(request={"name": secret_name}, retry=None)
    _add(client, secret_name, b"one")  # another method is not affected
    with pytest.raises(gexc.ServiceUnavailable):
        client.get_secret(request={"name": secret_name}, retry=None)
    client.get_secret(request={"name": secret_name}, retry=None)  # budget spent
    assert fake.pending_faults() == 0

    fake.fail_next(grpc.StatusCode.PERMISSION_DENIED)  # any method
    with pytest.raises(gexc.PermissionDenied):
        client.access_secret_version(request={"name": f"{secret_name}/versions/1"}, retry=None)
    fake.fail_next(grpc.StatusCode.RESOURCE_EXHAUSTED, method="AccessSecretVersion")
    with pytest.raises(gexc.ResourceExhausted):
        client.access_secret_version(request={"name": f"{secret_name}/versions/1"}, retry=None)
    with pytest.raises(ValueError, match="unknown method"):
        fake.fail_next(grpc.StatusCode.UNAVAILABLE, method="NoSuchRpc")


def test_fail_after_commit_and_hooks(gcp_fake, client, secret_name) -> None:
    fake = gcp_fake.fake
    secret_id = secret_name.rsplit("/", 1)[-1]
    fake.fail_next(grpc.StatusCode.UNAVAILABLE, method="AddSecretVersion", after=True)
    with pytest.raises(gexc.ServiceUnavailable):
        _add(client, secret_name, b"one")
    assert list(fake.snapshot(project=gcp_fake.project, secret_id=secret_id).versions) == [1]

    etag = client.get_secret(request={"name": secret_name}, retry=None).etag
    fake.before_next(
        "UpdateSecret", lambda: fake.touch_secret(project=gcp_fake.project, secret_id=secret_id)
    )
    with pytest.raises(gexc.FailedPrecondition):
        _update_aliases(client, secret_name, {"current": 1}, etag)

    fake.tamper_next_access()
    answer = client.access_secret_version(request={"name": f"{secret_name}/versions/1"})
    assert answer.payload.data != b"one"
    assert answer.payload.data_crc32c == _crc(b"one")
    assert fake.calls_to("AddSecretVersion")[-1].request.payload.data == b"one"


def test_concurrent_writers_get_distinct_versions(gcp_fake, client, secret_name) -> None:
    numbers: list[int] = []
    lock = threading.Lock()

    def writer(index: int) -> None:
        number = _add(client, secret_name, f"w{index}".encode())
        with lock:
            numbers.append(number)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(numbers) == list(range(1, 13))
