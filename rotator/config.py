"""Settings: declared once, resolved once, with provenance.

Every setting is declared here (:data:`COMMANDS` says which command takes which; each
provider declares its own ``ProviderOption``) and is a flag ``--name``, an environment
variable ``LG_ROTATE_NAME`` and a YAML key ``name:`` (dashes or underscores), with the
exceptions of :data:`FLAG_ONLY` (each with its reason; README "Configuration" lists them).
Precedence: flags > ``LG_ROTATE_<NAME>`` > native variables (``VAULT_ADDR``,
``KUBECONFIG``) > the config file > defaults. Unknown keys in the file are errors; unknown
``LG_ROTATE_*`` variables are warnings with a "did you mean" (a typo must not silently
fall back to a default).

:func:`resolve_command` turns a command's flags, the environment and the file into one
immutable :class:`Settings`: a value and a :class:`Source` per setting (``flag --tenant``,
``env LG_ROTATE_TENANT``, ``config file lg.yaml``, ``default``; the composition root,
``rotator.assemble``, adds what it derives, such as the namespace of the kubeconfig
context). Nothing downstream reads flags, the environment or the file again.

Secrets are never settings: the LinuxGuard API key comes from ``LINUXGUARD_API_KEY``
(read once, then removed from the environment) or ``--api-key-file``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from rotator.durations import format_duration, parse_duration
from rotator.errors import ConfigError

if TYPE_CHECKING:
    from providers.base import ProviderFactory, ProviderOption

ENV_PREFIX = "LG_ROTATE_"
CONFIG_ENV = "LG_ROTATE_CONFIG"


class Choices(tuple[str, ...]):
    """The canonical choices of a setting; ``in`` also accepts its (deprecated) aliases.

    Iterating (``--help``, shell completion, argparse's error message) shows the canonical
    spellings only; the old ones keep working, with a deprecation warning at resolution.
    """

    aliases: Mapping[str, str]

    def __new__(cls, values: Iterable[str], aliases: Mapping[str, str] | None = None) -> Choices:
        made = super().__new__(cls, tuple(values))
        made.aliases = dict(aliases or {})
        return made

    def __contains__(self, value: object) -> bool:
        return super().__contains__(value) or value in self.aliases


@dataclass(frozen=True, kw_only=True)
class Setting:
    name: str  # flag spelling: "linuxguard-url"
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    env: tuple[str, ...] = ()  # native variables honoured after LG_ROTATE_<NAME>
    choices: tuple[str, ...] | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)  # old value -> canonical
    metavar: str | None = None
    short: str | None = None  # "-n", kubectl's letters
    switch: bool = False  # --name / --no-name; true/false from the environment or the file
    duration: bool = False  # shown as 1m30s (parse_duration reads it back)
    secret: bool = False  # its value is never shown (leads to a credential)

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def env_names(self) -> tuple[str, ...]:
        return (self.env_name, *self.env)

    @property
    def flags(self) -> tuple[str, ...]:
        return (*((self.short,) if self.short else ()), f"--{self.name}")

    def show(self, value: Any) -> str:
        """A value as --help and reports print it (durations as 1m, booleans as true)."""
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "true" if value else "false"
        if self.duration and isinstance(value, int | float):
            return format_duration(float(value))
        return str(value)


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false, 1 or 0)")


# ``90``, ``90s``, ``10m``, ``1h``, ``1m30s`` -> seconds (rotator.durations).
parse_seconds = parse_duration


# The token lifetimes LinuxGuard accepts (README: "a TTL of 5-15 minutes"); --ttl is
# checked against them locally, before anything is minted, rather than by the server.
TTL_MIN_SECONDS = 300
TTL_MAX_SECONDS = 900


def parse_ttl_seconds(text: str) -> int:
    """A token TTL for LinuxGuard: whole seconds, written ``600`` or ``10m``, 300-900 s."""
    accepted = (
        f"LinuxGuard accepts token TTLs of {TTL_MIN_SECONDS} to {TTL_MAX_SECONDS} whole "
        "seconds (5m to 15m); omit --ttl for the tenant's default"
    )
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise ValueError(f"{exc}; {accepted}") from None
    if value != int(value) or not TTL_MIN_SECONDS <= value <= TTL_MAX_SECONDS:
        raise ValueError(f"{text.strip()!r} is out of range: {accepted}")
    return int(value)


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
        help="refuse tokens with less time to live than this",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
    Setting(
        name="ttl",
        help="ask LinuxGuard for this token TTL, 5m-15m (300-900 s; default: the tenant's)",
        parse=parse_ttl_seconds,
        metavar="DURATION",
        duration=True,
    ),
    Setting(
        name="mint-budget",
        help="retry transient LinuxGuard failures for this long, then give up",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
    Setting(
        name="http-timeout",
        help="timeout of one LinuxGuard request",
        default=10.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
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
    Setting(
        name="namespace",
        short="-n",
        help="namespace of the Secret (default: the kubeconfig context's, else the pod's, "
        "else default)",
    ),
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
        help="wait this long for a running rotation's lock before failing (a crashed "
        "holder's is waited out anyway, until its lease lapses)",
        default=0.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
    Setting(
        name="lock-duration",
        help="lease duration of the rotation lock; a crashed holder blocks at most this long",
        default=60.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
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


def parse_bind_address(text: str) -> str:
    """controller-runtime's ``--metrics-bind-address``: ``:9102`` (every address),
    ``HOST:9102``, ``[::]:9102``, or ``0`` (off). Checked, returned as written."""
    bind_address(text)
    return text.strip()


def bind_address(text: str) -> tuple[str, int] | None:
    """``(host, port)`` of a bind address (:func:`parse_bind_address`), None for ``0``.

    An empty host is every IPv4 address (``0.0.0.0``); port 0 picks a free one.
    """
    text = text.strip()
    if text == "0":
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        hint = f" (did you mean :{text}?)" if text.isdigit() else ""
        raise ValueError(f"{text!r} is not HOST:PORT, :PORT or 0 (off){hint}")
    host = host.removeprefix("[").removesuffix("]") or "0.0.0.0"  # noqa: S104 - scraped from other pods
    return host, int(port)


WATCH_SETTINGS = (
    Setting(
        name="selector",
        short="-l",
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
        duration=True,
    ),
    Setting(
        name="metrics-bind-address",
        help="address of /metrics, /healthz and /readyz (plain HTTP): :9102 (every "
        "address), HOST:PORT, or 0 for none (and so no health endpoints either)",
        default=":9102",
        parse=parse_bind_address,
        metavar="ADDRESS",
    ),
    Setting(
        name="metrics-port",
        help="deprecated: use --metrics-bind-address :PORT (taken as 0.0.0.0:PORT when "
        "--metrics-bind-address is not given)",
        parse=parse_port,
        metavar="PORT",
    ),
)


def parse_on_failure(text: str) -> str:
    value = text.strip().lower()
    if value not in ("deny", "admit"):
        raise ValueError("must be deny or admit")
    return value


WEBHOOK_SETTINGS = (
    Setting(
        name="listen",
        help="HOST:PORT of the HTTPS listener (/mutate, /healthz, /readyz, /metrics)",
        default="0.0.0.0:9443",
        metavar="HOST:PORT",
    ),
    Setting(
        name="metrics-bind-address",
        help="also serve /metrics, /healthz and /readyz over plain HTTP here (:9102, "
        "HOST:PORT), for a scraper without the webhook's CA; 0: only on --listen",
        default="0",
        parse=parse_bind_address,
        metavar="ADDRESS",
    ),
    Setting(
        name="tls-cert-file",
        help="PEM serving certificate (chain); reloaded when the file changes",
        metavar="PATH",
    ),
    Setting(
        name="tls-private-key-file",
        help="PEM private key of the serving certificate; reloaded when the file changes",
        metavar="PATH",
    ),
    Setting(
        name="selector",
        short="-l",
        help="only pods with these labels get a Secret of their own (default: every pod "
        "of --namespace referencing --secret)",
    ),
    Setting(
        name="admission-budget",
        help="answer within this long (below the webhook's timeoutSeconds); a mint, store "
        "write or Secret create still running then fails the admission",
        default=8.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
    Setting(
        name="on-failure",
        help="when no per-pod Secret can be made in time: deny the pod (its controller "
        "retries), or admit it unchanged (it reads the shared Secret)",
        default="deny",
        parse=parse_on_failure,
        metavar="{deny,admit}",
    ),
    Setting(
        name="record-shards",
        help="store records per tenant for per-pod tokens, written in parallel",
        default=16,
        parse=parse_positive_int,
        metavar="N",
    ),
    Setting(
        name="tls-self-managed",
        help="without cert-manager: lg-rotate keeps the serving certificates itself (one "
        "replica at a time, by a Lease): a CA and a key pair in --tls-secret, the CA in "
        "--tls-webhook-configuration's caBundle, renewed and rotated with overlap; every replica "
        "still serves the files --tls-cert-file/--tls-private-key-file, and is not ready "
        "until they load",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
    Setting(
        name="tls-secret",
        help="with --tls-self-managed: the kubernetes.io/tls Secret (in --namespace) the key "
        "pair is kept in, the one the replicas mount",
        default="lg-rotate-webhook-tls",
        metavar="NAME",
    ),
    Setting(
        name="tls-webhook-configuration",
        help="with --tls-self-managed: the MutatingWebhookConfiguration whose caBundle is kept",
        default="lg-rotate-per-pod",
        metavar="NAME",
    ),
    Setting(
        name="tls-service",
        help="with --tls-self-managed: the webhook's Service; the serving certificate names "
        "NAME.NAMESPACE.svc and NAME.NAMESPACE.svc.cluster.local",
        default="lg-rotate-webhook",
        metavar="NAME",
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


def _report_output(*, aliases: Mapping[str, str] | None = None) -> Setting:
    return Setting(
        name="output",
        short="-o",
        help="report format on stdout",
        default="text",
        choices=("text", "json", "yaml"),
        aliases=dict(aliases or {"table": "text"}),
    )


REPORT_OUTPUT = _report_output()
LIST_OUTPUT = Setting(
    name="output",
    short="-o",
    help="list format on stdout",
    default="table",
    choices=("table", "json", "yaml"),
    aliases={"text": "table"},
)

ROTATE_SETTINGS = (
    Setting(
        name="dry-run",
        help="show what would change and mint nothing (the preflight checks still run)",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
)

RESTART_SETTINGS = (
    Setting(
        name="restart",
        help="after rotating, restart this workload like `kubectl rollout restart` "
        "(daemonset/NAME, deployment/NAME, statefulset/NAME)",
        metavar="KIND/NAME",
    ),
    Setting(
        name="wait",
        help="follow the restart until the rollout completes",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
    Setting(
        name="timeout",
        help="give up waiting for the rollout after this long",
        default=600.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
)

STATUS_SETTINGS = (
    Setting(
        name="check",
        help="exit 9 when anything needs action (no current token, out of sync, expiring)",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
)

LAUNCH_SETTINGS = (
    Setting(
        name="from-store",
        help="use the store's current token instead of minting (refused if it has less than "
        "--min-ttl left; it may already have been used by another launch)",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
)

ROLL_SETTINGS = (
    Setting(
        name="timeout",
        help="how long one replacement pod may take to be Ready",
        default=300.0,
        parse=parse_seconds,
        metavar="DURATION",
        duration=True,
    ),
)

DEMO_SETTINGS = (
    Setting(
        name="verbose",
        short="-v",
        help="also show lg-rotate's logs (info level); without it only warnings, unless "
        "--log-level says otherwise",
        default=False,
        parse=parse_bool,
        switch=True,
    ),
)

Group = tuple[str, tuple[Setting, ...]]
_TOKEN = (SOURCE_SETTINGS[0], SOURCE_SETTINGS[3])  # tenant, min-ttl: what status needs


@dataclass(frozen=True, kw_only=True)
class Command:
    """What a command takes (its settings, in --help groups) and what it needs built."""

    name: str
    groups: tuple[Group, ...]
    store: bool = False  # reads or writes the secrets store: --provider and its options
    mints: bool = False  # may mint: --linuxguard-url and the LinuxGuard API key
    kube: str | None = None  # "optional" (--target none allowed) or "required"
    why: str = ""  # what the tenant is for, in "missing --tenant (...)"
    requires: tuple[tuple[str, str], ...] = ()  # further (key, why) that must be set

    @property
    def settings(self) -> tuple[Setting, ...]:
        return tuple(s for _, group in self.groups for s in group)

    @property
    def required(self) -> tuple[str, ...]:
        """Keys that must be set (exec/emit --from-store mint nothing: no URL needed)."""
        keys: tuple[str, ...] = ("provider", "tenant") if self.store else ()
        keys += ("linuxguard_url",) if self.mints else ()
        return keys + tuple(key for key, _ in self.requires)


def _store_command(
    name: str,
    *extra: Group,
    source: tuple[Setting, ...] = SOURCE_SETTINGS,
    output: Setting | None = None,
    **kwargs: Any,
) -> Command:
    groups: list[Group] = [("LinuxGuard" if source is SOURCE_SETTINGS else "token", source)]
    groups.append(("secrets store", STORE_SETTINGS))
    if kwargs.get("kube"):
        groups.append(("Kubernetes", KUBE_SETTINGS))
    groups.extend(extra)
    groups.append(("output", (*((output,) if output else ()), *OUTPUT_SETTINGS)))
    return Command(name=name, groups=tuple(groups), store=True, **kwargs)


COMMANDS: Mapping[str, Command] = MappingProxyType(
    {
        "rotate": _store_command(
            "rotate",
            ("rotation", ROTATE_SETTINGS),
            ("pre-rollout step", RESTART_SETTINGS),
            output=REPORT_OUTPUT,
            mints=True,
            kube="optional",
            why="whose token to rotate",
        ),
        "status": _store_command(
            "status",
            ("status", STATUS_SETTINGS),
            source=_TOKEN,
            output=REPORT_OUTPUT,
            kube="optional",
            why="whose token to inspect",
        ),
        "exec": _store_command(
            "exec", ("launch", LAUNCH_SETTINGS), mints=True, why="whose token to hand over"
        ),
        "emit": _store_command(
            "emit", ("launch", LAUNCH_SETTINGS), mints=True, why="whose token to hand over"
        ),
        "watch": _store_command(
            "watch",
            ("controller", WATCH_SETTINGS),
            mints=True,
            kube="required",
            why="whose token to keep fresh",
        ),
        "webhook": _store_command(
            "webhook",
            ("webhook", WEBHOOK_SETTINGS),
            mints=True,
            kube="required",
            why="whose tokens new pods get",
            requires=(
                ("tls_cert_file", "the webhook serves HTTPS only"),
                ("tls_private_key_file", "the webhook serves HTTPS only"),
            ),
        ),
        "roll": _store_command(
            "roll",
            ("roll", ROLL_SETTINGS),
            output=REPORT_OUTPUT,
            mints=True,
            kube="required",
            why="whose tokens to roll out",
        ),
        "demo": Command(name="demo", groups=(("output", (*OUTPUT_SETTINGS, *DEMO_SETTINGS)),)),
        "providers": Command(
            name="providers", groups=(("output", (LIST_OUTPUT, *OUTPUT_SETTINGS)),)
        ),
    }
)

# Flags that are deliberately not settings (no LG_ROTATE_* variable, no config key), and
# why. README "Configuration" lists the same; tests/test_docs_drift.py keeps both in step.
FLAG_ONLY: Mapping[str, str] = MappingProxyType(
    {
        "--config": "names the config file (or LG_ROTATE_CONFIG); a file cannot name itself",
        "--provider-option": "carries a plugin provider's options on the command line; each "
        "option is itself LG_ROTATE_<NAME> and name: in the file",
        "emit -o/--output": "the shape of a token on stdout is fixed where the pipe is built: "
        "an LG_ROTATE_OUTPUT meant for reports must never change what a wrapper reads",
        "emit --force": "writing a token to a terminal or a file is a decision for one run, "
        "never a standing default",
        "exec --pass-env": "handing a credential to the command is said at that launch, "
        "never inherited from the environment or a shared file",
        "roll --restart": "discarding an unfinished roll's progress is a decision for one run",
        "audit, sandbox": "their own parsers, flags only: audit reads manifests that carry "
        "LG_ROTATE_* variables of their own (an auditor inheriting the rotator's "
        "LG_ROTATE_NAMESPACE would narrow a cluster audit without saying so); the sandbox is "
        "a test server",
        "arguments": "what to act on, not how: roll's daemonset/NAME, exec's command, "
        "completion's shell, audit's paths",
    }
)


# --- provenance and the settings object ------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """Where a value came from: ``flag --tenant``, ``env LG_ROTATE_TENANT``, ``default``..."""

    kind: str  # flag | env | config | default | kubeconfig | in-cluster
    detail: str = ""  # the flag, the variable, the file, the context

    def __str__(self) -> str:
        if self.kind == "config":
            return f"config file {self.detail}".strip()
        return f"{self.kind} {self.detail}".strip()


DEFAULT = Source("default")
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass(frozen=True, kw_only=True)
class Settings:
    """One command's settings, resolved once: a value and a :class:`Source` per setting.

    Immutable; attribute access by key (``settings.linuxguard_url``). The composition
    root derives further values with :meth:`derive` (a new object), never by mutation.
    """

    command: str
    declared: Mapping[str, Setting]
    values: Mapping[str, Any]
    sources: Mapping[str, Source]
    provider_options: tuple[str, ...] = ()  # keys of the chosen provider's options
    config_path: str | None = None
    warnings: tuple[str, ...] = ()

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self.values[key]
        except KeyError:
            raise AttributeError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def source(self, key: str) -> Source:
        return self.sources.get(key, DEFAULT)

    @property
    def origins(self) -> Mapping[str, str]:
        """``key -> "flag --tenant" | "env LG_ROTATE_TENANT" | "config file F" | "default"``."""
        return {key: str(source) for key, source in self.sources.items()}

    def derive(self, key: str, value: Any, source: Source) -> Settings:
        """A copy with ``key`` set from a derived source (the kubeconfig context...)."""
        return replace(
            self,
            values=MappingProxyType({**self.values, key: value}),
            sources=MappingProxyType({**self.sources, key: source}),
        )

    def provider_option_values(self) -> dict[str, str | None]:
        return {
            key: None if self.values.get(key) is None else str(self.values[key])
            for key in self.provider_options
        }

    def describe(self, *, as_text: bool = False) -> dict[str, dict[str, Any]]:
        """``name -> {"value", "source"}`` for reports; values leading to secrets hidden.

        ``as_text``: values as --help prints them (``1m30s``, ``true``), not as data."""
        described: dict[str, dict[str, Any]] = {}
        for key, setting in self.declared.items():
            value = self.values.get(key)
            if setting.secret and value not in (None, ""):
                value = "(hidden)"
            elif as_text:
                value = setting.show(value)
            if isinstance(value, str):
                value = _URL_USERINFO.sub("***@", value)
            described[setting.name] = {"value": value, "source": str(self.source(key))}
        return described


Resolved = Settings  # the former name


# --- flags ---------------------------------------------------------------------------------


def add_arguments(
    parser: argparse.ArgumentParser, settings: Iterable[Setting], *, title: str
) -> None:
    """Add flags whose absence is visible (SUPPRESS), so precedence can be computed."""
    group = parser.add_argument_group(title)
    for setting in settings:
        group.add_argument(*setting.flags, **_argument_options(setting))


def _argument_options(setting: Setting) -> dict[str, Any]:
    help_text = setting.help
    if setting.default is not None and not (setting.switch and setting.default is False):
        help_text += f" (default: {setting.show(setting.default)})"
    help_text += f" [env {', '.join(setting.env_names)}]"
    options: dict[str, Any] = {
        "dest": setting.key,
        "default": argparse.SUPPRESS,
        "help": help_text.replace("%", "%%"),
    }
    if setting.switch:
        options["action"] = argparse.BooleanOptionalAction
        return options
    if setting.choices:
        options["choices"] = Choices(setting.choices, setting.aliases)
    options["metavar"] = setting.metavar or (
        "{" + ",".join(setting.choices) + "}" if setting.choices else None
    )
    return options


def provider_option_settings(options: Iterable[ProviderOption]) -> list[Setting]:
    return [
        Setting(name=o.name, help=o.help, default=o.default, env=o.env, secret=o.secret)
        for o in options
    ]


def parse_provider_option_flags(pairs: Sequence[str] | None) -> dict[str, str]:
    """``--provider-option key=value`` (repeatable) for plugin providers."""
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"--provider-option expects KEY=VALUE, got {key or pair!r}",
                fix="e.g. --provider-option path=team/linuxguard",
            )
        result[key.strip().replace("-", "_")] = value
    return result


# --- the config file -------------------------------------------------------------------------


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


# --- resolution ------------------------------------------------------------------------------


def resolve(
    *,
    settings: Iterable[Setting],
    flags: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    config_file: Mapping[str, Any] | None = None,
    extra_known_keys: Iterable[str] | None = (),
    config_path: str | None = None,
    command: str = "",
) -> Settings:
    """Merge one value per setting by precedence, parsing and validating each.

    ``extra_known_keys=None`` skips the unknown-key check of the file (the caller does it).
    """
    env = os.environ if env is None else env
    config_file = dict(config_file or {})
    declared = list(settings)
    if extra_known_keys is not None:
        known = {s.key for s in declared} | set(extra_known_keys)
        _check_file_keys(config_file, known, config_path)
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    warnings: list[str] = []
    for setting in declared:
        raw, source = _pick(
            setting, flags=flags, env=env, config_file=config_file, path=config_path
        )
        if raw is None:
            values[setting.key] = setting.default
            sources[setting.key] = DEFAULT
            continue
        values[setting.key] = _parse(setting, raw, source, warnings)
        sources[setting.key] = source
    return Settings(
        command=command,
        declared=MappingProxyType({s.key: s for s in declared}),
        values=MappingProxyType(values),
        sources=MappingProxyType(sources),
        config_path=config_path,
        warnings=tuple(warnings),
    )


def _pick(
    setting: Setting,
    *,
    flags: argparse.Namespace,
    env: Mapping[str, str],
    config_file: Mapping[str, Any],
    path: str | None,
) -> tuple[Any, Source]:
    if setting.key in vars(flags):
        return getattr(flags, setting.key), Source("flag", f"--{setting.name}")
    for name in setting.env_names:
        if env.get(name):
            return env[name], Source("env", name)
    if config_file.get(setting.key) is not None:
        return config_file[setting.key], Source("config", path or "")
    return None, DEFAULT


def _parse(setting: Setting, raw: Any, source: Source, warnings: list[str]) -> Any:
    if isinstance(raw, bool | int | float) and (setting.parse is not str or setting.switch):
        raw = str(raw)
    if not isinstance(raw, str):
        raise ConfigError(
            f"{setting.name} from {source} must be a single value, not {type(raw).__name__}"
        )
    if raw in setting.aliases:
        canonical = setting.aliases[raw]
        warnings.append(
            f"{setting.name} {raw!r} ({source}) is deprecated: use {canonical!r} "
            f"({'/'.join(setting.flags)} {canonical})"
        )
        raw = canonical
    if setting.choices and raw not in setting.choices:
        raise ConfigError(
            f"{setting.name} from {source} is {raw!r}{_did_you_mean(raw, setting.choices)}",
            fix=f"use one of {', '.join(setting.choices)}",
        )
    try:
        return setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{setting.name} from {source} is invalid ({exc})") from exc


def _did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_file_keys(config_file: Mapping[str, Any], known: set[str], path: str | None) -> None:
    if "config" in config_file:
        raise ConfigError(
            f"config file {path} sets config:, but a config file cannot name another",
            fix="pass --config FILE or set LG_ROTATE_CONFIG",
        )
    unknown = sorted(set(config_file) - known)
    if not unknown:
        return
    hints = [
        f"{key.replace('_', '-')}{_did_you_mean(key.replace('_', '-'), _names(known))}"
        for key in unknown
    ]
    raise ConfigError(
        f"unknown setting(s) in the config file {path or ''}: {', '.join(hints)}".replace(
            "file :", "file:"
        ),
        fix="check the spelling against lg-rotate <command> --help (README: Configuration)",
    )


def _names(keys: Iterable[str]) -> list[str]:
    return sorted(key.replace("_", "-") for key in keys)


def all_settings() -> dict[str, list[tuple[str, Setting]]]:
    """Every setting name -> the (command, declaration) pairs that take it."""
    found: dict[str, list[tuple[str, Setting]]] = {}
    for command in COMMANDS.values():
        for setting in command.settings:
            found.setdefault(setting.name, []).append((command.name, setting))
    return found


def _known_provider_options(provider: str | None) -> list[ProviderOption]:
    """Options of the built-in providers, plus ``provider``'s (a plugin) when named."""
    from providers import registry

    options: list[ProviderOption] = []
    names = [name for name in registry.BUILTIN if name != "memory"]
    if provider and provider not in names:
        names.append(provider)
    for name in names:
        try:
            options.extend(registry.load(name).options)
        except ConfigError:  # an unknown or broken provider fails later, with its own message
            continue
    return options


def known_variables(provider: str | None = None) -> set[str]:
    """Every ``LG_ROTATE_*`` variable lg-rotate reads (for the unknown-variable warning)."""
    names = {CONFIG_ENV}
    for declarations in all_settings().values():
        names.update(setting.env_name for _, setting in declarations)
    names.update(option.env_names[0] for option in _known_provider_options(provider))
    return names


def resolve_command(
    command: str, flags: argparse.Namespace, *, env: Mapping[str, str] | None = None
) -> Settings:
    """The one resolution of a command's settings: flags, environment, file, defaults.

    Also the chosen provider's options (loading its class, never its SDK: an unknown
    provider is an error here), the file's unknown keys (errors) and the environment's
    unknown ``LG_ROTATE_*`` names (warnings, in :attr:`Settings.warnings`).
    """
    spec = COMMANDS[command]
    env = os.environ if env is None else env
    flag_path = vars(flags).get("config")
    config_path = flag_path or env.get(CONFIG_ENV) or None
    config_file = load_yaml(config_path)
    core = resolve(
        settings=spec.settings,
        flags=flags,
        env=env,
        config_file=config_file,
        extra_known_keys=None,
        config_path=config_path,
        command=command,
    )
    provider = core.get("provider") if spec.store else None
    factory = _load_provider(provider) if provider else None
    option_settings = provider_option_settings(factory.options if factory else ())
    plugin_flags = parse_provider_option_flags(vars(flags).get("provider_option"))
    merged_flags = argparse.Namespace(**{**vars(flags), **plugin_flags})
    options = resolve(
        settings=option_settings,
        flags=merged_flags,
        env=env,
        config_file=config_file,
        extra_known_keys=None,
        config_path=config_path,
        command=command,
    )
    unknown_plugin_flags = sorted(set(plugin_flags) - {s.key for s in option_settings})
    if unknown_plugin_flags:
        names = [s.name for s in option_settings]
        raise ConfigError(
            f"provider {provider or '(none)'} has no option "
            + ", ".join(k.replace("_", "-") for k in unknown_plugin_flags),
            fix=f"its options: {', '.join(names) or 'none'} (lg-rotate providers)",
        )
    known_keys = {s.key for d in all_settings().values() for _, s in d}
    known_keys |= {o.key for o in _known_provider_options(provider)}
    _check_file_keys(config_file, known_keys, config_path)
    warnings = [*core.warnings, *options.warnings, *unknown_variables(env, provider=provider)]
    return Settings(
        command=command,
        declared=MappingProxyType({**core.declared, **options.declared}),
        values=MappingProxyType({**core.values, **options.values}),
        sources=MappingProxyType({**core.sources, **options.sources}),
        provider_options=tuple(s.key for s in option_settings),
        config_path=config_path,
        warnings=tuple(warnings),
    )


def _load_provider(name: str) -> ProviderFactory:
    from providers import registry

    return registry.load(name)


SERVICE_HOST_SUFFIX = "_SERVICE_HOST"


def unknown_variables(env: Mapping[str, str], *, provider: str | None = None) -> list[str]:
    """A warning per ``LG_ROTATE_*`` variable that is no setting, with a "did you mean".

    Service links are no typos: the kubelet gives a pod ``<SVC>_SERVICE_HOST``,
    ``<SVC>_SERVICE_PORT*`` and ``<SVC>_PORT*`` for every Service of its namespace, so a Service
    named ``lg-rotate-...`` (the per-pod webhook's) makes ``LG_ROTATE_...`` variables in pods
    that keep ``enableServiceLinks`` on (the shipped manifests turn it off). A group with its
    ``_SERVICE_HOST`` present is left out.
    """
    services = tuple(
        name.removesuffix(SERVICE_HOST_SUFFIX)
        for name in env
        if name.startswith(ENV_PREFIX) and name.endswith(SERVICE_HOST_SUFFIX)
    )
    candidates = sorted(
        name
        for name in env
        if name.startswith(ENV_PREFIX)
        and not any(name.startswith((f"{s}_SERVICE_", f"{s}_PORT")) for s in services)
    )
    if not candidates:
        return []
    known = known_variables(provider)
    return [
        f"{name} is not a setting of lg-rotate and is ignored"
        + (f" (did you mean {close[0]}?)" if close else "")
        for name in candidates
        if name not in known
        for close in [difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)]
    ]


# --- required settings -------------------------------------------------------------------------


def missing_error(missing: Sequence[tuple[Setting, str]], *, also: str = "") -> ConfigError:
    """One ConfigError naming every missing setting and all the ways to give each."""
    listed = ", ".join(f"--{s.name} ({why})" for s, why in missing)
    if also:
        listed = f"{listed}, and {also}" if listed else also
    flags = _and([f"--{s.name}" for s, _ in missing])
    variables = _and([s.env_name for s, _ in missing])
    keys = _and([f"{s.name}:" for s, _ in missing])
    fix = f"pass {flags}, set {variables}, or put {keys} in --config"
    return ConfigError(f"missing {listed}", fix=fix if missing else None)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def require(resolved: Settings, *keys: str, why: str) -> None:
    """ConfigError naming every missing setting (of ``keys``) and all the ways to give it."""
    missing = [k for k in keys if resolved.get(k) in (None, "")]
    if missing:
        raise missing_error([(_declared(resolved, k), why) for k in missing])


def _declared(resolved: Settings, key: str) -> Setting:
    return resolved.declared.get(key) or Setting(name=key.replace("_", "-"), help="")


IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def in_cluster_namespace() -> str | None:
    try:
        return Path(IN_CLUSTER_NAMESPACE_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None
