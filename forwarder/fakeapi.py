"""A local Turret.IO-compatible HTTPS server with fault injection, for tests, the demo and users' trials.

Owns its own signature check, written from the shared API doc and never imported from ``turretio``, so one
misreading of the doc cannot hide on both sides. Imports only the stdlib, ``forwarder.errors`` and, lazily
when it must generate a certificate, ``trustme``. It keeps every request in memory: not for production.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
import http.server
import ipaddress
import itertools
import json
import logging
import os
import selectors
import shutil
import signal
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from forwarder.errors import ConfigError, ForwarderError

logger = logging.getLogger(__name__)

DEMO_API_KEY = "demo-key"
DEMO_API_SECRET = base64.b64encode(b"demo-secret-bytes").decode("ascii")
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class Mode(enum.StrEnum):
    """How the server treats new connections and the next request on open ones (fault injection)."""

    UP = "up"  # answer normally
    REFUSE = "refuse"  # listening socket closed, so connects get ECONNREFUSED; open connections are closed
    RESET = "reset"  # drop with RST (SO_LINGER 0); on a new connection, before the TLS handshake
    HANG = "hang"  # do nothing more; the connection is closed without an answer when the hang ends
    STALL_BODY = "stall_body"  # send status line and headers, never the body


@dataclass(frozen=True, slots=True)
class Respond:
    """One answer to send; ``FakeTurretIO.script()`` queues these ahead of the signature-based default."""

    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds, added to the server-wide delay

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599 or self.delay < 0:
            raise ValueError(f"bad response: status {self.status}, delay {self.delay}")


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the server read it, and the status line it sent back (0 if none was sent).

    A ``stall_body`` answer counts with its status: a real server would have applied that request, which is
    what makes a retry of it a duplicate. ``path`` is the request target as sent, not URL-decoded.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json_text: str | None  # the base64-decoded body, None when it is not base64 of UTF-8 text
    signature_valid: bool  # the HMAC alone; a stale X-LS-Time under max_skew does not make it False
    status: int
    idempotency_key: str | None
    connection: int  # serial number of the TCP connection, so a test can see keep-alive
    at: float  # time.monotonic() when the request was read

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


_OK = Respond(200, b'{"status": "ok"}', {"Content-Type": "application/json"})
_UNAUTHORIZED = Respond(401, b"Unauthorized", {"Content-Type": "text/plain"})
_NOT_FOUND = Respond(404, b"Not Found", {"Content-Type": "text/plain"})


def _decode_secret(secret_b64: str, source: str) -> bytes:
    """The HMAC key: the vendor distributed secrets base64-encoded."""
    try:
        return base64.b64decode(secret_b64, validate=True)
    except binascii.Error:
        raise ConfigError("api_secret", source, "is not valid base64") from None


def _verify_signature(secret: bytes, target: str, signed: bytes, stamp: str, auth: str) -> bool:
    """X-LS-Auth = base64(HMAC-SHA512(secret, path + json_text + time)), over the bytes as received."""
    # http.server decoded the request line and headers as latin-1, so encoding back gives the wire bytes.
    message = target.split("?", 1)[0].encode("latin-1") + signed + stamp.encode("latin-1")
    expected = base64.b64encode(hmac.new(secret, message, hashlib.sha512).digest())
    return hmac.compare_digest(expected, auth.encode("latin-1"))


def _generate_certificate(directory: Path) -> tuple[str, str]:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost: (CA file, cert+key file)."""
    try:
        import trustme
    except ImportError:
        raise ForwarderError(
            "fake-api needs a certificate: pass --cert and --key, or install turret-forwarder[demo]"
        ) from None
    ca = trustme.CA()
    ca_file, server_file = directory / "ca.pem", directory / "server.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(server_file))
    return str(ca_file), str(server_file)


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
        self.fake._record(replace(received, status=respond.status))
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
        self._api_key, self._secret = api_key, _decode_secret(api_secret_b64, "api_secret_b64 argument")
        self._certfile, self._keyfile, self._cert_dir = certfile, keyfile, cert_dir
        self._max_skew, self._clock, self._delay = max_skew, clock, 0.0
        self._cond = threading.Condition()  # guards everything below and wakes every waiter
        self._script: deque[Respond] = deque()
        self._received: list[Received] = []
        self._serials = itertools.count(1)
        self._sockets: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._running = False
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
                self.ca_file, certfile = _generate_certificate(Path(self._cert_dir or str(self._own_dir)))
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

    def set_credentials(self, api_key: str, api_secret_b64: str) -> None:
        secret = _decode_secret(api_secret_b64, "set_credentials argument")
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
                 and _verify_signature(secret, handler.path, signed, stamp, auth))
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
            scripted = _NOT_FOUND
        respond = scripted or (_OK if authorized else _UNAUTHORIZED)
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

    def _wait_while(self, mode: Mode) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.mode is not mode or not self._running)


def _respond_from_json(item: Any) -> Respond:
    return Respond(int(item["status"]), str(item.get("body", "")).encode("utf-8"),
                   {str(k): str(v) for k, v in item.get("headers", {}).items()}, float(item.get("delay", 0)))


_CONTROL_ACTIONS: dict[str, Callable[[FakeTurretIO, Any], None]] = {
    "/mode": lambda fake, doc: fake.set_mode(doc["mode"]),
    "/delay": lambda fake, doc: fake.set_delay(float(doc["seconds"])),
    "/script": lambda fake, doc: fake.script(*(_respond_from_json(item) for item in doc)),
    "/clear": lambda fake, doc: fake.clear(),
}


class ControlServer(http.server.ThreadingHTTPServer):
    """Plain-HTTP JSON control of a FakeTurretIO, so a user can inject faults from a shell with curl.

    Serves from construction until ``server_close()`` (the end of its ``with`` block). It has no
    authentication, which is why ``main`` only lets it listen on loopback.
    """

    def __init__(self, fake: FakeTurretIO, address: tuple[str, int]) -> None:
        try:
            super().__init__(address, _ControlHandler)
        except OSError as e:
            raise ForwarderError(f"fake-api control cannot listen on {address[0]}:{address[1]}: "
                                 f"{e.strerror}") from None
        self.fake = fake
        threading.Thread(target=self.serve_forever, name="fake-api-control", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]!s}:{self.server_address[1]}"

    def server_close(self) -> None:
        self.shutdown()
        super().server_close()


class _ControlHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ControlServer

    def do_GET(self) -> None:
        if self.path != "/received":
            self._reply(404, {"ok": False, "error": "not found"})
            return
        self._reply(200, [{**asdict(r), "body": base64.b64encode(r.body).decode("ascii")}
                          for r in self.server.fake.received()])

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        action = _CONTROL_ACTIONS.get(self.path)
        if action is None:
            self._reply(404, {"ok": False, "error": "not found"})
            return
        try:
            action(self.server.fake, json.loads(raw) if raw else None)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            self._reply(400, {"ok": False, "error": f"{type(e).__name__}: {e}"})
            return
        self._reply(200, {"ok": True})

    def _reply(self, status: int, doc: Any) -> None:
        body = json.dumps(doc).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("Fake API control: " + format, *args)


def _parse_control(value: str) -> tuple[str, int]:
    """HOST:PORT on loopback only: the control server has no authentication."""
    host, _, port = value.rpartition(":")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}") from None
    if not loopback:
        raise argparse.ArgumentTypeError(f"the control server only listens on loopback, not {host!r}")
    return host, number


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turret-forwarder fake-api",
                                     description="Run a local Turret.IO-compatible HTTPS API to try a setup.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8443, help="HTTPS port (default %(default)s)")
    parser.add_argument("--cert", help="PEM certificate chain; a throwaway CA issues one when omitted")
    parser.add_argument("--key", help="PEM private key for --cert")
    parser.add_argument("--cert-dir", help="where the generated CA and certificate go (default: a temp dir)")
    parser.add_argument("--api-key", default=DEMO_API_KEY, help="API key to accept (default %(default)s)")
    parser.add_argument("--api-secret-file", help="file holding the base64 API secret "
                                                  "(default: $TURRET_API_SECRET, else the demo secret)")
    parser.add_argument("--control", type=_parse_control, default="127.0.0.1:8444",
                        help="loopback HOST:PORT of the plain-HTTP control server (default %(default)s)")
    return parser


def _read_secret(path: str | None, environ: Mapping[str, str]) -> tuple[str, str]:
    """The base64 secret and where it came from: --api-secret-file, else TURRET_API_SECRET, else demo."""
    if path is not None:
        try:
            return Path(path).read_text(encoding="utf-8").strip(), "--api-secret-file"
        except OSError as e:
            raise ConfigError("api_secret_file", "--api-secret-file", e.strerror or str(e)) from None
    if "TURRET_API_SECRET" in environ:
        return environ["TURRET_API_SECRET"].strip(), "TURRET_API_SECRET"
    return DEMO_API_SECRET, "default"


def main(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int:
    """``turret-forwarder fake-api``: serve until SIGINT or SIGTERM, then exit 0."""
    args = _build_parser().parse_args(argv)
    secret, source = _read_secret(args.api_secret_file, os.environ if environ is None else environ)
    _decode_secret(secret, source)  # fail naming where the secret came from, before anything listens
    fake = FakeTurretIO(args.api_key, secret, args.host, args.port, args.cert, args.key, args.cert_dir)
    # Blocked before any thread starts, so every thread inherits the mask and sigwait() receives the
    # signal: no handler runs at all.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        with fake, ControlServer(fake, args.control) as control:
            trust = f"pass --ca-file {fake.ca_file}" if fake.ca_file else f"certificate {args.cert}"
            print(f"Fake Turret.IO API on {fake.url}, control on {control.url}; {trust}", flush=True)
            signal.sigwait(_STOP_SIGNALS)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return 0
