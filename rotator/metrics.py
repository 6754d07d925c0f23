"""Prometheus metrics and the health endpoints of the controller, in plain Python.

A tiny, dependency-free implementation of what ``lg-rotate watch`` needs: counters,
gauges (set, or computed at scrape time), and one histogram, rendered in the Prometheus
text exposition format (version 0.0.4), and a threaded HTTP server answering

* ``GET /metrics``: the exposition (``text/plain; version=0.0.4``);
* ``GET /healthz``: liveness, ``200`` while the controller's loops are alive, else ``503``;
* ``GET /readyz``: readiness, ``200`` when the controller can do its job, else ``503``.

The health answers are small JSON documents saying why. Nothing here ever sees a token:
labels and values are counts, seconds and fixed words.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

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

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# (healthy, details) for /healthz and /readyz
HealthCheck = Callable[[], tuple[bool, Mapping[str, Any]]]

LabelValues = tuple[str, ...]


def _format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(
        f'{name}="{_escape_label(value)}"' for name, value in zip(names, values, strict=True)
    )
    return "{" + pairs + "}"


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"metric {self.name} takes labels {sorted(self.labelnames)}, got {sorted(labels)}"
            )
        return tuple(str(labels[name]) for name in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> list[str]:
        raise NotImplementedError

    def render(self) -> list[str]:
        return self.header() + self.samples()


M = TypeVar("M", bound=_Metric)


class Counter(_Metric):
    """A monotonically increasing count; ``inc(**labels)``. Listed label sets start at 0."""

    kind = "counter"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        *,
        initial: Iterable[Mapping[str, str]] = (),
    ) -> None:
        super().__init__(name, help, labelnames)
        self._values: dict[LabelValues, float] = {}
        if not self.labelnames:
            self._values[()] = 0.0
        for labels in initial:
            self._values[self._key(labels)] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [
            f"{self.name}{_labels_text(self.labelnames, key)} {_format_value(value)}"
            for key, value in items
        ]


class Gauge(_Metric):
    """A value that goes up and down: ``set(v, **labels)``, or ``collect`` at scrape time.

    ``collect`` returns the current value (or None to emit no sample) for a gauge
    without labels.
    """

    kind = "gauge"

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
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def value(self, **labels: str) -> float | None:
        if self._collect is not None:
            return self._collect()
        with self._lock:
            return self._values.get(self._key(labels))

    def samples(self) -> list[str]:
        if self._collect is not None:
            try:
                value = self._collect()
            except Exception:  # a scrape must never fail because of one gauge
                log.debug("gauge %s could not be collected", self.name, exc_info=True)
                value = None
            return [] if value is None else [f"{self.name} {_format_value(value)}"]
        with self._lock:
            items = sorted(self._values.items())
        return [
            f"{self.name}{_labels_text(self.labelnames, key)} {_format_value(value)}"
            for key, value in items
        ]


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, *, buckets: Sequence[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, help)
        bounds = sorted(float(bound) for bound in buckets if not math.isinf(bound))
        if not bounds:
            raise ValueError("a histogram needs at least one finite bucket")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for index, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[index] += 1
                    break
            else:
                self._counts[-1] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def samples(self) -> list[str]:
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        lines = []
        cumulative = 0
        for bound, bucket in zip((*self.bounds, math.inf), counts, strict=True):
            cumulative += bucket
            le = "+Inf" if math.isinf(bound) else _format_value(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines.append(f"{self.name}_sum {_format_value(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class Registry:
    """The metrics one process exposes, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def register(self, metric: M) -> M:
        with self._lock:
            if metric.name in self._names:
                raise ValueError(f"metric {metric.name} is already registered")
            self._names.add(metric.name)
            self._metrics.append(metric)
        return metric

    def render(self) -> str:
        with self._lock:
            metrics = list(self._metrics)
        lines: list[str] = []
        for metric in metrics:
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    registry: Registry
    liveness: HealthCheck
    readiness: HealthCheck


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "lg-rotate"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.server.registry.render().encode(), CONTENT_TYPE)
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
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port (``port=0``: any free one)."""

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
        server = _HTTPServer((self.host, self._requested_port), _Handler)
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
        host = "127.0.0.1" if self.host in {"0.0.0.0", ""} else self.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"
