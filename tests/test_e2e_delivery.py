"""Whole-daemon delivery scenarios: real serve process, real TLS, the local Turret.IO-compatible server."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import trustme

from forwarder.client import Client
from forwarder.fakeapi import FakeTurretIO, Received
from forwarder.turretio import sign
from tests.conftest import API_KEY
from tests.support.daemon import DaemonProcess

SECRET = base64.b64decode("ZGVtby1zZWNyZXQtYnl0ZXM=")
# The shared doc's worked vector, as the vendor's Python client's queue_set returned it.
PRESIGNED = {"url": "/latest/user/alice@example.com", "api_key": "demo-key", "time": "1400000000",
             "signature": "tB1GkjsuutpYQYMSZPxYFgcH8/1h32oCVyADf8ZU4ODK8XEt2XYqdMrfetqjWDqoF8UMxT+WjdUBDcViQq3Heg==",
             "payload": "eyJwbGFuIjogInBybyIsICJwcm9wZXJ0aWVzIjoge319"}


def _by_key(received: list[Received]) -> dict[str, Received]:
    return {r.idempotency_key or "": r for r in received}


def test_500_sets_from_several_clients_arrive_signed_and_exact(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    daemon = make_daemon(api=fake_api).start()
    sent: dict[str, tuple[str, dict[str, str]]] = {}
    lock = threading.Lock()

    def produce(worker: int) -> None:
        with Client(str(daemon.socket)) as client:
            for n in range(100):
                email = f"user{worker}.{n % 7}+tag{n}@example.com"
                attributes = {"plan": f"p{n}", "worker": str(worker)}
                message_id = client.set(email, attributes)
                with lock:
                    sent[message_id] = (email, attributes)

    threads = [threading.Thread(target=produce, args=(w,)) for w in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(sent) == 500
    delivered = _by_key(fake_api.wait_for_count(500, timeout=60))
    assert set(delivered) == set(sent)
    for message_id, (email, attributes) in sent.items():
        request = delivered[message_id]
        assert request.path == f"/latest/user/{email}"  # raw: '@' and '+' not encoded
        assert request.signature_valid
        assert request.headers["X-LS-Key"] == API_KEY
        assert request.headers["Content-Type"] == "text/json"
        assert request.json_text is not None
        assert json.loads(request.json_text) == {**attributes, "properties": {}}
        assert request.headers["X-LS-Auth"] == sign(SECRET, request.path, request.json_text,
                                                     request.headers["X-LS-Time"])
    daemon.wait_for_status(lambda s: s["backlog"] == 0)


def test_queue_set_payload_is_replayed_byte_for_byte(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    payload = PRESIGNED
    daemon = make_daemon(api=fake_api, credentials=False).start()  # pre-signed needs no credentials
    with Client(str(daemon.socket)) as client:
        message_id = client.send_presigned(json.dumps(payload))
    (request,) = fake_api.wait_for_count(1, timeout=30)
    assert request.idempotency_key == message_id
    assert request.path == payload["url"]
    assert request.body == payload["payload"].encode()
    assert request.headers["X-LS-Key"] == payload["api_key"]
    assert request.headers["X-LS-Time"] == payload["time"]
    assert request.headers["X-LS-Auth"] == payload["signature"]
    assert request.signature_valid


def test_per_user_order_one_request_in_flight_per_user_and_users_in_parallel(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    users, rounds = 6, 10
    fake_api.set_delay(0.05)
    fake_api.hold()  # answers wait until every user has a request in flight: the overlap is certain
    daemon = make_daemon("--concurrency", "8", api=fake_api).start()
    order: dict[str, list[str]] = {}
    with Client(str(daemon.socket)) as client:
        for n in range(rounds):
            for user in range(users):
                email = f"u{user}@example.com"
                order.setdefault(email, []).append(client.set(email, {"n": str(n)}))
    fake_api.wait_for_held(users, timeout=30)
    fake_api.release()
    received = fake_api.wait_for_count(users * rounds, timeout=60)
    assert len(fake_api.received()) == users * rounds  # each answered 200 the first time: no retry blurs it
    for email, acked in order.items():
        arrived = sorted((r for r in received if r.path == f"/latest/user/{email}"), key=lambda r: r.at)
        assert [r.idempotency_key for r in arrived] == acked
        for earlier, later in itertools.pairwise(arrived):  # at most one request in flight per user
            assert earlier.answered_at is not None and earlier.answered_at < later.at
    # Different users overlapped: some user's request arrived while another user's was in flight.
    assert any(r.path != other.path and r.at < other.at < (r.answered_at or 0.0)
               for r in received for other in received)


def test_kill9_during_delivery_loses_nothing_and_keeps_idempotency_keys(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_delay(0.02)
    daemon = make_daemon("--concurrency", "4", api=fake_api).start()
    with Client(str(daemon.socket)) as client:
        acked = [client.set(f"k{n % 20}@example.com", {"n": str(n)}) for n in range(300)]
    fake_api.wait_for_count(20, timeout=30)
    daemon.kill9()
    daemon.start()
    fake_api.wait_for(lambda rs: set(acked) <= {r.idempotency_key for r in rs if r.delivered}, timeout=60)
    daemon.wait_for_status(lambda s: s["backlog"] == 0)
    # A message sent twice (answered, then the kill) carries the same key and the same body both times.
    by_key: dict[str, set[str]] = {}
    for r in fake_api.delivered():
        by_key.setdefault(r.idempotency_key or "", set()).add(r.json_text or "")
    assert all(len(bodies) == 1 for bodies in by_key.values())
    assert set(by_key) == set(acked)


def _bundle_of_another_ca(tmp_path: Path) -> str:
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_unknown_ca_is_refused_then_accepted_with_ca_file_despite_env_bundles(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    other = _bundle_of_another_ca(tmp_path)
    env = {"REQUESTS_CA_BUNDLE": other, "CURL_CA_BUNDLE": other}
    daemon = make_daemon("--api-url", fake_api.url, env=env).start()  # no --ca-file: the fake's CA is unknown
    with Client(str(daemon.socket)) as client:
        message_id = client.set("tls@example.com", {"a": "b"})
    daemon.wait_for_log("Upstream failing")
    failure = next(r for r in daemon.log_records() if r["msg"].startswith("Upstream failing"))
    assert failure["result"] == "tls"
    assert daemon.status()["backlog"] == 1
    assert fake_api.delivered() == []
    assert daemon.stop() == 0

    trusted = make_daemon("--ca-file", str(fake_api.ca_file), api=fake_api, env=env).start()
    (request,) = fake_api.wait_for_count(1, timeout=30)
    assert request.idempotency_key == message_id
    trusted.wait_for_status(lambda s: s["backlog"] == 0)


def test_demo_command_runs_to_completion() -> None:
    result = subprocess.run([sys.executable, "-m", "forwarder", "demo"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo passed" in result.stdout
