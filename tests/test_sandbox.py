"""The LinuxGuard sandbox keeps the vendor semantics, and the simulated agent uses them.

Everything goes over real sockets to the session sandbox (``sandbox`` fixture).
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fixtures.ports import free_port
from fixtures.sandbox import SANDBOX_API_KEY
from rotator import agent
from rotator.errors import TokenFormatError
from rotator.sandbox import (
    EXPIRED_MESSAGE,
    TENANT_REQUIRED_MESSAGE,
    SandboxServer,
    _sandbox_key,
    add_sandbox_arguments,
    serve_forever,
)
from rotator.tokens import TOKEN_SHAPED, Secret, fingerprint, normalize, parse_timestamp

REPO = Path(__file__).resolve().parents[1]
GROUPED = re.compile(r"[A-Z2-7]{4}(?:-[A-Z2-7]{4})*(?:-[A-Z2-7]{1,4})?")


def call(
    server: SandboxServer | SimpleNamespace,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    timeout: float = 5.0,
) -> tuple[int, Any, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
    finally:
        connection.close()
    try:
        document = json.loads(data)
    except ValueError:
        document = data
    return response.status, document, response


def mint(server: SandboxServer, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    status, document, _ = call(
        server, "POST", "/api/tokens/new", {"tenantId": tenant, **extra}, key=server.api_key
    )
    assert status == 201, document
    return document  # type: ignore[no-any-return]


def enrol(
    server: SandboxServer, *, code: str, tenant: str = "acme", workload: str = "node-a/pod-1"
) -> tuple[int, Any]:
    status, document, _ = call(
        server,
        "POST",
        "/agent/enroll",
        {"tenantId": tenant, "enrollCode": code, "workloadId": workload},
    )
    return status, document


# --- POST /api/tokens/new ---------------------------------------------------------------


def test_mint_answers_the_documented_contract(sandbox: SandboxServer) -> None:
    before = sandbox.now()
    document = mint(sandbox, "acme")
    assert set(document) == {"token", "tenantId", "expiresAt", "ttlSeconds"}
    assert GROUPED.fullmatch(document["token"])
    assert 24 <= len(normalize(document["token"])) <= 32
    assert document["tenantId"] == "acme"
    assert document["ttlSeconds"] == 600
    expires = parse_timestamp(document["expiresAt"])
    assert timedelta(seconds=598) <= expires - before <= timedelta(seconds=601)
    [record] = sandbox.minted()
    assert record.fingerprint == fingerprint(normalize(document["token"]).reveal())
    assert record.tenant_id == "acme"


def test_each_mint_is_a_new_token(sandbox: SandboxServer) -> None:
    tokens = {mint(sandbox)["token"] for _ in range(5)}
    assert len(tokens) == 5
    assert sandbox.state()["mints"] == 5


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-key", f"Basic {SANDBOX_API_KEY}", "Bearer", f"{SANDBOX_API_KEY}"],
)
def test_mint_needs_a_known_bearer_key(sandbox: SandboxServer, authorization: str | None) -> None:
    connection = http.client.HTTPConnection(sandbox.host, sandbox.port, timeout=5)
    headers = {"Authorization": authorization} if authorization else {}
    connection.request("POST", "/api/tokens/new", body=b'{"tenantId": "acme"}', headers=headers)
    response = connection.getresponse()
    body = json.loads(response.read())
    connection.close()
    assert response.status == 401
    assert response.getheader("WWW-Authenticate") == "Bearer"
    assert body == {"error": "invalid API key"}
    assert sandbox.minted() == []


@pytest.mark.parametrize("body", [{}, {"tenantId": ""}, {"tenantId": "  "}, {"tenantId": 7}, []])
def test_mint_needs_a_tenant(sandbox: SandboxServer, body: Any) -> None:
    status, document, _ = call(sandbox, "POST", "/api/tokens/new", body, key=sandbox.api_key)
    assert status == 400
    assert "tenantId" in document["error"] or "JSON object" in document["error"]


@pytest.mark.parametrize("ttl", [59, 3601, 0, -5, "600", True, 600.5])
def test_mint_rejects_a_ttl_outside_the_tenant_policy(sandbox: SandboxServer, ttl: Any) -> None:
    status, document, _ = call(
        sandbox,
        "POST",
        "/api/tokens/new",
        {"tenantId": "acme", "ttlSeconds": ttl},
        key=SANDBOX_API_KEY,
    )
    assert status == 400
    assert document == {"error": "ttlSeconds must be an integer between 60 and 3600"}


@pytest.mark.parametrize("ttl", [60, 3600])
def test_mint_accepts_the_ttl_bounds(sandbox: SandboxServer, ttl: int) -> None:
    document = mint(sandbox, ttlSeconds=ttl)
    assert document["ttlSeconds"] == ttl
    left = parse_timestamp(document["expiresAt"]) - sandbox.now()
    assert abs(left.total_seconds() - ttl) <= 2


def test_a_tenant_bound_key_mints_only_for_its_tenant(sandbox: SandboxServer) -> None:
    key = sandbox.add_api_key(tenant_id="acme")
    status, _, _ = call(sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=key)
    assert status == 201
    status, document, _ = call(sandbox, "POST", "/api/tokens/new", {"tenantId": "other"}, key=key)
    assert status == 403
    assert "other" in document["error"]
    sandbox.reset()
    status, _, _ = call(sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=key)
    assert status == 401, "reset() forgets keys added by tests"


def test_unknown_paths_and_methods(sandbox: SandboxServer) -> None:
    assert call(sandbox, "POST", "/api/tokens/old", {}, key=sandbox.api_key)[0] == 404
    status, _, response = call(sandbox, "GET", "/api/tokens/new", key=sandbox.api_key)
    assert status == 405
    assert response.getheader("Allow") == "POST"
    assert sandbox.requests() == 2


def test_a_huge_body_is_refused(sandbox: SandboxServer) -> None:
    status, _, _ = call(
        sandbox, "POST", "/api/tokens/new", raw=b"x" * (65 * 1024), key=sandbox.api_key
    )
    assert status == 413


@pytest.mark.parametrize(("length", "grouping"), [(32, "bare"), (27, "grouped")])
def test_token_length_and_grouping_are_configurable(length: int, grouping: Any) -> None:
    with SandboxServer(token_length=length, grouping=grouping) as server:
        token = mint(server)["token"]
    assert len(normalize(token)) == length
    assert ("-" in token) is (grouping == "grouped")
    assert GROUPED.fullmatch(token) or re.fullmatch(r"[A-Z2-7]{24,32}", token)


def test_alternate_grouping_prints_both_forms() -> None:
    with SandboxServer(grouping="alternate") as server:
        tokens = [mint(server)["token"] for _ in range(4)]
    assert ["-" in token for token in tokens] == [True, False, True, False]


# --- POST /agent/enroll -----------------------------------------------------------------


def test_first_enrolment_binds_the_token_and_replay_is_idempotent(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    status, first = enrol(sandbox, code=token, workload="node-a/pod-1")
    assert status == 200
    assert first["identityId"].startswith("lgid-")
    assert first["tenantId"] == "acme"
    assert first["workloadId"] == "node-a/pod-1"
    assert all("BEGIN CERTIFICATE" in pem for pem in first["certChain"])
    status, again = enrol(sandbox, code=token, workload="node-a/pod-1")
    assert (status, again) == (200, first)
    digest = fingerprint(normalize(token).reveal())
    assert sandbox.owners() == {digest: "node-a/pod-1"}
    assert [(r.fingerprint, r.workload_id, r.result) for r in sandbox.enrolments()] == [
        (digest, "node-a/pod-1", "ok"),
        (digest, "node-a/pod-1", "replay"),
    ]
    assert sandbox.enrolments()[0].identity_id == first["identityId"]


def test_another_workload_with_a_used_token_gets_409(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    assert enrol(sandbox, code=token, workload="pod-1")[0] == 200
    status, document = enrol(sandbox, code=token, workload="pod-2")
    assert status == 409
    assert "conflict" in document["error"]
    assert list(sandbox.owners().values()) == ["pod-1"]
    assert sandbox.state()["enrolments"] == {"ok": 1, "conflict": 1}


def test_codes_compare_case_and_dash_insensitively(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    assert "-" in token
    bare_lower = token.replace("-", "").lower()
    status, first = enrol(sandbox, code=bare_lower, workload="pod-1")
    assert status == 200
    assert enrol(sandbox, code=f"  {token}\n", workload="pod-1") == (200, first)
    assert enrol(sandbox, code=token.lower(), workload="pod-2")[0] == 409


def test_empty_tenant_with_a_code_is_the_documented_400(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    status, document = enrol(sandbox, code=token, tenant="")
    assert (status, document) == (400, {"error": TENANT_REQUIRED_MESSAGE})
    assert document["error"] == "tenantId required for TOTP enrollment"
    assert sandbox.owners() == {}, "a refused enrolment must not consume the token"
    assert enrol(sandbox, code=token)[0] == 200


def test_unknown_code_is_401_and_wrong_tenant_is_403(sandbox: SandboxServer) -> None:
    status, document = enrol(sandbox, code="ABCD-EFGH-IJKL-MNOP-QRST-UVWX")
    assert (status, document) == (401, {"error": "invalid enrollment token"})
    token = mint(sandbox, "acme")["token"]
    status, _ = enrol(sandbox, code=token, tenant="globex")
    assert status == 403
    assert enrol(sandbox, code=token, tenant="acme")[0] == 200
    results = [r.result for r in sandbox.enrolments()]
    assert results == ["unknown-token", "wrong-tenant", "ok"]


@pytest.mark.parametrize(
    "body",
    [
        {"tenantId": "acme", "workloadId": "pod-1"},
        {"tenantId": "acme", "enrollCode": "ABCD-EFGH-IJKL-MNOP-QRST-UVWX"},
        "not an object",
    ],
)
def test_enrolment_needs_a_code_and_a_workload(sandbox: SandboxServer, body: Any) -> None:
    status, document, _ = call(sandbox, "POST", "/agent/enroll", body)
    assert status == 400
    assert document["error"]


def test_an_expired_token_is_400_but_a_bound_one_still_replays(sandbox: SandboxServer) -> None:
    unused = mint(sandbox)["token"]
    used = mint(sandbox)["token"]
    status, first = enrol(sandbox, code=used, workload="pod-1")
    assert status == 200
    sandbox.advance_clock(601)
    assert enrol(sandbox, code=unused, workload="pod-9") == (400, {"error": EXPIRED_MESSAGE})
    assert EXPIRED_MESSAGE == "enrollment token expired"
    assert enrol(sandbox, code=used, workload="pod-1") == (200, first)
    assert enrol(sandbox, code=used, workload="pod-2")[0] == 409
    assert sandbox.state()["tokens"] == {"issued": 2, "bound": 1, "expired": 2}


def test_a_token_is_usable_until_its_last_second(sandbox: SandboxServer) -> None:
    token = mint(sandbox, ttlSeconds=60)["token"]
    sandbox.advance_clock(58)
    assert enrol(sandbox, code=token)[0] == 200


def test_an_injected_clock_drives_expiry() -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    with SandboxServer(clock=lambda: now[0]) as server:
        document = mint(server)
        assert document["expiresAt"] == "2030-01-01T00:10:00Z"
        now[0] += timedelta(minutes=11)
        assert enrol(server, code=document["token"]) == (400, {"error": EXPIRED_MESSAGE})


# --- faults -------------------------------------------------------------------------------


def test_fail_the_next_requests_with_a_status_and_retry_after(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=503, count=2, retry_after=7)
    for _ in range(2):
        status, document, response = call(
            sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=sandbox.api_key
        )
        assert status == 503
        assert response.getheader("Retry-After") == "7"
        assert "sandbox fault" in document["error"]
    assert mint(sandbox)["tenantId"] == "acme"
    assert sandbox.requests("/api/tokens/new") == 3
    assert sandbox.state()["faults"]["served"] == 2


def test_a_fault_for_one_path_leaves_the_other_alone(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=500, path="/agent/enroll")
    token = mint(sandbox)["token"]
    assert enrol(sandbox, code=token)[0] == 500
    assert enrol(sandbox, code=token)[0] == 200


def test_latency_delays_the_answer(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(status=None, latency_ms=300)
    started = time.monotonic()
    mint(sandbox)
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    mint(sandbox)
    assert time.monotonic() - started < 0.3


def test_drop_resets_the_connection(sandbox: SandboxServer) -> None:
    sandbox.inject_fault(drop=True)
    with pytest.raises((ConnectionError, http.client.RemoteDisconnected)):
        call(sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=sandbox.api_key)
    assert mint(sandbox)["tenantId"] == "acme"


def test_mint_modes_produce_answers_a_client_must_reject(sandbox: SandboxServer) -> None:
    for mode in ("malformed", "wrong-tenant", "expired", "short-ttl", "not-json"):
        sandbox.set_mint_mode(mode)  # type: ignore[arg-type]
    malformed = mint(sandbox)
    with pytest.raises(TokenFormatError, match="outside base32"):
        normalize(malformed["token"])
    assert mint(sandbox)["tenantId"] == "acme-other"
    expired = mint(sandbox)
    assert parse_timestamp(expired["expiresAt"]) < sandbox.now()
    short = mint(sandbox)
    assert short["ttlSeconds"] == 5
    status, page, response = call(
        sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=sandbox.api_key
    )
    assert status == 200
    assert response.getheader("Content-Type") == "text/html"
    assert isinstance(page, bytes)
    assert mint(sandbox)["ttlSeconds"] == 600, "modes apply to the next mints only"
    with pytest.raises(ValueError, match="unknown mint mode"):
        sandbox.set_mint_mode("sideways")  # type: ignore[arg-type]


# --- admin endpoints ----------------------------------------------------------------------


def test_admin_faults_clock_state_and_reset_over_http(sandbox: SandboxServer) -> None:
    status, state, _ = call(
        sandbox,
        "POST",
        "/_sandbox/faults",
        [
            {"status": 429, "count": 1, "retryAfter": "3", "path": "/api/tokens/new"},
            {"mintMode": "short-ttl"},
        ],
    )
    assert status == 201
    assert state["faults"]["pending"][0]["retryAfter"] == "3"
    assert state["faults"]["mintModes"] == ["short-ttl"]
    status, _, response = call(
        sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=sandbox.api_key
    )
    assert (status, response.getheader("Retry-After")) == (429, "3")
    token = mint(sandbox)["token"]

    status, clock, _ = call(sandbox, "POST", "/_sandbox/clock", {"advanceSeconds": 30})
    assert status == 200
    assert parse_timestamp(clock["now"]) - datetime.now(UTC) > timedelta(seconds=28)
    assert enrol(sandbox, code=token)[0] == 400, "the 5 s short-ttl token expired"

    status, state, _ = call(sandbox, "GET", "/_sandbox/state")
    assert status == 200
    assert state["mints"] == 1
    assert state["mintResults"] == {"short-ttl": 1}
    assert state["enrolments"] == {"expired": 1}
    assert state["requests"] == {"/api/tokens/new": 2, "/agent/enroll": 1}
    text = json.dumps(state)
    assert token not in text
    assert token.replace("-", "") not in text
    assert SANDBOX_API_KEY not in text
    assert not TOKEN_SHAPED.search(text)

    call(sandbox, "POST", "/_sandbox/faults", {"status": 502, "count": 5})
    assert call(sandbox, "DELETE", "/_sandbox/faults")[0] == 200
    assert mint(sandbox)
    status, state, _ = call(sandbox, "POST", "/_sandbox/reset")
    assert (status, state["mints"], state["clockOffsetSeconds"]) == (200, 0, 0.0)


def test_admin_refuses_bad_input(sandbox: SandboxServer) -> None:
    assert call(sandbox, "POST", "/_sandbox/faults", {"status": "soon"})[0] == 400
    assert call(sandbox, "POST", "/_sandbox/faults", {"mintMode": "sideways"})[0] == 400
    assert call(sandbox, "POST", "/_sandbox/faults", {"status": 99})[0] == 400
    assert call(sandbox, "POST", "/_sandbox/clock", {"advanceSeconds": "1"})[0] == 400
    assert call(sandbox, "GET", "/_sandbox/clock")[0] == 405
    assert call(sandbox, "GET", "/_sandbox/nothing")[0] == 404
    assert sandbox.state()["faults"]["pending"] == []


def test_admin_can_hand_out_a_tenant_bound_key(sandbox: SandboxServer) -> None:
    status, document, _ = call(sandbox, "POST", "/_sandbox/keys", {"tenantId": "acme"})
    assert status == 201
    key = document["apiKey"]
    assert call(sandbox, "POST", "/api/tokens/new", {"tenantId": "acme"}, key=key)[0] == 201
    assert call(sandbox, "POST", "/api/tokens/new", {"tenantId": "x"}, key=key)[0] == 403


def test_admin_endpoints_can_be_disabled() -> None:
    with SandboxServer(admin=False) as server:
        assert call(server, "GET", "/_sandbox/state")[0] == 404
        assert call(server, "POST", "/_sandbox/faults", {"status": 500})[0] == 404
        assert call(server, "GET", "/healthz")[0] == 200
        assert mint(server)["tenantId"] == "acme"


def test_logs_never_contain_tokens(
    sandbox: SandboxServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lg_rotate")
    token = mint(sandbox)["token"]
    enrol(sandbox, code=token)
    enrol(sandbox, code=token, workload="other")
    assert "minted token" in caplog.text
    assert "enrolment" in caplog.text
    assert token not in caplog.text
    assert token.replace("-", "") not in caplog.text
    assert not TOKEN_SHAPED.search(caplog.text)
    assert SANDBOX_API_KEY not in caplog.text


# --- the command line ---------------------------------------------------------------------


def test_serve_forever_announces_one_line_and_stops() -> None:
    lines: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_forever,
        kwargs={
            "port": 0,
            "api_keys": {"k1": "acme"},
            "key_note": "API key: test",
            "announce": lines.append,
            "stop": stop,
        },
    )
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while not lines and time.monotonic() < deadline:
            time.sleep(0.01)
        [line] = lines
        url = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert url, line
        assert "API key: test" in line
        address = SimpleNamespace(host="127.0.0.1", port=int(url.group(1)))
        status, document, _ = call(
            address, "POST", "/api/tokens/new", {"tenantId": "acme"}, key="k1"
        )
        assert status == 201
        assert document["tenantId"] == "acme"
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()


def test_sandbox_command_runs_as_a_process_and_stops_on_sigterm(tmp_path: Path) -> None:
    key_file = tmp_path / "sandbox.key"
    env = {k: v for k, v in os.environ.items() if k != "LINUXGUARD_API_KEY"}
    with subprocess.Popen(
        [sys.executable, "-m", "rotator.sandbox", "--port", "0", "--api-key-file", str(key_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 10)
            assert ready, "the sandbox printed nothing within 10 s"
            line = process.stdout.readline()
            match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", line)
            assert match, line
            assert str(key_file) in line
            key = key_file.read_text().strip()
            assert key.startswith("lgsbx-")
            assert key not in line
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
            connection = http.client.HTTPConnection("127.0.0.1", int(match.group(2)), timeout=5)
            connection.request(
                "POST",
                "/api/tokens/new",
                body=b'{"tenantId": "acme"}',
                headers={"Authorization": f"Bearer {key}"},
            )
            assert connection.getresponse().status == 201
            connection.close()
        finally:
            process.send_signal(signal.SIGTERM)
            _, errors = process.communicate(timeout=10)
        assert process.returncode == 0, errors


def test_sandbox_key_sources(tmp_path: Path) -> None:
    key, note = _sandbox_key(api_key_file=None, env={"LINUXGUARD_API_KEY": " from-env \n"})
    assert key == "from-env"
    assert "LINUXGUARD_API_KEY" in note
    assert "from-env" not in note
    key, note = _sandbox_key(api_key_file=None, env={})
    assert key.startswith("lgsbx-")
    assert f"export LINUXGUARD_API_KEY={key}" in note, "a generated key must be obtainable"
    path = tmp_path / "k"
    path.write_text("existing-key\n")
    assert _sandbox_key(api_key_file=str(path), env={})[0] == "existing-key"


def test_sandbox_arguments_have_sane_defaults() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_sandbox_arguments(parser)
    args = parser.parse_args([])
    assert (args.host, args.port, args.ttl, args.admin) == ("127.0.0.1", 8470, 600, True)
    assert parser.parse_args(["--no-admin", "--bind-tenant", "acme"]).admin is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--token-length", "40"])


def test_sandbox_help_is_written_for_users() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rotator.cli", "sandbox", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("usage: lg-rotate sandbox")
    assert "409" in text
    assert "/_sandbox/faults" in text
    assert "docs/SANDBOX.md" in text
    for internal in ("DESIGN.md", "test-suite", "tests", "rotator.", "fixture", "Knobs"):
        assert internal not in text, internal


def test_sandbox_port_in_use_is_a_configuration_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "rotator.cli", "sandbox", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "--port 0" in result.stderr


# --- the simulated agent ------------------------------------------------------------------


def run_agent(
    sandbox: SandboxServer, env: dict[str, str], *args: str
) -> tuple[int, dict[str, Any], str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LINUXGUARD_")}
    process = subprocess.run(
        [sys.executable, "-m", "rotator.agent", *args],
        env={**base, "LINUXGUARD_URL": sandbox.url, **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        check=False,
    )
    lines = process.stdout.splitlines()
    assert len(lines) == 1, process.stdout + process.stderr
    return process.returncode, json.loads(lines[0]), process.stdout + process.stderr


def test_agent_process_enrols_and_scrubs_its_environment(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    env = {
        "LINUXGUARD_ENROLL_TOKEN": token,
        "LINUXGUARD_TENANT_ID": "acme",
        "LINUXGUARD_NODE_NAME": "node-a",
        "LINUXGUARD_POD_UID": "uid-1",
    }
    code, line, output = run_agent(sandbox, env, "--report-environ")
    assert code == 0, line
    assert line["result"] == "enrolled"
    assert line["status"] == 200
    assert line["identity_id"].startswith("lgid-")
    digest = fingerprint(normalize(token).reveal())
    assert line["token_fingerprint"] == digest[:12]
    assert line["workload_id"] == agent.workload_id_from(node_name="node-a", pod_uid="uid-1")
    assert line["enroll_token_in_os_environ"] is False
    assert line["enroll_token_in_proc_environ"] is False
    assert token not in output
    assert token.replace("-", "") not in output
    assert sandbox.owners() == {digest: line["workload_id"]}

    code, replay, _ = run_agent(sandbox, env)
    assert (code, replay["result"], replay["identity_id"]) == (0, "enrolled", line["identity_id"])

    code, other, output = run_agent(sandbox, {**env, "LINUXGUARD_POD_UID": "uid-2"})
    assert (code, other["result"], other["status"]) == (1, "conflict", 409)
    assert token not in output
    assert [r.result for r in sandbox.enrolments()] == ["ok", "replay", "conflict"]


def test_agent_process_without_tenant_shows_the_server_refusal(sandbox: SandboxServer) -> None:
    token = mint(sandbox)["token"]
    code, line, _ = run_agent(
        sandbox, {"LINUXGUARD_ENROLL_TOKEN": token}, "--workload-id", "abc123"
    )
    assert code == 1
    assert (line["result"], line["status"]) == ("tenant-required", 400)
    assert line["error"] == TENANT_REQUIRED_MESSAGE


def test_agent_process_without_token_is_a_config_error(sandbox: SandboxServer) -> None:
    code, line, _ = run_agent(sandbox, {"LINUXGUARD_TENANT_ID": "acme"}, "--workload-id", "w")
    assert code == 2
    assert line["result"] == "config-error"
    assert "LINUXGUARD_ENROLL_TOKEN" in line["error"]
    assert sandbox.requests() == 0


def test_enroll_in_process_reports_each_outcome(sandbox: SandboxServer) -> None:
    token = Secret(mint(sandbox)["token"])
    ok = agent.enroll(url=sandbox.url, tenant_id="acme", token=token, workload_id="w1")
    assert ok.ok
    assert ok.exit_code == 0
    assert "<redacted>" in repr(token)
    conflict = agent.enroll(url=sandbox.url, tenant_id="acme", token=token, workload_id="w2")
    assert (conflict.result, conflict.status, conflict.exit_code) == ("conflict", 409, 1)
    wrong = agent.enroll(url=sandbox.url, tenant_id="globex", token=token, workload_id="w1")
    assert wrong.result == "wrong-tenant"
    unknown = agent.enroll(
        url=sandbox.url,
        tenant_id="acme",
        token=Secret("ABCD-EFGH-IJKL-MNOP-QRST-UVWX"),
        workload_id="w1",
    )
    assert unknown.result == "unknown-token"
    fresh = Secret(mint(sandbox)["token"])
    sandbox.advance_clock(700)
    expired = agent.enroll(url=sandbox.url, tenant_id="acme", token=fresh, workload_id="w3")
    assert (expired.result, expired.status) == ("expired", 400)


def test_enroll_retries_a_5xx_then_succeeds(sandbox: SandboxServer) -> None:
    token = Secret(mint(sandbox)["token"])
    sandbox.inject_fault(status=503, path="/agent/enroll")
    waits: list[float] = []
    result = agent.enroll(
        url=sandbox.url, tenant_id="acme", token=token, workload_id="w", sleep=waits.append
    )
    assert result.ok
    assert len(waits) == 1
    assert sandbox.requests("/agent/enroll") == 2


def test_enroll_against_a_closed_port_is_unavailable() -> None:
    waits: list[float] = []
    result = agent.enroll(
        url=f"http://127.0.0.1:{free_port()}",
        tenant_id="acme",
        token=Secret("ABCD-EFGH-IJKL-MNOP-QRST-UVWX"),
        workload_id="w",
        attempts=2,
        sleep=waits.append,
    )
    assert (result.result, result.exit_code, len(waits)) == ("unavailable", 3, 1)


def test_take_enroll_token_removes_the_variable() -> None:
    env = {"LINUXGUARD_ENROLL_TOKEN": "ABCD-EFGH-IJKL-MNOP-QRST-UVWX", "OTHER": "1"}
    token = agent.take_enroll_token(env)
    assert token is not None
    assert token.reveal() == "ABCD-EFGH-IJKL-MNOP-QRST-UVWX"
    assert env == {"OTHER": "1"}
    assert agent.take_enroll_token(env) is None


def test_reset_restores_the_ttl(sandbox: SandboxServer) -> None:
    sandbox.ttl = timedelta(seconds=90)
    assert mint(sandbox)["ttlSeconds"] == 90
    sandbox.reset()
    assert mint(sandbox)["ttlSeconds"] == 600


# --- the agent double's long-running form (`start`, the end-to-end suite's agent) ----------


def start_agent(sandbox: SandboxServer, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LINUXGUARD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "rotator.agent", "start", "--heartbeat", "0.05", *args],
        env={**base, "LINUXGUARD_URL": sandbox.url, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def pod_env(token: str, uid: str, tenant: str = "acme") -> dict[str, str]:
    return {
        "LINUXGUARD_ENROLL_TOKEN": token,
        "LINUXGUARD_TENANT_ID": tenant,
        "LINUXGUARD_NODE_NAME": "node-a",
        "LINUXGUARD_POD_UID": uid,
    }


def test_agent_start_enrols_heartbeats_and_stops_on_sigterm(
    sandbox: SandboxServer, tmp_path: Path
) -> None:
    token = mint(sandbox)["token"]
    process = start_agent(sandbox, pod_env(token, "uid-s"), "--tls-cache", str(tmp_path))
    assert process.stdout is not None
    enrolled = process.stdout.readline()
    heartbeat = process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    rest, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors
    assert enrolled.startswith("enrolled: identity lgid-"), enrolled
    assert f"token {fingerprint(normalize(token).reveal())[:12]}" in enrolled
    assert heartbeat.startswith("heartbeat: identity lgid-")
    assert token not in enrolled + heartbeat + rest + errors
    # The vendor's .tag: a hash of token + workload, never the token.
    tag = (tmp_path / agent.TLS_CACHE_TAG).read_text()
    assert token.replace("-", "") not in tag
    assert tag.split()[0] == agent.cache_tag(
        normalize(token), agent.workload_id_from(node_name="node-a", pod_uid="uid-s")
    )
    # A restart with the same token and workload reuses the cache: no enrol call.
    calls = sandbox.requests("/agent/enroll")
    again = start_agent(sandbox, pod_env(token, "uid-s"), "--tls-cache", str(tmp_path))
    assert again.stdout is not None
    line = again.stdout.readline()
    again.send_signal(signal.SIGTERM)
    again.communicate(timeout=10)
    assert "from the TLS cache" in line
    assert sandbox.requests("/agent/enroll") == calls


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("conflict", "enrolment failed: 409 conflict"),
        ("tenant", "enrolment failed: 400 tenantId required for TOTP enrollment"),
        ("expired", "enrolment failed: 400 enrollment token expired"),
    ],
)
def test_agent_start_says_why_and_exits_non_zero(
    sandbox: SandboxServer, case: str, expected: str
) -> None:
    token = mint(sandbox)["token"]
    if case == "conflict":
        first = start_agent(sandbox, pod_env(token, "uid-first"))
        assert first.stdout is not None
        assert first.stdout.readline().startswith("enrolled")
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=10)
    if case == "expired":
        sandbox.advance_clock(3600)
    process = start_agent(sandbox, pod_env(token, "uid-second", "" if case == "tenant" else "acme"))
    out, _ = process.communicate(timeout=30)
    assert process.returncode == agent.EXIT_REFUSED
    assert out.splitlines() == [out.splitlines()[0]]
    assert out.startswith(expected), out
