"""Tests for forwarder.turretio: byte-exact requests and signatures, and the status -> outcome table."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from forwarder.message import Kind, Message, QueuedMessage
from forwarder.turretio import (
    Credentials,
    Dead,
    Delivered,
    HttpRequest,
    Outcome,
    PauseAuth,
    Result,
    Retry,
    TurretUpstream,
    Upstream,
    sign,
)

SECRET_B64 = base64.b64encode(b"demo-secret-bytes").decode("ascii")
CREDENTIALS = Credentials.from_base64("demo-key", SECRET_B64)
NOW = 1400000000.0
PYTHON_CLIENT_AUTH = "tB1GkjsuutpYQYMSZPxYFgcH8/1h32oCVyADf8ZU4ODK8XEt2XYqdMrfetqjWDqoF8UMxT+WjdUBDcViQq3Heg=="
NODE_CLIENT_AUTH = "dtPOQ58a3qb70gp34LutYLF1N5UU8TjKSa4AtFuMSK3Y3KHJNAnWf35iAoU+9L5VZIsgu37wd0kfq9ROsQvzlQ=="

UPSTREAMS: list[Upstream] = [TurretUpstream()]
"""Every implementation; the contract tests below run against each."""


def set_message(email: str = "alice@example.com", attributes: dict[str, str] | None = None) -> Message:
    return Message(Kind.SET, {"email": email, "attributes": attributes or {"plan": "pro"}, "properties": {}})


def post_message(path: str = "/latest/target/vip", body: dict[str, Any] | None = None) -> Message:
    return Message(Kind.POST, {"path": path, "body": body if body is not None else {"attributes": []}})


def presigned_message(url: str = "/latest/user/alice@example.com") -> Message:
    return Message(
        Kind.PRESIGNED,
        {
            "url": url,
            "api_key": "app-key",
            "time": "1300000000",
            "signature": "c2lnbmF0dXJl+/==",
            "payload": "eyJwbGFuIjogInBybyIsICJwcm9wZXJ0aWVzIjoge319",
        },
    )


def queued(message: Message, message_id: int = 42) -> QueuedMessage:
    return QueuedMessage(id=message_id, message=message, enqueued_at=NOW - 10.0)


def build(message: Message, credentials: Credentials | None = CREDENTIALS) -> HttpRequest:
    return TurretUpstream().build_request(queued(message), credentials, NOW)


def classify(message: Message, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> Outcome:
    return TurretUpstream(retry_after_cap=3600.0).classify(message, status, headers or {}, body, NOW)


def test_set_reproduces_the_python_client_worked_vector() -> None:
    assert build(set_message()) == HttpRequest(
        "POST",
        "/latest/user/alice@example.com",
        {
            "X-LS-Key": "demo-key",
            "X-LS-Time": "1400000000",
            "X-LS-Auth": PYTHON_CLIENT_AUTH,
            "Content-Type": "text/json",
            "Idempotency-Key": "42",
        },
        b"eyJwbGFuIjogInBybyIsICJwcm9wZXJ0aWVzIjoge319",
    )


def test_sign_reproduces_the_node_client_worked_vector() -> None:
    secret = base64.b64decode(SECRET_B64)
    assert sign(secret, "/latest/user/alice@example.com", '{"plan":"pro"}', "1400000000") == NODE_CLIENT_AUTH


def test_sign_reproduces_the_python_client_worked_vector() -> None:
    secret = base64.b64decode(SECRET_B64)
    text = '{"plan": "pro", "properties": {}}'
    assert sign(secret, "/latest/user/alice@example.com", text, "1400000000") == PYTHON_CLIENT_AUTH


def test_set_keeps_properties_last_and_signs_what_it_sends() -> None:
    message = Message(
        Kind.SET, {"email": "bob@example.com", "attributes": {"b": "2", "a": "1"}, "properties": {"src": "web"}}
    )
    request = build(message)
    text = '{"b": "2", "a": "1", "properties": {"src": "web"}}'
    assert base64.b64decode(request.body).decode("ascii") == text
    assert request.headers["X-LS-Auth"] == sign(b"demo-secret-bytes", request.path, text, "1400000000")


def test_set_puts_a_plus_email_raw_in_the_path() -> None:
    request = build(set_message("alice+news@example.com"))
    assert request.path == "/latest/user/alice+news@example.com"
    text = '{"plan": "pro", "properties": {}}'
    expected = sign(b"demo-secret-bytes", "/latest/user/alice+news@example.com", text, "1400000000")
    assert request.headers["X-LS-Auth"] == expected


def test_set_escapes_non_ascii_attributes_into_an_ascii_body() -> None:
    request = build(set_message(attributes={"name": "Zoë"}))
    assert base64.b64decode(request.body) == b'{"name": "Zo\\u00eb", "properties": {}}'


def test_signature_time_is_whole_seconds_of_now() -> None:
    request = TurretUpstream().build_request(queued(set_message()), CREDENTIALS, 1400000000.9)
    assert request.headers["X-LS-Time"] == "1400000000"
    assert request.headers["X-LS-Auth"] == PYTHON_CLIENT_AUTH


def test_post_sends_its_body_json_to_its_path() -> None:
    request = build(post_message("/latest/target/vip/email/7", {"subject": "Hi", "n": [1, 2]}))
    text = '{"subject": "Hi", "n": [1, 2]}'
    assert request == HttpRequest(
        "POST",
        "/latest/target/vip/email/7",
        {
            "X-LS-Key": "demo-key",
            "X-LS-Time": "1400000000",
            "X-LS-Auth": sign(b"demo-secret-bytes", "/latest/target/vip/email/7", text, "1400000000"),
            "Content-Type": "text/json",
            "Idempotency-Key": "42",
        },
        base64.b64encode(text.encode("ascii")),
    )


def test_presigned_is_replayed_byte_for_byte() -> None:
    assert build(presigned_message(), credentials=None) == HttpRequest(
        "POST",
        "/latest/user/alice@example.com",
        {
            "X-LS-Key": "app-key",
            "X-LS-Time": "1300000000",
            "X-LS-Auth": "c2lnbmF0dXJl+/==",
            "Content-Type": "text/json",
            "Idempotency-Key": "42",
        },
        b"eyJwbGFuIjogInBybyIsICJwcm9wZXJ0aWVzIjoge319",
    )


def test_presigned_ignores_our_credentials() -> None:
    assert build(presigned_message(), CREDENTIALS) == build(presigned_message(), None)


@pytest.mark.parametrize("message", [set_message(), post_message()], ids=["set", "post"])
def test_build_request_without_credentials_raises(message: Message) -> None:
    with pytest.raises(ValueError, match="needs API credentials"):
        build(message, credentials=None)


@pytest.mark.parametrize(
    ("message", "expected"),
    [(set_message(), True), (post_message(), True), (presigned_message(), False)],
    ids=["set", "post", "presigned"],
)
def test_needs_credentials(message: Message, expected: bool) -> None:
    assert TurretUpstream().needs_credentials(message) is expected


@pytest.mark.parametrize(
    ("message", "key"),
    [
        (set_message("alice+x@example.com"), "alice+x@example.com"),
        (presigned_message("/latest/user/alice+x@example.com"), "alice+x@example.com"),
        (post_message("/latest/user/alice+x@example.com"), "alice+x@example.com"),
        (post_message("/latest/target/vip"), "/latest/target/vip"),
        (post_message("/latest/target/vip/email/7/sendEmail"), "/latest/target/vip/email/7/sendEmail"),
        (presigned_message("/latest/target/vip"), "/latest/target/vip"),
        (post_message("/latest/user/alice@example.com/extra"), "/latest/user/alice@example.com/extra"),
    ],
)
def test_ordering_key_puts_each_user_in_one_lane(message: Message, key: str) -> None:
    assert TurretUpstream().ordering_key(message) == key


def test_credentials_repr_hides_the_secret() -> None:
    assert repr(CREDENTIALS) == "Credentials(api_key='demo-key')"
    assert CREDENTIALS.secret == b"demo-secret-bytes"


@pytest.mark.parametrize("secret_b64", ["not base64!", "abc", ""])
def test_credentials_from_bad_base64_raise_a_clear_error(secret_b64: str) -> None:
    with pytest.raises(ValueError, match="API secret"):
        Credentials.from_base64("demo-key", secret_b64)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, Delivered(200)),
        (201, Delivered(201)),
        (204, Delivered(204)),
        (401, PauseAuth(401)),
        (403, PauseAuth(403)),
        (429, Retry(Result.RATE_LIMITED, "rate limited", None, endpoint=True)),
        (500, Retry(Result.RETRYABLE_HTTP, "http 500", None, endpoint=True)),
        (502, Retry(Result.RETRYABLE_HTTP, "http 502", None, endpoint=True)),
        (503, Retry(Result.RETRYABLE_HTTP, "http 503", None, endpoint=True)),
        (504, Retry(Result.RETRYABLE_HTTP, "http 504", None, endpoint=True)),
        (408, Retry(Result.RETRYABLE_HTTP, "http 408", None, endpoint=False)),
        (100, Retry(Result.RETRYABLE_HTTP, "unexpected http 100", None, endpoint=True)),
        (301, Retry(Result.RETRYABLE_HTTP, "unexpected http 301", None, endpoint=True)),
        (302, Retry(Result.RETRYABLE_HTTP, "unexpected http 302", None, endpoint=True)),
        (400, Dead("http 400", 400, b"nope")),
        (404, Dead("http 404", 404, b"nope")),
        (410, Dead("http 410", 410, b"nope")),
        (422, Dead("http 422", 422, b"nope")),
    ],
)
def test_classify_maps_each_status_to_its_outcome(status: int, expected: Outcome) -> None:
    assert classify(set_message(), status, body=b"nope") == expected


@pytest.mark.parametrize("status", [401, 403])
def test_classify_dead_letters_a_rejected_presigned_message(status: int) -> None:
    outcome = classify(presigned_message(), status, body=b"Unauthorized")
    assert outcome == Dead("presigned_rejected", status, b"Unauthorized")


@pytest.mark.parametrize("status", [401, 403])
def test_classify_pauses_on_a_rejected_post(status: int) -> None:
    assert classify(post_message(), status) == PauseAuth(status)


@pytest.mark.parametrize(
    ("outcome", "result"),
    [(Delivered(200), "success"), (Dead("http 404", 404, b""), "permanent_http"), (PauseAuth(401), "auth")],
)
def test_fixed_outcomes_carry_their_result_label(outcome: Outcome, result: str) -> None:
    assert outcome.result == result


def test_classify_keeps_only_the_first_4_kib_of_a_dead_body() -> None:
    outcome = classify(set_message(), 400, body=b"x" * 5000)
    assert outcome == Dead("http 400", 400, b"x" * 4096)


@pytest.mark.parametrize(
    ("status", "headers", "after"),
    [
        (429, {"Retry-After": "7"}, 7.0),
        (429, {"retry-after": "7"}, 7.0),
        (429, {"RETRY-AFTER": "Tue, 13 May 2014 16:53:40 GMT"}, 20.0),
        (429, {"Retry-After": "soon"}, None),
        (429, {"Retry-After": "99999999"}, 3600.0),
        (429, {}, None),
        (503, {"Retry-After": "7"}, 7.0),
        (503, {"Retry-After": "Tue, 13 May 2014 16:53:00 GMT"}, 0.0),
        (503, {"Retry-After": "garbage"}, None),
        (500, {"Retry-After": "7"}, None),
    ],
)
def test_classify_honours_retry_after(status: int, headers: dict[str, str], after: float | None) -> None:
    outcome = classify(set_message(), status, headers)
    assert isinstance(outcome, Retry)
    assert outcome.after == after


def test_classify_caps_retry_after_at_the_configured_cap() -> None:
    upstream = TurretUpstream(retry_after_cap=60.0)
    outcome = upstream.classify(set_message(), 429, {"Retry-After": "600"}, b"", NOW)
    assert outcome == Retry(Result.RATE_LIMITED, "rate limited", 60.0, endpoint=True)


def test_result_is_the_closed_label_set() -> None:
    assert [r.value for r in Result] == [
        "success", "retryable_http", "permanent_http", "auth", "rate_limited", "timeout", "connect", "tls",
    ]


# The Upstream contract: what the flusher relies on from every implementation.


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_contract_every_request_carries_the_idempotency_key(upstream: Upstream) -> None:
    for message in (set_message(), post_message(), presigned_message()):
        credentials = CREDENTIALS if upstream.needs_credentials(message) else None
        request = upstream.build_request(queued(message, message_id=977), credentials, NOW)
        assert request.headers["Idempotency-Key"] == "977"


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_contract_any_2xx_is_delivered(upstream: Upstream) -> None:
    assert [upstream.classify(set_message(), s, {}, b"", NOW) for s in (200, 299)] == [Delivered(200), Delivered(299)]


@pytest.mark.parametrize("upstream", UPSTREAMS)
def test_contract_server_errors_back_off_the_endpoint(upstream: Upstream) -> None:
    outcome = upstream.classify(post_message(), 500, {}, b"", NOW)
    assert isinstance(outcome, Retry)
    assert outcome.endpoint is True
