"""Durations as people write them: ``90``, ``90s``, ``10m``, ``1h``, ``1m30s``, ``1.5s``.

One parser and one printer for every duration lg-rotate reads or shows (settings, the
flags of ``audit`` and ``sandbox``, ``--help`` defaults), so ``--help`` says
``default: 1m`` and the same text is accepted back. A leaf module: stdlib only.
"""

from __future__ import annotations

import math
import re

UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
ACCEPTED = "a number of seconds, or a duration with units h, m, s, ms: 90s, 10m, 1h, 1m30s"
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)(ms|h|m|s)")


def parse_duration(text: str) -> float:
    """Seconds from ``90`` / ``90s`` / ``10m`` / ``1h`` / ``1m30s`` / ``250ms``.

    A bare number is seconds. Units may be combined, largest first, each at most once
    (``1h30m``, ``2m5s``). Raises ValueError saying what is accepted.
    """
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned:
        raise ValueError(f"empty duration (use {ACCEPTED})")
    try:
        value = float(cleaned)
    except ValueError:
        value = _with_units(cleaned, text)
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"not a duration: {text!r} (use {ACCEPTED})")
    if value < 0:
        raise ValueError(f"must not be negative: {text!r}")
    return value


def _with_units(cleaned: str, text: str) -> float:
    total = 0.0
    position = 0
    seen: list[str] = []
    for match in _PART.finditer(cleaned):
        unit = match.group(2)
        if match.start() != position or unit in seen or (seen and _rank(unit) <= _rank(seen[-1])):
            break
        total += float(match.group(1)) * UNITS[unit]
        seen.append(unit)
        position = match.end()
    if not seen or position != len(cleaned):
        raise ValueError(f"not a duration: {text!r} (use {ACCEPTED})")
    return total


def _rank(unit: str) -> int:
    return list(UNITS).index(unit)


def parse_whole_seconds(text: str) -> int:
    """A duration that must be a positive whole number of seconds (``600``, ``10m``)."""
    value = parse_duration(text)
    if value < 1 or value != int(value):
        raise ValueError(f"must be a whole number of seconds, at least 1s: {text!r}")
    return int(value)


def format_duration(seconds: float) -> str:
    """The shortest text :func:`parse_duration` reads back: ``1m``, ``1m30s``, ``1.5s``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    whole = int(seconds)
    fraction = seconds - whole
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if secs or fraction:
        parts.append(f"{secs + fraction:g}s")
    return "".join(parts)
