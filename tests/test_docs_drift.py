"""What the documentation promises, checked against the code, one topic per section.

A test here fails when the docs and the code drift apart: fix whichever is wrong (the
failure message shows the row the code implies). Topics:

* settings: README "Configuration" (the settings table, the store options, the flags that
  are not settings) against ``rotator.config`` and the built-in providers' options; every
  ``LG_ROTATE_*`` name in the docs, the manifests and the code is a real variable; the flags
  the docs and the shipped manifests pass to a command are that command's flags;
* exit codes: README "Exit codes" against ``rotator.errors.ExitCode``.

(More topics, e.g. RBAC and Vault policies against the calls the code makes, belong here
too, each in a section of its own.)
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

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
    end = next(
        (
            i
            for i in range(start, len(lines))
            if lines[i].startswith("#") and lines[i].split(" ", 1)[0] in {level, level[:-1], "#"}
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
