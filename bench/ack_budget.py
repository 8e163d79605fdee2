"""What an ack does beyond its floors, piece by piece, in-process (issue 8, items 1 and 6).

``ack_latency.py`` measures two floors: a ping on a new connection (connect, accept, read, reply, close; no
storage) and a one-row SQLite commit (BEGIN, INSERT, COMMIT and its fsync). An ack is those plus the work
listed here, timed alone with ``timeit`` (best of 7 repeats): parsing and checking the request line,
serialising the stored record, the stats row the writer updates in the same transaction, and the two extra
turns of the event loop (the commit pass, then the replies). Against the margin a latency target leaves
above the floors, the sum says whether the target is within reach of this design (a Python daemon that
parses JSON and commits to SQLite); this is the CPU of each piece alone, not counting any wait.

    python bench/ack_budget.py [--number 20000]
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import harness
from harness import machine, table

from forwarder.message import Message
from forwarder.protocol import parse_frame
from forwarder.store import schema

LINE = b'{"op":"set","email":"user1@example.com","attributes":{"plan":"pro","n":"1"}}'


def the_message() -> Message:
    message = parse_frame(LINE)
    assert isinstance(message, Message)
    return message


def best_us(action: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(action, number=number, repeat=7)) / number * 1e6


def transaction_us(number: int, with_stats: bool) -> float:
    """One row's transaction without its fsync (``synchronous=OFF``): the statements' CPU alone."""
    conn = schema.connect(schema.create(Path(tempfile.mkdtemp(prefix="ack-budget-"))))
    conn.execute("PRAGMA synchronous = OFF")
    data = schema.encode_record(the_message().to_record())
    ids = itertools.count(1)

    def commit() -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(schema.INSERT_WITH_ID, (next(ids), data, time.time()))
        if with_stats:
            conn.execute(schema.ADD_STATS, (1, len(data)))
        conn.execute("COMMIT")
    try:
        return best_us(commit, number)
    finally:
        conn.close()


def loop_turn_us(number: int) -> float:
    """A callback scheduled with ``call_soon`` and awaited: what one more pass of the event loop costs."""
    async def turns() -> float:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for _ in range(number):
            future = loop.create_future()
            loop.call_soon(future.set_result, None)
            await future
        return (time.perf_counter() - started) / number * 1e6
    return min(asyncio.run(turns()) for _ in range(7))


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--number", type=int, default=20000, help="calls per timing repeat")
    args = parser.parse_args()
    message = the_message()
    costs = {
        "parse and check the request line": best_us(lambda: parse_frame(LINE), args.number),
        "serialise the stored record": best_us(lambda: schema.encode_record(message.to_record()), args.number),
        "the stats row (transaction with it, minus without it)":
            transaction_us(args.number // 10, True) - transaction_us(args.number // 10, False),
        "two more turns of the event loop": 2 * loop_turn_us(args.number),
    }
    print(machine())
    print()
    print(table(["work beyond the floors", "us"], [[name, f"{us:.1f}"] for name, us in costs.items()]
                + [["sum", f"{sum(costs.values()):.1f}"]]))


if __name__ == "__main__":
    main()
