"""The settings contract, as users meet it: ``lg-rotate`` subprocesses.

Every setting is a flag, an ``LG_ROTATE_*`` variable and a config key (exceptions:
``config.FLAG_ONLY``); unknown variables are warned about with a "did you mean"; every
missing required setting is named in one error; durations read and print as ``1m30s``;
usage errors show the subcommand's usage and suggest; every ``--help`` ends with examples
that parse; the namespace comes from the flag, else the kubeconfig context, else the pod's,
else ``default``, and reports say which; ``status`` shows each setting's value and source.

Runs against the LinuxGuard sandbox, OpenBao and the real API server of
tests/fixtures/cluster.py where a store or a cluster is needed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from providers.base import Stage
from rotator import config
from rotator.errors import EXIT_CODE_MEANINGS
from rotator.kube.secret import SecretTarget

LG = [sys.executable, "-m", "rotator.cli"]
TENANT = "acme"


def run(args, *, env=None, timeout=120):
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LG_ROTATE_", "LINUXGUARD_", "VAULT_", "KUBECONFIG"))
    }
    base.update(env or {})
    return subprocess.run(
        [*LG, *args], env=base, capture_output=True, text=True, timeout=timeout, check=False
    )


def store_only(sandbox, *extra):
    """A rotation that needs no store server and no cluster (memory store, --target none)."""
    return [
        "rotate", "--provider", "memory", "--tenant", TENANT,
        "--linuxguard-url", sandbox.url, "--target", "none", *extra,
    ]  # fmt: skip


def key(sandbox, **extra):
    return {"LINUXGUARD_API_KEY": sandbox.api_key, **extra}


def warnings_in(stderr: str) -> list[str]:
    """The warning messages of JSON log lines on stderr."""
    found = []
    for line in stderr.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("level") == "warning":
            found.append(entry["msg"])
    return found


# --- every setting is a flag, a variable and a config key -------------------------------------


def test_lg_rotate_dry_run_mints_nothing(sandbox):
    result = run(store_only(sandbox), env=key(sandbox, LG_ROTATE_DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    assert "dry run: would mint" in result.stdout
    assert sandbox.minted() == []


def test_dry_run_from_the_config_file_mints_nothing(sandbox, tmp_path):
    cfg = tmp_path / "lg.yaml"
    cfg.write_text("dry-run: true\noutput: json\n", encoding="utf-8")
    result = run([*store_only(sandbox), "--config", str(cfg)], env=key(sandbox))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["dryRun"] is True
    assert sandbox.minted() == []


def test_a_flag_beats_the_variable_for_switches_too(sandbox):
    result = run([*store_only(sandbox), "--no-dry-run"], env=key(sandbox, LG_ROTATE_DRY_RUN="true"))
    assert result.returncode == 0, result.stderr
    assert "rotated: minted a fresh token" in result.stdout
    assert len(sandbox.minted()) == 1


def test_output_restart_wait_and_timeout_have_variables(sandbox):
    result = run(store_only(sandbox), env=key(sandbox, LG_ROTATE_OUTPUT="yaml"))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["action"] == "minted"

    waited = run(store_only(sandbox), env=key(sandbox, LG_ROTATE_WAIT="1"))
    assert waited.returncode == 2
    assert "--wait follows a restart" in waited.stderr

    restart = run(store_only(sandbox), env=key(sandbox, LG_ROTATE_RESTART="daemonset/agent"))
    assert restart.returncode == 2
    assert "--restart needs the Kubernetes target" in restart.stderr

    timeout = run(store_only(sandbox), env=key(sandbox, LG_ROTATE_TIMEOUT="soon"))
    assert timeout.returncode == 2
    assert "timeout from env LG_ROTATE_TIMEOUT is invalid" in timeout.stderr
    assert "90s, 10m, 1h, 1m30s" in timeout.stderr  # what is accepted
    assert len(sandbox.minted()) == 1  # only the first run minted


def test_every_setting_is_in_its_command_s_help_with_its_variable():
    for command, spec in config.COMMANDS.items():
        text = " ".join(run([command, "--help"]).stdout.split())
        for setting in spec.settings:
            assert f"--{setting.name}" in text, (command, setting.name)
            assert setting.env_name in text, (command, setting.env_name)


def test_the_config_file_accepts_every_setting_s_key(tmp_path):
    """Unknown keys are errors, so a run that gets past the file accepted them all."""
    from rotator import assemble

    keys = [*config.all_settings(), *(o.name for o in assemble.builtin_provider_options())]
    cfg = tmp_path / "every-key.yaml"
    cfg.write_text("".join(f"{name}: null\n" for name in keys), encoding="utf-8")
    result = run(["providers", "--config", str(cfg), "-o", "json"])
    assert result.returncode == 0, result.stderr


def test_config_file_from_lg_rotate_config_and_provenance_in_status(tmp_path):
    cfg = tmp_path / "lg.yaml"
    cfg.write_text("min-ttl: 1m30s\nkeep-versions: 3\n", encoding="utf-8")
    result = run(
        ["status", "--tenant", TENANT, "--target", "none", "-o", "json"],
        env={"LG_ROTATE_CONFIG": str(cfg), "LG_ROTATE_PROVIDER": "memory"},
    )
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert settings["tenant"] == {"value": TENANT, "source": "flag --tenant"}
    assert settings["provider"] == {"value": "memory", "source": "env LG_ROTATE_PROVIDER"}
    assert settings["min-ttl"] == {"value": 90.0, "source": f"config file {cfg}"}
    assert settings["keep-versions"] == {"value": 3, "source": f"config file {cfg}"}
    assert settings["secret"] == {"value": "linuxguard-enroll", "source": "default"}
    assert settings["output"]["source"] == "flag --output"

    text = run(
        ["status", "--tenant", TENANT, "--target", "none"],
        env={"LG_ROTATE_CONFIG": str(cfg), "LG_ROTATE_PROVIDER": "memory"},
    )
    assert re.search(r"min-ttl\s+1m30s\s+\(config file ", text.stdout), text.stdout
    assert re.search(r"provider\s+memory\s+\(env LG_ROTATE_PROVIDER\)", text.stdout)


def test_status_never_shows_values_that_lead_to_credentials(vault_env):
    result = run(
        ["status", "--provider", "vault", "--tenant", TENANT, "--target", "none", "-o", "json",
         "--vault-role-id", "role-id-not-to-be-shown"],
        env=vault_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert settings["vault-role-id"] == {"value": "(hidden)", "source": "flag --vault-role-id"}
    assert settings["vault-addr"]["source"] == "env VAULT_ADDR"
    assert settings["vault-mount"]["source"] == "env LG_ROTATE_VAULT_MOUNT"
    assert "role-id-not-to-be-shown" not in result.stdout + result.stderr
    assert vault_env["VAULT_TOKEN"] not in result.stdout + result.stderr


# --- unknown and missing ----------------------------------------------------------------------


def test_a_misspelt_variable_is_a_warning_with_a_suggestion(sandbox):
    result = run(
        store_only(sandbox), env=key(sandbox, LG_ROTATE_TENNANT="other", LG_ROTATE_OUTPUT="json")
    )
    assert result.returncode == 0, result.stderr
    assert (
        "LG_ROTATE_TENNANT is not a setting of lg-rotate and is ignored "
        "(did you mean LG_ROTATE_TENANT?)"
    ) in warnings_in(result.stderr)
    assert json.loads(result.stdout)["tenant"] == TENANT


def test_a_misspelt_config_key_is_an_error_with_a_suggestion(sandbox, tmp_path):
    cfg = tmp_path / "lg.yaml"
    cfg.write_text("tennant: acme\n", encoding="utf-8")
    result = run([*store_only(sandbox), "--config", str(cfg)], env=key(sandbox))
    assert result.returncode == 2
    assert "unknown setting(s) in the config file" in result.stderr
    assert "tennant (did you mean tenant?)" in result.stderr
    assert sandbox.minted() == []


def test_every_missing_setting_is_named_in_one_error():
    result = run(["rotate"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    for flag in ("--provider", "--tenant", "--linuxguard-url"):
        assert flag in line
    assert "LINUXGUARD_API_KEY" in line
    assert "LG_ROTATE_PROVIDER, LG_ROTATE_TENANT and LG_ROTATE_LINUXGUARD_URL" in line

    webhook = run(["webhook", "--provider", "memory"])
    assert webhook.returncode == 2
    (line,) = webhook.stderr.strip().splitlines()
    for flag in ("--tenant", "--linuxguard-url", "--tls-cert-file", "--tls-private-key-file"):
        assert flag in line, line


def test_a_provider_s_required_options_are_reported_with_the_rest():
    result = run(["rotate", "--provider", "vault", "--target", "none"])
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "--tenant" in line
    assert "--vault-addr (the vault provider needs it)" in line
    assert "LG_ROTATE_VAULT_ADDR" in line


# --- durations ----------------------------------------------------------------------------------


def test_durations_are_accepted_and_printed_the_same_way(sandbox):
    result = run(
        store_only(sandbox, "--min-ttl", "1m30s", "--mint-budget", "2m", "--lock-wait", "0s"),
        env=key(sandbox, LG_ROTATE_HTTP_TIMEOUT="1500ms"),
    )
    assert result.returncode == 0, result.stderr
    helps = {command: " ".join(run([command, "--help"]).stdout.split()) for command in (
        "rotate", "roll", "watch", "webhook")}  # fmt: skip
    assert "(default: 1m) [env LG_ROTATE_MIN_TTL]" in helps["rotate"]
    assert "rollout after this long (default: 10m)" in helps["rotate"]
    assert "Ready (default: 5m)" in helps["roll"]
    assert "(default: 15s) [env LG_ROTATE_LEADER_LEASE_DURATION]" in helps["watch"]
    assert "(default: 8s) [env LG_ROTATE_ADMISSION_BUDGET]" in helps["webhook"]

    bad = run(store_only(sandbox, "--lock-wait", "soon"), env=key(sandbox))
    assert bad.returncode == 2
    assert "lock-wait from flag --lock-wait is invalid" in bad.stderr
    assert "90s, 10m, 1h, 1m30s" in bad.stderr


# --- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "usage", "hint"),
    [
        (["rotat"], "usage: lg-rotate [-h]", "did you mean rotate?"),
        (
            ["rotate", "--tenent", "x"],
            "usage: lg-rotate rotate [options]",
            "did you mean --tenant?",
        ),
        (["--tenent", "x"], "usage: lg-rotate rotate [options]", "did you mean --tenant?"),
        (["status", "-o", "jsn"], "usage: lg-rotate status [options]", "did you mean json?"),
        (
            ["rotate", "--selector", "app=x"],
            "usage: lg-rotate rotate",
            "--selector is a flag of watch, webhook",
        ),
        (["roll"], "usage: lg-rotate roll [options] daemonset/NAME", "required: daemonset/NAME"),
        (["completion", "bsh"], "usage: lg-rotate completion", "did you mean bash?"),
        (["audit", "--clustr"], "usage: lg-rotate audit", "did you mean --cluster?"),
    ],
)
def test_usage_errors_show_the_subcommand_usage_and_suggest(args, usage, hint):
    result = run(args)
    assert result.returncode == 2
    assert result.stderr.startswith(usage), result.stderr
    assert hint in result.stderr
    assert len(result.stderr.splitlines()) < 12  # the usage, not 60 flags


def test_old_spellings_still_work_and_say_they_are_deprecated(sandbox):
    status = run(["status", "--provider", "memory", "--tenant", TENANT, "--target", "none",
                  "-o", "table", "--log-format", "json"])  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "store current" in status.stdout
    assert any("'table'" in w and "deprecated" in w for w in warnings_in(status.stderr))

    emit = run(
        ["emit", "--provider", "memory", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
         "-f", "env"],
        env=key(sandbox),
    )  # fmt: skip
    assert emit.returncode == 0, emit.stderr
    assert emit.stdout.startswith("LINUXGUARD_ENROLL_TOKEN=")
    assert "-f is deprecated: use -o/--output" in emit.stderr


# --- --help: examples and exit codes -----------------------------------------------------------


def help_examples(text: str) -> list[str]:
    lines = text.split("\nexamples:\n", 1)[1].splitlines()
    return [line.strip() for line in lines if line.startswith("  ")]


@pytest.mark.parametrize(
    "command",
    ["rotate", "status", "exec", "emit", "watch", "webhook", "roll", "demo", "providers",
     "completion", "audit"],
)  # fmt: skip
def test_every_help_ends_with_real_examples(command):
    from rotator.cli import DELEGATED, _subcommands, build_parser

    result = run([command, "--help"])
    assert result.returncode == 0, result.stderr
    examples = help_examples(result.stdout)
    assert 2 <= len(examples) <= 3, examples
    assert result.stdout.rstrip().endswith(examples[-1])
    parser = build_parser()
    if command in DELEGATED:  # their flags live in parsers of their own: attach them
        module_name, add_arguments, _ = DELEGATED[command]
        getattr(importlib.import_module(module_name), add_arguments)(_subcommands(parser)[command])
    for example in examples:
        words = shlex.split(re.search(r"lg-rotate\s+([^|)>]*)", example).group(1))
        args = parser.parse_args(words)  # SystemExit(2) here fails the test
        assert args.command == command


def test_the_top_level_help_lists_every_exit_code():
    result = run(["--help"])
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for code, meaning in EXIT_CODE_MEANINGS.items():
        assert f"{int(code)} {' '.join(meaning.split())}" in text


# --- the namespace, like kubectl ---------------------------------------------------------------


@pytest.fixture
def kube_env(k8s, k8s_namespace, sandbox, vault_env, tmp_path):
    """A kubeconfig whose (current) context's namespace is the test namespace."""
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig", namespace=k8s_namespace)
    return {**vault_env, "LINUXGUARD_API_KEY": sandbox.api_key, "KUBECONFIG": str(kubeconfig)}


def vault_rotate(sandbox, *extra):
    return ["rotate", "--provider", "vault", "--tenant", TENANT, "--linuxguard-url", sandbox.url,
            *extra]  # fmt: skip


def test_without_namespace_the_kubeconfig_context_s_is_used_and_reported(
    k8s, k8s_namespace, sandbox, kube_env, vault_provider
):
    first = run([*vault_rotate(sandbox), "-o", "json", "--log-format", "json"], env=kube_env)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["target"] == f"k8s:{k8s_namespace}/linuxguard-enroll"
    assert report["namespace"]["value"] == k8s_namespace
    assert report["namespace"]["source"] == f"kubeconfig context test ({kube_env['KUBECONFIG']})"
    assert k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll") is not None
    assert k8s.get("v1/secrets", "default", "linuxguard-enroll") is None  # no second Secret
    created = [w for w in warnings_in(first.stderr) if w.startswith("created the Secret")]
    assert len(created) == 1
    assert f"namespace {k8s_namespace} (kubeconfig context test" in created[0]

    second = run(vault_rotate(sandbox, "--log-format", "json"), env=kube_env)
    assert second.returncode == 0, second.stderr
    assert f"  namespace    {k8s_namespace} (from kubeconfig context test" in second.stdout
    assert not [w for w in warnings_in(second.stderr) if "created the Secret" in w]  # patched
    state = SecretTarget(api_client=k8s.api_client(), namespace=k8s_namespace).read_state()
    current = vault_provider.read(tenant=TENANT, stage=Stage.CURRENT)
    assert state.fingerprint == current.fingerprint

    status = run(["status", "--provider", "vault", "--tenant", TENANT, "-o", "json", "--check"],
                 env=kube_env)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    data = json.loads(status.stdout)
    assert data["inSync"] is True
    assert data["settings"]["namespace"]["value"] == k8s_namespace
    assert data["settings"]["namespace"]["source"].startswith("kubeconfig context test")
    assert data["settings"]["kubeconfig"]["source"] == "env KUBECONFIG"


def test_the_flag_and_the_variable_beat_the_context_and_a_selected_context_counts(
    k8s, k8s_namespace, sandbox, kube_env, tmp_path
):
    other = f"{k8s_namespace}-b"
    k8s.create_namespace(other)
    try:
        by_flag = run(vault_rotate(sandbox, "-n", other, "--dry-run", "-o", "json"), env=kube_env)
        assert by_flag.returncode == 0, by_flag.stderr
        report = json.loads(by_flag.stdout)
        assert report["namespace"] == {"value": other, "source": "flag --namespace"}
        assert report["targetExisted"] is False
        assert "would create the Secret" in by_flag.stderr

        by_env = run(
            vault_rotate(sandbox, "--dry-run", "-o", "json"),
            env={**kube_env, "LG_ROTATE_NAMESPACE": other},
        )
        assert json.loads(by_env.stdout)["namespace"]["source"] == "env LG_ROTATE_NAMESPACE"

        # Two contexts: the current one in the test namespace, "other-ctx" in the other.
        kubeconfig = k8s.kubeconfig(k8s_namespace)
        second = {"name": "other-ctx", "context": {**kubeconfig["contexts"][0]["context"]}}
        second["context"]["namespace"] = other
        kubeconfig["contexts"].append(second)
        path = tmp_path / "two-contexts"
        path.write_text(yaml.safe_dump(kubeconfig), encoding="utf-8")
        selected = run(
            vault_rotate(sandbox, "--context", "other-ctx", "-o", "json"),
            env={**kube_env, "KUBECONFIG": str(path)},
        )
        assert selected.returncode == 0, selected.stderr
        report = json.loads(selected.stdout)
        assert report["target"] == f"k8s:{other}/linuxguard-enroll"
        assert report["namespace"]["source"] == f"kubeconfig context other-ctx ({path})"
        assert k8s.get("v1/secrets", other, "linuxguard-enroll") is not None
        assert k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll") is None
    finally:
        k8s.delete("v1/namespaces", None, other)


def test_without_a_context_namespace_the_pod_s_then_default(monkeypatch, tmp_path):
    """The last two steps of the order, in-process (the pod's file is at a fixed path)."""
    from rotator import assemble
    from rotator.kube.api import Connection

    settings = config.resolve_command(
        "status", argparse.Namespace(), env={"LG_ROTATE_PROVIDER": "memory"}
    )
    bare = Connection(
        api_client=None, in_cluster=True, kubeconfig=None, context=None, namespace=None
    )
    monkeypatch.setattr(config, "IN_CLUSTER_NAMESPACE_FILE", str(tmp_path / "missing"))
    assert assemble.resolve_namespace(settings, bare) == ("default", config.DEFAULT)
    pod_file = tmp_path / "namespace"
    pod_file.write_text("agents\n", encoding="utf-8")
    monkeypatch.setattr(config, "IN_CLUSTER_NAMESPACE_FILE", str(pod_file))
    namespace, source = assemble.resolve_namespace(settings, bare)
    assert (namespace, str(source)) == ("agents", f"in-cluster {pod_file}")
    with_context = Connection(
        api_client=None, in_cluster=False, kubeconfig="/k", context="c", namespace="ctx-ns"
    )
    namespace, source = assemble.resolve_namespace(settings, with_context)
    assert (namespace, str(source)) == ("ctx-ns", "kubeconfig context c (/k)")
