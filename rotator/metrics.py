"""Prometheus metrics (through ``prometheus_client``) and the health endpoints.

The metrics of ``lg-rotate watch`` and ``lg-rotate webhook``: counters, gauges (set, or
computed at scrape time) and histograms, each process (each controller, in tests) with a
registry of its own (a ``prometheus_client.CollectorRegistry``, never the library's global
one), and a threaded HTTP server answering

* ``GET /metrics``: the exposition, in the format the scraper asks for (``Accept``):
  OpenMetrics for Prometheus, else the text format;
* ``GET /healthz``: liveness, ``200`` while the process's loops are alive, else ``503``;
* ``GET /readyz``: readiness, ``200`` when it can do its job, else ``503``.

``prometheus_client`` is imported when the first metric is made, so a module that only
imports this one (``rotator.kube.controller``, on the ``rotate --restart`` path) does not
load it: only the processes that serve metrics do. No ``*_created`` series are exposed
(the hand-written exposition before had none; dashboards see the same series).

The health answers are small JSON documents saying why. Nothing here ever sees a token:
labels and values are counts, seconds and fixed words.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = [
    "DEFAULT_BUCKETS",
    "Counter",
    "Gauge",
    "HealthCheck",
    "Histogram",
    "MetricsServer",
    "Registry",
]

log = logging.getLogger("lg_rotate.metrics")

DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (healthy, details) for /healthz and /readyz
HealthCheck = Callable[[], tuple[bool, Mapping[str, Any]]]

_created_off = False
_created_lock = threading.Lock()


def _prometheus() -> Any:
    """``prometheus_client``, imported on first use, ``*_created`` series switched off."""
    global _created_off  # noqa: PLW0603 - the library's switch is process-wide too
    import prometheus_client

    with _created_lock:
        if not _created_off:
            prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
            _created_off = True
    return prometheus_client


class _Metric:
    """One metric family: its name, help and label names, and its collector once made."""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._registry: Registry | None = None

    def _check(self, labels: Mapping[str, str]) -> dict[str, str]:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"metric {self.name} takes labels {sorted(self.labelnames)}, got {sorted(labels)}"
            )
        return {name: str(labels[name]) for name in self.labelnames}

    def collector(self) -> Any:
        """What is registered with the ``CollectorRegistry``."""
        raise NotImplementedError

    def _sample(self, sample_name: str, labels: Mapping[str, str]) -> float | None:
        if self._registry is None:  # not registered: read the collector itself
            for family in self.collector().collect():
                for sample in family.samples:
                    if sample.name == sample_name and sample.labels == dict(labels):
                        return float(sample.value)
            return None
        value = self._registry.collector_registry.get_sample_value(sample_name, dict(labels))
        return None if value is None else float(value)


M = TypeVar("M", bound=_Metric)


class Counter(_Metric):
    """A monotonically increasing count; ``inc(**labels)``. Listed label sets start at 0."""

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        initial: Iterable[Mapping[str, str]] = (),
    ) -> None:
        super().__init__(name, help, labelnames)
        self._counter = _prometheus().Counter(name, help, self.labelnames, registry=None)
        for labels in initial:
            self._child(labels)

    def collector(self) -> Any:
        return self._counter

    def _child(self, labels: Mapping[str, str]) -> Any:
        checked = self._check(labels)
        return self._counter.labels(**checked) if self.labelnames else self._counter

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        self._child(labels).inc(amount)

    def value(self, **labels: str) -> float:
        sample = self.name if self.name.endswith("_total") else f"{self.name}_total"
        return self._sample(sample, self._check(labels)) or 0.0


class Gauge(_Metric):
    """A value that goes up and down: ``set(v, **labels)``, or ``collect`` at scrape time.

    ``collect`` returns the current value (or None to emit no sample) for a gauge
    without labels; a failing ``collect`` emits no sample either.
    """

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        collect: Callable[[], float | None] | None = None,
    ) -> None:
        super().__init__(name, help, labelnames)
        if collect is not None and self.labelnames:
            raise ValueError("a collected gauge has no labels")
        self._collect = collect
        self._gauge: Any = (
            _CollectedGauge(name, help, collect)
            if collect is not None
            else _prometheus().Gauge(name, help, self.labelnames, registry=None)
        )

    def collector(self) -> Any:
        return self._gauge

    def set(self, value: float, **labels: str) -> None:
        if self._collect is not None:
            raise ValueError(f"gauge {self.name} is collected at scrape time")
        checked = self._check(labels)
        (self._gauge.labels(**checked) if self.labelnames else self._gauge).set(float(value))

    def value(self, **labels: str) -> float | None:
        if self._collect is not None:
            return self._collect()
        return self._sample(self.name, self._check(labels))


class _CollectedGauge:
    """A gauge whose one sample is computed at scrape time (a custom collector)."""

    def __init__(self, name: str, help: str, compute: Callable[[], float | None]) -> None:
        self.name = name
        self.help = help
        self.compute = compute

    def describe(self) -> list[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        return [GaugeMetricFamily(self.name, self.help)]

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import GaugeMetricFamily

        family = GaugeMetricFamily(self.name, self.help)
        try:
            value = self.compute()
        except Exception:  # a scrape must never fail because of one gauge
            log.debug("gauge %s could not be collected", self.name, exc_info=True)
            value = None
        if value is not None:
            family.add_metric([], float(value))
        yield family


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    def __init__(self, name: str, help: str, *, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help)
        bounds = sorted(float(bound) for bound in buckets if not math.isinf(bound))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket")
        self.bounds = tuple(bounds)
        self._histogram = _prometheus().Histogram(name, help, buckets=self.bounds, registry=None)

    def collector(self) -> Any:
        return self._histogram

    def observe(self, value: float) -> None:
        self._histogram.observe(value)

    @property
    def count(self) -> int:
        return int(self._sample(f"{self.name}_count", {}) or 0)

    @property
    def sum(self) -> float:
        return self._sample(f"{self.name}_sum", {}) or 0.0


class Registry:
    """The metrics one process (or one controller) exposes, in registration order.

    Backed by a ``prometheus_client.CollectorRegistry`` of its own
    (:attr:`collector_registry`): several controllers in one process (tests) never mix.
    """

    def __init__(self) -> None:
        self.collector_registry: CollectorRegistry = _prometheus().CollectorRegistry(
            auto_describe=True
        )
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def register(self, metric: M) -> M:
        with self._lock:
            if metric.name in self._names:
                raise ValueError(f"metric {metric.name} is already registered")
            self.collector_registry.register(metric.collector())
            self._names.add(metric.name)
            metric._registry = self
        return metric

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and Content-Type for a scrape whose ``Accept`` header is ``accept``."""
        _prometheus()
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.collector_registry), content_type

    def render(self) -> str:
        """The text exposition format."""
        text: bytes = _prometheus().generate_latest(self.collector_registry)
        return text.decode()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: Registry
    liveness: HealthCheck
    readiness: HealthCheck


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "lg-rotate"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.server.registry.exposition(self.headers.get("Accept"))
            self._send(200, body, content_type)
        elif path in {"/healthz", "/livez"}:
            self._health(self.server.liveness)
        elif path == "/readyz":
            self._health(self.server.readiness)
        else:
            self._send(404, b'{"error": "not found"}\n', "application/json")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _health(self, check: HealthCheck) -> None:
        try:
            healthy, details = check()
        except Exception as exc:  # a failing check is an unhealthy answer, not a crash
            healthy, details = False, {"error": type(exc).__name__}
        body = json.dumps({"ok": healthy, **details}, sort_keys=True, default=str) + "\n"
        self._send(200 if healthy else 503, body.encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port (``port=0``: any free one).

    ``host`` is an IPv4 or IPv6 address (``0.0.0.0``, ``::``, ``127.0.0.1``); see
    ``rotator.config.bind_address`` for the ``--metrics-bind-address`` spelling.
    """

    def __init__(
        self,
        *,
        registry: Registry,
        liveness: HealthCheck,
        readiness: HealthCheck,
        host: str = "0.0.0.0",  # noqa: S104 - scraped from other pods by design
        port: int = 0,
    ) -> None:
        self.registry = registry
        self.liveness = liveness
        self.readiness = readiness
        self.host = host
        self._requested_port = port
        self._http: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> MetricsServer:
        if self._http is not None:
            raise RuntimeError("the metrics server is already running")
        kind = _HTTPServer6 if ":" in self.host else _HTTPServer
        server = kind((self.host, self._requested_port), _Handler)
        server.registry = self.registry
        server.liveness = self.liveness
        server.readiness = self.readiness
        self._http = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="lg-rotate-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s", self.url)
        return self

    def stop(self) -> None:
        server, thread = self._http, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._http = self._thread = None

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the metrics server is not running")
        return int(self._http.server_address[1])

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(self.host, self.host)  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"
