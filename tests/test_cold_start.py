"""The one-shot paths stay light: what a cold ``lg-rotate rotate`` and ``emit`` import.

``rotate`` with a Kubernetes target runs for real, in a subprocess (OpenBao, the LinuxGuard
sandbox, a real API server), through a wrapper that runs lg-rotate's ``main()`` and then
records ``sys.modules``: a module imported any way at all (``importlib.import_module``, a
lazy package ``__getattr__``) is there, which ``python -X importtime`` alone would not
guarantee. No timing is asserted here: ``benchmarks/run.py`` (section 5) measures.

What must stay out of the one-shot path (rotator/kube/api.py says why): the official
client's generated API classes (``kubernetes.client.api.*``) and models
(``kubernetes.client.models.*``, pydantic models built at import), what
``kubernetes/__init__.py`` would import besides ``kubernetes.config`` (the dynamic client
and ``kubernetes_validate``, the websocket streams, watch, informer, leader election),
google-auth (the legacy ``gcp`` kubeconfig auth provider only), and ``prometheus_client``
(``watch`` and ``webhook`` serve metrics, nothing else).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from fixtures.cluster import Cluster

TENANT = "acme"
SECRETS = "v1/secrets"
FINGERPRINT_ANNOTATION = "linuxguard.io/token-sha256"

# Runs `lg-rotate ARGS` in this interpreter, then writes sys.modules (sorted) to OUT.
WRAPPER = textwrap.dedent(
    """
    import json, sys
    out, args = sys.argv[1], sys.argv[2:]
    sys.argv = ["lg-rotate", *args]
    from rotator.cli import main
    code = main(args)
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
    sys.exit(code)
    """
)

# Prefixes that must not be imported (a prefix ending in "." matches submodules only).
NEVER_ON_ONE_SHOT = (
    "kubernetes.client.api.",
    "kubernetes.client.models.",
    "kubernetes.dynamic",
    "kubernetes.stream",
    "kubernetes.watch",
    "kubernetes.informer",
    "kubernetes.leaderelection",
    "kubernetes_validate",
    "google.auth",
    "prometheus_client",
    "boto3",
    "botocore",
    "grpc",
)


def imported(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules of ``modules`` that ``prefixes`` name (a module or its submodules)."""
    return sorted(
        module
        for module in modules
        for prefix in prefixes
        if (module.startswith(prefix) if prefix.endswith(".") else module == prefix)
        or module.startswith(prefix.rstrip(".") + ".")
    )


def run_recording_modules(
    args: list[str], *, env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(out), *args],
        env=env,
        capture_output=True,  # stdout is a pipe: emit writes only into one
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    modules: list[str] = json.loads(out.read_text())
    return result, modules


@pytest.fixture
def cli_env(sandbox: Any, vault_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    base = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("LG_ROTATE_", "LINUXGUARD_", "KUBERNETES_", "VAULT_"))
        and key != "KUBECONFIG"
    }
    return {**base, **vault_env, "LINUXGUARD_API_KEY": sandbox.api_key}


def test_rotate_into_a_secret_imports_no_generated_api_class_nor_model(
    k8s: Cluster, k8s_namespace: str, sandbox: Any, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**cli_env, "KUBECONFIG": str(k8s.write_kubeconfig(tmp_path / "kubeconfig"))}
    args = [
        "rotate",
        "--provider", "vault",
        "--tenant", TENANT,
        "--linuxguard-url", sandbox.url,
        "--namespace", k8s_namespace,
        "-o", "json",
    ]  # fmt: skip
    first, _ = run_recording_modules(args, env=env, tmp_path=tmp_path)  # creates the Secret
    second, modules = run_recording_modules(args, env=env, tmp_path=tmp_path)  # patches it

    reports = [json.loads(result.stdout) for result in (first, second)]
    assert [report["action"] for report in reports] == ["minted", "minted"]
    assert reports[0]["targetExisted"] is False
    assert reports[1]["targetExisted"] is True
    secret = k8s.get(SECRETS, k8s_namespace, "linuxguard-enroll")
    assert secret is not None
    assert secret["metadata"]["annotations"][FINGERPRINT_ANNOTATION] == reports[1]["fingerprint"]
    # The run did go through the official client's plumbing...
    assert {"kubernetes.config.kube_config", "kubernetes.client.api_client", "hvac"} <= set(modules)
    # ...and through nothing else of it.
    assert imported(modules, NEVER_ON_ONE_SHOT) == []


def test_emit_imports_no_kubernetes_client(
    sandbox: Any, cli_env: dict[str, str], tmp_path: Path
) -> None:
    args = ["emit", "-o", "env", "--provider", "vault", "--tenant", TENANT]
    result, modules = run_recording_modules(
        [*args, "--linuxguard-url", sandbox.url], env=cli_env, tmp_path=tmp_path
    )
    assert result.stdout.startswith("LINUXGUARD_ENROLL_TOKEN=")
    assert "hvac" in modules
    assert imported(modules, ("kubernetes", *NEVER_ON_ONE_SHOT)) == []


def test_a_builtin_provider_loads_without_scanning_distributions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Plugins may not shadow a built-in, so loading one needs no entry-point scan (every
    installed distribution's metadata read, on every cold rotate and emit)."""
    from providers import registry

    def no_scan(path: tuple[str, ...]) -> dict[str, Any]:
        raise AssertionError("scanned the installed distributions")

    monkeypatch.setattr(registry, "_discover", no_scan)
    assert registry.load("vault").__name__ == "VaultProvider"


def test_the_deferred_kubernetes_package_still_works_whole() -> None:
    """After the light import, ordinary uses of the package (tests, ``audit --cluster``)
    still find everything: the package's own ``__init__`` runs on first need."""
    code = textwrap.dedent(
        """
        import sys
        from rotator.kube.api import official_client
        official_client()
        light = sorted(m for m in sys.modules if m.startswith("kubernetes"))
        assert "kubernetes.dynamic" not in light and "kubernetes.watch" not in light, light
        kube_config = sys.modules["kubernetes.config.kube_config"]
        assert "google.auth" not in sys.modules
        import kubernetes
        assert kubernetes.__version__  # the real __init__ runs here
        assert "kubernetes.dynamic" in sys.modules and "kubernetes.watch" in sys.modules
        from kubernetes import client, watch
        assert client.CoreV1Api and watch.Watch
        # The legacy gcp auth provider still finds google-auth, imported when used.
        assert kube_config.google_auth_available
        assert callable(kube_config.google.auth.default)
        assert "google.auth.transport.requests" in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
