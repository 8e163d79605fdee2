"""Tests of forwarder.ingest against a real daemon on a real socket: corpus, framing, socket hygiene, rights.

Raw sockets, not ``Client``, wherever the bytes on the wire are the point. Nothing waits on a timer: an
idle drop is awaited as EOF on the dropped socket, readiness as a ping answer, storage as ``status``.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import sqlite3
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from forwarder.client import Client
from forwarder.ingest import IngestServer, SocketOptions
from forwarder.message import QueuedMessage
from forwarder.metrics import Metrics, Snapshot
from forwarder.store import Outbox, open_readonly, read_ids, schema
from forwarder.store.reader import read_window
from tests.support.daemon import DaemonProcess, ping
from tests.test_protocol import Frame, expected_kind, invalid_frames, valid_frames

NO_API = ("--api-url", "https://127.0.0.1:9")  # nothing listens there: every message stays queued
WAIT = 20.0  # seconds; only a bound on a wait for an event, never a measurement
NOBODY = 65534
OTHER_GROUP = 4242


class Line:
    """A raw connection to the daemon that reads reply lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> dict[str, Any]:
        line = self._file.readline()
        assert line.endswith(b"\n"), f"no reply line, got {line!r}"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def ask(self, line: bytes) -> dict[str, Any]:
        self.send(line + b"\n")
        return self.reply()

    def rest_until_closed(self) -> bytes:
        """Whatever the daemon still sends, up to its close (EOF, or a reset when our bytes went unread)."""
        try:
            return self._file.read()
        except ConnectionResetError:
            return b""

    def readable(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])

    def close(self) -> None:
        self._file.close()
        self.sock.close()

    def __enter__(self) -> Line:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_line(email: str = "alice@example.com", **fields: Any) -> bytes:
    return json.dumps({"op": "set", "email": email, "attributes": {"plan": "pro"}, **fields},
                      separators=(",", ":")).encode()


def _exit_status(daemon: DaemonProcess) -> int:
    """Start a daemon that is expected to refuse to run; its exit status."""
    daemon.start(wait=False)
    assert daemon.proc is not None
    return daemon.proc.wait(WAIT)


def stored_records(data_dir: Path) -> list[tuple[int, dict[str, Any]]]:
    """Every stored message as (id, body), read through the store's read-only view as ``status`` does."""
    conn = open_readonly(data_dir)
    try:
        rows = read_window(conn, 0, 100_000)
    finally:
        conn.close()
    records = [(row.id, dict(row.message.body)) for row in rows if isinstance(row, QueuedMessage)]
    assert len(records) == len(rows), "a stored row does not decode"
    return records


def stored_ids(data_dir: Path) -> list[int]:
    conn = open_readonly(data_dir)
    try:
        return read_ids(conn)
    finally:
        conn.close()


# -- the corpus, over the wire

def test_every_bad_input_gets_its_code_and_a_precise_detail_and_the_daemon_carries_on(
        daemon: DaemonProcess) -> None:
    frames = invalid_frames()
    with Line(daemon.socket) as conn:
        replies = {frame.name: conn.ask(frame.line) for frame in frames}
        assert conn.ask(b'{"op":"ping"}') == {"ok": True}
        assert conn.ask(_set_line()) == {"ok": True, "id": "1"}  # the writer too is unharmed
    assert {name: (reply["ok"], reply["error"]) for name, reply in replies.items()} == {
        frame.name: (False, frame.code) for frame in frames}
    assert {frame.name: replies[frame.name]["detail"] for frame in frames
            if frame.detail not in replies[frame.name]["detail"]} == {}
    status = daemon.status()
    assert (status["backlog"], status["dead_letters"]) == (1, 0)


def test_every_valid_input_is_acked_and_stored(daemon: DaemonProcess) -> None:
    frames = valid_frames()
    with Line(daemon.socket) as conn:
        replies = [conn.ask(frame.line) for frame in frames]
    assert replies == [{"ok": True} if expected_kind(frame) == "ping" else {"ok": True, "id": str(n)}
                       for n, frame in _numbered(frames)]
    assert [record for _, record in stored_records(daemon.data_dir)] == [
        _expected_record(frame) for frame in frames if expected_kind(frame) != "ping"]


def _numbered(frames: list[Frame]) -> Iterator[tuple[int, Frame]]:
    """Pair each frame with the id it should get: messages are numbered from 1, pings get none."""
    n = 0
    for frame in frames:
        n += expected_kind(frame) != "ping"
        yield n, frame


def _expected_record(frame: Frame) -> dict[str, Any]:
    """The body the store should hold for a valid frame: its fields, absent optional ones filled in."""
    request = json.loads(frame.line)
    body = {k: v for k, v in request.items() if k not in ("op", "key")}
    if expected_kind(frame) == "set":
        return {"attributes": {}, "properties": {}, **body}
    return body


# -- idempotency

def test_same_key_twice_returns_the_same_id_and_stores_one_message(client: Client,
                                                                    daemon: DaemonProcess) -> None:
    first = client.set("alice@example.com", {"plan": "pro"}, key="signup-1")
    again = client.set("alice@example.com", {"plan": "pro"}, key="signup-1")
    other = client.set("alice@example.com", {"plan": "pro"}, key="signup-2")
    assert (first, again, other) == ("1", "1", "2")
    assert daemon.status()["backlog"] == 2


def test_same_key_twice_in_one_write_stores_one_message(daemon: DaemonProcess) -> None:
    with Line(daemon.socket) as conn:
        conn.send(_set_line(key="k") + b"\n" + _set_line(key="k") + b"\n")
        assert [conn.reply(), conn.reply()] == [{"ok": True, "id": "1"}, {"ok": True, "id": "1"}]
    assert daemon.status()["backlog"] == 1


# -- framing

def test_200_kib_message_written_one_byte_at_a_time_is_acked_whole(daemon: DaemonProcess) -> None:
    overhead = len(_set_line(attributes={"blob": ""}))
    blob = "x" * (200 * 1024 - overhead)
    line = json.dumps({"op": "set", "email": "alice@example.com", "attributes": {"blob": blob}},
                      separators=(",", ":")).encode()
    assert len(line) == 200 * 1024
    with Line(daemon.socket) as conn:
        for byte in range(len(line)):
            conn.send(line[byte:byte + 1])
        conn.send(b"\n")
        assert conn.reply() == {"ok": True, "id": "1"}
    assert stored_records(daemon.data_dir) == [
        (1, {"email": "alice@example.com", "attributes": {"blob": blob}, "properties": {}})]


def test_requests_in_one_write_get_one_reply_each_in_order(daemon: DaemonProcess) -> None:
    with Line(daemon.socket) as conn:
        conn.send(b"\n".join([_set_line("a@example.com"), _set_line("not-an-email"), b'{"op":"ping"}',
                              _set_line("b@example.com")]) + b"\n")
        replies = [conn.reply() for _ in range(4)]
    assert [reply["ok"] for reply in replies] == [True, False, True, True]
    assert replies[0] == {"ok": True, "id": "1"}
    assert replies[1]["error"] == "invalid"
    assert replies[2] == {"ok": True}
    assert replies[3] == {"ok": True, "id": "2"}


def test_three_messages_in_one_write_are_all_stored(daemon: DaemonProcess) -> None:
    with Line(daemon.socket) as conn:
        conn.send(b"".join(_set_line(f"user{n}@example.com") + b"\n" for n in range(3)))
        assert [conn.reply() for _ in range(3)] == [{"ok": True, "id": str(n)} for n in (1, 2, 3)]
    assert [record["email"] for _, record in stored_records(daemon.data_dir)] == [
        "user0@example.com", "user1@example.com", "user2@example.com"]


@pytest.mark.parametrize("sent", ["half", "all but the newline"])
def test_a_request_cut_by_the_end_of_the_stream_is_refused_and_stores_nothing(daemon: DaemonProcess,
                                                                                sent: str) -> None:
    # A writer that half-closes after a line without its newline (printf without \n, or a crash mid-write)
    # is told so: never silence, and never a guess that the bytes were the whole request.
    line = _set_line()
    with Line(daemon.socket) as conn:
        conn.send(line[: len(line) // 2] if sent == "half" else line)
        conn.sock.shutdown(socket.SHUT_WR)
        assert json.loads(conn.rest_until_closed()) == {  # then the daemon closed its side
            "ok": False, "error": "invalid",
            "detail": "the stream ended inside a request line (no newline after it); it was not stored"}
    assert daemon.status()["backlog"] == 0
    with Line(daemon.socket) as conn:
        assert conn.ask(line) == {"ok": True, "id": "1"}  # no id was spent on the half


@pytest.fixture
def small_lines(make_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A daemon whose longest request line is 1 KiB."""
    return make_daemon(*NO_API, "--max-message-bytes", "1KiB").start()


def _line_of(size: int) -> bytes:
    line = _set_line(attributes={"pad": ""})
    line = _set_line(attributes={"pad": "x" * (size - len(line))})
    assert len(line) == size
    return line


def test_line_of_exactly_the_limit_is_accepted(small_lines: DaemonProcess) -> None:
    with Line(small_lines.socket) as conn:
        assert conn.ask(_line_of(1024)) == {"ok": True, "id": "1"}
        assert conn.ask(b'{"op":"ping"}') == {"ok": True}


def test_line_one_byte_over_the_limit_is_too_large_and_closes_the_connection(
        small_lines: DaemonProcess) -> None:
    with Line(small_lines.socket) as conn:
        conn.send(_line_of(1025) + b"\n" + b'{"op":"ping"}\n')
        assert conn.reply() == {"ok": False, "error": "too_large",
                                "detail": "request line exceeds max_message_bytes (1024); closing the connection"}
        assert conn.rest_until_closed() == b""  # the ping after it is never answered
    assert small_lines.status()["backlog"] == 0
    assert ping(small_lines.socket)


def test_long_line_is_refused_before_its_newline_arrives(small_lines: DaemonProcess) -> None:
    with Line(small_lines.socket) as conn:
        conn.send(_set_line(attributes={"pad": "x" * 8192})[:-2])  # no end in sight
        reply = conn.reply()
        assert conn.rest_until_closed() == b""
    assert reply == {"ok": False, "error": "too_large",
                     "detail": "request line exceeds max_message_bytes (1024); closing the connection"}
    assert small_lines.status()["backlog"] == 0


def test_acked_messages_before_an_oversize_line_stay_stored(small_lines: DaemonProcess) -> None:
    with Line(small_lines.socket) as conn:
        conn.send(_set_line() + b"\n" + _line_of(4096) + b"\n")
        assert conn.reply() == {"ok": True, "id": "1"}
        assert conn.reply()["error"] == "too_large"
        assert conn.rest_until_closed() == b""
    assert small_lines.status()["backlog"] == 1


def test_stalled_client_does_not_delay_other_clients(daemon: DaemonProcess) -> None:
    line = _set_line("stalled@example.com")
    with Line(daemon.socket) as stalled, Client(str(daemon.socket)) as other:
        stalled.send(line[:10])
        ids = [other.set(f"user{n}@example.com", {"n": str(n)}) for n in range(100)]
        assert ids == [str(n) for n in range(1, 101)]
        assert not stalled.readable()  # still connected, still waiting for its line
        stalled.send(line[10:] + b"\n")
        assert stalled.reply() == {"ok": True, "id": "101"}


def test_a_burst_of_connects_while_the_daemon_cannot_accept_waits_in_the_listen_queue(
        daemon: DaemonProcess) -> None:
    # The daemon is stopped (SIGSTOP), as a busy loop would be: 300 web workers connect at once. Each
    # connect must be queued by the kernel, not refused with EAGAIN (asyncio's default backlog is 100).
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    clients: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(300):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(daemon.socket))
            except BlockingIOError:
                refused += 1
                client.close()
                continue
            clients.append(client)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    for client in clients:
        client.setblocking(True)
        client.sendall(b'{"op":"ping"}\n')
    replies = [client.makefile("rb").readline() for client in clients]
    for client in clients:
        client.close()
    assert (refused, len(replies)) == (0, 300)
    assert all(reply.startswith(b'{"ok": true') for reply in replies)


def test_idle_clients_are_dropped_after_the_idle_timeout(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API, "--idle-timeout", "1s").start()
    with Line(daemon.socket) as stalled, Line(daemon.socket) as silent:
        stalled.send(_set_line()[:10])
        assert stalled.rest_until_closed() == b""
        assert silent.rest_until_closed() == b""
    assert daemon.status()["backlog"] == 0
    with Client(str(daemon.socket)) as client:
        assert client.set("alice@example.com", {"plan": "pro"}) == "1"


def test_a_client_that_never_reads_its_replies_gets_only_a_pipeline_of_them_handled(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    # Every line is a cheap refusal, so one read of the socket holds ~130,000 of them: the daemon must stop
    # handling lines at its pipeline depth, not handle a whole read before it looks at what it owes.
    daemon = make_daemon(*NO_API).start()
    sock, _ = _send_until_the_daemon_stops_reading(daemon.socket, b"\xff\n" * (4 << 20))
    with Line(daemon.socket) as other:
        assert other.ask(_set_line()) == {"ok": True, "id": "1"}
    with urllib.request.urlopen(daemon.metrics_url + "/metrics", timeout=WAIT) as response:
        refused = next(sample.value for family in text_string_to_metric_families(response.read().decode())
                       for sample in family.samples if sample.name == "forwarder_ingest_refused_messages_total"
                       and sample.labels == {"reason": "invalid"})
    sock.close()
    assert 1024 <= refused < 50_000  # the pipeline, plus the replies the socket buffers hold


def test_a_client_held_back_by_backpressure_is_not_dropped_as_idle(
        make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API, "--idle-timeout", "1s").start()
    pings = b'{"op":"ping"}\n' * 200_000
    sock, sent = _send_until_the_daemon_stops_reading(daemon.socket, pings)
    with sock:
        time.sleep(2.5)  # longer than the idle timeout: waiting for something that must not happen
        replies = bytearray()
        reader = threading.Thread(target=lambda: replies.extend(sock.makefile("rb").read()))
        reader.start()
        sock.setblocking(True)
        sock.sendall(pings[sent:])
        sock.shutdown(socket.SHUT_WR)
        reader.join(WAIT)
    assert replies == b'{"ok": true}\n' * 200_000


def _send_until_the_daemon_stops_reading(path: Path, data: bytes) -> tuple[socket.socket, int]:
    """Write ``data`` without reading replies until the socket stays unwritable for a second.

    Returns the socket and how many bytes were written (all of them if it never stalled).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(path))
    sock.setblocking(False)
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:sent + 65536])
        except BlockingIOError:
            if not select.select([], [sock], [], 1.0)[1]:
                break
    return sock, sent


def test_sigterm_with_clients_connected_stops_cleanly(daemon: DaemonProcess) -> None:
    with Line(daemon.socket) as idle, Line(daemon.socket) as halfway:
        assert idle.ask(_set_line()) == {"ok": True, "id": "1"}
        halfway.send(_set_line()[:10])
        assert daemon.stop() == 0
        assert idle.rest_until_closed() == b""
        assert halfway.rest_until_closed() == b""
    problems = [record for record in daemon.log_records() if record["level"] in ("error", "critical")]
    assert problems == []
    assert daemon.status()["backlog"] == 1
    assert not daemon.socket.exists()


# -- the socket file

def test_stale_socket_after_kill_9_is_replaced_on_restart(daemon: DaemonProcess) -> None:
    daemon.kill9()
    assert stat.S_ISSOCK(daemon.socket.lstat().st_mode)  # left behind by the crash
    assert not ping(daemon.socket)
    daemon.start()
    with Client(str(daemon.socket)) as client:
        assert client.set("alice@example.com", {"plan": "pro"}) == "1"
    assert "Replaced a stale socket file" in daemon.log()


def test_second_daemon_on_a_live_socket_exits_and_leaves_the_first_alone(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    inode = daemon.socket.stat().st_ino
    with DaemonProcess(tmp_path / "other", daemon.socket, NO_API) as second:
        assert _exit_status(second) == 3
        assert f"a live forwarder already answers on {daemon.socket}; leaving it alone" in second.log()
    assert daemon.socket.stat().st_ino == inode
    with Client(str(daemon.socket)) as client:
        assert client.set("alice@example.com", {"plan": "pro"}) == "1"


def test_second_daemon_on_the_same_data_dir_exits_naming_the_pid(daemon: DaemonProcess,
                                                                  short_dir: Path) -> None:
    assert daemon.proc is not None
    with DaemonProcess(daemon.data_dir, short_dir / "other.sock", NO_API) as second:
        second.log_path = short_dir / "second.log"
        assert _exit_status(second) == 3
        assert (f"another turret-forwarder (pid {daemon.proc.pid}) is using data dir {daemon.data_dir}"
                in second.log())
    assert not (short_dir / "other.sock").exists()
    assert ping(daemon.socket)


def test_regular_file_at_the_socket_path_is_left_untouched(make_daemon: Callable[..., DaemonProcess],
                                                            socket_path: Path) -> None:
    socket_path.write_text("precious\n")
    daemon = make_daemon(*NO_API)
    assert _exit_status(daemon) == 1
    assert socket_path.read_text() == "precious\n"
    assert f"{socket_path} exists and is not a socket; refusing to touch it" in daemon.log()


# -- permissions

@pytest.fixture
def traversable(short_dir: Path) -> Path:
    """The socket's directory, searchable by anyone, so only the socket's own mode decides."""
    short_dir.chmod(0o711)
    return short_dir


def _connect_as(path: Path, groups: list[int]) -> str:
    """Connect from a forked child running as nobody with ``groups``; its answer to a ping, or the error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgroups(groups)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(WAIT)
                sock.connect(str(path))
                sock.sendall(b'{"op":"ping"}\n')
                result = sock.recv(100).decode()
        except BaseException as e:  # reported to the parent, which asserts on it
            result = type(e).__name__
        finally:
            os.write(write_end, result.encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_socket_is_0660_whatever_the_umask(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API)
    old = os.umask(0o077)  # the child inherits it
    try:
        daemon.start()
    finally:
        os.umask(old)
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660


def test_socket_mode_is_configurable(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API, "--socket-mode", "0600").start()
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o600
    listening = [r for r in daemon.log_records() if r.get("msg") == "Listening"]
    assert [r["mode"] for r in listening] == ["0600"]  # as the setting is written, not Python's "0o600"
    assert ping(daemon.socket)


def test_user_outside_the_socket_group_is_denied(make_daemon: Callable[..., DaemonProcess],
                                                 traversable: Path) -> None:
    daemon = make_daemon(*NO_API).start()
    assert _connect_as(daemon.socket, []) == "PermissionError"


def test_socket_group_lets_its_members_in(make_daemon: Callable[..., DaemonProcess],
                                          traversable: Path) -> None:
    daemon = make_daemon(*NO_API, "--socket-group", str(OTHER_GROUP)).start()
    assert daemon.socket.stat().st_gid == OTHER_GROUP
    assert _connect_as(daemon.socket, [OTHER_GROUP]) == '{"ok": true}\n'
    assert _connect_as(daemon.socket, []) == "PermissionError"


def test_requests_during_shutdown_get_shutting_down_while_pending_acks_still_complete(
        data_dir: Path, short_dir: Path) -> None:
    """In process, so the moment between "stop accepting" and "socket closed" can be held open.

    Another connection holds SQLite's write lock, so the first message's commit (and its ack) waits;
    meanwhile the server is told to stop and a new request arrives.
    """
    path = short_dir / "in.sock"

    async def scenario(outbox: Outbox, blocker: sqlite3.Connection) -> tuple[Any, Any, Any]:
        metrics = Metrics(lambda: Snapshot(0, 0, None, 0, "running", None), "test", CollectorRegistry())
        server = IngestServer(outbox, SocketOptions(path), metrics, 1 << 20, WAIT, dict)
        await server.start()
        pending_reader, pending_writer = await asyncio.open_unix_connection(str(path))
        pending_writer.write(_set_line() + b"\n")
        while not metrics.registry.get_sample_value("forwarder_ingest_received_messages_total", {"op": "set"}):
            await asyncio.sleep(0.001)  # until ingest handed it to the outbox, whose commit waits on the lock
        stopping = asyncio.create_task(server.stop(WAIT))
        await asyncio.sleep(0)  # let stop() begin: it refuses from its first step, then waits for the ack
        late_reader, late_writer = await asyncio.open_unix_connection(str(path))
        late_writer.write(_set_line("late@example.com") + b"\n")
        late = json.loads(await late_reader.readline())
        blocker.rollback()
        pending = json.loads(await pending_reader.readline())
        await stopping
        for writer in (pending_writer, late_writer):
            writer.close()
        return pending, late, metrics.registry.get_sample_value(
            "forwarder_ingest_refused_messages_total", {"reason": "shutting_down"})

    with Outbox(data_dir) as outbox:
        blocker = sqlite3.connect(data_dir / schema.DB_FILE, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            pending, late, refused = asyncio.run(scenario(outbox, blocker))
        finally:
            blocker.close()
    assert pending == {"ok": True, "id": "1"}
    assert late == {"ok": False, "error": "shutting_down",
                    "detail": "the forwarder is shutting down; retry against the new instance"}
    assert refused == 1.0
    assert not path.exists()
    conn = open_readonly(data_dir)
    try:
        assert read_ids(conn) == [1]
    finally:
        conn.close()
