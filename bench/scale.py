"""Scale (issue 8, item 5): a backlog of a million ~300-byte messages.

The backlog is built the way production builds one: through the daemon's socket (running without
credentials, so nothing drains), by several pipelined connections from separate processes; every message
is committed and acked before it counts. Then, per round, on a fresh copy of that backlog: the daemon's
start time (spawn until it answers ping), ``status --json`` time, the drain rate at the head of the
backlog to the local API (no added delay, default concurrency), and the daemon's memory.

    python bench/scale.py [--messages 1000000] [--rounds 3] [--connections 4] [--keep-backlog DIR]
"""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import harness
from harness import (
    PYTHON,
    Daemon,
    FakeApi,
    Spread,
    cpu_seconds,
    filesystem_of,
    fill,
    machine,
    ms,
    rss_bytes,
    set_line,
    table,
    workdir,
)

from forwarder.message import Message
from forwarder.protocol import parse_frame
from forwarder.store import schema

_WARMUP = 1.0
_DB_FILES = (schema.DB_FILE, schema.DB_FILE + "-wal", schema.DB_FILE + "-shm")


def padding_for(record_bytes: int, n: int) -> int:
    """The padding that makes user ``n``'s stored record ``record_bytes`` long (as the outbox stores it)."""
    message = parse_frame(set_line(n)[:-1])
    assert isinstance(message, Message)
    bare = len(schema.encode_record(message.to_record()))
    return max(0, record_bytes - bare - len(', "note": ""'))


def build(work: Path, messages: int, connections: int, record_bytes: int) -> tuple[Path, float]:
    """Fill a new outbox through the daemon; returns its data dir and the seconds the fill took."""
    padding = padding_for(record_bytes, messages // 2)
    shares = [messages // connections + (1 if k < messages % connections else 0) for k in range(connections)]
    firsts = [sum(shares[:k]) for k in range(connections)]
    extra = ["--max-backlog-messages", str(messages), "--max-backlog-bytes", f"{messages * record_bytes * 2}"]
    with Daemon(work / "build", extra=extra) as daemon:
        started = time.monotonic()
        with multiprocessing.get_context("fork").Pool(connections) as pool:
            pool.starmap(fill, [(daemon.socket, share, padding, 1024, first) for share, first in zip(
                shares, firsts, strict=True)])
        seconds = time.monotonic() - started
        backlog = daemon.status()["backlog"]
    if backlog != messages:
        raise RuntimeError(f"built {backlog} messages, wanted {messages}")
    return daemon.data_dir, seconds


def status_seconds(daemon: Daemon, samples: int = 5) -> float:
    """Median wall time of ``turret-forwarder status --json`` (a new Python process each time, as typed)."""
    times = []
    for _ in range(samples):
        started = time.monotonic()
        subprocess.run([PYTHON, "-m", "forwarder", "status", "--json", "--data-dir", str(daemon.data_dir),
                        "--socket", str(daemon.socket)], check=True, capture_output=True, env=daemon.env,
                       cwd=daemon.data_dir.parent)
        times.append(time.monotonic() - started)
    return statistics.median(times)


@dataclass(frozen=True, slots=True)
class Round:
    start: float
    status_running: float
    status_stopped: float
    drain: float
    rss: int
    peak_rss: int
    daemon_cpu: float


def one_round(work: Path, template: Path, api: FakeApi, seconds: float) -> Round:
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(template, run / "data")
    api.clear()
    daemon = Daemon(run, api_url=api.url, ca_file=api.ca_file)
    with daemon:
        window_start = time.monotonic() + _WARMUP
        time.sleep(max(0.0, window_start - time.monotonic()))
        cpu_before = cpu_seconds(daemon.pid)
        time.sleep(seconds)
        cpu = (cpu_seconds(daemon.pid) - cpu_before) / seconds
        rss, peak = rss_bytes(daemon.pid), rss_bytes(daemon.pid, "VmHWM")
        running = status_seconds(daemon)
    stopped = status_seconds(daemon)
    arrivals = [r["at"] for r in api.received() if 200 <= r["status"] < 300]
    drained = sum(1 for at in arrivals if window_start <= at < window_start + seconds)
    shutil.rmtree(run, ignore_errors=True)
    return Round(daemon.start_seconds, running, stopped, drained / seconds, rss, peak, cpu)


def disk_bytes(data_dir: Path) -> int:
    return sum((data_dir / name).stat().st_size for name in _DB_FILES if (data_dir / name).exists())


def main() -> None:
    parser = harness.parser(__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--record-bytes", type=int, default=300, help="size of each stored message record")
    parser.add_argument("--connections", type=int, default=4, help="pipelined connections (one process each)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="drain window at the head of the backlog")
    parser.add_argument("--keep-backlog", help="build the backlog here once and reuse it on later runs")
    args = parser.parse_args()

    with workdir("scale", args.work_dir) as work, FakeApi(work) as api:
        print(f"{machine()}\nData dir on: {filesystem_of(work)}")
        kept = Path(args.keep_backlog) if args.keep_backlog else None
        if kept is not None and (kept / schema.DB_FILE).exists():
            template, build_seconds = kept, float("nan")
            print(f"Reusing the backlog in {kept}")
        else:
            template, build_seconds = build(work, args.messages, args.connections, args.record_bytes)
            print(f"Built {args.messages} messages through the socket by {args.connections} pipelined "
                  f"connections in {build_seconds:.1f} s", flush=True)
            if kept is not None:
                shutil.copytree(template, kept, dirs_exist_ok=True)
        on_disk = disk_bytes(template)
        rounds = [one_round(work, template, api, args.seconds) for _ in range(args.rounds)]
        stats = _stats(template)

    per_message, record = on_disk / stats[0], stats[1] / stats[0]
    print(f"\nScale: {stats[0]} messages of {record:.0f} bytes (stored record); rounds: median over "
          f"{args.rounds} (min-max)\n")
    print(table(["figure", "value", "target"], [
        ["build through the socket", f"{build_seconds:.1f} s ({stats[0] / build_seconds:.0f} msg/s)", "-"],
        ["disk bytes per message (db + wal + shm)", f"{per_message:.0f} ({on_disk / 1e6:.0f} MB in all)",
         "<= 360"],
        ["daemon start until ping, s", Spread.of([r.start for r in rounds]).show(digits=3), "<= 1.5"],
        ["RSS after start + drain window, MB", Spread.of([r.rss / 1e6 for r in rounds]).show(digits=1),
         "<= 100"],
        ["peak RSS (VmHWM), MB", Spread.of([r.peak_rss / 1e6 for r in rounds]).show(digits=1), "<= 100"],
        ["status --json, daemon running, ms", ms(Spread.of([r.status_running for r in rounds]), 0), "-"],
        ["status --json, daemon stopped, ms", ms(Spread.of([r.status_stopped for r in rounds]), 0), "-"],
        ["drain at the head, msg/s (concurrency 8, no delay)",
         Spread.of([r.drain for r in rounds]).show(digits=0), "-"],
        ["daemon CPU while draining", f"{statistics.median(r.daemon_cpu for r in rounds):.0%}", "-"],
    ]))


def _stats(template: Path) -> tuple[int, int]:
    """Message count and stored record bytes of the backlog, read-only."""
    from forwarder.store import open_readonly, read_stats
    conn = open_readonly(template)
    try:
        stats = read_stats(conn)
    finally:
        conn.close()
    return stats.messages, stats.bytes


if __name__ == "__main__":
    main()
