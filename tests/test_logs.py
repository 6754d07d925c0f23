"""Logs: JSON lines or text, and redaction as the second line of defence."""

from __future__ import annotations

import io
import json
import logging

import pytest

from rotator import logs

TOKEN = "ABCD-EFGH-IJKL-MNOP-QRST-UVWX"
BARE = "ABCDEFGHIJKLMNOPQRSTUVWXYZ23"


@pytest.fixture
def captured():
    stream = io.StringIO()
    logs.configure(log_format="json", level="debug", stream=stream)
    yield stream
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "lg-rotate"]:
        root.removeHandler(handler)


def lines(stream):
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_with_extra_fields(captured):
    logging.getLogger("lg_rotate.test").info("rotated %s", "acme", extra={"version": "7"})
    (entry,) = lines(captured)
    assert entry["msg"] == "rotated acme"
    assert entry["level"] == "info"
    assert entry["logger"] == "lg_rotate.test"
    assert entry["version"] == "7"


def test_token_shaped_text_is_redacted_in_messages_args_and_extras(captured):
    log = logging.getLogger("lg_rotate.test")
    log.warning("grouped %s bare %s", TOKEN, BARE, extra={"detail": f"x {TOKEN.lower()} y"})
    text = captured.getvalue()
    assert TOKEN not in text
    assert BARE not in text
    assert TOKEN.lower() not in text
    assert text.count(logs.REDACTED) == 3


def test_tracebacks_are_redacted(captured):
    try:
        raise ValueError(f"bad token {BARE}")
    except ValueError:
        logging.getLogger("lg_rotate.test").exception("failed")
    text = captured.getvalue()
    assert BARE not in text
    assert "ValueError" in text


def test_library_records_are_redacted_and_held_at_warning(captured):
    logging.getLogger("somelibrary.client").debug("body %s", BARE)  # below WARNING: dropped
    logging.getLogger("somelibrary.client").warning("retrying body %s", BARE)
    text = captured.getvalue()
    assert BARE not in text
    assert "retrying body" in text
    assert len(lines(captured)) == 1


def test_hex_digests_and_ordinary_words_are_not_redacted():
    digest = "a" * 64
    assert logs.redact(f"sha256 {digest} tenant ACME-CORP") == f"sha256 {digest} tenant ACME-CORP"
