"""Reads of the outbox: delivery windows, and the read-only view the CLI uses with or without a daemon.

Readers never write and never wait on the writer (WAL): a read sees the last commit.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forwarder.message import QueuedMessage, message_from_record
from forwarder.store import schema
from forwarder.store.writer import Stats


@dataclass(frozen=True, slots=True)
class CorruptRow:
    """A stored row that does not decode to a message; it is dead-lettered, never retried."""

    id: int
    error: str


def read_window(conn: sqlite3.Connection, after_id: int, limit: int) -> list[QueuedMessage | CorruptRow]:
    """The next ``limit`` deliverable (not held) messages after ``after_id``, in FIFO (row id) order."""
    rows = conn.execute(schema.WINDOW, (after_id, limit)).fetchall()
    return [_decode(*row) for row in rows]


def deliverable(conn: sqlite3.Connection, message_id: int) -> bool:
    """Still queued and not held: what a window would read of it."""
    return conn.execute(schema.DELIVERABLE, (message_id,)).fetchone() is not None


def _decode(message_id: int, data: bytes, enqueued_at: float, attempts: int) -> QueuedMessage | CorruptRow:
    try:
        message = message_from_record(schema.decode_record(data))
    except (ValueError, TypeError) as e:
        return CorruptRow(message_id, str(e)[:200])
    return QueuedMessage(message_id, message, enqueued_at, attempts, len(data))


def open_readonly(data_dir: Path) -> sqlite3.Connection:
    """Open an existing outbox read-only; ``FileNotFoundError`` if there is none."""
    db_path = data_dir / schema.DB_FILE
    if not db_path.exists():
        raise FileNotFoundError(f"no outbox at {db_path}")
    return schema.connect(db_path, readonly=True)


def read_stats(conn: sqlite3.Connection) -> Stats:
    """Backlog figures from the counters the writer keeps in each commit: O(1) even with millions queued."""
    messages, size = conn.execute(schema.STATS).fetchone()
    oldest = conn.execute(schema.OLDEST).fetchone()
    dead = conn.execute(schema.COUNT_DEAD).fetchone()[0]
    return Stats(messages, size, oldest[0] if oldest else None, dead)


def read_ids(conn: sqlite3.Connection) -> list[int]:
    """Every message id in the outbox, in order (tests and ``check`` use it)."""
    return [row[0] for row in conn.execute(f"SELECT _id FROM {schema.TABLE} ORDER BY _id")]


def _summary(data: bytes) -> dict[str, Any]:
    """Kind and user (email, or the path for other calls) of a stored record, for listings."""
    try:
        message = message_from_record(schema.decode_record(data))
    except (ValueError, TypeError):
        return {"kind": "corrupt", "user": None}
    body = message.body
    user = body.get("email") or body.get("path") or body.get("url")
    return {"kind": message.kind.value, "user": user}


def _record(data: bytes) -> Any:
    try:
        return schema.decode_record(data)
    except ValueError:
        return {"undecodable": bytes(data[:200]).decode("utf-8", "replace")}


def list_queue(conn: sqlite3.Connection, start_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Queued messages from ``start_id`` on, oldest first, as stable JSON-ready dicts (``queue list``)."""
    return [{"id": i, **_summary(data), "enqueued_at": ts, "attempts": attempts, "last_attempt": last,
             "last_error": error, "next_attempt": next_try, "held": bool(held), "bytes": len(data)}
            for i, data, ts, attempts, last, error, next_try, held
            in conn.execute(schema.LIST_QUEUE, (start_id, limit))]


def show_queue(conn: sqlite3.Connection, message_id: int) -> dict[str, Any] | None:
    rows = list_queue(conn, message_id, 1)
    if not rows or rows[0]["id"] != message_id:
        return None
    data = conn.execute(schema.SELECT_ONE, (message_id,)).fetchone()[1]
    return {**rows[0], "record": _record(data)}


def list_dead(conn: sqlite3.Connection, start_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    """Dead letters from ``start_id`` on, as stable JSON-ready dicts (``dead list``)."""
    return [{"id": i, **_summary(data), "reason": reason, "status": status,
             "response": bytes(response or b"").decode("utf-8", "replace"), "attempts": attempts,
             "first_attempt": first, "last_attempt": last, "dead_at": dead_at, "enqueued_at": ts}
            for i, data, ts, reason, status, response, attempts, first, last, dead_at
            in conn.execute(schema.LIST_DEAD, (start_id, limit))]


def show_dead(conn: sqlite3.Connection, message_id: int) -> dict[str, Any] | None:
    rows = list_dead(conn, message_id, 1)
    if not rows or rows[0]["id"] != message_id:
        return None
    data = conn.execute(schema.SELECT_DEAD, (message_id,)).fetchone()[1]
    return {**rows[0], "record": _record(data)}


def integrity_check(conn: sqlite3.Connection) -> list[str]:
    """SQLite's own integrity check: ``["ok"]`` when the file is sound."""
    return [row[0] for row in conn.execute("PRAGMA integrity_check")]
