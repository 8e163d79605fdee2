"""Metrics on a fresh registry each: closed label sets, snapshot gauges, scrape errors, the HTTP endpoints."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from forwarder.errors import REFUSALS
from forwarder.metrics import (
    ATTEMPT_RESULTS,
    DEAD_REASONS,
    OPS,
    RELOAD_RESULTS,
    STATES,
    STORAGE_ERROR_KINDS,
    HealthCheck,
    Metrics,
    MetricsServer,
    Snapshot,
)
from forwarder.turretio import Result

ISSUE_ATTEMPT_RESULTS = ("success", "retryable_http", "permanent_http", "auth", "rate_limited", "timeout",
                         "connect", "tls")
NOW = 1_700_000_000.0
BUSY = Snapshot(messages=7, bytes=4096, oldest_enqueued_at=NOW - 42.5, dead_letters=3, state="backing_off",
                last_delivery_at=NOW - 10.0)


def _metrics(registry: CollectorRegistry, snapshot: Callable[[], Snapshot] = lambda: BUSY) -> Metrics:
    return Metrics(snapshot, "1.2.3", registry, clock=lambda: NOW)


def test_every_closed_label_value_exists_at_zero_before_any_traffic(registry: CollectorRegistry) -> None:
    _metrics(registry)
    expected = {
        ("forwarder_ingest_received_messages_total", "op"): OPS,
        ("forwarder_ingest_refused_messages_total", "reason"): ("invalid", "too_large", "full", "storage",
                                                                "shutting_down"),
        ("forwarder_delivery_attempts_total", "result"): ISSUE_ATTEMPT_RESULTS,
        ("forwarder_delivery_dead_lettered_messages_total", "reason"): DEAD_REASONS,
        ("forwarder_config_reloads_total", "result"): RELOAD_RESULTS,
        ("forwarder_outbox_storage_errors_total", "kind"): STORAGE_ERROR_KINDS,
    }
    for (name, label), values in expected.items():
        for value in values:
            assert registry.get_sample_value(name, {label: value}) == 0.0, (name, value)
    for name in ("forwarder_delivery_delivered_messages_total", "forwarder_internal_errors_total",
                 "forwarder_metrics_scrape_errors_total",
                 "forwarder_delivery_end_to_end_latency_seconds_count"):
        assert registry.get_sample_value(name) == 0.0, name


def test_closed_sets_match_the_codes_they_label() -> None:
    assert tuple(result.value for result in Result) == ATTEMPT_RESULTS == ISSUE_ATTEMPT_RESULTS
    codes = {refusal.code for refusal in REFUSALS}
    assert codes == {"invalid", "too_large", "full", "storage", "shutting_down"}


def test_backlog_gauges_come_from_the_snapshot(registry: CollectorRegistry) -> None:
    _metrics(registry)
    assert registry.get_sample_value("forwarder_outbox_messages") == 7.0
    assert registry.get_sample_value("forwarder_outbox_bytes") == 4096.0
    assert registry.get_sample_value("forwarder_outbox_oldest_age_seconds") == 42.5
    assert registry.get_sample_value("forwarder_outbox_dead_letters") == 3.0
    assert registry.get_sample_value("forwarder_delivery_last_success_timestamp_seconds") == NOW - 10.0
    states = {s: registry.get_sample_value("forwarder_delivery_state", {"state": s}) for s in STATES}
    assert states == {"running": 0.0, "backing_off": 1.0, "paused_auth": 0.0, "paused_no_credentials": 0.0}
    assert registry.get_sample_value("forwarder_build_info", {"version": "1.2.3"}) == 1.0


def test_an_empty_outbox_reports_zero_age_and_no_delivery_yet(registry: CollectorRegistry) -> None:
    _metrics(registry, lambda: Snapshot(0, 0, None, 0, "running", None))
    assert registry.get_sample_value("forwarder_outbox_oldest_age_seconds") == 0.0
    assert registry.get_sample_value("forwarder_delivery_last_success_timestamp_seconds") == 0.0


def test_a_failing_snapshot_costs_only_its_gauges_and_is_counted(
        registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    healthy = True

    def snapshot() -> Snapshot:
        if not healthy:
            raise RuntimeError("stats unavailable")
        return BUSY

    metrics = _metrics(registry, snapshot)
    metrics.received.labels("set").inc()
    healthy = False
    with caplog.at_level(logging.ERROR, logger="forwarder.metrics"):
        assert registry.get_sample_value("forwarder_metrics_scrape_errors_total") == 1.0  # in the same scrape
        text = generate_latest(registry).decode()
    assert 'forwarder_ingest_received_messages_total{op="set"} 1.0' in text
    assert "forwarder_metrics_scrape_errors_total 2.0" in text
    assert "forwarder_outbox_messages" not in text
    assert [r.getMessage() for r in caplog.records] == ["Backlog snapshot failed during a scrape"] * 2
    healthy = True
    assert registry.get_sample_value("forwarder_outbox_messages") == 7.0
    assert registry.get_sample_value("forwarder_metrics_scrape_errors_total") == 2.0


def test_store_reports_land_in_their_histograms_and_counters(registry: CollectorRegistry) -> None:
    metrics = _metrics(registry)
    metrics.committed(12, 0.003)
    metrics.storage_error("disk_full")
    metrics.dead_letter("expired")
    metrics.dead_letter("http 400")  # the upstream's own text: counted as permanent_http, never as a label
    assert registry.get_sample_value("forwarder_outbox_commit_batch_ops_count") == 1.0
    assert registry.get_sample_value("forwarder_outbox_commit_batch_ops_bucket", {"le": "16.0"}) == 1.0
    assert registry.get_sample_value("forwarder_outbox_commit_batch_ops_bucket", {"le": "8.0"}) == 0.0
    assert registry.get_sample_value("forwarder_outbox_commit_duration_seconds_sum") == 0.003
    assert registry.get_sample_value("forwarder_outbox_storage_errors_total", {"kind": "disk_full"}) == 1.0
    dead = "forwarder_delivery_dead_lettered_messages_total"
    assert registry.get_sample_value(dead, {"reason": "expired"}) == 1.0
    assert registry.get_sample_value(dead, {"reason": "permanent_http"}) == 1.0
    assert registry.get_sample_value(dead, {"reason": "http 400"}) is None


def test_histogram_buckets_span_what_the_issue_asks(registry: CollectorRegistry) -> None:
    _metrics(registry)
    ack = _bucket_bounds(registry, "forwarder_ingest_ack_latency_seconds")
    assert (ack[0], ack[-1]) == (50e-6, 1.0)
    assert _bucket_bounds(registry, "forwarder_delivery_end_to_end_latency_seconds")[-1] >= 86400.0


def _bucket_bounds(registry: CollectorRegistry, name: str) -> list[float]:
    (family,) = [f for f in registry.collect() if f.name == name]
    return sorted(float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket") and
                  s.labels["le"] != "+Inf")


@pytest.fixture
def serve(registry: CollectorRegistry) -> Iterator[Callable[[HealthCheck, HealthCheck], str]]:
    """Start a MetricsServer on a free loopback port with the given checks; returns its base URL."""
    servers: list[MetricsServer] = []

    def start(healthz: HealthCheck, readyz: HealthCheck) -> str:
        server = MetricsServer("127.0.0.1", 0, _metrics(registry), healthz, readyz)
        server.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.address[1]}"

    yield start
    for server in servers:
        server.stop()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read()


def test_health_endpoints_answer_json_with_the_checks_verdict(
        serve: Callable[[HealthCheck, HealthCheck], str]) -> None:
    url = serve(lambda: (True, "alive"), lambda: (False, "the outbox cannot commit"))
    assert _get(url + "/healthz") == (200, "application/json", b'{"ok": true, "detail": "alive"}\n')
    status, content_type, body = _get(url + "/readyz")
    assert (status, content_type, json.loads(body)) == (503, "application/json",
                                                        {"ok": False, "detail": "the outbox cannot commit"})
    assert _get(url + "/nothing")[0] == 404


def test_metrics_endpoint_serves_the_exposition(serve: Callable[[HealthCheck, HealthCheck], str]) -> None:
    url = serve(lambda: (True, "alive"), lambda: (True, "ready"))
    status, content_type, body = _get(url + "/metrics?debug=1")
    assert (status, content_type.split(";")[0]) == (200, "text/plain")  # the version follows the client
    assert b"\nforwarder_outbox_oldest_age_seconds 42.5\n" in body


def test_a_check_that_raises_answers_500_and_counts_an_internal_error(
        registry: CollectorRegistry, serve: Callable[[HealthCheck, HealthCheck], str],
        caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    url = serve(lambda: (True, "alive"), broken)
    with caplog.at_level(logging.ERROR, logger="forwarder.metrics"):
        assert _get(url + "/readyz") == (500, "text/plain", b"internal error; see the daemon's log\n")
    assert registry.get_sample_value("forwarder_internal_errors_total") == 1.0
    assert [r.getMessage() for r in caplog.records] == ["Metrics endpoint failed"]
    assert _get(url + "/healthz")[0] == 200
