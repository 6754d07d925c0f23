"""The LinuxGuard client against the real sandbox over sockets, and the retry policy.

Sleeps are injected (``FakeTime``): waits are recorded and advance a fake monotonic
clock, so backoff and ``Retry-After`` are asserted without the suite sleeping.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fixtures.ports import free_port
from fixtures.sandbox import SANDBOX_API_KEY
from rotator import __version__
from rotator.errors import (
    ConfigError,
    ExitCode,
    SourceError,
    SourceRejectedError,
    SourceUnavailableError,
    TokenExpiredError,
    TokenFormatError,
    TokenTenantError,
    TransientSourceError,
)
from rotator.linuxguard import (
    USER_AGENT,
    LinuxGuardClient,
    load_api_key,
    parse_retry_after,
    sanitize_server_message,
)
from rotator.retrying import RetriesExhausted, RetryPolicy, retry_call
from rotator.sandbox import SandboxServer
from rotator.tokens import TOKEN_SHAPED, Secret, utcnow

MIN_TTL = timedelta(seconds=60)
A_TOKEN = "ABCD-EFGH-IJKL-MNOP-QRST-UVWX"


@dataclass
class FakeTime:
    now: float = 1000.0
    sleeps: list[float] = field(default_factory=list)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def policy(fake: FakeTime, **overrides: float) -> RetryPolicy:
    settings = {"max_attempts": 5, "base_delay": 0.5, "max_delay": 8.0, "budget": 60.0}
    settings.update(overrides)
    return RetryPolicy(
        max_attempts=int(settings["max_attempts"]),
        base_delay=settings["base_delay"],
        max_delay=settings["max_delay"],
        budget=settings["budget"],
        sleep=fake.sleep,
        clock=fake.clock,
        random=lambda: 1.0,
    )


def client_for(
    sandbox: SandboxServer, fake: FakeTime | None = None, *, key: str | None = None, **kw: float
) -> LinuxGuardClient:
    return LinuxGuardClient(
        base_url=sandbox.url,
        api_key=Secret(key or sandbox.api_key),
        timeout=kw.pop("timeout", 5.0),
        retry=policy(fake or FakeTime(), **kw),
    )


# --- success ------------------------------------------------------------------------------


def test_mint_returns_a_validated_token(sandbox: SandboxServer) -> None:
    token = client_for(sandbox).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert token.tenant_id == "acme"
    assert 595 <= token.ttl_left().total_seconds() <= 600
    assert "-" not in token.value.reveal(), "the canonical form is bare"
    [minted] = sandbox.minted()
    assert token.fingerprint == minted.fingerprint
    assert sandbox.requests("/api/tokens/new") == 1


def test_mint_passes_ttl_seconds(sandbox: SandboxServer) -> None:
    token = client_for(sandbox).mint(tenant_id="acme", min_ttl=MIN_TTL, ttl_seconds=120)
    assert 115 <= token.ttl_left().total_seconds() <= 120
    assert sandbox.minted()[0].ttl_seconds == 120


def test_a_tenant_bound_key_works_for_its_tenant(sandbox: SandboxServer) -> None:
    key = sandbox.add_api_key(tenant_id="acme")
    assert client_for(sandbox, key=key).mint(tenant_id="acme", min_ttl=MIN_TTL).tenant_id == "acme"


def test_a_base_url_with_a_trailing_slash_works(sandbox: SandboxServer) -> None:
    client = LinuxGuardClient(base_url=sandbox.url + "/", api_key=Secret(sandbox.api_key))
    assert client.mint_url == f"{sandbox.url}/api/tokens/new"
    assert client.mint(tenant_id="acme", min_ttl=MIN_TTL).tenant_id == "acme"


def test_user_agent_names_the_version() -> None:
    assert f"lg-rotate/{__version__}" == USER_AGENT


# --- transient failures -------------------------------------------------------------------


def test_retries_after_two_503_then_succeeds(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=503, count=2)
    fake = FakeTime()
    token = client_for(sandbox, fake).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert token.tenant_id == "acme"
    assert sandbox.requests("/api/tokens/new") == 3
    assert fake.sleeps == [0.5, 1.0], "exponential backoff (jitter pinned to its ceiling)"


def test_429_retry_after_seconds_is_honoured(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=429, retry_after=3)
    fake = FakeTime()
    client_for(sandbox, fake).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert len(fake.sleeps) == 1
    assert fake.sleeps[0] >= 3.0
    assert sandbox.requests("/api/tokens/new") == 2


def test_429_retry_after_http_date_is_honoured(sandbox: SandboxServer) -> None:
    when = (datetime.now(UTC) + timedelta(seconds=5)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    sandbox.inject_fault(status=429, retry_after=when)
    fake = FakeTime()
    client_for(sandbox, fake).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert 3.5 <= fake.sleeps[0] <= 5.0


def test_a_retry_after_past_the_budget_gives_up_at_once(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=429, retry_after=120)
    fake = FakeTime()
    with pytest.raises(SourceUnavailableError, match="past the budget") as caught:
        client_for(sandbox, fake, budget=30).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert fake.sleeps == []
    assert sandbox.requests("/api/tokens/new") == 1
    assert "429" in caught.value.message


def test_persistent_5xx_exhausts_the_attempts(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=502, count=10)
    fake = FakeTime()
    with pytest.raises(SourceUnavailableError) as caught:
        client_for(sandbox, fake, max_attempts=4).mint(tenant_id="acme", min_ttl=MIN_TTL)
    error = caught.value
    assert sandbox.requests("/api/tokens/new") == 4
    assert len(fake.sleeps) == 3
    assert "4 attempt(s)" in error.message
    assert "HTTP 502" in error.message
    assert sandbox.url in error.message
    assert error.fix
    assert error.exit_code == ExitCode.LINUXGUARD
    assert isinstance(error.__cause__, TransientSourceError)
    assert SANDBOX_API_KEY not in error.one_line()


def test_a_timeout_is_retried(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=None, latency_ms=2000)
    started = time.monotonic()
    token = client_for(sandbox, timeout=0.2).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert token.tenant_id == "acme"
    assert time.monotonic() - started < 1.5
    assert sandbox.requests("/api/tokens/new") == 2


def test_a_reset_connection_is_retried(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(drop=True)
    fake = FakeTime()
    client_for(sandbox, fake).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert len(fake.sleeps) == 1
    assert sandbox.requests("/api/tokens/new") == 2


def test_connection_refused_ends_within_the_budget() -> None:
    client = LinuxGuardClient(
        base_url=f"http://127.0.0.1:{free_port()}",
        api_key=Secret("secret-api-key-123"),
        timeout=0.5,
        retry=RetryPolicy(max_attempts=50, base_delay=0.05, max_delay=0.2, budget=1.0),
    )
    started = time.monotonic()
    with pytest.raises(SourceUnavailableError) as caught:
        client.mint(tenant_id="acme", min_ttl=MIN_TTL)
    elapsed = time.monotonic() - started
    assert elapsed < 1.5
    text = caught.value.one_line()
    assert "connection refused" in text
    assert client.mint_url in text
    assert "secret-api-key-123" not in text
    assert "--linuxguard-url" in (caught.value.fix or "")


def test_a_deadline_shorter_than_the_budget_wins(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=503, count=10)
    fake = FakeTime()
    client = client_for(sandbox, fake, budget=60)
    with pytest.raises(SourceUnavailableError, match="budget spent"):
        client.mint(tenant_id="acme", min_ttl=MIN_TTL, deadline=fake.now + 1.2)
    assert sum(fake.sleeps) <= 1.2
    # 0.5, then the 1.0 s wait is cut short: one last attempt just before the deadline
    assert fake.sleeps[0] == 0.5
    assert len(fake.sleeps) == 2
    assert sum(fake.sleeps) == pytest.approx(1.2 - 0.12)  # 0.12: the final reserve


# --- final answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setup", "status", "fix_hint"),
    [
        ("bad-key", 401, "LINUXGUARD_API_KEY"),
        ("other-tenant-key", 403, "tenant"),
        ("bad-ttl", 400, "--ttl"),
        ("bad-path", 404, "--linuxguard-url"),
    ],
)
def test_final_answers_are_not_retried(
    sandbox: SandboxServer, setup: str, status: int, fix_hint: str
) -> None:
    fake = FakeTime()
    base_url, key, ttl = sandbox.url, sandbox.api_key, None
    if setup == "bad-key":
        key = "not-the-key"
    elif setup == "other-tenant-key":
        key = sandbox.add_api_key(tenant_id="globex")
    elif setup == "bad-ttl":
        ttl = 5
    else:
        base_url = sandbox.url + "/v2"
    client = LinuxGuardClient(base_url=base_url, api_key=Secret(key), retry=policy(fake))
    with pytest.raises(SourceRejectedError) as caught:
        client.mint(tenant_id="acme", min_ttl=MIN_TTL, ttl_seconds=ttl)
    error = caught.value
    assert error.status == status
    assert sandbox.requests() == 1
    assert fake.sleeps == []
    assert fix_hint in (error.fix or "")
    assert key not in error.one_line()
    assert f"answered {status}" in error.message
    if setup == "bad-ttl":
        assert "ttlSeconds must be an integer between 60 and 3600" in error.message


def test_a_400_message_is_sanitised() -> None:
    text = sanitize_server_message(
        f"bad tenant\n\x1b[31m{A_TOKEN} and key sk-123 " + "word " * 100, secrets=("sk-123",)
    )
    assert A_TOKEN not in text
    assert "sk-123" not in text
    assert "\n" not in text
    assert "\x1b" not in text
    assert text.startswith("bad tenant")
    assert len(text) <= 200
    assert text.endswith("...")
    assert sanitize_server_message(f"glued{A_TOKEN.replace('-', '')}glued") == "<redacted>"


# --- answers that fail validation ----------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "error_class", "words"),
    [
        ("malformed", TokenFormatError, "outside base32"),
        ("not-json", SourceRejectedError, "not JSON"),
        ("wrong-tenant", TokenTenantError, "acme-other"),
        ("expired", TokenExpiredError, "expired"),
        ("short-ttl", TokenExpiredError, "less than the minimum"),
    ],
)
def test_bad_answers_are_rejected_without_retry(
    sandbox: SandboxServer, mode: str, error_class: type[Exception], words: str
) -> None:
    sandbox.set_mint_mode(mode)  # type: ignore[arg-type]
    fake = FakeTime()
    with pytest.raises(error_class, match=words) as caught:
        client_for(sandbox, fake).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert sandbox.requests() == 1
    assert fake.sleeps == []
    text = str(caught.value) + " " + (getattr(caught.value, "fix", None) or "")
    assert not TOKEN_SHAPED.search(text)
    assert caught.value.__cause__ is None or not TOKEN_SHAPED.search(str(caught.value.__cause__))


def test_a_token_expiring_before_min_ttl_is_rejected(sandbox: SandboxServer) -> None:
    with pytest.raises(TokenExpiredError, match="less than the minimum of 900s"):
        client_for(sandbox).mint(tenant_id="acme", min_ttl=timedelta(minutes=15))


def test_logs_carry_neither_token_nor_key(
    sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lg_rotate")
    sandbox.inject_fault(status=503, retry_after=1)
    key = sandbox.add_api_key("k-very-secret-api-key")
    token = client_for(sandbox, key=key).mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert "retrying in" in caplog.text
    assert "minted token" in caplog.text
    assert token.short_fingerprint in caplog.text
    assert token.value.reveal() not in caplog.text
    assert not TOKEN_SHAPED.search(caplog.text)
    assert "k-very-secret-api-key" not in caplog.text
    assert [r.levelname for r in caplog.records if "retrying" in r.getMessage()] == ["WARNING"]


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    ["ftp://lg.example.com", "lg.example.com", "https://user:pw@lg.example.com", "https://h/?x=1"],
)
def test_bad_base_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        LinuxGuardClient(base_url=url, api_key=Secret("k"))
    assert "pw" not in caught.value.one_line()


def test_client_repr_hides_the_key() -> None:
    client = LinuxGuardClient(base_url="https://lg.example.com", api_key=Secret("k-123"))
    assert "k-123" not in repr(client)
    assert not client.is_loopback_http
    assert LinuxGuardClient(base_url="http://127.0.0.1:1", api_key=Secret("k")).is_loopback_http


def test_tls_to_a_plain_http_server_is_a_final_error(sandbox: SandboxServer) -> None:
    fake = FakeTime()
    client = LinuxGuardClient(
        base_url=sandbox.url.replace("http://", "https://"),
        api_key=Secret(sandbox.api_key),
        retry=policy(fake),
    )
    with pytest.raises(SourceError, match="TLS"):
        client.mint(tenant_id="acme", min_ttl=MIN_TTL)
    assert fake.sleeps == []


def test_load_api_key_from_env_removes_the_variable() -> None:
    env = {"LINUXGUARD_API_KEY": "  k-abc \n", "PATH": "/bin"}
    key = load_api_key(env=env)
    assert key.reveal() == "k-abc"
    assert env == {"PATH": "/bin"}


def test_load_api_key_unsets_the_real_process_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINUXGUARD_API_KEY", "k-process")
    assert load_api_key().reveal() == "k-process"
    assert "LINUXGUARD_API_KEY" not in os.environ


def test_load_api_key_from_a_file_wins_and_still_clears_the_env(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("k-from-file\n")
    env = {"LINUXGUARD_API_KEY": "k-env"}
    assert load_api_key(env=env, api_key_file=str(path)).reveal() == "k-from-file"
    assert env == {}


@pytest.mark.parametrize(
    ("content", "words"),
    [(None, "cannot read"), ("  \n", "is empty"), ("k1\nk2\n", "more than one line")],
)
def test_load_api_key_file_problems(tmp_path: Path, content: str | None, words: str) -> None:
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=words) as caught:
        load_api_key(env={}, api_key_file=str(path))
    assert caught.value.fix
    assert "k1" not in caught.value.one_line()


def test_load_api_key_without_any_source() -> None:
    with pytest.raises(ConfigError, match="no LinuxGuard API key") as caught:
        load_api_key(env={})
    assert "--api-key-file" in (caught.value.fix or "")


def test_parse_retry_after() -> None:
    now = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("7", now=now) == 7.0
    assert parse_retry_after("Tue, 01 Jan 2030 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Tue, 01 Jan 2030 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("-3", now=now) is None


# --- the retry policy itself ----------------------------------------------------------------


class Flaky:
    def __init__(self, failures: list[BaseException], result: str = "done") -> None:
        self.failures = list(failures)
        self.calls = 0
        self.result = result

    def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.result


def transient(error: BaseException) -> bool:
    return isinstance(error, TransientSourceError)


def test_policy_backoff_is_full_jitter_under_a_capped_ceiling() -> None:
    draws = iter([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    fake = FakeTime()
    rp = RetryPolicy(
        max_attempts=7,
        base_delay=1.0,
        max_delay=4.0,
        sleep=fake.sleep,
        clock=fake.clock,
        random=lambda: next(draws),
    )
    flaky = Flaky([TransientSourceError("x")] * 6)
    assert rp.call(flaky, is_transient=transient, describe="op") == "done"
    assert fake.sleeps == [0.0, 1.0, 4.0, 4.0, 4.0, 4.0]


def test_policy_default_random_stays_within_the_ceiling() -> None:
    rp = RetryPolicy(base_delay=1.0, max_delay=3.0)
    waits = [rp.backoff(attempt) for attempt in range(1, 8) for _ in range(20)]
    assert all(0.0 <= wait <= 3.0 for wait in waits)
    assert len(set(waits)) > 10, "jitter varies"


def test_policy_propagates_non_transient_errors_at_once() -> None:
    fake = FakeTime()
    flaky = Flaky([SourceRejectedError("no", status=401)])
    with pytest.raises(SourceRejectedError):
        policy(fake).call(flaky, is_transient=transient, describe="op")
    assert flaky.calls == 1
    assert fake.sleeps == []


def test_policy_exhaustion_carries_the_last_error() -> None:
    fake = FakeTime()
    last = TransientSourceError("third")
    flaky = Flaky([TransientSourceError("first"), TransientSourceError("second"), last])
    with pytest.raises(RetriesExhausted) as caught:
        policy(fake, max_attempts=3).call(flaky, is_transient=transient, describe="op")
    assert caught.value.last_error is last
    assert caught.value.__cause__ is last
    assert caught.value.attempts == 3
    assert "3 attempts" in caught.value.reason


def test_policy_retry_after_is_a_floor_for_the_wait() -> None:
    fake = FakeTime()
    flaky = Flaky([TransientSourceError("slow down", retry_after=6.5)])
    policy(fake).call(flaky, is_transient=transient, describe="op")
    assert fake.sleeps == [6.5]


def test_policy_never_waits_past_the_budget() -> None:
    fake = FakeTime()
    flaky = Flaky([TransientSourceError("x")] * 100)
    with pytest.raises(RetriesExhausted, match="budget spent"):
        policy(fake, max_attempts=100, base_delay=1, max_delay=4, budget=10).call(
            flaky, is_transient=transient, describe="op"
        )
    assert sum(fake.sleeps) <= 10
    # the fourth wait (4 s, 3 s left) is cut to end 1 s (the final reserve) before the end
    assert fake.sleeps == [1.0, 2.0, 4.0, 2.0]


def test_policy_logs_each_retry_at_warning_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lg_rotate")
    fake = FakeTime()
    flaky = Flaky([TransientSourceError(f"echoed {A_TOKEN}"), TransientSourceError("again")])
    policy(fake).call(
        flaky, is_transient=transient, describe="mint", logger=logging.getLogger("lg_rotate.t")
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("mint failed (attempt 1 of 5)")
    assert A_TOKEN not in caplog.text
    assert "<redacted>" in warnings[0]


def test_retry_call_is_the_functional_shortcut() -> None:
    fake = FakeTime()
    flaky = Flaky([TransientSourceError("x")])
    assert retry_call(flaky, is_transient=transient, describe="op", sleep=fake.sleep) == "done"
    assert flaky.calls == 2
    assert len(fake.sleeps) == 1


def test_policy_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(budget=-1)


def test_utcnow_is_aware() -> None:
    assert utcnow().tzinfo is not None
