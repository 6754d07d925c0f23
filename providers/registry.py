"""Built-in providers and third-party plugins, loaded lazily by name.

Built-ins are named by import path so that listing them imports no SDK. Plugins
register a class in the ``lg_rotate.providers`` entry-point group (docs/PROVIDERS.md);
a plugin may not shadow a built-in name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from providers.base import Provider, ProviderFactory
from rotator.errors import ConfigError, ProviderNotInstalledError, UnknownProviderError

ENTRY_POINT_GROUP = "lg_rotate.providers"

BUILTIN: Mapping[str, str] = {
    "memory": "providers.memory:MemoryProvider",
    "vault": "providers.vault:VaultProvider",
    "aws": "providers.aws:AwsProvider",
    "gcp": "providers.gcp:GcpProvider",
}


@dataclass(frozen=True, kw_only=True)
class ProviderInfo:
    name: str
    target: str  # "module:Class"
    origin: str  # "built-in" or the distribution that registered the plugin


def discover() -> dict[str, ProviderInfo]:
    """Every known provider, built-ins first; plugins cannot replace a built-in."""
    # Scanning installed distributions costs milliseconds and the CLI asks often while
    # it builds its parser: cache per sys.path (a changed path may bring new plugins).
    return dict(_discover(tuple(sys.path)))


@functools.lru_cache(maxsize=4)
def _discover(path: tuple[str, ...]) -> dict[str, ProviderInfo]:
    from importlib.metadata import entry_points  # reads every distribution: not for a built-in

    found = {
        name: ProviderInfo(name=name, target=target, origin="built-in")
        for name, target in BUILTIN.items()
    }
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            continue
        dist = ep.dist.name if ep.dist is not None else "unknown distribution"
        found[ep.name] = ProviderInfo(name=ep.name, target=ep.value, origin=dist)
    return found


def load(name: str) -> ProviderFactory:
    """The provider class for ``name`` (imports its module, not its SDK)."""
    if name in BUILTIN:  # no plugin may shadow a built-in: no need to scan distributions
        info: ProviderInfo | None = ProviderInfo(name=name, target=BUILTIN[name], origin="built-in")
    else:
        info = discover().get(name)
    if info is None:
        known = discover()
        raise UnknownProviderError(
            f"unknown provider {name!r}",
            fix=f"use one of {', '.join(sorted(known))} (lg-rotate providers lists them)",
        )
    module_name, _, attr = info.target.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr) if attr else module
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"provider {name!r} from {info.origin} could not be loaded "
            f"({type(exc).__name__}: {exc})",
            fix="reinstall the package that provides it",
        ) from exc
    return cast(ProviderFactory, factory)


def missing_modules(factory: ProviderFactory) -> list[str]:
    """SDK modules the provider needs that are not installed (checked without importing)."""
    missing = []
    for module in factory.sdk_modules:
        try:
            if importlib.util.find_spec(module) is None:
                missing.append(module)
        except ModuleNotFoundError:  # a missing parent package
            missing.append(module)
    return missing


DISTRIBUTION = "linuxguard-rotator"  # pyproject.toml [project] name: pip's name for lg-rotate


def install_hint(factory: ProviderFactory) -> str:
    """The install that brings a built-in provider's SDK: the extra of lg-rotate's own
    distribution, from a package index or from a clone (README "Set-up" shows both)."""
    if factory.extra:
        return (
            f"pip install '{DISTRIBUTION}[{factory.extra}]' "
            f"(from a clone of lg-rotate: pip install '.[{factory.extra}]')"
        )
    return "reinstall the package that provides this provider"


def require_installed(name: str) -> ProviderFactory:
    """The provider class, or ProviderNotInstalledError naming the install that fixes it."""
    factory = load(name)
    missing = missing_modules(factory)
    if missing:
        raise ProviderNotInstalledError(
            f"provider {name!r} needs {', '.join(missing)}, which is not installed",
            fix=install_hint(factory),
        )
    return factory


def create(name: str, options: Mapping[str, str | None]) -> Provider:
    """Build a ready provider, or say exactly which install fixes a missing SDK."""
    factory = require_installed(name)
    for option in factory.options:
        if option.required and not options.get(option.key):
            env = f"LG_ROTATE_{option.key.upper()}"
            native = f" or {' / '.join(option.env)}" if option.env else ""
            raise ConfigError(
                f"provider {name!r} needs --{option.name}",
                fix=f"pass --{option.name}, set {env}{native}, or put {option.key} in --config",
            )
    return factory.from_options(options)
