"""Every metric of the daemon, on a passed-in registry, and the HTTP endpoints that serve them.

The only module that imports ``prometheus_client``. Labels come only from closed sets created at
start-up (ops, refusal codes, attempt results, dead-letter reasons, states), never from an email, id,
path or error text, so the number of series cannot grow with traffic. Backlog figures come from an
in-memory snapshot (``snapshot`` callable): a scrape never waits on the writer or a SQLite lock, and a
snapshot that fails costs only its own gauges, counted in ``forwarder_metrics_scrape_errors_total``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from forwarder.errors import REFUSALS

logger = logging.getLogger(__name__)

OPS = ("set", "post", "presigned", "ping")
REFUSAL_REASONS = tuple(refusal.code for refusal in REFUSALS)
# Mirrors turretio.Result (a layer above us); tests/test_metrics.py checks the two agree.
ATTEMPT_RESULTS = ("success", "retryable_http", "permanent_http", "auth", "rate_limited", "timeout",
                   "connect", "tls")
DEAD_REASONS = ("permanent_http", "presigned_rejected", "expired", "max_attempts", "corrupt")
STATES = ("running", "backing_off", "paused_auth", "paused_no_credentials")
RELOAD_RESULTS = ("applied", "unchanged", "invalid", "needs_restart")
STORAGE_ERROR_KINDS = ("disk_full", "io")

_ACK_BUCKETS = (50e-6, 100e-6, 200e-6, 300e-6, 500e-6, 750e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3,
                100e-3, 250e-3, 500e-3, 1.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_COMMIT_BUCKETS = (100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 1.0)
_REQUEST_BUCKETS = (5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# End to end must reach past a day: an outage longer than the top bucket would show as a flat line.
_E2E_BUCKETS = (1e-3, 5e-3, 25e-3, 100e-3, 250e-3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                3600.0, 4 * 3600.0, 12 * 3600.0, 86400.0, 2 * 86400.0, 5 * 86400.0, 10 * 86400.0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape reports about the backlog and delivery, read from memory."""

    messages: int
    bytes: int
    oldest_enqueued_at: float | None  # Unix time
    dead_letters: int
    state: str  # one of STATES
    last_delivery_at: float | None  # Unix time


class Metrics:
    """All metric objects; ingest, delivery and the daemon record through these attributes."""

    def __init__(self, snapshot: Callable[[], Snapshot], version: str,
                 registry: CollectorRegistry | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        # In the text format, ``_created`` samples become one extra gauge per series that nobody queries.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
        registry = registry if registry is not None else CollectorRegistry()  # never the global default
        self.registry = registry
        ns = "forwarder"
        self.received = Counter("ingest_received_messages",
                                "Requests received, by op (messages by kind, and pings).", ["op"],
                                namespace=ns, registry=registry)
        self.refused = Counter("ingest_refused_messages", "Requests refused, by reason (the wire code).",
                               ["reason"], namespace=ns, registry=registry)
        self.ack_latency = Histogram("ingest_ack_latency_seconds",
                                     "Time from a request line read to its durable ack.",
                                     namespace=ns, registry=registry, buckets=_ACK_BUCKETS)
        self.commit_batch = Histogram("outbox_commit_batch_ops", "Changes committed per group commit.",
                                      namespace=ns, registry=registry, buckets=_BATCH_BUCKETS)
        self.commit_duration = Histogram("outbox_commit_duration_seconds", "Duration of one group commit.",
                                         namespace=ns, registry=registry, buckets=_COMMIT_BUCKETS)
        self.storage_errors = Counter("outbox_storage_errors", "Commits that failed, by kind.", ["kind"],
                                      namespace=ns, registry=registry)
        self.delivered = Counter("delivery_delivered_messages", "Messages delivered (2xx).",
                                 namespace=ns, registry=registry)
        self.attempts = Counter("delivery_attempts", "Delivery attempts, by result.", ["result"],
                                namespace=ns, registry=registry)
        self.dead_lettered = Counter("delivery_dead_lettered_messages", "Messages dead-lettered, by reason.",
                                     ["reason"], namespace=ns, registry=registry)
        self.request_duration = Histogram("delivery_request_duration_seconds",
                                          "Duration of one upstream HTTP request.",
                                          namespace=ns, registry=registry, buckets=_REQUEST_BUCKETS)
        self.end_to_end = Histogram("delivery_end_to_end_latency_seconds",
                                    "Time from the durable ack to delivery.",
                                    namespace=ns, registry=registry, buckets=_E2E_BUCKETS)
        self.reloads = Counter("config_reloads", "Configuration reloads, by result.", ["result"],
                               namespace=ns, registry=registry)
        self.internal_errors = Counter("internal_errors", "Bugs caught at the top of a thread or task.",
                                       namespace=ns, registry=registry)
        build = Info("build", "Version of turret-forwarder.", namespace=ns, registry=registry)
        build.info({"version": version})
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        for labelled, values in ((self.received, OPS), (self.refused, REFUSAL_REASONS),
                                 (self.attempts, ATTEMPT_RESULTS), (self.dead_lettered, DEAD_REASONS),
                                 (self.reloads, RELOAD_RESULTS), (self.storage_errors, STORAGE_ERROR_KINDS)):
            for value in values:
                labelled.labels(value)
        registry.register(_BacklogCollector(snapshot, clock))

    def committed(self, ops: int, seconds: float) -> None:
        """The store's commit report (``store.Events``)."""
        self.commit_batch.observe(ops)
        self.commit_duration.observe(seconds)

    def storage_error(self, kind: str) -> None:
        self.storage_errors.labels(kind if kind in STORAGE_ERROR_KINDS else "io").inc()

    def dead_letter(self, reason: str) -> None:
        """Any reason outside the closed set is the upstream's own refusal text (``http 400``)."""
        self.dead_lettered.labels(reason if reason in DEAD_REASONS else "permanent_http").inc()


class _BacklogCollector(Collector):
    """Backlog and delivery gauges computed at scrape time from the in-memory snapshot.

    It owns the scrape-error counter and yields it after the gauges, so a failure shows in the very
    scrape it happened in.
    """

    def __init__(self, snapshot: Callable[[], Snapshot], clock: Callable[[], float]) -> None:
        self._snapshot = snapshot
        self._clock = clock  # Unix time, like the snapshot's timestamps
        self._errors = Counter("forwarder_metrics_scrape_errors",
                               "Scrapes where a value could not be computed.", registry=None)

    def describe(self) -> Iterable[Metric]:
        return [*_snapshot_families(_EMPTY, 0.0), *self._errors.collect()]

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(_snapshot_families(self._snapshot(), self._clock()))
        except Exception:  # a scrape must never fail: serve the rest and count it
            logger.exception("Backlog snapshot failed during a scrape")
            self._errors.inc()
            families = []
        return [*families, *self._errors.collect()]


def _snapshot_families(snap: Snapshot, now: float) -> Iterator[GaugeMetricFamily]:
    oldest_age = max(0.0, now - snap.oldest_enqueued_at) if snap.oldest_enqueued_at is not None else 0.0
    for name, doc, value in (
        ("outbox_messages", "Messages waiting in the outbox (held ones included).", snap.messages),
        ("outbox_bytes", "Bytes of stored records waiting in the outbox.", snap.bytes),
        ("outbox_oldest_age_seconds", "Age of the oldest waiting message; 0 when empty.", oldest_age),
        ("outbox_dead_letters", "Messages in the dead-letter table.", snap.dead_letters),
        ("delivery_last_success_timestamp_seconds",
         "Unix time of the last successful delivery (0 if none since start).", snap.last_delivery_at or 0.0),
    ):
        yield GaugeMetricFamily(f"forwarder_{name}", doc, value=value)
    state = GaugeMetricFamily("forwarder_delivery_state",
                              "1 for the flusher's current state, 0 for the others.", labels=["state"])
    for name in STATES:
        state.add_metric([name], 1.0 if snap.state == name else 0.0)
    yield state


_EMPTY = Snapshot(0, 0, None, 0, "running", None)


HealthCheck = Callable[[], tuple[bool, str]]
"""Returns (ok, detail); ``detail`` is shown to whoever asks, so it carries no email or secret."""


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a loopback address, in its own threads."""

    def __init__(self, host: str, port: int, metrics: Metrics, healthz: HealthCheck,
                 readyz: HealthCheck) -> None:
        handler = _handler(metrics, healthz, readyz)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(metrics: Metrics, healthz: HealthCheck, readyz: HealthCheck) -> type[BaseHTTPRequestHandler]:
    checks = {"/healthz": healthz, "/readyz": readyz}

    class Handler(BaseHTTPRequestHandler):
        timeout = 30.0  # a client that connects and sends nothing must not keep a thread forever

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                status, content_type, body = self._render(path)
            except Exception:  # the top of this request's thread: a bug answers 500, never an empty 200
                logger.exception("Metrics endpoint failed", extra={"fields": {"path": path}})
                metrics.internal_errors.inc()
                status, content_type, body = 500, "text/plain", b"internal error; see the daemon's log\n"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        @staticmethod
        def _render(path: str) -> tuple[int, str, bytes]:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
            if path in checks:
                ok, detail = checks[path]()
                body = json.dumps({"ok": ok, "detail": detail}).encode() + b"\n"
                return (200 if ok else 503), "application/json", body
            return 404, "text/plain", b"not found: try /metrics, /healthz or /readyz\n"

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the log

    return Handler
