"""``turret-forwarder demo``: the whole job end to end, on this machine, in under a minute.

Starts the local Turret.IO-compatible HTTPS server and a real ``serve`` process in a temporary directory,
sends through the Python client, takes the API down, kills the forwarder with SIGKILL, restarts it, brings
the API back, and checks that every acked message arrived, correctly signed, exactly as acked.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from forwarder.client import Client, ForwarderUnavailable
from forwarder.errors import ForwarderError
from forwarder.fakeapi import DEMO_API_KEY, DEMO_API_SECRET, FakeTurretIO, Received

FIRST_BATCH = 20
OUTAGE_BATCH = 30
_STEP_TIMEOUT = 30.0
_OUR_PREFIXES = ("FORWARDER_", "TURRET_")  # every setting's variable, and FORWARDER_CONFIG


class DemoFailed(ForwarderError):
    """A step of the demo did not turn out as it should; the text says which."""


def run_demo(out: Callable[[str], None] = print, environ: Mapping[str, str] | None = None) -> int:
    """Run the demo; 0 when every acked message was delivered, else ``DemoFailed`` with the reason.

    The forwarder it starts inherits ``environ`` (default ``os.environ``) without any ``FORWARDER_*`` or
    ``TURRET_*`` variable: the user's own settings (a secret file, a config file) must not mix with the
    demo's, which would fail ("api_secret is given too") or point the demo somewhere else.
    """
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="turret-demo-") as tmp, FakeTurretIO(cert_dir=tmp) as api:
        work = Path(tmp)
        out(f"Local Turret.IO-compatible API on {api.url} (TLS with a throwaway CA), forwarder in {work}")
        forwarder = _Forwarder(work, api, os.environ if environ is None else environ)
        try:
            _demo_steps(out, api, forwarder)
        finally:
            forwarder.stop()
    out(f"Demo passed in {time.monotonic() - started:.1f} s.")
    return 0


def _demo_steps(out: Callable[[str], None], api: FakeTurretIO, forwarder: _Forwarder) -> None:
    forwarder.start()
    client = Client(str(forwarder.socket))
    out(f"\n1. Sending {FIRST_BATCH} user updates through the Python client while the API is up")
    acked, latencies = _send(client, 0, FIRST_BATCH)
    _wait(out, "all are delivered", lambda: len(_delivered_keys(api)) >= FIRST_BATCH)
    out(f"   {FIRST_BATCH} acked (median ack {_ms(latencies)}) and delivered, every signature valid")

    out(f"\n2. Taking the API down, then sending {OUTAGE_BATCH} more: acks stay fast, the backlog grows")
    api.set_mode("refuse")
    more, outage_latencies = _send(client, FIRST_BATCH, OUTAGE_BATCH)
    acked += more
    first = client.request({"op": "status"})
    out(f"   {OUTAGE_BATCH} acked (median ack {_ms(outage_latencies)}); backlog {first['backlog']}, "
        f"oldest waiting {first['oldest_age_seconds']:.1f} s")
    _wait(out, "the oldest message is a second older",
          lambda: client.request({"op": "status"})["oldest_age_seconds"] >= 1.0 + first["oldest_age_seconds"])
    status = client.request({"op": "status"})
    out(f"   a moment later: backlog {status['backlog']}, oldest waiting {status['oldest_age_seconds']:.1f} s, "
        f"delivery {status['delivery_state']}")

    out("\n3. Killing the forwarder with SIGKILL and starting it again on the same data dir")
    forwarder.kill()
    forwarder.start()
    client.close()
    status = client.request({"op": "status"})
    out(f"   restarted: backlog {status['backlog']} (nothing acked was lost)")
    if status["backlog"] < OUTAGE_BATCH:
        raise DemoFailed(f"after the restart the backlog is {status['backlog']}, expected {OUTAGE_BATCH}")

    out("\n4. Bringing the API back")
    api.set_mode("up")
    _wait(out, "all are delivered", lambda: len(_delivered_keys(api)) >= len(acked))
    _check_everything_arrived(api, acked)
    _wait(out, "the backlog is empty", lambda: client.request({"op": "status"})["backlog"] == 0)
    status = client.request({"op": "status"})
    out(f"   all {len(acked)} acked messages delivered, each exactly as acked; backlog {status['backlog']}")
    client.close()


def _send(client: Client, start: int, count: int) -> tuple[list[str], list[float]]:
    ids, latencies = [], []
    for n in range(start, start + count):
        t0 = time.perf_counter()
        ids.append(client.set(f"demo.user+{n}@example.com", {"plan": "pro" if n % 2 else "free", "n": str(n)}))
        latencies.append(time.perf_counter() - t0)
    return ids, latencies


def _ms(latencies: list[float]) -> str:
    return f"{statistics.median(latencies) * 1000:.2f} ms"


def _delivered_keys(api: FakeTurretIO) -> set[str]:
    return {r.idempotency_key or "" for r in api.delivered() if r.signature_valid}


def _check_everything_arrived(api: FakeTurretIO, acked: list[str]) -> None:
    delivered: dict[str, Received] = {r.idempotency_key or "": r for r in api.delivered()}
    missing = [message_id for message_id in acked if message_id not in delivered]
    if missing:
        raise DemoFailed(f"{len(missing)} acked messages never arrived (ids {missing[:5]}...)")
    for n, message_id in enumerate(acked):
        request = delivered[message_id]
        expected_path = f"/latest/user/demo.user+{n}@example.com"
        if request.path != expected_path or not request.signature_valid or f'"n": "{n}"' not in (
                request.json_text or ""):
            raise DemoFailed(f"message {message_id} arrived altered: {request.path} {request.json_text!r}")


def _wait(out: Callable[[str], None], what: str, done: Callable[[], bool]) -> None:
    """Poll ``done`` with a progress line, up to ``_STEP_TIMEOUT``."""
    deadline = time.monotonic() + _STEP_TIMEOUT
    dots = 0
    while not done():
        if time.monotonic() > deadline:
            raise DemoFailed(f"timed out after {_STEP_TIMEOUT:.0f} s waiting until {what}")
        dots += 1
        if dots % 10 == 0:
            out(f"   ... waiting until {what}")
        time.sleep(0.1)


class _Forwarder:
    """The real daemon as a child process (``python -m forwarder serve``), pointed at the local API."""

    def __init__(self, work: Path, api: FakeTurretIO, environ: Mapping[str, str]) -> None:
        self.socket = work / "forwarder.sock"
        self._command = [sys.executable, "-m", "forwarder", "serve", "--data-dir", str(work / "data"),
                         "--socket", str(self.socket), "--api-url", api.url, "--ca-file", str(api.ca_file),
                         "--metrics-addr", "off", "--backoff-cap", "1s", "--log-format", "text"]
        self._env = {key: value for key, value in environ.items() if not key.startswith(_OUR_PREFIXES)}
        self._env.update(TURRET_API_KEY=DEMO_API_KEY, TURRET_API_SECRET=DEMO_API_SECRET)
        self._log = work / "forwarder.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(self._command, env=self._env, stdout=log, stderr=log)
        deadline = time.monotonic() + _STEP_TIMEOUT
        while True:
            try:
                with Client(str(self.socket), timeout=1.0) as client:
                    client.ping()
                return
            except ForwarderUnavailable:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise DemoFailed(f"the forwarder did not start:\n{self._log.read_text()}") from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
