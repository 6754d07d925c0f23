"""`lg-rotate audit`: every rule caught on the bad corpus, nothing on the good one or on the
project's own manifests, the three output formats, exit codes, redaction, and --cluster
against the Kubernetes emulator."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from rotator import audit
from rotator.audit import (
    RULES,
    add_audit_arguments,
    audit_documents,
    load_paths,
    load_text,
    max_interval_seconds,
    parse_go_duration,
    run_audit_command,
)
from rotator.errors import ConfigError, ExitCode, KubernetesError
from rotator.tokens import TOKEN_SHAPED, normalize

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).parent / "audit_corpus"
NOW = datetime(2026, 1, 1, tzinfo=UTC)  # the corpus' Secret annotations are relative to it

EXPECTED = {
    "helm-multidoc.yaml": {"LG001", "LG002", "LG003"},
    "list-kind.yaml": {"LG003", "LG004"},
    "lg001-literal-env.yaml": {"LG001"},
    "lg001-docker-run-script.yaml": {"LG001"},
    "lg002-enroll-token-args.yaml": {"LG002"},
    "lg003-configmap.yaml": {"LG003"},
    "lg004-configmap-refs.yaml": {"LG004"},
    "lg005-wrappers.yaml": {"LG005"},
    "lg006-env-file-compose.yaml": {"LG006"},
    "lg006-env-file-configmap.yaml": {"LG006"},
    "lg007-hourly-rotation.yaml": {"LG007"},
    "lg007-externalsecret-slow.yaml": {"LG007"},
    "lg008-expired-secret.yaml": {"LG008"},
    "lg009-concurrency.yaml": {"LG009"},
    "lg010-bootstrap-secret.yaml": {"LG010", "LG011"},
    "lg010-externalsecret-once.yaml": {"LG010"},
    "lg011-secret-literal.yaml": {"LG011"},
    "lg012-missing-tenant.yaml": {"LG012"},
    "lg013-workload-identity.yaml": {"LG013"},
    "lg014-webhook-failure-policy.yaml": {"LG014"},
    "lg015-webhook-side-effects.yaml": {"LG015"},
    "lg016-webhook-unscoped.yaml": {"LG016"},
    "lg017-webhook-timeout.yaml": {"LG017"},
}
GOOD = sorted(path.name for path in (CORPUS / "good").iterdir())


def findings_for(*paths: Path | str, **kwargs: Any) -> list[audit.Finding]:
    return audit_documents(load_paths([str(p) for p in paths]), now=NOW, **kwargs)


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lg-rotate audit")
    add_audit_arguments(parser)
    return parser.parse_args(list(argv))


def run(*argv: str, stdin: str | None = None, **kwargs: Any) -> tuple[int, str]:
    out = io.StringIO()
    code = run_audit_command(
        parse_args(*argv),
        stdout=out,
        stdin=io.StringIO(stdin) if stdin is not None else None,
        now=NOW,
        **kwargs,
    )
    return code, out.getvalue()


def corpus_tokens() -> set[str]:
    """Every token value in the corpus, as written, canonical and base64-decoded."""
    found: set[str] = set()
    for path in CORPUS.rglob("*.yaml"):
        text = path.read_text()
        for match in TOKEN_SHAPED.findall(text):
            found.add(match)
            found.add(normalize(match).reveal())
        for word in re.findall(r"[A-Za-z0-9+/]{32,}={0,2}", text):
            try:
                decoded = base64.b64decode(word, validate=True).decode()
            except ValueError:
                continue
            if TOKEN_SHAPED.fullmatch(decoded):
                found.update({decoded, normalize(decoded).reveal()})
    return found


TOKENS = corpus_tokens()


def assert_no_token(text: str) -> None:
    leaked = [token for token in TOKENS if token in text]
    assert not leaked, f"token values in the output: {len(leaked)}"


# --- the corpus ---------------------------------------------------------------------------------


def test_the_corpus_is_what_the_tests_expect() -> None:
    assert {path.name for path in (CORPUS / "bad").iterdir()} == set(EXPECTED)
    assert len(GOOD) >= 5
    assert len(TOKENS) >= 5  # the leak checks below have something to look for


def test_the_bad_corpus_covers_every_rule() -> None:
    assert set().union(*EXPECTED.values()) == set(RULES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_manifest_is_caught(name: str) -> None:
    findings = findings_for(CORPUS / "bad" / name)
    assert {finding.rule.id for finding in findings} == EXPECTED[name]
    for finding in findings:
        assert finding.location.file == str(CORPUS / "bad" / name)
        assert finding.location.line is not None
        assert finding.location.line >= 1
        assert_no_token(finding.message)


@pytest.mark.parametrize("name", GOOD)
def test_good_manifest_has_no_findings(name: str) -> None:
    assert findings_for(CORPUS / "good" / name) == []


def test_a_whole_directory_at_once() -> None:
    findings = findings_for(CORPUS / "bad")
    assert {finding.rule.id for finding in findings} == set(RULES)
    by_file = {Path(f.location.file or "").name for f in findings}
    assert by_file == set(EXPECTED)


# --- locations ----------------------------------------------------------------------------------


def _line(path: Path, number: int | None) -> str:
    assert number is not None
    return path.read_text().splitlines()[number - 1]


def test_locations_point_at_the_offending_line() -> None:
    path = CORPUS / "bad" / "lg001-literal-env.yaml"
    (finding,) = findings_for(path)
    assert _line(path, finding.location.line).strip().startswith("value:")
    assert finding.location.kind == "DaemonSet"
    assert finding.location.name == "linuxguard-agent"
    assert finding.location.namespace == "security"
    assert finding.location.field == "spec.template.spec.containers[0].env[0].value"
    assert str(finding.location) == f"{path}:{finding.location.line} (DaemonSet/linuxguard-agent)"


def test_helm_output_keeps_the_template_name() -> None:
    path = CORPUS / "bad" / "helm-multidoc.yaml"
    findings = {f.rule.id: f for f in findings_for(path)}
    assert findings["LG003"].location.source == "linuxguard/templates/configmap.yaml"
    assert findings["LG001"].location.source == "linuxguard/templates/daemonset.yaml"
    assert "--enroll-token" in _line(path, findings["LG002"].location.line)
    assert "enroll-token:" in _line(path, findings["LG003"].location.line)


def test_list_items_have_their_own_lines() -> None:
    path = CORPUS / "bad" / "list-kind.yaml"
    findings = {f.rule.id: f for f in findings_for(path)}
    assert '"LINUXGUARD_ENROLL_TOKEN"' in _line(path, findings["LG003"].location.line)
    assert "envFrom" in _line(path, findings["LG004"].location.line)
    assert findings["LG004"].location.kind == "Pod"


def test_compose_findings_name_the_service() -> None:
    path = CORPUS / "bad" / "lg006-env-file-compose.yaml"
    (finding,) = findings_for(path)
    assert finding.location.kind == "service"
    assert finding.location.name == "linuxguard"
    assert "linuxguard.env" in _line(path, finding.location.line)


# --- the project's own manifests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """cronjob/ rendered by kubectl kustomize (.ci/manifests.py, as CI does)."""
    spec = importlib.util.spec_from_file_location("ci_manifests", ROOT / ".ci" / "manifests.py")
    assert spec is not None
    assert spec.loader is not None
    manifests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(manifests)
    return {k: manifests.render(k) for k in manifests.KUSTOMIZATIONS}


def test_the_projects_rendered_manifests_have_no_findings(rendered: dict[str, str]) -> None:
    for kustomization, text in rendered.items():
        assert audit_documents(load_text(text, file=kustomization), now=NOW) == [], kustomization
    for overlay in ("cronjob/overlays/vault", "cronjob/overlays/aws", "cronjob/overlays/gcp"):
        together = rendered[overlay] + "\n---\n" + rendered["cronjob/agent"]
        assert audit_documents(load_text(together, file="together"), now=NOW) == []


def test_the_project_directory_as_is_has_no_findings() -> None:
    """Raw cronjob/ (kustomizations and fragments, not rendered) is no false alarm either."""
    code, output = run(str(ROOT / "cronjob"))
    assert code == 0, output
    assert output.startswith("no findings in ")


def test_the_agent_without_rotation_is_flagged_once_its_secret_is_baked(
    rendered: dict[str, str],
) -> None:
    """The example agent is fine; give its Secret a fixed token and drop lg-rotate: LG010."""
    baked = (
        "apiVersion: v1\nkind: Secret\nmetadata: {name: linuxguard-enroll, namespace: linuxguard}"
        "\nstringData: {token: placeholder-set-at-bootstrap, tenant-id: acme}\n"
    )
    docs = load_text(rendered["cronjob/agent"] + "\n---\n" + baked, file="x")
    assert {f.rule.id for f in audit_documents(docs, now=NOW)} == {"LG010"}
    with_rotation = load_text(
        rendered["cronjob/agent"] + "\n---\n" + rendered["cronjob/overlays/aws"], file="x"
    )
    assert audit_documents(with_rotation, now=NOW) == []


# --- output formats and exit codes --------------------------------------------------------------


def test_table_output_and_exit_code() -> None:
    code, output = run(str(CORPUS / "bad" / "lg009-concurrency.yaml"))
    assert code == ExitCode.CHECK_FAILED
    lines = output.splitlines()
    assert lines[0].split() == ["SEVERITY", "RULE", "LOCATION", "FINDING"]
    assert lines[1].split()[:2] == ["medium", "LG009"]
    assert lines[2].strip() == f"fix: {RULES['LG009'].fix}"
    assert lines[-1] == "1 finding(s) in 1 object(s): 1 medium"


@pytest.mark.parametrize(
    ("fail_on", "file", "code"),
    [
        ("info", "lg009-concurrency.yaml", ExitCode.CHECK_FAILED),
        ("medium", "lg009-concurrency.yaml", ExitCode.CHECK_FAILED),
        ("high", "lg009-concurrency.yaml", ExitCode.OK),
        ("critical", "lg007-hourly-rotation.yaml", ExitCode.OK),
        ("critical", "lg001-literal-env.yaml", ExitCode.CHECK_FAILED),
        ("never", "lg001-literal-env.yaml", ExitCode.OK),
    ],
)
def test_fail_on(fail_on: str, file: str, code: ExitCode) -> None:
    assert run(str(CORPUS / "bad" / file), "--fail-on", fail_on)[0] == code


def test_clean_input_exits_zero() -> None:
    code, output = run(str(CORPUS / "good"))
    assert code == ExitCode.OK
    assert output == f"no findings in {len(load_paths([str(CORPUS / 'good')]))} object(s)\n"


def test_ignore_a_rule() -> None:
    code, output = run(str(CORPUS / "bad" / "lg010-bootstrap-secret.yaml"), "--ignore", "LG011",
                       "-o", "json")  # fmt: skip
    assert code == ExitCode.CHECK_FAILED
    assert [f["rule"] for f in json.loads(output)["findings"]] == ["LG010"]


def test_json_output() -> None:
    code, output = run(str(CORPUS / "bad"), "-o", "json", "--fail-on", "critical")
    assert code == ExitCode.CHECK_FAILED
    body = json.loads(output)
    assert body["tool"] == "lg-rotate audit"
    summary = body["summary"]
    assert summary["findings"] == len(body["findings"])
    assert summary["failed"] is True
    assert summary["fail_on"] == "critical"
    assert sum(summary["by_severity"].values()) == summary["findings"]
    for finding in body["findings"]:
        rule = RULES[finding["rule"]]
        assert finding["severity"] == rule.severity.label
        assert finding["fix"] == rule.fix
        assert finding["location"]["file"].startswith(str(CORPUS))
        assert finding["location"]["line"] >= 1
    severities = [RULES[f["rule"]].severity for f in body["findings"]]
    assert severities == sorted(severities, reverse=True)  # the worst first
    assert_no_token(output)


def test_sarif_output_is_structurally_valid() -> None:
    code, output = run(str(CORPUS / "bad"), "-o", "sarif")
    assert code == ExitCode.CHECK_FAILED
    log = json.loads(output)
    assert log["version"] == "2.1.0"
    assert log["$schema"].endswith("sarif-2.1.0.json")
    (sarif_run,) = log["runs"]
    driver = sarif_run["tool"]["driver"]
    assert driver["name"] == "lg-rotate audit"
    rule_ids = [rule["id"] for rule in driver["rules"]]
    assert rule_ids == list(RULES)
    for rule in driver["rules"]:
        assert rule["shortDescription"]["text"]
        assert rule["defaultConfiguration"]["level"] in ("error", "warning", "note")
        assert float(rule["properties"]["security-severity"]) >= 0
    results = sarif_run["results"]
    assert {result["ruleId"] for result in results} == set(RULES)
    for result in results:
        assert rule_ids[result["ruleIndex"]] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        assert result["message"]["text"]
        (location,) = result["locations"]
        physical = location["physicalLocation"]
        uri = physical["artifactLocation"]["uri"]
        assert (ROOT / uri).is_file() or Path(uri).is_file()
        assert physical["region"]["startLine"] >= 1
        assert location["logicalLocations"][0]["fullyQualifiedName"]
    assert_no_token(output)


def test_stdin() -> None:
    text = (CORPUS / "bad" / "helm-multidoc.yaml").read_text()
    code, output = run("-", "-o", "sarif", stdin=text)
    assert code == ExitCode.CHECK_FAILED
    results = json.loads(output)["runs"][0]["results"]
    assert {r["ruleId"] for r in results} == {"LG001", "LG002", "LG003"}
    assert {r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] for r in results} == {
        "stdin"
    }


@pytest.mark.parametrize("output_format", ["table", "json", "sarif"])
def test_no_token_value_in_any_output(output_format: str) -> None:
    code, output = run(str(CORPUS), "-o", output_format)
    assert code == ExitCode.CHECK_FAILED
    assert_no_token(output)
    assert "sha256" in output  # literals are described by their fingerprint instead


# --- unreadable input -------------------------------------------------------------------------


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as caught:
        run(str(tmp_path / "nope.yaml"))
    assert caught.value.exit_code == ExitCode.CONFIG


def test_nothing_to_audit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nothing to audit"):
        run()


def test_broken_yaml_is_a_config_error_without_the_document(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: v1\nkind: ConfigMap\ndata:\n  token: ABCD-EFGH-IJKL-MNOP-QRST-UVWX\n"
        "  bad: [unclosed\n"
    )
    with pytest.raises(ConfigError) as caught:
        run(str(broken))
    assert caught.value.exit_code == ExitCode.CONFIG
    assert f"{broken}:" in caught.value.message
    assert "ABCD" not in caught.value.one_line()
    assert caught.value.__cause__ is None


def test_undecodable_file_is_a_config_error(tmp_path: Path) -> None:
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="cannot read"):
        run(str(binary))


# --- schedules and durations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "seconds"),
    [
        ("*/5 * * * *", 300),
        ("*/3 * * * *", 180),
        ("*/7 * * * *", 420),  # :56 -> :00 is 4 minutes, :00 -> :07 is 7
        ("0 * * * *", 3600),
        ("@hourly", 3600),
        ("5,35 * * * *", 1800),
        ("*/5 9-17 * * *", (24 - 17 + 9) * 3600 - 55 * 60),  # 17:55 -> 09:00
        ("0 9 * * 1-5", 3 * 86400),  # Friday 09:00 -> Monday 09:00
        ("0 0 * * MON", 7 * 86400),
        ("@every 90s", 90),
        ("TZ=Europe/Paris */10 * * * *", 600),
        ("0 0 1,15 * *", 17 * 86400),  # the 15th -> the 1st of a 31-day month
    ],
)
def test_max_interval(schedule: str, seconds: int) -> None:
    assert max_interval_seconds(schedule) == seconds


def test_a_schedule_that_never_runs() -> None:
    assert max_interval_seconds("0 0 30 2 *") is None


@pytest.mark.parametrize("schedule", ["61 * * * *", "* * *", "*/0 * * * *", "a b c d e"])
def test_bad_schedules(schedule: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (the message varies by field)
        max_interval_seconds(schedule)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h", 3600), ("15m", 900), ("1h30m", 5400), ("90s", 90), ("0", 0), ("2x", None)],
)
def test_go_durations(text: str, seconds: int | None) -> None:
    assert parse_go_duration(text) == seconds


def _rotation(schedule: str, extra: str = "") -> str:
    return f"""
apiVersion: batch/v1
kind: CronJob
metadata: {{name: lg-rotate, namespace: ns}}
spec:
  schedule: "{schedule}"
  concurrencyPolicy: Forbid
  jobTemplate:
    spec:
      template:
        spec:
          containers:
            - name: lg-rotate
              image: ghcr.io/example/lg-rotate:1.0
              {extra}
"""


@pytest.mark.parametrize(
    ("schedule", "extra", "ttl", "caught"),
    [
        ("*/5 * * * *", "args: [rotate]", 600, False),
        ("*/10 * * * *", "args: [rotate]", 600, True),  # as long as the TTL: expired at times
        ("*/5 * * * *", "args: [rotate, --ttl, '300']", 600, True),
        ("*/5 * * * *", "args: [rotate, --ttl=900]", 600, False),
        ("*/5 * * * *", "env: [{name: LG_ROTATE_TTL, value: '300'}]", 600, True),
        ("*/5 * * * *", "args: [rotate]", 300, True),  # --token-ttl 300
        ("@daily", "args: [watch]", 600, False),  # not a scheduled rotation
        ("0 0 30 2 *", "args: [rotate]", 600, True),  # never runs
    ],
)
def test_rotation_interval_against_ttl(schedule: str, extra: str, ttl: int, caught: bool) -> None:
    findings = audit_documents(load_text(_rotation(schedule, extra), file="x"), token_ttl=ttl)
    assert ("LG007" in {f.rule.id for f in findings}) is caught


def test_a_suspended_rotation_is_reported() -> None:
    text = _rotation("*/5 * * * *", "args: [rotate]").replace(
        "concurrencyPolicy: Forbid", "concurrencyPolicy: Forbid\n  suspend: true"
    )
    (finding,) = audit_documents(load_text(text, file="x"))
    assert finding.rule.id == "LG007"
    assert "suspended" in finding.message


def test_secret_expiry_from_rotated_at_and_the_ttl() -> None:
    text = (
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n  annotations:\n"
        "    linuxguard.io/rotated-at: '2025-12-31T23:45:00Z'\n"
    )
    docs = load_text(text, file="x")
    assert [f.rule.id for f in audit_documents(docs, now=NOW, token_ttl=600)] == ["LG008"]
    assert audit_documents(docs, now=NOW, token_ttl=1800) == []


def test_describe_value_never_shows_the_value() -> None:
    for value in ("ABCD-EFGH-IJKL-MNOP-QRST-UVWX", "abcdefghijklmnopqrstuvwx", "short"):
        text = audit.describe_value(value)
        assert value not in text
        assert "sha256" in text
    same_token = {audit.describe_value(v) for v in ("ABCD-EFGH-IJKL-MNOP-QRST-UVWX",
                                                    "ABCDEFGHIJKLMNOPQRSTUVWX")}  # fmt: skip
    assert len({text.rsplit(" ", 1)[1] for text in same_token}) == 1  # one fingerprint


# --- the cluster --------------------------------------------------------------------------------

TOKEN = "MFRGGZDFMZTWQ2LKNNWG23TPOBYXE43U"


def _agent(name: str, *, env: list[dict[str, Any]], kind: str = "DaemonSet") -> dict[str, Any]:
    identity = [
        {"name": "LINUXGUARD_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "LINUXGUARD_POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
    ]
    template = {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "agent", "image": "example/linuxguard-agent:1",
                                 "env": env + identity}]},
    }  # fmt: skip
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": name}}, "template": template}
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def _from_secret(secret: str) -> list[dict[str, Any]]:
    return [
        {"name": "LINUXGUARD_ENROLL_TOKEN",
         "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}},
        {"name": "LINUXGUARD_TENANT_ID",
         "valueFrom": {"secretKeyRef": {"name": secret, "key": "tenant-id"}}},
    ]  # fmt: skip


def _secret(name: str, annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "annotations": annotations},
        "data": {"token": base64.b64encode(TOKEN.encode()).decode(), "tenant-id": "YWNtZQ=="},
    }


def _rotation_cronjob(schedule: str, policy: str | None) -> dict[str, Any]:
    container = {"name": "lg-rotate", "image": "example/lg-rotate:0.1.0", "args": ["rotate"]}
    spec: dict[str, Any] = {
        "schedule": schedule,
        "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                                                       "containers": [container]}}}},
    }  # fmt: skip
    if policy:
        spec["concurrencyPolicy"] = policy
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "lg-rotate"},
            "spec": spec}  # fmt: skip


@pytest.fixture
def create(k8s: Any, k8s_namespace: str) -> Callable[[dict[str, Any]], None]:
    from kubernetes import client

    api_client = k8s.api_client()
    core, apps, batch = (client.CoreV1Api(api_client), client.AppsV1Api(api_client),
                         client.BatchV1Api(api_client))  # fmt: skip
    creators = {
        "Secret": core.create_namespaced_secret,
        "ConfigMap": core.create_namespaced_config_map,
        "Pod": core.create_namespaced_pod,
        "DaemonSet": apps.create_namespaced_daemon_set,
        "Deployment": apps.create_namespaced_deployment,
        "CronJob": batch.create_namespaced_cron_job,
    }

    def create_one(body: dict[str, Any]) -> None:
        creators[body["kind"]](k8s_namespace, body)

    return create_one


def _cluster_audit(k8s: Any, tmp_path: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    code, output = run("--cluster", "--kubeconfig", str(kubeconfig), "-o", "json", *extra)
    assert TOKEN not in output
    return code, json.loads(output)


def test_cluster_audit_finds_the_anti_patterns(
    k8s: Any, k8s_namespace: str, create: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    literal = [{"name": "LINUXGUARD_ENROLL_TOKEN", "value": TOKEN},
               {"name": "LINUXGUARD_TENANT_ID", "value": "acme"}]  # fmt: skip
    create(_agent("literal-agent", env=literal))  # LG001
    create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "agent-settings"},
            "data": {"LINUXGUARD_ENROLL_TOKEN": TOKEN}})  # LG003  # fmt: skip
    create(_rotation_cronjob("0 * * * *", None))  # LG007 + LG009
    create(_secret("linuxguard-enroll", {
        "linuxguard.io/rotated-at": "2025-12-31T22:50:00Z",
        "linuxguard.io/expires-at": "2025-12-31T23:00:00Z",
    }))  # LG008; the hourly CronJob rotates it  # fmt: skip
    create(_secret("static-enroll", {}))  # nothing rotates it:
    create(_agent("static-agent", env=_from_secret("static-enroll"), kind="Deployment"))  # LG010

    code, body = _cluster_audit(k8s, tmp_path, "-n", k8s_namespace)
    assert code == ExitCode.CHECK_FAILED
    found = {(f["rule"], f["location"]["kind"], f["location"]["name"]) for f in body["findings"]}
    assert found == {
        ("LG001", "DaemonSet", "literal-agent"),
        ("LG003", "ConfigMap", "agent-settings"),
        ("LG007", "CronJob", "lg-rotate"),
        ("LG008", "Secret", "linuxguard-enroll"),
        ("LG009", "CronJob", "lg-rotate"),
        ("LG010", "Deployment", "static-agent"),
    }
    for finding in body["findings"]:
        assert finding["location"]["namespace"] == k8s_namespace
        assert "file" not in finding["location"]
    # The expiry check used the Secret's own TTL (10 minutes), not a guess.
    lg007 = next(f for f in body["findings"] if f["rule"] == "LG007")
    assert "the token lives 10m" in lg007["message"]


def test_cluster_audit_sarif_uses_logical_locations(
    k8s: Any, k8s_namespace: str, create: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    create(_rotation_cronjob("*/5 * * * *", "Allow"))
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    code, output = run("--cluster", "--kubeconfig", str(kubeconfig), "-n", k8s_namespace,
                       "-o", "sarif")  # fmt: skip
    assert code == ExitCode.CHECK_FAILED
    (result,) = json.loads(output)["runs"][0]["results"]
    assert result["ruleId"] == "LG009"
    (location,) = result["locations"]
    assert "physicalLocation" not in location
    assert location["logicalLocations"][0]["fullyQualifiedName"] == (
        f"{k8s_namespace}/CronJob/lg-rotate"
    )


def test_a_well_run_namespace_is_clean(
    k8s: Any, k8s_namespace: str, create: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    create(_secret("linuxguard-enroll", {
        "linuxguard.io/token-sha256": "0" * 64,
        "linuxguard.io/rotated-at": "2025-12-31T23:58:00Z",
        "linuxguard.io/expires-at": "2026-01-01T00:08:00Z",
    }))  # fmt: skip
    create(_rotation_cronjob("*/5 * * * *", "Forbid"))
    create(_agent("linuxguard-agent", env=_from_secret("linuxguard-enroll")))
    code, body = _cluster_audit(k8s, tmp_path, "-n", k8s_namespace)
    assert body["findings"] == []
    assert code == ExitCode.OK
    # The DaemonSet, the CronJob and the CA ConfigMaps the controller manager publishes in
    # every namespace (kube-root-ca.crt, ...); Secrets are read as metadata, not counted.
    published = k8s.list_objects("v1/configmaps", k8s_namespace)
    assert body["summary"]["objects"] == 2 + len(published)
    assert body["summary"]["complete"] is True


def test_cluster_audit_across_all_namespaces(
    k8s: Any, k8s_namespace: str, create: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    create(_secret("rotated-elsewhere", {
        "linuxguard.io/rotated-at": "2025-12-30T23:50:00Z",
        "linuxguard.io/expires-at": "2025-12-31T00:00:00Z",
    }))  # fmt: skip
    create(_agent("agent", env=_from_secret("rotated-elsewhere")))
    code, body = _cluster_audit(k8s, tmp_path)
    assert code == ExitCode.CHECK_FAILED
    mine = [f for f in body["findings"] if f["location"].get("namespace") == k8s_namespace]
    assert {(f["rule"], f["location"]["name"]) for f in mine} == {("LG008", "rotated-elsewhere")}


def test_a_renamed_rotator_image_is_still_recognised() -> None:
    text = _rotation("0 * * * *", "args: [rotate]").replace(
        "ghcr.io/example/lg-rotate:1.0", "registry.internal/tools/token-refresher:3"
    )
    assert audit_documents(load_text(text, file="x")) == []  # unknown image: not a rotation
    labelled = text.replace(
        "metadata: {name: lg-rotate, namespace: ns}",
        "metadata: {name: lg-rotate, namespace: ns, labels: {app.kubernetes.io/name: lg-rotate}}",
    )
    assert [f.rule.id for f in audit_documents(load_text(labelled, file="x"))] == ["LG007"]


def test_flags_without_a_command_mean_rotate() -> None:
    text = _rotation("0 * * * *", "args: [--provider, vault, --tenant, acme]")
    assert [f.rule.id for f in audit_documents(load_text(text, file="x"))] == ["LG007"]


# --- the per-pod webhook (LG014-LG017) ---------------------------------------------------------


def test_webhook_failure_policy_findings_say_what_is_missing() -> None:
    path = CORPUS / "bad" / "lg014-webhook-failure-policy.yaml"
    by_name = {f.location.name: f for f in findings_for(path)}
    assert set(by_name) == {"lg-rotate-edge", "lg-rotate-core"}
    assert "no `lg-rotate watch`" in by_name["lg-rotate-edge"].message
    assert "--on-failure deny" in by_name["lg-rotate-core"].message
    assert _line(path, by_name["lg-rotate-edge"].location.line).strip() == "failurePolicy: Ignore"


@pytest.mark.parametrize(
    ("change", "rules"),
    [
        ("", set()),
        # Fail closed, but the webhook admits on failure: watch must run.
        ("args: [webhook, --on-failure, admit]", {"LG014"}),
        ("args: [webhook, --on-failure, admit]\n+watch", set()),
        ("failurePolicy: Ignore", {"LG014"}),  # with the default deny: inconsistent
        ("failurePolicy: Ignore\nargs: [webhook, --on-failure, admit]\n+watch", set()),
        ("sideEffects: None", set()),
        ("sideEffects: Unknown", {"LG015"}),
        ("timeoutSeconds: 9\nargs: [webhook, --admission-budget, 9s]", {"LG017"}),
        ("timeoutSeconds: 10\nargs: [webhook, --admission-budget, 9.5]", set()),
    ],
)
def test_webhook_rules_on_variations(change: str, rules: set[str]) -> None:
    hook: dict[str, Any] = {
        "name": "per-pod-secret.lg-rotate.linuxguard.io",
        "admissionReviewVersions": ["v1"],
        "clientConfig": {"service": {"name": "lg-rotate-webhook", "namespace": "agents"}},
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agents"}},
        "objectSelector": {"matchLabels": {"app": "linuxguard-agent"}},
        "sideEffects": "NoneOnDryRun",
        "timeoutSeconds": 10,
    }
    args = ["webhook"]
    watch = False
    for line in change.splitlines():
        key, _, value = line.partition(": ")
        if line == "+watch":
            watch = True
        elif key == "args":
            args = value.strip("[]").split(", ")
        elif key:
            hook[key] = int(value) if value.isdigit() else value

    def deployment(name: str, argv: list[str]) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": "agents"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [{"name": "lg-rotate", "image": "lg-rotate:1", "args": argv}]
                    }
                }
            },
        }

    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": "lg-rotate-per-pod"},
            "webhooks": [hook],
        },
        deployment("lg-rotate-webhook", args),
    ]
    if watch:
        docs.append(deployment("lg-rotate-watch", ["watch"]))
    text = "\n---\n".join(json.dumps(doc) for doc in docs)
    found = audit_documents(load_text(text, file="x.yaml"), now=NOW)
    assert {f.rule.id for f in found} == rules, [f.message for f in found]


# --- --cluster with refused lists: a gate that read nothing must not pass ------------------


def test_cluster_audit_with_refused_lists(
    k8s: Any, k8s_namespace: str, create: Callable[[dict[str, Any]], None], tmp_path: Path
) -> None:
    """As a ServiceAccount that may list pods only, then as one that may list nothing."""
    from kubernetes import config

    from fixtures.cluster import wait_for

    create(_agent("linuxguard-agent", env=_from_secret("linuxguard-enroll")))
    k8s.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "pod-lister"},
                "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "pod-lister"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                            "name": "pod-lister"},
                "subjects": [{"kind": "ServiceAccount", "name": "pods-only",
                              "namespace": k8s_namespace}],
            },
        ],
        k8s_namespace,
    )  # fmt: skip
    pods_only = k8s.serviceaccount_kubeconfig(k8s_namespace, "pods-only", tmp_path / "pods")
    nothing = k8s.serviceaccount_kubeconfig(k8s_namespace, "nothing", tmp_path / "nothing")
    wait_for(
        lambda: k8s.kubectl("get", "pods", kubeconfig=pods_only, check=False).returncode == 0,
        what="the RoleBinding to take effect",
    )

    def audit_as(kubeconfig: Path, *extra: str) -> tuple[int, str]:
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        try:
            return run("--cluster", "-n", k8s_namespace, *extra, api_client=api_client)
        finally:
            api_client.close()

    code, table = audit_as(pods_only)
    assert code == ExitCode.KUBERNETES
    assert table.startswith("no findings in 0 object(s)\n")
    (incomplete,) = [line for line in table.splitlines() if line.startswith("INCOMPLETE")]
    assert (
        f"list configmaps, deployments.apps, daemonsets.apps, statefulsets.apps, jobs.batch, cronjobs.batch in namespace {k8s_namespace} (HTTP 403)"
        in incomplete
    )
    assert f"get secrets/linuxguard-enroll in namespace {k8s_namespace} (HTTP 403)" in incomplete
    assert "list pods" not in incomplete

    code, sarif = audit_as(pods_only, "-o", "sarif")
    assert code == ExitCode.KUBERNETES
    (invocation,) = json.loads(sarif)["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is False
    notes = [n["message"]["text"] for n in invocation["toolExecutionNotifications"]]
    assert any("list configmaps" in note for note in notes)
    assert all(n["level"] == "error" for n in invocation["toolExecutionNotifications"])

    code, _ = audit_as(pods_only, "--allow-partial")
    assert code == ExitCode.OK
    # Findings win over an incomplete read: 9, not 6.
    create({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "literal"},
        "spec": {"containers": [{"name": "agent", "image": "linuxguard/agent:1", "env": [
            {"name": "LINUXGUARD_ENROLL_TOKEN", "value": TOKEN},
            {"name": "LINUXGUARD_TENANT_ID", "value": "acme"}]}]},
    })  # fmt: skip
    code, table = audit_as(pods_only)
    assert code == ExitCode.CHECK_FAILED
    assert "LG001" in table
    assert "INCOMPLETE" in table
    assert TOKEN not in table

    with pytest.raises(KubernetesError) as refused:
        audit_as(nothing)
    message = refused.value.one_line()
    assert message.startswith(
        "audit --cluster read nothing: the API server refused list pods, configmaps"
    )
    assert "cronjob/audit/" in message
    assert refused.value.exit_code == ExitCode.KUBERNETES


def test_an_expired_token_in_a_per_pod_secret_is_no_finding() -> None:
    """Its pod started with it; a restart replays it, expired or not (docs/PER-POD.md)."""
    secret = (
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: linuxguard-enroll-0123456789ab\n"
        "  namespace: agents\n  labels: {LABELS}\n  annotations:\n"
        "    linuxguard.io/expires-at: '2025-12-31T23:00:00Z'\n"
    )
    per_pod = secret.replace(
        "{LABELS}", "{linuxguard.io/per-pod: 'true', linuxguard.io/shared-secret: x}"
    )
    assert audit_documents(load_text(per_pod, file="x.yaml"), now=NOW) == []
    shared = secret.replace("{LABELS}", "{}")
    assert {f.rule.id for f in audit_documents(load_text(shared, file="x.yaml"), now=NOW)} == {
        "LG008"
    }
