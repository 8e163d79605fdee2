"""The outbox's on-disk shape: every SQL text, every pragma, and the persist-queue contract.

The outbox table is persist-queue's own ``SQLiteAckQueue`` table (created by the library, json
serializer, never pickle), so the backlog stays readable with persist-queue itself. We bypass the
library's one-commit-per-``put`` API for group commit; the few internals that relies on (table name,
columns, status values, serializer) are named here once and pinned by ``tests/test_store_contract.py``.
"""

from __future__ import annotations

import functools
import sqlite3
from pathlib import Path
from typing import Any

import persistqueue
import persistqueue.serializers.json as json_serializer
from persistqueue.sqlackqueue import AckStatus

DB_FILE = "outbox.db"
QUEUE_NAME = "outbox"
TABLE = f"{persistqueue.SQLiteAckQueue._TABLE_NAME}_{QUEUE_NAME}"  # persist-queue: "<_TABLE_NAME>_<name>"
STATUS_READY = int(AckStatus.inited)  # what SQLiteAckQueue.put writes; get() picks statuses < unack
# A partial write of the WAL is detected by its checksums; with synchronous=FULL every COMMIT fsyncs the
# WAL before returning, which is what makes an ack survive kill -9 and power loss. WAL lets the flusher
# and the CLI read while the writer commits. journal_size_limit truncates the WAL after checkpoints so the
# file does not stay at its high-water mark.
PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=FULL",
    "PRAGMA journal_size_limit=4194304",
    "PRAGMA foreign_keys=OFF",
)
# Set before the first table exists (it cannot change later without VACUUM): freed pages of delivered
# messages are returned to the filesystem by incremental_vacuum, off the hot path.
AUTO_VACUUM = "PRAGMA auto_vacuum=INCREMENTAL"

_CREATE = (
    """CREATE TABLE IF NOT EXISTS outbox_stats (
        id INTEGER PRIMARY KEY CHECK (id = 1), messages INTEGER NOT NULL, bytes INTEGER NOT NULL)""",
    "INSERT OR IGNORE INTO outbox_stats (id, messages, bytes) VALUES (1, 0, 0)",
    """CREATE TABLE IF NOT EXISTS idempotency_keys (
        key TEXT PRIMARY KEY, message_id INTEGER NOT NULL, created REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS message_state (
        message_id INTEGER PRIMARY KEY, attempts INTEGER NOT NULL DEFAULT 0, first_attempt REAL,
        last_attempt REAL, last_error TEXT, next_attempt REAL, held INTEGER NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS dead_letters (
        message_id INTEGER PRIMARY KEY, data BLOB NOT NULL, enqueued_at REAL NOT NULL, reason TEXT NOT NULL,
        status INTEGER, response BLOB, attempts INTEGER NOT NULL, first_attempt REAL, last_attempt REAL,
        dead_at REAL NOT NULL)""",
)

INSERT_WITH_ID = f"INSERT INTO {TABLE} (_id, data, timestamp, status) VALUES (?, ?, ?, {STATUS_READY})"
# The id AUTOINCREMENT would give next: sqlite_sequence holds the largest id the table ever had, so an id is
# never reused, even after the newest messages were delivered and removed.
NEXT_ID = f"SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = '{TABLE}'), 0) + 1"
CHUNKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)  # rows per multi-row INSERT or DELETE: 9 statement shapes, few statements
SELECT_ONE = f"SELECT _id, data, timestamp FROM {TABLE} WHERE _id = ?"
DELETE = f"DELETE FROM {TABLE} WHERE _id = ?"
DELETE_STATE = "DELETE FROM message_state WHERE message_id = ?"
OLDEST = f"SELECT timestamp FROM {TABLE} ORDER BY _id LIMIT 1"
STATS = "SELECT messages, bytes FROM outbox_stats WHERE id = 1"
ADD_STATS = "UPDATE outbox_stats SET messages = messages + ?, bytes = bytes + ? WHERE id = 1"
COUNT_DEAD = "SELECT COUNT(*) FROM dead_letters"
FIND_KEY = "SELECT message_id FROM idempotency_keys WHERE key = ?"
INSERT_KEY = "INSERT INTO idempotency_keys (key, message_id, created) VALUES (?, ?, ?)"
# Keys are inserted in time order, so the oldest rowids are the oldest keys: each pass looks at a bounded
# slice from the start of the table instead of scanning it (there is no index on ``created``).
PRUNE_KEYS = """DELETE FROM idempotency_keys WHERE created < ? AND rowid IN
    (SELECT rowid FROM idempotency_keys ORDER BY rowid LIMIT ?)"""
WINDOW = f"""SELECT o._id, o.data, o.timestamp, COALESCE(s.attempts, 0)
    FROM {TABLE} o LEFT JOIN message_state s ON s.message_id = o._id
    WHERE o._id > ? AND COALESCE(s.held, 0) = 0 ORDER BY o._id LIMIT ?"""
DELIVERABLE = f"""SELECT 1 FROM {TABLE} o LEFT JOIN message_state s ON s.message_id = o._id
    WHERE o._id = ? AND COALESCE(s.held, 0) = 0"""
RECORD_ATTEMPT = """INSERT INTO message_state (message_id, attempts, first_attempt, last_attempt, last_error,
    next_attempt) VALUES (?, 1, ?, ?, ?, ?) ON CONFLICT (message_id) DO UPDATE SET attempts = attempts + 1,
    last_attempt = excluded.last_attempt, last_error = excluded.last_error, next_attempt = excluded.next_attempt"""
STATE_OF = "SELECT attempts, first_attempt, last_attempt, last_error, held FROM message_state WHERE message_id = ?"
INSERT_DEAD = """INSERT OR REPLACE INTO dead_letters (message_id, data, enqueued_at, reason, status, response,
    attempts, first_attempt, last_attempt, dead_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


@functools.cache
def insert_rows(count: int) -> str:
    """One INSERT of ``count`` messages, each bound as (id, data, timestamp)."""
    return f"INSERT INTO {TABLE} (_id, data, timestamp, status) VALUES " + ", ".join(
        [f"(?, ?, ?, {STATUS_READY})"] * count)


@functools.cache
def delete_rows(count: int) -> tuple[str, str, str]:
    """Removing ``count`` messages by id: how many there are and their bytes, their rows, their state.

    The count comes from an aggregate, not ``RETURNING``: every row a statement returns is one more step,
    and every step waits to get the GIL back.
    """
    ids = ", ".join(["?"] * count)
    return (f"SELECT count(*), coalesce(sum(length(data)), 0) FROM {TABLE} WHERE _id IN ({ids})",
            f"DELETE FROM {TABLE} WHERE _id IN ({ids})", f"DELETE FROM message_state WHERE message_id IN ({ids})")


def encode_record(record: dict[str, Any]) -> bytes:
    """Serialise a record exactly as ``SQLiteAckQueue(serializer=json)`` would."""
    return json_serializer.dumps(record)


def decode_record(data: bytes) -> Any:
    """Deserialise a stored record; raises ``ValueError`` on bytes that are not JSON."""
    return json_serializer.loads(bytes(data))


BUSY_TIMEOUT_MS = 30_000  # how long the writer waits for another process's write lock before failing


def connect(db_path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection in autocommit mode, so transactions are exactly our BEGIN ... COMMIT."""
    if readonly:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=5.0)
        conn.execute("PRAGMA query_only=ON")
        return conn
    conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    return conn


def create(data_dir: Path) -> Path:
    """Create (or open) the database and all tables; persist-queue creates its own table."""
    db_path = data_dir / DB_FILE
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute(AUTO_VACUUM)
        for pragma in PRAGMAS:
            conn.execute(pragma)
        for statement in _CREATE:
            conn.execute(statement)
    finally:
        conn.close()
    queue = persistqueue.SQLiteAckQueue(
        str(data_dir), name=QUEUE_NAME, db_file_name=DB_FILE, serializer=json_serializer,
        multithreading=True, auto_resume=False,
    )
    queue.close()
    return db_path

# -- operator changes (admin) and listings ---------------------------------------------------------------
SET_HELD = """INSERT INTO message_state (message_id, held) VALUES (?, ?)
    ON CONFLICT (message_id) DO UPDATE SET held = excluded.held"""
ALL_IDS = f"SELECT _id FROM {TABLE}"
SELECT_DEAD = "SELECT message_id, data, enqueued_at FROM dead_letters WHERE message_id = ?"
ALL_DEAD_IDS = "SELECT message_id FROM dead_letters"
DEAD_IDS_OLDER_THAN = "SELECT message_id FROM dead_letters WHERE dead_at < ?"
DELETE_DEAD = "DELETE FROM dead_letters WHERE message_id = ?"
LIST_QUEUE = f"""SELECT o._id, o.data, o.timestamp, COALESCE(s.attempts, 0), s.last_attempt, s.last_error,
    s.next_attempt, COALESCE(s.held, 0) FROM {TABLE} o LEFT JOIN message_state s ON s.message_id = o._id
    WHERE o._id >= ? ORDER BY o._id LIMIT ?"""
LIST_DEAD = """SELECT message_id, data, enqueued_at, reason, status, response, attempts, first_attempt,
    last_attempt, dead_at FROM dead_letters WHERE message_id >= ? ORDER BY message_id LIMIT ?"""
