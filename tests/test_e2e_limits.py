"""Limits that refuse, never drop: backlog caps, the free-disk floor, and a data volume that fills up.

The small-filesystem scenarios mount a size-limited tmpfs on the data dir (the tests run as root in CI);
they are skipped, saying why, only where ``mount`` is not permitted.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from forwarder.client import Client
from forwarder.errors import OutboxFull, Refused, StorageFailed
from forwarder.fakeapi import FakeTurretIO
from forwarder.protocol import parse_frame
from forwarder.store import schema
from tests.support import unavailable
from tests.support.daemon import DaemonProcess

FAST_RETRY = ("--backoff-base", "50ms", "--backoff-cap", "200ms")
SMALL_FS = 16 << 20


def _request(n: int, pad: int = 0) -> dict[str, object]:
    """The n-th test message; every n of the same width gives a record of the same size."""
    return {"op": "set", "email": f"user{n:06d}@example.com",
            "attributes": {"n": f"{n:06d}", "pad": "x" * pad}}


def _record_size(request: dict[str, object]) -> int:
    """Bytes the outbox counts for ``request``: its stored record."""
    message = parse_frame(json.dumps(request).encode())
    return len(schema.encode_record(message.to_record()))  # type: ignore[union-attr]


def _send(client: Client, request: dict[str, object]) -> str | Refused:
    """The message id, or the refusal (as a value, to compare lists of outcomes)."""
    try:
        return str(client.request(request)["id"])
    except Refused as refusal:
        return refusal


def _codes(results: list[str | Refused]) -> list[str]:
    return ["ok" if isinstance(result, str) else result.code for result in results]


def _delivered_ids(api: FakeTurretIO) -> set[str]:
    return {r.idempotency_key or "" for r in api.delivered()}


@pytest.mark.parametrize(("flag", "value"), [
    ("--max-backlog-messages", lambda size: "100"),
    ("--max-backlog-bytes", lambda size: str(100 * size)),
], ids=["messages", "bytes"])
def test_backlog_limit_refuses_with_full_and_resumes_after_the_api_returns(
        fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess], flag: str,
        value: Callable[[int], str]) -> None:
    fake_api.set_mode("refuse")
    size = _record_size(_request(0))
    daemon = make_daemon(flag, value(size), *FAST_RETRY, api=fake_api).start()
    with Client(str(daemon.socket)) as client:
        results = [_send(client, _request(n)) for n in range(130)]
        assert _codes(results) == ["ok"] * 100 + ["full"] * 30
        limit = "100 messages" if flag == "--max-backlog-messages" else f"{100 * size} bytes"
        assert {str(r) for r in results[100:]} == {f"backlog is at its limit of {limit}"}
        acked = [r for r in results if isinstance(r, str)]
        assert daemon.status()["backlog"] == 100

        fake_api.set_mode("up")
        daemon.wait_for_status(lambda s: s["backlog"] == 0)
        later = [_send(client, _request(n)) for n in range(130, 160)]
        assert _codes(later) == ["ok"] * 30
        acked += [r for r in later if isinstance(r, str)]
    fake_api.wait_for(lambda rs: set(acked) <= {r.idempotency_key for r in rs if r.delivered}, timeout=60)
    assert _delivered_ids(fake_api) == set(acked)
    assert daemon.stop() == 0


# -- a data volume that fills up ----------------------------------------------------------------------

@pytest.fixture
def small_fs(data_dir: Path) -> Iterator[Path]:
    """``data_dir`` as the mount point of a 16 MiB tmpfs, unmounted at the end (after the daemons died)."""
    data_dir.mkdir(parents=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS},mode=0750", "tmpfs", str(data_dir)]
    mounted = subprocess.run(mount, capture_output=True, text=True)
    if mounted.returncode != 0:
        unavailable(f"cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip()}")
    try:
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=True)


def _free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def _fill(path: Path, leave: int) -> None:
    """Grow a filler file until at most ``leave`` bytes are free on its filesystem (or nothing is)."""
    with open(path, "ab", buffering=0) as filler:
        while (free := _free_bytes(path.parent)) > leave:
            try:
                filler.write(b"\0" * min(free - leave, 1 << 20))
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                return


def _send_until_refused(client: Client, start: int, pad: int) -> tuple[list[str], Refused]:
    """Send messages until one is refused; the acked ids and the refusal."""
    acked: list[str] = []
    for n in range(start, start + 100_000):
        result = _send(client, _request(n, pad))
        if isinstance(result, Refused):
            return acked, result
        acked.append(result)
    raise AssertionError("the disk never filled up")


def _stored_ids(daemon: DaemonProcess) -> set[str]:
    result = daemon.cli("queue", "list", "--json", "--limit", "1000000")
    assert result.returncode == 0, result.stderr
    return {str(row["id"]) for row in json.loads(result.stdout)}


def test_full_disk_refuses_with_storage_keeps_every_ack_recovers_and_restarts_still_full(
        small_fs: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    fake_api.set_mode("refuse")
    daemon = make_daemon("--min-free-bytes", "0", *FAST_RETRY, api=fake_api).start()
    filler = small_fs / "filler"
    _fill(filler, leave=1 << 20)
    with Client(str(daemon.socket)) as client:
        acked, refusal = _send_until_refused(client, 0, pad=2000)
        assert (type(refusal), str(refusal)) == (StorageFailed, "disk full: database or disk is full")
        assert acked
        assert _stored_ids(daemon) == set(acked)

        filler.unlink()
        acked.append(client.set("after@example.com", {"freed": "yes"}))
        assert _stored_ids(daemon) == set(acked)

        # Fill it again and restart on the still-full disk: nothing at start-up needs free space.
        _fill(filler, leave=0)
        more, refusal = _send_until_refused(client, 100_000, pad=2000)
        acked += more
        assert (type(refusal), str(refusal)) == (StorageFailed, "disk full: database or disk is full")
    assert daemon.stop() == 0
    _fill(filler, leave=0)
    assert _free_bytes(small_fs) == 0

    restarted = make_daemon("--min-free-bytes", "0", *FAST_RETRY, api=fake_api).start()
    assert _stored_ids(restarted) == set(acked)
    fake_api.set_mode("up")
    fake_api.wait_for(lambda rs: set(acked) <= {r.idempotency_key for r in rs if r.delivered}, timeout=60)
    restarted.wait_for_status(lambda s: s["backlog"] == 0)
    assert "released the outbox's reserve" in restarted.log()  # what let the removals commit

    # Still full: new messages wait (full, not a failed commit) until there is room again, no restart.
    with Client(str(restarted.socket)) as client:
        with pytest.raises(OutboxFull) as refused:
            client.set("waits@example.com", {"a": "b"})
        assert str(refused.value) == ("the data volume is full; new messages wait until removals of "
                                      "delivered ones free space")
        filler.unlink()
        last = client.set("resumed@example.com", {"a": "b"})
    fake_api.wait_for(lambda rs: last in {r.idempotency_key for r in rs if r.delivered}, timeout=30)
    assert restarted.stop() == 0


def test_free_disk_floor_refuses_with_full_and_lets_in_once_space_is_freed(
        small_fs: Path, fake_api: FakeTurretIO, make_daemon: Callable[..., DaemonProcess]) -> None:
    floor = 2 << 20
    fake_api.set_mode("refuse")
    daemon = make_daemon("--min-free-bytes", str(floor), api=fake_api).start()
    filler = small_fs / "filler"
    with Client(str(daemon.socket)) as client:
        first = client.set("first@example.com", {"a": "b"})
        _fill(filler, leave=floor - 4096)
        with pytest.raises(OutboxFull) as refused:
            client.set("second@example.com", {"a": "b"})
        assert str(refused.value) == f"free disk space on the data volume is below {floor} bytes"
        filler.unlink()
        second = client.set("second@example.com", {"a": "b"})
    assert _stored_ids(daemon) == {first, second}
    assert daemon.stop() == 0
