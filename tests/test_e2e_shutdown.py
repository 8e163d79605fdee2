"""Graceful shutdown under load: SIGTERM stops accepting, keeps every ack, removes the socket, exits 0.

The bound on the exit is Docker's: ``docker stop`` sends SIGKILL 10 s after SIGTERM, and the default
``shutdown_timeout`` (5 s) must leave the daemon time to commit and close well before that.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from forwarder.client import Client, ForwarderUnavailable
from forwarder.errors import Refused
from forwarder.fakeapi import FakeTurretIO
from forwarder.store import schema
from tests.support.daemon import DaemonProcess

PRODUCERS = 6
DOCKER_STOP_GRACE = 10.0  # seconds between docker stop's SIGTERM and its SIGKILL


@dataclass
class _Producer:
    """One app thread sending without pause until told to stop; what each request came to."""

    socket: str
    number: int
    acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # wire codes
    unavailable: int = 0  # could not connect, or the connection closed before a reply

    def run(self, stop: threading.Event) -> None:
        with Client(self.socket, timeout=30.0) as client:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    self.acked.append(client.set(f"producer{self.number}.{n % 5}@example.com", {"n": str(n)}))
                except Refused as refusal:
                    self.refused.append(refusal.code)
                except ForwarderUnavailable:
                    self.unavailable += 1


def _stored_ids(daemon: DaemonProcess) -> set[str]:
    """The outbox's ids, read straight from the file the stopped daemon closed."""
    conn = sqlite3.connect(f"file:{daemon.data_dir / schema.DB_FILE}?mode=ro", uri=True)
    try:
        return {str(row[0]) for row in conn.execute(f"SELECT _id FROM {schema.TABLE}")}
    finally:
        conn.close()


def _start_producers(daemon: DaemonProcess,
                     stop: threading.Event) -> tuple[list[_Producer], list[threading.Thread]]:
    producers = [_Producer(str(daemon.socket), n) for n in range(PRODUCERS)]
    threads = [threading.Thread(target=p.run, args=(stop,)) for p in producers]
    for thread in threads:
        thread.start()
    return producers, threads


def _wait_for_acks(producers: list[_Producer], count: int) -> None:
    done = threading.Event()

    def check() -> None:
        while sum(len(p.acked) for p in producers) < count:
            if done.wait(0.01):
                return
    checker = threading.Thread(target=check)
    checker.start()
    checker.join(60)
    done.set()
    assert sum(len(p.acked) for p in producers) >= count


def _sigterm_and_wait(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    return daemon.proc.wait(DOCKER_STOP_GRACE)


def test_sigterm_under_load_exits_0_keeps_every_ack_and_removes_the_socket(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_delay(0.05)  # requests are in flight when the signal comes
    daemon = make_daemon("--concurrency", "8", api=fake_api).start()
    stop = threading.Event()
    producers, threads = _start_producers(daemon, stop)
    _wait_for_acks(producers, 300)
    fake_api.wait_for_count(20, timeout=30)

    assert _sigterm_and_wait(daemon) == 0
    stop.set()
    for thread in threads:
        thread.join()

    acked = {message_id for p in producers for message_id in p.acked}
    delivered = {r.idempotency_key for r in fake_api.delivered()}
    stored = _stored_ids(daemon)
    assert acked <= stored | delivered
    assert not stored & delivered  # removals waiting for a commit to ride were committed at the stop
    assert {code for p in producers for code in p.refused} <= {"shutting_down"}
    assert not daemon.socket.exists()
    assert not (daemon.data_dir / "admin.sock").exists()
    assert "Stopped cleanly" in daemon.log()
    assert "Traceback" not in daemon.log()

    daemon.start()  # what was stored and not yet delivered goes out after the restart
    daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert acked <= {r.idempotency_key for r in fake_api.delivered()}
    assert len(fake_api.delivered()) == len(delivered | stored)  # and nothing delivered before went again


def test_sigterm_with_a_stalled_api_abandons_requests_in_time_and_keeps_their_messages(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("stall_body")  # the API took the requests and never finishes its answers
    daemon = make_daemon("--shutdown-timeout", "2s", api=fake_api).start()
    with Client(str(daemon.socket)) as client:
        acked = {client.set(f"stall{n}@example.com", {"n": str(n)}) for n in range(20)}
    fake_api.wait_for_count(8, timeout=30, delivered=False)  # the default concurrency: 8 in flight
    assert _sigterm_and_wait(daemon) == 0
    assert _stored_ids(daemon) == acked
    assert not daemon.socket.exists()
    records = [r for r in daemon.log_records() if r["msg"].startswith("Abandoned in-flight requests")]
    assert [r["requests"] for r in records] == [8]

    fake_api.clear()
    fake_api.set_mode("up")
    daemon.start()
    daemon.wait_for_status(lambda s: s["backlog"] == 0)
    assert {r.idempotency_key for r in fake_api.delivered()} == acked
