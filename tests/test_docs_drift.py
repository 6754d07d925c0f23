"""What the documentation promises, checked against the code, one topic per section.

A test here fails when the docs and the code drift apart: fix whichever is wrong (the
failure message shows the row the code implies). Topics:

* settings: README "Configuration" (the settings table, the store options, the flags that
  are not settings) against ``rotator.config`` and the built-in providers' options; every
  ``LG_ROTATE_*`` name in the docs, the manifests and the code is a real variable; the flags
  the docs and the shipped manifests pass to a command are that command's flags;
* exit codes: README "Exit codes" against ``rotator.errors.ExitCode``;
* the Vault policy: docs/DEPLOYMENT.md's ``vault policy write`` block, loaded into a real
  OpenBao, is enough for a rotation with pruning and for the per-pod records (no warning);
* RBAC: every Role the docs describe (the tables of DEPLOYMENT.md, CONTROLLER.md, PER-POD.md,
  WEBHOOK.md's sentence, AUDIT.md's rules) is, rule for rule, the Role the manifests ship;
* what an overlay ships: the kinds README "Running in Kubernetes" names are what
  ``kubectl kustomize`` renders (and the example agent is not among them);
* install commands: every ``pip install`` in README and docs names lg-rotate (a clone's ``.``
  or its distribution) with real extras, or a package the project depends on.

(More topics belong here too, each in a section of its own.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import re
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

import ciscripts
import docblocks
from providers import registry
from rotator import config
from rotator.errors import EXIT_CODE_MEANINGS, ExitCode

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


# --- markdown helpers --------------------------------------------------------------------------


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its level."""
    level = heading.split(" ", 1)[0]
    lines = text.splitlines()
    start = lines.index(heading) + 1
    fenced, inside = set(), False  # a shell comment in a code block is no heading
    for i, line in enumerate(lines):
        if line.startswith("```"):
            inside = not inside
        elif inside:
            fenced.add(i)
    end = next(
        (
            i
            for i in range(start, len(lines))
            if i not in fenced
            and lines[i].startswith("#")
            and lines[i].split(" ", 1)[0] in {level, level[:-1], "#"}
        ),
        len(lines),
    )
    return "\n".join(lines[start:end])


def table(text: str) -> list[list[str]]:
    """The first markdown table in ``text``: its body rows, cells stripped of backticks."""
    rows = []
    in_table = False
    for line in text.splitlines():
        if line.startswith("|"):
            in_table = True
            cells = [clean(cell) for cell in line.strip().strip("|").split("|")]
            if not all(set(cell) <= {"-", ":", " "} for cell in cells):
                rows.append(cells)
        elif in_table:
            break
    return rows[1:]  # without the header


def clean(cell: str) -> str:
    return " ".join(cell.replace("`", "").split())


def readme() -> str:
    return README.read_text(encoding="utf-8")


# --- settings ----------------------------------------------------------------------------------


def expected_default(declarations: list[tuple[str, config.Setting]]) -> str:
    """The README's default cell for a setting: one value, "required", or per command."""
    shown: dict[str, list[str]] = {}
    for command, setting in declarations:
        required = setting.key in config.COMMANDS[command].required
        shown.setdefault("required" if required else setting.show(setting.default), []).append(
            command
        )
    if len(shown) == 1:
        return next(iter(shown))
    return "; ".join(f"{value} ({', '.join(commands)})" for value, commands in shown.items())


def expected_settings_rows() -> dict[str, list[str]]:
    rows = {}
    for name, declarations in config.all_settings().items():
        setting = declarations[0][1]
        rows[f"--{name}"] = [
            ", ".join(setting.flags),
            ", ".join(setting.env_names),
            f"{name}:",
            expected_default(declarations),
            ", ".join(command for command, _ in declarations),
        ]
    return rows


def as_markdown(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " | (what) |"


def test_the_readme_settings_table_is_the_declared_settings():
    documented = {
        row[0].split(", ")[-1]: row[:5] for row in table(section(readme(), "### Settings"))
    }
    expected = expected_settings_rows()
    missing = [as_markdown(cells) for flag, cells in expected.items() if flag not in documented]
    assert not missing, "settings missing from README's table:\n" + "\n".join(missing)
    assert set(documented) <= set(expected), (
        f"README documents settings the code does not have: {set(documented) - set(expected)}"
    )
    for flag, cells in expected.items():
        row = documented[flag]
        assert row[:4] == cells[:4], f"README row for {flag} should read: {as_markdown(cells)}"
        assert set(row[4].split(", ")) == set(cells[4].split(", ")), (
            f"README row for {flag}: commands should be {cells[4]}"
        )


def builtin_options() -> Iterator[tuple[str, object]]:
    for name in ("vault", "aws", "gcp"):
        for option in registry.load(name).options:
            yield name, option


def test_the_readme_store_options_are_the_providers_options():
    documented = {row[0]: row[:5] for row in table(section(readme(), "### Store options"))}
    expected = {}
    for provider, option in builtin_options():
        expected[f"--{option.name}"] = [
            f"--{option.name}",
            ", ".join(option.env_names),
            f"{option.name}:",
            "required" if option.required else (option.default or "-"),
            provider,
        ]
    assert documented.keys() == expected.keys()
    for flag, cells in expected.items():
        assert documented[flag] == cells, f"README row for {flag} should read: {as_markdown(cells)}"


def test_the_flags_that_are_not_settings_are_listed_with_their_reasons():
    documented = {
        row[0]: row[1] for row in table(section(readme(), "### Not settings (flags only)"))
    }
    assert set(documented) == set(config.FLAG_ONLY)
    for flag, reason in config.FLAG_ONLY.items():
        assert clean(reason) == documented[flag], flag


def test_every_setting_has_a_variable_and_a_config_key_unless_excepted():
    """The contract in code: no command takes a flag that is neither a declared setting, a
    store option nor one of FLAG_ONLY (help and version aside)."""
    from rotator.cli import _subcommands, build_parser

    excepted = {
        word
        for entry in config.FLAG_ONLY
        for word in re.findall(r"--?[a-z][-a-z]*", entry.replace("/", " "))
    }
    options = {f"--{option.name}" for _, option in builtin_options()}
    for name, parser in _subcommands(build_parser()).items():
        declared = {
            flag
            for setting in (config.COMMANDS[name].settings if name in config.COMMANDS else ())
            for flag in setting.flags
        }
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue  # a former spelling, kept as a hidden alias
            for flag in action.option_strings:
                if flag in ("-h", "--help") or flag.startswith("--no-"):
                    continue
                assert flag in declared | options | excepted, f"{name} {flag}: not a setting"


PLACEHOLDERS = {
    "LG_ROTATE_NAME",  # "LG_ROTATE_NAME" as the pattern of every variable
    "LG_ROTATE_TENNANT",  # README's example of a misspelt variable
}
VARIABLE = re.compile(r"LG_ROTATE_[A-Z0-9_]*[A-Z0-9]")


def documented_files() -> list[Path]:
    manifests = sorted((ROOT / "cronjob").rglob("*.yaml"))
    code = sorted([*(ROOT / "rotator").rglob("*.py"), *(ROOT / "providers").rglob("*.py")])
    return [README, *DOCS, *manifests, ROOT / "Dockerfile", *code]


def test_every_lg_rotate_variable_named_anywhere_is_a_setting():
    known = config.known_variables() | PLACEHOLDERS
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in documented_files()
        if path.exists()
        for name in VARIABLE.findall(path.read_text(encoding="utf-8"))
        if name not in known
    }
    assert not unknown, sorted(unknown)


def command_flags(name: str) -> set[str]:
    from rotator.cli import _subcommands, build_parser

    parser = _subcommands(build_parser())[name]
    return {flag for action in parser._actions for flag in action.option_strings}


def test_the_webhook_settings_docs_name_webhook_flags():
    text = (ROOT / "docs" / "WEBHOOK.md").read_text(encoding="utf-8")
    paragraph = text.split("Settings (flag, `LG_ROTATE_<NAME>`, or the YAML file):", 1)[1]
    paragraph = paragraph.split("\n\n", 1)[0]
    named = set(re.findall(r"`(--[a-z][-a-z]*)`", paragraph))
    assert named
    assert named <= command_flags("webhook"), named - command_flags("webhook")


def lg_rotate_containers() -> Iterator[tuple[Path, list[str]]]:
    for path in sorted((ROOT / "cronjob").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            for container in _containers(doc):
                args = [str(a) for a in container.get("args") or []]
                if args and args[0] in config.COMMANDS:
                    yield path, args


def _containers(doc: object) -> Iterator[dict]:
    if isinstance(doc, dict):
        if isinstance(doc.get("containers"), list):
            yield from (c for c in doc["containers"] if isinstance(c, dict))
        for value in doc.values():
            yield from _containers(value)
    elif isinstance(doc, list):
        for value in doc:
            yield from _containers(value)


def test_the_shipped_manifests_pass_only_flags_their_command_takes():
    seen = 0
    for path, args in lg_rotate_containers():
        seen += 1
        flags = {arg.split("=", 1)[0] for arg in args if arg.startswith("-")}
        unknown = flags - command_flags(args[0])
        assert not unknown, f"{path.relative_to(ROOT)}: {args[0]} has no {sorted(unknown)}"
    assert seen >= 3  # the CronJob, watch, the webhook


# --- exit codes --------------------------------------------------------------------------------


def test_the_readme_exit_codes_are_the_code_s():
    rows = table(section(readme(), "## Exit codes"))
    documented = {int(code): meaning for code, meaning in rows}
    assert set(documented) == {int(code) for code in ExitCode}
    assert set(EXIT_CODE_MEANINGS) == set(ExitCode)  # --help lists every one
    for code, meaning in EXIT_CODE_MEANINGS.items():
        lead = re.split(r"[:(]", meaning)[0].strip().lower()
        assert documented[int(code)].lower().startswith(lead), (int(code), lead)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_doc_uses_a_former_spelling(path):
    text = path.read_text(encoding="utf-8")
    assert "emit -f " not in text, "emit -f/--format is now -o/--output"


# --- the Vault policy --------------------------------------------------------------------------

DEPLOYMENT = ROOT / "docs" / "DEPLOYMENT.md"
WARNING_LEVELS = ("WARNING", "ERROR", "CRITICAL")


def test_the_docs_write_a_vault_policy():
    assert "lg-rotate" in docblocks.vault_policies()  # the parser still finds it


@pytest.fixture
def policy_token(openbao):
    """``make(hcl)``: a token holding only that policy (not even ``default``)."""
    root = openbao.client()
    made = []

    def make(hcl: str) -> str:
        name = f"lg-rotate-docs-{uuid.uuid4().hex[:8]}"
        root.sys.create_or_update_policy(name=name, policy=hcl)
        made.append(name)
        answer = root.auth.token.create(policies=[name], no_default_policy=True, ttl="10m")
        return str(answer["auth"]["client_token"])

    yield make
    for name in made:
        root.sys.delete_policy(name=name)


def rotate_with_pruning(openbao, sandbox, token: str, tenant: str) -> subprocess.CompletedProcess:
    """``lg-rotate rotate`` as the operator would run it, with the docs' default path."""
    import os

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LG_ROTATE_", "LINUXGUARD_", "VAULT_"))
    }
    env |= {"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": token, "LINUXGUARD_API_KEY": sandbox.api_key}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rotator.cli",
            "rotate",
            "--provider",
            "vault",
            "--tenant",
            tenant,
            "--linuxguard-url",
            sandbox.url,
            "--target",
            "none",
            "--keep-versions",
            "1",
            "--log-level",
            "debug",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def destroyed_versions(openbao, tenant: str) -> list[int]:
    meta = openbao.client().secrets.kv.v2.read_secret_metadata(
        path=f"linuxguard/{tenant}", mount_point="secret"
    )
    versions = meta["data"]["versions"]
    return sorted(int(v) for v, info in versions.items() if info.get("destroyed"))


SIGNS_OF_A_REFUSAL = (
    "cannot ask Vault for this token's capabilities",  # the check skipped: capabilities-self
    "Vault refused the token",  # a 403 anywhere (lg-rotate logs in again once)
)


def warnings_in(text: str) -> list[str]:
    """The log lines (JSON on stderr, or plain) that are warnings or worse, or that show
    Vault refusing a call."""
    found = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if isinstance(entry, dict):
            level, message = str(entry.get("level", "")).upper(), str(entry.get("msg", ""))
        else:
            level, message = line.upper(), line
        if any(word in level for word in WARNING_LEVELS) or any(
            sign in message for sign in SIGNS_OF_A_REFUSAL
        ):
            found.append(line)
    return found


@pytest.mark.parametrize("name", sorted(docblocks.vault_policies()))
def test_the_documented_vault_policy_rotates_and_prunes(openbao, sandbox, policy_token, name):
    token = policy_token(docblocks.vault_policies()[name])
    tenant = f"docs-{uuid.uuid4().hex[:8]}"
    for run in range(3):
        result = rotate_with_pruning(openbao, sandbox, token, tenant)
        assert result.returncode == 0, result.stderr
        assert not warnings_in(result.stderr), (run, warnings_in(result.stderr))
        # the check before the mint really asked (sys/capabilities-self), it did not skip
        assert "does not allow" not in result.stderr
    assert destroyed_versions(openbao, tenant), "pruning destroyed nothing"


def _sandbox_minter(sandbox):
    from rotator.linuxguard import LinuxGuardClient, RetryPolicy
    from rotator.tokens import Secret

    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(sandbox.api_key),
        retry=RetryPolicy(base_delay=0.01, max_delay=0.05, budget=5),
    )


@pytest.mark.parametrize("name", sorted(docblocks.vault_policies()))
def test_the_documented_vault_policy_covers_the_per_pod_records(
    openbao, sandbox, policy_token, name, caplog
):
    """The webhook's ``<tenant>-per-pod-<n>`` shards and watch's ``<tenant>-per-pod`` chain,
    written, promoted and pruned under the documented policy (and its capability check)."""
    from datetime import timedelta

    from providers.vault import VaultProvider
    from rotator.kube.podsecret_keeper import PodTokenIssuer
    from rotator.kube.webhook import AdmissionRecords

    caplog.set_level(logging.DEBUG)
    token = policy_token(docblocks.vault_policies()[name])
    tenant = f"docs-{uuid.uuid4().hex[:8]}"
    provider = VaultProvider(client=openbao.client(token=token))
    minter = _sandbox_minter(sandbox)
    records = AdmissionRecords(provider, tenant=tenant, shards=2, keep=1)
    pruned = 0
    for n in range(6):
        uid = f"admission-{n}"
        provider.check(tenant=records.key_of(uid))
        minted = minter.mint(tenant_id=tenant, min_ttl=timedelta(seconds=60))
        record = records.write_pending(
            minted, admission_uid=uid, rotation_id=str(uuid.uuid4()), deadline=time.monotonic() + 30
        )
        pruned += records.promote(record, admission_uid=uid)
    issuer = PodTokenIssuer(
        minter=minter,
        provider=provider,
        tenant=tenant,
        min_ttl=timedelta(seconds=60),
        keep_versions=1,
    )
    for _ in range(3):
        provider.check(tenant=issuer.store_tenant)
        issuer.issue()
    problems = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
        or any(sign in r.getMessage() for sign in SIGNS_OF_A_REFUSAL)
    ]
    assert not problems, problems
    assert pruned, "no shard was pruned"
    assert destroyed_versions(openbao, issuer.store_tenant), "the per-pod chain was not pruned"


def test_a_policy_without_destroy_is_caught(openbao, sandbox, policy_token):
    """The check above notices drift: the policy as it once was (no destroy) warns."""
    hcl = "\n".join(
        line
        for line in docblocks.vault_policies()["lg-rotate"].splitlines()
        if "/destroy/" not in line
    )
    token, tenant = policy_token(hcl), f"docs-{uuid.uuid4().hex[:8]}"
    results = [rotate_with_pruning(openbao, sandbox, token, tenant) for _ in range(2)]
    assert all(r.returncode == 0 for r in results), results[-1].stderr
    assert any("could not prune" in line for line in warnings_in(results[-1].stderr)), results[
        -1
    ].stderr
    assert not destroyed_versions(openbao, tenant)


# --- RBAC --------------------------------------------------------------------------------------
#
# A Role is compared as a set of atoms (apiGroup, resource, resourceName or None for "the
# namespace", verb), so the docs may group rules as they like. A docs RBAC table has a column
# naming the Role (Who / Role / ServiceAccount: "both", "watch only", "CronJob only", or the
# Role in backticks, "(second Role `NAME`)" winning), a resource column (`secrets`,
# `apps/daemonsets`, `coordination.k8s.io/leases`), a verbs column and a scope column
# (`resourceNames: [a, b]`, else the namespace); rows with an empty Role cell continue the row
# above; a "verbs on `RESOURCE`" header stands for both columns.

Atom = tuple[str, str, str | None, str]
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
WHO = {  # the DEPLOYMENT.md table's words for the base's two Roles
    "both": ("lg-rotate", "lg-rotate-watch"),
    "watch only": ("lg-rotate-watch",),
    "CronJob only": ("lg-rotate",),
}
RBAC_FILES = (
    ROOT / "cronjob" / "base" / "rbac.yaml",
    ROOT / "cronjob" / "components" / "per-pod" / "rbac.yaml",
    ROOT / "cronjob" / "audit" / "rbac.yaml",
)


def shipped_roles() -> dict[str, set[Atom]]:
    roles: dict[str, set[Atom]] = {}
    for path in RBAC_FILES:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == "Role":
                assert doc["metadata"]["name"] not in roles
                roles[doc["metadata"]["name"]] = rule_atoms(doc["rules"])
    return roles


def rule_atoms(rules: list[dict[str, Any]]) -> set[Atom]:
    return {
        (group, resource, name, verb)
        for rule in rules
        for group, resource, name, verb in itertools.product(
            rule["apiGroups"], rule["resources"], rule.get("resourceNames") or [None], rule["verbs"]
        )
    }


def raw_table(text: str, header_starts: str) -> tuple[list[str], list[list[str]]]:
    """The markdown table whose header row starts with ``header_starts``: header, body rows
    (cells raw: backticks kept)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_starts))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], [r for r in rows[1:] if not all(set(c) <= set("-: ") for c in r)]
    return [clean(cell).lower() for cell in header], body


def role_names(cell: str) -> tuple[str, ...]:
    if clean(cell) in WHO:
        return WHO[clean(cell)]
    named = re.search(r"Role,? `([^`]+)`", cell) or re.search(r"`([^`]+)`", cell)
    assert named, f"RBAC table: which Role is {cell!r}?"
    return (named.group(1),)


def resource_of(cell: str) -> tuple[str, str]:
    word = clean(cell).split()[0]
    if "/" in word:
        group, resource = word.split("/")
        return group, resource
    if "." in word:  # leases.coordination.k8s.io
        resource, group = word.split(".", 1)
        return group, resource
    return "", word


def verbs_of(cell: str) -> list[str]:
    verbs = re.findall(r"[a-z]+", clean(cell).replace(" and ", ", "))
    assert verbs, f"RBAC table: no verbs in {cell!r}"
    assert set(verbs) <= VERBS, f"RBAC table: not verbs: {cell!r}"
    return verbs


def names_of(cell: str) -> list[str | None]:
    listed = re.search(r"resourceNames: \[([^\]]*)\]", clean(cell))
    return [n.strip() for n in listed.group(1).split(",")] if listed else [None]


def documented_roles(text: str, header_starts: str) -> dict[str, set[Atom]]:
    header, body = raw_table(text, header_starts)
    who = next(i for i, h in enumerate(header) if h in {"who", "role", "serviceaccount"})
    verbs_col = next(i for i, h in enumerate(header) if h.startswith("verbs"))
    fixed = re.fullmatch(r"verbs on (\S+)", header[verbs_col])
    resource_col = None if fixed else header.index("resource")
    scope_col = header.index("scope") if "scope" in header else None
    roles: dict[str, set[Atom]] = {}
    current: tuple[str, ...] = ()
    for row in body:
        current = role_names(row[who]) if row[who] else current
        group, resource = resource_of(fixed.group(1) if fixed else row[resource_col])
        names = names_of(row[scope_col]) if scope_col is not None else [None]
        for role, name, verb in itertools.product(current, names, verbs_of(row[verbs_col])):
            roles.setdefault(role, set()).add((group, resource, name, verb))
    return roles


def as_rules(atoms: set[Atom]) -> list[str]:
    return sorted(f"{g or 'core'}/{r} {n or '(namespace)'}: {v}" for g, r, n, v in atoms)


def assert_same_roles(documented: dict[str, set[Atom]], where: str) -> None:
    shipped = shipped_roles()
    assert documented, f"{where}: no Role found"
    for role, atoms in documented.items():
        assert role in shipped, f"{where} describes a Role the manifests do not ship: {role}"
        assert atoms == shipped[role], (
            f"{where}, Role {role}: the docs grant {as_rules(atoms - shipped[role])} that the "
            f"manifests do not; the manifests grant {as_rules(shipped[role] - atoms)} that the "
            "docs do not say"
        )


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


RBAC_TABLES = {
    # where: (document, heading of its section, the table's header start, Roles it must cover)
    "DEPLOYMENT.md, Least privilege": (
        "DEPLOYMENT.md",
        "## Least privilege (RBAC)",
        "| Who |",
        {"lg-rotate", "lg-rotate-watch"},
    ),
    "DEPLOYMENT.md, Per-pod Secrets": (
        "DEPLOYMENT.md",
        "### Per-pod Secrets: what the component adds",
        "| Who |",
        {"lg-rotate-webhook", "lg-rotate-watch-per-pod"},
    ),
    "CONTROLLER.md, Running the controller": (
        "CONTROLLER.md",
        "## Running the controller",
        "| Role |",
        {"lg-rotate-watch", "lg-rotate-watch-per-pod"},
    ),
    "PER-POD.md, RBAC": (
        "PER-POD.md",
        "## RBAC, and what cannot be narrowed",
        "| ServiceAccount |",
        {"lg-rotate-webhook", "lg-rotate-watch-per-pod"},
    ),
}


@pytest.mark.parametrize("where", RBAC_TABLES)
def test_the_rbac_tables_are_the_shipped_roles(where):
    name, heading, header, roles = RBAC_TABLES[where]
    documented = documented_roles(section(doc(name), heading), header)
    assert set(documented) == roles, f"{where}: describes {sorted(documented)}"
    assert_same_roles(documented, where)


def test_the_webhook_rbac_sentence_is_the_shipped_role():
    sentence = doc("WEBHOOK.md").split("RBAC in `--namespace`:", 1)[1].split("(", 1)[0]
    on = re.fullmatch(r"\s*(.*) on `([a-z]+)`\s*", sentence.replace("\n", " "), re.S)
    assert on, sentence
    verbs = verbs_of(on.group(1))
    atoms = {("", on.group(2), None, verb) for verb in verbs}
    assert_same_roles({"lg-rotate-webhook": atoms}, "WEBHOOK.md, RBAC")


def test_the_audit_rules_are_the_shipped_role():
    block = section(doc("AUDIT.md"), "## `--cluster`")
    rules = yaml.safe_load(block.split("```yaml\n", 1)[1].split("```", 1)[0])["rules"]
    assert_same_roles({"lg-rotate-audit": rule_atoms(rules)}, "AUDIT.md")
    prose = section(doc("DEPLOYMENT.md"), "### Auditing with least privilege: `cronjob/audit/`")
    listed = prose.split("a Role with `list` on ", 1)[1].split(" and `get` on the one Secret")[0]
    resources = set(re.findall(r"[a-z]+", listed.replace(" and ", ", ")))
    shipped = {r for _, r, _, verb in shipped_roles()["lg-rotate-audit"] if verb == "list"}
    assert resources == shipped, f"DEPLOYMENT.md, Auditing: `list` on {sorted(shipped)}"


def test_the_rbac_table_parser_sees_a_drift():
    """A table granting one verb too many, or one too few, is caught."""
    name, heading, header, _ = RBAC_TABLES["CONTROLLER.md, Running the controller"]
    text = section(doc(name), heading)
    for broken in (
        text.replace("| get, patch | `resourceNames: [linuxguard-enroll]`", "| get, patch, create | `resourceNames: [linuxguard-enroll]`"),
        text.replace("| list, watch, delete |", "| list, watch |"),
    ):  # fmt: skip
        assert broken != text
        with pytest.raises(AssertionError):
            assert_same_roles(documented_roles(broken, header), "broken")


# --- what an overlay ships ---------------------------------------------------------------------


def _ci_manifests() -> ModuleType:
    """.ci/manifests.py (renders with the real kubectl kustomize), loaded once."""
    return ciscripts.load("manifests")


def rendered_kinds(kustomization: str) -> set[str]:
    manifests = _ci_manifests()
    return {d["kind"] for d in manifests.documents(manifests.render(kustomization))}


def readme_overlay_claim() -> tuple[str, str]:
    """README "Running in Kubernetes": what the chart and the overlays ship ("Both ship ...")
    and what they do not ("The overlays ship no ...", up to "Every pod")."""
    text = " ".join(section(readme(), "## Running in Kubernetes").split())
    ships = text.split("Both ship ", 1)[1].split(" The overlays ship no ", 1)
    assert len(ships) == 2, "README: 'Both ship ...' then 'The overlays ship no ...'"
    return ships[0], ships[1].split(" Every pod ", 1)[0]


def kinds_named(text: str, vocabulary: set[str]) -> set[str]:
    words = set(re.findall(r"[A-Za-z]+", text.replace("`", "")))
    return {kind for kind in vocabulary if kind in words or f"{kind}s" in words}


def test_the_readme_names_what_the_overlays_render():
    manifests = _ci_manifests()
    overlays = {overlay: rendered_kinds(overlay) for overlay in manifests.OVERLAYS}
    agent = rendered_kinds("cronjob/agent")
    vocabulary = set().union(*overlays.values(), agent)
    ships, ships_not = readme_overlay_claim()
    named = kinds_named(ships, vocabulary)
    for overlay, kinds in overlays.items():
        assert named == kinds, (
            f"README 'Both ship' names {sorted(named - kinds)} that {overlay} does not render, "
            f"and not {sorted(kinds - named)} that it does"
        )
    assert "DaemonSet" in agent
    assert "DaemonSet" in kinds_named(ships_not, vocabulary)
    assert "cronjob/agent/" in ships_not


# --- install commands --------------------------------------------------------------------------

PIP_INSTALL = re.compile(r"pip install((?:[ \t]+[^\s`&;|()#]+)+)")  # to a comment, (, &&


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_names() -> set[str]:
    project = pyproject()["project"]
    requirements = [
        *project["dependencies"],
        *itertools.chain(*project["optional-dependencies"].values()),
    ]
    return {normalized(re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0]) for r in requirements}


def install_problems(command: str) -> list[str]:
    """What is wrong with the arguments of one ``pip install``: lg-rotate is ``.`` (a clone)
    or its distribution name, with real extras; anything else must be a dependency of it."""
    project = pyproject()["project"]
    extras = set(project["optional-dependencies"])
    problems = []
    for word in command.split():
        argument = word.strip("'\"")
        if argument.startswith("-"):
            continue
        named = re.fullmatch(r"([^\[]+)(?:\[([^\]]*)\])?", argument)
        if not named:
            problems.append(f"{argument}: not a requirement")
            continue
        package, wanted = named.group(1), set(filter(None, (named.group(2) or "").split(",")))
        if package == "." or normalized(package) == normalized(project["name"]):
            problems += [f"{argument}: lg-rotate has no extra {e!r}" for e in wanted - extras]
        elif normalized(package) not in dependency_names():
            problems.append(f"{argument}: neither lg-rotate nor one of its dependencies")
    return problems


def pip_installs() -> Iterator[tuple[str, str]]:
    for path in (README, *DOCS):
        for command in PIP_INSTALL.findall(path.read_text(encoding="utf-8")):
            yield path.name, command


def test_every_pip_install_in_the_docs_names_real_packages_and_extras():
    found = list(pip_installs())
    assert len(found) >= 4  # the parser still sees README's
    problems = [
        f"{where}: pip install{cmd}: {p}" for where, cmd in found for p in install_problems(cmd)
    ]
    assert not problems, problems
    assert install_problems(" 'linuxguard-rotator[vualt]'")
    assert install_problems(" '.[nope]'")
    assert install_problems(" linuxguard-rotater")


def test_the_readme_shows_both_install_names_for_the_extras():
    commands = {cmd.strip().strip("'\"") for where, cmd in pip_installs() if where == "README.md"}
    for extra in ("vault",):
        assert {f".[{extra}]", f"{pyproject()['project']['name']}[{extra}]"} <= commands


def test_the_missing_sdk_hint_names_a_real_install():
    for name in ("vault", "aws", "gcp"):
        hint = registry.install_hint(registry.load(name))
        commands = PIP_INSTALL.findall(hint)
        assert len(commands) == 2, hint  # from an index, and from a clone
        for command in commands:
            assert not install_problems(command), (hint, install_problems(command))
        assert pyproject()["project"]["name"] == registry.DISTRIBUTION
