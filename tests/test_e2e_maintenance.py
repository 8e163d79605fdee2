"""Maintenance: delivered messages give their space back, and a corrupt row becomes a dead letter.

The file bound is the one the README documents: once the backlog has drained, ``outbox.db`` and its WAL
together take at most ``FILE_BOUND`` bytes, without any ``VACUUM``.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO
from forwarder.message import Message
from forwarder.protocol import parse_frame
from forwarder.store import schema
from tests.support.daemon import DaemonProcess

MESSAGES = 200_000
CONNECTIONS = 4
USERS = 1000  # ordering keys, so that 32 requests can be in flight at once
RECORD_BYTES = 1024
FILE_BOUND = 8 << 20  # README, "Disk use": "200,000 messages of 1 KiB delivered leave at most 8 MiB"
DRAIN_TIMEOUT = 1000.0  # a bound on a wait, not a measurement: the drain runs at the daemon's delivery rate
_CHUNK = 512  # request lines per write; the daemon reads at most 1024 ahead of its replies


def _line(n: int, pad: int | None = None) -> bytes:
    """The n-th request line: a ``set`` whose stored record is ``RECORD_BYTES`` long, unless ``pad`` says."""
    if pad is None:
        pad = RECORD_BYTES - _record_size(_line(n, pad=0))
    request = {"op": "set", "email": f"user{n % USERS}@example.com",
               "attributes": {"n": f"{n:06d}", "pad": "x" * pad}}
    return json.dumps(request).encode() + b"\n"


def _record_size(line: bytes) -> int:
    """Bytes the outbox stores for the request ``line``."""
    message = parse_frame(line)
    assert isinstance(message, Message)
    return len(schema.encode_record(message.to_record()))


def _lines(first: int, count: int) -> Iterator[bytes]:
    chunk: list[bytes] = []
    for n in range(first, first + count):
        chunk.append(_line(n))
        if len(chunk) == _CHUNK:
            yield b"".join(chunk)
            chunk.clear()
    yield b"".join(chunk)


def _pipeline(socket_path: Path, first: int, count: int) -> list[str]:
    """Send ``count`` messages down one connection, writing ahead of the replies; the acked ids in order."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(socket_path))
        def send() -> None:
            for chunk in _lines(first, count):
                sock.sendall(chunk)

        sender = threading.Thread(target=send)
        sender.start()
        with sock.makefile("rb") as replies:
            ids = [json.loads(replies.readline())["id"] for _ in range(count)]
        sender.join()
    return ids


def _file_bytes(data_dir: Path) -> int:
    """``outbox.db`` and its WAL: what the outbox takes on disk."""
    return sum(path.stat().st_size for path in (data_dir / schema.DB_FILE, data_dir / f"{schema.DB_FILE}-wal")
               if path.exists())


def _wait_until(predicate: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout}s: {what()}")
        time.sleep(0.1)


@pytest.mark.timeout(1200)  # 200,000 HTTPS requests through requests: minutes on a 2-core runner
def test_200k_messages_of_1kib_delivered_leave_the_file_within_its_bound(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    assert _record_size(_line(0)) == _record_size(_line(MESSAGES - 1)) == RECORD_BYTES
    daemon = make_daemon("--concurrency", "32", api=fake_api).start()
    per_connection = MESSAGES // CONNECTIONS
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        acked = [message_id for ids in pool.map(
            lambda c: _pipeline(daemon.socket, c * per_connection, per_connection), range(CONNECTIONS))
            for message_id in ids]
    assert len(set(acked)) == MESSAGES
    daemon.wait_for_status(lambda s: s["backlog"] == 0, timeout=DRAIN_TIMEOUT)
    assert {r.idempotency_key for r in fake_api.delivered()} == set(acked)
    _wait_until(lambda: _file_bytes(daemon.data_dir) <= FILE_BOUND, timeout=60,
                what=lambda: f"the outbox still takes {_file_bytes(daemon.data_dir)} bytes")
    assert daemon.status()["bytes"] == 0
    assert daemon.stop() == 0
    assert _file_bytes(daemon.data_dir) <= FILE_BOUND


def test_readme_states_the_bound_this_file_holds_the_daemon_to() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"200,000 messages of 1 KiB delivered leave at most {FILE_BOUND >> 20} MiB" in " ".join(readme.split())


def test_corrupt_row_between_two_good_ones_is_dead_lettered_and_the_others_delivered(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon(api=fake_api).start()
    with Client(str(daemon.socket)) as client:
        first, middle, last = (client.set(f"row{n}@example.com", {"n": str(n)}) for n in range(3))
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.data_dir / schema.DB_FILE) as conn:
        (data,) = conn.execute(f"SELECT data FROM {schema.TABLE} WHERE _id = ?", (int(middle),)).fetchone()
        tried = conn.execute("SELECT attempts FROM message_state WHERE message_id = ?", (int(middle),)).fetchone()
        garbage = b"\xff\xfe not a record".ljust(len(data), b"\0")  # same length: byte counter stays exact
        conn.execute(f"UPDATE {schema.TABLE} SET data = ? WHERE _id = ?", (garbage, int(middle)))
    conn.close()

    fake_api.set_mode("up")
    daemon.start()
    delivered = fake_api.wait_for_count(2, timeout=30)
    assert sorted(r.idempotency_key or "" for r in delivered) == sorted([first, last])  # two users: any order
    status = daemon.wait_for_status(lambda s: s["dead_letters"] == 1 and s["backlog"] == 0)
    assert (status["bytes"], status["daemon"]) == (0, "running")
    result = daemon.cli("dead", "list", "--json")
    assert result.returncode == 0, result.stderr
    (dead,) = json.loads(result.stdout)
    assert (str(dead["id"]), dead["kind"], dead["reason"], dead["attempts"]) == (
        middle, "corrupt", "corrupt", tried[0] if tried else 0)  # refused connects before the corruption
    records = [r for r in daemon.log_records() if r["msg"].startswith("A stored row does not decode")]
    assert [r["id"] for r in records] == [int(middle)]
    assert daemon.stop() == 0

    daemon.start()  # the dead letter stays put; nothing is retried, nothing crashes
    assert daemon.status()["dead_letters"] == 1
    assert len(fake_api.delivered()) == 2
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()
