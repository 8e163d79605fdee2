"""Ack latency while the daemon drains its backlog: ingest and delivery in one process, at once.

The other benches measure ingest during an outage (nothing is delivered) and delivery with no ingest.
In production both run together: the delivery threads and the event loop share one GIL and two cores,
with the local API on the same machine. Each run starts the daemon on a copy of a built backlog with
``--concurrency C``; after a warm-up, one producer sends a message per request (connect, set, ack, close)
every 20 ms while the backlog drains, and the API's receive timestamps give the delivery rate meanwhile.

    python bench/ack_during_drain.py [--concurrency 1 8 32] [--seconds 6] [--rounds 3] [--backlog 20000]
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import harness
from harness import (
    Daemon,
    FakeApi,
    Spread,
    draining_daemon,
    filesystem_of,
    fill,
    machine,
    ms,
    percentile,
    table,
    workdir,
)

from forwarder.client import Client

_WARMUP = 1.0
_PAUSE = 0.02  # between two requests: a steady trickle of web requests, not a load test


@dataclass(frozen=True, slots=True)
class Run:
    p50: float
    p99: float
    worst: float
    acks: int
    delivered_per_second: float


def run_once(work: Path, template: Path, api: FakeApi, concurrency: int, seconds: float) -> Run:
    latencies: list[float] = []
    with draining_daemon(work, template, api, concurrency) as daemon:
        time.sleep(_WARMUP)
        start = time.monotonic()  # the API stamps arrivals with the same clock
        while time.monotonic() - start < seconds:
            sent = time.perf_counter()
            with Client(str(daemon.socket), timeout=120.0) as client:
                client.set(f"trickle{len(latencies)}@example.com", {"n": str(len(latencies))})
            latencies.append(time.perf_counter() - sent)
            time.sleep(_PAUSE)
        end = time.monotonic()
        if daemon.status()["backlog"] <= len(latencies):
            raise RuntimeError("the backlog ran out before the window closed: raise --backlog")
    delivered = sum(1 for r in api.received() if 200 <= r["status"] < 300 and start <= r["at"] < end)
    shutil.rmtree(daemon.data_dir.parent, ignore_errors=True)
    return Run(percentile(latencies, 0.5), percentile(latencies, 0.99), max(latencies), len(latencies),
               delivered / (end - start))


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of the measured window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backlog", type=int, default=20000, help="messages in the backlog at each start")
    args = parser.parse_args()

    rows = []
    with workdir("ack-drain", args.work_dir) as work, FakeApi(work) as api:
        print(f"{machine()}\nData dir on: {filesystem_of(work)}")
        with Daemon(work / "template") as builder:
            fill(builder.socket, args.backlog)
        for concurrency in args.concurrency:
            runs = [run_once(work, work / "template" / "data", api, concurrency, args.seconds)
                    for _ in range(args.rounds)]
            rows.append([str(concurrency), str(min(r.acks for r in runs)), ms(Spread.of([r.p50 for r in runs]), 1),
                         ms(Spread.of([r.p99 for r in runs]), 1), ms(Spread.of([r.worst for r in runs]), 1),
                         Spread.of([r.delivered_per_second for r in runs]).show(digits=0)])
            print(" | ".join(rows[-1]), flush=True)
    print(f"\nAcks while draining, ms: median over {args.rounds} runs of {args.seconds:g} s (min-max)\n")
    print(table(["concurrency", "acks/run (fewest)", "ack p50", "ack p99", "worst ack", "delivered msg/s"], rows))


if __name__ == "__main__":
    main()
