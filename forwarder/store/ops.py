"""The changes the writer can commit, one small class each (no type switches in the writer).

Every op runs inside the writer's open transaction through ``Batch`` and only binds values as ``?``.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from forwarder.errors import InvalidMessage, Refused
from forwarder.store import schema
from forwarder.store.batch import Batch, Op

PutDone = Callable[[int | Refused], None]


@dataclass(eq=False)
class Put(Op):
    """Store one new message (or find the one its idempotency key already stored)."""

    data: bytes
    key: str | None
    done: PutDone
    retry_on_failure: ClassVar[bool] = False  # a failed commit is refused to the producer, who still has it
    message_id: int = 0

    def apply(self, batch: Batch) -> None:
        if self.key is not None and (stored := batch.find_key(self.key)) is not None:
            self.message_id = stored
            return
        batch.check_room(len(self.data))
        self.message_id = batch.insert(self.data, self.key)

    def settle(self, failure: Refused | None) -> None:
        self.done(failure if failure is not None else self.message_id)


def delete_message(batch: Batch, message_id: int) -> bool:
    """Remove a message and its delivery state from the outbox; False if it was not there."""
    row = batch.conn.execute(schema.DELETE + " RETURNING length(data)", (message_id,)).fetchone()
    if row is None:
        return False
    batch.conn.execute(schema.DELETE_STATE, (message_id,))
    batch.added(-1, -row[0])
    return True


@dataclass(eq=False)
class Remove(Op):
    """A delivered message leaves the outbox; rides the next group commit (``may_wait``)."""

    message_id: int
    frees_space: ClassVar[bool] = True
    may_wait: ClassVar[bool] = True

    def apply(self, batch: Batch) -> None:
        batch.remove(self.message_id)


@dataclass(eq=False)
class RecordAttempt(Op):
    """A failed attempt: count it and keep its error for ``queue list``."""

    message_id: int
    error: str
    next_attempt: float | None  # wall clock, for `queue list`
    may_wait: ClassVar[bool] = True

    def apply(self, batch: Batch) -> None:
        if batch.conn.execute(schema.SELECT_ONE, (self.message_id,)).fetchone() is not None:
            batch.conn.execute(schema.RECORD_ATTEMPT, (self.message_id, batch.now, batch.now, self.error,
                                                       self.next_attempt))


@dataclass(eq=False)
class DeadLetter(Op):
    """Move a message to the dead letters, atomically with its removal from the outbox."""

    message_id: int
    reason: str
    status: int | None = None
    response: bytes = b""
    counts_attempt: bool = True  # the attempt that failed permanently is counted; expiry/corrupt are not
    may_wait: ClassVar[bool] = True

    def apply(self, batch: Batch) -> None:
        row = batch.conn.execute(schema.SELECT_ONE, (self.message_id,)).fetchone()
        if row is None:
            return
        _, data, enqueued_at = row
        state = batch.conn.execute(schema.STATE_OF, (self.message_id,)).fetchone()
        attempts, first, last = (state[0], state[1], state[2]) if state else (0, None, None)
        if self.counts_attempt:
            attempts, first, last = attempts + 1, first or batch.now, batch.now
        batch.conn.execute(schema.INSERT_DEAD, (
            self.message_id, data, enqueued_at, self.reason, self.status, self.response,
            attempts, first, last, batch.now))
        delete_message(batch, self.message_id)
        batch.dead_lettered(self.reason)


@dataclass(eq=False)
class Vacuum(Op):
    """``compact``: rebuild the file to its minimum size; runs alone, outside any transaction."""

    in_transaction: ClassVar[bool] = False
    result: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)

    def apply(self, batch: Batch) -> None:
        batch.conn.execute("VACUUM")

    def settle(self, failure: Refused | None) -> None:
        if failure is not None:
            self.result.set_exception(failure)
        else:
            self.result.set_result(0)


@dataclass(eq=False)
class AdminOp(Op):
    """An operator's change; ``result`` resolves to the number of messages it touched."""

    change: Callable[[Batch], int]
    result: concurrent.futures.Future[int] = field(default_factory=concurrent.futures.Future)
    count: int = 0

    def apply(self, batch: Batch) -> None:
        self.count = self.change(batch)

    def settle(self, failure: Refused | None) -> None:
        if failure is not None:
            self.result.set_exception(failure)
        else:
            self.result.set_result(self.count)


def not_found(what: str, message_id: int) -> InvalidMessage:
    """The refusal for an operator naming an id that is not there."""
    return InvalidMessage(f"no {what} with id {message_id}")
