"""Operator changes to the outbox (Postfix-style hold, release, purge; dead-letter retry and purge).

Each function returns the change as a ``Callable[[Batch], int]`` for the writer, so it is committed like any
other op, atomically, by the one writing thread; the int is how many messages it touched. An id that is not
there is an ``InvalidMessage`` naming it, so ``dead retry 42`` on a wrong id says so instead of doing nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from forwarder.errors import InvalidMessage
from forwarder.store import schema
from forwarder.store.batch import Batch
from forwarder.store.ops import delete_message, not_found

Change = Callable[[Batch], int]
ALL = None  # pass as the id to mean every message


def _ids(batch: Batch, message_id: int | None, all_sql: str, one_sql: str, what: str) -> list[int]:
    if message_id is ALL:
        return [row[0] for row in batch.conn.execute(all_sql)]
    if batch.conn.execute(one_sql, (message_id,)).fetchone() is None:
        raise not_found(what, message_id)
    return [message_id]


def _queued(batch: Batch, message_id: int | None) -> list[int]:
    return _ids(batch, message_id, schema.ALL_IDS, schema.SELECT_ONE, "queued message")


def _dead(batch: Batch, message_id: int | None) -> list[int]:
    return _ids(batch, message_id, schema.ALL_DEAD_IDS, schema.SELECT_DEAD, "dead letter")


def hold(message_id: int | None, held: bool) -> Change:
    """Set messages aside (not delivered, still counted in the backlog) or release them."""
    def change(batch: Batch) -> int:
        ids = _queued(batch, message_id)
        batch.conn.executemany(schema.SET_HELD, [(i, int(held)) for i in ids])
        return len(ids)
    return change


def purge(message_id: int) -> Change:
    """Delete one queued message for good."""
    def change(batch: Batch) -> int:
        for i in _queued(batch, message_id):
            delete_message(batch, i)
        return 1
    return change


def retry_dead(message_id: int | None) -> Change:
    """Put dead letters back into the outbox under their original id, with a fresh attempt count.

    The enqueue time becomes now: an expired message would otherwise expire again at once.
    """
    def change(batch: Batch) -> int:
        ids = _dead(batch, message_id)
        for i in ids:
            data = batch.conn.execute(schema.SELECT_DEAD, (i,)).fetchone()[1]
            batch.conn.execute(schema.INSERT_WITH_ID, (i, data, batch.now))
            batch.conn.execute(schema.DELETE_DEAD, (i,))
            batch.added(1, len(data))
        batch.dead_delta -= len(ids)
        return len(ids)
    return change


def purge_dead(message_id: int | None = ALL, older_than: float | None = None) -> Change:
    """Delete dead letters: one, all, or those dead for longer than ``older_than`` seconds."""
    def change(batch: Batch) -> int:
        if older_than is not None:
            ids = [row[0] for row in batch.conn.execute(schema.DEAD_IDS_OLDER_THAN, (batch.now - older_than,))]
        else:
            ids = _dead(batch, message_id)
        batch.conn.executemany(schema.DELETE_DEAD, [(i,) for i in ids])
        batch.dead_delta -= len(ids)
        return len(ids)
    return change


def _id_or_all(request: Mapping[str, Any]) -> int | None:
    """The request's ``id`` (a positive integer), or ``ALL`` when it says ``"all": true``."""
    if request.get("all") is True and request.get("id") is None:
        return ALL
    message_id = request.get("id")
    if isinstance(message_id, str) and message_id.isdigit():
        message_id = int(message_id)
    if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id < 1:
        raise InvalidMessage("give a message id (a positive integer) or all")
    return message_id


def change_for(request: Mapping[str, Any]) -> Change:
    """The change an admin request asks for: the one parser shared by the admin socket and the CLI."""
    op = request.get("op")
    if op in ("hold", "release"):
        return hold(_id_or_all(request), held=op == "hold")
    if op == "purge":
        message_id = _id_or_all(request)
        if message_id is ALL:
            raise InvalidMessage("purge takes one id; purging the whole backlog is not offered")
        return purge(message_id)
    if op == "dead_retry":
        return retry_dead(_id_or_all(request))
    if op == "dead_purge":
        older_than = request.get("older_than")
        if older_than is not None:
            if not isinstance(older_than, int | float) or older_than < 0:
                raise InvalidMessage("older_than must be a number of seconds")
            return purge_dead(older_than=float(older_than))
        return purge_dead(_id_or_all(request))
    raise InvalidMessage(f"unknown admin op {op!r}")
