"""Contract with persist-queue: the internals ``forwarder.store`` relies on, pinned so a release that changes
them fails here, loudly, before it can lose a backlog.

The store writes persist-queue's ``SQLiteAckQueue`` table itself (group commit), so it depends on the
table's name and columns, the status value ``put`` writes, and the json serializer's bytes. Both
directions are checked with the library's own API: what we store, ``SQLiteAckQueue.get`` reads; what
``SQLiteAckQueue.put`` stores, our ``Outbox`` reads.
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import re
import sqlite3
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import persistqueue
import persistqueue.serializers.json as json_serializer
import pytest
from persistqueue.sqlackqueue import AckStatus

from forwarder.errors import Refused
from forwarder.message import Kind, Message
from forwarder.store import Outbox, schema

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"
RECORD = {"kind": "set", "email": "alice@example.com", "attributes": {"plan": "pro"}, "properties": {}}


def _library_queue(data_dir: Path) -> Any:
    """The outbox as persist-queue itself opens it (the call the store's docstring promises works)."""
    return persistqueue.SQLiteAckQueue(str(data_dir), name="outbox", db_file_name="outbox.db",
                                       serializer=json_serializer, auto_commit=True, multithreading=True)


@pytest.fixture
def library_queue(data_dir: Path) -> Iterator[Any]:
    Outbox(data_dir).close()  # our schema first, as in production
    queue = _library_queue(data_dir)
    yield queue
    queue.close()


def _pinned_range() -> tuple[tuple[int, ...], tuple[int, ...]]:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [d for d in dependencies if d.startswith("persist-queue")]
    match = re.fullmatch(r"persist-queue>=([\d.]+),<([\d.]+)", spec)
    assert match is not None, spec
    return _version(match[1]), _version(match[2])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_installed_persist_queue_is_inside_the_pinned_range() -> None:
    low, high = _pinned_range()
    assert low <= _version(importlib.metadata.version("persist-queue")) < high


def test_table_name_is_the_library_prefix_and_the_queue_name() -> None:
    assert persistqueue.SQLiteAckQueue._TABLE_NAME == "ack_queue"
    assert schema.TABLE == "ack_queue_outbox"


def test_table_has_the_columns_the_store_writes(data_dir: Path) -> None:
    Outbox(data_dir).close()
    conn = sqlite3.connect(data_dir / schema.DB_FILE)
    try:
        columns = conn.execute(f"PRAGMA table_info({schema.TABLE})").fetchall()
        (create,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (schema.TABLE,)).fetchone()
    finally:
        conn.close()
    assert columns == [(0, "_id", "INTEGER", 0, None, 1), (1, "data", "BLOB", 0, None, 0),
                       (2, "timestamp", "FLOAT", 0, None, 0), (3, "status", "INTEGER", 0, None, 0)]
    assert "AUTOINCREMENT" in create  # ids are never reused: they are the Idempotency-Key upstream


def test_status_put_writes_is_the_one_the_store_writes() -> None:
    assert (AckStatus.inited, AckStatus.ready, AckStatus.unack) == ("0", "1", "2")
    assert schema.STATUS_READY == 0


def test_json_serializer_bytes_are_stock_json_with_ascii_escapes() -> None:
    assert schema.encode_record(RECORD) == (
        b'{"kind": "set", "email": "alice@example.com", "attributes": {"plan": "pro"}, "properties": {}}')
    assert schema.encode_record({"name": "Jos\u00e9"}) == b'{"name": "Jos\\u00e9"}'
    assert schema.decode_record(schema.encode_record(RECORD)) == RECORD
    assert json_serializer.dumps(RECORD) == schema.encode_record(RECORD)


def test_json_serializer_refuses_bytes_that_are_not_json() -> None:
    with pytest.raises(ValueError):
        schema.decode_record(b"\x80\x04pickle")


def test_messages_we_store_are_read_by_persist_queue(data_dir: Path) -> None:
    second = {**RECORD, "email": "bob@example.com"}
    with Outbox(data_dir) as outbox:
        for record in (RECORD, second):
            done: concurrent.futures.Future[int | Refused] = concurrent.futures.Future()
            outbox.put(Message(Kind.SET, {k: v for k, v in record.items() if k != "kind"}), done.set_result)
            assert isinstance(done.result(20), int)
    queue = _library_queue(data_dir)
    try:
        assert queue.size == 2
        assert queue.get(block=False) == RECORD
        assert queue.get(block=False) == second
    finally:
        queue.close()


def test_message_put_by_persist_queue_is_read_by_our_outbox(library_queue: Any, data_dir: Path) -> None:
    library_queue.put(RECORD)
    with Outbox(data_dir) as outbox:
        window = outbox.read_window(0, 10)
    assert [(q.id, q.message) for q in window.messages] == [
        (1, Message(Kind.SET, {k: v for k, v in RECORD.items() if k != "kind"}))]
