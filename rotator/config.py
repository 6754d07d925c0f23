"""Settings and their precedence: flags > ``LG_ROTATE_<FLAG>`` > native env > YAML > defaults.

Every setting is declared once (:data:`CORE_SETTINGS`, plus each provider's
``ProviderOption``) and becomes a flag ``--name``, an environment variable
``LG_ROTATE_NAME`` and a YAML key ``name`` (dashes or underscores). Native variables
such as ``VAULT_ADDR`` or ``KUBECONFIG`` are honoured after ``LG_ROTATE_*``. Unknown
YAML keys are errors: a typo must not silently fall back to a default.

Secrets are never settings: the LinuxGuard API key comes from ``LINUXGUARD_API_KEY``
(read once, then removed from the environment) or ``--api-key-file``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotator.errors import ConfigError

ENV_PREFIX = "LG_ROTATE_"


@dataclass(frozen=True, kw_only=True)
class Setting:
    name: str  # flag spelling: "linuxguard-url"
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    env: tuple[str, ...] = ()  # native variables honoured after LG_ROTATE_<NAME>
    choices: tuple[str, ...] | None = None
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.upper()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def parse_seconds(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h`` -> seconds."""
    text = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600}
    factor = units.get(text[-1:])
    value = float(text[:-1] if factor else text) * (factor or 1)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


# Settings shared by the commands that rotate, read or deliver.
SOURCE_SETTINGS = (
    Setting(name="tenant", help="LinuxGuard tenant ID", metavar="ID"),
    Setting(
        name="linuxguard-url",
        help="LinuxGuard API base URL, e.g. https://linuxguard.example.com",
        metavar="URL",
    ),
    Setting(
        name="api-key-file",
        help="file holding the LinuxGuard API key (else LINUXGUARD_API_KEY, removed once read)",
        metavar="PATH",
    ),
    Setting(
        name="min-ttl",
        help="refuse tokens with less time to live than this (seconds or 30s/2m)",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
    ),
    Setting(
        name="ttl",
        help="ask LinuxGuard for this token TTL in seconds (default: the tenant's)",
        parse=parse_positive_int,
        metavar="SECONDS",
    ),
    Setting(
        name="mint-budget",
        help="give up minting after this long across retries (seconds or 1m)",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
    ),
    Setting(
        name="http-timeout",
        help="timeout of one LinuxGuard request in seconds",
        default=10.0,
        parse=parse_seconds,
        metavar="SECONDS",
    ),
)

STORE_SETTINGS = (
    Setting(
        name="provider", help="secrets store: vault, aws, gcp, memory or a plugin", metavar="NAME"
    ),
    Setting(
        name="keep-versions",
        help="versions to keep in the store; older ones are retired",
        default=5,
        parse=parse_positive_int,
        metavar="N",
    ),
)

KUBE_SETTINGS = (
    Setting(
        name="target",
        help="where to deliver: kubernetes (the Secret) or none (store only)",
        default="kubernetes",
        choices=("kubernetes", "none"),
    ),
    Setting(name="namespace", help="namespace of the Secret (default: the pod's, else default)"),
    Setting(name="secret", help="name of the Kubernetes Secret", default="linuxguard-enroll"),
    Setting(name="token-key", help="Secret key holding the token", default="token"),
    Setting(name="tenant-key", help="Secret key holding the tenant ID", default="tenant-id"),
    Setting(
        name="kubeconfig",
        help="kubeconfig file (else in-cluster or KUBECONFIG)",
        env=("KUBECONFIG",),
    ),
    Setting(name="context", help="kubeconfig context"),
    Setting(
        name="lock-wait",
        help="wait this long for another rotation's lock before failing (seconds)",
        default=0.0,
        parse=parse_seconds,
        metavar="DURATION",
    ),
    Setting(
        name="lock-duration",
        help="lease duration of the rotation lock; a crashed holder blocks at most this long",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
    ),
)


def parse_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("must be a fraction in [0, 1)")
    return value


def parse_port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number (0 picks a free one)")
    return value


WATCH_SETTINGS = (
    Setting(
        name="selector",
        help="label selector of the agent pods (the controller deletes colliding ones)",
        default="app=linuxguard-agent",
    ),
    Setting(name="container", help="the agent container's name (default: every container)"),
    Setting(
        name="expiry-margin",
        help="rotate when this fraction of the token's TTL is left",
        default=0.2,
        parse=parse_fraction,
        metavar="FRACTION",
    ),
    Setting(
        name="deletions-per-minute",
        help="rate limit of collision recoveries (pod deletions)",
        default=6.0,
        parse=float,
        metavar="N",
    ),
    Setting(
        name="leader-lease-duration",
        help="leader election Lease duration; a dead leader is replaced after this long",
        default=15.0,
        parse=parse_seconds,
        metavar="DURATION",
    ),
    Setting(
        name="metrics-port",
        help="port of /metrics, /healthz and /readyz",
        default=9102,
        parse=parse_port,
        metavar="PORT",
    ),
)

OUTPUT_SETTINGS = (
    Setting(
        name="log-format", help="logs on stderr", default="auto", choices=("auto", "text", "json")
    ),
    Setting(
        name="log-level",
        help="log level",
        default="info",
        choices=("debug", "info", "warning", "error"),
    ),
)


@dataclass(frozen=True)
class Resolved:
    """The merged settings; attribute access by key (``settings.linuxguard_url``)."""

    values: Mapping[str, Any]
    origins: Mapping[str, str]  # key -> "flag" | "env LG_ROTATE_X" | "config" | "default"

    def __getattr__(self, key: str) -> Any:
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


def add_arguments(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], *, title: str
) -> None:
    """Add flags whose absence is visible (SUPPRESS), so precedence can be computed."""
    group = parser.add_argument_group(title)
    for setting in settings:
        help_text = setting.help
        if setting.default is not None:
            help_text += f" (default: {setting.default})"
        help_text += f" [env {setting.env_name}{''.join(', ' + e for e in setting.env)}]"
        group.add_argument(
            f"--{setting.name}",
            dest=setting.key,
            default=argparse.SUPPRESS,
            help=help_text,
            choices=setting.choices,
            metavar=setting.metavar
            or ("{" + ",".join(setting.choices) + "}" if setting.choices else None),
        )


def load_yaml(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml  # only when a config file is used

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path}: {exc.strerror}",
            fix="check --config / LG_ROTATE_CONFIG",
        ) from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"config file {path} is not valid YAML{where}", fix="fix the YAML syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(
    *,
    settings: Iterable[Setting],
    flags: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    config_file: Mapping[str, Any] | None = None,
    extra_known_keys: Iterable[str] = (),
) -> Resolved:
    """Merge one value per setting by precedence, parsing and validating each."""
    env = os.environ if env is None else env
    config_file = dict(config_file or {})
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    declared = list(settings)
    known = {s.key for s in declared} | set(extra_known_keys) | {"config"}
    unknown = sorted(set(config_file) - known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) in the config file: {', '.join(unknown)}",
            fix="check the spelling against lg-rotate <command> --help",
        )
    for setting in declared:
        raw: Any = None
        origin = "default"
        if setting.key in vars(flags):
            raw, origin = getattr(flags, setting.key), f"flag --{setting.name}"
        elif env.get(setting.env_name):
            raw, origin = env[setting.env_name], f"env {setting.env_name}"
        elif any(env.get(name) for name in setting.env):
            name = next(n for n in setting.env if env.get(n))
            raw, origin = env[name], f"env {name}"
        elif config_file.get(setting.key) is not None:
            raw, origin = config_file[setting.key], "config file"
        if raw is None:
            values[setting.key] = setting.default
            origins[setting.key] = "default"
            continue
        values[setting.key] = _parse(setting, raw, origin)
        origins[setting.key] = origin
    return Resolved(values=values, origins=origins)


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    if isinstance(raw, bool | int | float) and setting.parse is not str:
        raw = str(raw)
    if not isinstance(raw, str):
        raise ConfigError(
            f"{setting.name} from {origin} must be a single value, not {type(raw).__name__}"
        )
    if setting.choices and raw not in setting.choices:
        raise ConfigError(
            f"{setting.name} from {origin} is {raw!r}",
            fix=f"use one of {', '.join(setting.choices)}",
        )
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{setting.name} from {origin} is invalid ({exc})") from exc


def require(resolved: Resolved, *keys: str, why: str) -> None:
    """ConfigError naming every missing setting and all the ways to give it."""
    missing = [k for k in keys if resolved.get(k) in (None, "")]
    if not missing:
        return
    first = missing[0].replace("_", "-")
    raise ConfigError(
        f"missing {', '.join('--' + k.replace('_', '-') for k in missing)} ({why})",
        fix=f"pass --{first}, set {ENV_PREFIX}{missing[0].upper()}, "
        f"or put {missing[0]}: in --config",
    )


def in_cluster_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
