"""What the writer's ops see and implement: the open transaction (``Batch``) and the ``Op`` interface.

An op never commits: the writer owns BEGIN, COMMIT and ROLLBACK, and settles each op after the outcome.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import ClassVar, TypeVar

from forwarder.errors import OutboxFull, Refused
from forwarder.store import schema

_T = TypeVar("_T")


class Batch:
    """The open transaction as an op sees it: a connection, the clock, and the running stats delta.

    Messages are not inserted, nor delivered ones removed, one statement at a time: ``insert`` gives a
    message its id at once and ``remove`` notes an id, and ``write_pending`` stores or removes all of them in
    a few multi-row statements. Each statement hands the GIL over and waits to get it back: while the
    flusher's threads deliver, that wait made a batch of a thousand removals (two statements each) hold the
    event loop for seconds (``bench/README.md``, item 6). ``conn`` writes what is pending first, so every
    other statement of the batch sees the messages put and removed before it.
    """

    def __init__(self, conn: sqlite3.Connection, now: float, room: Callable[[int, int, int], str | None],
                 free_bytes: Callable[[], int], next_id: int) -> None:
        self._conn = conn
        self.now = now
        self._room = room
        self._free_bytes = free_bytes
        self._free: int | None = None  # asked once per batch, and only if the batch stores something
        self.messages = 0
        self.bytes = 0
        self.removed = False
        self.inserted = False
        self.dead_delta = 0
        self.dead_reasons: list[str] = []
        self.next_id = next_id  # the id the next new message gets; the writer keeps it once committed
        self._rows: list[tuple[int, bytes, float]] = []
        self._keys: dict[str, int] = {}  # idempotency keys of the pending inserts
        self._removals: list[int] = []

    @property
    def conn(self) -> sqlite3.Connection:
        """The open transaction, with every insert and removal so far in this batch written to it."""
        self.write_pending()
        return self._conn

    def find_key(self, key: str) -> int | None:
        """The id of the message already stored (or pending in this batch) under idempotency ``key``."""
        if key in self._keys:
            return self._keys[key]
        row = self._conn.execute(schema.FIND_KEY, (key,)).fetchone()
        return None if row is None else int(row[0])

    def insert(self, data: bytes, key: str | None) -> int:
        """Add a new message to the batch's pending inserts and return its id (ids follow arrival order)."""
        message_id, self.next_id = self.next_id, self.next_id + 1
        self._rows.append((message_id, data, self.now))
        if key is not None:
            self._keys[key] = message_id
        self.added(1, len(data))
        return message_id

    def remove(self, message_id: int) -> None:
        """Note a delivered message's removal (with its delivery state); a missing id is no error."""
        self._removals.append(message_id)

    def write_pending(self) -> None:
        """Store the pending new messages and their keys, then remove the pending ids: one statement per
        power-of-two chunk of rows (a few statement shapes, each prepared once)."""
        rows, self._rows = self._rows, []
        for chunk in _chunks(rows):
            self._conn.execute(schema.insert_rows(len(chunk)), [value for row in chunk for value in row])
        if self._keys:
            self._conn.executemany(schema.INSERT_KEY, [(key, i, self.now) for key, i in self._keys.items()])
            self._keys.clear()
        removals, self._removals = self._removals, []
        for ids in _chunks(removals):
            measure, delete, delete_state = schema.delete_rows(len(ids))
            messages, size = self._conn.execute(measure, ids).fetchone()
            self._conn.execute(delete, ids)
            self._conn.execute(delete_state, ids)
            self.added(-messages, -size)

    def added(self, messages: int, size: int) -> None:
        """Account for rows entering (+) or leaving (-) the outbox in this transaction."""
        self.messages += messages
        self.bytes += size
        self.removed = self.removed or messages < 0
        self.inserted = self.inserted or messages > 0

    def check_room(self, size: int) -> None:
        """Refuse a new message of ``size`` bytes if a limit would be crossed."""
        if self._free is None:
            self._free = self._free_bytes()
        reason = self._room(self.messages + 1, self.bytes + size, self._free)
        if reason is not None:
            raise OutboxFull(reason)

    def dead_lettered(self, reason: str) -> None:
        """Account for a message moved to the dead letters in this transaction."""
        self.dead_delta += 1
        self.dead_reasons.append(reason)


def _chunks(items: list[_T]) -> Iterator[list[_T]]:
    """``items`` in chunks of the sizes in ``schema.CHUNKS``, largest first."""
    while items:
        size = next(size for size in schema.CHUNKS if size <= len(items))
        yield items[:size]
        items = items[size:]


class Op:
    """One change applied inside a commit batch, settled after the commit or rollback."""

    retry_on_failure: ClassVar[bool] = True  # deliveries and admin changes get one more try; puts are refused
    in_transaction: ClassVar[bool] = True  # False: runs alone after the batch's commit (VACUUM)
    frees_space: ClassVar[bool] = False  # True: worth the reserve when the volume is full (removals)
    # True: worth no commit of its own; rides the next one, or one ``writer.DEFER_SECONDS`` later. For the
    # delivery's bookkeeping: a crash before it commits costs a resend (same key), never a message.
    may_wait: ClassVar[bool] = False
    tries: int = 0
    settled: bool = False  # set by the default ``settle``, for a submitter that polls (the flusher's removals)

    def apply(self, batch: Batch) -> None:
        """Execute this op's statements inside the open transaction."""
        raise NotImplementedError

    def settle(self, failure: Refused | None) -> None:
        """Tell the submitter how it ended; called on the writer's loop, must not block.

        The default only notes that the writer is done with the op: committed, or failed for good.
        """
        self.settled = True
