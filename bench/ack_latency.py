"""Ack latency, ours against RabbitMQ in one run: per request (issue 8, item 1) and on one connection (2).

Per request is the web-app pattern: connect, send one message, wait for the durable ack, close. Ours uses
``forwarder.Client``; RabbitMQ uses pika as the old connector's users did: a new connection, a channel in
confirm mode, one persistent publish to a durable queue, close. The long-lived figures reuse one connection
(ours) and one confirm-mode channel (RabbitMQ). Rounds alternate ours and RabbitMQ, so both see the same
machine; each ratio is taken within a round, then the median over rounds is reported.

Floors are measured alongside, to show what is physics and what is code: ``ping`` per request (the same
connect and round trip, no storage), ``ping`` on one connection (the long-lived round trip, no storage) and
a bare SQLite commit of one row with the outbox's pragmas (the fsync every ack waits for).

    python bench/ack_latency.py [--rounds 5] [--requests 2000] [--no-rabbitmq]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import harness
from harness import (
    Daemon,
    RabbitMQ,
    Spread,
    cpu_seconds,
    filesystem_of,
    machine,
    ms,
    percentile,
    set_line,
    table,
    workdir,
)

from forwarder.client import Client
from forwarder.store import schema

_QUEUE = "turret-bench"
Sampler = Callable[[int], list[float]]


def _timed(count: int, one: Callable[[int], object]) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        one(n)
        latencies.append(time.perf_counter() - started)
    return latencies


def ours_per_request(socket_path: Path) -> Sampler:
    def one(n: int) -> None:
        with Client(str(socket_path)) as client:
            client.set(f"user{n}@example.com", {"plan": "pro", "n": str(n)})
    return lambda count: _timed(count, one)


def ours_ping_per_request(socket_path: Path) -> Sampler:
    def one(n: int) -> None:
        with Client(str(socket_path)) as client:
            client.ping()
    return lambda count: _timed(count, one)


def ours_ping_long_lived(socket_path: Path) -> Sampler:
    client = Client(str(socket_path))
    return lambda count: _timed(count, lambda n: client.ping())


def ours_long_lived(socket_path: Path) -> Sampler:
    client = Client(str(socket_path))
    def one(n: int) -> None:
        client.set(f"user{n}@example.com", {"plan": "pro", "n": str(n)})
    return lambda count: _timed(count, one)


def _persistent() -> Any:
    import pika  # type: ignore[import-untyped]
    return pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json")


def rabbit_per_request(broker: RabbitMQ) -> Sampler:
    import pika
    properties = _persistent()

    def one(n: int) -> None:
        connection = pika.BlockingConnection(broker.parameters())
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", _QUEUE, set_line(n), properties, mandatory=True)
        connection.close()
    return lambda count: _timed(count, one)


def rabbit_long_lived(broker: RabbitMQ) -> Sampler:
    import pika
    properties = _persistent()
    channel = pika.BlockingConnection(broker.parameters()).channel()
    channel.confirm_delivery()
    return lambda count: _timed(count, lambda n: channel.basic_publish("", _QUEUE, set_line(n), properties,
                                                                       mandatory=True))


def sqlite_commit_floor(work: Path) -> Sampler:
    """One 300-byte row per commit, WAL, synchronous=FULL: the fsync every ack must wait for."""
    conn = schema.connect(work / "floor.db")
    conn.execute("CREATE TABLE floor (id INTEGER PRIMARY KEY AUTOINCREMENT, data BLOB, at REAL, status INT)")
    row = b"x" * 300

    def one(n: int) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO floor (data, at, status) VALUES (?, ?, 1)", (row, time.time()))
        conn.execute("COMMIT")
    return lambda count: _timed(count, one)


def _rabbit_queue(broker: RabbitMQ, purge: bool) -> None:
    import pika
    connection = pika.BlockingConnection(broker.parameters())
    channel = connection.channel()
    channel.queue_declare(_QUEUE, durable=True)
    if purge:
        channel.queue_purge(_QUEUE)
    connection.close()


def measure(samplers: dict[str, tuple[Sampler, int]], rounds: int, between: Callable[[], None]) -> dict[
        str, tuple[list[float], list[float]]]:
    """Per sampler, the p50 and p99 of each round; the samplers take turns inside every round."""
    for sampler, count in samplers.values():  # warm-up: connections, caches, JIT-free but page-cache warm
        sampler(max(50, count // 10))
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in samplers}
    for _ in range(rounds):
        for name, (sampler, count) in samplers.items():
            latencies = sampler(count)
            results[name][0].append(percentile(latencies, 0.50))
            results[name][1].append(percentile(latencies, 0.99))
        between()
    return results


def _ratio(results: dict[str, tuple[list[float], list[float]]], slow: str, fast: str, which: int) -> str:
    if slow not in results:
        return "-"
    ratios = [s / f for s, f in zip(results[slow][which], results[fast][which], strict=True)]
    return Spread.of(ratios).show(digits=1) + "x"


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000, help="per-request acks per round (ours)")
    parser.add_argument("--rabbitmq-requests", type=int, default=1000, help="per-request publishes per round")
    parser.add_argument("--sequential", type=int, default=5000, help="acks per round on one connection")
    harness.add_rabbitmq_flags(parser)
    args = parser.parse_args()

    missing = harness.rabbitmq_skipped(args)
    with workdir("ack", args.work_dir) as work:
        print(f"{machine()}\nData dir on: {filesystem_of(work)}")
        if missing:
            print(f"RabbitMQ: not measured: {missing}")
        with Daemon(work) as daemon:
            samplers: dict[str, tuple[Sampler, int]] = {
                "ours per request": (ours_per_request(daemon.socket), args.requests),
                "ours long-lived": (ours_long_lived(daemon.socket), args.sequential),
                "floor: ping per request (no storage)": (ours_ping_per_request(daemon.socket), args.requests),
                "floor: ping on one connection (no storage)": (ours_ping_long_lived(daemon.socket),
                                                               args.sequential),
                "floor: one-row SQLite commit": (sqlite_commit_floor(work), args.requests),
            }
            cpu_before = cpu_seconds(daemon.pid)
            if missing:
                results = measure(samplers, args.rounds, lambda: None)
            else:
                with RabbitMQ(work / "rabbitmq") as broker:
                    _rabbit_queue(broker, purge=False)
                    samplers["RabbitMQ per request"] = (rabbit_per_request(broker), args.rabbitmq_requests)
                    samplers["RabbitMQ long-lived"] = (rabbit_long_lived(broker), args.sequential)
                    results = measure(samplers, args.rounds, lambda: _rabbit_queue(broker, purge=True))
            print(f"Daemon CPU over the run: {cpu_seconds(daemon.pid) - cpu_before:.1f} s")

    print(f"\nAck latency, ms: median over {args.rounds} rounds (min-max of the rounds)\n")
    print(table(["measure", "requests/round", "p50", "p99"],
                [[name, str(samplers[name][1]), ms(Spread.of(p50)), ms(Spread.of(p99))]
                 for name, (p50, p99) in results.items()]))
    if missing:
        return
    print("\nRabbitMQ / ours, per round (same run):\n")
    print(table(["pattern", "p50 ratio", "p99 ratio"], [
        ["per request", _ratio(results, "RabbitMQ per request", "ours per request", 0),
         _ratio(results, "RabbitMQ per request", "ours per request", 1)],
        ["long-lived", _ratio(results, "RabbitMQ long-lived", "ours long-lived", 0),
         _ratio(results, "RabbitMQ long-lived", "ours long-lived", 1)],
    ]))


if __name__ == "__main__":
    main()
