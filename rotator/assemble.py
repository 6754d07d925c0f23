"""The composition root: builds a command's parts from its resolved settings, in one place.

One direction::

    flags, LG_ROTATE_*, native env, config file
        -> config.resolve_command  (once: an immutable Settings, a Source per value)
        -> assemble.compose        (checks every required setting at once, then builds the
                                    provider, the minter, the Kubernetes parts, the Rotator;
                                    derives the namespace from the kubeconfig context)
        -> the command             (runs what it is given; cli prints the result)

Each builder imports what it needs only when called, so ``lg-rotate --help`` and the Vault
path never import boto3, the GCP client or (with ``--target none``) the Kubernetes client.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from providers import registry
from providers.base import Provider, ProviderOption
from rotator import config
from rotator.config import Setting, Settings, Source
from rotator.errors import ConfigError
from rotator.targets import Lock, Target
from rotator.tokens import Secret

if TYPE_CHECKING:
    from rotator.kube.api import Connection
    from rotator.linuxguard import LinuxGuardClient
    from rotator.rotation import Rotator

BUILTIN_WITH_OPTIONS = ("vault", "aws", "gcp")
API_KEY_ENV = "LINUXGUARD_API_KEY"


def builtin_provider_options() -> list[ProviderOption]:
    """Options of the built-in providers (their modules import no SDK at import time)."""
    options: list[ProviderOption] = []
    for name in BUILTIN_WITH_OPTIONS:
        try:
            options.extend(registry.load(name).options)
        except ConfigError:  # a provider module that cannot load still must not break --help
            continue
    return options


def secret_option_env(provider_name: str | None) -> frozenset[str]:
    """The variables of provider options marked ``secret`` (built-ins and ``provider_name``):
    ``exec`` withholds them from its command (see ``launch.CREDENTIAL_ENV``)."""
    options = builtin_provider_options()
    if provider_name and provider_name not in BUILTIN_WITH_OPTIONS:
        with contextlib.suppress(ConfigError):  # it fails later, with its own message
            options.extend(registry.load(provider_name).options)
    return frozenset(name for option in options if option.secret for name in option.env_names)


def option_settings(options: list[ProviderOption]) -> list[Setting]:
    return config.provider_option_settings(options)


parse_provider_option_flags = config.parse_provider_option_flags


@dataclass
class ApiKeyVault:
    """Holds the LinuxGuard API key taken out of the environment at startup.

    ``main`` calls :meth:`capture` first thing, so the key leaves ``os.environ`` (and
    with it the environment of any child we start) before anything else runs, and its
    bytes are erased from the exec-time block that ``/proc/<pid>/environ`` shows
    (:mod:`rotator.environ`).
    """

    from_env: Secret | None = None

    def capture(self, env: os._Environ[str] | dict[str, str] | None = None) -> None:
        real = env is None or env is os.environ
        env = os.environ if env is None else env
        value = env.pop(API_KEY_ENV, None)
        if real:
            from rotator.environ import scrub_exec_environ

            scrub_exec_environ([API_KEY_ENV])
        if value is not None and value.strip():
            self.from_env = Secret(value.strip())


API_KEY = ApiKeyVault()


# --- the parts -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class KubeParts:
    target: Target
    lock: Lock
    namespace: str
    api_client: Any


@dataclass(frozen=True, kw_only=True)
class Parts:
    """What a command runs with: its settings (final, with provenance) and built parts."""

    settings: Settings
    provider: Provider | None = None
    minter: LinuxGuardClient | None = None
    kube: KubeParts | None = None
    rotator: Rotator | None = None

    @property
    def min_ttl(self) -> timedelta:
        return min_ttl(self.settings)

    def require_provider(self) -> Provider:
        assert self.provider is not None, f"{self.settings.command} has no provider"
        return self.provider

    def require_minter(self) -> LinuxGuardClient:
        assert self.minter is not None, f"{self.settings.command} has no minter"
        return self.minter

    def require_kube(self) -> KubeParts:
        assert self.kube is not None, f"{self.settings.command} has no Kubernetes parts"
        return self.kube

    def require_rotator(self) -> Rotator:
        assert self.rotator is not None, f"{self.settings.command} has no rotator"
        return self.rotator


def compose(settings: Settings) -> Parts:
    """Check, then build, everything ``settings.command`` needs (see the module docstring).

    Every missing required setting is reported in one ConfigError before anything is
    built or contacted; then the provider (its SDK), the minter (the API key), the
    Kubernetes connection (the namespace, if not given, from the kubeconfig context, else
    the pod's, else ``default``) and the Rotator.
    """
    spec = config.COMMANDS[settings.command]
    mints = spec.mints and not settings.get("from_store")
    check_required(settings, mints=mints)
    kube_wanted = spec.kube is not None and settings.get("target") != "none"
    if spec.kube == "required" and not kube_wanted:
        raise ConfigError(
            f"{settings.command} works on the Kubernetes Secret", fix="drop --target none"
        )
    provider = build_provider(settings) if spec.store else None
    minter = build_minter(settings) if mints else None
    kube = None
    if kube_wanted:
        kube, settings = build_kube(settings)
    rotator = None
    if provider is not None and minter is not None:
        from rotator.rotation import Rotator

        rotator = Rotator(
            minter=minter,
            provider=provider,
            tenant=settings.tenant,
            target=kube.target if kube else None,
            lock=kube.lock if kube else None,
            min_ttl=min_ttl(settings),
            ttl_seconds=settings.ttl,
            keep_versions=settings.keep_versions,
        )
    return Parts(settings=settings, provider=provider, minter=minter, kube=kube, rotator=rotator)


def check_required(settings: Settings, *, mints: bool) -> None:
    """Raise one ConfigError listing every missing required setting of the command."""
    spec = config.COMMANDS[settings.command]
    wanted: list[tuple[str, str]] = []
    if spec.store:
        chosen = "no secrets store chosen: vault, aws, gcp, memory or a plugin"
        wanted.append(("provider", f"{chosen}; lg-rotate providers lists them"))
        wanted.append(("tenant", spec.why))
    if mints:
        wanted.append(("linuxguard_url", "where to mint tokens"))
    if spec.store and settings.get("provider"):
        factory = registry.require_installed(settings.provider)  # first: nothing else helps
        wanted.extend(
            (option.key, f"the {settings.provider} provider needs it")
            for option in factory.options
            if option.required
        )
    wanted.extend(spec.requires)
    missing = [
        (settings.declared[key], why)
        for key, why in wanted
        if key in settings.declared and settings.get(key) in (None, "")
    ]
    no_key = mints and API_KEY.from_env is None and not settings.get("api_key_file")
    if not missing:
        return  # a missing API key alone: load_api_key says so, in its own words
    also = f"the LinuxGuard API key ({API_KEY_ENV} or --api-key-file)" if no_key else ""
    raise config.missing_error(missing, also=also)


def build_provider(settings: Settings) -> Provider:
    return registry.create(settings.provider, settings.provider_option_values())


def build_minter(settings: Settings) -> LinuxGuardClient:
    from rotator.linuxguard import LinuxGuardClient, load_api_key
    from rotator.retrying import RetryPolicy

    config.require(settings, "linuxguard_url", why="where to mint tokens")
    env = {API_KEY_ENV: API_KEY.from_env.reveal()} if API_KEY.from_env else {}
    api_key = load_api_key(env=env, api_key_file=settings.api_key_file)
    return LinuxGuardClient(
        base_url=settings.linuxguard_url,
        api_key=api_key,
        timeout=settings.http_timeout,
        retry=RetryPolicy(budget=settings.mint_budget),
    )


def build_kube(settings: Settings) -> tuple[KubeParts, Settings]:
    """The Secret target and the Lease lock, and the settings with the namespace derived."""
    from rotator.kube.api import open_connection
    from rotator.kube.lease import LeaseLock
    from rotator.kube.secret import SecretTarget

    connection = open_connection(kubeconfig=settings.kubeconfig, context=settings.context)
    namespace, source = resolve_namespace(settings, connection)
    if source != settings.source("namespace"):
        settings = settings.derive("namespace", namespace, source)
    target = SecretTarget(
        api_client=connection.api_client,
        namespace=namespace,
        name=settings.secret,
        token_key=settings.token_key,
        tenant_key=settings.tenant_key,
        events=True,  # a Rotated Event on the Secret per delivery (watch records its own)
    )
    lock = LeaseLock(
        api_client=connection.api_client,
        namespace=namespace,
        secret_name=settings.secret,
        duration=settings.lock_duration,
        wait=settings.lock_wait,
    )
    parts = KubeParts(
        target=target, lock=lock, namespace=namespace, api_client=connection.api_client
    )
    return parts, settings


def resolve_namespace(settings: Settings, connection: Connection) -> tuple[str, Source]:
    """kubectl's order: the setting (flag, LG_ROTATE_NAMESPACE, file), the kubeconfig
    context's namespace, the pod's (in-cluster), ``default``."""
    if settings.get("namespace"):
        return settings.namespace, settings.source("namespace")
    if connection.namespace:
        return connection.namespace, Source("kubeconfig", connection.describe_context())
    pod_namespace = config.in_cluster_namespace()
    if pod_namespace:
        return pod_namespace, Source("in-cluster", config.IN_CLUSTER_NAMESPACE_FILE)
    return "default", config.DEFAULT


def min_ttl(settings: Settings) -> timedelta:
    return timedelta(seconds=float(settings.min_ttl))
