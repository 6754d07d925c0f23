"""A real node for the end-to-end suite: lg-rotate's image in front of a real kubelet.

:class:`RealNode` is one ``../shared/envtest`` control plane (etcd, kube-apiserver,
kube-controller-manager) plus its ``node`` (containerd + runc, kubelet, kube-scheduler,
kube-proxy, a CNI bridge), with the images of ``.ci/image/build.sh`` imported; OpenBao and the
LinuxGuard sandbox run on the host, bound to the node's bridge address (10.244.0.1, never
0.0.0.0), which is how pods reach them. OpenBao's Kubernetes auth asks this API server's
TokenReview, with docs/DEPLOYMENT.md's policy, so lg-rotate's pods log in as users' pods do.

Tests deploy the shipped manifests with :meth:`RealNode.deploy` (``kubectl apply -k`` of a
kustomization that names ``cronjob/overlays/vault`` and fills in the placeholders: the
tenant, the addresses, the image) and read what users read: ``kubectl logs``, ``kubectl get``,
``kubectl events``. Everything waited for is polled or watched (``kubectl wait``), never slept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from fixtures.cluster import kubectl_binary, wait_for
from rotator.sandbox import SandboxServer, canonical_code
from rotator.tokens import TOKEN_SHAPED, fingerprint

ROOT = Path(__file__).resolve().parents[2]
BRIDGE = "10.244.0.1"  # the node's bridge: the host as pods see it (envtest/node)
TENANT = "acme"
API_KEY = "lgsbx-e2e-any-tenant-key"
OVERLAY = ROOT / "cronjob" / "overlays" / "vault"
AGENT = ROOT / "cronjob" / "agent"
PER_POD = ROOT / "cronjob" / "components" / "per-pod"
WEBHOOK_CERTS = ROOT / "cronjob" / "components" / "webhook-certs"
SHIPPED_IMAGE = "registry.example.com/linuxguard/lg-rotate"  # cronjob/base/kustomization.yaml
SHIPPED_AGENT_IMAGE = "registry.example.com/linuxguard/linuxguard-agent"  # cronjob/agent
AGENT_SELECTOR = "app=linuxguard-agent"
BASH = shutil.which("bash") or "/bin/bash"


def timestamp(text: str) -> datetime:
    """An RFC 3339 time as the API server and ``kubectl logs --timestamps`` print it."""
    head, _, rest = text.rstrip("Z").partition(".")
    fraction = rest[:6]
    return datetime.fromisoformat(f"{head}.{fraction or '0'}+00:00")


@dataclass
class RealNode:
    workdir: Path
    envtest: Path
    images: dict[str, str]  # archive stem (lg-rotate-vault, agent) -> image name
    sandbox: SandboxServer
    vault_addr: str
    cp: Path = field(init=False)
    kubectl_path: str = field(default_factory=lambda: str(kubectl_binary()))

    def __post_init__(self) -> None:
        self.cp = self.workdir / "cp"

    # --- kubectl ---------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.cp / "kubeconfig"

    def env(self) -> dict[str, str]:
        path = f"{Path(self.kubectl_path).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": path}

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [self.kubectl_path, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            check=False,
            timeout=120,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def apply(self, documents: Iterable[dict[str, Any]]) -> None:
        self.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(list(documents)))

    def run_script(self, script: str, *, cwd: Path) -> str:
        """A shell script from the docs, as a user runs it (kubectl, openssl on PATH)."""
        done = subprocess.run(
            [BASH, "-euo", "pipefail", "-c", script],
            capture_output=True,
            text=True,
            env=self.env(),
            cwd=cwd,
            check=False,
            timeout=120,
        )
        assert done.returncode == 0, f"script failed: {done.stderr}\n{script}"
        return done.stdout

    # --- deploying the shipped manifests ---------------------------------------------------

    def namespace(self, name: str) -> None:
        """A namespace under the ``restricted`` Pod Security Standard, with the API key Secret
        docs/DEPLOYMENT.md asks for (created from stdin: no key on a command line)."""
        self.kubectl("create", "namespace", name)
        self.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "linuxguard-api-key", "namespace": name},
            "stringData": {"api-key": API_KEY},
        }
        self.apply([secret])

    def kustomization(self, name: str, spec: dict[str, Any]) -> Path:
        """Write a kustomization under the work directory; its ``resources`` and ``components``
        may name repository folders by absolute path (kustomize wants them relative)."""
        directory = self.workdir / "kustomize" / name
        directory.mkdir(parents=True, exist_ok=True)
        for key in ("resources", "components"):
            if key in spec:
                spec[key] = [os.path.relpath(path, directory) for path in spec[key]]
        spec = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **spec}
        (directory / "kustomization.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return directory

    def deploy(
        self,
        namespace: str,
        *,
        components: Sequence[Path] = (),
        component_patches: Sequence[dict[str, Any]] = (),
        patches: Sequence[dict[str, Any]] = (),
    ) -> None:
        """``kubectl apply -k`` of the vault overlay in ``namespace`` with its placeholders
        filled in; with ``components`` (per-pod, webhook-certs), those on top, with
        ``component_patches``, as docs/PER-POD.md shows it."""
        settings = [
            f"LG_ROTATE_TENANT={TENANT}",
            f"LG_ROTATE_LINUXGUARD_URL={self.sandbox.url}",
            f"VAULT_ADDR={self.vault_addr}",
        ]
        name, _, tag = self.images["lg-rotate-vault"].rpartition(":")
        images = [{"name": SHIPPED_IMAGE, "newName": name, "newTag": tag}]
        overlay = self.kustomization(
            f"{namespace}-overlay",
            {
                "namespace": namespace,
                "resources": [OVERLAY],
                "configMapGenerator": [
                    {"name": "lg-rotate-settings", "behavior": "merge", "literals": settings}
                ],
                "images": images,
                "patches": list(patches),
            },
        )
        if components:
            # Your overlay, then the components on top (and the image again: the component's
            # webhook Deployment comes in at this level).
            overlay = self.kustomization(
                f"{namespace}-components",
                {
                    "resources": [overlay],
                    "components": list(components),
                    "images": images,
                    "patches": list(component_patches),
                },
            )
        self.kubectl("apply", "-k", str(overlay))

    def agent_documents(
        self, namespace: str, *, replicas: int | None = None, args: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """The shipped example agent (cronjob/agent) with the agent double's image; as a
        Deployment of ``replicas`` when given (one node: a DaemonSet has one pod)."""
        name, _, tag = self.images["agent"].rpartition(":")
        directory = self.kustomization(
            f"{namespace}-agent",
            {
                "namespace": namespace,
                "resources": [AGENT],
                "images": [{"name": SHIPPED_AGENT_IMAGE, "newName": name, "newTag": tag}],
            },
        )
        (daemonset,) = yaml.safe_load_all(self.kubectl("kustomize", str(directory)))
        container = daemonset["spec"]["template"]["spec"]["containers"][0]
        # The agent's backend address; the real agent has its own configuration for it.
        container["env"].append({"name": "LINUXGUARD_URL", "value": self.sandbox.url})
        if args is not None:
            container["args"] = list(args)
        if replicas is None:
            return [daemonset]
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {**daemonset["metadata"], "name": "linuxguard-agents"},
            "spec": {
                "replicas": replicas,
                "selector": daemonset["spec"]["selector"],
                "template": daemonset["spec"]["template"],
            },
        }
        return [deployment]

    def diagnosis(self, namespace: str) -> str:
        """What a user would look at when something does not come up: pods, events, logs."""
        parts = [
            self.kubectl("-n", namespace, "get", "pods", "-o", "wide", check=False),
            self.kubectl("-n", namespace, "events", check=False)[-4000:],
        ]
        for pod in self.get("pods", "-n", namespace)["items"]:
            name = pod["metadata"]["name"]
            parts.append(
                f"--- {name}\n"
                + self.kubectl("-n", namespace, "logs", name, "--tail=20", check=False)
            )
        return "\n".join(parts)

    def wait(self, namespace: str, *condition: str, timeout: float = 90) -> None:
        """``kubectl wait`` (a watch, not a sleep); on a timeout, the namespace's diagnosis."""
        args = ["-n", namespace, "wait", *condition, f"--timeout={timeout:.0f}s"]
        done = self.kubectl(*args, check=False)
        if "condition met" not in done:
            raise AssertionError(f"kubectl {' '.join(args)} failed\n{self.diagnosis(namespace)}")

    def run_job_from_cronjob(self, namespace: str, job: str, *, timeout: float = 90) -> str:
        """``kubectl create job --from=cronjob/lg-rotate`` and wait for it; its log."""
        self.kubectl("-n", namespace, "create", "job", job, "--from=cronjob/lg-rotate")
        self.kubectl(
            "-n",
            namespace,
            "wait",
            "--for=condition=complete",
            f"job/{job}",
            f"--timeout={timeout:.0f}s",
        )
        return self.kubectl("-n", namespace, "logs", f"job/{job}")

    # --- pods, as the kubelet runs them ------------------------------------------------------

    def pods(self, namespace: str, selector: str = AGENT_SELECTOR) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("pods", "-n", namespace, "-l", selector)["items"]
        return items

    def logs(
        self, namespace: str, pod: str, *, previous: bool = False
    ) -> list[tuple[datetime, str]]:
        args = ["-n", namespace, "logs", pod, "--timestamps"]
        if previous:
            args.append("--previous")
        lines = []
        for line in self.kubectl(*args, check=False).splitlines():
            when, _, text = line.partition(" ")
            if when:
                lines.append((timestamp(when), text))
        return lines

    def wait_for_log(
        self, namespace: str, pod: str, needle: str, *, timeout: float, previous: bool = False
    ) -> tuple[datetime, str]:
        def found() -> tuple[datetime, str] | None:
            matches = [e for e in self.logs(namespace, pod, previous=previous) if needle in e[1]]
            return matches[0] if matches else None

        try:
            return wait_for(
                found, timeout=timeout, what=f"{needle!r} in the log of {namespace}/{pod}"
            )
        except AssertionError as failure:
            previous = self.kubectl("-n", namespace, "logs", pod, "--previous", check=False)
            raise AssertionError(
                f"{failure}\n--- its previous container's log\n{previous}\n"
                f"{self.diagnosis(namespace)}"
            ) from None

    def container_processes(self, marker: str) -> list[int]:
        """PIDs on this host whose command line contains ``marker`` (containers included)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
        return found

    def process_of_pod(self, pod_uid: str, marker: str) -> int:
        """The PID of the process ``marker`` in the pod with ``pod_uid`` (its cgroup says)."""

        def find() -> int | None:
            for pid in self.container_processes(marker):
                try:
                    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
                except OSError:
                    continue
                if pod_uid.replace("-", "_") in cgroup or pod_uid in cgroup:
                    return pid
            return None

        return wait_for(find, timeout=30, what=f"the process {marker!r} of pod {pod_uid}")

    # --- what must never hold a token --------------------------------------------------------

    def minted_fingerprints(self) -> set[str]:
        return {record.fingerprint for record in self.sandbox.minted()}

    def tokens_in(self, text: str) -> list[str]:
        """Fingerprints of minted tokens found in ``text``, in any spelling (dashes, case)."""
        minted = self.minted_fingerprints()
        found = []
        for match in TOKEN_SHAPED.finditer(text):
            digest = fingerprint(canonical_code(match.group(0)))
            if digest in minted:
                found.append(digest[:12])
        return found


def _envtest(script: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@contextlib.contextmanager
def running_envtest(envtest: Path, workdir: Path, archives: Sequence[Path]) -> Iterator[Path]:
    """``control-plane up``, then ``node up --image ...``; both down at the end."""
    control_plane, node = envtest / "control-plane", envtest / "node"
    cp, node_dir = workdir / "cp", workdir / "node"
    up = _envtest(control_plane, "up", cp)
    assert up.returncode == 0, f"control-plane up failed:\n{up.stdout}\n{up.stderr}"
    try:
        images = [arg for archive in archives for arg in ("--image", str(archive))]
        started = _envtest(node, "up", cp, node_dir, *images)
        assert started.returncode == 0, f"node up failed:\n{started.stdout}\n{started.stderr}"
        try:
            yield cp
        finally:
            down = _envtest(node, "down", node_dir)
            if down.returncode != 0:
                print(f"node down failed:\n{down.stdout}\n{down.stderr}", file=sys.stderr)
    finally:
        _envtest(control_plane, "down", cp)
