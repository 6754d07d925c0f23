"""``lg-rotate audit``: find the vendor page's token-leaking anti-patterns.

Input is Kubernetes manifests (files, directories, ``-`` for stdin; multi-document YAML, Helm
or kustomize output, ``kind: List``), Docker Compose files, or with ``--cluster`` the objects
of a live cluster (pods, workloads, ConfigMaps, and the annotations of the enrolment Secrets,
read as metadata only). Every rule (:data:`RULES`, documented in docs/AUDIT.md) yields
findings with a location (``file:line`` or ``namespace/Kind/name``), a severity and a fix.

A token value never appears in a finding: literal values are described by their length and
SHA-256 fingerprint only, and every text goes through the token-shaped redaction on its way
out as a second line of defence.

Layers: the rules work on plain dictionaries (the API's JSON shape), so manifests and the
cluster share them; the ``kubernetes`` client is imported inside the ``--cluster`` path only.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import itertools
import json
import logging
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from rotator import __version__
from rotator.durations import format_duration, parse_whole_seconds
from rotator.errors import ConfigError, ExitCode, KubernetesError, TokenFormatError
from rotator.tokens import REDACTED, TOKEN_SHAPED, fingerprint, normalize, parse_timestamp, utcnow

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

log = logging.getLogger("lg_rotate.audit")

TOKEN_ENV = "LINUXGUARD_ENROLL_TOKEN"  # noqa: S105 (a variable name)
TENANT_ENV = "LINUXGUARD_TENANT_ID"
NODE_ENV = "LINUXGUARD_NODE_NAME"
POD_UID_ENV = "LINUXGUARD_POD_UID"
EXPIRES_AT = "linuxguard.io/expires-at"
ROTATED_AT = "linuxguard.io/rotated-at"
DEFAULT_SECRET = "linuxguard-enroll"  # noqa: S105 (a Secret name)
DEFAULT_TTL_SECONDS = 600
PER_POD_LABEL = "linuxguard.io/per-pod"  # rotator.kube.podsecrets (not imported: no kube here)


# --- rules ---------------------------------------------------------------------------------


class Severity(IntEnum):
    INFO = 0
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, kw_only=True)
class Rule:
    id: str
    name: str  # kebab-case, SARIF's rule name
    severity: Severity
    summary: str
    fix: str


RULES: dict[str, Rule] = {
    rule.id: rule
    for rule in (
        Rule(
            id="LG001",
            name="literal-token-env",
            severity=Severity.CRITICAL,
            summary="LINUXGUARD_ENROLL_TOKEN is set to a literal value",
            fix="take it from a Secret: env[].valueFrom.secretKeyRef (name linuxguard-enroll, "
            "key token), kept fresh by lg-rotate; rotate the leaked token now",
        ),
        Rule(
            id="LG002",
            name="token-in-argv",
            severity=Severity.CRITICAL,
            summary="the token is passed on the command line (--enroll-token)",
            fix="drop --enroll-token: the agent reads LINUXGUARD_ENROLL_TOKEN from its "
            "environment (valueFrom.secretKeyRef) and unsets it; argv is world-readable in "
            "/proc/<pid>/cmdline",
        ),
        Rule(
            id="LG003",
            name="token-in-configmap",
            severity=Severity.CRITICAL,
            summary="an enrolment token is stored in a ConfigMap",
            fix="move it to the Secret lg-rotate manages (ConfigMaps are readable by anyone "
            "with configmaps/get and end up in git); rotate the leaked token now",
        ),
        Rule(
            id="LG004",
            name="token-from-configmap",
            severity=Severity.HIGH,
            summary="the token reaches the agent from a ConfigMap (configMapKeyRef / envFrom)",
            fix="reference the Secret instead: env[].valueFrom.secretKeyRef for "
            "LINUXGUARD_ENROLL_TOKEN and LINUXGUARD_TENANT_ID",
        ),
        Rule(
            id="LG005",
            name="wrapper-before-agent",
            severity=Severity.HIGH,
            summary="a shell, init script or other process gets the token before the agent",
            fix="remove command/entrypoint wrappers and init steps that see the token; let "
            "the image's exec-form ENTRYPOINT start the agent directly (it unsets the token "
            "at once; a wrapper keeps it in its own /proc/<pid>/environ)",
        ),
        Rule(
            id="LG006",
            name="token-env-file",
            severity=Severity.HIGH,
            summary="the token is written to or read from an env file",
            fix="no env files: use valueFrom.secretKeyRef in Kubernetes; with Docker, "
            "`lg-rotate exec -- docker run -e LINUXGUARD_ENROLL_TOKEN ...` (name only)",
        ),
        Rule(
            id="LG007",
            name="rotation-slower-than-ttl",
            severity=Severity.HIGH,
            summary="the rotation interval is not shorter than the token TTL",
            fix="rotate more often than the tenant's token TTL (e.g. */5 * * * * for a "
            "600 s TTL), or pass the real TTL (--ttl / LG_ROTATE_TTL)",
        ),
        Rule(
            id="LG008",
            name="secret-token-expired",
            severity=Severity.HIGH,
            summary="the Secret's token has outlived its TTL",
            fix="check the rotation CronJob / lg-rotate watch (kubectl get jobs, logs); run "
            "`lg-rotate rotate` now; new agent pods fail to enrol (400) until then",
        ),
        Rule(
            id="LG009",
            name="rotation-concurrency",
            severity=Severity.MEDIUM,
            summary="the rotation CronJob lacks concurrencyPolicy: Forbid",
            fix="set spec.concurrencyPolicy: Forbid so that two rotations never overlap",
        ),
        Rule(
            id="LG010",
            name="token-reused-across-pods",
            severity=Severity.HIGH,
            summary="pods would share one token: no rotation is in place for their Secret",
            fix="rotate per pod: deploy cronjob/ (lg-rotate CronJob + `lg-rotate watch`) for "
            "this Secret; a token baked in at bootstrap enrols the first pod only (409 after)",
        ),
        Rule(
            id="LG011",
            name="token-in-secret-manifest",
            severity=Severity.CRITICAL,
            summary="a Secret manifest carries a literal enrolment token",
            fix="never commit token values: ship the Secret without data and let lg-rotate "
            "fill it (cronjob/base/secret.yaml); rotate the leaked token now",
        ),
        Rule(
            id="LG012",
            name="missing-tenant-id",
            severity=Severity.MEDIUM,
            summary="the agent gets a token but no LINUXGUARD_TENANT_ID",
            fix="add LINUXGUARD_TENANT_ID from the same Secret (secretKeyRef key tenant-id); "
            "TOTP enrolment fails with 400 'tenantId required' without it",
        ),
        Rule(
            id="LG013",
            name="missing-workload-identity",
            severity=Severity.MEDIUM,
            summary="the agent has no per-pod workload identity",
            fix="add LINUXGUARD_NODE_NAME (fieldRef spec.nodeName) and LINUXGUARD_POD_UID "
            "(fieldRef metadata.uid) from the Downward API, or --workload-id",
        ),
        # The per-pod mode: lg-rotate's admission webhook (docs/PER-POD.md).
        Rule(
            id="LG014",
            name="webhook-failure-without-fallback",
            severity=Severity.HIGH,
            summary="the per-pod webhook can let agent pods onto the shared Secret with no "
            "per-start rotation behind it",
            fix="keep failurePolicy: Fail with the webhook's default --on-failure=deny; use "
            "failurePolicy: Ignore only with --on-failure=admit and `lg-rotate watch` running "
            "for the shared Secret (cronjob/base), which rotates it after every pod start",
        ),
        Rule(
            id="LG015",
            name="webhook-side-effects",
            severity=Severity.MEDIUM,
            summary="the per-pod webhook does not declare sideEffects None or NoneOnDryRun",
            fix="set sideEffects: NoneOnDryRun (lg-rotate webhook mints, stores and creates "
            "nothing for a dry run); with Some or Unknown every `kubectl --dry-run=server` of "
            "an agent pod is refused",
        ),
        Rule(
            id="LG016",
            name="webhook-unscoped",
            severity=Severity.MEDIUM,
            summary="the per-pod webhook is not limited to the agent's pods and namespace",
            fix="set objectSelector to the agent's pod labels (app: linuxguard-agent) and "
            "namespaceSelector to the agents' namespace: every other pod create then never "
            "waits on (or, with failurePolicy Fail, fails with) the webhook",
        ),
        Rule(
            id="LG017",
            name="webhook-timeout",
            severity=Severity.MEDIUM,
            summary="the per-pod webhook's timeoutSeconds does not fit its admission budget",
            fix="timeoutSeconds: 10 with the webhook's --admission-budget below it (8s by "
            "default), so that the webhook's own answer (deny, or admit with --on-failure "
            "admit) arrives before the API server gives up and applies failurePolicy",
        ),
    )
}


# --- findings --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Location:
    file: str | None = None  # None for cluster objects
    line: int | None = None
    namespace: str | None = None
    kind: str | None = None
    name: str | None = None
    field: str | None = None  # dotted path inside the object
    source: str | None = None  # Helm's "# Source:" template, when there is one

    @property
    def resource(self) -> str:
        parts = [self.namespace] if self.namespace else []
        parts.append(f"{self.kind or '?'}/{self.name or '?'}")
        return "/".join(parts)

    def __str__(self) -> str:
        if self.file is None:
            return self.resource
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.name:
            where += f" ({self.kind or '?'}/{self.name})"
        return where

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class Finding:
    rule: Rule
    location: Location
    message: str

    @property
    def severity(self) -> Severity:
        return self.rule.severity

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.id,
            "name": self.rule.name,
            "severity": self.severity.label,
            "message": redact(self.message),
            "fix": self.rule.fix,
            "location": {
                key: redact(str(v)) if isinstance(v, str) else v
                for key, v in self.location.to_json().items()
            },
        }


def redact(text: str) -> str:
    """Second line of defence: nothing token-shaped leaves the audit."""
    return TOKEN_SHAPED.sub(REDACTED, text)


def describe_value(value: object) -> str:
    """A literal described without showing it: its length and fingerprint."""
    text = str(value).strip()
    try:
        canonical = normalize(text).reveal()
    except TokenFormatError:  # not a token: fingerprint the raw text
        canonical = text
    digest = fingerprint(canonical) if canonical.isascii() else "non-ascii"
    return f"a literal of {len(text)} characters, sha256 {digest[:12]}"


def looks_like_token(value: object) -> bool:
    if not isinstance(value, str):
        return False
    text = value.strip()
    if not text or TOKEN_SHAPED.fullmatch(text.upper()) is None:
        return False
    try:
        normalize(text)
    except TokenFormatError:
        return False
    return True


# --- documents -------------------------------------------------------------------------------

Path_ = tuple[str | int, ...]


@dataclass(kw_only=True)
class Document:
    """One object (a manifest document, a List item or a cluster object) and its lines."""

    data: dict[str, Any]
    file: str | None  # None for cluster objects
    lines: dict[Path_, int] = field(default_factory=dict)
    base: Path_ = ()  # where ``data`` sits in its file's document (List items)
    source: str | None = None

    @property
    def kind(self) -> str:
        return str(self.data.get("kind") or ("Compose" if is_compose(self.data) else ""))

    @property
    def name(self) -> str:
        return str(_get(self.data, "metadata", "name") or "")

    @property
    def namespace(self) -> str | None:
        value = _get(self.data, "metadata", "namespace")
        return str(value) if value else None

    def line_of(self, path: Path_) -> int | None:
        full = self.base + tuple(path)
        for end in range(len(full), -1, -1):
            line = self.lines.get(full[:end])
            if line is not None:
                return line
        return None

    def location(self, path: Path_ = ()) -> Location:
        return Location(
            file=self.file,
            line=self.line_of(path) if self.file is not None else None,
            namespace=self.namespace,
            kind=self.kind or None,
            name=self.name or None,
            field=dotted(path) or None,
            source=self.source,
        )


def dotted(path: Path_) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _get(data: Any, *keys: str | int) -> Any:
    for key in keys:
        if isinstance(key, int):
            if not isinstance(data, list) or key >= len(data):
                return None
            data = data[key]
        elif isinstance(data, dict):
            data = data.get(key)
        else:
            return None
    return data


def is_compose(data: Mapping[str, Any]) -> bool:
    return "kind" not in data and isinstance(data.get("services"), dict)


def _node_lines(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                child = (*path, key_node.value)
                lines[child] = key_node.start_mark.line + 1
                _node_lines(value_node, child, lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _node_lines(item, (*path, index), lines)


_HELM_SOURCE = re.compile(r"^# Source: (.+)$", re.MULTILINE)


def load_text(text: str, *, file: str) -> list[Document]:
    """Parse multi-document YAML (or JSON) into documents; List kinds are expanded."""
    sources = [
        (text.count("\n", 0, m.start()) + 1, m.group(1).strip())
        for m in _HELM_SOURCE.finditer(text)
    ]
    source_lines = [line for line, _ in sources]
    documents: list[Document] = []
    loader = yaml.SafeLoader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            data = loader.construct_document(node)
            if not isinstance(data, dict):
                continue
            lines: dict[Path_, int] = {}
            _node_lines(node, (), lines)
            start = node.start_mark.line + 1
            index = bisect.bisect_right(source_lines, start) - 1
            source = sources[index][1] if index >= 0 else None
            documents.extend(_expand(data, file=file, lines=lines, source=source))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(
            f"cannot parse {where}: {redact(str(problem))}",
            fix="pass rendered manifests (helm template / kubectl kustomize output), not templates",
        ) from None  # the YAML error quotes the document, which may hold a token
    finally:
        loader.dispose()
    return documents


def _expand(
    data: dict[str, Any], *, file: str, lines: dict[Path_, int], source: str | None
) -> Iterator[Document]:
    items = data.get("items")
    if str(data.get("kind", "")).endswith("List") and isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict):
                yield Document(
                    data=item, file=file, lines=lines, base=("items", index), source=source
                )
        return
    yield Document(data=data, file=file, lines=lines, source=source)


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def load_paths(paths: Sequence[str], *, stdin: TextIO | None = None) -> list[Document]:
    """Documents from files, directories (recursively) and ``-`` (stdin)."""
    documents: list[Document] = []
    for given in paths:
        if given == "-":
            text = (stdin or sys.stdin).read()
            documents.extend(load_text(text, file="<stdin>"))
            continue
        path = Path(given)
        if path.is_dir():
            for file in _walk(path):
                documents.extend(load_text(_read(file), file=str(file)))
        elif path.exists():
            documents.extend(load_text(_read(path), file=str(path)))
        else:
            raise ConfigError(f"{given}: no such file or directory", fix="check the path")
    return documents


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {type(exc).__name__}", fix="check the path and permissions"
        ) from exc


def _walk(directory: Path) -> Iterator[Path]:
    """YAML files under a directory, minus the patch files its kustomizations name.

    A kustomize patch is a fragment (a CronJob patch has no concurrencyPolicy): auditing it
    as a whole object would report what the rendered output does not have.
    """
    skipped: set[Path] = set()
    for kustomization in directory.rglob("kustomization.y*ml"):
        try:
            spec = yaml.safe_load(kustomization.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            continue
        for patch in [
            *spec.get("patches", []),
            *spec.get("patchesStrategicMerge", []),
            *spec.get("patchesJson6902", []),
        ]:
            target = patch.get("path") if isinstance(patch, dict) else patch
            if isinstance(target, str) and "\n" not in target:
                skipped.add((kustomization.parent / target).resolve())
    for path in sorted(directory.rglob("*")):
        if path.suffix in YAML_SUFFIXES and path.is_file() and path.resolve() not in skipped:
            if any(part.startswith(".") for part in path.relative_to(directory).parts):
                continue
            yield path


# --- containers --------------------------------------------------------------------------------

POD_SPEC_PATHS: dict[str, Path_] = {
    "Pod": ("spec",),
    "PodTemplate": ("template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
WORKLOAD_POD_SPEC: Path_ = ("spec", "template", "spec")  # Deployment, DaemonSet, Job, ...
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")


@dataclass(frozen=True, kw_only=True)
class EnvVar:
    name: str
    path: Path_
    value: str | None = None  # a literal (value: / compose environment)
    secret: tuple[str, str] | None = None  # (Secret name, key)
    config_map: tuple[str, str] | None = None  # (ConfigMap name, key)
    field_path: str | None = None  # Downward API


@dataclass(frozen=True, kw_only=True)
class EnvFrom:
    kind: str  # "Secret" | "ConfigMap"
    name: str
    prefix: str
    path: Path_


@dataclass(kw_only=True)
class Container:
    doc: Document
    path: Path_
    name: str
    image: str
    command: list[str] | None
    args: list[str] | None
    env: list[EnvVar]
    env_from: list[EnvFrom]
    init: bool = False
    compose_entrypoint: bool = False  # compose: `command` replaces CMD, `entrypoint` ENTRYPOINT
    env_files: list[tuple[str, Path_]] = field(default_factory=list)  # compose env_file
    mounts: list[tuple[str, Path_]] = field(default_factory=list)  # mountPath/subPath

    def location(self, path: Path_) -> Location:
        location = self.doc.location(path)
        if self.compose_entrypoint:  # a compose file: the service is the object
            return replace(location, kind="service", name=self.name)
        return location

    @property
    def argv(self) -> list[str]:
        return [*(self.command or []), *(self.args or [])]

    def env_named(self, name: str) -> list[EnvVar]:
        return [var for var in self.env if var.name == name]

    @property
    def namespace(self) -> str:
        return self.doc.namespace or "default"


def pod_spec_path(doc: Document) -> Path_ | None:
    path = POD_SPEC_PATHS.get(doc.kind, WORKLOAD_POD_SPEC)
    spec = _get(doc.data, *path)
    if isinstance(spec, dict) and isinstance(spec.get("containers"), list):
        return path
    return None


def containers_of(doc: Document) -> list[Container]:
    if is_compose(doc.data):
        return list(_compose_containers(doc))
    spec_path = pod_spec_path(doc)
    if spec_path is None:
        return []
    spec = _get(doc.data, *spec_path)
    found: list[Container] = []
    for list_name in CONTAINER_LISTS:
        for index, raw in enumerate(spec.get(list_name) or []):
            if isinstance(raw, dict):
                found.append(
                    _k8s_container(
                        doc, (*spec_path, list_name, index), raw, init=list_name == "initContainers"
                    )
                )
    return found


def _strings(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def _k8s_container(doc: Document, path: Path_, raw: dict[str, Any], *, init: bool) -> Container:
    env: list[EnvVar] = []
    for index, item in enumerate(raw.get("env") or []):
        if not isinstance(item, dict) or "name" not in item:
            continue
        item_path = (*path, "env", index)
        source = item.get("valueFrom") or {}
        secret = source.get("secretKeyRef") if isinstance(source, dict) else None
        config_map = source.get("configMapKeyRef") if isinstance(source, dict) else None
        field_ref = source.get("fieldRef") if isinstance(source, dict) else None
        env.append(
            EnvVar(
                name=str(item["name"]),
                path=item_path,
                value=None if item.get("value") is None else str(item.get("value")),
                secret=(str(secret.get("name", "")), str(secret.get("key", "")))
                if isinstance(secret, dict)
                else None,
                config_map=(str(config_map.get("name", "")), str(config_map.get("key", "")))
                if isinstance(config_map, dict)
                else None,
                field_path=str(field_ref.get("fieldPath", ""))
                if isinstance(field_ref, dict)
                else None,
            )
        )
    env_from: list[EnvFrom] = []
    for index, item in enumerate(raw.get("envFrom") or []):
        if not isinstance(item, dict):
            continue
        for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
            ref = item.get(key)
            if isinstance(ref, dict):
                env_from.append(
                    EnvFrom(
                        kind=kind,
                        name=str(ref.get("name", "")),
                        prefix=str(item.get("prefix") or ""),
                        path=(*path, "envFrom", index),
                    )
                )
    mounts = [
        (str(m.get("subPath") or m.get("mountPath") or ""), (*path, "volumeMounts", index))
        for index, m in enumerate(raw.get("volumeMounts") or [])
        if isinstance(m, dict)
    ]
    return Container(
        doc=doc,
        path=path,
        name=str(raw.get("name", "")),
        image=str(raw.get("image", "")),
        command=_strings(raw.get("command")),
        args=_strings(raw.get("args")),
        env=env,
        env_from=env_from,
        init=init,
        mounts=mounts,
    )


def _compose_containers(doc: Document) -> Iterator[Container]:
    for service, raw in (doc.data.get("services") or {}).items():
        if not isinstance(raw, dict):
            continue
        path: Path_ = ("services", str(service))
        env: list[EnvVar] = []
        environment = raw.get("environment")
        if isinstance(environment, dict):
            for name, value in environment.items():
                env.append(
                    EnvVar(
                        name=str(name),
                        path=(*path, "environment", str(name)),
                        value=None if value is None else str(value),
                    )
                )
        elif isinstance(environment, list):
            for index, item in enumerate(environment):
                name, sep, value = str(item).partition("=")
                env.append(
                    EnvVar(
                        name=name, path=(*path, "environment", index), value=value if sep else None
                    )
                )
        env_files_raw = raw.get("env_file")
        env_files: list[tuple[str, Path_]] = []
        for index, item in enumerate(
            env_files_raw
            if isinstance(env_files_raw, list)
            else [env_files_raw]
            if env_files_raw
            else []
        ):
            file = item.get("path") if isinstance(item, dict) else item
            env_files.append((str(file), (*path, "env_file", index)))
        yield Container(
            doc=doc,
            path=path,
            name=str(service),
            image=str(raw.get("image", "")),
            command=_shell_words(raw.get("entrypoint")),
            args=_shell_words(raw.get("command")),
            env=env,
            env_from=[],
            compose_entrypoint=True,
            env_files=env_files,
        )


def _shell_words(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError:
            return value.split()
    return [str(item) for item in value] if isinstance(value, list) else None


ROTATOR_IMAGE = re.compile(r"(^|/)(lg-rotate|linuxguard-rotator)([:@]|$)")
AGENT_IMAGE = re.compile(r"linuxguard[-_/]?agent")


def is_rotator(container: Container) -> bool:
    """lg-rotate's own container: by image name, argv[0], or the app.kubernetes.io/name
    label that cronjob/ puts on its objects (so a renamed image is still recognised)."""
    image = container.image.split("@")[0]
    if ROTATOR_IMAGE.search(image):
        return True
    if _get(container.doc.data, "metadata", "labels", "app.kubernetes.io/name") == "lg-rotate":
        return True
    argv = container.argv
    return bool(argv) and Path(argv[0]).name == "lg-rotate"


def is_agent(container: Container) -> bool:
    if is_rotator(container):
        return False
    if any(var.name in (TOKEN_ENV, TENANT_ENV) for var in container.env):
        return True
    if AGENT_IMAGE.search(container.image):
        return True
    return any(
        "linuxguard-agent" in word or word.startswith("--enroll-token") for word in container.argv
    )


# --- the audit context --------------------------------------------------------------------


@dataclass(kw_only=True)
class Rotation:
    """Something that keeps a Secret fresh: an lg-rotate workload or an ExternalSecret."""

    namespace: str
    secret: str
    doc: Document
    container: Container | None = None
    schedule_path: Path_ | None = None  # CronJobs
    command: str = "rotate"
    ttl_seconds: int | None = None


@dataclass(kw_only=True)
class Audit:
    documents: list[Document]
    token_ttl: int = DEFAULT_TTL_SECONDS
    now: datetime = field(default_factory=utcnow)
    cluster: bool = False
    findings: list[Finding] = field(default_factory=list)
    # Cluster mode: the metadata of the Secrets that were read, by (namespace, name).
    secret_metadata: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.containers = [c for doc in self.documents for c in containers_of(doc)]
        self.objects: dict[tuple[str, str, str], list[Document]] = {}
        for doc in self.documents:
            if doc.kind and doc.name:
                key = (doc.kind, doc.namespace or "default", doc.name)
                self.objects.setdefault(key, []).append(doc)
        self.rotations = list(_rotations(self))

    def add(self, rule_id: str, location: Location, message: str) -> None:
        finding = Finding(rule=RULES[rule_id], location=location, message=redact(message))
        if finding not in self.findings:
            self.findings.append(finding)

    def lookup(self, kind: str, namespace: str, name: str, *, near: Document) -> Document | None:
        """An object of the input by name; one from ``near``'s own file first (a directory
        may hold several variants of the same object)."""
        candidates = self.objects.get((kind, namespace, name)) or []
        for doc in candidates:
            if doc.file == near.file:
                return doc
        return candidates[0] if candidates else None

    def env_value(self, container: Container, name: str) -> str | None:
        """A variable's literal value, looked up through envFrom ConfigMaps in the input too."""
        for var in container.env_named(name):
            if var.value is not None:
                return var.value
        for ref in container.env_from:
            if ref.kind == "ConfigMap" and name.startswith(ref.prefix):
                doc = self.lookup("ConfigMap", container.namespace, ref.name, near=container.doc)
                value = _get(doc.data, "data", name[len(ref.prefix) :]) if doc else None
                if value is not None:
                    return str(value)
        return None


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for index, word in enumerate(argv):
        if word == flag and index + 1 < len(argv):
            return argv[index + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


def _rotator_command(container: Container) -> str:
    argv = container.argv
    words = argv[1:] if argv and Path(argv[0]).name == "lg-rotate" else argv
    if words and not words[0].startswith("-"):
        return words[0]
    return "rotate"  # flags first, or nothing: lg-rotate's default command is rotate


def _rotations(audit: Audit) -> Iterator[Rotation]:
    for container in audit.containers:
        if not is_rotator(container) or container.init:
            continue
        command = _rotator_command(container)
        if command not in ("rotate", "watch"):
            continue
        secret = (
            _flag_value(container.argv, "--secret")
            or audit.env_value(container, "LG_ROTATE_SECRET")
            or DEFAULT_SECRET
        )
        namespace = (
            _flag_value(container.argv, "--namespace")
            or _flag_value(container.argv, "-n")
            or _literal_namespace(audit, container)
            or container.namespace
        )
        ttl_text = _flag_value(container.argv, "--ttl") or audit.env_value(
            container, "LG_ROTATE_TTL"
        )
        ttl = _ttl_seconds(ttl_text)
        doc = container.doc
        yield Rotation(
            namespace=namespace,
            secret=secret,
            doc=doc,
            container=container,
            schedule_path=("spec", "schedule") if doc.kind == "CronJob" else None,
            command=command,
            ttl_seconds=ttl,
        )
    for doc in audit.documents:
        if doc.kind == "ExternalSecret" and str(doc.data.get("apiVersion", "")).startswith(
            "external-secrets.io/"
        ):
            target = _get(doc.data, "spec", "target", "name") or doc.name
            yield Rotation(
                namespace=doc.namespace or "default",
                secret=str(target),
                doc=doc,
                command="external-secret",
            )


def _ttl_seconds(text: str | None) -> int | None:
    """A rotation's --ttl / LG_ROTATE_TTL: ``600`` or ``10m`` (lg-rotate's durations)."""
    try:
        return parse_whole_seconds(text) if text else None
    except ValueError:
        return None


def _literal_namespace(audit: Audit, container: Container) -> str | None:
    value = audit.env_value(container, "LG_ROTATE_NAMESPACE")
    return value or None  # a fieldRef (the pod's own namespace) is the container's namespace


# --- the rules ----------------------------------------------------------------------------------

SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh", "busybox", "fish"})
INIT_WRAPPERS = frozenset(
    {
        "tini",
        "dumb-init",
        "s6-svscan",
        "supervisord",
        "runsvdir",
        "catatonit",
        "init",
        "su-exec",
        "gosu",
        "env",
        "entrypoint",
        "docker-entrypoint",
        "start",
        "run",
    }
)
ENV_FILE_IN_TEXT = re.compile(
    r"--env-file\b|(?:^|[\s;&|(])(?:source|\.)\s+\S*\.env\b|\benv_file\b|set -a\b", re.MULTILINE
)
TOKEN_ASSIGNMENT = re.compile(
    r"(?:LINUXGUARD_ENROLL_TOKEN|enroll[-_]?token)\s*[=:]\s*['\"]?([^\s'\"$]\S*)", re.IGNORECASE
)
TOKEN_KEY = re.compile(r"(?i)^(LINUXGUARD_ENROLL_TOKEN|.*enroll[-_.]?token.*)$")


def check_env_literals(audit: Audit) -> None:
    """LG001: a literal token in env (Kubernetes `value:`, compose `environment:`)."""
    for container in audit.containers:
        for var in container.env:
            value = (var.value or "").strip()
            if not value or _is_reference(value, compose=container.compose_entrypoint):
                continue
            token_named = var.name == TOKEN_ENV or (
                re.search(r"(?i)enroll|token", var.name) is not None and looks_like_token(value)
            )
            if token_named:
                path = var.path if container.compose_entrypoint else (*var.path, "value")
                audit.add(
                    "LG001",
                    container.location(path),
                    f"{var.name} in container {container.name!r} is {describe_value(value)}",
                )


def _is_reference(value: str, *, compose: bool) -> bool:
    if re.fullmatch(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", value):  # Kubernetes $(OTHER_VAR)
        return True
    return (
        compose
        and re.fullmatch(r"\$\{?[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}?", value) is not None
    )


def check_argv(audit: Audit) -> None:
    """LG002: --enroll-token, a token-shaped word or $(LINUXGUARD_ENROLL_TOKEN) in argv."""
    for container in audit.containers:
        for key, words in (("command", container.command), ("args", container.args)):
            if not words:
                continue
            key_path = (
                ("entrypoint" if key == "command" else "command")
                if container.compose_entrypoint
                else key
            )
            for index, word in enumerate(words):
                path = (*container.path, key_path, index)
                if re.search(r"--enroll-token\b", word):
                    audit.add(
                        "LG002",
                        container.location(path),
                        f"container {container.name!r} passes --enroll-token in {key}",
                    )
                elif _expands_token(word, compose=container.compose_entrypoint):
                    audit.add(
                        "LG002",
                        container.location(path),
                        f"container {container.name!r} expands {TOKEN_ENV} into its {key}",
                    )
                elif TOKEN_SHAPED.search(word) and is_agent(container):
                    audit.add(
                        "LG002",
                        container.location(path),
                        f"container {container.name!r} has a token-shaped word in {key}",
                    )


def _expands_token(word: str, *, compose: bool) -> bool:
    """The kubelet expands $(VAR) in command/args; compose expands $VAR / ${VAR}. (A shell
    expanding "$VAR" inside its script is another matter: its own argv keeps the name.)"""
    if f"$({TOKEN_ENV})" in word:
        return True
    return compose and re.search(rf"\$\{{?{TOKEN_ENV}\b", word) is not None


def check_config_maps(audit: Audit) -> None:
    """LG003 (token in a ConfigMap), LG006 (an env file in a ConfigMap or Secret), LG001 for
    `docker run -e LINUXGUARD_ENROLL_TOKEN=literal` in a script."""
    for doc in audit.documents:
        if doc.kind not in ("ConfigMap", "Secret"):
            continue
        for section in ("data", "stringData", "binaryData"):
            entries = doc.data.get(section)
            if not isinstance(entries, dict):
                continue
            for key, raw in entries.items():
                text = _decoded(raw) if doc.kind == "Secret" and section == "data" else str(raw)
                if text is None:
                    continue
                _check_entry(audit, doc, (section, str(key)), str(key), text)


def _check_entry(audit: Audit, doc: Document, path: Path_, key: str, text: str) -> None:
    assignment = TOKEN_ASSIGNMENT.search(text)
    env_file = key.endswith(".env") or key in ("env", ".env", "environment")
    if env_file and (assignment or TOKEN_ENV in text):
        audit.add(
            "LG006",
            doc.location(path),
            f"{doc.kind} key {key!r} is an env file carrying {TOKEN_ENV}",
        )
        return
    if doc.kind != "ConfigMap":
        return
    if TOKEN_KEY.match(key) and text.strip():
        audit.add(
            "LG003", doc.location(path), f"ConfigMap key {key!r} holds {describe_value(text)}"
        )
    elif assignment and not assignment.group(1).startswith("$"):
        if re.search(r"docker\s+run|podman\s+run", text) and f"-e {TOKEN_ENV}=" in text:
            audit.add(
                "LG001",
                doc.location(path),
                f"ConfigMap key {key!r} runs a container with -e {TOKEN_ENV}=<literal>",
            )
        else:
            audit.add(
                "LG003",
                doc.location(path),
                f"ConfigMap key {key!r} assigns an enrolment token "
                f"({describe_value(assignment.group(1))})",
            )
    elif "token" in key.lower() and looks_like_token(text):
        audit.add(
            "LG003", doc.location(path), f"ConfigMap key {key!r} holds {describe_value(text)}"
        )
    if ENV_FILE_IN_TEXT.search(text) and TOKEN_ENV in text:
        audit.add(
            "LG006",
            doc.location(path),
            f"ConfigMap key {key!r} is a script that passes {TOKEN_ENV} via an env file",
        )


def _decoded(value: Any) -> str | None:
    try:
        return base64.b64decode(str(value), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def check_config_map_refs(audit: Audit) -> None:
    """LG004: the token from a ConfigMap (configMapKeyRef, or envFrom a ConfigMap)."""
    for container in audit.containers:
        for var in container.env_named(TOKEN_ENV):
            if var.config_map:
                audit.add(
                    "LG004",
                    container.location(var.path),
                    f"{TOKEN_ENV} in container {container.name!r} comes from ConfigMap "
                    f"{var.config_map[0]!r} (configMapKeyRef)",
                )
        gets_token = any(var.name == TOKEN_ENV for var in container.env)
        for ref in container.env_from:
            if ref.kind != "ConfigMap":
                continue
            doc = audit.lookup("ConfigMap", container.namespace, ref.name, near=container.doc)
            keys = [str(k) for k in (_get(doc.data, "data") or {})] if doc else []
            if any(ref.prefix + key == TOKEN_ENV or TOKEN_KEY.match(key) for key in keys):
                audit.add(
                    "LG004",
                    container.location(ref.path),
                    f"container {container.name!r} takes the token from ConfigMap "
                    f"{ref.name!r} (envFrom)",
                )
            elif (
                doc is None
                and is_agent(container)
                and not gets_token
                and not any(r.kind == "Secret" for r in container.env_from)
            ):
                audit.add(
                    "LG004",
                    container.location(ref.path),
                    f"agent container {container.name!r} sets no {TOKEN_ENV}; it can only "
                    f"come from ConfigMap {ref.name!r} (envFrom)",
                )


def _receives_token(container: Container) -> bool:
    return any(var.name == TOKEN_ENV for var in container.env) or (
        is_agent(container) and bool(container.env_from)
    )


def check_wrappers(audit: Audit) -> None:
    """LG005: a shell, init script or other process sees the token before (or beside) the
    agent: a wrapper command, a `sh -c` in args, an init container or a postStart hook."""
    for container in audit.containers:
        if not (is_agent(container) or _receives_token(container)):
            continue
        if container.init:
            if _receives_token(container):
                audit.add(
                    "LG005",
                    container.location(container.path),
                    f"init container {container.name!r} receives {TOKEN_ENV} and runs "
                    "before the agent",
                )
            continue
        wrapper = _wrapper(container)
        if wrapper:
            key = (
                ("entrypoint" if container.compose_entrypoint else "command")
                if container.command
                else ("command" if container.compose_entrypoint else "args")
            )
            audit.add(
                "LG005",
                container.location((*container.path, key, 0)),
                f"container {container.name!r} starts {wrapper!r} before the agent",
            )
        hook = _get(container.doc.data, *container.path, "lifecycle", "postStart", "exec")
        if isinstance(hook, dict):
            audit.add(
                "LG005",
                container.location((*container.path, "lifecycle", "postStart")),
                f"container {container.name!r} runs a postStart exec hook, a process that "
                f"inherits {TOKEN_ENV}",
            )


def _wrapper(container: Container) -> str | None:
    command = container.command or []
    if command:
        program = Path(command[0]).name
        if program in SHELLS or program in INIT_WRAPPERS or program.endswith(".sh"):
            return program
    args = container.args or []
    # Without a command the image's ENTRYPOINT runs; args that are a shell script still mean
    # a shell between the runtime and the agent (an ENTRYPOINT of "sh -c" style images).
    if args and Path(args[0]).name in SHELLS and "-c" in args[1:3]:
        return Path(args[0]).name
    if args and args[0].endswith(".sh"):
        return Path(args[0]).name
    return None


def check_env_files(audit: Audit) -> None:
    """LG006: an env file (compose env_file, --env-file or `source x.env` in argv, a mounted
    *.env file in the agent)."""
    for container in audit.containers:
        agent = is_agent(container)
        if container.env_files and (agent or _receives_token(container)):
            for file, path in container.env_files:
                audit.add(
                    "LG006",
                    container.location(path),
                    f"service {container.name!r} reads env file {file!r}",
                )
        text = " ".join(container.argv)
        if ENV_FILE_IN_TEXT.search(text) and (agent or TOKEN_ENV in text):
            audit.add(
                "LG006",
                container.location(container.path),
                f"container {container.name!r} loads an env file in its command",
            )
        if agent:
            for mount, path in container.mounts:
                if mount.endswith(".env"):
                    audit.add(
                        "LG006",
                        container.location(path),
                        f"agent container {container.name!r} mounts env file {mount!r}",
                    )


def check_rotations(audit: Audit) -> None:
    """LG007 (interval >= TTL or suspended) and LG009 (concurrencyPolicy)."""
    for rotation in audit.rotations:
        doc = rotation.doc
        if rotation.command == "external-secret":
            _check_external_secret(audit, rotation)
            continue
        if doc.kind != "CronJob" or rotation.command != "rotate":
            continue
        ttl = rotation.ttl_seconds or _cluster_ttl(audit, rotation) or audit.token_ttl
        schedule = str(_get(doc.data, "spec", "schedule") or "")
        if _get(doc.data, "spec", "suspend") is True:
            audit.add(
                "LG007",
                doc.location(("spec", "suspend")),
                f"rotation CronJob {doc.name!r} is suspended: Secret {rotation.secret!r} "
                "is not rotated",
            )
        try:
            gap = max_interval_seconds(schedule)
        except ValueError as exc:
            audit.add(
                "LG007",
                doc.location(("spec", "schedule")),
                f"rotation schedule {schedule!r} cannot be checked: {exc}",
            )
        else:
            if gap is None:
                audit.add(
                    "LG007",
                    doc.location(("spec", "schedule")),
                    f"rotation schedule {schedule!r} never fires: Secret {rotation.secret!r} "
                    "is not rotated",
                )
            elif gap >= ttl:
                audit.add(
                    "LG007",
                    doc.location(("spec", "schedule")),
                    f"rotation schedule {schedule!r} leaves up to {_human(gap)} between runs; "
                    f"the token lives {_human(ttl)}",
                )
        policy = _get(doc.data, "spec", "concurrencyPolicy")
        if policy != "Forbid":
            path = ("spec", "concurrencyPolicy") if policy else ("spec",)
            audit.add(
                "LG009",
                doc.location(path),
                f"rotation CronJob {doc.name!r} has concurrencyPolicy "
                f"{policy or 'Allow (default)'}",
            )


def _check_external_secret(audit: Audit, rotation: Rotation) -> None:
    doc = rotation.doc
    if not _consumed_as_token(audit, rotation.namespace, rotation.secret):
        return
    interval = _get(doc.data, "spec", "refreshInterval")
    seconds = parse_go_duration(str(interval)) if interval is not None else 3600
    if seconds is not None and seconds > 0 and seconds >= audit.token_ttl:
        audit.add(
            "LG007",
            doc.location(("spec", "refreshInterval")),
            f"ExternalSecret {doc.name!r} refreshes every {_human(seconds)}; the token "
            f"lives {_human(audit.token_ttl)}",
        )


def _cluster_ttl(audit: Audit, rotation: Rotation) -> int | None:
    annotations = (
        _get(audit.secret_metadata.get((rotation.namespace, rotation.secret)), "annotations") or {}
    )
    try:
        rotated = parse_timestamp(str(annotations[ROTATED_AT]))
        expires = parse_timestamp(str(annotations[EXPIRES_AT]))
    except (KeyError, ValueError):
        return None
    seconds = int((expires - rotated).total_seconds())
    return seconds if seconds > 0 else None


def _consumed_as_token(audit: Audit, namespace: str, secret: str) -> bool:
    return (
        any(
            var.secret and var.secret[0] == secret and c.namespace == namespace
            for c in audit.containers
            for var in c.env_named(TOKEN_ENV)
        )
        or secret == DEFAULT_SECRET
    )


def check_secret_expiry(audit: Audit) -> None:
    """LG008: a Secret whose linuxguard.io/expires-at (or rotated-at + TTL) is past."""
    secrets: list[tuple[str, dict[str, Any], Location]] = [
        (doc.name, doc.data.get("metadata") or {}, doc.location(("metadata", "annotations")))
        for doc in audit.documents
        if doc.kind == "Secret"
    ]
    listed = {(doc.namespace or "default", doc.name) for doc in audit.documents
              if doc.kind == "Secret"}  # fmt: skip
    for (namespace, name), metadata in audit.secret_metadata.items():
        if (namespace, name) not in listed:
            location = Location(
                namespace=namespace, kind="Secret", name=name, field="metadata.annotations"
            )
            secrets.append((name, metadata, location))
    for name, metadata, location in secrets:
        if (metadata.get("labels") or {}).get(PER_POD_LABEL) == "true":
            # A per-pod Secret keeps its token after its pod started (a restart replays it,
            # expired or not); watch refreshes it before expiry only until then.
            continue
        annotations = metadata.get("annotations") or {}
        expires: datetime | None = None
        try:
            if EXPIRES_AT in annotations:
                expires = parse_timestamp(str(annotations[EXPIRES_AT]))
            elif ROTATED_AT in annotations:
                expires = parse_timestamp(str(annotations[ROTATED_AT])) + timedelta(
                    seconds=audit.token_ttl
                )
        except ValueError:
            audit.add(
                "LG008",
                location,
                f"Secret {name!r} has an unreadable {EXPIRES_AT}/{ROTATED_AT} annotation",
            )
            continue
        if expires is not None and expires <= audit.now:
            ago = int((audit.now - expires).total_seconds())
            audit.add(
                "LG008",
                location,
                f"the token in Secret {name!r} expired {_human(ago)} ago "
                f"({expires.strftime('%Y-%m-%dT%H:%M:%SZ')})",
            )


def check_secret_literals(audit: Audit) -> None:
    """LG011: a token-shaped value in a Secret manifest (never in --cluster: data is not read)."""
    for doc in audit.documents:
        if doc.kind != "Secret" or doc.file is None:
            continue
        for section in ("data", "stringData"):
            for key, raw in (doc.data.get(section) or {}).items():
                text = _decoded(raw) if section == "data" else str(raw)
                if text is not None and looks_like_token(text):
                    audit.add(
                        "LG011",
                        doc.location((section, str(key))),
                        f"Secret {doc.name!r} key {key!r} is {describe_value(text)}",
                    )


def check_reuse(audit: Audit) -> None:
    """LG010: pods take their token from a Secret that nothing rotates."""
    rotated = {
        (r.namespace, r.secret)
        for r in audit.rotations
        if not (r.command == "external-secret" and _never_refreshes(r.doc))
    }
    for container in audit.containers:
        for var in container.env_named(TOKEN_ENV):
            if not var.secret or container.init:
                continue
            secret, key = var.secret
            namespace = container.namespace
            if (namespace, secret) in rotated:
                continue
            reason = _unrotated_reason(audit, namespace, secret, key, near=container.doc)
            if reason:
                audit.add(
                    "LG010",
                    container.location(var.path),
                    f"{container.doc.kind} {container.doc.name!r} takes {TOKEN_ENV} from "
                    f"Secret {secret!r}, which {reason}",
                )


def _never_refreshes(doc: Document) -> bool:
    interval = _get(doc.data, "spec", "refreshInterval")
    return interval is not None and parse_go_duration(str(interval)) == 0


def _unrotated_reason(
    audit: Audit, namespace: str, secret: str, key: str, *, near: Document
) -> str | None:
    for rotation in audit.rotations:
        if (rotation.namespace, rotation.secret) == (namespace, secret):
            return "an ExternalSecret with refreshInterval 0 fills once and never refreshes"
    doc = audit.lookup("Secret", namespace, secret, near=near)
    if doc is not None and doc.file is not None:
        value = _get(doc.data, "stringData", key) or _get(doc.data, "data", key)
        if value:
            return "carries a fixed token in the manifest and has no rotation in place"
        return None
    metadata = audit.secret_metadata.get((namespace, secret))
    if audit.cluster and metadata is not None:
        annotations = metadata.get("annotations") or {}
        owners = [o.get("kind") for o in metadata.get("ownerReferences") or []]
        managed = (
            ROTATED_AT in annotations
            or "ExternalSecret" in owners
            or any(str(k).startswith("reconcile.external-secrets.io/") for k in annotations)
        )
        if not managed:
            return "no lg-rotate workload or ExternalSecret rotates (no rotated-at annotation)"
    return None


def check_agent_inputs(audit: Audit) -> None:
    """LG012 (tenant ID missing) and LG013 (no per-pod workload identity)."""
    for container in audit.containers:
        if container.init or not container.env_named(TOKEN_ENV):
            continue
        location = container.location(
            (*container.path, "env")
            if not container.compose_entrypoint
            else (*container.path, "environment")
        )
        if (
            not _provides(audit, container, TENANT_ENV)
            and _flag_value(container.argv, "--tenant-id") is None
        ):
            audit.add(
                "LG012",
                location,
                f"container {container.name!r} gets {TOKEN_ENV} but no {TENANT_ENV}",
            )
        if _flag_value(container.argv, "--workload-id") is not None or _provides(
            audit, container, "LINUXGUARD_WORKLOAD_ID"
        ):
            continue
        if container.compose_entrypoint:
            continue  # compose: one container per service; identity is the host's business
        node = container.env_named(NODE_ENV)
        uid = container.env_named(POD_UID_ENV)
        if not node or not uid:
            audit.add(
                "LG013",
                location,
                f"container {container.name!r} has no {NODE_ENV}/{POD_UID_ENV} "
                "(Downward API) and no --workload-id",
            )
        elif uid[0].field_path != "metadata.uid":
            audit.add(
                "LG013",
                container.location(uid[0].path),
                f"{POD_UID_ENV} in container {container.name!r} is not the pod's "
                "metadata.uid: every pod would claim the same identity",
            )


def _provides(audit: Audit, container: Container, name: str) -> bool:
    if container.env_named(name):
        return True
    for ref in container.env_from:
        if not name.startswith(ref.prefix):
            continue
        doc = audit.lookup(ref.kind, container.namespace, ref.name, near=container.doc)
        if doc is None:
            return True  # not in the input: assume it provides the variable
        data = {**(_get(doc.data, "data") or {}), **(_get(doc.data, "stringData") or {})}
        if name[len(ref.prefix) :] in data:
            return True
    return False


# --- the per-pod webhook (LG014-LG017) --------------------------------------------------------

MAX_WEBHOOK_TIMEOUT = 10  # seconds: lg-rotate's budget for one admission (8 s) plus slack
DEFAULT_ADMISSION_BUDGET = 8.0
WEBHOOK_CONFIGURATION = "MutatingWebhookConfiguration"


def _is_lg_rotate_webhooks(doc: Document) -> bool:
    """A MutatingWebhookConfiguration of lg-rotate: by label, or by a name that says so."""
    if doc.kind != WEBHOOK_CONFIGURATION:
        return False
    if _get(doc.data, "metadata", "labels", "app.kubernetes.io/name") == "lg-rotate":
        return True
    names = [doc.name]
    for hook in doc.data.get("webhooks") or []:
        if isinstance(hook, dict):
            names += [
                str(hook.get("name") or ""),
                str(_get(hook, "clientConfig", "service", "name") or ""),
            ]
    return any("lg-rotate" in name for name in names)


def _webhook_setting(audit: Audit, container: Container, flag: str, env: str) -> str | None:
    return _flag_value(container.argv, flag) or audit.env_value(container, env)


def _seconds(text: str | None) -> float | None:
    if text is None:
        return None
    value = text.strip()
    try:
        return float(value)
    except ValueError:
        parsed = parse_go_duration(value)
        return float(parsed) if parsed is not None else None


def check_webhooks(audit: Audit) -> None:
    """LG014-LG017: the admission webhook configuration of the per-pod mode."""
    servers = [
        c for c in audit.containers
        if is_rotator(c) and not c.init and _rotator_command(c) == "webhook"
    ]  # fmt: skip
    for doc in audit.documents:
        if not _is_lg_rotate_webhooks(doc):
            continue
        for index, hook in enumerate(doc.data.get("webhooks") or []):
            if not isinstance(hook, dict):
                continue
            at: Path_ = ("webhooks", index)
            name = str(hook.get("name") or doc.name)
            service_ns = _get(hook, "clientConfig", "service", "namespace")
            mine = [c for c in servers if service_ns is None or c.namespace == service_ns]
            modes = {
                (_webhook_setting(audit, c, "--on-failure", "LG_ROTATE_ON_FAILURE") or "deny")
                for c in mine
            }
            watched = any(
                r.command == "watch" and (service_ns is None or r.namespace == service_ns)
                for r in audit.rotations
            )
            policy = str(hook.get("failurePolicy") or "Fail")
            if policy == "Ignore" and (not watched or "deny" in modes):
                why = (
                    "no `lg-rotate watch` rotates the shared Secret after each start"
                    if not watched
                    else "the webhook itself denies on failure (--on-failure deny): pick admit"
                )
                audit.add(
                    "LG014",
                    doc.location((*at, "failurePolicy")),
                    f"webhook {name!r} has failurePolicy Ignore: when it is unreachable, agent "
                    f"pods are created unchanged on the shared Secret, and {why}",
                )
            elif "admit" in modes and not watched:
                audit.add(
                    "LG014",
                    mine[0].location(mine[0].path),
                    f"webhook {name!r} runs with --on-failure admit: a pod it cannot serve "
                    "reads the shared Secret, and no `lg-rotate watch` rotates it after each "
                    "start",
                )
            effects = hook.get("sideEffects")
            if effects not in ("None", "NoneOnDryRun"):
                audit.add(
                    "LG015",
                    doc.location((*at, "sideEffects") if effects else at),
                    f"webhook {name!r} has sideEffects {effects or '(unset)'}",
                )
            for field_name, what in (
                ("objectSelector", "every pod, not only the agent's"),
                ("namespaceSelector", "pods of every namespace, kube-system's too"),
            ):
                selector = hook.get(field_name)
                if not isinstance(selector, dict) or not (
                    selector.get("matchLabels") or selector.get("matchExpressions")
                ):
                    audit.add(
                        "LG016",
                        doc.location((*at, field_name) if field_name in hook else at),
                        f"webhook {name!r} has no {field_name}: it is called for {what}",
                    )
            timeout = hook.get("timeoutSeconds", MAX_WEBHOOK_TIMEOUT)
            if isinstance(timeout, int) and timeout > MAX_WEBHOOK_TIMEOUT:
                audit.add(
                    "LG017",
                    doc.location((*at, "timeoutSeconds")),
                    f"webhook {name!r} waits up to {timeout}s per agent pod create (more than "
                    f"{MAX_WEBHOOK_TIMEOUT}s)",
                )
            for container in mine:
                budget = _seconds(
                    _webhook_setting(
                        audit, container, "--admission-budget", "LG_ROTATE_ADMISSION_BUDGET"
                    )
                )
                budget = DEFAULT_ADMISSION_BUDGET if budget is None else budget
                if isinstance(timeout, int) and budget >= timeout:
                    audit.add(
                        "LG017",
                        doc.location((*at, "timeoutSeconds") if "timeoutSeconds" in hook else at),
                        f"webhook {name!r} has timeoutSeconds {timeout} but lg-rotate webhook "
                        f"answers within {budget:g}s: the API server gives up first",
                    )


CHECKS: tuple[Callable[[Audit], None], ...] = (
    check_env_literals,
    check_argv,
    check_config_maps,
    check_config_map_refs,
    check_wrappers,
    check_env_files,
    check_rotations,
    check_secret_expiry,
    check_secret_literals,
    check_reuse,
    check_agent_inputs,
    check_webhooks,
)


def audit_documents(
    documents: Sequence[Document],
    *,
    token_ttl: int = DEFAULT_TTL_SECONDS,
    now: datetime | None = None,
    cluster: bool = False,
    secret_metadata: Mapping[tuple[str, str], dict[str, Any]] | None = None,
    ignore: Iterable[str] = (),
) -> list[Finding]:
    """Run every rule over the documents; findings sorted by severity, then location."""
    audit = Audit(
        documents=list(documents),
        token_ttl=token_ttl,
        now=now or utcnow(),
        cluster=cluster,
        secret_metadata=dict(secret_metadata or {}),
    )
    for check in CHECKS:
        check(audit)
    skipped = set(ignore)
    findings = [f for f in audit.findings if f.rule.id not in skipped]
    return sorted(
        findings,
        key=lambda f: (
            -f.severity,
            str(f.location.file or ""),
            f.location.line or 0,
            f.location.resource,
            f.rule.id,
        ),
    )


# --- schedules ------------------------------------------------------------------------------

_MONTHS = {
    name: index
    for index, name in enumerate(
        ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"],
        start=1,
    )
}
_DAYS = {
    name: index for index, name in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])
}
_DESCRIPTORS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


def _cron_field(text: str, low: int, high: int, names: Mapping[str, int]) -> tuple[set[int], bool]:
    """The values of one cron field and whether it is unrestricted (``*``)."""
    values: set[int] = set()
    star = False
    for part in text.lower().split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step <= 0:
            raise ValueError(f"bad step in {text!r}")
        if base in ("*", "?"):
            start, end = low, high
            star = star or not step_text
        elif "-" in base:
            first, last = base.split("-", 1)
            start, end = _cron_value(first, names), _cron_value(last, names)
        else:
            start = _cron_value(base, names)
            end = high if step_text else start
        if not (low <= start <= high and low <= end <= high) or start > end:
            raise ValueError(f"{text!r} is out of range {low}-{high}")
        values.update(range(start, end + 1, step))
    return values, star


def _cron_value(text: str, names: Mapping[str, int]) -> int:
    if text in names:
        return names[text]
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number")
    return int(text)


def max_interval_seconds(schedule: str, *, start: date = date(2025, 1, 1)) -> int | None:
    """The longest time between two consecutive runs of a cron schedule (UTC, two years)."""
    text = " ".join(schedule.split())
    if text.startswith(("TZ=", "CRON_TZ=")):
        text = text.split(" ", 1)[1] if " " in text else ""
    if text.startswith("@every "):
        seconds = parse_go_duration(text.split(" ", 1)[1])
        if seconds is None:
            raise ValueError("bad @every duration")
        return seconds
    text = _DESCRIPTORS.get(text, text)
    fields = text.split()
    if len(fields) != 5:
        raise ValueError("a schedule has five fields")
    minutes, _ = _cron_field(fields[0], 0, 59, {})
    hours, _ = _cron_field(fields[1], 0, 23, {})
    days, any_day = _cron_field(fields[2], 1, 31, {})
    months, _ = _cron_field(fields[3], 1, 12, _MONTHS)
    weekdays, any_weekday = _cron_field(fields[4], 0, 7, _DAYS)
    weekdays = {day % 7 for day in weekdays}
    times = sorted(hour * 60 + minute for hour in hours for minute in minutes)
    gap = max((b - a for a, b in itertools.pairwise(times)), default=0)
    previous: int | None = None
    for offset in range(2 * 366 + 1):
        day = start + timedelta(days=offset)
        if day.month not in months:
            continue
        dom, dow = day.day in days, (day.isoweekday() % 7) in weekdays
        # cron: when both day fields are restricted, either one matching is enough.
        matches = dom or dow if not (any_day or any_weekday) else dom and dow
        if not matches:
            continue
        if previous is not None:
            gap = max(gap, (offset - previous) * 1440 + times[0] - times[-1])
        previous = offset
    if previous is None:
        return None  # never runs
    return gap * 60 if gap else 24 * 3600 * 366


_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_go_duration(text: str) -> int | None:
    """Seconds in a Go duration ("1h30m", "15m", "0"); None when unreadable."""
    text = text.strip()
    if text in ("0", ""):
        return 0
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return int(sum(float(number) * _GO_UNITS[unit] for number, unit in parts))


def _human(seconds: int) -> str:
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


# --- the cluster -----------------------------------------------------------------------------

# (API class, singular as in the client's method names, kind) read with list.
# Secrets are never listed: they are read by name, as metadata.
CLUSTER_RESOURCES = (  # (client API, method suffix, kind, RBAC resource)
    ("CoreV1Api", "pod", "Pod", "pods"),
    ("CoreV1Api", "config_map", "ConfigMap", "configmaps"),
    ("AppsV1Api", "deployment", "Deployment", "deployments.apps"),
    ("AppsV1Api", "daemon_set", "DaemonSet", "daemonsets.apps"),
    ("AppsV1Api", "stateful_set", "StatefulSet", "statefulsets.apps"),
    ("BatchV1Api", "job", "Job", "jobs.batch"),
    ("BatchV1Api", "cron_job", "CronJob", "cronjobs.batch"),
)
OWNED_KINDS = frozenset({"ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob"})
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
PAGE_SIZE = 500


@dataclass(frozen=True, kw_only=True)
class Refusal:
    """One request of ``--cluster`` the API server refused (401/403): a permission missing."""

    verb: str  # the RBAC verb: list, get
    resource: str  # the RBAC resource: pods, deployments.apps, secrets/NAME
    namespace: str | None  # None: all namespaces
    status: int

    def describe(self) -> str:
        where = f"in namespace {self.namespace}" if self.namespace else "in all namespaces"
        return f"{self.verb} {self.resource} {where} (HTTP {self.status})"


def describe_refusals(refused: Sequence[Refusal]) -> str:
    """``list pods, configmaps in namespace x (HTTP 403); get secrets/y in ...``, grouped."""
    groups: dict[tuple[str, str | None, int], list[str]] = {}
    for refusal in refused:
        key = (refusal.verb, refusal.namespace, refusal.status)
        groups.setdefault(key, []).append(refusal.resource)
    parts = []
    for (verb, namespace, status), resources in groups.items():
        where = f"in namespace {namespace}" if namespace else "in all namespaces"
        parts.append(f"{verb} {', '.join(resources)} {where} (HTTP {status})")
    return "; ".join(parts)


@dataclass(kw_only=True)
class ClusterSnapshot:
    documents: list[Document]
    secret_metadata: dict[tuple[str, str], dict[str, Any]]
    notes: list[str]
    refused: list[Refusal] = field(default_factory=list)
    lists: int = 0  # list requests made
    lists_answered: int = 0  # ... and answered (the rest were refused)

    @property
    def read_nothing(self) -> bool:
        """Every list was refused: the audit saw no object at all."""
        return self.lists > 0 and self.lists_answered == 0


def read_cluster(
    api_client: ApiClient,
    *,
    namespaces: Sequence[str],
    secrets: Sequence[str],
    selector: str | None = None,
) -> ClusterSnapshot:
    """Objects the rules need, as the API's JSON; Secrets by name and as metadata only."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    documents: list[Document] = []
    notes: list[str] = []
    snapshot = ClusterSnapshot(documents=documents, secret_metadata={}, notes=notes)
    for api_name, singular, kind, resource in CLUSTER_RESOURCES:
        api = getattr(client, api_name)(api_client)
        calls: list[tuple[str | None, Callable[..., Any]]] = [
            (ns, _bound(getattr(api, f"list_namespaced_{singular}"), ns)) for ns in namespaces
        ] or [(None, getattr(api, f"list_{singular}_for_all_namespaces"))]
        for namespace, call in calls:
            snapshot.lists += 1
            try:
                items = _list_all(call, selector=selector)
            except ApiException as exc:
                if exc.status in (401, 403):
                    refusal = Refusal(
                        verb="list", resource=resource, namespace=namespace, status=exc.status
                    )
                    snapshot.refused.append(refusal)
                    notes.append(f"cannot {refusal.describe()}")
                    continue
                raise KubernetesError(
                    f"listing {kind} objects failed: HTTP {exc.status} {exc.reason}",
                    fix="check --kubeconfig/--context and the API server",
                ) from None
            snapshot.lists_answered += 1
            for item in items:
                item.setdefault("kind", kind)
                if kind in ("Pod", "Job") and _owned(item):
                    continue  # its workload is audited instead
                documents.append(Document(data=item, file=None))
    core = client.CoreV1Api(api_client)
    metadata: dict[tuple[str, str], dict[str, Any]] = {}
    for namespace, name in sorted(
        _secrets_to_read(documents, namespaces=namespaces, secrets=secrets)
    ):
        try:
            body = _secret_metadata(core, namespace=namespace, name=name)
        except ApiException as exc:
            if exc.status in (401, 403):
                snapshot.refused.append(
                    Refusal(
                        verb="get",
                        resource=f"secrets/{name}",
                        namespace=namespace,
                        status=exc.status,
                    )
                )
            if exc.status != 404:
                notes.append(f"cannot read Secret {namespace}/{name} metadata: HTTP {exc.status}")
            continue
        metadata[(namespace, name)] = body
    snapshot.secret_metadata = metadata
    return snapshot


def _bound(method: Callable[..., Any], namespace: str) -> Callable[..., Any]:
    return lambda **kwargs: method(namespace, **kwargs)


def _secret_metadata(core: Any, *, namespace: str, name: str) -> dict[str, Any]:
    """A Secret's metadata, asked for as PartialObjectMetadata so the data is not even sent."""
    response = core.read_namespaced_secret(
        name, namespace, _preload_content=False, _headers={"Accept": METADATA_ONLY}
    )
    body = json.loads(response.data)
    # A lenient server may have sent the whole Secret: keep the metadata, drop the rest unread.
    metadata = dict(body.get("metadata") or {}) if isinstance(body, dict) else {}
    body = None
    return metadata


def _owned(item: Mapping[str, Any]) -> bool:
    return any(
        ref.get("controller") and ref.get("kind") in OWNED_KINDS
        for ref in _get(item, "metadata", "ownerReferences") or []
    )


def _secrets_to_read(
    documents: Sequence[Document], *, namespaces: Sequence[str], secrets: Sequence[str]
) -> set[tuple[str, str]]:
    wanted = {(ns, name) for ns in namespaces for name in secrets}
    for doc in documents:
        for container in containers_of(doc):
            for var in container.env_named(TOKEN_ENV):
                if var.secret:
                    wanted.add((container.namespace, var.secret[0]))
            if is_rotator(container) and not namespaces:
                wanted.update((container.namespace, name) for name in secrets)
    return wanted


def _list_all(call: Callable[..., Any], *, selector: str | None = None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    token = ""
    while True:
        kwargs: dict[str, Any] = {"limit": PAGE_SIZE, "_preload_content": False}
        if selector:
            kwargs["label_selector"] = selector
        if token:
            kwargs["_continue"] = token
        body = json.loads(call(**kwargs).data)
        items.extend(item for item in body.get("items") or [] if isinstance(item, dict))
        token = str(_get(body, "metadata", "continue") or "")
        if not token:
            return items


# --- output ------------------------------------------------------------------------------------

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
SARIF_LEVEL = {
    Severity.CRITICAL: "error",
    Severity.HIGH: "error",
    Severity.MEDIUM: "warning",
    Severity.LOW: "note",
    Severity.INFO: "note",
}
SECURITY_SEVERITY = {
    Severity.CRITICAL: "9.5",
    Severity.HIGH: "8.0",
    Severity.MEDIUM: "5.5",
    Severity.LOW: "3.0",
    Severity.INFO: "0.0",
}


def render_table(
    findings: Sequence[Finding], *, documents: int, refused: Sequence[Refusal] = ()
) -> str:
    incomplete = (
        f"INCOMPLETE: the API server refused {describe_refusals(refused)}: what those would "
        "have shown was not audited\n"
        if refused
        else ""
    )
    if not findings:
        return f"no findings in {documents} object(s)\n{incomplete}"
    rows = [
        (f.severity.label, f.rule.id, redact(str(f.location)), redact(f.message)) for f in findings
    ]
    widths = [
        max(len(row[i]) for row in [("SEVERITY", "RULE", "LOCATION", ""), *rows]) for i in range(3)
    ]
    lines = [
        "  ".join(
            (
                "SEVERITY".ljust(widths[0]),
                "RULE".ljust(widths[1]),
                "LOCATION".ljust(widths[2]),
                "FINDING",
            )
        ).rstrip()
    ]
    for finding, row in zip(findings, rows, strict=True):
        lines.append(
            "  ".join(
                (row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]), row[3])
            )
        )
        lines.append(" " * (widths[0] + widths[1] + 4) + f"fix: {finding.rule.fix}")
    counts = _counts(findings)
    summary = ", ".join(f"{n} {label}" for label, n in counts.items() if n)
    lines.append(f"{len(findings)} finding(s) in {documents} object(s): {summary}")
    return "\n".join(lines) + "\n" + incomplete


def _counts(findings: Sequence[Finding]) -> dict[str, int]:
    counts = {severity.label: 0 for severity in sorted(Severity, reverse=True)}
    for finding in findings:
        counts[finding.severity.label] += 1
    return counts


def render_json(
    findings: Sequence[Finding],
    *,
    documents: int,
    failed: bool,
    fail_on: str,
    refused: Sequence[Refusal] = (),
) -> str:
    body = {
        "tool": "lg-rotate audit",
        "version": __version__,
        "findings": [finding.to_json() for finding in findings],
        "summary": {
            "objects": documents,
            "findings": len(findings),
            "by_severity": _counts(findings),
            "fail_on": fail_on,
            "failed": failed,
            "complete": not refused,
            "refused": [refusal.describe() for refusal in refused],
        },
    }
    return json.dumps(body, indent=2) + "\n"


def sarif_log(
    findings: Sequence[Finding], *, refused: Sequence[Refusal] = (), allow_partial: bool = False
) -> dict[str, Any]:
    """A SARIF 2.1.0 log (GitHub code scanning and other SARIF viewers).

    A ``--cluster`` audit that could not read everything says so in ``invocations``.
    """
    rule_ids = list(RULES)
    rules = [
        {
            "id": rule.id,
            "name": rule.name,
            "shortDescription": {"text": rule.summary},
            "fullDescription": {"text": f"{rule.summary}. Fix: {rule.fix}"},
            "help": {"text": rule.fix, "markdown": f"**Fix:** {rule.fix} (docs/AUDIT.md)"},
            "defaultConfiguration": {"level": SARIF_LEVEL[rule.severity]},
            "properties": {
                "security-severity": SECURITY_SEVERITY[rule.severity],
                "severity": rule.severity.label,
                "tags": ["security", "linuxguard"],
            },
        }
        for rule in RULES.values()
    ]
    results = []
    for finding in findings:
        location = finding.location
        logical = {"fullyQualifiedName": redact(location.resource), "kind": "resource"}
        sarif_location: dict[str, Any] = {"logicalLocations": [logical]}
        if location.file is not None:
            physical: dict[str, Any] = {"artifactLocation": {"uri": redact(_uri(location.file))}}
            if location.line:
                physical["region"] = {"startLine": location.line}
            sarif_location["physicalLocation"] = physical
        results.append(
            {
                "ruleId": finding.rule.id,
                "ruleIndex": rule_ids.index(finding.rule.id),
                "level": SARIF_LEVEL[finding.severity],
                "message": {"text": f"{redact(finding.message)}. Fix: {finding.rule.fix}"},
                "locations": [sarif_location],
                "properties": {
                    "severity": finding.severity.label,
                    **({"field": location.field} if location.field else {}),
                },
            }
        )
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": "lg-rotate audit",
                "version": __version__,
                "informationUri": "https://linuxguard.example.com/lg-rotate",
                "rules": rules,
            }
        },
        "results": results,
    }
    if refused:
        run["invocations"] = [
            {
                "executionSuccessful": allow_partial,
                "toolExecutionNotifications": [
                    {
                        "level": "warning" if allow_partial else "error",
                        "message": {"text": f"incomplete: the API server refused {r.describe()}"},
                    }
                    for r in refused
                ],
            }
        ]
    return {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}


def _uri(file: str) -> str:
    if file == "<stdin>":
        return "stdin"
    path = Path(file)
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_uri()
    return path.as_posix()


# --- command line ------------------------------------------------------------------------------

FAIL_ON_CHOICES = (*(s.label for s in Severity), "never")


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``lg-rotate audit`` (wired in by rotator.cli)."""
    parser.description = (
        "Find the LinuxGuard token anti-patterns (literal tokens, argv, ConfigMaps, wrappers, "
        "env files, slow or overlapping rotation, expired or reused tokens) in manifests or, "
        "with --cluster, in a live cluster. Rules: docs/AUDIT.md."
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="manifest files or directories (YAML/JSON, multi-document, "
        "Helm/kustomize output, compose files); - reads stdin",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="audit a live cluster (pods, workloads, ConfigMaps, the enrolment "
        "Secrets' annotations; never Secret data)",
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file for --cluster [env KUBECONFIG]")
    parser.add_argument("--context", help="kubeconfig context for --cluster")
    parser.add_argument(
        "-l",
        "--selector",
        metavar="SELECTOR",
        help="with --cluster: only objects with these labels (kubectl's -l, e.g. "
        "app=linuxguard-agent); Secrets are still read by name",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        dest="namespaces",
        metavar="NS",
        help="namespace(s) for --cluster (default: all)",
    )
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        dest="secrets",
        metavar="NAME",
        help="enrolment Secret(s) whose expiry --cluster checks "
        f"in each namespace (default {DEFAULT_SECRET}, plus every Secret the "
        "agents reference)",
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json", "yaml", "sarif"),
        default="table",
        help="findings as a table, JSON, YAML or SARIF 2.1.0 (code scanning) (default: table)",
    )
    parser.add_argument(
        "--fail-on",
        choices=FAIL_ON_CHOICES,
        default="info",
        metavar="SEVERITY",
        help=f"exit {int(ExitCode.CHECK_FAILED)} when a finding is at least this "
        "severe: info (default: any finding), low, medium, high, critical, never",
    )
    parser.add_argument(
        "--token-ttl",
        type=_positive_seconds,
        default=DEFAULT_TTL_SECONDS,
        metavar="DURATION",
        help="the tenant's token TTL, when a rotation does not "
        f"state one (--ttl / LG_ROTATE_TTL) (default: {format_duration(DEFAULT_TTL_SECONDS)})",
    )
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="RULE",
        choices=sorted(RULES),
        help="skip a rule (repeatable)",
    )
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="with --cluster: exit 0 (if nothing else fails) even when some lists or "
        "Secret reads were refused; they are still reported. Without it a partial read "
        f"exits {int(ExitCode.KUBERNETES)}, and a read of nothing always does",
    )


def _positive_seconds(text: str) -> int:
    try:
        return parse_whole_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def run_audit_command(
    args: argparse.Namespace,
    *,
    stdout: TextIO | None = None,
    stdin: TextIO | None = None,
    api_client: ApiClient | None = None,
    now: datetime | None = None,
) -> int:
    """Run ``lg-rotate audit``; 0 when clean, CHECK_FAILED when findings reach --fail-on.

    With ``--cluster``, KUBERNETES when some list or Secret read was refused (unless
    ``--allow-partial``; findings still win). Raises ConfigError (exit 2) for unreadable
    input or missing arguments, KubernetesError (exit 6) when every list was refused.
    """
    out = stdout or sys.stdout
    paths: list[str] = list(args.paths or [])
    if not paths and not args.cluster:
        raise ConfigError("nothing to audit", fix="give manifest PATHs, - for stdin, or --cluster")
    documents = load_paths(paths, stdin=stdin) if paths else []
    secret_metadata: dict[tuple[str, str], dict[str, Any]] = {}
    refused: list[Refusal] = []
    if args.cluster:
        if api_client is None:
            from rotator.kube.api import connect

            api_client = connect(kubeconfig=args.kubeconfig, context=args.context)
        client = api_client
        snapshot = read_cluster(
            client,
            namespaces=args.namespaces,
            secrets=args.secrets or [DEFAULT_SECRET],
            selector=getattr(args, "selector", None),
        )
        for note in snapshot.notes:
            print(f"lg-rotate audit: warning: {note}", file=sys.stderr)
        if snapshot.read_nothing:
            # "No findings in 0 objects" would pass a gate that saw nothing.
            raise KubernetesError(
                "audit --cluster read nothing: the API server refused "
                f"{describe_refusals(snapshot.refused)}",
                fix="run it as an identity that may list these (the auditor Role of "
                "cronjob/audit/, docs/AUDIT.md), or check --kubeconfig/--context",
            )
        documents.extend(snapshot.documents)
        secret_metadata = snapshot.secret_metadata
        refused = snapshot.refused
    findings = audit_documents(
        documents,
        token_ttl=args.token_ttl,
        now=now,
        cluster=bool(args.cluster),
        secret_metadata=secret_metadata,
        ignore=args.ignore,
    )
    threshold = None if args.fail_on == "never" else Severity[args.fail_on.upper()]
    failed = threshold is not None and any(f.severity >= threshold for f in findings)
    incomplete = bool(refused) and not args.allow_partial
    if args.output == "json":
        out.write(
            render_json(
                findings,
                documents=len(documents),
                failed=failed or incomplete,
                fail_on=args.fail_on,
                refused=refused,
            )
        )
    elif args.output == "yaml":
        data = json.loads(
            render_json(
                findings,
                documents=len(documents),
                failed=failed or incomplete,
                fail_on=args.fail_on,
                refused=refused,
            )
        )
        out.write(yaml.safe_dump(data, sort_keys=False))
    elif args.output == "sarif":
        sarif = sarif_log(findings, refused=refused, allow_partial=args.allow_partial)
        out.write(json.dumps(sarif, indent=2) + "\n")
    else:
        out.write(render_table(findings, documents=len(documents), refused=refused))
    out.flush()
    if refused:
        print(
            f"lg-rotate audit: {'warning' if args.allow_partial else 'error'}: incomplete: "
            f"the API server refused {describe_refusals(refused)} (fix: grant them, e.g. the "
            "auditor Role of cronjob/audit/, or pass --allow-partial to accept a partial audit)",
            file=sys.stderr,
        )
    if failed:
        return int(ExitCode.CHECK_FAILED)
    return int(ExitCode.KUBERNETES) if incomplete else int(ExitCode.OK)
