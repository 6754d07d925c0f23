"""Logging: human-readable on a terminal, JSON lines otherwise, always redacted.

Tokens are kept out of log calls by construction (they travel as ``Secret``); the
:class:`RedactingFilter` is the second line of defence: it rewrites anything
token-shaped in the final message, in exception text and in extra fields.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from rotator.tokens import REDACTED, TOKEN_SHAPED

ROOT = "lg_rotate"
FORMATS = ("auto", "text", "json")
LEVELS = ("debug", "info", "warning", "error")

# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    return TOKEN_SHAPED.sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """Rewrites token-shaped text in a record before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # Format the traceback now, redacted, so no formatter sees the raw one.
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        for key, value in list(vars(record).items()):
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, redact(value))
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS:
                entry[key] = value
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")


def configure(
    *, log_format: str = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Install one stderr handler on the ``lg_rotate`` logger (idempotent)."""
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    # Libraries log through their own loggers: keep their noise out and their text redacted.
    for noisy in ("urllib3", "kubernetes", "botocore", "hvac", "google", "grpc"):
        lib = logging.getLogger(noisy)
        lib.setLevel(logging.WARNING)
        if not any(isinstance(f, RedactingFilter) for f in lib.filters):
            lib.addFilter(RedactingFilter())
