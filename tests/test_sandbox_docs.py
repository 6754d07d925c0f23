"""docs/SANDBOX.md's examples, run for real against ``lg-rotate sandbox``.

Every ``sh`` block between the ``examples: begin`` and ``examples: end`` markers runs in
``bash``, in order, after the first block (the helpers), in the directory of the sandbox's
key file, against one ``lg-rotate sandbox`` started as the page says (on a free port
instead of 8787). Each block's output must contain the lines of the ``text`` block shown
under it, in that order, once values that change from run to run (tokens, keys, times,
fingerprints, identity ids, durations, the port) are replaced by placeholders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "SANDBOX.md"
DOC_URL = "http://127.0.0.1:8787"
BIN = Path(sys.executable).parent  # lg-rotate is installed beside this interpreter
VOLATILE = [
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:Z|\+00:00)"), "<time>"),
    (re.compile(r"^\d\d:\d\d:\d\d ", re.MULTILINE), "<clock> "),
    (re.compile(r"\b[A-Z2-7]{4}(?:-[A-Z2-7]{4}){5,7}\b"), "<token>"),
    (re.compile(r"\blgsbx-[0-9a-f]+"), "<key>"),
    (re.compile(r"\blgid-[0-9a-f]+"), "<identity>"),
    (re.compile(r"\b[0-9a-f]{12}\b"), "<fingerprint>"),
    (re.compile(r"took\s+[\d.]+s"), "took <seconds>"),
]


@dataclass(frozen=True)
class Example:
    line: int  # where the sh block starts in the page
    script: str
    expected: list[str]


def examples() -> tuple[str, list[Example]]:
    """The helpers block and the examples after it."""
    text = PAGE.read_text(encoding="utf-8")
    begin = text.index("<!-- examples: begin")
    end = text.index("<!-- examples: end -->")
    fence = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    blocks = [
        (text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
        for m in fence.finditer(text, begin, end)
    ]
    found: list[Example] = []
    for line, language, body in blocks:
        if language == "sh":
            found.append(Example(line=line, script=body, expected=[]))
        elif language == "text":
            assert found, f"docs/SANDBOX.md:{line}: output block before any sh block"
            found[-1].expected.extend(body.splitlines())
    assert found, "no examples found"
    helpers, *rest = found
    assert not helpers.expected, "the first block defines helpers and prints nothing"
    return helpers.script, rest


def normalise(text: str, url: str) -> list[str]:
    text = text.replace(url, DOC_URL)
    for pattern, placeholder in VOLATILE:
        text = pattern.sub(placeholder, text)
    return [line.rstrip() for line in text.splitlines()]


@pytest.fixture(scope="module")
def sandbox_cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``lg-rotate sandbox --port 0 --api-key-file ./sandbox-key``: (url, its directory)."""
    workdir = tmp_path_factory.mktemp("sandbox-docs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    process = subprocess.Popen(
        [str(BIN / "lg-rotate"), "sandbox", "--port", "0", "--api-key-file", "./sandbox-key"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+) ", first)
        assert match, first
        yield match.group(1), workdir
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_example(helpers: str, example: Example, url: str, workdir: Path) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LG_ROTATE_", "LINUXGUARD_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    script = (helpers + "\n" + example.script).replace(DOC_URL, url)
    bash = shutil.which("bash")
    assert bash, "bash is needed to run docs/SANDBOX.md's examples"
    result = subprocess.run(
        [bash, "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stderr == "", f"docs/SANDBOX.md:{example.line}: {result.stderr}"
    return normalise(result.stdout, url)


def test_the_examples_print_what_the_page_shows(sandbox_cli: tuple[str, Path]) -> None:
    for tool in ("bash", "curl", "sed", "grep"):
        assert shutil.which(tool), f"{tool} is needed to run docs/SANDBOX.md's examples"
    url, workdir = sandbox_cli
    helpers, found = examples()
    assert len(found) >= 8
    for example in found:
        actual = run_example(helpers, example, url, workdir)
        expected = normalise("\n".join(example.expected), url)
        remaining = iter(actual)  # each expected line, in order, somewhere in the output
        missing = [line for line in expected if not any(line == seen for seen in remaining)]
        assert not missing, (
            f"docs/SANDBOX.md:{example.line}: lines not printed: {missing}\nprinted: {actual}"
        )


def test_the_page_shows_the_startup_line_the_sandbox_prints(
    sandbox_cli: tuple[str, Path],
) -> None:
    url, _ = sandbox_cli
    text = PAGE.read_text(encoding="utf-8")
    assert (
        f"LinuxGuard sandbox listening on {DOC_URL} (admin /_sandbox/* on; API key written to "
        "./sandbox-key (use --api-key-file ./sandbox-key))"
    ) in text
    assert url.startswith("http://127.0.0.1:")


def test_every_sandbox_endpoint_is_documented() -> None:
    from rotator import sandbox

    text = PAGE.read_text(encoding="utf-8")
    for endpoint in ("state", "faults", "clock", "keys", "reset"):
        assert f"/_sandbox/{endpoint}`" in text, endpoint
    for mode in sandbox.MINT_MODES:
        assert f"| `{mode}` |" in text, mode
    for field in ("status", "count", "path", "retryAfter", "latencyMs", "drop"):
        assert f"| `{field}` |" in text, field
