"""The app-side client: send messages to the local forwarder over its Unix socket.

Imports only ``protocol``-level knowledge (errors, message kinds), never sqlite, requests, watchdog or
prometheus, so an app pulls in nothing heavy. One reused connection, thread-safe; a short connect
timeout so a web request never hangs when the daemon is down.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from collections.abc import Mapping
from typing import Any

from forwarder.errors import ForwarderError, InvalidMessage, MessageTooLarge, refusal_for_code

DEFAULT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 1.0


class ForwarderUnavailable(ForwarderError, ConnectionError):
    """The daemon could not be reached, or the connection broke before a reply arrived.

    When it broke mid-request the message may or may not have been stored: send it again with the same
    ``key`` to be sure it is stored exactly once.
    """


class Client:
    """A connection to the forwarder's socket, shared by the threads of one process."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._buffer = b""

    def set(self, email: str, attributes: Mapping[str, str], properties: Mapping[str, str] | None = None,
            key: str | None = None) -> str:
        """Create or update the user ``email``; returns the message id once it is durably stored."""
        request: dict[str, Any] = {"op": "set", "email": email, "attributes": dict(attributes)}
        if properties:
            request["properties"] = dict(properties)
        return self._send_message(request, key)

    def post(self, path: str, body: Mapping[str, Any], key: str | None = None) -> str:
        """Queue any other ``/latest/...`` POST of the API; returns the message id."""
        return self._send_message({"op": "post", "path": path, "body": dict(body)}, key)

    def send_presigned(self, payload: str | Mapping[str, str], key: str | None = None) -> str:
        """Queue the JSON text (or dict) the vendor's ``User.queue_set`` returned; replayed verbatim."""
        try:
            request = dict(json.loads(payload) if isinstance(payload, str) else payload)
        except (ValueError, TypeError) as e:
            raise InvalidMessage(f"queue_set payload is not a JSON object: {e}") from None
        return self._send_message(request, key)

    def ping(self) -> None:
        """Round trip to the daemon; raises ``ForwarderUnavailable`` if it does not answer."""
        self.request({"op": "ping"})

    def close(self) -> None:
        with self._lock:
            self._disconnect()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send_message(self, request: dict[str, Any], key: str | None) -> str:
        if key is not None:
            request["key"] = key
        return str(self.request(request)["id"])

    def request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Send one request and return its reply; a refusal raises the error class of its code."""
        line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            reply = self._round_trip(line)
            if reply.get("error") == MessageTooLarge.code:
                self._disconnect()  # the daemon closes this connection after the reply; never reuse it
        if reply.get("ok") is True:
            return reply
        raise refusal_for_code(str(reply.get("error")))(str(reply.get("detail", "")))

    def _round_trip(self, line: bytes) -> dict[str, Any]:
        sock = self._connected()
        try:
            sock.sendall(line)
            raw = self._read_line(sock)
        except OSError as e:
            self._disconnect()
            raise ForwarderUnavailable(f"connection to {self.socket_path} broke mid-request: {e}") from e
        try:
            reply = json.loads(raw)
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._disconnect()  # out of step with the daemon: a later reply could answer the wrong request
            raise ForwarderUnavailable(f"unexpected reply from {self.socket_path}: {raw[:100]!r}")
        return reply

    def _connected(self) -> socket.socket:
        """The open connection, or a new one if there is none or the daemon closed ours (restart)."""
        if self._sock is not None and _peer_closed(self._sock):
            self._disconnect()
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.connect_timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                raise ForwarderUnavailable(f"cannot connect to the forwarder at {self.socket_path}: {e}") from e
            sock.settimeout(self.timeout)
            self._sock, self._buffer = sock, b""
        return self._sock

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the forwarder closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _disconnect(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _peer_closed(sock: socket.socket) -> bool:
    """True if the daemon hung up (readable with nothing to read) since the last reply."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
