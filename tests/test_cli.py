"""The ``lg-rotate`` command as users run it: a subprocess, its exit codes and its output.

Everything here runs against the real LinuxGuard sandbox over loopback. The secrets
store is the in-memory one (``--target none``) or absent; store- and Kubernetes-backed
runs are in test_cli_e2e.py.
"""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rotator.tokens import TOKEN_SHAPED, fingerprint, normalize

LG = [sys.executable, "-m", "rotator.cli"]
TENANT = "acme"


def run(args, *, env=None, stdout=subprocess.PIPE, timeout=60):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    base.update(env or {})
    return subprocess.run(
        [*LG, *args],
        env=base,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
        check=False,
    )


def mint_args(sandbox, *extra):
    return [
        "--provider",
        "memory",
        "--tenant",
        TENANT,
        "--linuxguard-url",
        sandbox.url,
        "--target",
        "none",
        *extra,
    ]


def key_env(sandbox):
    return {"LINUXGUARD_API_KEY": sandbox.api_key}


def assert_no_token_shaped_text(*texts):
    for text in texts:
        assert not TOKEN_SHAPED.search(text or ""), "token-shaped text in output"


# --- the main job and the demo ---------------------------------------------------------


def test_demo_succeeds_and_prints_no_token():
    result = run(["demo"])
    assert result.returncode == 0, result.stderr
    assert "enrolled (HTTP 200)" in result.stdout
    assert "conflict (HTTP 409)" in result.stdout
    assert "409: the token is single-use per workload identity, and pod-a consumed it" in (
        result.stdout
    )
    assert re.search(r"rotation 1   fingerprint [0-9a-f]{12} ", result.stdout)
    assert "OK: every pod enrolled" in result.stdout
    assert result.stdout.rstrip().endswith("Faults: docs/SANDBOX.md.")  # the next steps
    assert result.stderr == ""  # logs at warning level: the story only
    assert_no_token_shaped_text(result.stdout, result.stderr)


def test_demo_verbose_adds_the_logs():
    result = run(["demo", "-v"])
    assert result.returncode == 0, result.stderr
    assert "minted token" in result.stderr
    assert_no_token_shaped_text(result.stdout, result.stderr)


def test_the_demo_next_steps_are_the_readme_commands():
    """Every command the demo suggests is one the README shows (and docs/SANDBOX.md runs)."""
    from rotator.demo import NEXT_STEPS

    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    commands = [
        line.split("#")[0].strip().removesuffix("\\").strip()
        for line in NEXT_STEPS.splitlines()
        if line.startswith("  ")
    ]
    assert len(commands) == 6
    for command in commands:
        assert command in readme, command
    assert "kubectl apply -k cronjob/overlays/vault" in readme


def test_bare_form_rotates_and_reports_fingerprints_only(sandbox):
    result = run([*mint_args(sandbox), "-o", "json"], env=key_env(sandbox))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["action"] == "minted"
    assert [m.fingerprint for m in sandbox.minted()] == [report["fingerprint"]]
    assert_no_token_shaped_text(result.stdout, result.stderr)


def test_logs_are_json_lines_when_not_a_terminal(sandbox):
    result = run(mint_args(sandbox), env=key_env(sandbox))
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    assert lines
    assert {"ts", "level", "logger", "msg"} <= set(lines[0])
    assert "rotated: minted a fresh token for tenant acme" in result.stdout


def test_dry_run_mints_nothing(sandbox):
    result = run([*mint_args(sandbox), "--dry-run"], env=key_env(sandbox))
    assert result.returncode == 0, result.stderr
    assert "dry run: would mint" in result.stdout
    assert sandbox.minted() == []


def test_config_file_and_env_precedence(sandbox, tmp_path):
    cfg = tmp_path / "lg.yaml"
    cfg.write_text(
        f"provider: memory\ntenant: from-file\nlinuxguard-url: {sandbox.url}\ntarget: none\n",
        encoding="utf-8",
    )
    env = {**key_env(sandbox), "LG_ROTATE_TENANT": "from-env"}
    result = run(["rotate", "--config", str(cfg), "-o", "json"], env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tenant"] == "from-env"
    result = run(["rotate", "--config", str(cfg), "--tenant", "from-flag", "-o", "json"], env=env)
    assert json.loads(result.stdout)["tenant"] == "from-flag"


# --- bad input: one line, a documented exit code, nothing changed ------------------------


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        ([], 2, "usage"),
        (["--bogus"], 2, "unrecognized arguments"),
        (["--tenant", "acme"], 2, "no secrets store chosen"),
        (["--provider", "nope", "--tenant", "acme"], 2, "unknown provider 'nope'"),
        (["--provider", "memory"], 2, "missing --tenant"),
        (["--provider", "memory", "--tenant", "a", "--min-ttl", "soon"], 2, "min-ttl"),
        (
            ["--provider", "memory", "--tenant", "a", "--target", "none"],
            2,
            "missing --linuxguard-url",
        ),
        (
            ["status", "--provider", "memory", "--tenant", "a", "--target", "none", "--check"],
            9,
            "no current token",
        ),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_code(args, code, needle):
    result = run(args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert needle in result.stderr + result.stdout


def test_missing_api_key_is_a_configuration_error(sandbox):
    result = run(mint_args(sandbox))
    assert result.returncode == 2
    assert "LINUXGUARD_API_KEY" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_wrong_api_key_is_final_and_not_retried(sandbox):
    result = run(mint_args(sandbox), env={"LINUXGUARD_API_KEY": "not-the-key"})
    assert result.returncode == 3
    assert "401" in result.stderr
    assert sandbox.requests("/api/tokens/new") == 1
    assert "not-the-key" not in result.stderr + result.stdout


def test_unreachable_linuxguard_fails_within_the_budget(sandbox):
    from fixtures.ports import free_port

    args = mint_args(sandbox)
    args[args.index("--linuxguard-url") + 1] = f"http://127.0.0.1:{free_port()}"
    result = run([*args, "--mint-budget", "2"], env=key_env(sandbox))
    assert result.returncode == 3
    assert "unreachable" in result.stderr.lower() or "connect" in result.stderr.lower()


def test_provider_whose_extra_is_missing_names_the_install(tmp_path):
    # Hide boto3 from the child: a sitecustomize that makes find_spec fail for it.
    (tmp_path / "sitecustomize.py").write_text(
        textwrap.dedent(
            """
            import importlib.abc, sys
            class _Hide(importlib.abc.MetaPathFinder):
                def find_spec(self, name, path=None, target=None):
                    if name == "boto3" or name.startswith("boto3."):
                        raise ModuleNotFoundError(name)
            sys.meta_path.insert(0, _Hide())
            """
        ),
        encoding="utf-8",
    )
    result = run(
        ["--provider", "aws", "--tenant", "a", "--target", "none", "--aws-region", "us-east-1"],
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "pip install 'linuxguard-rotator[aws]'" in result.stderr


def test_providers_lists_builtins_and_their_settings():
    result = run(["providers", "-o", "json"])
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"memory", "vault", "aws", "gcp"} <= set(rows)
    assert rows["vault"]["installed"] is True
    assert any(
        o["flag"] == "--vault-addr" and "VAULT_ADDR" in o["env"] for o in rows["vault"]["options"]
    )


def test_help_and_the_vault_path_import_no_other_sdk():
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from rotator.cli import build_parser
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                build_parser().parse_args(["rotate", "--help"])
            except SystemExit:
                pass
        from providers import registry
        registry.load("vault")
        sdks = ("boto3", "botocore", "google.cloud.secretmanager", "hvac", "kubernetes")
        print(sorted(m for m in sdks if m in sys.modules))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- secrets stay secret -------------------------------------------------------------


FAKE_DOCKER = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_DOCKER_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv, "env": dict(os.environ)}}, f)
"""


@pytest.fixture
def fake_docker(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable), encoding="utf-8")
    docker.chmod(0o755)
    record = tmp_path / "record.json"
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "FAKE_DOCKER_RECORD": str(record),
    }, record


def test_exec_puts_the_token_in_the_child_environment_only(sandbox, fake_docker):
    env, record = fake_docker
    argv = [
        "docker",
        "run",
        "-e",
        "LINUXGUARD_ENROLL_TOKEN",
        "-e",
        "LINUXGUARD_TENANT_ID",
        "agent:1",
    ]
    result = run(["exec", *mint_args(sandbox)[:-2], "--", *argv], env={**env, **key_env(sandbox)})
    assert result.returncode == 0, result.stderr
    seen = json.loads(record.read_text(encoding="utf-8"))
    token = seen["env"]["LINUXGUARD_ENROLL_TOKEN"]
    assert fingerprint(normalize(token).reveal()) == sandbox.minted()[0].fingerprint
    assert seen["env"]["LINUXGUARD_TENANT_ID"] == TENANT
    assert "LINUXGUARD_API_KEY" not in seen["env"]  # removed from lg-rotate's own environment
    assert seen["argv"][1:] == argv[1:]
    assert all(token not in arg for arg in seen["argv"])
    assert "LINUXGUARD_ENROLL_TOKEN" not in os.environ  # the calling side never had it
    assert token not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "bad",
    [
        ["-e", "LINUXGUARD_ENROLL_TOKEN=ABCD-EFGH-IJKL-MNOP-QRST-UVWX"],
        ["--env=LINUXGUARD_ENROLL_TOKEN=ABCDEFGHIJKLMNOPQRSTUVWX"],
        ["--enroll-token", "x"],
        ["ABCDEFGHIJKLMNOPQRSTUVWXYZ23"],
    ],
)
def test_exec_refuses_a_token_on_the_command_line_before_minting(sandbox, fake_docker, bad):
    env, record = fake_docker
    result = run(
        ["exec", *mint_args(sandbox)[:-2], "--", "docker", "run", *bad, "agent:1"],
        env={**env, **key_env(sandbox)},
    )
    assert result.returncode == 8
    assert "/proc/<pid>/cmdline" in result.stderr
    assert sandbox.minted() == []
    assert not record.exists()


def test_exec_unknown_command_costs_no_token(sandbox):
    result = run(
        ["exec", *mint_args(sandbox)[:-2], "--", "no-such-command-xyz"], env=key_env(sandbox)
    )
    assert result.returncode == 8
    assert "command not found" in result.stderr
    assert sandbox.minted() == []


@pytest.mark.parametrize("fmt", ["raw", "env", "json"])
def test_emit_writes_the_token_to_a_pipe(sandbox, fmt):
    result = run(["emit", *mint_args(sandbox)[:-2], "-o", fmt], env=key_env(sandbox))
    assert result.returncode == 0, result.stderr
    minted = sandbox.minted()[0].fingerprint
    if fmt == "raw":
        token = result.stdout.strip()
    elif fmt == "env":
        pairs = dict(line.split("=", 1) for line in result.stdout.splitlines())
        token = pairs["LINUXGUARD_ENROLL_TOKEN"]
        assert pairs["LINUXGUARD_TENANT_ID"] == TENANT
    else:
        token = json.loads(result.stdout)["token"]
    assert fingerprint(normalize(token).reveal()) == minted
    assert token not in result.stderr


def test_emit_refuses_a_terminal_and_writes_nothing(sandbox):
    controller, terminal = pty.openpty()
    try:
        result = run(["emit", *mint_args(sandbox)[:-2]], env=key_env(sandbox), stdout=terminal)
        os.set_blocking(controller, False)
        try:
            written = os.read(controller, 4096)
        except BlockingIOError:
            written = b""
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.returncode == 8
    assert "terminal" in result.stderr
    assert written == b""
    assert sandbox.minted() == []


def test_emit_failure_writes_nothing_to_stdout(sandbox):
    sandbox.set_mint_mode("malformed")
    result = run(["emit", *mint_args(sandbox)[:-2]], env=key_env(sandbox))
    assert result.returncode in (3, 4)
    assert result.stdout == ""
    assert re.search(r"token", result.stderr)


def test_a_plugin_provider_is_listed_and_rotates(sandbox):
    plugin_dir = str(Path(__file__).parent / "plugin_dist")
    listed = run(["providers", "-o", "json"], env={"PYTHONPATH": plugin_dir})
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["example"]["origin"] == "lg-rotate-example-provider"
    assert rows["example"]["options"][0]["flag"] == "--example-prefix"

    args = [*mint_args(sandbox), "-o", "json"]
    args[args.index("memory")] = "example"
    result = run(
        [*args, "--provider-option", "example-prefix=team"],
        env={**key_env(sandbox), "PYTHONPATH": plugin_dir},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["store"] == "example:team/acme"
    assert report["fingerprint"] == sandbox.minted()[0].fingerprint
