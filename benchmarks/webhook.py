"""Per-pod Secrets (``lg-rotate webhook``) against one shared Secret (``watch``): pod bursts.

    export KUBEBUILDER_ASSETS=$(../shared/envtest/control-plane assets)
    python benchmarks/webhook.py                # 100 and 500 pods
    python benchmarks/webhook.py --pods 100     # one size, about 2 minutes

Starts its own real control plane (etcd, kube-apiserver, kube-controller-manager from
``$KUBEBUILDER_ASSETS``, through tests/fixtures/cluster.py's ``Cluster``), the LinuxGuard
sandbox (in this process), the OpenBao dev server (the store), and ``lg-rotate webhook`` as a
subprocess (its own interpreter, as in a pod) registered with a MutatingWebhookConfiguration:
the API server calls it. For each size N:

1. **API burst**: N agent pods created at once (``--threads`` concurrent creates): the
   create latency seen by the client with the webhook in the path and in a namespace without
   it, the webhook's own admission time per pod (its JSON log), and mints per second (N over
   the time from the first create sent to the last answered).
2. **DaemonSet burst, webhook**: N fake Nodes, then the agent DaemonSet: the real DaemonSet
   controller creates the N pods (slow-start batches), the API server calls the webhook for
   each; a simulated kubelet starts each pod's container as soon as the pod exists (0-30 ms),
   resolving its env from the pod's ``secretKeyRef``s and enrolling with the sandbox
   (workload id = pod UID); a refused agent restarts with podsim's compressed crash-loop
   back-off (0.3 s doubling to 3 s, 8 starts at most). ``watch`` runs beside it, as deployed.
3. **DaemonSet burst, shared Secret + watch**: ``tests/podsim.py``'s ``burst_shared_secret``
   on N fresh Nodes: the same DaemonSet reading one shared Secret, ``watch`` rotating after
   each start and recovering collisions, the same kubelet model (plus pod status updates,
   which ``watch`` needs to see starts).

Prints one table and the ratios; exit status 1 if a check fails (a pod without its own
Secret, mints != pods admitted, a token in the webhook's log). Tokens are only ever compared
by fingerprint; nothing prints one.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import servers

servers.use_test_helpers()

from kubernetes import client, watch  # noqa: E402 - after the test helpers' path
from kubernetes.client.exceptions import ApiException  # noqa: E402

import webhooksim as ws  # noqa: E402
from fixtures.cluster import Cluster  # noqa: E402
from fixtures.ports import free_port  # noqa: E402

PYTHON = sys.executable
MAX_STARTS = 8
START_DELAY = (0.0, 0.03)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Row:
    section: str
    mode: str
    pods: int
    create_p50: float | None = None  # ms
    create_p99: float | None = None
    admit_p50: float | None = None  # ms, the webhook's own time
    admit_p99: float | None = None
    mints_per_s: float | None = None
    first_try: int | None = None
    all_enrolled_s: float | None = None
    conflicts: int | None = None
    note: str = ""


NODE_CHUNK = 50  # Nodes created (and waited for) at a time


def create_nodes(cluster: Cluster, names: list[str]) -> None:
    """``cluster.create_nodes`` in chunks: it waits (30 s at most) until the node lifecycle
    controller lifted the ``not-ready`` taint of every Node it made, which for 500 Nodes at
    once takes longer (the controller manager's client is rate-limited to 20 requests/s)."""
    for start in range(0, len(names), NODE_CHUNK):
        cluster.create_nodes(names[start : start + NODE_CHUNK])


class ChunkedNodes:
    """The cluster, with :func:`create_nodes` in chunks (for podsim's shared burst)."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster

    def create_nodes(self, names: list[str]) -> None:
        create_nodes(self._cluster, list(names))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cluster, name)


class WebhookProcess:
    """``lg-rotate webhook`` as a subprocess; its JSON log lines are collected."""

    def __init__(
        self, *, cluster: Cluster, namespace: str, sandbox: Any, bao: Any, pki: ws.Pki, work: Path
    ) -> None:
        kubeconfig = work / f"kubeconfig-{namespace}"
        cluster.write_kubeconfig(kubeconfig)
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.vault_path = f"bench/{uuid.uuid4().hex}/<tenant>"
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LG_ROTATE_", "LINUXGUARD_", "VAULT_"))
        }
        env.update(
            {
                "LINUXGUARD_API_KEY": sandbox.api_key,
                "VAULT_ADDR": bao.addr,
                "VAULT_TOKEN": servers.BAO_ROOT_TOKEN,
                "LG_ROTATE_VAULT_PATH": self.vault_path,
                "KUBECONFIG": str(kubeconfig),
            }
        )
        self.process = subprocess.Popen(
            [
                PYTHON, "-m", "rotator.cli", "webhook", "--provider", "vault",
                "--tenant", ws.TENANT, "--linuxguard-url", sandbox.url,
                "--namespace", namespace, "--listen", f"127.0.0.1:{self.port}",
                "--tls-cert-file", str(pki.cert_file),
                "--tls-private-key-file", str(pki.key_file), "--log-format", "json",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        context = pki.client_context()
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("lg-rotate webhook exited:\n" + "\n".join(self.lines[-20:]))
            try:
                import urllib.request

                with urllib.request.urlopen(  # noqa: S310 - loopback
                    f"{self.url}/readyz", context=context, timeout=1
                ):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("lg-rotate webhook never got ready") from None
                time.sleep(0.05)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)

    def admissions(self) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("admission"):
                found.append(entry)
        return found

    def stop(self) -> int:
        self.process.terminate()
        code = self.process.wait(timeout=30)
        self._reader.join(timeout=5)
        return code


class Bench:
    def __init__(self, *, cluster: Cluster, sandbox: Any, bao: Any, work: Path, threads: int):
        self.cluster = cluster
        self.sandbox = sandbox
        self.bao = bao
        self.work = work
        self.threads = threads
        self.api = ws.widen_pool(cluster.api_client(), 256)
        self.core = client.CoreV1Api(self.api)
        self.failures: list[str] = []
        self.pki = ws.Pki.create(work / "tls")

    def namespace(self, prefix: str) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.cluster.create_namespace(name)
        self.cluster.wait_for_default_serviceaccount(name)
        self.cluster.apply(ws.shared_secret(), name)
        return name

    def webhook(self, namespace: str) -> WebhookProcess:
        process = WebhookProcess(
            cluster=self.cluster,
            namespace=namespace,
            sandbox=self.sandbox,
            bao=self.bao,
            pki=self.pki,
            work=self.work,
        )
        self.cluster.apply(
            ws.webhook_configuration(
                name=f"bench-{namespace}", url=process.url, ca_pem=self.pki.ca_pem,
                namespace=namespace,
            )
        )  # fmt: skip
        ws.wait_until_mutating(self.core, namespace)
        return process

    def retire(self, namespace: str, process: WebhookProcess | None) -> None:
        if process is not None:
            self.cluster.delete(
                "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
                None,
                f"bench-{namespace}",
            )
            if process.stop() != 0:
                self.failures.append(f"lg-rotate webhook in {namespace} did not exit 0")
            self.check_no_token_in(namespace, "".join(process.lines))
        self.cluster.delete("v1/namespaces", None, namespace)

    def per_pod_secrets(self, namespace: str, *, settle_to: int) -> list[dict[str, Any]]:
        """The namespace's per-pod Secrets, once the webhook deleted those of timed-out
        admissions (or after 15 s)."""
        deadline = time.monotonic() + 15
        while True:
            secrets = self.cluster.list_objects(
                "v1/secrets", namespace, label_selector="linuxguard.io/per-pod=true"
            )
            if len(secrets) <= settle_to or time.monotonic() > deadline:
                return secrets
            time.sleep(0.2)

    def check_no_token_in(self, namespace: str, text: str) -> None:
        secrets = self.cluster.list_objects(
            "v1/secrets", namespace, label_selector="linuxguard.io/per-pod=true"
        )
        for secret in secrets:
            value = base64.b64decode(secret["data"]["token"]).decode()
            if value in text or value.replace("-", "") in text:
                self.failures.append(f"a token of {namespace} is in the webhook's log")
                return

    # --- 1. API burst ---

    def api_burst(self, pods: int, *, with_webhook: bool) -> Row:
        namespace = self.namespace("api-wh" if with_webhook else "api-plain")
        process = self.webhook(namespace) if with_webhook else None
        minted_before = len(self.sandbox.minted())
        latencies: list[float] = []
        denials: list[int] = []
        barrier = threading.Barrier(self.threads)
        lock = threading.Lock()
        remaining = list(range(pods))

        def creator() -> None:
            self.core.read_namespace(namespace, _preload_content=False)  # a warm connection
            barrier.wait()
            while True:
                with lock:
                    if not remaining:
                        return
                    remaining.pop()
                began = time.monotonic()
                for attempt in range(1, 6):
                    try:
                        self.core.create_namespaced_pod(
                            namespace, ws.agent_pod(), _preload_content=False
                        )
                        break
                    except ApiException as exc:  # a denial: retry as a controller would
                        if "lg-rotate webhook" not in str(exc.body) or attempt == 5:
                            raise
                        with lock:
                            denials.append(attempt)
                        time.sleep(0.5 * attempt)
                with lock:
                    latencies.append((time.monotonic() - began) * 1000)

        began = time.monotonic()
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for future in [pool.submit(creator) for _ in range(self.threads)]:
                future.result()
        wall = time.monotonic() - began
        row = Row(
            section="1 API burst",
            mode="webhook (per-pod)" if with_webhook else "no webhook",
            pods=pods,
            create_p50=percentile(latencies, 50),
            create_p99=percentile(latencies, 99),
        )
        if process is not None:
            time.sleep(0.5)  # let the log reader catch up (not a readiness wait)
            admitted = [a for a in process.admissions() if a["admission"] == "minted"]
            durations = [float(a["duration_ms"]) for a in admitted]
            minted = len(self.sandbox.minted()) - minted_before
            row.admit_p50 = percentile(durations, 50)
            row.admit_p99 = percentile(durations, 99)
            row.mints_per_s = minted / wall
            secrets = self.per_pod_secrets(namespace, settle_to=pods)
            # A denied admission may have minted (and made a Secret the webhook deletes, or,
            # if its create's outcome is unknown, leaves to watch's orphan clean-up).
            if minted < pods or len(admitted) != pods or len(secrets) < pods:
                self.failures.append(
                    f"API burst {pods}: {minted} mints, {len(admitted)} admissions, "
                    f"{len(secrets)} Secrets for {pods} pods"
                )
            row.note = (
                f"{minted} mints, {len(secrets) - pods} orphan Secrets, "
                f"{len(denials)} denied and retried, "
                f"{wall:.1f}s wall; {breakdown(admitted)}"
            )
        else:
            row.note = f"{wall:.1f}s wall"
        self.retire(namespace, process)
        return row

    # --- 2. DaemonSet burst with the webhook ---

    def daemonset_webhook(self, pods: int) -> Row:
        from podsim import make_controller

        namespace = self.namespace("ds-wh")
        process = self.webhook(namespace)
        controller = make_controller(
            self.cluster, namespace, self.sandbox, metrics_port=None, resync_seconds=120
        )
        stop = threading.Event()
        watcher = threading.Thread(target=controller.run, kwargs={"stop": stop}, daemon=True)
        watcher.start()
        nodes = [f"wh-{uuid.uuid4().hex[:4]}-{index:03d}" for index in range(pods)]
        kubelet = ws.Kubelet(self.core, namespace, self.sandbox.url)
        starts: list[ws.Start] = []
        enrolled_at: dict[str, float] = {}
        errors: list[str] = []
        lock = threading.Lock()
        minted_before = len(self.sandbox.minted())
        conflicts_before = sum(1 for e in self.sandbox.enrolments() if e.result == "conflict")
        rng = random.Random(4)

        def run_pod(name: str) -> None:
            time.sleep(rng.uniform(*START_DELAY))
            try:
                start = kubelet.start(name, retries=MAX_STARTS - 1)
            except Exception as exc:  # reported, never a silent pass
                with lock:
                    errors.append(f"{name}: {exc!r}")
                return
            with lock:
                starts.append(start)
                if start.enrolled:
                    enrolled_at[name] = time.monotonic()

        try:
            ws.wait_for(
                lambda: controller.status().leader and controller.status().fingerprint,
                timeout=30,
                what="watch to lead",
            )
            create_nodes(self.cluster, nodes)
            created = time.monotonic()
            self.cluster.apply(ws.agent_daemonset(), namespace)
            self._start_pods_as_they_come(namespace, pods, run_pod)
            done = max(enrolled_at.values()) - created if len(enrolled_at) == pods else None
        finally:
            stop.set()
            watcher.join(timeout=30)
            self.cluster.delete("apps/v1/daemonsets", namespace, "linuxguard-agent")
            self.cluster.delete_nodes(nodes)
        minted = len(self.sandbox.minted()) - minted_before
        admitted = [a for a in process.admissions() if a["admission"] == "minted"]
        durations = [float(a["duration_ms"]) for a in admitted]
        conflicts = sum(1 for e in self.sandbox.enrolments() if e.result == "conflict")
        row = Row(
            section="2 DaemonSet burst",
            mode="webhook (per-pod)",
            pods=pods,
            admit_p50=percentile(durations, 50),
            admit_p99=percentile(durations, 99),
            first_try=sum(1 for s in starts if s.first_try),
            all_enrolled_s=done,
            conflicts=conflicts - conflicts_before,
            mints_per_s=len(admitted) / done if done else None,
            note=f"{len(admitted)} admissions, {minted} mints incl. watch's; {breakdown(admitted)}",
        )
        if errors:
            self.failures.append(f"DaemonSet burst {pods}: kubelet errors {errors[:3]}")
        if len({s.secret for s in starts}) != pods:
            self.failures.append(f"DaemonSet burst {pods}: pods shared a Secret")
        self.retire(namespace, process)
        return row

    def _start_pods_as_they_come(
        self, namespace: str, pods: int, run_pod: Callable[[str], None]
    ) -> None:
        """Hand each new agent pod to ``run_pod`` (a kubelet thread) as soon as it exists."""
        seen: set[str] = set()
        deadline = time.monotonic() + 300
        stream = watch.Watch()
        with ThreadPoolExecutor(max_workers=64) as pool:
            for event in stream.stream(
                self.core.list_namespaced_pod,
                namespace,
                label_selector="app=linuxguard-agent",
                timeout_seconds=300,
            ):
                name = event["object"].metadata.name
                if event["type"] == "ADDED" and name not in seen:
                    seen.add(name)
                    pool.submit(run_pod, name)
                if len(seen) >= pods or time.monotonic() > deadline:
                    stream.stop()

    # --- 3. DaemonSet burst on one shared Secret ---

    def daemonset_shared(self, pods: int, *, timeout: float) -> Row:
        from podsim import burst_shared_secret

        namespace = self.namespace("ds-shared")
        try:
            report = burst_shared_secret(
                ChunkedNodes(self.cluster),  # type: ignore[arg-type]
                namespace,
                pods,
                sandbox=self.sandbox,
                max_starts=MAX_STARTS,
                timeout=timeout,
                start_delay=START_DELAY,
            )
        except Exception as exc:  # the baseline is tests/podsim.py's: report, do not hide
            self.failures.append(f"shared-Secret burst {pods} failed: {exc!r}")
            return Row(section="3 DaemonSet burst", mode="shared Secret + watch", pods=pods,
                       note=f"failed: {type(exc).__name__}")  # fmt: skip
        finally:
            self.cluster.delete("apps/v1/daemonsets", namespace, "linuxguard-agent")
            self.cluster.delete("v1/namespaces", None, namespace)
        done = report.seconds_to_all_enrolled
        return Row(
            section="3 DaemonSet burst",
            mode="shared Secret + watch",
            pods=pods,
            first_try=report.first_try,
            all_enrolled_s=done,
            conflicts=report.conflicts,
            mints_per_s=report.rotations / done if done else None,
            note=f"{report.rotations} rotations, {report.starts} starts, "
            f"{report.deletions} pods deleted, {report.unenrolled} never enrolled "
            f"(timeout {timeout:.0f}s)",
        )


def breakdown(admitted: list[dict[str, Any]]) -> str:
    """Median ms per step of the admissions (the webhook's JSON log fields)."""
    parts = []
    for key in ("read_ms", "mint_ms", "store_ms", "create_ms"):
        values = [float(a[key]) for a in admitted if key in a]
        if values:
            parts.append(f"{key[:-3]} {percentile(values, 50):.0f}")
    return "median ms: " + ", ".join(parts) if parts else ""


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.{digits}f}"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'section':<18} {'mode':<22} {'pods':>5} {'create p50':>10} {'p99':>7} "
        f"{'admit p50':>9} {'p99':>6} {'mints/s':>8} {'1st try':>8} {'all enrolled':>12} "
        f"{'409s':>5}  note"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        first = f"{row.first_try}/{row.pods}" if row.first_try is not None else "-"
        done = (
            f"{row.all_enrolled_s:.1f}s"
            if row.all_enrolled_s is not None
            else ("never" if row.first_try is not None else "-")
        )
        print(
            f"{row.section:<18} {row.mode:<22} {row.pods:>5} {fmt(row.create_p50):>8}ms "
            f"{fmt(row.create_p99):>5}ms {fmt(row.admit_p50):>7}ms {fmt(row.admit_p99):>4}ms "
            f"{fmt(row.mints_per_s, 1):>8} {first:>8} {done:>12} "
            f"{fmt(row.conflicts) if row.conflicts is not None else '-':>5}  {row.note}"
        )


def print_ratios(rows: list[Row]) -> None:
    print()
    for pods in sorted({row.pods for row in rows}):
        by = {(row.section[0], row.mode): row for row in rows if row.pods == pods}
        plain, hooked = by.get(("1", "no webhook")), by.get(("1", "webhook (per-pod)"))
        per_pod, shared = by.get(("2", "webhook (per-pod)")), by.get(("3", "shared Secret + watch"))
        parts = []
        if plain and hooked and plain.create_p50 and plain.create_p99:
            parts.append(
                f"create latency with the webhook: p50 x{hooked.create_p50 / plain.create_p50:.1f}"
                f", p99 x{hooked.create_p99 / plain.create_p99:.1f}"  # type: ignore[operator]
            )
        if per_pod and shared:
            parts.append(
                f"first-try enrolment {per_pod.first_try}/{pods} vs {shared.first_try}/{pods}"
            )
            if per_pod.all_enrolled_s and shared.all_enrolled_s:
                parts.append(
                    f"all enrolled {shared.all_enrolled_s / per_pod.all_enrolled_s:.1f}x sooner "
                    "with per-pod Secrets"
                )
            elif per_pod.all_enrolled_s:
                parts.append("shared Secret: not all enrolled before its timeout")
        print(f"{pods} pods: " + "; ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", default="100,500", help="burst sizes (default: 100,500)")
    parser.add_argument("--threads", type=int, default=64, help="concurrent creates (API burst)")
    parser.add_argument(
        "--shared-timeout", type=float, default=300.0, help="give the shared burst this long"
    )
    parser.add_argument("--skip-shared", action="store_true", help="webhook sections only")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.pods.split(",") if size.strip()]
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if not assets:
        print("set KUBEBUILDER_ASSETS=$(../shared/envtest/control-plane assets)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lgr-bench-webhook-"))
    cluster = Cluster(Path(assets), work / "k8s")
    (work / "k8s").mkdir()
    began = time.monotonic()
    load_before = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    cluster.start()
    print(f"control plane up in {cluster.startup_seconds:.1f}s", file=sys.stderr)
    sandbox = servers.start_sandbox()
    bao = servers.start_openbao(workdir=work)
    rows: list[Row] = []
    try:
        bench = Bench(cluster=cluster, sandbox=sandbox, bao=bao, work=work, threads=args.threads)
        for pods in sizes:
            for with_webhook in (False, True):
                rows.append(bench.api_burst(pods, with_webhook=with_webhook))
                print(rows[-1], file=sys.stderr)
            rows.append(bench.daemonset_webhook(pods))
            print(rows[-1], file=sys.stderr)
            if not args.skip_shared:
                rows.append(bench.daemonset_shared(pods, timeout=args.shared_timeout))
                print(rows[-1], file=sys.stderr)
    finally:
        sandbox.stop()
        bao.stop()
        cluster.stop()
    print()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs (load average {load} at the "
        f"end, {load_before} at the start), store: OpenBao, {args.threads} concurrent creates, "
        f"total {time.monotonic() - began:.0f}s"
    )
    print_table(rows)
    print_ratios(rows)
    for failure in bench.failures:
        print(f"CHECK FAILED: {failure}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ApiException as exc:
        import traceback

        traceback.print_exc(limit=8)
        print(f"Kubernetes API error: {exc.status} {exc.reason}", file=sys.stderr)
        sys.exit(1)
