"""``lg-rotate completion bash|zsh|fish``: the scripts load in real shells and complete.

The bash script is always loaded in a real ``bash`` (``source <(lg-rotate completion
bash)``) and driven the way bash drives a completion function: ``COMP_WORDS``,
``COMP_CWORD``, ``COMP_LINE``, ``COMP_POINT``, then the registered function, whose
``COMPREPLY`` is what TAB would offer. zsh and fish are checked the same way where their
binaries exist (a developer machine with them installed); CI has neither, and there the
scripts are checked for the parts each shell needs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rotator.audit import RULES

LG = [sys.executable, "-m", "rotator.cli"]
BIN = Path(sys.executable).parent  # the venv's bin: lg-rotate is installed there
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
COMMANDS = {
    "rotate", "status", "exec", "emit", "watch", "roll", "demo", "sandbox", "providers",
    "audit", "completion",
}  # fmt: skip


def generate(shell: str) -> str:
    result = subprocess.run(
        [*LG, "completion", shell], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return {shell: generate(shell) for shell in ("bash", "zsh", "fish")}


# --- bash: loaded and driven for real ---------------------------------------------------

BASH_DRIVER = textwrap.dedent(
    """
    if [ -n "${COMPLETION_SCRIPT:-}" ]; then
        source "$COMPLETION_SCRIPT" || exit 90  # generated once per module: faster
    else
        source <(lg-rotate completion bash) || exit 90
    fi
    complete -p lg-rotate || exit 91
    function_name=$(complete -p lg-rotate | sed -E 's/.* -F ([^ ]+) .*/\\1/')
    COMP_WORDS=("$@")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMP_LINE="${COMP_WORDS[*]}"
    COMP_POINT=${#COMP_LINE}
    COMPREPLY=()
    "$function_name" lg-rotate "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
    printf 'reply:%s\\n' "${COMPREPLY[@]}"
    """
)


@pytest.fixture(scope="module")
def bash_script(scripts: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "lg-rotate.bash"
    path.write_text(scripts["bash"])
    return path


def bash_complete(
    *words: str, script: Path | None, cwd: Path | None = None
) -> tuple[str, list[str]]:
    """Complete ``words`` (the last one is being typed): (``complete -p`` line, offers).

    The completion is loaded from ``script``, or with ``source <(lg-rotate completion bash)``
    when it is None."""
    bash = shutil.which("bash", path=ENV["PATH"])
    assert bash, "bash is needed for this test"
    env = dict(ENV, COMPLETION_SCRIPT=str(script) if script else "")
    result = subprocess.run(
        [bash, "-c", BASH_DRIVER, "driver", *words],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr)
    lines = result.stdout.splitlines()
    offers = [line.removeprefix("reply:") for line in lines if line.startswith("reply:")]
    return lines[0], [offer for offer in offers if offer]


def test_bash_script_registers_a_completion_function() -> None:
    registered, offers = bash_complete("lg-rotate", "ro", script=None)  # source <(...)
    assert offers == ["rotate", "roll"]
    assert registered.startswith("complete ")
    assert " -F " in registered
    assert registered.endswith(" lg-rotate")


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (("lg-rotate", "ro"), {"rotate", "roll"}),
        (("lg-rotate", "rotate", "--pro"), {"--provider", "--provider-option"}),
        (("lg-rotate", "rotate", "--provider", ""), {"vault", "aws", "gcp", "memory"}),
        (("lg-rotate", "rotate", "--target", ""), {"kubernetes", "none"}),
        (("lg-rotate", "emit", "-o", ""), {"raw", "env", "json"}),
        (("lg-rotate", "exec", "--from"), {"--from-store"}),
        (("lg-rotate", "watch", "--metr"), {"--metrics-bind-address", "--metrics-port"}),
        (("lg-rotate", "completion", ""), {"bash", "zsh", "fish"}),
        # audit and sandbox parse their own flags (parsers built only when they run):
        (("lg-rotate", "audit", "--fail"), {"--fail-on"}),
        (("lg-rotate", "audit", "--fail-on", "c"), {"critical"}),
        (("lg-rotate", "audit", "-o", ""), {"table", "json", "yaml", "sarif"}),
        (("lg-rotate", "audit", "--ignore", "LG00"), {r for r in RULES if r.startswith("LG00")}),
        (("lg-rotate", "sandbox", "--gr"), {"--grouping"}),
        (("lg-rotate", "sandbox", "--grouping", ""), {"grouped", "bare", "alternate"}),
        (("lg-rotate", "sandbox", "--no"), {"--no-admin"}),
    ],
)
def test_bash_offers(words: tuple[str, ...], expected: set[str], bash_script: Path) -> None:
    _, offers = bash_complete(*words, script=bash_script)
    assert set(offers) == expected, offers


def test_bash_offers_every_command(bash_script: Path) -> None:
    _, offers = bash_complete("lg-rotate", "", script=bash_script)
    assert set(offers) >= COMMANDS, offers  # a superset: commands may be added


def test_bash_completes_file_names_for_path_options(tmp_path: Path, bash_script: Path) -> None:
    (tmp_path / "lg-rotate.yaml").write_text("tenant: acme\n")
    (tmp_path / "k8s").mkdir()
    _, offers = bash_complete(
        "lg-rotate", "rotate", "--config", "lg-", script=bash_script, cwd=tmp_path
    )
    assert offers == ["lg-rotate.yaml"]
    _, offers = bash_complete("lg-rotate", "audit", "k8", script=bash_script, cwd=tmp_path)
    assert offers == ["k8s"]


# --- zsh and fish ---------------------------------------------------------------------------


def test_zsh_script(scripts: dict[str, str]) -> None:
    script = scripts["zsh"]
    assert script.startswith("#compdef lg-rotate\n")  # fpath autoloading reads this line
    assert "compdef _shtab_lg_rotate" in script  # registration when eval'ed
    for name in COMMANDS:
        assert f"\n    {name}:'" in script, name
    for flag in ("--provider", "--fail-on", "--grouping", "--no-admin", "--from-store"):
        assert flag in script, flag
    zsh = shutil.which("zsh")
    if zsh is None:  # CI: no zsh; the checks above stand in for loading it
        return
    subprocess.run([zsh, "-n"], input=script, text=True, check=True, timeout=60)
    loaded = subprocess.run(
        [
            zsh,
            "-fc",
            'autoload -Uz compinit && compinit -u -D; eval "$(lg-rotate completion zsh)"; '
            'print -r -- "$_comps[lg-rotate]"',
        ],
        capture_output=True,
        text=True,
        env=ENV,
        check=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == "_shtab_lg_rotate", loaded.stderr


FISH_CASES = [
    ("lg-rotate ro", {"rotate", "roll"}),
    ("lg-rotate rotate --pro", {"--provider", "--provider-option"}),
    ("lg-rotate audit --fail-on h", {"high"}),
    ("lg-rotate sandbox --grouping ", {"grouped", "bare", "alternate"}),
]


def test_fish_script(scripts: dict[str, str]) -> None:
    script = scripts["fish"]
    assert "complete -c lg-rotate" in script
    for name in COMMANDS:
        assert f"-a {name} " in script, name
    for flag in ("-l provider", "-l fail-on", "-l grouping", "-l no-admin", "-l from-store"):
        assert flag in script, flag
    fish = shutil.which("fish")
    if fish is None:  # CI: no fish; the checks above stand in for loading it
        return
    subprocess.run([fish, "--no-execute"], input=script, text=True, check=True, timeout=60)
    for line, expected in FISH_CASES:
        result = subprocess.run(
            [
                fish,
                "--no-config",
                "-c",
                f"lg-rotate completion fish | source; complete -C {shlex.quote(line)}",
            ],
            capture_output=True,
            text=True,
            env=ENV,
            check=True,
            timeout=60,
        )
        offers = {row.split("\t", 1)[0] for row in result.stdout.splitlines() if row}
        assert offers == expected, (line, result.stdout, result.stderr)


# --- the command itself -------------------------------------------------------------------


def test_an_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run(
        [*LG, "completion", "tcsh"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'tcsh'" in result.stderr
    assert result.stdout == ""


def test_only_the_completion_command_imports_shtab() -> None:
    """The start-up of every other command is measured (benchmarks/): no shtab there."""
    code = textwrap.dedent(
        """
        import contextlib, io, sys
        from rotator import cli
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["providers"])
            cli.main(["rotate", "--help"])
        before = "shtab" in sys.modules
        with contextlib.redirect_stdout(io.StringIO()):
            cli.main(["completion", "bash"])
        print(before, "shtab" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.split() == ["False", "True"]
