"""Secret hygiene (issue 8, item 4), against real servers and through real processes.

1. The LinuxGuard API key is gone from ``/proc/<pid>/environ`` while lg-rotate runs (the
   exec-time environment block, not only ``os.environ``).
2. ``exec`` hands its command none of lg-rotate's own credentials unless ``--pass-env``.
3. ``emit`` refuses, before minting, a stdout that would keep the token (a file, a
   directory, a device other than /dev/null), unless ``--force``.
4. Everything checkable is checked before minting (preflight): the store answers and the
   Kubernetes write would be accepted (server-side dry run on the real API server: RBAC,
   namespace, admission). A refused run mints nothing and changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml

from providers.base import Stage, check_store
from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import KubernetesError, StorePermissionError
from rotator.kube.api import KubernetesNotFoundError
from rotator.kube.secret import SecretTarget
from rotator.linuxguard import LinuxGuardClient
from rotator.retrying import RetryPolicy
from rotator.rotation import Rotator
from rotator.sandbox import MINT_PATH
from rotator.targets import MemoryTarget
from rotator.tokens import TOKEN_SHAPED, Secret, fingerprint, normalize

LG = [sys.executable, "-m", "rotator.cli"]
TENANT = "acme"
RBAC = Path(__file__).resolve().parent.parent / "cronjob" / "base" / "rbac.yaml"
SECRET = "linuxguard-enroll"
STRIPPED = ("LG_ROTATE_", "LINUXGUARD_", "VAULT_", "AWS_", "GOOGLE_", "CLOUDSDK_", "KUBECONFIG")


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything lg-rotate would read, plus ``extra``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(STRIPPED)}
    return {**base, **extra}


def lg(args: list[str], *, env: dict[str, str], stdout=subprocess.PIPE, timeout: float = 120):
    return subprocess.run(
        [*LG, *args],
        env=env,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )


def memory_args(sandbox, *extra: str) -> list[str]:
    """A fresh token from the sandbox, kept in the in-memory store (no Kubernetes)."""
    return ["--provider", "memory", "--tenant", TENANT, "--linuxguard-url", sandbox.url, *extra]


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("lg-rotate: error:")]
    assert len(lines) == 1, stderr
    assert "(fix: " in lines[0]
    assert not TOKEN_SHAPED.search(lines[0])
    return lines[0]


def wait_for(probe, *, timeout: float = 30.0, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)  # a polling interval, never a readiness guess


# --- 1. the API key in /proc/<pid>/environ ---------------------------------------------


SCRUB_PROBE = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from rotator.environ import scrub_exec_environ

    def block():
        with open("/proc/self/environ", "rb") as handle:
            return handle.read()

    value = os.environ.pop("LGR_PROBE_SECRET").encode()
    before = value in block()  # unsetenv leaves the exec-time copy in place
    ok = scrub_exec_environ(["LGR_PROBE_SECRET"])
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.environ.get('LGR_KEEP', '-'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    json.dump({
        "before": before,
        "ok": ok,
        "after": value in block(),
        "keep_in_block": b"LGR_KEEP=kept" in block(),
        "keep_in_os_environ": os.environ.get("LGR_KEEP"),
        "keep_in_child": child,
    }, sys.stdout)
    """
)


def test_scrub_erases_only_the_named_entry_from_the_exec_time_block() -> None:
    secret = f"probe-{uuid.uuid4().hex}"
    env = clean_env(LGR_PROBE_SECRET=secret, LGR_KEEP="kept")
    result = subprocess.run(
        [sys.executable, "-c", SCRUB_PROBE], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["before"] is True  # the problem is real: os.environ.pop is not enough
    assert seen["ok"] is True
    assert seen["after"] is False
    # Neighbours are intact: in the block, in os.environ and for a child (libc environ).
    assert seen["keep_in_block"] is True
    assert seen["keep_in_os_environ"] == "kept"
    assert seen["keep_in_child"] == "kept"


def test_a_running_rotation_shows_no_api_key_in_proc_environ(sandbox) -> None:
    # The mint request hangs (then drops, minting nothing): lg-rotate is alive, past start-up.
    sandbox.inject_fault(status=None, latency_ms=20_000, drop=True, path=MINT_PATH)
    marker = f"marker-{uuid.uuid4().hex}"
    env = clean_env(LINUXGUARD_API_KEY=sandbox.api_key, LGR_HYGIENE_MARKER=marker)
    process = subprocess.Popen(
        [*LG, "rotate", *memory_args(sandbox, "--target", "none", "--http-timeout", "60")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(
            lambda: sandbox.requests(MINT_PATH) >= 1 or process.poll() is not None,
            what="lg-rotate to send its mint request",
        )
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        block = Path(f"/proc/{process.pid}/environ").read_bytes()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert f"LGR_HYGIENE_MARKER={marker}".encode() in block  # we read the right block
    assert sandbox.api_key.encode() not in block
    assert b"LINUXGUARD_API_KEY=" not in block
    assert sandbox.minted() == []


# --- 2. exec hands its command none of lg-rotate's credentials -------------------------

DUMP_ENV = "import json, os, sys; json.dump(dict(os.environ), sys.stdout)"

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLEEXAMPLE00",
    "AWS_SECRET_ACCESS_KEY": "aws-secret-access-key-value",
    "AWS_SESSION_TOKEN": "aws-session-token-value",
    "VAULT_SECRET_ID": "approle-secret-id-value",
    "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/gcp/key.json",
    "LG_ROTATE_VAULT_ROLE_ID": "approle-role-id",  # a provider option marked secret
}


@pytest.fixture
def dump_env(tmp_path: Path) -> list[str]:
    """A command that writes its whole environment as JSON to its stdout (our pipe)."""
    script = tmp_path / "dump_env.py"
    script.write_text(DUMP_ENV, encoding="utf-8")
    return [sys.executable, str(script)]


def exec_child_env(args: list[str], *, env: dict[str, str]) -> tuple[dict[str, str], str]:
    result = lg(args, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_exec_gives_the_command_none_of_the_credentials_by_default(
    sandbox, openbao, vault_env, vault_provider, dump_env
) -> None:
    # A token of its own (the dev root token, "root", is a substring of too much).
    vault_token = openbao.client().auth.token.create(policies=["root"], ttl="10m")["auth"][
        "client_token"
    ]
    env = clean_env(
        **{**vault_env, "VAULT_TOKEN": vault_token},
        **CREDENTIALS,
        LINUXGUARD_API_KEY=sandbox.api_key,
        LGR_HARMLESS="yes",
    )
    seen, stderr = exec_child_env(
        ["exec", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
         "--", *dump_env],
        env=env,
    )  # fmt: skip
    # The token and tenant are there, and they are the ones minted and stored.
    token = seen["LINUXGUARD_ENROLL_TOKEN"]
    assert fingerprint(normalize(token).reveal()) == sandbox.minted()[0].fingerprint
    assert seen["LINUXGUARD_TENANT_ID"] == TENANT
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.token.value.reveal() == normalize(token).reveal()
    # lg-rotate's own credentials are not: the Vault token it used, the API key, the rest.
    for name in ("VAULT_TOKEN", "LINUXGUARD_API_KEY", *CREDENTIALS):
        assert name not in seen, name
    assert vault_token not in json.dumps(seen)
    # Everything else is inherited as before.
    assert seen["LGR_HARMLESS"] == "yes"
    assert seen["VAULT_ADDR"] == vault_env["VAULT_ADDR"]
    assert "VAULT_TOKEN" in stderr  # the log names what was withheld (names, never values)
    assert vault_token not in stderr


def test_pass_env_hands_over_exactly_the_named_credential(sandbox, dump_env) -> None:
    env = clean_env(
        **CREDENTIALS, VAULT_TOKEN="vault-token-value", LINUXGUARD_API_KEY=sandbox.api_key
    )
    seen, _ = exec_child_env(
        ["exec", *memory_args(sandbox, "--pass-env", "VAULT_TOKEN", "--pass-env",
         "AWS_SESSION_TOKEN"), "--", *dump_env],
        env=env,
    )  # fmt: skip
    assert seen["VAULT_TOKEN"] == "vault-token-value"
    assert seen["AWS_SESSION_TOKEN"] == CREDENTIALS["AWS_SESSION_TOKEN"]
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert "LINUXGUARD_API_KEY" not in seen
    assert "LINUXGUARD_ENROLL_TOKEN" in seen


def test_the_api_key_file_setting_is_withheld_too(sandbox, dump_env, tmp_path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(sandbox.api_key, encoding="utf-8")
    env = clean_env(LG_ROTATE_API_KEY_FILE=str(key_file))
    seen, _ = exec_child_env(["exec", *memory_args(sandbox), "--", *dump_env], env=env)
    assert "LG_ROTATE_API_KEY_FILE" not in seen
    assert len(sandbox.minted()) == 1


@pytest.mark.parametrize(
    ("flag", "needle"),
    [("LINUXGUARD_API_KEY", "never handed"), ("VAULT_TOKEN=abc", "variable name")],
)
def test_pass_env_refuses_the_api_key_and_values_before_minting(
    sandbox, dump_env, flag, needle
) -> None:
    env = clean_env(LINUXGUARD_API_KEY=sandbox.api_key, VAULT_TOKEN="t")
    result = lg(["exec", *memory_args(sandbox, "--pass-env", flag), "--", *dump_env], env=env)
    assert result.returncode == 2
    assert needle in one_error_line(result.stderr)
    assert "abc" not in result.stderr
    assert result.stdout == ""  # the command never ran
    assert sandbox.requests(MINT_PATH) == 0


# --- 3. emit refuses a destination that keeps the token ---------------------------------


def emit_into(sandbox, stdout, *extra: str):
    env = clean_env(LINUXGUARD_API_KEY=sandbox.api_key)
    return lg(["emit", *memory_args(sandbox, *extra)], env=env, stdout=stdout)


@pytest.mark.parametrize("mode", ["w", "a"])
def test_emit_into_a_regular_file_is_refused_before_minting(sandbox, tmp_path, mode) -> None:
    path = tmp_path / "tok.txt"
    with path.open(mode, encoding="utf-8") as out:
        result = emit_into(sandbox, out)
    assert result.returncode == 8
    line = one_error_line(result.stderr)
    assert "regular file" in line
    assert "--env-file <(" in line  # the fix names the safe way
    assert path.read_bytes() == b""
    assert sandbox.requests(MINT_PATH) == 0
    assert sandbox.minted() == []


def test_emit_into_a_device_other_than_dev_null_is_refused(sandbox) -> None:
    # /dev/zero discards too, but a device is refused unless it is /dev/null: another one
    # may keep what it gets (a serial line, a printer, /dev/kmsg and the kernel log).
    with open("/dev/zero", "w", encoding="utf-8") as device:
        result = emit_into(sandbox, device)
    assert result.returncode == 8
    assert "character device" in one_error_line(result.stderr)
    assert sandbox.requests(MINT_PATH) == 0


def test_emit_into_a_file_with_force_writes_it(sandbox, tmp_path) -> None:
    path = tmp_path / "tok.txt"
    with path.open("w", encoding="utf-8") as out:
        result = emit_into(sandbox, out, "--force")
    assert result.returncode == 0, result.stderr
    token = path.read_text(encoding="utf-8").strip()
    assert fingerprint(normalize(token).reveal()) == sandbox.minted()[0].fingerprint


def test_emit_into_dev_null_or_a_socket_is_allowed(sandbox) -> None:
    result = emit_into(sandbox, subprocess.DEVNULL)  # keeps nothing: allowed
    assert result.returncode == 0, result.stderr
    assert len(sandbox.minted()) == 1

    ours, theirs = socket.socketpair()
    with ours, theirs:
        result = emit_into(sandbox, theirs.fileno())
        theirs.close()
        received = b""
        while chunk := ours.recv(4096):
            received += chunk
    assert result.returncode == 0, result.stderr
    token = received.decode().strip()
    assert fingerprint(normalize(token).reveal()) == sandbox.minted()[1].fingerprint


# --- 4. preflight: nothing is minted for a run that cannot finish ----------------------


@pytest.fixture
def minter(sandbox) -> LinuxGuardClient:
    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=5),
    )


class RefusingTarget(MemoryTarget):
    def preflight(self) -> None:
        raise KubernetesError("refused by the test", fix="none")


def test_a_failing_target_preflight_mints_nothing(sandbox, minter) -> None:
    provider = MemoryProvider(store=MemoryStore())
    rotator = Rotator(minter=minter, provider=provider, tenant=TENANT, target=RefusingTarget())
    with pytest.raises(KubernetesError):
        rotator.rotate()
    with pytest.raises(KubernetesError):
        rotator.rotate(dry_run=True)  # a dry run answers "would a real run succeed?"
    assert sandbox.requests(MINT_PATH) == 0
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None


def test_secret_preflight_is_a_dry_run(k8s, k8s_namespace) -> None:
    target = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace)
    target.preflight()  # missing Secret: a dry-run create
    assert k8s.get("v1/secrets", k8s_namespace, SECRET) is None

    k8s.apply(yaml.safe_load((RBAC.parent / "secret.yaml").read_text()), k8s_namespace)
    before = k8s.get("v1/secrets", k8s_namespace, SECRET)
    target.preflight()  # existing Secret: a dry-run patch carrying its resourceVersion
    after = k8s.get("v1/secrets", k8s_namespace, SECRET)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]

    k8s.apply(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "frozen"}, "immutable": True},
        k8s_namespace,
    )
    frozen = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace, name="frozen")
    with pytest.raises(KubernetesError, match="immutable"):
        frozen.preflight()


def test_a_missing_namespace_fails_preflight_and_mints_nothing(k8s, sandbox, minter) -> None:
    missing = f"gone-{uuid.uuid4().hex[:8]}"
    target = SecretTarget(api_client=k8s.api_client(), namespace=missing)
    with pytest.raises(KubernetesNotFoundError, match="does not exist"):
        target.preflight()
    provider = MemoryProvider(store=MemoryStore())
    with pytest.raises(KubernetesNotFoundError):
        Rotator(minter=minter, provider=provider, tenant=TENANT, target=target).rotate()
    assert sandbox.requests(MINT_PATH) == 0
    assert provider.read(tenant=TENANT, stage=Stage.PENDING) is None


def shipped_rbac(namespace: str, *, secret_verbs: list[str] | None = None) -> list[dict]:
    """The shipped Role and RoleBinding of the CronJob (cronjob/base/rbac.yaml)."""
    role, binding = list(yaml.safe_load_all(RBAC.read_text(encoding="utf-8")))[:2]
    if secret_verbs is not None:
        role["rules"][0]["verbs"] = secret_verbs
    binding["subjects"][0]["namespace"] = namespace
    return [role, binding]


@pytest.fixture
def as_cronjob(k8s, k8s_namespace, tmp_path):
    """A kubeconfig acting as the CronJob's ServiceAccount ``lg-rotate``, given RBAC rules."""

    def make(*, secret_verbs: list[str] | None = None) -> str:
        k8s.apply(shipped_rbac(k8s_namespace, secret_verbs=secret_verbs), k8s_namespace)
        path = tmp_path / "sa-kubeconfig"
        k8s.serviceaccount_kubeconfig(k8s_namespace, "lg-rotate", path)
        return str(path)

    return make


def rotate_vault(sandbox, namespace: str, *, kubeconfig: str, vault_env: dict[str, str]):
    env = clean_env(**vault_env, LINUXGUARD_API_KEY=sandbox.api_key, KUBECONFIG=kubeconfig)
    return lg(
        ["rotate", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
         "--namespace", namespace],
        env=env,
    )  # fmt: skip


def assert_store_untouched(vault_provider) -> None:
    assert vault_provider.read(tenant=TENANT, stage=Stage.CURRENT) is None
    assert vault_provider.read(tenant=TENANT, stage=Stage.PENDING) is None


def test_deleted_secret_without_create_rights_mints_nothing(
    k8s, k8s_namespace, sandbox, vault_env, vault_provider, as_cronjob
) -> None:
    kubeconfig = as_cronjob()  # the shipped Role: get/patch on the Secret, no create
    k8s.apply(yaml.safe_load((RBAC.parent / "secret.yaml").read_text()), k8s_namespace)
    k8s.delete("v1/secrets", k8s_namespace, SECRET)
    wait_for(lambda: k8s.get("v1/secrets", k8s_namespace, SECRET) is None, what="the Secret to go")

    result = rotate_vault(sandbox, k8s_namespace, kubeconfig=kubeconfig, vault_env=vault_env)

    assert result.returncode == 6, result.stderr
    line = one_error_line(result.stderr)
    assert "may not create" in line
    assert "cronjob/base/secret.yaml" in line  # the fix: restore the shipped Secret
    assert sandbox.requests(MINT_PATH) == 0
    assert_store_untouched(vault_provider)
    assert k8s.get("v1/secrets", k8s_namespace, SECRET) is None


def test_rbac_refusing_the_patch_mints_nothing(
    k8s, k8s_namespace, sandbox, vault_env, vault_provider, as_cronjob
) -> None:
    kubeconfig = as_cronjob(secret_verbs=["get"])
    k8s.apply(yaml.safe_load((RBAC.parent / "secret.yaml").read_text()), k8s_namespace)
    before = k8s.get("v1/secrets", k8s_namespace, SECRET)

    result = rotate_vault(sandbox, k8s_namespace, kubeconfig=kubeconfig, vault_env=vault_env)

    assert result.returncode == 6, result.stderr
    assert "may not patch" in one_error_line(result.stderr)
    assert sandbox.requests(MINT_PATH) == 0
    assert_store_untouched(vault_provider)
    after = k8s.get("v1/secrets", k8s_namespace, SECRET)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


def test_the_shipped_role_rotates_an_existing_secret(
    k8s, k8s_namespace, sandbox, vault_env, vault_provider, as_cronjob
) -> None:
    """The control for the two tests above: the same identity, the Secret present."""
    kubeconfig = as_cronjob()
    k8s.apply(yaml.safe_load((RBAC.parent / "secret.yaml").read_text()), k8s_namespace)

    result = rotate_vault(sandbox, k8s_namespace, kubeconfig=kubeconfig, vault_env=vault_env)

    assert result.returncode == 0, result.stderr
    assert len(sandbox.minted()) == 1
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert current is not None
    assert current.fingerprint == sandbox.minted()[0].fingerprint


def test_a_missing_namespace_through_the_cli_mints_nothing(
    k8s, sandbox, vault_env, vault_provider, tmp_path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    missing = f"gone-{uuid.uuid4().hex[:8]}"

    result = rotate_vault(sandbox, missing, kubeconfig=str(kubeconfig), vault_env=vault_env)

    assert result.returncode == 6, result.stderr
    assert "does not exist" in one_error_line(result.stderr)
    assert sandbox.requests(MINT_PATH) == 0
    assert_store_untouched(vault_provider)


@pytest.fixture
def vault_down() -> dict[str, str]:
    from fixtures.ports import free_port

    return {"VAULT_ADDR": f"http://127.0.0.1:{free_port()}", "VAULT_TOKEN": "root"}


def test_exec_with_the_store_down_mints_nothing(sandbox, vault_down, dump_env) -> None:
    env = clean_env(**vault_down, LINUXGUARD_API_KEY=sandbox.api_key)
    result = lg(
        ["exec", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
         "--", *dump_env],
        env=env,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    assert "unavailable" in one_error_line(result.stderr)
    assert result.stdout == ""  # the command never ran
    assert sandbox.requests(MINT_PATH) == 0


def test_emit_with_the_store_down_mints_nothing(sandbox, vault_down) -> None:
    env = clean_env(**vault_down, LINUXGUARD_API_KEY=sandbox.api_key)
    result = lg(
        ["emit", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url],
        env=env,
    )
    assert result.returncode == 5, result.stderr
    assert result.stdout == ""
    assert sandbox.requests(MINT_PATH) == 0


def test_a_vault_token_without_write_capabilities_fails_before_minting(
    openbao, sandbox, vault_path_template
) -> None:
    from providers.vault import VaultProvider

    path = vault_path_template.replace("<tenant>", TENANT)
    policy = f"lgr-read-only-{uuid.uuid4().hex[:8]}"
    admin = openbao.client()
    admin.sys.create_or_update_policy(
        name=policy,
        policy=f'path "secret/data/{path}" {{ capabilities = ["read"] }}\n'
        f'path "secret/metadata/{path}" {{ capabilities = ["read"] }}\n',
    )
    read_only = admin.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    provider = VaultProvider(
        client=openbao.client(token=read_only), path_template=vault_path_template
    )
    with pytest.raises(StorePermissionError, match="do not allow"):
        check_store(provider, tenant=TENANT)

    env = clean_env(
        VAULT_ADDR=openbao.addr,
        VAULT_TOKEN=read_only,
        LG_ROTATE_VAULT_PATH=vault_path_template,
        LINUXGUARD_API_KEY=sandbox.api_key,
    )
    result = lg(
        ["rotate", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
         "--target", "none"],
        env=env,
    )  # fmt: skip
    assert result.returncode == 5, result.stderr
    line = one_error_line(result.stderr)
    assert "create on secret/data/" in line
    assert read_only not in result.stderr
    assert sandbox.requests(MINT_PATH) == 0
