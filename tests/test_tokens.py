"""rotator/tokens.py: normalisation, validation, redaction, expiry and fingerprints."""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rotator.errors import ExitCode, TokenExpiredError, TokenFormatError, TokenTenantError
from rotator.tokens import (
    MAX_LENGTH,
    MIN_LENGTH,
    REDACTED,
    TOKEN_SHAPED,
    EnrollToken,
    Secret,
    fingerprint,
    format_timestamp,
    normalize,
    parse_timestamp,
)

BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
TOKEN = "ABCD-EFGH-IJKL-MNOP-QRST-UVWX"
CANONICAL = "ABCDEFGHIJKLMNOPQRSTUVWX"
NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

canonical_tokens = st.text(alphabet=BASE32, min_size=MIN_LENGTH, max_size=MAX_LENGTH)
# Characters that are neither base32 (in either case, ASCII only) nor a dash.
foreign_chars = st.characters(codec="utf-8", exclude_characters=BASE32 + BASE32.lower() + "-")


def grouped(value: str) -> str:
    return "-".join(value[i : i + 4] for i in range(0, len(value), 4))


# --- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        TOKEN,
        CANONICAL,
        TOKEN.lower(),
        CANONICAL.lower(),
        f"  {TOKEN}\n",
        f"\t{CANONICAL}\r\n",
        "abcd-EFGH-ijkl-MNOP-qrst-UVWX",
    ],
)
def test_accepted_forms_normalise_to_the_bare_upper_case_token(raw: str) -> None:
    assert normalize(raw).reveal() == CANONICAL


def test_a_short_last_group_is_accepted() -> None:
    assert normalize("ABCD-EFGH-IJKL-MNOP-QRST-UVWX-YZ").reveal() == CANONICAL + "YZ"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("ABC-DEFG-HIJK-LMNO-PQRS-TUVW-X", "dashes are misplaced"),
        ("ABCD--EFGH-IJKL-MNOP-QRST-UVWX", "dashes are misplaced"),
        ("-ABCD-EFGH-IJKL-MNOP-QRST-UVWX", "dashes are misplaced"),
        ("ABCD-EFGH-IJKL-MNOP-QRST-UVWX-", "dashes are misplaced"),
        ("ABCDEFGH-IJKLMNOP-QRSTUVWX", "dashes are misplaced"),
        ("ABCD EFGH IJKL MNOP QRST UVWX", "whitespace at position 5"),
        ("ABCDEFGHIJKLMNOPQRSTUVW0", "outside base32 (A-Z, 2-7) at position 24"),
        ("ABCDEFGHIJKLMNOPQRSTUVW1", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVW8", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVW9", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVWX====", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVWß", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVWX\u0131", "outside base32"),
        ("ABCDEFGHIJKLMNOPQRSTUVW", "23 base32 characters"),
        ("A" * 33, "33 base32 characters"),
        ("ABCD-EFGH-IJKL-MNOP-QRST-UVW", "23 base32 characters"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(raw: str, words: str) -> None:
    with pytest.raises(TokenFormatError, match=words.replace("(", r"\(").replace(")", r"\)")) as e:
        normalize(raw)
    assert e.value.exit_code == ExitCode.TOKEN
    assert raw.strip() == "" or raw.strip() not in e.value.one_line()


@given(canonical_tokens)
@example("A" * MIN_LENGTH)
@example("7" * MAX_LENGTH)
def test_any_valid_token_round_trips_in_every_printed_form(value: str) -> None:
    for form in (value, value.lower(), grouped(value), grouped(value).lower(), f" {value}\n"):
        secret = normalize(form)
        assert secret.reveal() == value
        assert fingerprint(secret.reveal()) == fingerprint(value)
    assert normalize(normalize(grouped(value)).reveal()).reveal() == value


@given(canonical_tokens, foreign_chars, st.integers(min_value=1))
@example(CANONICAL, "\u00df", 3)  # upper-cases to "SS"
@example(CANONICAL, "\u0131", 3)  # dotless i upper-cases to "I"
@example(CANONICAL, " ", 3)
def test_a_foreign_character_inside_a_token_is_rejected(value: str, char: str, where: int) -> None:
    position = 1 + where % (len(value) - 1)
    raw = value[:position] + char + value[position:]
    with pytest.raises(TokenFormatError) as caught:
        normalize(raw)
    assert value not in caught.value.one_line()


@given(
    st.text(alphabet=BASE32, max_size=MIN_LENGTH - 1)
    | st.text(alphabet=BASE32, min_size=MAX_LENGTH + 1, max_size=80)
)
def test_wrong_lengths_are_rejected(value: str) -> None:
    with pytest.raises(TokenFormatError):
        normalize(value)


@given(st.text(max_size=60))
def test_normalize_either_returns_canonical_base32_or_raises_token_format_error(raw: str) -> None:
    try:
        secret = normalize(raw)
    except TokenFormatError:
        return
    value = secret.reveal()
    assert value.isascii()
    assert set(value) <= set(BASE32)
    assert MIN_LENGTH <= len(value) <= MAX_LENGTH


@given(canonical_tokens)
def test_printed_forms_are_token_shaped_for_the_log_filter(value: str) -> None:
    for form in (value, grouped(value), grouped(value).lower()):
        line = f"token={form} done"
        assert TOKEN_SHAPED.sub(REDACTED, line) == f"token={REDACTED} done"


def test_token_shaped_does_not_match_inside_longer_words_or_hashes() -> None:
    assert not TOKEN_SHAPED.search("X" + CANONICAL + "X" * 10)
    assert not TOKEN_SHAPED.search(hashlib.sha256(b"x").hexdigest())
    assert not TOKEN_SHAPED.search("short ABCD-EFGH words")


# --- Secret ---------------------------------------------------------------------------------


def test_secret_never_shows_itself() -> None:
    secret = Secret(CANONICAL)
    shown = [
        repr(secret),
        str(secret),
        f"{secret}",
        f"{secret!r}",
        f"{secret!s}",
        f"{secret:>40}",
        "{}".format(secret),  # noqa: UP032 - str.format is what is being tested
        "%s" % secret,  # noqa: UP031 - %-formatting is what is being tested
        "%r" % (secret,),  # noqa: UP031
        repr([secret]),
        repr({"token": secret}),
    ]
    for text in shown:
        assert CANONICAL not in text
        assert REDACTED in text


def test_logging_a_secret_shows_it_redacted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lg_rotate.test_tokens")
    logger.addHandler(handler)
    try:
        logger.warning("token %s / %r", Secret(CANONICAL), Secret(CANONICAL))
    finally:
        logger.removeHandler(handler)
    assert CANONICAL not in stream.getvalue()
    assert stream.getvalue().count(REDACTED) == 2


def test_secret_refuses_pickling_and_copying() -> None:
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(Secret(CANONICAL))
    with pytest.raises(TypeError):
        copy.copy(Secret(CANONICAL))


def test_secret_equality_hash_and_length() -> None:
    assert Secret(CANONICAL) == Secret(CANONICAL)
    assert Secret(CANONICAL) != Secret(CANONICAL.lower())
    assert Secret(CANONICAL) != CANONICAL
    assert hash(Secret(CANONICAL)) == hash(Secret(CANONICAL))
    assert len({Secret(CANONICAL), Secret(CANONICAL)}) == 1
    assert len(Secret(CANONICAL)) == 24
    assert Secret(CANONICAL).reveal() == CANONICAL


# --- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_is_sha256_of_the_canonical_form() -> None:
    assert fingerprint(CANONICAL) == hashlib.sha256(CANONICAL.encode()).hexdigest()


def test_fingerprint_is_stable_across_formatting() -> None:
    forms = [TOKEN, CANONICAL, TOKEN.lower(), f" {CANONICAL.lower()}\n"]
    tokens = [EnrollToken.parse(value=f, tenant_id="acme", expires_at=NOW) for f in forms]
    assert len({t.fingerprint for t in tokens}) == 1
    assert tokens[0].short_fingerprint == tokens[0].fingerprint[:12]
    assert tokens[0].fingerprint == fingerprint(CANONICAL)


# --- EnrollToken ----------------------------------------------------------------------------


def test_enroll_token_parses_rfc3339_expiry_and_hides_its_value() -> None:
    token = EnrollToken.parse(value=TOKEN, tenant_id=" acme ", expires_at="2030-01-01T12:10:00Z")
    assert token.tenant_id == "acme"
    assert token.expires_at == NOW + timedelta(minutes=10)
    assert CANONICAL not in repr(token)
    assert CANONICAL not in str(token)
    offset = EnrollToken.parse(
        value=TOKEN, tenant_id="acme", expires_at="2030-01-01T13:10:00+01:00"
    )
    assert offset.expires_at == token.expires_at


@pytest.mark.parametrize("expires_at", ["2030-01-01T12:10:00", "tomorrow", ""])
def test_enroll_token_needs_a_zoned_timestamp(expires_at: str) -> None:
    with pytest.raises(TokenFormatError, match="RFC 3339"):
        EnrollToken.parse(value=TOKEN, tenant_id="acme", expires_at=expires_at)


def test_enroll_token_refuses_a_naive_datetime_and_an_empty_tenant() -> None:
    with pytest.raises(TokenFormatError, match="time zone"):
        EnrollToken.parse(value=TOKEN, tenant_id="acme", expires_at=datetime(2030, 1, 1))
    with pytest.raises(TokenTenantError, match="no tenant"):
        EnrollToken.parse(value=TOKEN, tenant_id="  ", expires_at=NOW)


def test_check_usable_enforces_tenant_expiry_and_minimum_ttl() -> None:
    token = EnrollToken.parse(value=TOKEN, tenant_id="acme", expires_at=NOW + timedelta(minutes=5))
    token.check_usable(tenant_id="acme", min_ttl=timedelta(seconds=60), now=NOW)
    with pytest.raises(TokenTenantError, match="'acme', not 'globex'"):
        token.check_usable(tenant_id="globex", min_ttl=timedelta(0), now=NOW)
    with pytest.raises(TokenExpiredError, match="less than the minimum of 600s") as short:
        token.check_usable(tenant_id="acme", min_ttl=timedelta(minutes=10), now=NOW)
    with pytest.raises(TokenExpiredError, match="expired") as expired:
        token.check_usable(tenant_id="acme", min_ttl=timedelta(0), now=NOW + timedelta(minutes=5))
    for error in (short.value, expired.value):
        assert CANONICAL not in error.one_line()
        assert token.short_fingerprint in error.message
    assert token.ttl_left(now=NOW) == timedelta(minutes=5)
    assert not token.is_expired(now=NOW)
    assert token.is_expired(now=NOW + timedelta(minutes=5))


def test_timestamps_round_trip_in_utc() -> None:
    local = datetime(2030, 1, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
    text = format_timestamp(local)
    assert text == "2030-01-01T12:00:00Z"
    assert parse_timestamp(text) == NOW
    assert parse_timestamp("2030-01-01t12:00:00z") == NOW
    with pytest.raises(ValueError, match="time zone"):
        parse_timestamp("2030-01-01T12:00:00")
