"""The local Turret.IO stand-in: signature checks from the doc's vectors, recording, faults, control, CLI."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import certifi
import pytest
import requests
import trustme

from forwarder.errors import ConfigError, ForwarderError
from forwarder.fakeapi import DEMO_API_SECRET, ControlServer, FakeTurretIO, Mode, Respond, main

REPO = Path(__file__).resolve().parent.parent

# The worked vector of /work/shared/turretio-api.md (the vendor's Python client 0.2).
WORKED_PATH = "/latest/user/alice@example.com"
WORKED_TIME = "1400000000"
WORKED_JSON = '{"plan": "pro", "properties": {}}'
WORKED_BODY = b"eyJwbGFuIjogInBybyIsICJwcm9wZXJ0aWVzIjoge319"
WORKED_AUTH = "tB1GkjsuutpYQYMSZPxYFgcH8/1h32oCVyADf8ZU4ODK8XEt2XYqdMrfetqjWDqoF8UMxT+WjdUBDcViQq3Heg=="
WORKED_HEADERS = {"X-LS-Key": "demo-key", "X-LS-Time": WORKED_TIME, "X-LS-Auth": WORKED_AUTH,
                  "Content-Type": "text/json"}
# The same call as the Node client makes it: compact JSON.
NODE_JSON = '{"plan":"pro"}'
NODE_AUTH = "dtPOQ58a3qb70gp34LutYLF1N5UU8TjKSa4AtFuMSK3Y3KHJNAnWf35iAoU+9L5VZIsgu37wd0kfq9ROsQvzlQ=="


@pytest.fixture
def fake_api(tmp_path: Path) -> Iterator[FakeTurretIO]:
    with FakeTurretIO(cert_dir=str(tmp_path)) as fake:
        yield fake


def post(fake: FakeTurretIO, path: str = WORKED_PATH, body: bytes = WORKED_BODY,
         headers: dict[str, str] | None = None, client: requests.Session | None = None,
         timeout: float | None = 10, stream: bool = False) -> requests.Response:
    """POST the worked vector or a variant; ``verify`` is explicit as this machine sets REQUESTS_CA_BUNDLE."""
    with contextlib.ExitStack() as stack:
        sender = client or stack.enter_context(requests.Session())
        return sender.post(fake.url + path, data=body, headers=WORKED_HEADERS if headers is None else headers,
                           verify=fake.ca_file, timeout=timeout, stream=stream)


def sign(secret_b64: str, path: str, json_text: str, stamp: str) -> str:
    """The doc's formula, for requests beyond its two vectors."""
    message = (path + json_text + stamp).encode("utf-8")
    return base64.b64encode(hmac.new(base64.b64decode(secret_b64), message, hashlib.sha512).digest()).decode()


def test_worked_vector_is_accepted_with_the_raw_path(fake_api: FakeTurretIO) -> None:
    response = post(fake_api, headers={**WORKED_HEADERS, "Idempotency-Key": "42"})

    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["Content-Length"] == str(len(response.content))
    [received] = fake_api.received()
    assert (received.method, received.path, received.body) == ("POST", WORKED_PATH, WORKED_BODY)
    assert (received.json_text, received.signature_valid, received.status) == (WORKED_JSON, True, 200)
    assert (received.idempotency_key, received.connection) == ("42", 1)
    assert received.headers["X-LS-Auth"] == WORKED_AUTH
    assert fake_api.delivered() == [received]


def test_tampered_body_gets_401_unauthorized(fake_api: FakeTurretIO) -> None:
    tampered = base64.b64encode(b'{"plan": "free", "properties": {}}')

    response = post(fake_api, body=tampered)

    assert (response.status_code, response.text) == (401, "Unauthorized")
    assert response.headers["Content-Length"] == "12"
    [received] = fake_api.received()
    assert (received.json_text, received.signature_valid, received.status) == (
        '{"plan": "free", "properties": {}}', False, 401)
    assert fake_api.delivered() == []


def test_node_compact_vector_is_accepted(fake_api: FakeTurretIO) -> None:
    response = post(fake_api, body=base64.b64encode(NODE_JSON.encode()),
                    headers={**WORKED_HEADERS, "X-LS-Auth": NODE_AUTH})

    assert response.status_code == 200
    assert [(r.json_text, r.signature_valid) for r in fake_api.received()] == [(NODE_JSON, True)]


@pytest.mark.parametrize("headers", [
    {**WORKED_HEADERS, "X-LS-Key": "other-key"},
    {k: v for k, v in WORKED_HEADERS.items() if k != "X-LS-Auth"},
    {**WORKED_HEADERS, "X-LS-Time": "1400000001"},
])
def test_wrong_key_missing_auth_or_other_time_is_unauthorized(fake_api: FakeTurretIO,
                                                              headers: dict[str, str]) -> None:
    assert post(fake_api, headers=headers).status_code == 401
    assert [r.signature_valid for r in fake_api.received()] == [False]


def test_body_that_is_not_base64_is_unauthorized(fake_api: FakeTurretIO) -> None:
    assert post(fake_api, body=WORKED_JSON.encode()).status_code == 401
    assert [(r.json_text, r.signature_valid) for r in fake_api.received()] == [(None, False)]


def test_plus_email_path_is_signed_and_recorded_raw(fake_api: FakeTurretIO) -> None:
    path = "/latest/user/bob+news@example.com"
    auth = sign(DEMO_API_SECRET, path, WORKED_JSON, WORKED_TIME)

    response = post(fake_api, path=path, headers={**WORKED_HEADERS, "X-LS-Auth": auth})

    assert response.status_code == 200
    assert [(r.path, r.signature_valid) for r in fake_api.received()] == [(path, True)]


def test_get_and_paths_outside_latest_get_404(fake_api: FakeTurretIO) -> None:
    get = requests.get(fake_api.url + WORKED_PATH, headers=WORKED_HEADERS, verify=fake_api.ca_file,
                       timeout=10)
    other = post(fake_api, path="/v2/user/alice@example.com")

    assert (get.status_code, other.status_code, other.text) == (404, 404, "Not Found")
    assert [(r.method, r.status) for r in fake_api.received()] == [("GET", 404), ("POST", 404)]


def test_keep_alive_requests_share_one_connection(fake_api: FakeTurretIO) -> None:
    with requests.Session() as session:
        post(fake_api, client=session)
        post(fake_api, client=session)
    post(fake_api)

    assert [r.connection for r in fake_api.received()] == [1, 1, 2]


def test_scripted_answers_come_first_then_the_default(fake_api: FakeTurretIO) -> None:
    fake_api.script(Respond(503), Respond(503, b"busy"))

    statuses = [post(fake_api).status_code for _ in range(3)]

    assert statuses == [503, 503, 200]
    assert [r.status for r in fake_api.received()] == [503, 503, 200]
    assert [r.status for r in fake_api.delivered()] == [200]


def test_scripted_429_passes_retry_after_through_whatever_the_signature(fake_api: FakeTurretIO) -> None:
    fake_api.script(Respond(429, b"slow down", {"Retry-After": "7"}))

    response = post(fake_api, headers={})

    assert (response.status_code, response.text) == (429, "slow down")
    assert (response.headers["Retry-After"], response.headers["Content-Length"]) == ("7", "9")
    assert [(r.status, r.signature_valid) for r in fake_api.received()] == [(429, False)]


def test_rotated_credentials_reject_the_old_signature(fake_api: FakeTurretIO) -> None:
    fake_api.set_credentials("new-key", base64.b64encode(b"new-secret").decode())

    assert post(fake_api).status_code == 401
    assert post(fake_api, headers={**WORKED_HEADERS, "X-LS-Key": "new-key"}).status_code == 401


def test_max_skew_rejects_a_stale_time_but_records_the_signature_as_valid(tmp_path: Path) -> None:
    now = {"t": 1400000000.0 + 300}
    with FakeTurretIO(cert_dir=str(tmp_path), max_skew=300, clock=lambda: now["t"]) as fake:
        fresh = post(fake).status_code
        now["t"] += 1
        stale = post(fake).status_code

        assert (fresh, stale) == (200, 401)
        assert [(r.signature_valid, r.status) for r in fake.received()] == [(True, 200), (True, 401)]


def test_refuse_closes_the_port_and_up_rebinds_the_same_one(fake_api: FakeTurretIO) -> None:
    port = fake_api.port
    fake_api.set_mode("refuse")

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port))
    with pytest.raises(requests.exceptions.ConnectionError):
        post(fake_api)
    fake_api.set_mode("up")

    assert (post(fake_api).status_code, fake_api.port) == (200, port)


def test_refuse_closes_an_open_connection_at_its_next_request(fake_api: FakeTurretIO) -> None:
    with requests.Session() as session:
        post(fake_api, client=session)
        fake_api.set_mode(Mode.REFUSE)
        with pytest.raises(requests.exceptions.ConnectionError):
            post(fake_api, client=session)

    assert [(r.connection, r.status) for r in fake_api.received()] == [(1, 200), (1, 0)]


def test_reset_sends_rst_before_the_handshake(fake_api: FakeTurretIO) -> None:
    fake_api.set_mode("reset")

    with socket.create_connection(("127.0.0.1", fake_api.port)) as raw, pytest.raises(ConnectionResetError):
        raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello
        raw.recv(1)
    with pytest.raises(requests.exceptions.ConnectionError):  # requests' SSLError is one too
        post(fake_api)
    fake_api.set_mode("up")

    assert post(fake_api).status_code == 200
    assert [r.status for r in fake_api.received()] == [200]


def test_reset_drops_an_open_connection_at_its_next_request(fake_api: FakeTurretIO) -> None:
    with requests.Session() as session:
        post(fake_api, client=session)
        fake_api.set_mode("reset")
        with pytest.raises(requests.exceptions.ConnectionError):
            post(fake_api, client=session)

    assert [(r.connection, r.status) for r in fake_api.received()] == [(1, 200), (1, 0)]


def test_hang_times_a_new_connection_out_then_up_works(fake_api: FakeTurretIO) -> None:
    fake_api.set_mode("hang")

    with pytest.raises(requests.exceptions.ReadTimeout):
        post(fake_api, timeout=0.2)
    fake_api.set_mode("up")

    assert post(fake_api).status_code == 200
    assert [r.status for r in fake_api.received()] == [200]


def test_hang_applies_to_the_next_request_on_an_open_connection(fake_api: FakeTurretIO) -> None:
    with requests.Session() as session:
        post(fake_api, client=session)
        fake_api.set_mode("hang")
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(fake_api, client=session, timeout=0.2)
        fake_api.set_mode("up")

        assert post(fake_api, client=session).status_code == 200
    assert [(r.connection, r.status) for r in fake_api.received()] == [(1, 200), (1, 0), (2, 200)]


def test_stall_body_sends_headers_but_never_the_body(fake_api: FakeTurretIO) -> None:
    fake_api.set_mode("stall_body")

    with pytest.raises(requests.exceptions.ConnectionError, match="Read timed out"):
        post(fake_api, timeout=0.2)
    with post(fake_api, stream=True) as response:
        assert (response.status_code, response.headers["Content-Length"]) == (200, "16")
        fake_api.set_mode("up")  # ends the stall by closing the connection, body unsent
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            response.content  # noqa: B018 - reading the body is the point

    assert post(fake_api).status_code == 200
    assert [r.status for r in fake_api.received()] == [200, 200, 200]


def test_delay_holds_every_answer(fake_api: FakeTurretIO) -> None:
    fake_api.set_delay(600)

    with pytest.raises(requests.exceptions.ReadTimeout):
        post(fake_api, timeout=0.2)

    assert fake_api.received() == []  # recorded when answered; stop() cuts the delay short


def test_each_record_says_when_it_arrived_and_when_it_was_answered(fake_api: FakeTurretIO) -> None:
    with requests.Session() as session:
        post(fake_api, client=session)
        fake_api.set_mode("hang")  # on an open connection: the request is read, and never answered
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(fake_api, client=session, timeout=0.2)
        fake_api.set_mode("up")

    answered, hung = fake_api.received()
    assert answered.answered_at is not None and answered.at <= answered.answered_at
    assert (hung.status, hung.answered_at) == (0, None)


def test_held_answers_wait_for_release_and_are_counted_while_they_wait(fake_api: FakeTurretIO) -> None:
    fake_api.hold()
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post, fake_api) for _ in range(2)]
        fake_api.wait_for_held(2, timeout=10)
        assert fake_api.received() == []
        fake_api.release()
        assert [answer.result().status_code for answer in answers] == [200, 200]

    first, second = fake_api.received()
    assert first.answered_at is not None and second.answered_at is not None
    assert max(first.at, second.at) < min(first.answered_at, second.answered_at)  # both in flight at once


def test_stop_returns_with_hanging_and_half_open_connections(tmp_path: Path) -> None:
    fake = FakeTurretIO(cert_dir=str(tmp_path))
    fake.start()
    with requests.Session() as session, ThreadPoolExecutor(1) as pool:
        post(fake, client=session)
        fake.set_mode("hang")
        with socket.create_connection(("127.0.0.1", fake.port)):  # hangs before TLS
            hung = pool.submit(post, fake, client=session, timeout=None)  # hangs on an open connection
            fake.wait_for_count(2, timeout=10, delivered=False)

            fake.stop()

            with pytest.raises(requests.exceptions.ConnectionError):
                hung.result()
    assert [t.name for t in threading.enumerate()
            if t.name.startswith(("fake-api-connection", "fake-api-accept"))] == []


def test_client_trusting_only_public_cas_fails_the_handshake(fake_api: FakeTurretIO) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.post(fake_api.url + WORKED_PATH, data=WORKED_BODY, headers=WORKED_HEADERS,
                      verify=certifi.where(), timeout=10)


def test_given_certificate_is_used_and_nothing_is_generated(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))

    with FakeTurretIO(certfile=str(cert), keyfile=str(key)) as fake:
        assert fake.ca_file is None
        response = requests.post(fake.url + WORKED_PATH, data=WORKED_BODY, headers=WORKED_HEADERS,
                                 verify=str(ca_file), timeout=10)
    assert response.status_code == 200


def test_missing_trustme_without_a_certificate_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trustme", None)

    with pytest.raises(ForwarderError) as caught:
        FakeTurretIO().start()

    assert str(caught.value) == (
        "fake-api needs a certificate: pass --cert and --key, or install turret-forwarder[demo]")


def test_key_without_cert_is_refused() -> None:
    with pytest.raises(ForwarderError, match="--key needs --cert"):
        FakeTurretIO(keyfile="key.pem")


def test_wait_for_count_wakes_when_a_request_arrives(fake_api: FakeTurretIO) -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(post, fake_api)

        delivered = fake_api.wait_for_count(1, timeout=10)

    assert [r.status for r in delivered] == [200]


def test_wait_for_timeout_says_what_arrived(fake_api: FakeTurretIO) -> None:
    post(fake_api, headers={})

    with pytest.raises(TimeoutError, match="1 requests received, statuses: 401"):
        fake_api.wait_for_count(1, timeout=0.01)


def test_clear_forgets_the_records(fake_api: FakeTurretIO) -> None:
    post(fake_api)
    fake_api.clear()

    assert fake_api.received() == []


def test_control_server_sets_modes_scripts_and_lists_requests(fake_api: FakeTurretIO) -> None:
    with ControlServer(fake_api, ("127.0.0.1", 0)) as control:
        def command(path: str, doc: object) -> tuple[int, object]:
            response = requests.post(control.url + path, json=doc, timeout=10)
            return response.status_code, response.json()

        assert command("/mode", {"mode": "refuse"}) == (200, {"ok": True})
        assert fake_api.mode is Mode.REFUSE
        assert command("/mode", {"mode": "up"}) == (200, {"ok": True})
        assert command("/delay", {"seconds": 0}) == (200, {"ok": True})
        assert command("/script", [{"status": 503, "headers": {"Retry-After": "3"}, "body": "busy"}]) == (
            200, {"ok": True})
        answered = post(fake_api)
        listed = requests.get(control.url + "/received", timeout=10).json()
        bad_mode = command("/mode", {"mode": "sideways"})
        cleared = command("/clear", None)

    assert (answered.status_code, answered.text, answered.headers["Retry-After"]) == (503, "busy", "3")
    assert [(r["path"], r["status"], r["signature_valid"], r["json_text"]) for r in listed] == [
        (WORKED_PATH, 503, True, WORKED_JSON)]
    assert base64.b64decode(listed[0]["body"]) == WORKED_BODY
    assert bad_mode == (400, {"ok": False, "error": "ValueError: 'sideways' is not a valid Mode"})
    assert (cleared, fake_api.received()) == ((200, {"ok": True}), [])


def test_control_server_on_a_taken_port_fails_at_once_naming_the_address(fake_api: FakeTurretIO) -> None:
    # It hung: socketserver's failed bind calls server_close, which waited for a serve_forever never started.
    errors: list[str] = []

    def bind(port: int) -> None:
        try:
            ControlServer(fake_api, ("127.0.0.1", port)).server_close()
        except ForwarderError as e:
            errors.append(str(e))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        attempt = threading.Thread(target=bind, args=(port,), daemon=True)  # a hang must not hang the suite
        attempt.start()
        attempt.join(timeout=30)
    assert errors == [f"fake-api control cannot listen on 127.0.0.1:{port}: Address already in use"]


def test_main_refuses_a_missing_secret_file_before_listening(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^api_secret_file \(--api-secret-file\): No such file"):
        main(["--api-secret-file", str(tmp_path / "absent")])


def test_main_refuses_a_control_address_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--control", "0.0.0.0:8444"])

    assert caught.value.code == 2
    assert "the control server only listens on loopback, not '0.0.0.0'" in capsys.readouterr().err


def test_main_serves_with_the_env_secret_until_sigterm(tmp_path: Path) -> None:
    secret = base64.b64encode(b"secret-from-env").decode()
    program = "import sys; from forwarder.fakeapi import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", program, "--port", "0", "--control", "127.0.0.1:0",
               "--cert-dir", str(tmp_path)]
    with subprocess.Popen(command, cwd=REPO, env={"TURRET_API_SECRET": secret, "PATH": "/usr/bin:/bin"},
                          stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(r"Fake Turret.IO API on (\S+), control on (\S+); pass --ca-file (\S+)\n", line)
        assert match is not None, line
        url, control, ca_file = match.groups()
        headers = {**WORKED_HEADERS, "X-LS-Auth": sign(secret, WORKED_PATH, WORKED_JSON, WORKED_TIME)}

        answered = requests.post(url + WORKED_PATH, data=WORKED_BODY, headers=headers, verify=ca_file,
                                 timeout=10)
        listed = requests.get(control + "/received", timeout=10).json()
        process.send_signal(signal.SIGTERM)

        assert (answered.status_code, ca_file) == (200, str(tmp_path / "ca.pem"))
        assert [r["status"] for r in listed] == [200]
        assert process.wait(timeout=30) == 0
