"""Whole-daemon delivery under failure: retries, stalls, refused credentials, rate limits, outages, crashes.

A real ``serve`` process against the local Turret.IO-compatible HTTPS server and its fault injection. Waits
are on events (a request the fake recorded, a commit ``status``/``queue list`` shows, a log line); the
timeouts of those waits are generous bounds, far from the delays under test.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any, TypeVar

import pytest

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO, Received, Respond
from forwarder.store import Stats, list_queue, open_readonly, read_stats
from tests.conftest import API_KEY, API_SECRET
from tests.support.daemon import DaemonProcess

T = TypeVar("T")
FAST_BACKOFF = ("--backoff-base", "100ms", "--backoff-cap", "1s")
SHORT_TIMEOUTS = ("--connect-timeout", "1s", "--read-timeout", "1s")
ROTATED_SECRET = "cm90YXRlZC1zZWNyZXQ="  # base64 of b"rotated-secret": what the API accepts meanwhile


def _send(daemon: DaemonProcess, *emails: str) -> list[str]:
    """Queue one set per email, in order; returns the acked message ids (the Idempotency-Keys)."""
    with Client(str(daemon.socket)) as client:
        return [client.set(email, {"n": str(n)}) for n, email in enumerate(emails)]


def _read(daemon: DaemonProcess, read: Callable[[sqlite3.Connection], T]) -> T:
    """What ``status --json`` or ``queue list --json`` would show, read in-process and read-only.

    The same store reads those commands make, without starting a process per poll.
    """
    conn = open_readonly(daemon.data_dir)
    try:
        return read(conn)
    finally:
        conn.close()


def _queue(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return list_queue(conn, 0, 1000)


def _wait_for(daemon: DaemonProcess, read: Callable[[sqlite3.Connection], T], predicate: Callable[[T], bool],
              timeout: float = 30.0) -> T:
    """Poll the outbox until ``predicate`` holds of what ``read`` returns (a commit is the event)."""
    deadline = time.monotonic() + timeout
    while not predicate(value := _read(daemon, read)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"never matched; last {value}\n{daemon.log()[-3000:]}")
        time.sleep(0.05)
    return value


def _drained(daemon: DaemonProcess) -> Stats:
    """Wait until the backlog is empty; the final figures."""
    return _wait_for(daemon, read_stats, lambda stats: stats.messages == 0)


def _failed_attempts(rows: list[dict[str, Any]], error: str) -> int:
    return sum(row["attempts"] for row in rows if row["last_error"] == error)


def _logged(daemon: DaemonProcess, text: str) -> int:
    return sum(record["msg"].startswith(text) for record in daemon.log_records())


def _first_deliveries(received: list[Received]) -> list[Received]:
    """Answered 2xx, in arrival order, each Idempotency-Key once: what a deduplicating API applied."""
    seen: set[str | None] = set()
    first = []
    for request in received:
        if request.delivered and request.idempotency_key not in seen:
            seen.add(request.idempotency_key)
            first.append(request)
    return first


# -- retries ---------------------------------------------------------------------------------------------

def test_503_503_200_is_three_identical_posts_and_the_message_is_kept_until_the_200(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    # The fake holds the 200 back for 3 s: time enough to read the backlog while the message is still owed.
    fake_api.script(Respond(503), Respond(503), Respond(200, b"{}", delay=3.0))
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    (message_id,) = _send(daemon, "retry@example.com")
    fake_api.wait_for(lambda received: len(received) == 2, timeout=30)
    assert _read(daemon, read_stats).messages == 1
    assert _drained(daemon).dead_letters == 0
    received = fake_api.received()
    assert [r.status for r in received] == [503, 503, 200]
    assert [r.method for r in received] == ["POST"] * 3
    assert {r.idempotency_key for r in received} == {message_id}
    assert len({r.body for r in received}) == 1
    assert all(r.signature_valid for r in received)


# -- stalls ----------------------------------------------------------------------------------------------

def _wait_for_timed_out_attempts(daemon: DaemonProcess, n: int) -> None:
    """``n`` attempts ended in a timeout within 20 s: each honoured the 1 s timeouts (the default is 30 s)."""
    _wait_for(daemon, _queue, lambda rows: _failed_attempts(rows, "timeout") >= n, timeout=20)


@pytest.mark.parametrize("mode", ["hang", "hang_after_request", "stall_body"])
def test_an_api_that_accepts_and_stalls_times_out_each_attempt_and_delivers_when_it_answers(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess], mode: str) -> None:
    """``hang``: new connections stall in the TLS handshake. ``hang_after_request``: a warm keep-alive
    connection takes the whole request and never answers. ``stall_body``: headers, then no body."""
    daemon = make_daemon(*FAST_BACKOFF, *SHORT_TIMEOUTS, api=fake_api).start()
    if mode == "hang_after_request":
        (warm,) = _send(daemon, "warm@example.com")
        assert fake_api.wait_for_count(1, timeout=30)[0].idempotency_key == warm
        _drained(daemon)  # the answer was read and the connection is back in the pool
        fake_api.clear()
    fake_api.set_mode(mode.removesuffix("_after_request"))
    (message_id,) = _send(daemon, "stall@example.com")
    _wait_for_timed_out_attempts(daemon, 2)
    if mode == "hang_after_request":  # the first attempt was read in full by the server, then left hanging
        assert [(r.idempotency_key, r.status) for r in fake_api.received()][:1] == [(message_id, 0)]
    stats = _read(daemon, read_stats)
    assert (stats.messages, stats.dead_letters) == (1, 0)
    fake_api.set_mode("up")
    _drained(daemon)
    received = fake_api.received()
    assert {r.idempotency_key for r in received} == {message_id}
    assert received[-1].delivered
    if mode == "stall_body":  # the server "applied" every stalled attempt: each one is a duplicate to dedupe
        assert len(received) >= 3 and all(r.status == 200 for r in received)


@contextlib.contextmanager
def _never_accepting() -> Iterator[int]:
    """A loopback port whose listener never ``accept()``s and whose queue is full: a connect gets no answer.

    Linux drops a SYN while the accept queue is full, so the TCP connect itself hangs, as with a firewall
    that drops packets.
    """
    with socket.socket() as listener, contextlib.ExitStack() as fillers:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        for _ in range(8):
            filler = fillers.enter_context(socket.socket())
            filler.settimeout(0.5)
            try:
                filler.connect(("127.0.0.1", port))
            except TimeoutError:
                break
        else:
            raise AssertionError("the listen queue never filled up")
        yield port


def test_an_api_that_never_accepts_the_connection_times_out_and_delivers_when_it_listens(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    with _never_accepting() as port:
        daemon = make_daemon(*FAST_BACKOFF, *SHORT_TIMEOUTS, "--api-url", f"https://127.0.0.1:{port}",
                             "--ca-file", str(fake_api.ca_file)).start()
        (message_id,) = _send(daemon, "blackhole@example.com")
        _wait_for_timed_out_attempts(daemon, 2)
        stats = _read(daemon, read_stats)
        assert (stats.messages, stats.dead_letters) == (1, 0)
    # The API comes up at the address the daemon keeps trying, with the fixture's certificate (same CA).
    certificate = str(tmp_path / "certs" / "server.pem")
    with FakeTurretIO(API_KEY, API_SECRET, port=port, certfile=certificate) as api:
        (request,) = api.wait_for_count(1, timeout=30)
        assert request.idempotency_key == message_id
        _drained(daemon)


# -- refused credentials ---------------------------------------------------------------------------------

def test_refused_credentials_pause_signed_delivery_with_sparse_probes_and_resume_when_accepted(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_credentials(API_KEY, ROTATED_SECRET)  # our secret is now refused with 401
    daemon = make_daemon(*FAST_BACKOFF, "--auth-probe-interval", "1s", api=fake_api).start()
    ids = _send(daemon, "a@example.com", "b@example.com", "c@example.com")
    # The first refusals (up to one per user, sent before the first 401 came back), then two probes.
    refused = fake_api.wait_for(lambda received: len(received) >= 5, timeout=30)
    status = daemon.status()
    assert (status["delivery_state"], status["backlog"], status["dead_letters"]) == ("paused_auth", 3, 0)
    assert {r.status for r in refused} == {401}
    # Probes go one at a time, one per interval: from the third request on, none follows its predecessor
    # sooner than the interval (the first three may be the users' first attempts, sent together).
    assert all(later.at - earlier.at >= 1.0 for earlier, later in itertools.pairwise(refused[2:]))

    fake_api.set_credentials(API_KEY, API_SECRET)
    delivered = fake_api.wait_for_count(3, timeout=30)
    assert sorted(r.idempotency_key or "" for r in delivered) == sorted(ids)
    status = daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert (status["delivery_state"], status["dead_letters"]) == ("running", 0)
    assert _logged(daemon, "The API refused our credentials") == 1
    assert _logged(daemon, "Resuming signed deliveries") == 1


# -- rate limits -----------------------------------------------------------------------------------------

def _sets(daemon: DaemonProcess, count: int, users: int) -> list[str]:
    with Client(str(daemon.socket)) as client:
        return [client.set(f"user{n % users}@example.com", {"n": str(n)}) for n in range(count)]


def test_429_retry_after_silences_the_endpoint_while_1000_messages_wait(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    # The backlog builds up while the API is unreachable, so the endpoint is already down to one probe at a
    # time when the 429s come: the rate-limited phase is one sequence of requests, whatever the concurrency.
    fake_api.set_mode("refuse")
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    ids = _sets(daemon, 1000, users=50)
    daemon.wait_for_log("Upstream failing")
    limited = Respond(429, b"slow down", {"Retry-After": "7"})
    fake_api.script(limited, limited, limited)
    fake_api.set_mode("up")
    fake_api.wait_for_count(1000, timeout=90)
    assert _drained(daemon).dead_letters == 0
    received = fake_api.received()
    assert [r.status for r in received[:4]] == [429, 429, 429, 200]
    assert all(later.at - limited.at >= 7.0 for limited, later in itertools.pairwise(received[:4]))
    assert len(received) == 1003
    assert sorted(r.idempotency_key or "" for r in received[3:]) == sorted(ids)


def test_retry_after_as_an_http_date_and_a_huge_value_capped_and_429_spends_no_attempt(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    # --max-attempts 2: the 503 spends one attempt; had the 429 spent the second, it would be a dead letter.
    daemon = make_daemon(*FAST_BACKOFF, "--retry-after-cap", "2s", "--max-attempts", "2",
                         api=fake_api).start()
    # Whole seconds (an HTTP-date has no finer resolution), 1 to 2 s ahead: within the cap, honoured in full.
    resume_at = int(time.time()) + 2
    fake_api.script(Respond(503, headers={"Retry-After": formatdate(resume_at, usegmt=True)}),
                    Respond(429, headers={"Retry-After": "100000"}))
    (message_id,) = _send(daemon, "later@example.com")
    dated, huge, delivered = fake_api.wait_for(lambda received: len(received) == 3, timeout=30)
    wall_minus_monotonic = time.time() - time.monotonic()
    assert (dated.status, huge.status, delivered.status) == (503, 429, 200)
    assert huge.at + wall_minus_monotonic >= resume_at  # not before the date
    assert delivered.at - huge.at >= 2.0  # the cap, honoured in full (and delivered long before 100000 s)
    assert {r.idempotency_key for r in (dated, huge, delivered)} == {message_id}
    assert _drained(daemon).dead_letters == 0


def test_an_unreadable_retry_after_falls_back_to_our_backoff(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.script(Respond(429, headers={"Retry-After": "in a little while"}))
    # The default Retry-After cap is an hour: only our own backoff (capped at 1 s) delivers within the wait.
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    (message_id,) = _send(daemon, "garbage@example.com")
    limited, delivered = fake_api.wait_for(lambda received: len(received) == 2, timeout=30)
    assert (limited.status, delivered.status) == (429, 200)
    assert delivered.idempotency_key == message_id
    _drained(daemon)


# -- outages ---------------------------------------------------------------------------------------------

class _Producer:
    """Sends sets for a few users, one every few milliseconds, until stopped; remembers each user's acks."""

    def __init__(self, daemon: DaemonProcess, users: int) -> None:
        self.sent: dict[str, list[str]] = {f"user{n}@example.com": [] for n in range(users)}
        self._daemon = daemon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self) -> None:
        with Client(str(self._daemon.socket)) as client:
            for n in range(100_000):
                email = f"user{n % len(self.sent)}@example.com"
                self.sent[email].append(client.set(email, {"n": str(n)}))
                if self._stop.wait(0.005):  # paces the traffic; synchronisation is by events elsewhere
                    return

    def stop(self) -> dict[str, list[str]]:
        self._stop.set()
        self._thread.join()
        return self.sent


def test_an_outage_refused_then_reset_loses_nothing_keeps_order_and_logs_each_change_once(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_delay(0.01)  # requests are in flight whenever the outage starts or ends
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    producer = _Producer(daemon, users=8)
    fake_api.wait_for_count(20, timeout=30)
    fake_api.set_mode("refuse")
    _wait_for(daemon, _queue, lambda rows: _failed_attempts(rows, "connection refused") >= 3)
    fake_api.set_mode("reset")
    _wait_for(daemon, _queue, lambda rows: _failed_attempts(rows, "connection reset") >= 3)
    fake_api.set_mode("up")
    sent = producer.stop()

    acked = {key for ids in sent.values() for key in ids}
    fake_api.wait_for(lambda received: acked <= {r.idempotency_key for r in _first_deliveries(received)},
                      timeout=60)
    assert _drained(daemon).dead_letters == 0
    first = _first_deliveries(fake_api.received())
    assert len(first) == len(acked)
    for email, ids in sent.items():
        assert [r.idempotency_key for r in first if r.path == f"/latest/user/{email}"] == ids
    assert _logged(daemon, "Upstream failing") == 1
    assert _logged(daemon, "Upstream reachable again") == 1


# -- crashes ---------------------------------------------------------------------------------------------

def test_kill9_after_the_api_answered_200_resends_once_with_the_same_key(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    # The window between the API applying a request and our commit of its removal: the fake sends the
    # status line "200 OK" and its headers (and records the request as delivered), then holds the body back;
    # the daemon waits for the body (read timeout 30 s) and has committed nothing. It dies right there.
    fake_api.set_mode("stall_body")
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    (message_id,) = _send(daemon, "once@example.com")
    fake_api.wait_for_count(1, timeout=30)
    daemon.kill9()
    fake_api.set_mode("refuse")  # so the restarted daemon's backlog can be read before it delivers

    daemon.start()
    assert _read(daemon, read_stats).messages == 1
    fake_api.set_mode("up")
    fake_api.wait_for_count(2, timeout=30)
    _drained(daemon)
    assert daemon.stop() == 0
    # A clean restart sends nothing more: a later message (concurrency 1, id order) is the next request.
    restarted = make_daemon("--concurrency", "1", api=fake_api).start()
    (marker,) = _send(restarted, "marker@example.com")
    fake_api.wait_for_count(3, timeout=30)
    _drained(restarted)
    received = fake_api.received()
    assert [(r.idempotency_key, r.status) for r in received] == [(message_id, 200), (message_id, 200),
                                                                  (marker, 200)]
    assert received[0].body == received[1].body


def test_kill9_while_a_request_hangs_keeps_the_message_counted_and_delivers_it_after_restart(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*FAST_BACKOFF, api=fake_api).start()
    _send(daemon, "warm@example.com")  # opens the keep-alive connection the hanging request will use
    fake_api.wait_for_count(1, timeout=30)
    _drained(daemon)
    fake_api.set_mode("hang")
    (message_id,) = _send(daemon, "hang@example.com")
    fake_api.wait_for(lambda received: len(received) == 2, timeout=30)  # read by the API, never answered
    daemon.kill9()

    daemon.start()
    assert _read(daemon, read_stats).messages == 1
    fake_api.set_mode("up")
    _drained(daemon)
    hung, delivered = fake_api.received()[1:]
    assert (hung.status, delivered.status) == (0, 200)
    assert hung.idempotency_key == delivered.idempotency_key == message_id
