"""The flusher's endpoint gate, in-process: a real Outbox in a temp dir and the real fake Turret.IO API.

The backoff's random source is pinned to the ceiling of its full jitter, so every wait is exactly its
upper bound and the scenarios below run the same way each time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forwarder.config import Config, load_config
from forwarder.delivery import Flusher
from forwarder.delivery import flusher as flusher_module
from forwarder.delivery.lanes import Done, Doorbell, Signal
from forwarder.delivery.sender import Sender
from forwarder.errors import Refused
from forwarder.fakeapi import FakeTurretIO, Respond
from forwarder.message import Kind, Message, QueuedMessage
from forwarder.metrics import Metrics, Snapshot
from forwarder.store import Outbox, Window, admin, list_queue, open_readonly, schema
from forwarder.turretio import Credentials, Delivered, TurretUpstream
from tests.conftest import API_KEY, API_SECRET
from tests.test_store import _Recorder


class _Ceiling(random.Random):
    """Full jitter pinned to its ceiling: each backoff waits exactly its upper bound."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "data") as box:
        yield box


def _config(tmp_path: Path, api: FakeTurretIO, **flags: str) -> Config:
    return load_config({"data_dir": str(tmp_path / "data"), "api_url": api.url, "ca_file": str(api.ca_file),
                        **flags}, {})


def _queue(outbox: Outbox, users: int, one_user: bool = False) -> list[int]:
    """One set per user (or ``users`` sets of one user), committed before the flusher starts, so its first
    window holds them all."""
    futures: list[concurrent.futures.Future[int]] = []
    for n in range(users):
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        futures.append(future)
        email = "one@example.com" if one_user else f"user{n}@example.com"
        outbox.put(Message(Kind.SET, {"email": email, "attributes": {"n": str(n)}, "properties": {}}),
                   _settle(future))
    return [future.result(timeout=10) for future in futures]


def _settle(future: concurrent.futures.Future[int]) -> Any:
    def done(result: int | Refused) -> None:
        if isinstance(result, Refused):
            future.set_exception(result)
        else:
            future.set_result(result)
    return done


def _flusher(outbox: Outbox, config: Config, credentials: bool = True) -> Flusher:
    metrics = Metrics(lambda: Snapshot(0, 0, None, 0, "running", None), "test")
    return Flusher(outbox, TurretUpstream(), config, metrics,
                   Credentials.from_base64(API_KEY, API_SECRET) if credentials else None, rng=_Ceiling())


def _gate_logs(caplog: pytest.LogCaptureFixture) -> list[tuple[str, Any]]:
    return [(record.getMessage().split(";")[0], getattr(record, "fields", {}).get("failed_attempts"))
            for record in caplog.records if record.getMessage().startswith("Upstream")]


def test_requests_in_flight_when_the_endpoint_fails_are_one_backoff_step_not_one_each(
        fake_api: FakeTurretIO, outbox: Outbox, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # All eight in flight together (the answers are held 0.3 s), all eight answered 503. Counting each
    # would make the first wait 0.2 s * 2**7 = 25.6 s; one step waits 0.2 s before the probe.
    fake_api.set_delay(0.3)
    fake_api.script(*[Respond(503)] * 8)
    ids = _queue(outbox, 8)
    flusher = _flusher(outbox, _config(tmp_path, fake_api, concurrency="8", backoff_base="200ms",
                                       backoff_cap="60s"))
    caplog.set_level(logging.INFO, logger="forwarder.delivery")
    flusher.start()
    try:
        fake_api.wait_for_count(8, timeout=10)
    finally:
        flusher.stop(timeout=5)
    received = fake_api.received()
    assert [r.status for r in received[:8]] == [503] * 8
    assert sorted(int(r.idempotency_key or 0) for r in received[8:]) == ids
    assert _gate_logs(caplog) == [("Upstream failing", None), ("Upstream reachable again", 1)]


def test_an_answer_to_a_request_sent_before_the_endpoint_failed_does_not_reopen_it(
        fake_api: FakeTurretIO, outbox: Outbox, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Two users in flight: one is answered 503 at once, the other 200 a second later, while the API has
    # meanwhile stopped accepting connections. That late 200 is older news than the 503.
    fake_api.script(Respond(200, b"{}", delay=1.0), Respond(503))
    _queue(outbox, 2)
    flusher = _flusher(outbox, _config(tmp_path, fake_api, concurrency="2", backoff_base="200ms",
                                       backoff_cap="400ms"))
    caplog.set_level(logging.INFO, logger="forwarder.delivery")
    flusher.start()
    try:
        fake_api.wait_for(lambda received: any(r.status == 503 for r in received), timeout=10)
        fake_api.set_mode("refuse")
        fake_api.wait_for_count(1, timeout=10)  # the late 200
        _wait_until(lambda: outbox.stats.messages == 1)  # ... and its removal committed
        # One more refused attempt, reported after the late 200: the gate stayed closed, the outage still on.
        attempts = _attempts(outbox)
        _wait_until(lambda: _attempts(outbox) > attempts)
        assert _gate_logs(caplog) == [("Upstream failing", None)]
        fake_api.set_mode("up")
        fake_api.wait_for_count(2, timeout=10)
    finally:
        flusher.stop(timeout=5)
    assert [name for name, _ in _gate_logs(caplog)] == ["Upstream failing", "Upstream reachable again"]


def test_a_flush_during_an_outage_probes_at_once_and_its_answer_logs_the_recovery(
        fake_api: FakeTurretIO, outbox: Outbox, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The first attempt fails and the endpoint backs off for 10 minutes; the API is back, the operator
    # flushes. The outage's end must be logged like any other, with the attempts it took.
    fake_api.script(Respond(503))
    ids = _queue(outbox, 1)
    flusher = _flusher(outbox, _config(tmp_path, fake_api, backoff_base="10m", backoff_cap="1h"))
    caplog.set_level(logging.INFO, logger="forwarder.delivery")
    flusher.start()
    try:
        fake_api.wait_for_count(1, timeout=10, delivered=False)
        _wait_until(lambda: flusher.state == "backing_off")
        flusher.flush()
        fake_api.wait_for_count(1, timeout=10)
        _wait_until(lambda: flusher.state == "running")
    finally:
        flusher.stop(timeout=5)
    assert [int(r.idempotency_key or 0) for r in fake_api.delivered()] == ids
    assert _gate_logs(caplog) == [("Upstream failing", None), ("Upstream reachable again", 1)]


@pytest.mark.parametrize("commit_during_the_read", [False, True])
def test_a_flush_does_not_send_again_a_delivered_message_whose_removal_was_not_committed(
        fake_api: FakeTurretIO, tmp_path: Path, commit_during_the_read: bool) -> None:
    # Another process holds SQLite's write lock, so the removal of the delivered first message waits.
    # The flush re-reads the outbox from its start and finds that message still stored: it must not go
    # again (a duplicate, and for its user older news after newer). With ``commit_during_the_read`` the
    # lock is let go after the re-read took its snapshot and before the flusher looks at the rows, so
    # the removal is committed by then, and still the rows of that snapshot hold the message.
    # One request at a time, in id order: a resend would come before the second message's retry.
    fake_api.script(Respond(200, b"{}"), Respond(503))
    commits = _Recorder()
    with Outbox(tmp_path / "data", events=commits) as outbox:
        first, second = _queue(outbox, 2)
        flusher = _flusher(outbox, _config(tmp_path, fake_api, concurrency="1", backoff_base="10m",
                                           backoff_cap="1h"))
        blocker = sqlite3.connect(outbox.data_dir / schema.DB_FILE, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        flusher.start()
        try:
            fake_api.wait_for_count(2, timeout=10, delivered=False)
            _wait_until(lambda: flusher.state == "backing_off")  # the 503 is handled: the second one waits
            if commit_during_the_read:
                _commit_after_the_next_read(outbox, blocker, commits)
            flusher.flush()
            fake_api.wait_for_count(2, timeout=10)  # the second one, retried at once by the flush
        finally:
            blocker.close()
            flusher.stop(timeout=5)
    assert [(int(r.idempotency_key or 0), r.status) for r in fake_api.received()] == [
        (first, 200), (second, 503), (second, 200)]


def _commit_after_the_next_read(outbox: Outbox, blocker: sqlite3.Connection, commits: _Recorder) -> None:
    """The next ``read_window`` returns its rows only after the blocker let go and the writer committed."""
    read_window = outbox.read_window

    def read_then_commit(after_id: int, limit: int) -> Window:
        window = read_window(after_id, limit)
        committed = sum(commits.commits)
        blocker.execute("ROLLBACK")
        commits.wait_for_ops(committed + 1)
        outbox.read_window = read_window  # type: ignore[method-assign]
        return window
    outbox.read_window = read_then_commit  # type: ignore[method-assign]


@pytest.mark.parametrize("change", ["purge", "hold"])
def test_a_message_purged_or_held_while_its_request_is_in_flight_is_not_tried_again(
        fake_api: FakeTurretIO, outbox: Outbox, tmp_path: Path, change: str) -> None:
    # The operator purges (or holds) a user's first message while its request is in flight; the API then
    # answers 500. The message must not be retried: the user's second message goes next.
    fake_api.script(Respond(500))
    first, second = _queue(outbox, 2, one_user=True)
    flusher = _flusher(outbox, _config(tmp_path, fake_api, backoff_base="100ms", backoff_cap="200ms"))
    fake_api.hold()
    flusher.start()
    try:
        fake_api.wait_for_held(1, timeout=10)
        outbox.admin(admin.purge(first) if change == "purge" else admin.hold(first, True)).result(10)
        flusher.resync()  # as the daemon does after an operator's change
        fake_api.release()
        fake_api.wait_for_count(1, timeout=10)
    finally:
        flusher.stop(timeout=5)
    assert [(int(r.idempotency_key or 0), r.status) for r in fake_api.received()] == [(first, 500), (second, 200)]


def test_missing_credentials_warn_once_per_interval_while_messages_wait_not_once_per_message(
        fake_api: FakeTurretIO, outbox: Outbox, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Three users' sets park in the flusher's first step; no new message arrives after that, so every
    # further warning comes from the flusher's own timer.
    monkeypatch.setattr(flusher_module, "_NO_CREDENTIALS_LOG_EVERY", 0.05)
    _queue(outbox, 3)
    flusher = _flusher(outbox, _config(tmp_path, fake_api), credentials=False)
    caplog.set_level(logging.INFO, logger="forwarder.delivery")
    flusher.start()
    try:
        _wait_until(lambda: len(_credential_warnings(caplog)) >= 3)
        assert flusher.state == "paused_no_credentials"
    finally:
        flusher.stop(timeout=5)
    warnings = _credential_warnings(caplog)
    assert {getattr(record, "fields", {}).get("waiting_users") for record in warnings} == {3}
    assert all(TurretUpstream.credentials_hint in record.getMessage() for record in warnings)
    assert fake_api.received() == []
    assert outbox.stats.messages == 3


def _credential_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in list(caplog.records) if record.getMessage().startswith("No API credentials")]


def _attempts(outbox: Outbox) -> int:
    """The failed attempts the outbox has committed for its messages."""
    conn = open_readonly(outbox.data_dir)
    try:
        return sum(row["attempts"] for row in list_queue(conn))
    finally:
        conn.close()


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a committed state (the writer's commit is the event; nothing to subscribe to in-process)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_requests_go_through_the_environments_https_proxy_unless_no_proxy_names_the_api(
        fake_api: FakeTurretIO, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The sender bypasses the session's per-request environment merge; proxies must still be honoured.
    for name in ("NO_PROXY", "no_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    config = _config(tmp_path, fake_api)
    queued = QueuedMessage(1, Message(Kind.SET, {"email": "a@example.com", "attributes": {}, "properties": {}}),
                           time.time())
    credentials = Credentials.from_base64(API_KEY, API_SECRET)
    metrics = Metrics(lambda: Snapshot(0, 0, None, 0, "running", None), "test")
    with _ConnectProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        assert isinstance(Sender(TurretUpstream(), metrics, 1).attempt(queued, credentials, config), Delivered)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert isinstance(Sender(TurretUpstream(), metrics, 1).attempt(queued, credentials, config), Delivered)
    assert proxy.targets == [fake_api.url.removeprefix("https://")]
    assert len(fake_api.received()) == 2


class _ConnectProxy:
    """A minimal HTTPS proxy (CONNECT, then a byte pipe both ways) that records each tunnel's target."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.targets: list[str] = []

    def __enter__(self) -> _ConnectProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += client.recv(4096)
        target = head.split()[1].decode()
        self.targets.append(target)
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with source, sink:
        while chunk := source.recv(65536):
            sink.sendall(chunk)


def test_doorbell_wakes_the_flusher_only_while_it_listens_and_never_loses_a_commit() -> None:
    events: queue.SimpleQueue[Done | Signal] = queue.SimpleQueue()
    bell = Doorbell(events)
    bell.ring()  # the flusher cannot send now: the commit is noted, nobody is woken
    assert events.empty()
    assert bell.take() and not bell.take()
    bell.ring()  # between the flusher's read and its wait: the wait must not sleep through it
    assert bell.wait(listen=True, timeout=30.0) is Signal.WAKE
    assert bell.take()
    woken: list[Done | Signal] = []
    waiter = threading.Thread(target=lambda: woken.append(bell.wait(listen=True, timeout=30.0)))
    waiter.start()
    bell.ring()  # before or after the waiter starts listening: either way it is woken
    waiter.join(30.0)
    assert woken == [Signal.WAKE]
