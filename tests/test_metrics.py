"""Metrics plumbing around rotator.metrics: ``--metrics-bind-address`` (and the deprecated
``--metrics-port``), the webhook's plain-HTTP metrics listener, and where
``prometheus_client`` is (not) imported. The exposition itself and the controller's
endpoints are tested in tests/test_controller.py; ``watch`` as a process in
tests/test_cli_kube.py."""

from __future__ import annotations

import http.client
import json
import logging
import subprocess
import sys
import textwrap
from types import MappingProxyType, SimpleNamespace
from typing import Any

import pytest

from rotator import cli, config
from rotator.errors import ConfigError
from rotator.kube.webhook import WebhookMetrics, WebhookServer

EVERY_ADDRESS = "0.0.0.0"  # noqa: S104 - what ":PORT" means, as in controller-runtime


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":9102", (EVERY_ADDRESS, 9102)),
        (f"{EVERY_ADDRESS}:9102", (EVERY_ADDRESS, 9102)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::]:9102", ("::", 9102)),
        (" 0 ", None),
    ],
)
def test_bind_address_spellings(text: str, expected: tuple[str, int] | None) -> None:
    assert config.bind_address(text) == expected
    assert config.parse_bind_address(text) == text.strip()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [("9102", "did you mean :9102"), ("host:", "not HOST:PORT"), (":70000", "not HOST:PORT")],
)
def test_bind_address_mistakes(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        config.parse_bind_address(text)


def settings(**given: tuple[Any, config.Source]) -> config.Settings:
    values: dict[str, Any] = {"metrics_bind_address": ":9102", "metrics_port": None}
    sources: dict[str, config.Source] = {}
    for key, (value, source) in given.items():
        values[key] = value
        sources[key] = source
    return config.Settings(
        command="watch",
        declared=MappingProxyType({}),
        values=MappingProxyType(values),
        sources=MappingProxyType(sources),
    )


def test_the_bind_address_is_used_as_given(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert cli._metrics_address(settings()) == (EVERY_ADDRESS, 9102)
        chosen = settings(metrics_bind_address=("127.0.0.1:9200", config.Source("flag", "x")))
        assert cli._metrics_address(chosen) == ("127.0.0.1", 9200)
        off = settings(metrics_bind_address=("0", config.Source("env", "x")))
        assert cli._metrics_address(off) is None
    assert not caplog.records


def test_the_deprecated_metrics_port_still_works_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = config.Source("env", "LG_ROTATE_METRICS_PORT")
    with caplog.at_level(logging.WARNING):
        assert cli._metrics_address(settings(metrics_port=(9300, old))) == (EVERY_ADDRESS, 9300)
    (warning,) = caplog.records
    assert "LG_ROTATE_METRICS_PORT is deprecated" in warning.getMessage()
    assert "--metrics-bind-address :9300" in warning.getMessage()
    caplog.clear()
    # Both given: the new setting wins, and the old one is said to be ignored.
    both = settings(
        metrics_port=(9300, config.Source("flag", "--metrics-port")),
        metrics_bind_address=(":9400", config.Source("flag", "--metrics-bind-address")),
    )
    with caplog.at_level(logging.WARNING):
        assert cli._metrics_address(both) == (EVERY_ADDRESS, 9400)
    assert "ignored" in caplog.records[0].getMessage()


def test_the_watch_parser_takes_both_spellings() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["watch", "--metrics-bind-address", ":9102", "--metrics-port", "1"])
    assert (args.metrics_bind_address, args.metrics_port) == (":9102", "1")  # parsed later
    args = parser.parse_args(["webhook", "--metrics-bind-address", "127.0.0.1:0"])
    assert args.metrics_bind_address == "127.0.0.1:0"


def get(port: int, path: str) -> tuple[int, str, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.getheader("Content-Type") or "", answer.read().decode()
    finally:
        connection.close()


def test_the_webhook_plain_http_metrics_listener() -> None:
    metrics = WebhookMetrics(in_flight=lambda: 2)
    metrics.admissions.inc(result="minted")
    server = SimpleNamespace(metrics=metrics, draining=False, tls=SimpleNamespace(has_pair=True))
    server.readiness = lambda: WebhookServer.readiness(server)  # the real rule, on this stand-in
    assert cli._webhook_metrics_server(server, None) is None
    listener = cli._webhook_metrics_server(server, ("127.0.0.1", 0))
    listener.start()
    try:
        status, kind, body = get(listener.port, "/metrics")
        assert (status, kind.split(";")[0]) == (200, "text/plain")
        assert 'lg_rotate_webhook_admissions_total{result="minted"} 1.0' in body
        assert "lg_rotate_webhook_in_flight 2.0" in body
        assert get(listener.port, "/healthz")[0] == 200
        assert get(listener.port, "/readyz")[0] == 200
        server.tls.has_pair = False  # --tls-self-managed, before the key pair arrived
        status, _, body = get(listener.port, "/readyz")
        assert (status, json.loads(body)["tls"]) == (503, False)
        server.tls.has_pair = True
        server.draining = True
        status, _, body = get(listener.port, "/readyz")
        assert (status, json.loads(body)["draining"]) == (503, True)
        # A taken port is a configuration error naming the flag.
        taken = cli._webhook_metrics_server(server, ("127.0.0.1", listener.port))
        with pytest.raises(ConfigError, match="cannot serve metrics") as failure:
            taken.start()
        assert "--metrics-bind-address" in (failure.value.fix or "")
    finally:
        listener.stop()


def test_prometheus_client_is_imported_by_the_metrics_only() -> None:
    """Importing the controller (``rotate --restart`` does) loads no prometheus_client; making
    the controller's metrics does."""
    code = textwrap.dedent(
        """
        import sys
        import rotator.cli, rotator.kube.controller, rotator.kube.webhook, rotator.metrics
        assert "prometheus_client" not in sys.modules, "imported with the modules"
        from rotator.kube.controller import ControllerMetrics
        ControllerMetrics(token_ttl=lambda: None)
        assert "prometheus_client" in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
