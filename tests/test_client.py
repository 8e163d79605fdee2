"""Tests of forwarder.client: every call against a real daemon, refusals as classes, reconnects, failures.

Thread safety of one shared ``Client`` is exercised by the 16-thread test in ``test_e2e_durability``.
Misbehaving daemons (silent, garbled) are small in-test socket servers.
"""

from __future__ import annotations

import json
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.client import Client, ForwarderUnavailable
from forwarder.errors import InvalidMessage, MessageTooLarge, OutboxFull, Refused
from tests.support.daemon import DaemonProcess
from tests.test_ingest import NO_API, stored_ids

PRESIGNED = {"url": "/latest/user/alice@example.com", "api_key": "demo-key", "time": "1400000000",
             "signature": "c2ln", "payload": "eyJwbGFuIjogInBybyJ9"}


def test_every_call_returns_the_id_of_the_stored_message(client: Client, daemon: DaemonProcess) -> None:
    client.ping()
    ids = [client.set("alice@example.com", {"plan": "pro"}),
           client.set("bob@example.com", {"plan": "free"}, {"source": "signup"}, key="k-1"),
           client.post("/latest/target/vip", {"attributes": [{"name": "plan", "value": "pro"}]}),
           client.send_presigned(json.dumps(PRESIGNED)),
           client.send_presigned(PRESIGNED, key="k-2")]
    assert ids == ["1", "2", "3", "4", "5"]
    assert stored_ids(daemon.data_dir) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("payload", ["not json", "[1, 2]"])
def test_a_presigned_payload_that_is_not_a_json_object_raises_invalid_message(client: Client, payload: str) -> None:
    with pytest.raises(InvalidMessage, match="queue_set payload is not a JSON object"):
        client.send_presigned(payload)
    client.ping()


def test_request_returns_the_whole_reply(client: Client) -> None:
    status = client.request({"op": "status"})
    assert (status["ok"], status["backlog"], status["dead_letters"]) == (True, 0, 0)


def test_refusal_raises_the_class_of_its_code_with_the_detail(client: Client) -> None:
    with pytest.raises(InvalidMessage) as caught:
        client.set("not an email", {"plan": "pro"})
    assert caught.value.code == "invalid"
    assert str(caught.value).startswith("email is malformed")
    assert client.set("alice@example.com", {"plan": "pro"}) == "1"  # the connection is still good


def test_too_large_raises_and_the_next_call_reconnects(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API, "--max-message-bytes", "1KiB").start()
    with Client(str(daemon.socket)) as client:
        with pytest.raises(MessageTooLarge, match=re.escape("exceeds max_message_bytes (1024)")):
            client.set("alice@example.com", {"pad": "x" * 2048})
        assert client.set("alice@example.com", {"plan": "pro"}) == "1"


def test_full_outbox_raises_outbox_full(make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(*NO_API, "--max-backlog-messages", "1").start()
    with Client(str(daemon.socket)) as client:
        assert client.set("alice@example.com", {"plan": "pro"}) == "1"
        with pytest.raises(OutboxFull, match=r"^backlog is at its limit of 1 messages$"):
            client.set("bob@example.com", {"plan": "pro"})
    assert stored_ids(daemon.data_dir) == [1]


def test_missing_socket_raises_forwarder_unavailable(short_dir: Path) -> None:
    client = Client(str(short_dir / "nobody.sock"))
    with client, pytest.raises(ForwarderUnavailable, match="cannot connect"):
        client.ping()


def test_socket_with_no_daemon_behind_it_raises_forwarder_unavailable(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves behind
        with Client(str(path)) as client, pytest.raises(ForwarderUnavailable, match="cannot connect"):
            client.set("alice@example.com", {"plan": "pro"})


@pytest.mark.parametrize("stop", ["sigterm", "kill9"])
def test_same_client_reconnects_after_a_daemon_restart(daemon: DaemonProcess, client: Client,
                                                        stop: str) -> None:
    assert client.set("alice@example.com", {"plan": "pro"}) == "1"
    if stop == "sigterm":
        assert daemon.stop() == 0
    else:
        daemon.kill9()
    daemon.start()
    assert client.set("bob@example.com", {"plan": "pro"}) == "2"
    assert stored_ids(daemon.data_dir) == [1, 2]  # nothing sent twice


def test_daemon_down_raises_then_the_same_client_works_once_it_is_back(daemon: DaemonProcess,
                                                                        client: Client) -> None:
    client.ping()
    daemon.kill9()
    daemon.socket.unlink()
    with pytest.raises(ForwarderUnavailable):
        client.set("alice@example.com", {"plan": "pro"})
    daemon.start()
    assert client.set("alice@example.com", {"plan": "pro"}) == "1"


class _Canned(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """A fake daemon that answers every request line with the next canned reply (``b""``: stay silent)."""

    daemon_threads = True

    def __init__(self, path: Path, replies: list[bytes]) -> None:
        self.replies = iter(replies)
        self.connections = 0
        self.silence = threading.Event()
        super().__init__(str(path), _CannedHandler)


class _CannedHandler(socketserver.StreamRequestHandler):
    server: _Canned

    def handle(self) -> None:
        self.server.connections += 1
        for _ in self.rfile:
            reply = next(self.server.replies)
            if not reply:
                self.server.silence.wait()
                return
            self.wfile.write(reply)


@pytest.fixture
def canned(short_dir: Path) -> Iterator[Callable[[list[bytes]], _Canned]]:
    servers: list[_Canned] = []

    def serve(replies: list[bytes]) -> _Canned:
        server = _Canned(short_dir / f"canned{len(servers)}.sock", replies)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.silence.set()
        server.shutdown()
        server.server_close()


def test_silent_daemon_raises_after_the_timeout_and_the_next_call_reconnects(
        canned: Callable[[list[bytes]], _Canned]) -> None:
    server = canned([b"", b'{"ok": true}\n'])
    with Client(server.server_address, timeout=0.2) as client:  # type: ignore[arg-type]
        with pytest.raises(ForwarderUnavailable, match="broke mid-request"):
            client.ping()
        client.ping()  # a late reply to the first request can never be taken for this one's
    assert server.connections == 2


def test_garbled_reply_raises_forwarder_unavailable_and_the_next_call_reconnects(
        canned: Callable[[list[bytes]], _Canned]) -> None:
    server = canned([b"<html>\n", b'{"ok": true, "id": "7"}\n'])
    with Client(server.server_address) as client:  # type: ignore[arg-type]
        with pytest.raises(ForwarderUnavailable, match="unexpected reply"):
            client.set("alice@example.com", {"plan": "pro"})
        assert client.set("alice@example.com", {"plan": "pro"}) == "7"
    assert server.connections == 2


def test_reply_that_is_not_an_object_raises_forwarder_unavailable(
        canned: Callable[[list[bytes]], _Canned]) -> None:
    server = canned([b"[1, 2]\n", b'{"ok": true}\n'])
    with Client(server.server_address) as client:  # type: ignore[arg-type]
        with pytest.raises(ForwarderUnavailable, match="unexpected reply"):
            client.ping()
        client.ping()
    assert server.connections == 2


def test_unknown_error_code_raises_the_base_refusal(canned: Callable[[list[bytes]], _Canned]) -> None:
    server = canned([b'{"ok": false, "error": "from_the_future", "detail": "newer daemon"}\n'])
    client = Client(server.server_address)  # type: ignore[arg-type]
    with client, pytest.raises(Refused, match=r"^newer daemon$") as caught:
        client.ping()
    assert type(caught.value) is Refused
