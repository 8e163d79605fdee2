"""The outbox: the durable backlog between ingest and delivery (the only module that writes SQL).

A package split Vector's way: ``schema`` (all SQL text, pragmas, the persist-queue contract),
``writer`` (the one committer), ``batch`` (the open transaction as ops see it), ``ops`` (the
changes it commits), ``reader`` (windows, stats), ``reserve`` (room for removals on a full volume).
``Outbox`` is the door the rest of the daemon uses; ``ingest`` and ``delivery`` meet only here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from forwarder.errors import AlreadyRunning
from forwarder.message import Message, QueuedMessage
from forwarder.store import reader, schema
from forwarder.store.admin import Change
from forwarder.store.batch import Op
from forwarder.store.ops import AdminOp, DeadLetter, Put, PutDone, RecordAttempt, Remove, Vacuum
from forwarder.store.reader import (
    CorruptRow,
    integrity_check,
    list_dead,
    list_queue,
    open_readonly,
    read_ids,
    read_stats,
    show_dead,
    show_queue,
)
from forwarder.store.writer import Events, Limits, Stats, Writer, call_soon_any_thread

logger = logging.getLogger(__name__)
__all__ = ["Change", "CorruptRow", "Events", "Limits", "Op", "Outbox", "Stats", "Window", "call_soon_any_thread",
           "integrity_check", "list_dead", "list_queue", "open_readonly", "read_ids", "read_stats", "show_dead",
           "show_queue"]


class _NoEvents:
    def committed(self, ops: int, seconds: float) -> None:
        pass

    def storage_error(self, kind: str) -> None:
        pass

    def dead_letter(self, reason: str) -> None:
        pass


class Outbox:
    """Owns the data directory while open: its lock, the writer and the delivery reader.

    ``loop``: the event loop to commit on (the daemon passes the one ingest runs on, and closes the outbox
    on that loop's thread); without one, the writer commits on a thread of its own.
    """

    def __init__(self, data_dir: Path, events: Events | None = None, limits: Limits | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._lock_fd = _lock(data_dir)
        try:
            db_path = schema.create(data_dir) if _needs_create(data_dir) else data_dir / schema.DB_FILE
            self._writer = Writer(db_path, events or _NoEvents(), limits or Limits(), loop)
            self._reader = schema.connect(db_path)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._writer.start()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.close()

    def close(self) -> None:
        """Commit what was submitted, close the database cleanly, release the lock."""
        self._writer.stop()
        self._reader.close()
        os.close(self._lock_fd)

    @property
    def stats(self) -> Stats:
        return self._writer.stats

    @property
    def commit_healthy(self) -> bool:
        """False while the last commit failed (readiness)."""
        return self._writer.commit_healthy

    @property
    def limits(self) -> Limits:
        return self._writer.limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        self._writer.limits = limits

    def on_commit(self, listener: Callable[[], None]) -> None:
        self._writer.on_commit(listener)

    def put(self, message: Message, done: PutDone) -> None:
        """Queue ``message`` for the next commit; ``done`` gets its id or a ``Refused`` after the commit."""
        self._writer.submit(Put(schema.encode_record(message.to_record()), message.key, done))

    def remove(self, message_id: int) -> Op:
        """A message was delivered: remove it in the next commit (no waiting; the op tells when it is settled)."""
        return self._submit(Remove(message_id))

    def record_attempt(self, message_id: int, error: str, next_attempt: float | None = None) -> None:
        """Count a failed attempt and keep its error and next try (wall clock) for ``queue list``."""
        self._writer.submit(RecordAttempt(message_id, error, next_attempt))

    def admin(self, change: Change) -> concurrent.futures.Future[int]:
        """Commit an operator's change (see ``store.admin``); the future gives how many messages it touched."""
        op = AdminOp(change)
        self._writer.submit(op)
        return op.result

    def compact(self) -> concurrent.futures.Future[int]:
        """VACUUM, by the writer, between two commits: on the daemon's loop, which answers nothing meanwhile
        (acks, pings, status all wait: an operator's choice; it takes seconds on a large file)."""
        op = Vacuum()
        self._writer.submit(op)
        return op.result

    def dead_letter(self, message_id: int, reason: str, status: int | None = None, response: bytes = b"",
                    counts_attempt: bool = True) -> Op:
        return self._submit(DeadLetter(message_id, reason, status, response, counts_attempt))

    def _submit(self, op: Op) -> Op:
        self._writer.submit(op)
        return op

    def deliverable(self, message_id: int) -> bool:
        """Still queued and not held, as of the last commit (a request in flight meanwhile may have been
        purged or held by an operator)."""
        return reader.deliverable(self._reader, message_id)

    def read_window(self, after_id: int, limit: int) -> Window:
        """Deliverable messages after ``after_id``; corrupt rows are sent to the dead letters on the way."""
        rows = reader.read_window(self._reader, after_id, limit)
        messages = []
        for item in rows:
            if isinstance(item, CorruptRow):
                logger.error("A stored row does not decode; moving it to the dead letters",
                             extra={"fields": {"id": item.id, "error": item.error}})
                self.dead_letter(item.id, "corrupt", response=item.error.encode(), counts_attempt=False)
            else:
                messages.append(item)
        return Window(messages, rows[-1].id if rows else after_id, len(rows) == limit)


@dataclass(frozen=True, slots=True)
class Window:
    """A slice of the backlog: the messages, the last row id scanned, and whether more may follow."""

    messages: list[QueuedMessage]
    last_id: int
    full: bool


def _needs_create(data_dir: Path) -> bool:
    db_path = data_dir / schema.DB_FILE
    if not db_path.exists():
        return True
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (schema.TABLE,)).fetchone() is None
    finally:
        conn.close()


def _lock(data_dir: Path) -> int:
    """Take the data dir's lock so only one process ever writes it; the lock dies with the process."""
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyRunning(f"another turret-forwarder (pid {holder}) is using data dir {data_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
