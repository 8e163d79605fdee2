"""The fake API's HTTPS server: the listener, one keep-alive handler per connection, and ``FakeTurretIO``."""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import http.server
import itertools
import logging
import selectors
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from forwarder.errors import ForwarderError
from forwarder.fakeapi.wire import (
    DEMO_API_KEY,
    DEMO_API_SECRET,
    NOT_FOUND,
    OK,
    UNAUTHORIZED,
    Mode,
    Received,
    Respond,
    decode_secret,
    generate_certificate,
    verify_signature,
)

logger = logging.getLogger(__name__)


def _set_reset_on_close(sock: socket.socket) -> None:
    """SO_LINGER 0 makes close() send RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Listener:
    """The listening socket and its accept thread; closing it is what makes connects get ECONNREFUSED.

    The thread waits on a selector with a wake-up socket: closing a socket does not wake a thread blocked in
    ``accept()`` on every platform.
    """

    def __init__(self, host: str, port: int, on_accept: Callable[[socket.socket], None]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.sock = socket.create_server((host, port), family=family)  # sets SO_REUSEADDR on POSIX
        except OSError as e:
            raise ForwarderError(f"fake-api cannot listen on {host}:{port}: {e.strerror}") from None
        self.sock.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._run, args=(on_accept,), name="fake-api-accept",
                                        daemon=True)
        self._thread.start()

    def _run(self, on_accept: Callable[[socket.socket], None]) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while all(key.fileobj is not self._wake_reader for key, _ in selector.select()):
                with contextlib.suppress(BlockingIOError, ConnectionAbortedError):
                    raw, _ = self.sock.accept()
                    raw.setblocking(True)  # BSDs let accepted sockets inherit the listener's O_NONBLOCK
                    on_accept(raw)

    def close(self) -> None:
        self._wake_writer.send(b"x")
        self._thread.join()
        for sock in (self.sock, self._wake_reader, self._wake_writer):
            sock.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Speaks HTTP/1.1 keep-alive on one TLS connection and applies the server's mode to each request.

    Driven by ``FakeTurretIO``, not by a ``socketserver``: the listener must close and re-bind for
    ``refuse`` and see raw TCP for ``reset``, so only the stdlib's parsing and answering are used.
    """

    protocol_version = "HTTP/1.1"
    # The stdlib writes a response's headers and body in two sends; with Nagle's algorithm on, the body
    # waits for the client's delayed ACK, about 40 ms a request on Linux, which no real API server adds.
    disable_nagle_algorithm = True

    def __init__(self, conn: ssl.SSLSocket, fake: FakeTurretIO, serial: int) -> None:
        self.request, self.client_address = conn, conn.getpeername()
        self.fake, self.serial = fake, serial

    def do_POST(self) -> None:
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        except ValueError:
            self.send_error(400, "Bad Content-Length")
            return
        received, authorized = self.fake._inspect(self, body)
        mode = self.fake.mode
        if mode is Mode.UP or mode is Mode.STALL_BODY:
            self._answer(received, self.fake._choose(received, authorized), stall=mode is Mode.STALL_BODY)
            return
        self.fake._record(received)
        self.close_connection = True
        if mode is Mode.HANG:
            self.fake._wait_while(Mode.HANG)
        elif mode is Mode.RESET:
            _set_reset_on_close(self.connection)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_POST

    def _answer(self, received: Received, respond: Respond, *, stall: bool) -> None:
        self.fake._pause(respond.delay)
        self.fake._wait_while_held()
        self.fake._record(replace(received, status=respond.status, answered_at=time.monotonic()))
        self.send_response(respond.status)
        for name, value in respond.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(respond.body)))
        self.end_headers()
        if stall:
            self.fake._wait_while(Mode.STALL_BODY)
            self.close_connection = True
        else:
            self.wfile.write(respond.body)

    def log_message(self, format: str, *args: Any) -> None:
        """Kept off stderr: the stdlib logs request lines, which carry email addresses."""


class FakeTurretIO:
    """A Turret.IO stand-in on loopback: verifies signatures per the doc, records requests, injects faults.

    Default answers: a signed POST to ``/latest/...`` gets 200 with a small JSON body, a badly signed one
    401 ``Unauthorized``, anything else 404. Scripted answers override that whatever the signature.
    ``max_skew`` (seconds) makes a stale X-LS-Time a 401, measured against ``clock``.
    """

    def __init__(self, api_key: str = DEMO_API_KEY, api_secret_b64: str = DEMO_API_SECRET,
                 host: str = "127.0.0.1", port: int = 0, certfile: str | None = None,
                 keyfile: str | None = None, cert_dir: str | None = None, *,
                 max_skew: float | None = None, clock: Callable[[], float] = time.time) -> None:
        if keyfile is not None and certfile is None:
            raise ForwarderError("fake-api: --key needs --cert")
        self.host, self.port, self.mode = host, port, Mode.UP
        self.ca_file: str | None = None  # the generated CA, for clients to trust
        self._api_key, self._secret = api_key, decode_secret(api_secret_b64, "api_secret_b64 argument")
        self._certfile, self._keyfile, self._cert_dir = certfile, keyfile, cert_dir
        self._max_skew, self._clock, self._delay = max_skew, clock, 0.0
        self._cond = threading.Condition()  # guards everything below and wakes every waiter
        self._script: deque[Respond] = deque()
        self._received: list[Received] = []
        self._serials = itertools.count(1)
        self._sockets: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._running = False
        self._holding, self._held = False, 0  # answers kept back by hold(), and how many wait now
        self._listener: _Listener | None = None
        self._listener_lock = threading.Lock()
        self._own_dir: str | None = None

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen; undone by stop(), also when it fails half-way (no temp dir or socket is left behind)."""
        try:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.minimum_version = ssl.TLSVersion.TLSv1_2
            certfile = self._certfile
            if certfile is None:
                self._own_dir = None if self._cert_dir else tempfile.mkdtemp(prefix="turret-fake-api-")
                self.ca_file, certfile = generate_certificate(Path(self._cert_dir or str(self._own_dir)))
            self._context.load_cert_chain(certfile, self._keyfile)
            self._running = True
            self._sync_listener()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Return promptly even with hanging connections: wake every waiter, shut every socket down."""
        with self._cond:
            self._running = False
            self._cond.notify_all()
            sockets, threads = list(self._sockets.values()), list(self._threads.values())
        self._sync_listener()
        for sock in sockets:
            with contextlib.suppress(OSError):  # its own thread may have closed it already
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked reading it; close() would not
        for thread in threads:
            thread.join()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def __enter__(self) -> FakeTurretIO:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    def delivered(self) -> list[Received]:
        return [r for r in self.received() if r.delivered]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> list[Received]:
        """Block until ``predicate(received)`` holds; the ``TimeoutError`` says what did arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(list(self._received)), timeout):
                statuses = ", ".join(str(r.status) for r in self._received) or "none"
                raise TimeoutError(f"fake API: condition not met within {timeout}s; "
                                   f"{len(self._received)} requests received, statuses: {statuses}")
            return list(self._received)

    def wait_for_count(self, n: int, timeout: float, *, delivered: bool = True) -> list[Received]:
        """Block until at least ``n`` requests arrived (answered 2xx if ``delivered``); return those."""
        def matching(received: list[Received]) -> list[Received]:
            return [r for r in received if r.delivered or not delivered]

        return matching(self.wait_for(lambda received: len(matching(received)) >= n, timeout))

    def script(self, *responses: Respond) -> None:
        with self._cond:
            self._script.extend(responses)

    def set_mode(self, mode: str) -> None:
        with self._cond:
            self.mode = Mode(mode)
            self._cond.notify_all()
        self._sync_listener()

    def set_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"delay must not be negative, got {seconds}")
        with self._cond:
            self._delay = seconds

    def hold(self) -> None:
        """Keep every answer back (after its delay) until ``release()``: requests pile up in flight."""
        with self._cond:
            self._holding = True

    def release(self) -> None:
        with self._cond:
            self._holding = False
            self._cond.notify_all()

    def wait_for_held(self, n: int, timeout: float) -> None:
        """Block until at least ``n`` answers are being held back, that is ``n`` requests in flight at once."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._held >= n, timeout):
                raise TimeoutError(f"fake API: {self._held} answers held within {timeout}s, not {n}")

    def set_credentials(self, api_key: str, api_secret_b64: str) -> None:
        secret = decode_secret(api_secret_b64, "set_credentials argument")
        with self._cond:
            self._api_key, self._secret = api_key, secret

    def clear(self) -> None:
        """Forget the recorded requests; mode, delay, script and credentials stay."""
        with self._cond:
            self._received.clear()

    def _sync_listener(self) -> None:
        """Open or close the listening socket to match the mode; re-opening re-binds the same port."""
        with self._listener_lock:
            listening = self._running and self.mode is not Mode.REFUSE
            if listening and self._listener is None:
                self._listener = _Listener(self.host, self.port, self._accept)
                self.port = self._listener.sock.getsockname()[1]
            elif not listening and self._listener is not None:
                self._listener.close()
                self._listener = None

    def _accept(self, raw: socket.socket) -> None:
        with self._cond:
            if not self._running:
                raw.close()
                return
            serial = next(self._serials)
            self._sockets[serial] = raw
            self._threads[serial] = threading.Thread(target=self._run_connection, args=(serial, raw),
                                                     name=f"fake-api-connection-{serial}", daemon=True)
            self._threads[serial].start()

    def _run_connection(self, serial: int, raw: socket.socket) -> None:
        try:
            self._serve_connection(serial, raw)
        except OSError as e:  # includes ssl.SSLError: the client went away, or a fault cut it off
            logger.debug("Fake API connection ended", extra={"connection": serial, "error": str(e)})
        except Exception:
            logger.exception("Fake API connection failed", extra={"connection": serial})
        finally:
            with self._cond:
                sock = self._sockets.pop(serial)
                del self._threads[serial]
            sock.close()

    def _serve_connection(self, serial: int, raw: socket.socket) -> None:
        if self.mode is Mode.HANG:
            self._wait_while(Mode.HANG)
            return
        if self.mode is Mode.RESET:
            # Wait for the client's first bytes so the reset always lands in its handshake: reset before the
            # client wraps its socket, CPython's SSLSocket._create raises without closing it (3.11.7).
            raw.recv(1, socket.MSG_PEEK)
            _set_reset_on_close(raw)
        if self.mode is not Mode.UP and self.mode is not Mode.STALL_BODY:
            return
        with self._cond:  # so stop() finds the raw or the TLS socket, never a detached one
            if not self._running:
                return
            conn = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            self._sockets[serial] = conn
        conn.do_handshake()
        handler = _Handler(conn, self, serial)
        handler.setup()
        try:
            handler.handle()
        finally:
            handler.finish()

    def _inspect(self, handler: _Handler, body: bytes) -> tuple[Received, bool]:
        """The record of one request (status 0 until answered) and whether it is authorized."""
        try:
            signed: bytes | None = base64.b64decode(body, validate=True)
        except binascii.Error:
            signed = None
        try:
            json_text = None if signed is None else signed.decode("utf-8")
        except UnicodeDecodeError:
            json_text = None
        headers = handler.headers
        key, stamp, auth = headers.get("X-LS-Key"), headers.get("X-LS-Time"), headers.get("X-LS-Auth")
        with self._cond:
            api_key, secret = self._api_key, self._secret
        valid = (signed is not None and key is not None and stamp is not None and auth is not None
                 and hmac.compare_digest(key.encode("latin-1"), api_key.encode("utf-8"))
                 and verify_signature(secret, handler.path, signed, stamp, auth))
        received = Received(handler.command, handler.path, dict(headers.items()), body, json_text, valid, 0,
                            headers.get("Idempotency-Key"), handler.serial, time.monotonic())
        return received, valid and self._is_fresh(stamp or "")

    def _is_fresh(self, stamp: str) -> bool:
        if self._max_skew is None:
            return True
        try:
            return abs(self._clock() - int(stamp)) <= self._max_skew
        except ValueError:
            return False

    def _choose(self, received: Received, authorized: bool) -> Respond:
        """The next scripted answer, else the default; the server-wide delay is added to it."""
        with self._cond:
            scripted, delay = (self._script.popleft() if self._script else None), self._delay
        if scripted is None and (received.method != "POST" or not received.path.startswith("/latest/")):
            scripted = NOT_FOUND
        respond = scripted or (OK if authorized else UNAUTHORIZED)
        return replace(respond, delay=respond.delay + delay)

    def _record(self, received: Received) -> None:
        with self._cond:
            self._received.append(received)
            self._cond.notify_all()
        logger.debug("Fake API recorded a request", extra={
            "method": received.method, "status": received.status, "connection": received.connection})

    def _pause(self, seconds: float) -> None:
        """Delay an answer; stop() cuts it short."""
        with self._cond:
            self._cond.wait_for(lambda: not self._running, seconds)

    def _wait_while_held(self) -> None:
        with self._cond:
            self._held += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._holding or not self._running)
            self._held -= 1

    def _wait_while(self, mode: Mode) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.mode is not mode or not self._running)
