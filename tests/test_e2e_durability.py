"""Whole-daemon durability: an ack means the message is on disk, through kill -9 and many producers.

Every check reads the outbox back the way an operator would (``status --json``) and row by row with the
store's read-only view, and compares it with the ids the producers were given.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from forwarder.client import Client, ForwarderUnavailable
from tests.support.daemon import DaemonProcess
from tests.test_ingest import stored_ids

THREADS = 16
PER_THREAD = 500


def test_acked_messages_survive_kill_9(daemon: DaemonProcess, client: Client) -> None:
    acked = [int(client.set(f"user{n}@example.com", {"n": str(n)})) for n in range(200)]
    daemon.kill9()
    status = daemon.status()
    assert (status["backlog"], status["dead_letters"], status["daemon"]) == (200, 0, "stopped")
    assert stored_ids(daemon.data_dir) == acked == list(range(1, 201))


def test_restart_after_kill_9_keeps_the_backlog_and_never_reuses_an_id(
        daemon: DaemonProcess, client: Client) -> None:
    acked = [int(client.set(f"user{n}@example.com", {"n": str(n)})) for n in range(10)]
    daemon.kill9()
    daemon.start()
    assert daemon.status()["backlog"] == 10
    assert client.set("late@example.com", {"n": "late"}) == "11"
    assert stored_ids(daemon.data_dir) == [*acked, 11]


def _produce(send: Callable[[int, int], str], acked: list[str], ready: threading.Barrier,
             thread: int) -> None:
    ready.wait()
    acked.extend(send(thread, n) for n in range(PER_THREAD))


@pytest.mark.parametrize("style", ["client_per_thread", "shared_client"])
def test_16_threads_of_500_messages_are_all_acked_and_stored(daemon: DaemonProcess,
                                                             style: str) -> None:
    shared = Client(str(daemon.socket))
    clients = [shared if style == "shared_client" else Client(str(daemon.socket)) for _ in range(THREADS)]
    results: list[list[str]] = [[] for _ in range(THREADS)]
    ready = threading.Barrier(THREADS)

    def sender(client: Client) -> Callable[[int, int], str]:
        return lambda thread, n: client.set(f"t{thread}-{n}@example.com", {"n": str(n)})

    threads = [threading.Thread(target=_produce, args=(sender(clients[t]), results[t], ready, t))
               for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in {*clients, shared}:
        client.close()
    acked = [int(message_id) for result in results for message_id in result]
    assert [len(result) for result in results] == [PER_THREAD] * THREADS
    assert sorted(acked) == list(range(1, THREADS * PER_THREAD + 1))
    assert stored_ids(daemon.data_dir) == sorted(acked)
    assert daemon.status()["backlog"] == THREADS * PER_THREAD
    assert "database is locked" not in daemon.log()


def test_kill_9_under_load_loses_no_acked_message(daemon: DaemonProcess) -> None:
    acked: set[int] = set()
    lock = threading.Lock()
    enough = threading.Event()

    def produce(thread: int) -> None:
        with Client(str(daemon.socket)) as client:
            try:
                for n in range(100_000):
                    message_id = int(client.set(f"t{thread}-{n}@example.com", {"n": str(n)}))
                    with lock:
                        acked.add(message_id)
                        if len(acked) >= 2000:
                            enough.set()
            except ForwarderUnavailable:
                return  # the daemon died under us: that request was never acked

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    assert enough.wait(60)
    daemon.kill9()
    for thread in threads:
        thread.join()
    stored = set(stored_ids(daemon.data_dir))
    assert acked - stored == set()
    assert len(stored - acked) <= len(threads)  # at most each producer's one request in flight
    assert daemon.status()["backlog"] == len(stored)
