"""Builds the runtime parts (provider, minter, target, lock) from resolved settings.

The CLI parses; this module assembles; ``rotation`` runs. Each builder imports the
module it needs only when called, so ``lg-rotate --help`` and the Vault path never
import boto3, the GCP client or (with ``--target none``) the Kubernetes client.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from providers import registry
from providers.base import Provider, ProviderOption
from rotator import config
from rotator.errors import ConfigError
from rotator.targets import Lock, Target
from rotator.tokens import Secret

if TYPE_CHECKING:
    from rotator.linuxguard import LinuxGuardClient

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


def option_settings(options: list[ProviderOption]) -> list[config.Setting]:
    return [config.Setting(name=o.name, help=o.help, default=o.default, env=o.env) for o in options]


def parse_provider_option_flags(pairs: list[str] | None) -> dict[str, str]:
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


def resolve_provider(
    *, resolved: config.Resolved, flags: argparse.Namespace, config_file: Mapping[str, Any]
) -> Provider:
    name = resolved.provider
    if not name:
        raise ConfigError(
            "no secrets store chosen (--provider)",
            fix="pass --provider vault|aws|gcp|memory, or set LG_ROTATE_PROVIDER "
            "(lg-rotate providers lists them)",
        )
    factory = registry.load(name)
    # Built-in provider flags were parsed as ordinary flags; plugin options arrive as
    # --provider-option pairs. Both go through the same precedence rules.
    plugin_pairs = parse_provider_option_flags(getattr(flags, "provider_option", None))
    merged = argparse.Namespace(**vars(flags))
    for key, value in plugin_pairs.items():
        setattr(merged, key, value)
    options = config.resolve(
        settings=option_settings(list(factory.options)),
        flags=merged,
        config_file={k: v for k, v in config_file.items() if k in {o.key for o in factory.options}},
    )
    return registry.create(name, {k: _as_text(v) for k, v in options.values.items()})


def _as_text(value: Any) -> str | None:
    return None if value is None else str(value)


def build_minter(resolved: config.Resolved) -> LinuxGuardClient:
    from rotator.linuxguard import LinuxGuardClient, load_api_key
    from rotator.retrying import RetryPolicy

    config.require(resolved, "linuxguard_url", why="where to mint tokens")
    env = {"LINUXGUARD_API_KEY": API_KEY.from_env.reveal()} if API_KEY.from_env else {}
    api_key = load_api_key(env=env, api_key_file=resolved.api_key_file)
    return LinuxGuardClient(
        base_url=resolved.linuxguard_url,
        api_key=api_key,
        timeout=resolved.http_timeout,
        retry=RetryPolicy(budget=resolved.mint_budget),
    )


@dataclass(frozen=True, kw_only=True)
class KubeParts:
    target: Target
    lock: Lock
    namespace: str
    api_client: Any


def build_kube(resolved: config.Resolved) -> KubeParts | None:
    if resolved.target == "none":
        return None
    from rotator.kube.api import connect
    from rotator.kube.lease import LeaseLock
    from rotator.kube.secret import SecretTarget

    namespace = resolved.namespace or config.in_cluster_namespace() or "default"
    api_client = connect(kubeconfig=resolved.kubeconfig, context=resolved.context)
    target = SecretTarget(
        api_client=api_client,
        namespace=namespace,
        name=resolved.secret,
        token_key=resolved.token_key,
        tenant_key=resolved.tenant_key,
        events=True,  # a Rotated Event on the Secret per delivery (watch records its own)
    )
    lock = LeaseLock(
        api_client=api_client,
        namespace=namespace,
        secret_name=resolved.secret,
        duration=resolved.lock_duration,
        wait=resolved.lock_wait,
    )
    return KubeParts(target=target, lock=lock, namespace=namespace, api_client=api_client)


def min_ttl(resolved: config.Resolved) -> timedelta:
    return timedelta(seconds=float(resolved.min_ttl))
