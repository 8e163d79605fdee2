"""Concurrent producers (issue 8, item 3): throughput and ack latency at 1, 16, 64 and 256 producers.

Each producer is one long-lived connection with exactly one message outstanding: send, wait for the durable
ack, send the next (no pipelining). Producers are spread over a few generator processes, each driving its
sockets from one epoll loop on raw sockets, so the load generator is cheap; its CPU use is reported next to
the daemon's, so a reader can see which side was the bottleneck. RabbitMQ runs the same pattern in the same
run (pika, one confirm-mode channel per producer on one shared ioloop per process, persistent publishes to
a durable queue). ``--ping`` sends pings instead (ours only): the daemon's ceiling for this pattern with
no storage at all, to tell the cost of the socket and event-loop path from the cost of storing.

    python bench/concurrency.py [--producers 1 16 64 256] [--seconds 3] [--rounds 3] [--no-rabbitmq] [--ping]
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import selectors
import socket
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
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

_QUEUE = "turret-bench"
_WARMUP = 0.5  # seconds of load before the measured window opens
_LINES_PER_PRODUCER = 16
_PING = b'{"op":"ping"}\n'
_ping_only = False  # --ping: ours sends pings (no storage), set before the generators fork


@dataclass(frozen=True, slots=True)
class Window:
    """The measured interval, in ``time.monotonic()`` seconds (one clock for every process on Linux)."""

    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Share:
    """What one generator process saw inside the window: every ack that arrived in it, with its latency."""

    acks: int
    latencies: array[float]
    cpu: float


def _ours_generator(socket_path: str, first: int, producers: int, pipe: multiprocessing.connection.Connection,
                    ) -> None:
    """Drive ``producers`` connections from one epoll loop until the window closes, then report."""
    socks, sent_at, buffers, lines, turn = [], [0.0] * producers, [b""] * producers, [], [0] * producers
    selector = selectors.EpollSelector()
    for i in range(producers):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(socket_path)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, i)
        socks.append(sock)
        lines.append([_PING if _ping_only else set_line((first + i) * _LINES_PER_PRODUCER + k)
                      for k in range(_LINES_PER_PRODUCER)])
    pipe.send("ready")
    window: Window = pipe.recv()
    time.sleep(max(0.0, window.start - _WARMUP - time.monotonic()))
    latencies: array[float] = array("d")
    cpu_start = cpu_end = 0.0
    for i, sock in enumerate(socks):
        sent_at[i] = time.monotonic()
        sock.send(lines[i][0])
    outstanding = producers
    while outstanding:
        now = time.monotonic()
        if not cpu_start and now >= window.start:
            cpu_start = time.process_time()
        if not cpu_end and now >= window.end:
            cpu_end = time.process_time()
        for key, _ in selector.select(1.0):
            i = key.data
            chunk = socks[i].recv(4096)
            if not chunk:
                raise ConnectionError("the daemon closed a producer's connection")
            buffers[i] += chunk
            if b"\n" not in buffers[i]:
                continue
            done = time.monotonic()
            if not buffers[i].startswith(b'{"ok": true'):
                raise RuntimeError(f"refused: {buffers[i][:200]!r}")
            buffers[i] = b""
            if window.start <= done <= window.end:
                latencies.append(done - sent_at[i])
            if done < window.end:
                turn[i] += 1
                sent_at[i] = done
                socks[i].send(lines[i][turn[i] % _LINES_PER_PRODUCER])
            else:
                outstanding -= 1
    for sock in socks:
        sock.close()
    pipe.send(Share(len(latencies), latencies, (cpu_end or time.process_time()) - cpu_start))


def _rabbit_generator(port: int, first: int, producers: int, pipe: multiprocessing.connection.Connection,
                      ) -> None:
    """The same pattern over AMQP: each producer publishes, waits for its confirm, publishes the next."""
    import pika  # type: ignore[import-untyped]
    from pika.adapters.select_connection import IOLoop  # type: ignore[import-untyped]

    loop = IOLoop()
    parameters = pika.ConnectionParameters(host="127.0.0.1", port=port)
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                      content_type="application/json")
    latencies: array[float] = array("d")
    state: dict[str, Any] = {"open": 0, "window": None, "done": 0, "cpu_start": 0.0, "cpu_end": 0.0}

    def producer(i: int) -> None:
        sent_at = [0.0]
        line_of = [set_line((first + i) * _LINES_PER_PRODUCER + k) for k in range(_LINES_PER_PRODUCER)]
        turn = [0]
        channel_box: list[Any] = []

        def publish() -> None:
            sent_at[0] = time.monotonic()
            channel_box[0].basic_publish("", _QUEUE, line_of[turn[0] % _LINES_PER_PRODUCER], properties)

        def on_confirm(frame: Any) -> None:
            if not isinstance(frame.method, pika.spec.Basic.Ack):
                raise RuntimeError("RabbitMQ nacked a publish")
            done, window = time.monotonic(), state["window"]
            if window.start <= done <= window.end:
                latencies.append(done - sent_at[0])
            if done < window.end:
                turn[0] += 1
                publish()
            else:
                state["done"] += 1
                if state["done"] == producers:
                    loop.stop()

        def on_channel(channel: Any) -> None:
            channel_box.append(channel)
            channel.confirm_delivery(on_confirm, callback=lambda _frame: opened())

        def opened() -> None:
            state["open"] += 1
            if state["open"] == producers:
                loop.stop()

        pika.SelectConnection(parameters, custom_ioloop=loop,
                              on_open_callback=lambda conn: conn.channel(on_open_callback=on_channel))
        state.setdefault("starters", []).append(publish)

    for i in range(producers):
        producer(i)
    loop.start()  # until every channel is in confirm mode
    pipe.send("ready")
    state["window"] = window = pipe.recv()
    time.sleep(max(0.0, window.start - _WARMUP - time.monotonic()))

    def mark(name: str) -> None:
        state[name] = time.process_time()

    loop.call_later(max(0.0, window.start - time.monotonic()), lambda: mark("cpu_start"))
    loop.call_later(max(0.0, window.end - time.monotonic()), lambda: mark("cpu_end"))
    for publish in state["starters"]:
        publish()
    loop.start()  # until every producer got its last confirm after the window
    cpu = (state["cpu_end"] or time.process_time()) - state["cpu_start"]
    pipe.send(Share(len(latencies), latencies, cpu))


@dataclass(frozen=True, slots=True)
class Round:
    throughput: float
    p50: float
    p99: float
    server_cpu: float  # fraction of one core, over the window
    generator_cpu: float


def run_round(generator: Callable[..., None], target: Any, producers: int, seconds: float, server_pid: int,
              processes: int) -> Round:
    """Start the generator processes, open one shared window, and merge what they measured."""
    context = multiprocessing.get_context("fork")
    pipes, workers = [], []
    per = [producers // processes + (1 if k < producers % processes else 0) for k in range(processes)]
    first = 0
    for count in per:
        parent, child = context.Pipe()
        worker = context.Process(target=generator, args=(target, first, count, child), daemon=True)
        worker.start()
        pipes.append(parent)
        workers.append(worker)
        first += count
    for pipe in pipes:
        if not pipe.poll(120):
            raise RuntimeError("a generator process did not get ready")
        pipe.recv()
    start = time.monotonic() + 0.2 + _WARMUP
    window = Window(start, start + seconds)
    for pipe in pipes:
        pipe.send(window)
    time.sleep(max(0.0, window.start - time.monotonic()))
    server_before = cpu_seconds(server_pid)
    time.sleep(max(0.0, window.end - time.monotonic()))
    server_cpu = (cpu_seconds(server_pid) - server_before) / seconds
    shares = []
    for pipe in pipes:
        if not pipe.poll(60):
            raise RuntimeError("a generator process did not report")
        shares.append(pipe.recv())
    for worker in workers:
        worker.join(10)
    latencies = [x for share in shares for x in share.latencies]
    return Round(sum(s.acks for s in shares) / seconds, percentile(latencies, 0.5),
                 percentile(latencies, 0.99), server_cpu, sum(s.cpu for s in shares) / seconds)


def _rabbit_queue(broker: RabbitMQ) -> None:
    import pika
    connection = pika.BlockingConnection(broker.parameters())
    channel = connection.channel()
    channel.queue_declare(_QUEUE, durable=True)
    channel.queue_purge(_QUEUE)
    connection.close()


def _rows(system: str, results: dict[int, list[Round]]) -> list[list[str]]:
    rows = []
    for producers, rounds in results.items():
        rows.append([system, str(producers),
                     Spread.of([r.throughput for r in rounds]).show(digits=0),
                     ms(Spread.of([r.p50 for r in rounds]), 2), ms(Spread.of([r.p99 for r in rounds]), 2),
                     f"{Spread.of([r.server_cpu for r in rounds]).median:.0%}",
                     f"{Spread.of([r.generator_cpu for r in rounds]).median:.0%}"])
    return rows


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--producers", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measured window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=min(2, os.cpu_count() or 1),
                        help="generator processes (each drives its share of the producers)")
    parser.add_argument("--ping", action="store_true",
                        help="ours sends pings instead of sets: the daemon's ceiling without storage "
                             "(RabbitMQ is not measured)")
    harness.add_rabbitmq_flags(parser)
    args = parser.parse_args()

    global _ping_only
    _ping_only = args.ping
    missing = "skipped (--ping measures ours without storage)" if args.ping else harness.rabbitmq_skipped(args)
    ours: dict[int, list[Round]] = {n: [] for n in args.producers}
    theirs: dict[int, list[Round]] = {n: [] for n in args.producers}
    with workdir("concurrency", args.work_dir) as work:
        print(f"{machine()}\nData dir on: {filesystem_of(work)}")
        if missing:
            print(f"RabbitMQ: not measured: {missing}")
        with Daemon(work) as daemon:
            broker = None if missing else RabbitMQ(work / "rabbitmq").__enter__()
            try:
                for _ in range(args.rounds):
                    for producers in args.producers:
                        processes = min(args.processes, producers)
                        ours[producers].append(run_round(_ours_generator, str(daemon.socket), producers,
                                                         args.seconds, daemon.pid, processes))
                        if broker is not None:
                            _rabbit_queue(broker)
                            theirs[producers].append(run_round(_rabbit_generator, broker.port, producers,
                                                               args.seconds, broker.pid, processes))
                backlog = daemon.status()["backlog"]
            finally:
                if broker is not None:
                    broker.__exit__()
        print(f"Messages stored by the daemon (all durable, all acked): {backlog}"
              + (" (--ping: pings store nothing)" if args.ping else ""))

    print(f"\nConcurrent producers, one message outstanding each: median over {args.rounds} rounds of "
          f"{args.seconds:g} s (min-max)\n")
    rows = _rows("ours", ours) + ([] if missing else _rows("RabbitMQ", theirs))
    print(table(["system", "producers", "acks/s", "p50 ms", "p99 ms", "server CPU", "generator CPU"], rows))
    if not missing:
        print("\nOurs / RabbitMQ throughput, per round (same run):\n")
        print(table(["producers", "throughput ratio", "p99 ratio (RabbitMQ / ours)"], [
            [str(n), Spread.of([o.throughput / t.throughput for o, t in zip(ours[n], theirs[n], strict=True)])
             .show(digits=1) + "x",
             Spread.of([t.p99 / o.p99 for o, t in zip(ours[n], theirs[n], strict=True)]).show(digits=1) + "x"]
            for n in args.producers]))


if __name__ == "__main__":
    main()
