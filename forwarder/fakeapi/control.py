"""``turret-forwarder fake-api``: the command line, and a loopback control server to inject faults over HTTP."""

from __future__ import annotations

import argparse
import base64
import http.server
import ipaddress
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from forwarder.errors import ConfigError, ForwarderError
from forwarder.fakeapi.server import FakeTurretIO
from forwarder.fakeapi.wire import DEMO_API_KEY, DEMO_API_SECRET, Respond, decode_secret

logger = logging.getLogger(__name__)

_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


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
        self._thread: threading.Thread | None = None  # a failed bind calls server_close before it exists
        try:
            super().__init__(address, _ControlHandler)
        except OSError as e:
            raise ForwarderError(f"fake-api control cannot listen on {address[0]}:{address[1]}: "
                                 f"{e.strerror}") from None
        self.fake = fake
        self._thread = threading.Thread(target=self.serve_forever, name="fake-api-control", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]!s}:{self.server_address[1]}"

    def server_close(self) -> None:
        if self._thread is not None:  # shutdown() waits for a serve_forever: only if one was started
            self.shutdown()
            self._thread.join()
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
    decode_secret(secret, source)  # fail naming where the secret came from, before anything listens
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
