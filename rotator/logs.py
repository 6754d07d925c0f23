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
    """Install one redacting stderr handler on the root logger (idempotent).

    The handler sits on the root so that library records (which propagate there, and
    which a logger-level filter would not see) are redacted too. Libraries stay at
    WARNING whatever ``level`` says: SDKs log whole request bodies at DEBUG.
    """
    stream = stream or sys.stderr
    if log_format == "auto":
        log_format = "text" if stream.isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactingFilter())
    handler.set_name("lg-rotate")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "lg-rotate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(level.upper())
